//! The writer thread: every write of the store, applied in group commits.
//!
//! Each request carries its own reply, typed by the write it asks for ([`Write::Output`]): a
//! publish is answered with what it published, a purge with how many it removed, and no caller
//! matches on an answer meant for another. The thread takes what has queued (up to
//! [`MAX_BATCH`] requests), applies it in one transaction, commits (one fsync), and only then
//! answers each caller; if the transaction fails, every caller of the batch gets the error.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use prometheus::IntGauge;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::dead::{self, DEAD, Retention};
use super::{
    ACKED, ACKED_EXPIRY, DEDUP, DEDUP_EXPIRY, DUE, Handle, MAX_BATCH, MESSAGES, REOPEN_EVERY,
    REOPEN_WAIT, STATE, SWEEP_PER_COMMIT, SharedHandle, open_file,
};
use crate::messaging::broker::{BrokerError, Publish, Published, UnixMillis, mark_replayed};
use crate::messaging::envelope::{Envelope, MessageId, unix_millis};

/// One kind of write, applied inside the writer's transaction. `Output` is what its caller
/// gets once the transaction is on disk.
pub(super) trait Write: Send + 'static {
    type Output: Send + 'static;

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<Self::Output, redb::Error>;
}

/// What every write in a commit shares.
pub(super) struct Cx {
    /// The commit's time, Unix ms.
    now: u64,
    dedup_window: u64,
    retention: Retention,
    /// Change in the number of stored messages.
    delta: i64,
}

/// What goes to the writer thread.
#[derive(Debug)]
pub(super) enum Command {
    Write(Box<dyn Job>),
    /// Stop after what is queued, and say so once the file is let go of.
    Close(oneshot::Sender<()>),
}

/// A write with the caller's reply channel, its type erased for the channel.
pub(super) trait Job: Send + std::fmt::Debug {
    fn apply(&mut self, txn: &WriteTransaction, cx: &mut Cx) -> Result<(), redb::Error>;

    /// Answers the caller: the write's output if `committed`, else the error.
    fn answer(self: Box<Self>, committed: Result<(), BrokerError>);
}

/// The reply channel of a write of type `W`.
pub(super) type Reply<W> = oneshot::Sender<Result<<W as Write>::Output, BrokerError>>;

/// A write, then its output, and where the output goes.
pub(super) struct Pending<W: Write> {
    write: Option<W>,
    output: Option<W::Output>,
    reply: Reply<W>,
}

impl<W: Write> Pending<W> {
    pub(super) fn new(write: W, reply: Reply<W>) -> Box<Self> {
        Box::new(Pending { write: Some(write), output: None, reply })
    }
}

impl<W: Write> std::fmt::Debug for Pending<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("write", &std::any::type_name::<W>()).finish()
    }
}

impl<W: Write> Job for Pending<W> {
    fn apply(&mut self, txn: &WriteTransaction, cx: &mut Cx) -> Result<(), redb::Error> {
        if let Some(write) = self.write.take() {
            self.output = Some(write.apply(txn, cx)?);
        }
        Ok(())
    }

    fn answer(self: Box<Self>, committed: Result<(), BrokerError>) {
        let Pending { output, reply, .. } = *self;
        // a committed transaction applied every write in it: `output` is there then
        let answer = committed.and_then(|()| output.ok_or(BrokerError::Stopped));
        let _ = reply.send(answer);
    }
}

/// The thread's state: the file, and what commits change outside it.
pub(super) struct Writer {
    /// The file, as reads find it too; the writer alone replaces it.
    pub(super) handle: SharedHandle,
    pub(super) path: PathBuf,
    /// The handle let go of after a write error: the file opens again once no read holds it.
    pub(super) released: Option<std::sync::Weak<Database>>,
    pub(super) last_reopen: Option<tokio::time::Instant>,
    pub(super) dedup_window: u64,
    pub(super) retention: Retention,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) pending: IntGauge,
}

