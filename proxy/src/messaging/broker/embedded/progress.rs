//! How far the writer has got: the last record flushed to the log (whose callers may have been
//! answered already) and the last one applied to redb. A read waits until redb holds every
//! record flushed before it began, so it sees every write that was answered before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Shared by the writer thread, which moves it, and the reads, which wait on it.
#[derive(Debug, Default)]
pub(super) struct Progress {
    logged: AtomicU64,
    applied: Mutex<u64>,
    caught_up: Condvar,
}

impl Progress {
    /// A store whose records are all applied, up to `lsn`.
    pub(super) fn at(lsn: u64) -> Self {
        Progress {
            logged: AtomicU64::new(lsn),
            applied: Mutex::new(lsn),
            caught_up: Condvar::new(),
        }
    }

    /// The log holds every record up to `lsn` (their callers may be answered before they are
    /// applied); lower than before when the last record was taken back.
    pub(super) fn logged(&self, lsn: u64) {
        self.logged.store(lsn, Ordering::Release);
    }

    /// redb holds every record up to `lsn`.
    pub(super) fn applied(&self, lsn: u64) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        *applied = lsn;
        self.caught_up.notify_all();
    }

    /// Blocks until redb holds every record flushed so far, for at most `wait`; whether it
    /// does. Call it off the async workers.
    pub(super) fn wait_caught_up(&self, wait: Duration) -> bool {
        let target = self.logged.load(Ordering::Acquire);
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let (applied, _) = self
            .caught_up
            .wait_timeout_while(applied, wait, |applied| *applied < target)
            .unwrap_or_else(|e| e.into_inner());
        *applied >= target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_read_waits_for_what_was_logged_before_it_and_not_for_what_comes_after() {
        let progress = Arc::new(Progress::at(3));
        assert!(progress.wait_caught_up(Duration::ZERO));
        progress.logged(4);
        assert!(!progress.wait_caught_up(Duration::from_millis(10)), "record 4 is not applied");
        let writer = progress.clone();
        let apply = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.applied(4);
        });
        assert!(progress.wait_caught_up(Duration::from_secs(5)));
        apply.join().unwrap();
    }
}
