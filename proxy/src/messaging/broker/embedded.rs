//! The `embedded` broker: a write-ahead log and a redb file in `messaging.data_dir` that are
//! outbox, queue and dead-letter store at once (no relay hop: a message is in its queue the
//! moment it is durable).
//!
//! Group commit: every write goes to one writer thread through a channel. The thread takes what
//! has queued up (up to [`MAX_BATCH`] requests), appends it to the log as ONE record flushed
//! with one `fdatasync` ([`wal`]), applies it to redb in one transaction that is not flushed,
//! and only then answers each caller. While a record is on disk the next batch queues, so under
//! load many publishes share one flush; alone, a publish pays exactly one. redb is made durable
//! by a checkpoint every 50 ms while there are writes, and at open the log's records after the checkpoint are
//! applied again ([`writer`]). redb calls never run on the async workers: writes on that
//! thread, reads in `spawn_blocking`. A crash loses only what was never answered.
//!
//! A write that fails (the disk full, the file system gone read-only) is answered with the
//! reason (a publish gets 503 `outbox-unavailable`) and leaves nothing behind: a record that
//! cannot be written is written over by the next, one whose transaction fails is erased from
//! the log. redb refuses every transaction after an I/O error until the file is opened again:
//! the writer thread then lets go of the file and opens it again at once (reads go on),
//! replaying the log, and if that fails, at the next writes, at most once per
//! [`REOPEN_EVERY`]. So the store recovers when space returns, without a restart.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus::IntGauge;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot};

use super::{
    BrokerError, DeadLetterPage, Lane, Leased, Outbox, Publish, Published, Queue, QueueDepth, Read,
    UnixMillis,
};
use dead::DEAD;
pub use dead::Retention;

mod codec;
mod compact;
mod dead;
mod schema;
pub(crate) mod wal;
mod writer;
use crate::messaging::envelope::{Envelope, MessageId, unix_millis};
pub use codec::Malformed;
use schema::{ACKED, ACKED_EXPIRY, DEDUP, DEDUP_EXPIRY, DUE, MESSAGES, META, STATE, open_file};
use wal::Log;
pub use wal::LogError;
pub use writer::ReplayError;
use writer::{Command, Entry, New, Pending, Write, Writer};

/// Messages leased to a consumer, by (queue, id).
type Leases = HashSet<(Box<str>, u128)>;

/// How long a message whose settling write failed waits before it is read again.
const RETRY_FAILED_WRITE: std::time::Duration = std::time::Duration::from_secs(5);

/// Requests applied in one transaction at most: bounds a commit's size and its callers' wait.
pub const MAX_BATCH: usize = 512;
/// Expired dedup keys removed per commit at most, so sweeping never makes a commit slow.
const SWEEP_PER_COMMIT: usize = 64;
/// The file inside `data_dir`.
pub const FILE_NAME: &str = "messages.redb";
/// The log's directory inside `data_dir`.
pub const LOG_DIR: &str = "wal";
/// After a write error, the file is opened again at most this often.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a reopen waits for the reads still holding the old handle.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The embedded broker; cheap to clone.
#[derive(Debug, Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

/// The file as reads find it; the writer thread replaces it after a write error.
#[derive(Debug)]
enum Handle {
    Open(Arc<Database>),
    /// A write failed on an I/O error; the writer opens the file again at its next write.
    Broken(Arc<StoreError>),
    /// [`Embedded::close`] ran: the file is closed when the last handle is dropped.
    Closed,
}

type SharedHandle = Arc<std::sync::RwLock<Handle>>;

#[derive(Debug)]
struct Inner {
    db: SharedHandle,
    writes: mpsc::Sender<Command>,
    /// Messages leased to a consumer: not read again until acked, parked or dead-lettered.
    /// In memory on purpose: after a restart every unacknowledged message is due again.
    leases: Mutex<Leases>,
    commits: Arc<AtomicU64>,
    pending: IntGauge,
    retention: Retention,
}