impl Writer {
    pub(super) fn run(mut self, mut requests: mpsc::Receiver<Command>) {
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = requests.blocking_recv() else { break };
            let mut batch = Vec::new();
            let mut next = Some(first);
            // take what queued while the last commit was on disk: that is the group commit
            while let Some(command) = next {
                match command {
                    Command::Write(job) => batch.push(job),
                    Command::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                next = if batch.len() < MAX_BATCH { requests.try_recv().ok() } else { None };
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
        }
        drop(self);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Applies `batch` in one transaction, commits it (one fsync), then answers every caller:
    /// all with their outputs, or all with the error if the transaction failed.
    fn commit(&mut self, mut batch: Vec<Box<dyn Job>>) {
        let db = match self.open() {
            Ok(db) => db,
            Err(refused) => {
                for job in batch {
                    job.answer(Err(refused.error()));
                }
                return;
            }
        };
        let mut cx = Cx {
            now: unix_millis(SystemTime::now()),
            dedup_window: self.dedup_window,
            retention: self.retention,
            delta: 0,
        };
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            // redb's default, spelled out: commit() returns after the fsync
            txn.set_durability(Durability::Immediate).expect("Immediate is never refused");
            for job in &mut batch {
                job.apply(&txn, &mut cx)?;
            }
            sweep_dedup(&txn, cx.now)?;
            sweep_acknowledged(&txn, cx.now)?;
            dead::sweep(&txn, cx.now, self.retention)?;
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.pending.add(cx.delta);
                for job in batch {
                    job.answer(Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, requests = batch.len(), "message store commit failed");
                let err = Arc::new(err);
                if matches!(*err, redb::Error::Io(_) | redb::Error::PreviousIo) {
                    // at once, so reads go on; if that fails too, the next write tries again
                    self.release(db, err.clone());
                    let _ = self.open();
                }
                for job in batch {
                    job.answer(Err(BrokerError::Store(err.clone())));
                }
            }
        }
    }

    /// After a write error, redb refuses every later transaction on this handle: let go of it,
    /// so the next write opens the file again.
    fn release(&mut self, db: Arc<Database>, error: Arc<redb::Error>) {
        self.released = Some(Arc::downgrade(&db));
        drop(db);
        let mut handle = self.handle.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*handle, Handle::Closed) {
            *handle = Handle::Broken(error);
        }
    }

    /// The open file, opening it again after a write error (at most once per
    /// [`REOPEN_EVERY`]); why it cannot be written otherwise.
    fn open(&mut self) -> Result<Arc<Database>, Refused> {
        let broken = match &*self.handle.read().unwrap_or_else(|e| e.into_inner()) {
            Handle::Open(db) => return Ok(db.clone()),
            Handle::Broken(error) => Refused::Unwritable(error.clone()),
            Handle::Closed => Refused::Closed,
        };
        let now = tokio::time::Instant::now();
        if self.last_reopen.is_some_and(|at| now < at + REOPEN_EVERY) {
            return Err(broken);
        }
        self.last_reopen = Some(now);
        // redb opens a file once per process: the reads still on the old handle must end first
        let until = now + REOPEN_WAIT;
        while self.released.as_ref().is_some_and(|old| old.strong_count() > 0) {
            if tokio::time::Instant::now() >= until {
                return Err(broken);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (db, stored) = open_file(&self.path).map_err(|error| {
            let error = crate::error::chain(&error);
            tracing::warn!(%error, "the message store cannot be opened again yet");
            broken
        })?;
        let db = Arc::new(db);
        self.pending.set(stored as i64);
        self.released = None;
        *self.handle.write().unwrap_or_else(|e| e.into_inner()) = Handle::Open(db.clone());
        tracing::info!(stored, "message store opened again after a write error");
        Ok(db)
    }
}

/// Why the writer cannot write now; every caller of a batch is told.
#[derive(Debug, Clone)]
enum Refused {
    /// The last write failed on this error, and the file has not opened again yet.
    Unwritable(Arc<redb::Error>),
    Closed,
}

impl Refused {
    fn error(&self) -> BrokerError {
        match self {
            Refused::Unwritable(error) => BrokerError::Unwritable(error.clone()),
            Refused::Closed => BrokerError::Stopped,
        }
    }
}

// === the writes ===

/// Stores messages, or finds an Idempotency-Key seen within the dedup window.
#[derive(Debug)]
pub(super) struct Store(pub(super) Vec<Publish>);

impl Write for Store {
    type Output = Vec<Published>;

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<Vec<Published>, redb::Error> {
        let mut messages = txn.open_table(MESSAGES)?;
        let mut state = txn.open_table(STATE)?;
        let mut due = txn.open_table(DUE)?;
        let mut dedup = txn.open_table(DEDUP)?;
        let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
        let now = cx.now;
        let mut done = Vec::with_capacity(self.0.len());
        for message in self.0 {
            let q = message.queue.as_str();
            if let Some(key) = message.idempotency_key.as_deref() {
                let seen = dedup.get((q, key))?.map(|v| v.value());
                if let Some((id, _)) = seen.filter(|&(_, expires)| expires > now) {
                    done.push(Published::Duplicate(MessageId::from_u128(id)));
                    continue;
                }
            }
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(now);
            let id = MessageId::generate(SystemTime::now().max(at));
            let key = message.idempotency_key.clone();
            let envelope = message.into_envelope(id, at);
            let q = envelope.queue.as_str();
            messages.insert((q, id.as_u128()), envelope.to_json().as_slice())?;
            state.insert((q, id.as_u128()), (0u32, now))?;
            due.insert((q, now, id.as_u128()), ())?;
            if let Some(key) = key.as_deref() {
                let expires = now.saturating_add(cx.dedup_window);
                if let Some(old) = dedup.insert((q, key), (id.as_u128(), expires))? {
                    expiry.remove((old.value().1, q, key))?;
                }
                expiry.insert((expires, q, key), ())?;
            }
            cx.delta += 1;
            done.push(Published::Stored(id));
        }
        Ok(done)
    }
}

/// Forgets messages: one acknowledged, or what the relay moved to a remote broker.
#[derive(Debug)]
pub(super) struct Forget(pub(super) Vec<(String, MessageId)>);

impl Write for Forget {
    type Output = ();

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<(), redb::Error> {
        let mut stored = Stored::open(txn)?;
        for (queue, id) in self.0 {
            stored.remove(&queue, id.as_u128(), cx)?;
        }
        Ok(())
    }
}

/// The tables that hold the stored messages, open together.
struct Stored<'txn> {
    messages: Table<'txn, (&'static str, u128), &'static [u8]>,
    state: Table<'txn, (&'static str, u128), (u32, u64)>,
    due: Table<'txn, (&'static str, u64, u128), ()>,
}

