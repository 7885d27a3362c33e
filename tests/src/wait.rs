//! Waiting on conditions with a deadline instead of sleeping.
//!
//! A check is polled every [`POLL_INTERVAL`] until it yields a value or the
//! timeout passes; the timeout error names what was awaited and the last
//! error the check returned, so a failing test says why it waited in vain.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;

/// Pause between two polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Ok(Some(value))`, then returns the value.
///
/// `Ok(None)` and `Err(_)` both mean "not yet": errors are expected while a
/// service starts. After `timeout` the error says what was awaited, and
/// includes the last error seen.
pub async fn wait_for<T, F, Fut>(what: impl Display, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Deadline::after(timeout);
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        deadline.check(&what, last_error.as_ref())?;
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls a boolean `check` until it is `Ok(true)`; see [`wait_for`].
pub async fn wait_until<F, Fut>(what: impl Display, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_for(what, timeout, || {
        let fut = check();
        async move { fut.await.map(|done| done.then_some(())) }
    })
    .await
}

/// A point in time after which waiting gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// `Err` naming `what`, and the last error a poll saw, when the
    /// deadline has passed.
    pub fn check(&self, what: impl Display, last_error: Option<&anyhow::Error>) -> Result<()> {
        if !self.passed() {
            return Ok(());
        }
        let timeout = self.timeout;
        Err(match last_error {
            Some(err) => {
                anyhow!("timed out after {timeout:?} waiting for {what}; last error: {err:#}")
            }
            None => anyhow!("timed out after {timeout:?} waiting for {what}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_ready() {
        let calls = AtomicU32::new(0);
        let got = wait_for("third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok((n >= 3).then_some(n))
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_names_the_condition_and_last_error() {
        let err = wait_for::<(), _, _>("the moon", Duration::from_secs(2), || async {
            Err(anyhow!("connection refused"))
        })
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("waiting for the moon"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_times_out_on_false() {
        let err = wait_until("never", Duration::from_millis(300), || async { Ok(false) })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("timed out after 300ms waiting for never"),
            "{err}"
        );
    }
}
