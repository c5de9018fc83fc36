//! The `redis://` broker: Redis Streams with consumer groups, so the replicas of one service
//! share a queue's work (the group is `service.name`) while other services each get every
//! message (their own group on the same stream).
//!
//! Keys, for queue `Q` (the braces keep one queue's keys in one cluster slot):
//! - `outrigger:{Q}`: the stream; each entry has the fields `envelope` (the JSON envelope) and
//!   `attempts` (deliveries already made);
//! - `outrigger:{Q}:delayed:G`: consumer group G's failed messages waiting for their retry, a
//!   sorted set scored by the Unix millisecond they fall due; a member is `ATTEMPTS\nENVELOPE`.
//!   Any replica's read moves what is due to `outrigger:{Q}:retry:G`, a stream only group G
//!   reads (a retry is the group's own business: other services must not see it again), in
//!   one Lua script, so two replicas never both move the same message;
//! - `outrigger:{Q}:relayed:ID`: set (for the dedup window) when the relay appended message ID,
//!   so an outbox entry relayed twice (the sidecar died before forgetting it) is appended once;
//! - dead-letter queue `D` holds queue Q's dead letters in a stream `outrigger:{Q}:dead:D` plus a
//!   hash `outrigger:{Q}:dead:D:ids` from message id to entry id, so one dead letter can be
//!   found, deleted or replayed (see [`dead`]).
//!
//! Every state change that touches two keys is one Lua script or one MULTI: a dead letter is
//! appended and its original acknowledged together, a parked message is in the delayed set
//! before its entry is acknowledged. Commands have a response timeout; the connection is
//! re-established with backoff by redis-rs's `ConnectionManager`, and a blocking read uses a
//! connection of its own so it never stalls the other commands.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrigger_config as config;
use redis::streams::StreamId;
use redis::{AsyncCommands, Value};

use super::embedded::Retention;
use keys::{dead_letters, delayed, ordered_groups, relay_mark, relayed, retries, stream};
use scripts::{DEPTH, RELAY, TRIM};

mod conn;
mod consume;
mod dead;
mod keys;
mod scripts;
use super::{
    BrokerError, DeadLetterPage, Lane, Leased, Queue, QueueDepth, Read, Remote, UnixMillis,
    Unrelayed,
};
use crate::messaging::envelope::{Envelope, MessageId};
use conn::{Conn, Lazy, Source};

/// Every command but a blocking read answers within this, or fails (and is retried later).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A read waits this long for a message to arrive when none is there.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Messages appended by one call of the relay script.
const RELAY_CHUNK: usize = 64;

/// How long the relay waits for a cluster primary's replicas to copy a batch (within the
/// commands' timeout).
const REPLICA_WAIT: Duration = Duration::from_millis(1000);
/// Parked messages moved back to the stream per read at most.
const PROMOTE_PER_READ: usize = 100;

/// The Redis broker; cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    commands: Lazy,
    /// The consumer group: `service.name`.
    group: String,
    /// This process's consumer name in every group: `service-HOSTNAME-PID`, unique per replica
    /// and start. (The broker interface's `consumer` argument is the group's base name.)
    consumer: String,
    claim_idle: Duration,
    dedup_window: Duration,
    retention: Retention,
    /// What this consumer holds: message id -> (stream key, entry id).
    leases: Mutex<HashMap<u128, Lease>>,
    /// One connection per queue for blocking reads.
    readers: Mutex<HashMap<Box<str>, Arc<Lazy>>>,
    /// Streams whose consumer group this process has made sure of.
    groups: Mutex<HashSet<Box<str>>>,
    /// Each dead-letter queue's queues, from the subscriptions (see [`dead`]).
    dead_letter_sources: HashMap<String, Vec<String>>,
    /// (queue, dead-letter queue) -> the last entry of the old layout looked at.
    migrated: Mutex<HashMap<(String, String), String>>,
    /// The relay script's SHA1 once `SCRIPT LOAD` gave it (the same on every node; a primary
    /// that lacks it answers `NOSCRIPT` and gets it then): the relay sends `EVALSHA`, not the
    /// script's text with every message.
    relay_sha: Mutex<Option<String>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("group", &self.inner.group).finish_non_exhaustive()
    }
}

