//! The writer thread: every write of the store, applied in group commits behind the log.
//!
//! Each request carries its own reply, typed by the write it asks for ([`Write::Output`]): a
//! publish is answered with what it published, a purge with how many it removed, and no caller
//! matches on an answer meant for another. The thread takes what has queued (up to
//! [`MAX_BATCH`] requests) and makes it one record of the log: the commit's time and settings,
//! then each write's bytes. The record is appended and flushed (one `fdatasync`), then applied
//! to redb in one transaction that is not flushed (`Durability::None`), and only then is each
//! caller answered: what a caller was told is on disk, in the log, and what reads find is in
//! redb.
//!
//! Every [`CHECKPOINT_EVERY`] (or [`CHECKPOINT_BYTES`] of log) one durable redb commit makes all
//! that redb holds survive a crash, with the number of the last record in it; the log's older
//! segments are then let go of. At open, and after a write error, the records after that
//! number are applied again ([`recover`]): a write is a record that gives the same result on
//! the same store (its ids and time are in it), so the store comes back as it was answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::codec::{Decoder, Encoder, FORMAT, Malformed};
use super::dead::{self, DEAD, Retention};
use super::wal::{Log, LogError};
use super::{
    ACKED, ACKED_EXPIRY, DEDUP, DEDUP_EXPIRY, DUE, Handle, MAX_BATCH, MESSAGES, META, REOPEN_EVERY,
    REOPEN_WAIT, STATE, SWEEP_PER_COMMIT, SharedHandle, StoreError, open_file,
};
use crate::messaging::broker::{BrokerError, Published, UnixMillis, mark_replayed};
use crate::messaging::envelope::{Envelope, MessageId, unix_millis};

/// How often redb is made durable (a checkpoint), when something was written since.
///
/// A checkpoint's cost grows with what was applied since the last one (about 20 µs a record
/// under load, after a fixed 1 to 2 ms), and every write waits for it: a short interval keeps
/// that wait short (measured in BENCHMARKS.md: 1 s made p99 18 ms at 64 publishers, 50 ms 4.6
/// ms, at the same throughput).
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// Log written since the last checkpoint that makes one at once: bounds what a restart replays.
const CHECKPOINT_BYTES: u64 = super::wal::SEGMENT_BYTES;
/// The key in [`META`] of the last record applied.
const APPLIED: &str = "applied_lsn";

/// One kind of write: its bytes in the log, and how it is applied inside the writer's
/// transaction. `Output` is what its caller gets once the record is on disk.
pub(super) trait Write: Send + Sized + 'static {
    type Output: Send + 'static;
    /// Names the write in the log; never reused.
    const TAG: u8;

    fn encode(&self, out: &mut Encoder);

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed>;

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<Self::Output, redb::Error>;
}

/// What every write in a commit shares; the head of its record.
pub(super) struct Cx {
    /// The commit's time, Unix ms.
    now: u64,
    dedup_window: u64,
    retention: Retention,
    /// Change in the number of stored messages.
    delta: i64,
}

impl Cx {
    fn encode(&self, out: &mut Encoder) {
        out.u8(FORMAT);
        out.u64(self.now);
        out.u64(self.dedup_window);
        out.u64(self.retention.max_messages);
        out.u64(self.retention.max_age_ms);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        if input.u8()? != FORMAT {
            return Err(Malformed("written in another layout"));
        }
        Ok(Cx {
            now: input.u64()?,
            dedup_window: input.u64()?,
            retention: Retention { max_messages: input.u64()?, max_age_ms: input.u64()? },
            delta: 0,
        })
    }
}

/// What goes to the writer thread.
#[derive(Debug)]
pub(super) enum Command {
    Write(Box<dyn Job>),
    /// Make redb durable now if it holds records since the last checkpoint.
    Checkpoint,
    /// Stop after what is queued, and say so once the file is let go of.
    Close(oneshot::Sender<()>),
}