/// What failed in the store; shared by every caller of a failed commit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("its file failed")]
    File(#[source] redb::Error),
    #[error("its log cannot be written")]
    Log(#[source] std::io::Error),
    #[error("its log cannot be applied again")]
    Replay(#[source] ReplayError),
    #[error("it is being compacted; try again in a moment")]
    Compacting,
}

/// Why the store could not be opened; its cause is its `source`.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the message store {}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub cause: OpenCause,
}

/// What stopped the store from opening.
#[derive(Debug, thiserror::Error)]
pub enum OpenCause {
    #[error("cannot create its directory")]
    Dir(#[source] std::io::Error),
    #[error("the file cannot be opened")]
    File(#[source] redb::Error),
    #[error("its log cannot be read")]
    Log(#[source] LogError),
    #[error("its log cannot be applied again")]
    Replay(#[source] ReplayError),
    #[error("its writer thread cannot start")]
    Thread(#[source] std::io::Error),
    #[error("the task opening it ended")]
    Task(#[source] tokio::task::JoinError),
}

/// What the store reports: the messages it holds, and how long each commit takes.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Set to the stored messages, and following every commit.
    pub pending: IntGauge,
    /// Each commit's duration, when timed.
    pub commit_duration: Option<prometheus::Histogram>,
}

impl From<IntGauge> for StoreMetrics {
    fn from(pending: IntGauge) -> Self {
        StoreMetrics { pending, commit_duration: None }
    }
}

// === impl Embedded ===

impl Embedded {
    /// Opens (or creates) the store in `dir`, applying the log's records after the last
    /// checkpoint, and starts its writer thread. `pending` is set to the stored messages and
    /// follows every commit.
    pub fn open(
        dir: &Path,
        dedup_window: std::time::Duration,
        retention: Retention,
        metrics: impl Into<StoreMetrics>,
    ) -> Result<Self, OpenError> {
        let StoreMetrics { pending, commit_duration } = metrics.into();
        let path = dir.join(FILE_NAME);
        let fail = |cause| OpenError { path: path.clone(), cause };
        std::fs::create_dir_all(dir).map_err(|e| fail(OpenCause::Dir(e)))?;
        let db = open_file(&path).map_err(|e| fail(OpenCause::File(e)))?;
        let mut log = Log::open(&dir.join(LOG_DIR)).map_err(|e| fail(OpenCause::Log(e)))?;
        let applied = writer::recover(&db, &mut log).map_err(|e| fail(OpenCause::Replay(e)))?;
        let stored = schema::stored(&db).map_err(|e| fail(OpenCause::File(e)))?;
        pending.set(stored as i64);
        let db = Arc::new(db);
        let handle = Arc::new(std::sync::RwLock::new(Handle::Open(db)));
        let commits = Arc::new(AtomicU64::new(0));
        let (writes, requests) = mpsc::channel(MAX_BATCH * 4);
        let writer = Writer {
            handle: handle.clone(),
            path: path.clone(),
            log,
            applied,
            checkpointed: applied,
            last_checkpoint: tokio::time::Instant::now(),
            since_checkpoint: 0,
            last_compact_check: None,
            poisoned: None,
            last_reopen: None,
            // config caps durations at 365d; were one longer, it would mean "for ever", not wrap
            dedup_window: u64::try_from(dedup_window.as_millis()).unwrap_or(u64::MAX),
            retention,
            commits: commits.clone(),
            pending: pending.clone(),
            commit_duration,
        };
        std::thread::Builder::new()
            .name("outrigger-store".into())
            .spawn(move || writer.run(requests))
            .map_err(|e| fail(OpenCause::Thread(e)))?;
        let ticks = writes.downgrade();
        std::thread::Builder::new()
            .name("outrigger-checkpoint".into())
            .spawn(move || checkpoint_ticks(ticks))
            .map_err(|e| fail(OpenCause::Thread(e)))?;
        tracing::info!(path = %path.display(), stored, "message store open");
        Ok(Embedded {
            inner: Arc::new(Inner {
                db: handle,
                writes,
                leases: Mutex::new(HashSet::new()),
                commits,
                pending,
                retention,
            }),
        })
    }

    /// Group commits so far (each one fdatasync of the log).
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// Messages stored and not acknowledged.
    pub fn pending(&self) -> i64 {
        self.inner.pending.get()
    }

    /// Every queue with stored messages or dead letters, by name.
    async fn all_depths(&self) -> Result<Vec<QueueDepth>, BrokerError> {
        self.read_with(|txn| {
            let mut depths: BTreeMap<String, QueueDepth> = BTreeMap::new();
            for entry in txn.open_table(MESSAGES)?.iter()? {
                let (key, _) = entry?;
                let (queue, id) = key.value();
                let d = depth_of(&mut depths, queue);
                d.messages += 1;
                // ids start with their publish millisecond; the first per queue is the oldest
                d.oldest_published_ms.get_or_insert(MessageId::from_u128(id).millis());
            }
            // one lookup per dead-letter queue, not one per dead letter
            for (dlq, count, oldest) in dead::depths(txn)? {
                let d = depth_of(&mut depths, &dlq);
                d.dead_letters = count;
                d.oldest_dead_letter_ms = oldest;
            }
            Ok(depths.into_values().collect())
        })
        .await
    }

    /// Remembers that message `id` of `queue` was delivered though its acknowledgement failed,
    /// until `expires`: read again after a restart, it is acknowledged without a delivery.
    pub async fn remember_acknowledged(
        &self,
        queue: &str,
        id: MessageId,
        expires: UnixMillis,
    ) -> Result<(), BrokerError> {
        let queue = queue.to_owned();
        self.write(writer::RememberAcknowledged { queue, id, expires }).await
    }

    /// The ids of `queue` remembered by [`Embedded::remember_acknowledged`] that have not
    /// expired at `now`, with when each expires, soonest first.
    pub async fn acknowledged(
        &self,
        queue: &str,
        now: UnixMillis,
    ) -> Result<Vec<(MessageId, UnixMillis)>, BrokerError> {
        let queue = queue.to_owned();
        self.read_with(move |txn| {
            let q = queue.as_str();
            let mut found = Vec::new();
            for entry in txn.open_table(ACKED)?.range((q, 0)..=(q, u128::MAX))? {
                let (key, expires) = entry?;
                let expires = expires.value();
                if expires > now {
                    found.push((MessageId::from_u128(key.value().1), expires));
                }
            }
            found.sort_by_key(|&(_, expires)| expires);
            Ok(found)
        })
        .await
    }

    /// Applies the dead-letter age cap without waiting for other writes: each commit sweeps a
    /// few expired dead letters, but an idle store makes no commits. Commits (one fsync) only
    /// when a dead letter has expired; `true` when it did, so the caller may go on.
    pub async fn sweep_dead_letters(&self) -> Result<bool, BrokerError> {
        let (now, retention) = (unix_millis(SystemTime::now()), self.inner.retention);
        let expired = self.read_with(move |txn| dead::any_expired(txn, now, retention)).await?;
        if expired {
            self.write(writer::Sweep).await?;
        }
        Ok(expired)
    }

    /// Asks the writer thread to stop after what it has queued, waits until it has let go of
    /// the file, and lets go of this handle's: the file is closed cleanly (no repair at the
    /// next open) as soon as no read is using it. Every later operation fails with `Stopped`.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.writes.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let db = std::mem::replace(
            &mut *self.inner.db.write().unwrap_or_else(|e| e.into_inner()),
            Handle::Closed,
        );
        drop(db);
    }

    /// The open database; an error while the writer reopens it, and `Stopped` after
    /// [`Embedded::close`].
    fn db(&self) -> Result<Arc<Database>, BrokerError> {
        match &*self.inner.db.read().unwrap_or_else(|e| e.into_inner()) {
            Handle::Open(db) => Ok(db.clone()),
            Handle::Broken(error) => Err(BrokerError::Unwritable(error.clone())),
            Handle::Closed => Err(BrokerError::Stopped),
        }
    }

    /// Has the writer thread apply `write` in its next commit; its output once on disk.
    async fn write<W: Write>(&self, write: W) -> Result<W::Output, BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .writes
            .send(Command::Write(Pending::new(write, reply)))
            .await
            .map_err(|_| BrokerError::Stopped)?;
        answer.await.map_err(|_| BrokerError::Stopped)?
    }

    async fn read_with<T, F>(&self, read: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error> + Send + 'static,
    {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            read(&txn)
        })
        .await
        .map_err(BrokerError::Task)?
        .map_err(store_error)
    }

    /// Like `read_with`, with the lease set locked BEFORE the read transaction begins: a
    /// settle that commits after this snapshot is still leased when the snapshot is read
    /// (its release waits for the lock), so a stale copy is never handed out.
    async fn read_leased<T, F>(&self, read: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction, &mut Leases) -> Result<T, redb::Error> + Send + 'static,
    {
        let (this, db) = (self.clone(), self.db()?);
        tokio::task::spawn_blocking(move || {
            let mut leases = this.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_read()?;
            read(&txn, &mut leases)
        })
        .await
        .map_err(BrokerError::Task)?
        .map_err(store_error)
    }

    /// After a write that failed: the message is read again, but only after
    /// [`RETRY_FAILED_WRITE`], so a store that refuses writes does not make its consumer
    /// deliver the same message in a tight loop.
    fn release_later(&self, queue: &str, id: MessageId) {
        let (this, queue) = (self.clone(), queue.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_FAILED_WRITE).await;
            this.release(&queue, id);
        });
    }

    fn settled<T>(&self, queue: &str, id: MessageId, result: &Result<T, BrokerError>) {
        match result {
            Ok(_) => self.release(queue, id),
            Err(_) => self.release_later(queue, id),
        }
    }

    fn release(&self, queue: &str, id: MessageId) {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.remove(&(Box::from(queue), id.as_u128()));
    }
}