/// Where a leased message is: its stream (the queue's, or the group's retry stream) and entry.
#[derive(Debug, Clone)]
struct Lease {
    queue: String,
    stream: String,
    entry: String,
    /// An entry of the group's own retry stream: deleted once settled.
    retry: bool,
    /// Read for an ordered subscription, with this ordering key: settling it lets the key's
    /// next message go.
    ordering_key: Option<String>,
}

/// What the sidecar's config asks of the broker, beside where it is.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A replica's unacknowledged message is claimed by another after this.
    pub claim_idle: Duration,
    /// How long a relayed id is remembered.
    pub dedup_window: Duration,
    pub retention: Retention,
    /// The subscribed lanes and their dead-letter queues.
    pub lanes: Vec<Lane>,
}

/// Why the Redis client could not be made (a malformed URL; Redis being down is not an error
/// here: connections are made when first needed, and again after every failure).
#[derive(Debug, thiserror::Error)]
#[error("messaging.broker: {0}")]
pub struct ConnectError(String);

fn store_error(error: redis::RedisError) -> BrokerError {
    BrokerError::Redis(error)
}

impl Redis {
    /// A broker on `url` for consumer group `group`; `rediss://` with `tls` (a CA bundle and
    /// an optional client certificate) or the system's roots.
    pub fn new(
        url: &str,
        tls: Option<&config::Tls>,
        group: &str,
        settings: Settings,
    ) -> Result<Self, ConnectError> {
        let client = match tls {
            Some(tls) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, certificates(tls)?)
            }
            _ => redis::Client::open(url),
        }
        .map_err(|e| ConnectError(e.to_string()))?;
        Ok(Self::on(Source::Single(Box::new(client)), group, settings))
    }

    /// A broker on the Redis Cluster of seed `nodes` (`redis://` URLs), for consumer group
    /// `group`.
    pub fn cluster(nodes: Vec<String>, group: &str, settings: Settings) -> Self {
        Self::on(Source::Cluster(nodes), group, settings)
    }

    fn on(source: Source, group: &str, settings: Settings) -> Self {
        let Settings { claim_idle, dedup_window, retention, lanes } = settings;
        Redis {
            inner: Arc::new(Inner {
                source,
                commands: Lazy::new(COMMAND_TIMEOUT),
                group: group.to_owned(),
                consumer: format!(
                    "{group}-{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
                    std::process::id()
                ),
                claim_idle,
                dedup_window,
                retention,
                leases: Mutex::new(HashMap::new()),
                readers: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashSet::new()),
                dead_letter_sources: dead::sources(&lanes),
                migrated: Mutex::new(HashMap::new()),
                relay_sha: Mutex::default(),
            }),
        }
    }

    /// The connection for commands, made at first use.
    async fn conn(&self) -> Result<Conn, BrokerError> {
        self.inner.commands.get(&self.inner.source).await.map_err(store_error)
    }

    /// Removes the entries of `queue`'s stream that every consumer group has read and settled;
    /// how many. Any replica may run it at any time.
    pub async fn trim(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut conn = self.conn().await?;
        redis::cmd("EVAL")
            .arg(TRIM)
            .arg(1)
            .arg(stream(queue))
            .query_async(&mut conn)
            .await
            .map_err(store_error)
    }

    /// `queue` as this service's consumer group sees it (what waits, including retries), and
    /// its dead-letter queue `dlq`.
    async fn depth(&self, queue: &str, dlq: &str) -> Result<[QueueDepth; 2], BrokerError> {
        let group = &self.inner.group;
        let mut conn = self.conn().await?;
        let [depth, oldest, dead, dead_oldest]: [i64; 4] = redis::cmd("EVAL")
            .arg(DEPTH)
            .arg(4)
            .arg(stream(queue))
            .arg(delayed(queue, group))
            .arg(retries(queue, group))
            .arg(dead_letters(queue, dlq))
            .arg(group)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let at = |ms: i64| u64::try_from(ms).ok();
        Ok([
            QueueDepth {
                queue: queue.to_owned(),
                messages: depth.max(0) as u64,
                dead_letters: 0,
                oldest_published_ms: at(oldest),
                oldest_dead_letter_ms: None,
            },
            QueueDepth {
                queue: dlq.to_owned(),
                messages: 0,
                dead_letters: dead.max(0) as u64,
                oldest_published_ms: None,
                oldest_dead_letter_ms: at(dead_oldest),
            },
        ])
    }

    /// Answers PING: the broker's health, for readiness.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        // on a cluster the client sends it to every primary, every one must answer
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(store_error)
    }

    async fn ensure_group(&self, queue: &str, ordered: bool) -> Result<(), BrokerError> {
        if self.inner.groups.lock().unwrap_or_else(|e| e.into_inner()).contains(queue) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        if ordered {
            // from now on the relay keeps this group's order lists
            let _: () =
                conn.sadd(ordered_groups(queue), &self.inner.group).await.map_err(store_error)?;
        }
        // from the stream's start: a service subscribing after messages were published gets them
        for key in [stream(queue), retries(queue, &self.inner.group)] {
            let made: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(&self.inner.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match made {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        self.migrate_dead_letters(queue).await?;
        self.inner.groups.lock().unwrap_or_else(|e| e.into_inner()).insert(queue.into());
        Ok(())
    }

    /// A Redis that lost its data (restarted without persistence, a failover to an empty
    /// replica) no longer has the group: make it again at the next read instead of failing
    /// forever.
    fn forget_group_if_gone(&self, queue: &str, error: redis::RedisError) -> BrokerError {
        if error.code() == Some("NOGROUP") {
            tracing::warn!(queue, "the consumer group is gone from Redis; making it again");
            self.inner.groups.lock().unwrap_or_else(|e| e.into_inner()).remove(queue);
        }
        store_error(error)
    }

    /// The connection for blocking reads of `queue`, made on first use.
    async fn reader(&self, queue: &str) -> Result<Conn, BrokerError> {
        let lazy = {
            let mut readers = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
            let made = readers.entry(queue.into());
            made.or_insert_with(|| Arc::new(Lazy::new(COMMAND_TIMEOUT + READ_BLOCK))).clone()
        };
        lazy.get(&self.inner.source).await.map_err(store_error)
    }

    /// Takes the entries of `key` into this consumer's leases and decodes them.
    fn lease(&self, queue: &str, key: &str, entries: Vec<StreamId>, claimed: bool) -> Vec<Leased> {
        let retry = key != stream(queue);
        let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(envelope) =
                field(&entry, "envelope").and_then(|e| Envelope::from_json(e.as_bytes()).ok())
            else {
                tracing::error!(queue, entry = %entry.id, "unreadable stream entry skipped");
                continue;
            };
            if claimed && leases.contains_key(&envelope.id.as_u128()) {
                continue; // ours and still in flight
            }
            let attempts: u32 = field(&entry, "attempts").and_then(|a| a.parse().ok()).unwrap_or(0);
            // a claimed entry was being delivered by a replica that went away: that counts
            let attempts = attempts + u32::from(claimed);
            let lease = Lease {
                queue: queue.to_owned(),
                stream: key.to_owned(),
                entry: entry.id,
                retry,
                ordering_key: None,
            };
            leases.insert(envelope.id.as_u128(), lease);
            found.push(Leased { envelope, attempts });
        }
        found
    }

    fn take_lease(&self, id: MessageId) -> Option<Lease> {
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&id.as_u128())
    }
}