/// A write with the caller's reply channel, its type erased for the channel.
pub(super) trait Job: Send + std::fmt::Debug {
    /// Appends the write's tag and bytes to the commit's record.
    fn encode(&self, out: &mut Encoder);

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
    fn encode(&self, out: &mut Encoder) {
        if let Some(write) = &self.write {
            out.u8(W::TAG);
            write.encode(out);
        }
    }

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

/// Why the log's records could not be applied again.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("record {lsn} of the log cannot be applied")]
    Malformed {
        lsn: u64,
        #[source]
        cause: Malformed,
    },
    #[error("the store refused the log's records")]
    Store(#[from] redb::Error),
}

/// Applies the records of `log` after the store's checkpoint, makes the result durable, and
/// lets go of the segments it no longer needs. Returns the number of the last record applied.
pub(super) fn recover(db: &Database, log: &mut Log) -> Result<u64, ReplayError> {
    let replayed = replay(db, log)?;
    let last = replayed.last;
    finish_recovery(db, log, replayed)?;
    Ok(last)
}

/// What [`replay`] applied.
#[derive(Debug, Clone, Copy)]
pub(super) struct Replayed {
    /// The store's checkpoint before, and the last record applied after it.
    checkpoint: u64,
    last: u64,
}

/// Applies the records of `log` after the store's checkpoint in one transaction, not flushed:
/// reads see them at once.
fn replay(db: &Database, log: &mut Log) -> Result<Replayed, ReplayError> {
    let checkpoint = applied(db)?;
    let mut txn = db.begin_write().map_err(redb::Error::from)?;
    txn.set_durability(Durability::None).map_err(redb::Error::from)?;
    let mut replayed = 0u64;
    let last = log.replay(checkpoint, |lsn, payload| {
        replayed += 1;
        apply_record(&txn, payload).map_err(|cause| match cause {
            Applied::Malformed(cause) => ReplayError::Malformed { lsn, cause },
            Applied::Store(error) => ReplayError::Store(error),
        })
    })?;
    txn.open_table(META)
        .map_err(redb::Error::from)?
        .insert(APPLIED, last)
        .map_err(redb::Error::from)?;
    txn.commit().map_err(redb::Error::from)?;
    if replayed > 0 {
        tracing::info!(
            replayed,
            checkpoint,
            last,
            "the message log's records since the last checkpoint applied again"
        );
    }
    log.continue_at(log.next_lsn().max(checkpoint + 1));
    Ok(Replayed { checkpoint, last })
}

/// Makes what [`replay`] applied durable, and lets go of the log's segments it no longer needs.
fn finish_recovery(db: &Database, log: &mut Log, replayed: Replayed) -> Result<(), redb::Error> {
    checkpoint_now(db)?;
    if let Err(error) = log.forget_through(replayed.last) {
        tracing::warn!(%error, "the message log's old segments cannot be removed");
    }
    Ok(())
}

/// The number of the last record applied to the store, as its last checkpoint left it.
fn applied(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_read()?;
    Ok(txn.open_table(META)?.get(APPLIED)?.map_or(0, |v| v.value()))
}

/// Why one record of the log did not apply.
enum Applied {
    Malformed(Malformed),
    Store(redb::Error),
}

impl From<Malformed> for Applied {
    fn from(error: Malformed) -> Self {
        Applied::Malformed(error)
    }
}

impl From<redb::Error> for Applied {
    fn from(error: redb::Error) -> Self {
        Applied::Store(error)
    }
}

/// Applies one record as its commit did: the commit's head, each write by its tag, then the
/// commit's sweeps.
fn apply_record(txn: &WriteTransaction, payload: &[u8]) -> Result<(), Applied> {
    let mut input = Decoder::new(payload);
    let mut cx = Cx::decode(&mut input)?;
    for _ in 0..input.count(1)? {
        let tag = input.u8()?;
        let (input, cx) = (&mut input, &mut cx);
        match tag {
            Store::TAG => apply_logged::<Store>(input, txn, cx)?,
            Forget::TAG => apply_logged::<Forget>(input, txn, cx)?,
            Park::TAG => apply_logged::<Park>(input, txn, cx)?,
            DeadLetter::TAG => apply_logged::<DeadLetter>(input, txn, cx)?,
            DeleteDeadLetter::TAG => apply_logged::<DeleteDeadLetter>(input, txn, cx)?,
            PurgeDeadLetters::TAG => apply_logged::<PurgeDeadLetters>(input, txn, cx)?,
            Replay::TAG => apply_logged::<Replay>(input, txn, cx)?,
            RememberAcknowledged::TAG => apply_logged::<RememberAcknowledged>(input, txn, cx)?,
            Sweep::TAG => apply_logged::<Sweep>(input, txn, cx)?,
            _ => return Err(Malformed("a write of an unknown kind").into()),
        }
    }
    if !input.is_empty() {
        return Err(Malformed("bytes after its last write").into());
    }
    sweep(txn, &cx)?;
    Ok(())
}

/// Decodes one write of type `W` and applies it; its output went to its caller long ago.
fn apply_logged<W: Write>(
    input: &mut Decoder<'_>,
    txn: &WriteTransaction,
    cx: &mut Cx,
) -> Result<(), Applied> {
    W::decode(input)?.apply(txn, cx)?;
    Ok(())
}

/// What each commit does after its writes: forgets a few expired keys, ids and dead letters.
fn sweep(txn: &WriteTransaction, cx: &Cx) -> Result<(), redb::Error> {
    sweep_dedup(txn, cx.now)?;
    sweep_acknowledged(txn, cx.now)?;
    dead::sweep(txn, cx.now, cx.retention)
}

/// One durable commit: everything redb holds survives a crash from here, and a crash reopens
/// without walking the whole file (quick repair).
fn checkpoint_now(db: &Database) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(true);
    txn.commit()?;
    Ok(())
}

