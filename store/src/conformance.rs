//! The backend conformance suite: every [`Backend`] must pass these, whatever it talks to.
//!
//! Use [`crate::conformance_suite!`] in a test file with an expression that yields a fresh,
//! empty backend (a new directory, a new name prefix in a shared container); it expands to one
//! `#[tokio::test]` per case so each shows up on its own in the test report.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::faulty::{Fault, Faulty};
use crate::backend::retry::{RetryPolicy, Retrying};
use crate::backend::{Backend, DynBackend, ErrorKind};
use crate::name::ObjectName;

fn n(s: &str) -> ObjectName {
    ObjectName::new(s).expect("valid test name")
}

/// Deterministic incompressible bytes (also for other tests of stored data).
pub fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Put then get returns the same bytes; head reports the size; empty objects work.
pub async fn put_get(b: DynBackend) {
    let data = pseudo_random(100_003, 1);
    b.put_new(&n("a/b/c.bin"), data.clone()).await.unwrap();
    assert_eq!(b.get(&n("a/b/c.bin")).await.unwrap(), data);
    assert_eq!(b.head(&n("a/b/c.bin")).await.unwrap().size, 100_003);
    b.put_new(&n("a/empty"), Bytes::new()).await.unwrap();
    assert_eq!(b.get(&n("a/empty")).await.unwrap().len(), 0);
}

/// A second put of the same name fails as "already exists" and leaves the first intact.
pub async fn create_only(b: DynBackend) {
    let name = n("points/p1.point");
    b.put_new(&name, Bytes::from_static(b"first"))
        .await
        .unwrap();
    let err = b
        .put_new(&name, Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("points/p1.point"), "{err}");
    assert_eq!(b.get(&name).await.unwrap(), Bytes::from_static(b"first"));
}

/// Ranged reads return exactly the range; ranges past the end are refused.
pub async fn ranged_get(b: DynBackend) {
    let data = pseudo_random(10_000, 2);
    let name = n("r/obj");
    b.put_new(&name, data.clone()).await.unwrap();
    for (s, e) in [
        (0, 1),
        (0, 10_000),
        (1234, 5678),
        (9_999, 10_000),
        (500, 500),
    ] {
        let got = b.get_range(&name, s..e).await.unwrap();
        assert_eq!(got, data.slice(s as usize..e as usize), "range {s}..{e}");
    }
    let err = b.get_range(&name, 9_000..10_001).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput, "{err}");
}

/// Listing returns everything under `prefix/` at any depth, sorted, and nothing else.
pub async fn list_prefix(b: DynBackend) {
    for name in ["l/a/2", "l/a/1", "l/a/sub/3", "l/ab/4", "l/b/5", "other/6"] {
        b.put_new(&n(name), Bytes::from(name.to_owned()))
            .await
            .unwrap();
    }
    let names: Vec<String> = b
        .list(&n("l/a"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(names, ["l/a/1", "l/a/2", "l/a/sub/3"]);
    let all = b.list(&n("l")).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].size, 5);
    assert!(b.list(&n("nothing")).await.unwrap().is_empty());
}

/// Delete removes; deleting again succeeds; the name can then be written anew.
pub async fn delete(b: DynBackend) {
    let name = n("d/x");
    b.put_new(&name, Bytes::from_static(b"1")).await.unwrap();
    b.delete(&name).await.unwrap();
    assert_eq!(b.get(&name).await.unwrap_err().kind, ErrorKind::NotFound);
    b.delete(&name).await.unwrap();
    assert!(b.list(&n("d")).await.unwrap().is_empty());
    b.put_new(&name, Bytes::from_static(b"2")).await.unwrap();
    assert_eq!(b.get(&name).await.unwrap(), Bytes::from_static(b"2"));
}

/// Missing objects are "not found", naming the object, for every read.
pub async fn not_found(b: DynBackend) {
    let name = n("missing/obj");
    for err in [
        b.get(&name).await.unwrap_err(),
        b.head(&name).await.unwrap_err(),
        b.get_range(&name, 0..1).await.unwrap_err(),
    ] {
        assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("missing/obj"), "{err}");
    }
}

/// A 65 MiB object (multipart where the backend has it) round-trips and stays create-only.
pub async fn large_object(b: DynBackend) {
    let size = (64 << 20) + 12_345;
    let data = pseudo_random(size, 3);
    let name = n("big/segment");
    b.put_new(&name, data.clone()).await.unwrap();
    assert_eq!(b.head(&name).await.unwrap().size, size as u64);
    let mid = (40 << 20) as u64;
    assert_eq!(
        b.get_range(&name, mid..mid + 4096).await.unwrap(),
        data.slice(mid as usize..mid as usize + 4096)
    );
    let got = b.get(&name).await.unwrap();
    assert!(got == data, "large object differs after round trip");
    let err = b.put_new(&name, data.slice(0..size - 1)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err}");
    assert_eq!(
        b.list(&n("big")).await.unwrap().len(),
        1,
        "staging left over"
    );
}

