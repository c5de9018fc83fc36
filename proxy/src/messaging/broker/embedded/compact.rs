//! Giving disk space back: redb reuses the pages of acknowledged messages but never shortens
//! its file, so a backlog of a million messages would keep its hundreds of MiB after it was
//! delivered. After a checkpoint, when the file is large ([`COMPACT_ABOVE`]) and at most a
//! quarter of it is in use, the writer compacts it (redb moves what is live to the front and cuts
//! the file), at most once per [`CHECK_EVERY`].
//!
//! Compacting needs the file to itself: reads are refused meanwhile with
//! [`StoreError::Compacting`] (a consumer reads again after its pause, `/v1/queues` answers
//! 503), and writes wait in the writer's channel. It takes as long as what is live, which is
//! little, since that is when it runs.

use std::sync::Arc;
use std::time::Duration;

use redb::Database;

use super::writer::Writer;
use super::{Handle, StoreError};

/// Files smaller than this are left as they are (in unit tests, a store they can fill).
const COMPACT_ABOVE: u64 = if cfg!(test) { 2 << 20 } else { 64 << 20 };
/// How often the file's use is looked at, at most.
const CHECK_EVERY: Duration =
    if cfg!(test) { Duration::from_millis(200) } else { Duration::from_secs(30) };
/// Bytes a stored message takes at least, for a first look without walking the trees.
const MESSAGE_BYTES: u64 = 256;

impl Writer {
    /// Compacts the file if it is large and mostly free; logs what it gave back.
    pub(super) fn compact_if_sparse(&mut self, db: Arc<Database>) {
        let now = tokio::time::Instant::now();
        if self.last_compact_check.is_some_and(|at| now < at + CHECK_EVERY) {
            return;
        }
        let Ok(before) = std::fs::metadata(&self.path).map(|m| m.len()) else { return };
        let stored = u64::try_from(self.pending.get()).unwrap_or(0);
        if before < COMPACT_ABOVE || stored.saturating_mul(MESSAGE_BYTES) * 4 > before {
            return;
        }
        self.last_compact_check = Some(now);
        // what is live, dead letters and indexes included (walks the trees: they are small now)
        let used = (|| -> Result<redb::DatabaseStats, redb::Error> {
            let txn = db.begin_write()?;
            let stats = txn.stats();
            txn.abort()?;
            Ok(stats?)
        })();
        let Ok(stats) = used else { return };
        if stats.allocated_pages() * stats.page_size() as u64 * 4 > before {
            return;
        }
        let compacting = Arc::new(StoreError::Compacting);
        let Some(mut db) = self.take_from_readers(db, compacting) else { return };
        let started = tokio::time::Instant::now();
        let compacted = match Arc::get_mut(&mut db) {
            Some(file) => loop {
                match file.compact() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(error) => break Err(error),
                }
            },
            None => Ok(()), // a read took it again: never, reads are refused
        };
        *self.handle.write().unwrap_or_else(|e| e.into_inner()) = Handle::Open(db);
        let after = std::fs::metadata(&self.path).map_or(before, |m| m.len());
        match compacted {
            Ok(()) => {
                tracing::info!(before, after, took = ?started.elapsed(), "message store compacted")
            }
            Err(error) => tracing::warn!(%error, "the message store cannot be compacted"),
        }
    }
}