/// The thread's state: the file, the log, and what commits change outside them.
pub(super) struct Writer {
    /// The file, as reads find it too; the writer alone replaces it.
    pub(super) handle: SharedHandle,
    pub(super) path: PathBuf,
    pub(super) log: Log,
    /// The last record applied to redb, and the last one a checkpoint made durable there.
    pub(super) applied: u64,
    pub(super) checkpointed: u64,
    pub(super) last_checkpoint: tokio::time::Instant,
    /// Log bytes written since the last checkpoint.
    pub(super) since_checkpoint: u64,
    /// When the file's use was last looked at, for compaction.
    pub(super) last_compact_check: Option<tokio::time::Instant>,
    /// The write error after which redb refuses this handle's writes: the next write opens
    /// the file again.
    pub(super) poisoned: Option<Arc<StoreError>>,
    pub(super) last_reopen: Option<tokio::time::Instant>,
    pub(super) dedup_window: u64,
    pub(super) retention: Retention,
    pub(super) commits: Arc<AtomicU64>,
    pub(super) pending: IntGauge,
    /// Each commit's duration, from taking the batch to answering it.
    pub(super) commit_duration: Option<prometheus::Histogram>,
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
                    Command::Checkpoint => self.checkpoint_if(CHECKPOINT_EVERY),
                    Command::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                next = if batch.len() < MAX_BATCH { requests.try_recv().ok() } else { None };
            }
            if !batch.is_empty() {
                self.commit(batch);
                self.checkpoint_if(CHECKPOINT_EVERY);
            }
        }
        self.checkpoint_if(Duration::ZERO);
        drop(self);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Logs `batch` as one record (one fdatasync), applies it to redb in one transaction,
    /// then answers every caller: all with their outputs, or all with the error.
    fn commit(&mut self, batch: Vec<Box<dyn Job>>) {
        let started = tokio::time::Instant::now();
        self.commit_batch(batch);
        if let Some(histogram) = &self.commit_duration {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    }

    fn commit_batch(&mut self, mut batch: Vec<Box<dyn Job>>) {
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
        let mut record = Encoder::default();
        cx.encode(&mut record);
        record.u32(u32::try_from(batch.len()).expect("a batch is bounded"));
        for job in &batch {
            job.encode(&mut record);
        }
        let lsn = match self.log.append(&record.bytes) {
            Ok(lsn) => lsn,
            Err(error) => {
                tracing::error!(%error, requests = batch.len(), "the message log cannot be written");
                let error = Arc::new(StoreError::Log(error));
                for job in batch {
                    job.answer(Err(BrokerError::Store(error.clone())));
                }
                return;
            }
        };
        self.since_checkpoint += record.bytes.len() as u64;
        let result = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            // durable already, in the log: the checkpoint makes redb durable later
            txn.set_durability(Durability::None)?;
            for job in &mut batch {
                job.apply(&txn, &mut cx)?;
            }
            sweep(&txn, &cx)?;
            txn.open_table(META)?.insert(APPLIED, lsn)?;
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.applied = lsn;
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.pending.add(cx.delta);
                for job in batch {
                    job.answer(Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, requests = batch.len(), "message store commit failed");
                // the callers are told it failed: the record must not be replayed later
                let undone = self.log.undo().inspect_err(|error| {
                    tracing::error!(%error, "the message log cannot take back a record not applied");
                });
                let err = Arc::new(StoreError::File(err));
                let io =
                    matches!(&*err, StoreError::File(redb::Error::Io(_) | redb::Error::PreviousIo));
                if io || undone.is_err() {
                    // redb refuses this handle's writes now; the next write opens the file
                    // again, replaying the log (with the record, if it could not be erased)
                    drop(db);
                    self.release(err.clone());
                }
                for job in batch {
                    job.answer(Err(BrokerError::Store(err.clone())));
                }
            }
        }
    }

    /// Makes redb durable if it holds records since the last checkpoint and `after` has
    /// passed since it, or the log has grown by [`CHECKPOINT_BYTES`]; then lets go of the
    /// segments no longer needed.
    fn checkpoint_if(&mut self, after: Duration) {
        let due =
            self.last_checkpoint.elapsed() >= after || self.since_checkpoint >= CHECKPOINT_BYTES;
        if self.applied == self.checkpointed {
            // all durable: an idle store is where compaction has its chance
            let open = match &*self.handle.read().unwrap_or_else(|e| e.into_inner()) {
                Handle::Open(db) if self.poisoned.is_none() => Some(db.clone()),
                _ => None,
            };
            if let Some(db) = open {
                self.compact_if_sparse(db);
            }
            return;
        }
        if !due {
            return;
        }
        let Ok(db) = self.open() else { return };
        let started = tokio::time::Instant::now();
        let result = checkpoint_now(&db);
        let records = self.applied - self.checkpointed;
        tracing::trace!(took = ?started.elapsed(), records, "message store checkpoint");
        if let Err(err) = result {
            tracing::error!(error = %err, "message store checkpoint failed");
            if matches!(err, redb::Error::Io(_) | redb::Error::PreviousIo) {
                self.release(Arc::new(StoreError::File(err)));
            }
            return;
        }
        self.checkpointed = self.applied;
        self.last_checkpoint = tokio::time::Instant::now();
        self.since_checkpoint = 0;
        if let Err(error) = self.log.forget_through(self.checkpointed) {
            tracing::warn!(%error, "the message log's old segments cannot be removed");
        }
    }

    /// After a write error, redb refuses every later write on this handle (reads go on, and see
    /// what was committed): the next write opens the file again.
    fn release(&mut self, error: Arc<StoreError>) {
        self.poisoned = Some(error);
    }

    /// The open file, opening it again after a write error (at most once per
    /// [`REOPEN_EVERY`]) and replaying the log into it; why it cannot be written otherwise.
    fn open(&mut self) -> Result<Arc<Database>, Refused> {
        let (current, error) = match &*self.handle.read().unwrap_or_else(|e| e.into_inner()) {
            Handle::Open(db) => match &self.poisoned {
                None => return Ok(db.clone()),
                Some(error) => (Some(db.clone()), error.clone()),
            },
            Handle::Broken(error) => (None, error.clone()),
            Handle::Closed => return Err(Refused::Closed),
        };
        let now = tokio::time::Instant::now();
        if self.last_reopen.is_some_and(|at| now < at + REOPEN_EVERY) {
            return Err(Refused::Unwritable(error));
        }
        self.last_reopen = Some(now);
        if let Some(old) = current {
            // redb opens a file once per process: the reads on the old handle must end first,
            // and new ones wait for the file to open again
            let Some(old) = self.take_from_readers(old, error.clone()) else {
                return Err(Refused::Unwritable(error));
            };
            drop(old);
        }
        let reopened = open_file(&self.path).map_err(StoreError::File).and_then(|db| {
            // the log as the disk has it, not as this thread last left it: a record whose
            // flush or erasure failed is found (or not) as the next start would find it
            let dir = self.path.with_file_name(super::LOG_DIR);
            self.log = Log::open(&dir).map_err(|e| StoreError::Replay(e.into()))?;
            let replayed = replay(&db, &mut self.log).map_err(StoreError::Replay)?;
            Ok((db, replayed))
        });
        let (db, replayed) = reopened.map_err(|error| {
            tracing::warn!(error = %crate::error::chain(&error), "the message store cannot be opened again yet");
            let error = Arc::new(error);
            *self.handle.write().unwrap_or_else(|e| e.into_inner()) = Handle::Broken(error.clone());
            Refused::Unwritable(error)
        })?;
        // reads see the store as its callers were answered, whether or not it can be written
        let stored = super::schema::stored(&db).unwrap_or_default();
        self.pending.set(stored as i64);
        let db = Arc::new(db);
        *self.handle.write().unwrap_or_else(|e| e.into_inner()) = Handle::Open(db.clone());
        (self.applied, self.checkpointed) = (replayed.last, replayed.checkpoint);
        if let Err(error) = finish_recovery(&db, &mut self.log, replayed) {
            tracing::warn!(%error, "the message store opened again, and cannot be written yet");
            let error = Arc::new(StoreError::File(error));
            self.poisoned = Some(error.clone());
            return Err(Refused::Unwritable(error));
        }
        self.poisoned = None;
        self.checkpointed = self.applied;
        self.last_checkpoint = tokio::time::Instant::now();
        self.since_checkpoint = 0;
        tracing::info!(stored, "message store opened again after a write error");
        Ok(db)
    }

    /// Refuses reads with `meanwhile` and waits for those in progress to end: the file to
    /// itself, or `None` if a read held it past [`REOPEN_WAIT`] (reads go on as before then).
    pub(super) fn take_from_readers(
        &mut self,
        db: Arc<Database>,
        meanwhile: Arc<StoreError>,
    ) -> Option<Arc<Database>> {
        let mut handle = self.handle.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*handle, Handle::Open(_)) {
            return None;
        }
        *handle = Handle::Broken(meanwhile);
        drop(handle);
        let until = tokio::time::Instant::now() + REOPEN_WAIT;
        while Arc::strong_count(&db) > 1 {
            if tokio::time::Instant::now() >= until {
                *self.handle.write().unwrap_or_else(|e| e.into_inner()) = Handle::Open(db);
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(db)
    }
}

