//! The coordinator's status hub: what its long-running tasks last did, published on watch
//! channels. The Admin API reads it (and later metrics and the dashboard will); nothing is read
//! back from disk, and a reader never waits on a writer.

#![warn(clippy::disallowed_methods)] // blocking calls run off the async workers (clippy.toml)

use lifeboat_dr::process::Status as ProcessingStatus;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Hub {
    /// Present when the coordinator processes into a target store.
    processing: Option<watch::Sender<ProcessingStatus>>,
}

impl Hub {
    pub fn new(processes: bool) -> Self {
        Hub {
            processing: processes.then(|| watch::Sender::new(ProcessingStatus::default())),
        }
    }

    /// Processing's figures (latest processed point, last pass, last error), if it runs.
    pub fn processing(&self) -> Option<ProcessingStatus> {
        self.processing.as_ref().map(|s| s.borrow().clone())
    }

    /// Changes processing's figures (a no-op when the coordinator does not process).
    pub fn update_processing(&self, f: impl FnOnce(&mut ProcessingStatus)) {
        if let Some(s) = &self.processing {
            s.send_modify(f);
        }
    }

    /// Every change of processing's figures, for readers that follow them.
    pub fn watch_processing(&self) -> Option<watch::Receiver<ProcessingStatus>> {
        self.processing.as_ref().map(|s| s.subscribe())
    }
}
