//! Fault-injecting wrapper for tests: makes any backend answer 503s, hang, fail for good, or
//! lose the answer of a call that did succeed, on a script or at random.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ErrorKind, ObjectMeta, StoreError};
use crate::name::ObjectName;

/// One injected fault, consumed by the next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fail before doing anything, like an HTTP 503 "server busy".
    Unavailable,
    /// Do nothing for this long first (longer than the retry layer's timeout = a timeout).
    Hang(Duration),
    /// Fail for good, like HTTP 403.
    Denied,
    /// Perform the call, then report a transient failure, like a connection reset after the
    /// server committed the write.
    LoseAnswer,
}

/// A backend wrapper that injects faults.
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    script: Mutex<VecDeque<Fault>>,
    /// Chance in a million that a call with no scripted fault gets [`Fault::Unavailable`].
    random_ppm: AtomicU64,
    calls: AtomicU64,
}

impl<B: Backend> Faulty<B> {
    /// Wraps `inner`, injecting nothing until told to.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            script: Mutex::new(VecDeque::new()),
            random_ppm: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Queues faults for the next calls, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(faults);
    }

    /// Makes a fraction of unscripted calls fail with [`Fault::Unavailable`].
    pub fn set_random_unavailable(&self, fraction: f64) {
        self.random_ppm
            .store((fraction * 1e6) as u64, Ordering::Relaxed);
    }

    /// Calls that reached this wrapper so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn next_fault(&self) -> Option<Fault> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let scripted = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        scripted.or_else(|| {
            let ppm = self.random_ppm.load(Ordering::Relaxed);
            (ppm > 0 && rand::random_range(0..1_000_000) < ppm).then_some(Fault::Unavailable)
        })
    }

    async fn call<T>(
        &self,
        op: &'static str,
        name: &ObjectName,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.next_fault() {
            None => f.await,
            Some(Fault::Unavailable) => Err(StoreError::new(ErrorKind::Transient, op, name)
                .with_detail("injected: 503 Service Unavailable")),
            Some(Fault::Hang(d)) => {
                tokio::time::sleep(d).await;
                f.await
            }
            Some(Fault::Denied) => {
                Err(StoreError::new(ErrorKind::Denied, op, name)
                    .with_detail("injected: 403 Forbidden"))
            }
            Some(Fault::LoseAnswer) => {
                f.await?;
                Err(StoreError::new(ErrorKind::Transient, op, name)
                    .with_detail("injected: connection reset after the call completed"))
            }
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for Faulty<B> {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        self.call("put", name, self.inner.put_new(name, data)).await
    }
    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        self.call("get", name, self.inner.get(name)).await
    }
    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.call("get_range", name, self.inner.get_range(name, range))
            .await
    }
    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        self.call("head", name, self.inner.head(name)).await
    }
    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        self.call("list", prefix, self.inner.list(prefix)).await
    }
    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        self.call("delete", name, self.inner.delete(name)).await
    }
}