/// Why the writer cannot write now; every caller of a batch is told.
#[derive(Debug, Clone)]
enum Refused {
    /// The last write failed on this error, and the file has not opened again yet.
    Unwritable(Arc<StoreError>),
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

/// A message as the log and the store hold it: its envelope as JSON, serialized once, by the
/// caller.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) queue: String,
    pub(super) id: MessageId,
    pub(super) json: Vec<u8>,
}

impl Entry {
    pub(super) fn of(envelope: &Envelope) -> Self {
        Entry { queue: envelope.queue.clone(), id: envelope.id, json: envelope.to_json() }
    }

    fn encode(&self, out: &mut Encoder) {
        out.str(&self.queue);
        out.u128(self.id.as_u128());
        out.bytes(&self.json);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(Entry {
            queue: input.string()?,
            id: MessageId::from_u128(input.u128()?),
            json: input.bytes()?.to_vec(),
        })
    }
}

/// A message published: its entry, when it was accepted, and its Idempotency-Key.
#[derive(Debug)]
pub(super) struct New {
    pub(super) entry: Entry,
    pub(super) at: UnixMillis,
    pub(super) idempotency_key: Option<String>,
}

/// Stores messages, or finds an Idempotency-Key seen within the dedup window.
#[derive(Debug)]
pub(super) struct Store(pub(super) Vec<New>);