/// The files of `messaging.tls`, read at startup: a missing or unreadable one stops the start
/// with its path.
fn certificates(tls: &config::Tls) -> Result<redis::TlsCertificates, ConnectError> {
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ConnectError(format!("tls.{field} {}: {e}", path.display())))
    };
    let root_cert = tls.ca_file.as_deref().map(|p| read("ca_file", p)).transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("cert_file", cert)?,
            client_key: read("key_file", key)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates { client_tls, root_cert })
}

/// A stream entry's field as text.
fn field(entry: &StreamId, name: &str) -> Option<String> {
    match entry.map.get(name)? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Redis {
    /// Appends `batch`, all of `queue`, in one pipeline; on a cluster, waits for the
    /// primary's online replicas to copy it.
    async fn relay_queue<'a>(
        &self,
        conn: &mut Conn,
        queue: &str,
        batch: impl Iterator<Item = &'a Envelope>,
    ) -> Result<(), BrokerError> {
        // on a cluster, the primary's online replicas copy the batch before the outbox
        // forgets it: a failover right after cannot lose what the relay handed over
        let replicas = conn.replicas_of(&stream(queue)).await.map_err(store_error)?;
        let batch: Vec<&Envelope> = batch.collect();
        match self.relay_pipeline(conn, queue, &batch, replicas).await {
            // a server that restarted, or a replica promoted, has no scripts: load it again
            Err(BrokerError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                *self.inner.relay_sha.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.relay_pipeline(conn, queue, &batch, replicas).await
            }
            done => done,
        }
    }

    /// The relay script's SHA1, loaded at first use on `queue`'s primary.
    async fn relay_sha(&self, conn: &mut Conn, queue: &str) -> Result<String, BrokerError> {
        if let Some(sha) = self.inner.relay_sha.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(sha);
        }
        let sha = conn.load_script(&stream(queue), RELAY).await.map_err(store_error)?;
        *self.inner.relay_sha.lock().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
        Ok(sha)
    }

    async fn relay_pipeline(
        &self,
        conn: &mut Conn,
        queue: &str,
        batch: &[&Envelope],
        replicas: usize,
    ) -> Result<(), BrokerError> {
        let window = self.inner.dedup_window.as_millis().to_string();
        let sha = self.relay_sha(conn, queue).await?;
        let mut pipe = redis::pipe();
        // one script call per chunk, not per message: Redis runs each call whole, so a chunk
        // bounds how long one holds it
        for chunk in batch.chunks(RELAY_CHUNK) {
            let call = pipe.cmd("EVALSHA").arg(&sha).arg(2 + chunk.len());
            call.arg(stream(queue)).arg(ordered_groups(queue));
            for envelope in chunk {
                call.arg(relayed(queue, envelope.id));
            }
            call.arg(&window);
            for envelope in chunk {
                call.arg(envelope.to_json())
                    .arg(envelope.ordering_key().unwrap_or(""))
                    .arg(envelope.id.to_string());
            }
            call.ignore();
        }
        if replicas == 0 {
            return pipe.query_async::<()>(conn).await.map_err(store_error);
        }
        // a write on this connection whatever the batch did, so WAIT covers the primary's
        // whole stream up to here (a batch relayed again after a failure appends nothing)
        pipe.cmd("INCR").arg(relay_mark(queue)).ignore();
        pipe.cmd("WAIT").arg(replicas).arg(REPLICA_WAIT.as_millis() as u64);
        let (copies,): (usize,) = pipe.query_async(conn).await.map_err(store_error)?;
        if copies < replicas {
            let queue = queue.to_owned();
            return Err(BrokerError::Unreplicated { queue, replicas, copies });
        }
        Ok(())
    }
}

