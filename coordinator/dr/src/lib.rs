//! Lifeboat's DR data plane: what happens to recovery points once agents have written them to
//! the cache store. [`process`] moves them into the target store (the DR region), trims the
//! cache, applies retention with compaction and scrubs the target; [`failover`] restores a
//! group from the target store alone (failover, DR drills). The coordinator's serving loop and
//! the `lifeboat` CLI both drive it; it knows nothing of either (no gRPC, no sessions).

use std::time::Duration;

pub mod failover;
pub mod process;

/// The retention range a policy may set (1 h to 72 h).
pub const RETENTION: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3600)..=Duration::from_secs(72 * 3600);