fn depth_of<'a>(depths: &'a mut BTreeMap<String, QueueDepth>, queue: &str) -> &'a mut QueueDepth {
    depths.entry(queue.to_owned()).or_insert_with(|| QueueDepth {
        queue: queue.to_owned(),
        messages: 0,
        dead_letters: 0,
        oldest_published_ms: None,
        oldest_dead_letter_ms: None,
    })
}

fn store_error(err: impl Into<redb::Error>) -> BrokerError {
    BrokerError::Store(Arc::new(StoreError::File(err.into())))
}

/// Asks the writer for a checkpoint every [`writer::CHECKPOINT_EVERY`], so that an idle store
/// is made durable too; ends with the store.
fn checkpoint_ticks(writes: mpsc::WeakSender<Command>) {
    loop {
        std::thread::sleep(writer::CHECKPOINT_EVERY);
        let Some(writes) = writes.upgrade() else { return };
        // a full channel means a busy writer, which checkpoints by itself
        if let Err(mpsc::error::TrySendError::Closed(_)) = writes.try_send(Command::Checkpoint) {
            return;
        }
    }
}

impl Outbox for Embedded {
    async fn publish(&self, batch: Vec<Publish>) -> Result<Vec<Published>, BrokerError> {
        // ids, time and JSON made here, on the caller's thread: the writer only logs and stores
        let now = SystemTime::now();
        let messages = batch
            .into_iter()
            .map(|publish| {
                let id = MessageId::generate(now);
                let idempotency_key = publish.idempotency_key.clone();
                let entry = Entry::of(&publish.into_envelope(id, now));
                New { entry, at: unix_millis(now), idempotency_key }
            })
            .collect();
        self.write(writer::Store(messages)).await
    }