/// Many writers at once: distinct names all land; racers on one name have exactly one winner.
pub async fn concurrent_writers(b: DynBackend) {
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random(50_000 + i as usize, i);
            b.put_new(&n(&format!("c/distinct/{i:03}")), data.clone())
                .await
                .map(|_| (i, data))
        }));
    }
    for t in tasks {
        let (i, data) = t.await.unwrap().unwrap();
        assert_eq!(
            b.get(&n(&format!("c/distinct/{i:03}"))).await.unwrap(),
            data
        );
    }
    let mut racers = Vec::new();
    for i in 0..16u64 {
        let b = Arc::clone(&b);
        racers.push(tokio::spawn(async move {
            let data = pseudo_random(20_000, 100 + i);
            b.put_new(&n("c/contended"), data.clone())
                .await
                .map(|_| data)
                .map_err(|e| e.kind)
        }));
    }
    let mut winners = Vec::new();
    for r in racers {
        match r.await.unwrap() {
            Ok(data) => winners.push(data),
            Err(kind) => assert_eq!(kind, ErrorKind::AlreadyExists),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one racer must win");
    assert_eq!(b.get(&n("c/contended")).await.unwrap(), winners[0]);
    assert_eq!(b.list(&n("c/distinct")).await.unwrap().len(), 48);
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 6,
        base_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        attempt_timeout: Duration::from_millis(2_000),
    }
}

/// 503s, timeouts and lost answers are retried with backoff and the operations succeed; a put
/// whose answer was lost after it landed is not reported as "already exists".
pub async fn transient_faults(b: DynBackend) {
    let faulty = Arc::new(Faulty::new(b));
    let r = Retrying::new(Arc::clone(&faulty), fast_retries());
    let name = n("f/obj");
    faulty.inject([
        Fault::Unavailable,
        Fault::Hang(Duration::from_secs(5)),
        Fault::LoseAnswer,
    ]);
    r.put_new(&name, Bytes::from_static(b"payload"))
        .await
        .unwrap();
    // 503, timeout, lost answer, then the retry finds its own bytes (+1 get).
    assert_eq!(faulty.calls(), 5);
    faulty.inject([Fault::Unavailable, Fault::Unavailable]);
    assert_eq!(r.get(&name).await.unwrap(), Bytes::from_static(b"payload"));
    faulty.inject([Fault::Unavailable]);
    assert_eq!(r.list(&n("f")).await.unwrap().len(), 1);
    faulty.inject([Fault::LoseAnswer]);
    r.delete(&name).await.unwrap();
    assert_eq!(r.head(&name).await.unwrap_err().kind, ErrorKind::NotFound);

    // Under a steady 20% failure rate, concurrent work still completes. With 6 attempts one
    // operation in about 15,000 would still fail all of them (0.2^6), often enough to fail a
    // CI run now and then; 12 make it one in about 250 million.
    faulty.set_random_unavailable(0.2);
    let r = Arc::new(Retrying::new(
        Arc::clone(&faulty),
        RetryPolicy {
            max_attempts: 12,
            ..fast_retries()
        },
    ));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let r = Arc::clone(&r);
        tasks.push(tokio::spawn(async move {
            let name = n(&format!("f/many/{i}"));
            r.put_new(&name, pseudo_random(1000, i)).await?;
            r.get(&name).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), pseudo_random(1000, i as u64));
    }
}

/// A permanent error (403) surfaces on the first attempt, without retries; a create-only
/// conflict is not retried either.
pub async fn permanent_faults(b: DynBackend) {
    let faulty = Arc::new(Faulty::new(b));
    let r = Retrying::new(Arc::clone(&faulty), fast_retries());
    faulty.inject([Fault::Denied]);
    let err = r
        .put_new(&n("p/obj"), Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Denied);
    assert_eq!(faulty.calls(), 1, "a permanent error must not be retried");
    r.put_new(&n("p/obj"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    let before = faulty.calls();
    let err = r
        .put_new(&n("p/obj"), Bytes::from_static(b"y"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists);
    assert_eq!(faulty.calls(), before + 1);
}

/// Expands to one `#[tokio::test]` per conformance case, each given `$factory.await` as its
/// fresh backend (a `DynBackend`).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            put_get, create_only, ranged_get, list_prefix, delete, not_found, large_object,
            concurrent_writers, transient_faults, permanent_faults);
    };
    (@cases $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                if let Some(backend) = $factory.await {
                    $crate::conformance::$case(backend).await;
                }
            }
        )*
    };
}