impl Write for Store {
    type Output = Vec<Published>;
    const TAG: u8 = 1;

    fn encode(&self, out: &mut Encoder) {
        out.u32(self.0.len() as u32);
        for new in &self.0 {
            new.entry.encode(out);
            out.u64(new.at);
            out.opt_str(new.idempotency_key.as_deref());
        }
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        let n = input.count(1)?;
        let mut messages = Vec::with_capacity(n);
        for _ in 0..n {
            let entry = Entry::decode(input)?;
            messages.push(New { entry, at: input.u64()?, idempotency_key: input.opt_string()? });
        }
        Ok(Store(messages))
    }

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<Vec<Published>, redb::Error> {
        let mut messages = txn.open_table(MESSAGES)?;
        let mut state = txn.open_table(STATE)?;
        let mut due = txn.open_table(DUE)?;
        let mut dedup = txn.open_table(DEDUP)?;
        let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
        let now = cx.now;
        let mut done = Vec::with_capacity(self.0.len());
        for New { entry, at, idempotency_key } in self.0 {
            let (q, id) = (entry.queue.as_str(), entry.id.as_u128());
            if let Some(key) = idempotency_key.as_deref() {
                let seen = dedup.get((q, key))?.map(|v| v.value());
                if let Some((id, _)) = seen.filter(|&(_, expires)| expires > now) {
                    done.push(Published::Duplicate(MessageId::from_u128(id)));
                    continue;
                }
            }
            messages.insert((q, id), entry.json.as_slice())?;
            state.insert((q, id), (0u32, at))?;
            due.insert((q, at, id), ())?;
            if let Some(key) = idempotency_key.as_deref() {
                let expires = now.saturating_add(cx.dedup_window);
                if let Some(old) = dedup.insert((q, key), (id, expires))? {
                    expiry.remove((old.value().1, q, key))?;
                }
                expiry.insert((expires, q, key), ())?;
            }
            cx.delta += 1;
            done.push(Published::Stored(entry.id));
        }
        Ok(done)
    }
}