    async fn relay_batch(&self, max: usize) -> Result<Vec<Envelope>, BrokerError> {
        self.read_leased(move |txn, leases| {
            let messages = txn.open_table(MESSAGES)?;
            let due = txn.open_table(DUE)?;
            let mut found = Vec::new();
            for entry in due.iter()? {
                if found.len() >= max {
                    break;
                }
                let entry = entry?;
                let (queue, _, id) = entry.0.value();
                if leases.contains(&(Box::from(queue), id)) {
                    continue;
                }
                let Some(value) = messages.get((queue, id))? else { continue };
                match Envelope::from_json(value.value()) {
                    Ok(envelope) => {
                        leases.insert((Box::from(queue), id));
                        found.push(envelope);
                    }
                    Err(_) => tracing::error!(queue, id = %MessageId::from_u128(id), "unreadable outbox entry skipped"),
                }
            }
            Ok(found)
        })
        .await
    }

    async fn forget(&self, relayed: &[Envelope]) -> Result<(), BrokerError> {
        let settled: Vec<(String, MessageId)> =
            relayed.iter().map(|e| (e.queue.clone(), e.id)).collect();
        let result = self.write(writer::Forget(settled)).await;
        self.release_all(relayed);
        result.map(drop)
    }

    fn release_all(&self, envelopes: &[Envelope]) {
        for envelope in envelopes {
            self.release(&envelope.queue, envelope.id);
        }
    }
}