impl Remote for Redis {
    /// Appends envelopes stored in the outbox, in order; an id relayed within the dedup window
    /// is not appended again. Returns after Redis has them all (and, with `appendfsync always`,
    /// has written them).
    async fn relay(&self, envelopes: &[Envelope]) -> Result<(), Unrelayed> {
        // one pipeline per queue: a cluster runs a pipeline on one slot, one queue's; a queue
        // whose slot refuses does not hold back the others
        let mut queues: Vec<&str> = envelopes.iter().map(|e| e.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        let mut conn = self.conn().await.map_err(|e| Unrelayed::all(envelopes, e))?;
        let mut unrelayed: Option<Unrelayed> = None;
        for queue in queues {
            let batch = envelopes.iter().filter(|e| e.queue == queue);
            if let Err(error) = self.relay_queue(&mut conn, queue, batch).await {
                let failed =
                    unrelayed.get_or_insert_with(|| Unrelayed { queues: HashSet::new(), error });
                failed.queues.insert(queue.to_owned());
            }
        }
        unrelayed.map_or(Ok(()), Err)
    }

    fn system(&self) -> &'static str {
        "redis"
    }
}

impl Queue for Redis {
    async fn depths(&self, lanes: &[Lane]) -> Result<Vec<QueueDepth>, BrokerError> {
        let mut depths: Vec<QueueDepth> = Vec::with_capacity(lanes.len() * 2);
        for lane in lanes {
            for depth in self.depth(&lane.queue, &lane.dead_letter_queue).await? {
                // a dead-letter queue fed by several lanes: one row, their sum
                match depths.iter_mut().find(|d| d.queue == depth.queue) {
                    Some(same) => same.add(&depth),
                    None => depths.push(depth),
                }
            }
        }
        Ok(depths)
    }