fn encode_ids(out: &mut Encoder, ids: &[(String, MessageId)]) {
    out.u32(ids.len() as u32);
    for (queue, id) in ids {
        out.str(queue);
        out.u128(id.as_u128());
    }
}

fn decode_ids(input: &mut Decoder<'_>) -> Result<Vec<(String, MessageId)>, Malformed> {
    let n = input.count(20)?;
    (0..n).map(|_| Ok((input.string()?, MessageId::from_u128(input.u128()?)))).collect()
}

/// Forgets messages: one acknowledged, or what the relay moved to a remote broker.
#[derive(Debug)]
pub(super) struct Forget(pub(super) Vec<(String, MessageId)>);

impl Write for Forget {
    type Output = ();
    const TAG: u8 = 2;

    fn encode(&self, out: &mut Encoder) {
        encode_ids(out, &self.0);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        decode_ids(input).map(Forget)
    }

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
    pub(super) entry: Entry,
    pub(super) attempts: u32,
    pub(super) until: UnixMillis,
}

impl Write for Park {
    type Output = ();
    const TAG: u8 = 3;

    fn encode(&self, out: &mut Encoder) {
        self.entry.encode(out);
        out.u32(self.attempts);
        out.u64(self.until);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(Park { entry: Entry::decode(input)?, attempts: input.u32()?, until: input.u64()? })
    }

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<(), redb::Error> {
        let mut messages = txn.open_table(MESSAGES)?;
        let (q, id) = (self.entry.queue.as_str(), self.entry.id.as_u128());
        if messages.get((q, id))?.is_none() {
            // acknowledged meanwhile (a duplicate delivery): nothing to keep
            return Ok(());
        }
        messages.insert((q, id), self.entry.json.as_slice())?;
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
    pub(super) entry: Entry,
    pub(super) dead_letter_queue: String,
}

impl Write for DeadLetter {
    type Output = ();
    const TAG: u8 = 4;