impl Queue for Embedded {
    /// Every queue the store holds; `lanes` are not needed.
    async fn depths(&self, _lanes: &[Lane]) -> Result<Vec<QueueDepth>, BrokerError> {
        self.all_depths().await
    }

    async fn read(
        &self,
        queue: &str,
        consumer: &str,
        Read { max, now, ordered, wait: _ }: Read,
    ) -> Result<Vec<Leased>, BrokerError> {
        let queue = queue.to_owned();
        tracing::trace!(%queue, consumer, max, ordered, "reading due messages");
        self.read_leased(move |txn, leases| {
            let messages = txn.open_table(MESSAGES)?;
            let state = txn.open_table(STATE)?;
            let mut found = Vec::new();
            // ordering keys held by an earlier message (leased, parked, or taken just now)
            let mut held: HashSet<String> = HashSet::new();
            let q = queue.as_str();
            if !ordered {
                // what is due, soonest first; at most `concurrency` leased ones are skipped
                let due = txn.open_table(DUE)?;
                for entry in due.range((q, 0, 0)..=(q, now, u128::MAX))? {
                    if found.len() >= max {
                        break;
                    }
                    let id = entry?.0.value().2;
                    if leases.contains(&(Box::from(q), id)) {
                        continue;
                    }
                    let Some(value) = messages.get((q, id))? else { continue };
                    let Ok(envelope) = Envelope::from_json(value.value()) else {
                        tracing::error!(queue = q, id = %MessageId::from_u128(id), "unreadable stored envelope skipped");
                        continue;
                    };
                    let attempts = state.get((q, id))?.map_or(0, |s| s.value().0);
                    leases.insert((Box::from(q), id));
                    found.push(Leased { envelope, attempts });
                }
                return Ok(found);
            }
            // ordered: every message in publish order, since a waiting one holds its key
            for entry in messages.range((q, 0)..=(q, u128::MAX))? {
                if found.len() >= max {
                    break;
                }
                let (key, value) = entry?;
                let id = key.value().1;
                let (attempts, at) = state.get((q, id))?.map_or((0, 0), |s| s.value());
                let waiting = at > now || leases.contains(&(Box::from(q), id));
                let Ok(envelope) = Envelope::from_json(value.value()) else {
                    tracing::error!(queue = q, id = %MessageId::from_u128(id), "unreadable stored envelope skipped");
                    continue;
                };
                // the first message of a key holds it; later ones wait their turn
                let held_before = envelope.ordering_key().is_some_and(|k| !held.insert(k.to_owned()));
                if waiting || held_before {
                    continue;
                }
                leases.insert((Box::from(q), id));
                found.push(Leased { envelope, attempts });
            }
            Ok(found)
        })
        .await
    }