    async fn read(
        &self,
        queue: &str,
        // the group is `service.name`; this process's own name in it is made once, in `new`
        _consumer: &str,
        Read { max, now, ordered, wait }: Read,
    ) -> Result<Vec<Leased>, BrokerError> {
        self.ensure_group(queue, ordered).await?;
        let found = self.read_entries(queue, max, now, wait).await?;
        if ordered { self.in_turn(queue, found).await } else { Ok(found) }
    }

    fn blocks_on_read(&self) -> bool {
        true
    }

    fn messaging_system(&self) -> &'static str {
        "redis"
    }

    async fn tidy(&self, queue: &str) -> Result<u64, BrokerError> {
        self.trim(queue).await
    }

    async fn next_due(
        &self,
        queue: &str,
        now: UnixMillis,
    ) -> Result<Option<UnixMillis>, BrokerError> {
        let mut conn = self.conn().await?;
        let first: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(delayed(queue, &self.inner.group))
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(first.first().map(|(_, score)| *score as UnixMillis))
    }

    async fn ack(&self, _queue: &str, id: MessageId) -> Result<(), BrokerError> {
        let Some(lease) = self.take_lease(id) else { return Ok(()) };
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.settle(&mut pipe, &lease, id);
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn).await.map_err(store_error)
    }

    async fn park(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: UnixMillis,
    ) -> Result<(), BrokerError> {
        let Some(lease) = self.take_lease(envelope.id) else { return Ok(()) };
        let member = format!("{attempts}\n{}", String::from_utf8_lossy(&envelope.to_json()));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(delayed(&envelope.queue, &self.inner.group))
            .arg(until)
            .arg(member)
            .ignore();
        // a parked message keeps its ordering key: the next one waits for its retry
        self.settle_entry(&mut pipe, &lease);
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn).await.map_err(store_error)
    }

    async fn dead_letter(
        &self,
        envelope: Envelope,
        dead_letter_queue: &str,
    ) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_dead_letter(&mut pipe, &envelope, dead_letter_queue);
        // the dead letter and the acknowledgement of its original, in one MULTI
        let lease = self.take_lease(envelope.id);
        if let Some(lease) = &lease {
            self.settle(&mut pipe, lease, envelope.id);
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut conn).await.map_err(store_error)
    }

    async fn dead_letters(
        &self,
        dead_letter_queue: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        self.list_dead_letters(dead_letter_queue, before, limit).await
    }

    async fn dead_letter_get(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        self.get_dead_letter(dead_letter_queue, id).await
    }

    async fn dead_letter_delete(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<bool, BrokerError> {
        self.delete_dead_letter(dead_letter_queue, id).await
    }

    async fn dead_letter_purge(&self, dead_letter_queue: &str) -> Result<u64, BrokerError> {
        self.purge_dead_letters(dead_letter_queue).await
    }

    async fn dead_letter_replay(
        &self,
        dead_letter_queue: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, BrokerError> {
        self.replay_dead_letters(dead_letter_queue, ids).await
    }
}