impl<'txn> Stored<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Stored {
            messages: txn.open_table(MESSAGES)?,
            state: txn.open_table(STATE)?,
            due: txn.open_table(DUE)?,
        })
    }

    /// Removes a message with its state and its place in the due index, counting it.
    fn remove(&mut self, queue: &str, id: u128, cx: &mut Cx) -> Result<(), redb::Error> {
        if self.messages.remove((queue, id))?.is_some() {
            cx.delta -= 1;
        }
        if let Some(old) = self.state.remove((queue, id))? {
            let until = old.value().1;
            self.due.remove((queue, until, id))?;
        }
        Ok(())
    }
}

/// Keeps a failed message until `until`, with its new envelope and attempt count.
#[derive(Debug)]
pub(super) struct Park {
    pub(super) envelope: Envelope,
    pub(super) attempts: u32,
    pub(super) until: UnixMillis,
}

impl Write for Park {
    type Output = ();

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<(), redb::Error> {
        let mut messages = txn.open_table(MESSAGES)?;
        let (q, id) = (self.envelope.queue.as_str(), self.envelope.id.as_u128());
        if messages.get((q, id))?.is_none() {
            // acknowledged meanwhile (a duplicate delivery): nothing to keep
            return Ok(());
        }
        messages.insert((q, id), self.envelope.to_json().as_slice())?;
        let mut state = txn.open_table(STATE)?;
        let mut due = txn.open_table(DUE)?;
        if let Some(old) = state.insert((q, id), (self.attempts, self.until))? {
            let old_until = old.value().1;
            due.remove((q, old_until, id))?;
        }
        due.insert((q, self.until, id), ())?;
        Ok(())
    }
}

/// Stores a dead letter and removes its original, in the same transaction.
#[derive(Debug)]
pub(super) struct DeadLetter {
    pub(super) envelope: Envelope,
    pub(super) dead_letter_queue: String,
}

impl Write for DeadLetter {
    type Output = ();

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<(), redb::Error> {
        dead::insert(txn, &self.dead_letter_queue, &self.envelope, cx.now, cx.retention)?;
        let id = self.envelope.id.as_u128();
        Stored::open(txn)?.remove(&self.envelope.queue, id, cx)
    }
}

/// Removes one dead letter; whether there was one.
#[derive(Debug)]
pub(super) struct DeleteDeadLetter {
    pub(super) queue: String,
    pub(super) id: MessageId,
}

impl Write for DeleteDeadLetter {
    type Output = bool;

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<bool, redb::Error> {
        Ok(dead::remove(txn, &self.queue, self.id.as_u128())?.is_some())
    }
}

/// Removes every dead letter of a queue; how many there were.
#[derive(Debug)]
pub(super) struct PurgeDeadLetters(pub(super) String);