    fn encode(&self, out: &mut Encoder) {
        self.entry.encode(out);
        out.str(&self.dead_letter_queue);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(DeadLetter { entry: Entry::decode(input)?, dead_letter_queue: input.string()? })
    }

    fn apply(self, txn: &WriteTransaction, cx: &mut Cx) -> Result<(), redb::Error> {
        let Entry { queue, id, json } = &self.entry;
        let id = id.as_u128();
        dead::insert(txn, &self.dead_letter_queue, id, json, cx.now, cx.retention)?;
        Stored::open(txn)?.remove(queue, id, cx)
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
    const TAG: u8 = 5;

    fn encode(&self, out: &mut Encoder) {
        out.str(&self.queue);
        out.u128(self.id.as_u128());
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(DeleteDeadLetter { queue: input.string()?, id: MessageId::from_u128(input.u128()?) })
    }

    fn apply(self, txn: &WriteTransaction, _cx: &mut Cx) -> Result<bool, redb::Error> {
        Ok(dead::remove(txn, &self.queue, self.id.as_u128())?.is_some())
    }
}

/// Removes every dead letter of a queue; how many there were.
#[derive(Debug)]
pub(super) struct PurgeDeadLetters(pub(super) String);

impl Write for PurgeDeadLetters {
    type Output = u64;
    const TAG: u8 = 6;

    fn encode(&self, out: &mut Encoder) {
        out.str(&self.0);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        input.string().map(PurgeDeadLetters)
    }

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
    const TAG: u8 = 7;

    fn encode(&self, out: &mut Encoder) {
        out.str(&self.dead_letter_queue);
        out.u32(self.ids.len() as u32);
        for id in &self.ids {
            out.u128(id.as_u128());
        }
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        let dead_letter_queue = input.string()?;
        let n = input.count(16)?;
        let ids =
            (0..n).map(|_| input.u128().map(MessageId::from_u128)).collect::<Result<_, _>>()?;
        Ok(Replay { dead_letter_queue, ids })
    }

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
    const TAG: u8 = 8;

    fn encode(&self, out: &mut Encoder) {
        out.str(&self.queue);
        out.u128(self.id.as_u128());
        out.u64(self.expires);
    }

    fn decode(input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(RememberAcknowledged {
            queue: input.string()?,
            id: MessageId::from_u128(input.u128()?),
            expires: input.u64()?,
        })
    }

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
    const TAG: u8 = 9;

    fn encode(&self, _out: &mut Encoder) {}

    fn decode(_input: &mut Decoder<'_>) -> Result<Self, Malformed> {
        Ok(Sweep)
    }

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

/// The record a commit of `write` alone at `now` writes, for tests that make a log by hand.
#[cfg(test)]
pub(super) fn record_of<W: Write>(now: UnixMillis, write: W) -> Vec<u8> {
    let cx = Cx {
        now,
        dedup_window: 3_600_000,
        retention: Retention { max_messages: 10_000, max_age_ms: 86_400_000 },
        delta: 0,
    };
    let mut out = Encoder::default();
    cx.encode(&mut out);
    out.u32(1);
    out.u8(W::TAG);
    write.encode(&mut out);
    out.bytes
}
