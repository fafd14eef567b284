//! The time a connection has to send each request's headers (`--header-read-timeout`), kept
//! per connection. Hyper's own header timer registers a timer for every request and removes it
//! when the headers are in, which a kept-alive connection pays on every request. Here a request
//! stores one number when its headers arrive and one when it is answered; one timer per
//! connection reads them, waking about once per timeout (never more than twice within one), not
//! once per request.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// `waiting_since` while a request is being answered: its headers are in, and the next
/// request's time starts when it is answered.
const ANSWERING: u64 = u64::MAX;

pub struct HeaderClock {
    opened: Instant,
    /// Microseconds from `opened` to when the connection began to wait for a request's
    /// headers, or [`ANSWERING`].
    waiting_since: AtomicU64,
}

impl HeaderClock {
    /// A connection that waits for its first request's headers from `opened`.
    pub fn new(opened: Instant) -> HeaderClock {
        HeaderClock {
            opened,
            waiting_since: AtomicU64::new(0),
        }
    }

    /// A request's headers are in: nothing is waited for until it is answered.
    pub fn answering(&self) {
        self.waiting_since.store(ANSWERING, Ordering::Release);
    }

    /// The request was answered at `at`: the next request's headers are waited for from then.
    pub fn answered(&self, at: impl Into<Instant>) {
        let micros = at.into().saturating_duration_since(self.opened).as_micros();
        let micros = u64::try_from(micros).unwrap_or(ANSWERING - 1);
        self.waiting_since.store(micros, Ordering::Release);
    }

    /// When the headers the connection waits for are late (`None`: a request is being
    /// answered).
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.waiting_since.load(Ordering::Acquire) {
            ANSWERING => None,
            micros => Some(self.opened + Duration::from_micros(micros) + timeout),
        }
    }

    /// Returns once the connection has waited `timeout` for a request's headers; the caller
    /// then closes it.
    pub async fn expired(&self, timeout: Duration) {
        loop {
            let now = Instant::now();
            let wake = match self.deadline(timeout) {
                Some(deadline) if deadline <= now => return,
                Some(deadline) => deadline,
                // Being answered (a wait for STS or for the pod can take seconds): look again
                // one timeout from now; an answer given before then starts a deadline later
                // than that, so none is missed.
                None => now + timeout,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused time: the clock expires exactly one timeout after the connection began waiting,
    /// never while a request is being answered, and each answer restarts it.
    #[tokio::test(start_paused = true)]
    async fn expires_one_timeout_after_the_last_answer_and_never_while_answering() {
        let timeout = Duration::from_secs(5);
        let opened = Instant::now();
        let clock = HeaderClock::new(opened);
        let expired = async {
            clock.expired(timeout).await;
            Instant::now()
        };
        let drive = async {
            // A request arrives after 1 s and takes 12 s to answer (an STS call that waits),
            // then the next request's headers never come.
            tokio::time::sleep(Duration::from_secs(1)).await;
            clock.answering();
            tokio::time::sleep(Duration::from_secs(12)).await;
            clock.answered(Instant::now());
            std::future::pending::<()>().await;
        };
        let at = tokio::select! {
            at = expired => at,
            () = drive => unreachable!("drive never ends"),
        };
        assert_eq!(at.duration_since(opened), Duration::from_secs(1 + 12 + 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_headers_expires_at_the_timeout() {
        let opened = Instant::now();
        let clock = HeaderClock::new(opened);
        clock.expired(Duration::from_millis(1500)).await;
        assert_eq!(opened.elapsed(), Duration::from_millis(1500));
    }
}