impl Write for PurgeDeadLetters {
    type Output = u64;

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<u64, redb::Error> {
        dead::purge(txn, &self.0)
    }
}

/// Moves dead letters back to their queues, due now with a fresh attempt count; the ids moved.
#[derive(Debug)]
pub(super) struct Replay {
    pub(super) dead_letter_queue: String,
    pub(super) ids: Vec<MessageId>,
}

impl Write for Replay {
    type Output = Vec<MessageId>;

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<Vec<MessageId>, redb::Error> {
        let dlq = self.dead_letter_queue.as_str();
        let now = cx.now;
        let mut messages = txn.open_table(MESSAGES)?;
        let mut state = txn.open_table(STATE)?;
        let mut due = txn.open_table(DUE)?;
        let mut replayed = Vec::with_capacity(self.ids.len());
        for id in self.ids {
            let stored =
                txn.open_table(DEAD)?.get((dlq, id.as_u128()))?.map(|v| v.value().to_vec());
            let Some(Ok(mut envelope)) = stored.map(|json| Envelope::from_json(&json)) else {
                continue; // gone meanwhile, or unreadable: left where it is
            };
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(now);
            mark_replayed(&mut envelope, dlq, at);
            dead::remove(txn, dlq, id.as_u128())?;
            let q = envelope.queue.as_str();
            // like a fresh publish: attempts 0, due now, counted as pending; if the id is
            // somehow still in the queue, this copy replaces it (no double count)
            let key = (q, id.as_u128());
            if messages.insert(key, envelope.to_json().as_slice())?.is_none() {
                cx.delta += 1;
            }
            if let Some(old) = state.insert(key, (0u32, now))? {
                due.remove((q, old.value().1, id.as_u128()))?;
            }
            due.insert((q, now, id.as_u128()), ())?;
            replayed.push(id);
        }
        Ok(replayed)
    }
}

/// Remembers an id delivered whose acknowledgement failed, until `expires`.
#[derive(Debug)]
pub(super) struct RememberAcknowledged {
    pub(super) queue: String,
    pub(super) id: MessageId,
    pub(super) expires: UnixMillis,
}

impl Write for RememberAcknowledged {
    type Output = ();

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<(), redb::Error> {
        let (q, id) = (self.queue.as_str(), self.id.as_u128());
        let mut expiry = txn.open_table(ACKED_EXPIRY)?;
        if let Some(old) = txn.open_table(ACKED)?.insert((q, id), self.expires)? {
            expiry.remove((old.value(), q, id))?;
        }
        expiry.insert((self.expires, q, id), ())?;
        Ok(())
    }
}

/// Nothing of its own: the commit's retention sweep is the point.
#[derive(Debug)]
pub(super) struct Sweep;

impl Write for Sweep {
    type Output = ();

    fn apply(self, _txn: &WriteTransaction, _cx: &mut Cx) -> Result<(), redb::Error> {
        Ok(())
    }
}

/// Forgets up to [`SWEEP_PER_COMMIT`] acknowledged ids whose window has passed.
fn sweep_acknowledged(txn: &WriteTransaction, now: u64) -> Result<(), redb::Error> {
    let mut expiry = txn.open_table(ACKED_EXPIRY)?;
    let mut acked = txn.open_table(ACKED)?;
    let mut expired = Vec::new();
    for entry in expiry.range((0, "", 0)..(now, "", 0))?.take(SWEEP_PER_COMMIT) {
        let (key, _) = entry?;
        let (at, queue, id) = key.value();
        expired.push((at, queue.to_owned(), id));
    }
    for (at, queue, id) in &expired {
        expiry.remove((*at, queue.as_str(), *id))?;
        acked.remove((queue.as_str(), *id))?;
    }
    Ok(())
}

/// Forgets up to [`SWEEP_PER_COMMIT`] Idempotency-Keys whose window has passed.
fn sweep_dedup(txn: &WriteTransaction, now: u64) -> Result<(), redb::Error> {
    let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut expired = Vec::new();
    for entry in expiry.range((0, "", "")..(now, "", ""))?.take(SWEEP_PER_COMMIT) {
        let (key, _) = entry?;
        let (at, queue, key) = key.value();
        expired.push((at, queue.to_owned(), key.to_owned()));
    }
    for (at, queue, key) in &expired {
        expiry.remove((*at, queue.as_str(), key.as_str()))?;
        dedup.remove((queue.as_str(), key.as_str()))?;
    }
    Ok(())
}
