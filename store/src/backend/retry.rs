//! Retry wrapper: any backend, plus bounded exponential backoff on transient errors and a
//! per-attempt timeout, so a hung request becomes a retry instead of a stuck agent.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Future;

use super::{Backend, ErrorKind, ObjectMeta, StoreError};
use crate::name::ObjectName;

/// How hard to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, first one included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub base_backoff: Duration,
    /// Longest single backoff.
    pub max_backoff: Duration,
    /// An attempt running longer than this counts as a transient failure.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        // Full jitter in [exp/2, exp] spreads retries of many writers hitting one throttle.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// A backend that retries transient failures of the one it wraps.
#[derive(Debug)]
pub struct Retrying<B> {
    inner: B,
    policy: RetryPolicy,
}

impl<B: Backend> Retrying<B> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: B, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        name: &ObjectName,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(u32) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        with_retries(&self.policy, op, name, f).await
    }
}

/// Runs `f(attempt)` until it succeeds, fails with a non-transient error, or `policy` runs out.
pub async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    op: &'static str,
    name: &(dyn std::fmt::Display + Sync),
    f: F,
) -> Result<T, StoreError>
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        let result = match tokio::time::timeout(policy.attempt_timeout, f(attempt)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::new(ErrorKind::Transient, op, name)
                .with_detail(format!("no answer within {:?}", policy.attempt_timeout))),
        };
        match result {
            Err(e) if e.is_transient() && attempt + 1 < policy.max_attempts => {
                let wait = policy.backoff(attempt);
                tracing::warn!(error = %e, attempt = attempt + 1, ?wait, "retrying store operation");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for Retrying<B> {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        self.run("put", name, |attempt| {
            let data = data.clone();
            async move {
                match self.inner.put_new(name, data.clone()).await {
                    // An earlier attempt may have landed before its answer was lost: the put
                    // succeeded if what is there now is exactly what we wrote.
                    Err(e) if e.kind == ErrorKind::AlreadyExists && attempt > 0 => {
                        match self.inner.get(name).await {
                            Ok(existing) if existing == data => Ok(()),
                            Ok(_) => Err(e),
                            Err(get_err) => Err(get_err),
                        }
                    }
                    other => other,
                }
            }
        })
        .await
    }

    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        self.run("get", name, |_| self.inner.get(name)).await
    }

    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.run("get_range", name, |_| {
            self.inner.get_range(name, range.clone())
        })
        .await
    }

    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        self.run("head", name, |_| self.inner.head(name)).await
    }

    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        self.run("list", prefix, |_| self.inner.list(prefix)).await
    }

    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        self.run("delete", name, |_| self.inner.delete(name)).await
    }
}