    async fn next_due(
        &self,
        queue: &str,
        now: UnixMillis,
    ) -> Result<Option<UnixMillis>, BrokerError> {
        let queue = queue.to_owned();
        self.read_with(move |txn| {
            let parked = txn.open_table(DUE)?;
            let q = queue.as_str();
            let first =
                parked.range((q, now.saturating_add(1), 0)..=(q, u64::MAX, u128::MAX))?.next();
            Ok(match first {
                Some(entry) => Some(entry?.0.value().1),
                None => None,
            })
        })
        .await
    }

    async fn ack(&self, queue: &str, id: MessageId) -> Result<(), BrokerError> {
        let result = self.write(writer::Forget(vec![(queue.to_owned(), id)])).await;
        // on failure it is read again (later) and the consumer acknowledges it again
        self.settled(queue, id, &result);
        result.map(drop)
    }

    async fn park(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: UnixMillis,
    ) -> Result<(), BrokerError> {
        let (queue, id) = (envelope.queue.clone(), envelope.id);
        let result =
            self.write(writer::Park { entry: Entry::of(&envelope), attempts, until }).await;
        // on failure the stored copy is due again, after a pause
        self.settled(&queue, id, &result);
        result.map(drop)
    }

    async fn dead_letter(
        &self,
        envelope: Envelope,
        dead_letter_queue: &str,
    ) -> Result<(), BrokerError> {
        let (queue, id) = (envelope.queue.clone(), envelope.id);
        let dead_letter = writer::DeadLetter {
            entry: Entry::of(&envelope),
            dead_letter_queue: dead_letter_queue.to_owned(),
        };
        let result = self.write(dead_letter).await;
        self.settled(&queue, id, &result);
        result.map(drop)
    }

    async fn dead_letters(
        &self,
        dead_letter_queue: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        let queue = dead_letter_queue.to_owned();
        let end = before.map_or(u128::MAX, |id| id.as_u128().saturating_sub(1));
        self.read_with(move |txn| {
            let dead = txn.open_table(DEAD)?;
            let q = queue.as_str();
            let mut messages = Vec::new();
            let mut next = None;
            for entry in dead.range((q, 0)..=(q, end))?.rev() {
                let (key, value) = entry?;
                if messages.len() == limit {
                    next = messages.last().map(|e: &Envelope| e.id);
                    break;
                }
                match Envelope::from_json(value.value()) {
                    Ok(envelope) => messages.push(envelope),
                    Err(_) => tracing::error!(queue = q, id = %MessageId::from_u128(key.value().1), "unreadable dead letter skipped"),
                }
            }
            Ok(DeadLetterPage { messages, next })
        })
        .await
    }

    async fn dead_letter_get(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        let queue = dead_letter_queue.to_owned();
        self.read_with(move |txn| {
            let dead = txn.open_table(DEAD)?;
            let found = dead.get((queue.as_str(), id.as_u128()))?;
            Ok(found.and_then(|v| Envelope::from_json(v.value()).ok()))
        })
        .await
    }

    async fn dead_letter_delete(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<bool, BrokerError> {
        self.write(writer::DeleteDeadLetter { queue: dead_letter_queue.to_owned(), id }).await
    }

    async fn dead_letter_purge(&self, dead_letter_queue: &str) -> Result<u64, BrokerError> {
        self.write(writer::PurgeDeadLetters(dead_letter_queue.to_owned())).await
    }

    async fn dead_letter_replay(
        &self,
        dead_letter_queue: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, BrokerError> {
        self.write(writer::Replay { dead_letter_queue: dead_letter_queue.to_owned(), ids }).await
    }
}

#[cfg(test)]
mod tests;
