//! The `nats://` broker: NATS JetStream (docs/messaging.md "The NATS broker"; the design and
//! what NATS 2.9 can do are in docs/design/nats-jetstream.md).
//!
//! - A stream per queue, `OUTRIGGER-Q-<queue escaped>` on subject `outrigger.<queue>`, file
//!   storage, made when missing and refused (never changed) when it exists with settings that
//!   would break a promise. The relay publishes each message with its id as `Nats-Msg-Id`, so
//!   one relayed again within the duplicate window (`dedup_window`) is stored once.
//! - A durable pull consumer named `service.name` on it, shared by the replicas, explicit acks
//!   confirmed by the server, `ack_wait` = `claim_idle`.
//! - Park: the message's new envelope and attempt count go to a state stream (one subject per
//!   message, confirmed), then a nak delayed to the due time; the redelivery reads them back.
//!   One copy of the message, whatever moment a crash comes at.
//! - Dead letters: a stream per dead-letter queue, one subject per message id; the original is
//!   terminated once its dead letter is stored.
//! - Not built: `ordered: true` (refused by `validate` with nats://).

mod names;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::Unrelayed;
use crate::messaging::envelope::{Envelope, MessageId};

/// A read waits this long for a message when none is there.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Connecting, and each JetStream request, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a NATS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats: connecting failed")]
    Connect(#[source] async_nats::ConnectError),
    #[error("nats: reading stream {stream} failed")]
    Stream {
        stream: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "nats: stream {stream} exists with {field} {found}, and Outrigger needs {wanted}: change \
         or remove the stream (Outrigger never changes a stream it did not make that way)"
    )]
    Incompatible { stream: String, field: &'static str, found: String, wanted: String },
    #[error("nats: {0} is not built yet on nats:// (issue 22, work in progress)")]
    NotBuilt(&'static str),
    #[error("nats: publishing to {subject} failed")]
    Publish {
        subject: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The NATS broker; cheap to clone.
#[derive(Clone)]
pub struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    servers: Vec<async_nats::ServerAddr>,
    /// Made at first use: NATS being down at startup is not an error.
    js: OnceCell<jetstream::Context>,
    /// The durable consumer: `service.name`.
    group: String,
    claim_idle: Duration,
    dedup_window: Duration,
    /// Each queue's consumer, once its stream and consumer were made or checked.
    streams: Mutex<HashMap<String, consumer::PullConsumer>>,
    /// Messages handed to this process, until settled.
    leases: Mutex<HashMap<u128, jetstream::Message>>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").field("group", &self.inner.group).finish_non_exhaustive()
    }
}

impl Nats {
    /// A broker on `servers` (`nats://` URLs) for durable consumer `group`.
    pub fn new(
        servers: Vec<String>,
        group: &str,
        claim_idle: Duration,
        dedup_window: Duration,
    ) -> Self {
        let servers = servers.iter().filter_map(|s| s.parse().ok()).collect();
        Nats {
            inner: Arc::new(Inner {
                servers,
                js: OnceCell::new(),
                group: group.to_owned(),
                claim_idle,
                dedup_window,
                streams: Mutex::default(),
                leases: Mutex::default(),
            }),
        }
    }

    /// The JetStream context, connected at first use (the client reconnects by itself after).
    async fn js(&self) -> Result<&jetstream::Context, NatsError> {
        self.inner
            .js
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(REQUEST_TIMEOUT)
                    .request_timeout(Some(REQUEST_TIMEOUT))
                    .connect(self.inner.servers.clone())
                    .await
                    .map_err(NatsError::Connect)?;
                Ok(jetstream::new(client))
            })
            .await
    }

    /// The stream `queue`'s messages go to, as Outrigger needs it: made if missing, refused
    /// (never changed) if it exists with settings that would break a promise; and this
    /// service's durable consumer on it, made if missing (on 2.9 a "create" would silently
    /// change an existing one, so it is looked up first).
    async fn ensure(&self, queue: &str) -> Result<consumer::PullConsumer, NatsError> {
        if let Some(found) = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner()).get(queue)
        {
            return Ok(found.clone());
        }
        let js = self.js().await?;
        let name = names::queue_stream(queue);
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![names::subject(queue)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: self.inner.dedup_window,
            allow_direct: true,
            ..Default::default()
        };
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: name.clone(),
            cause,
        };
        let stream = match js.get_stream(&name).await {
            Ok(mut existing) => {
                let found = existing.info().await.map_err(|e| failed(e.into()))?.config.clone();
                check(&name, &found, &wanted)?;
                existing
            }
            Err(error) if is_not_found(&error) => {
                js.create_stream(wanted).await.map_err(|e| failed(e.into()))?
            }
            Err(error) => return Err(failed(error.into())),
        };
        let group = self.inner.group.clone();
        let pull = match stream.get_consumer::<consumer::pull::Config>(&group).await {
            Ok(found) => found,
            Err(_) => stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(group.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.inner.claim_idle,
                    max_deliver: -1,
                    max_ack_pending: -1,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| failed(e.into()))?,
        };
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_owned(), pull.clone());
        Ok(pull)
    }

    /// A stream of Outrigger's own (parked messages' state, a dead-letter queue): one message
    /// per subject, made when missing.
    async fn ensure_keyed(
        &self,
        name: String,
        subjects: String,
    ) -> Result<stream::Stream, NatsError> {
        let js = self.js().await?;
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: name.clone(),
            cause,
        };
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        };
        js.get_or_create_stream(config).await.map_err(|e| failed(e.into()))
    }

    /// The subject of the state of queue `queue`'s message at stream sequence `seq`.
    fn state_subject(&self, queue: &str, seq: u64) -> String {
        format!("outrigger-s.{}.r.{}.{seq}", names::escape(queue), names::escape(&self.inner.group))
    }

    /// Up to `max` messages of `queue` for this service's consumer, leased to this process;
    /// waiting up to `wait` for the first.
    pub async fn read_messages(
        &self,
        queue: &str,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<super::Leased>, NatsError> {
        let pull = self.ensure(queue).await?;
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: names::queue_stream(queue),
            cause,
        };
        let mut batch = match wait {
            Some(wait) => pull.batch().max_messages(max).expires(wait).messages().await,
            None => pull.fetch().max_messages(max).messages().await,
        }
        .map_err(|e| failed(e.into()))?;
        let mut found = Vec::new();
        // drained to the end: a batch dropped early strands its messages until ack_wait
        while let Some(message) = batch.next().await {
            let message = message.map_err(&failed)?;
            let (delivered, seq) =
                message.info().map(|i| (i.delivered, i.stream_sequence)).unwrap_or((1, 0));
            match Envelope::from_json(&message.payload) {
                Ok(mut envelope) => {
                    let mut attempts = u32::try_from(delivered - 1).unwrap_or(u32::MAX);
                    if delivered > 1 {
                        // parked before: its last envelope and attempt count are in its state
                        if let Some(state) = self.state_of(queue, seq).await? {
                            let since = delivered - state.delivered - 1;
                            attempts = state.attempts.saturating_add(since.try_into().unwrap_or(0));
                            envelope = state.envelope;
                        }
                    }
                    let id = envelope.id.as_u128();
                    self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).insert(id, message);
                    found.push(super::Leased { envelope, attempts });
                }
                Err(error) => {
                    tracing::error!(queue, %error, "a message on NATS is not an envelope; it is left unacknowledged");
                }
            }
        }
        Ok(found)
    }

    /// The state a park left for queue `queue`'s message at `seq`, if any.
    async fn state_of(&self, queue: &str, seq: u64) -> Result<Option<State>, NatsError> {
        let stream = self
            .ensure_keyed(
                names::state_stream(queue),
                format!("outrigger-s.{}.>", names::escape(queue)),
            )
            .await?;
        match stream.direct_get_last_for_subject(self.state_subject(queue, seq)).await {
            Ok(found) => Ok(serde_json::from_slice(&found.payload).ok()),
            Err(_) => Ok(None),
        }
    }

    /// Keeps leased message `envelope.id` until `until`: its new envelope and attempt count
    /// in its state (confirmed), then a nak delayed to `until`. One copy of the message only.
    pub async fn park_message(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: super::UnixMillis,
    ) -> Result<(), NatsError> {
        let leased = self.take_lease(envelope.id.as_u128());
        let Some(message) = leased else { return Ok(()) };
        let info = message.info().map(|i| (i.delivered, i.stream_sequence)).unwrap_or((1, 0));
        let (delivered, seq) = info;
        let queue = envelope.queue.clone();
        let stream = self
            .ensure_keyed(
                names::state_stream(&queue),
                format!("outrigger-s.{}.>", names::escape(&queue)),
            )
            .await?;
        let subject = self.state_subject(&queue, seq);
        let state = State { envelope, attempts, until, delivered };
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: subject.clone(),
            cause,
        };
        let js = self.js().await?;
        let body = serde_json::to_vec(&state).expect("a state serializes");
        js.publish(subject.clone(), body.into())
            .await
            .map_err(|e| failed(e.into()))?
            .await
            .map_err(|e| failed(e.into()))?;
        let _ = stream;
        let now = crate::messaging::envelope::unix_millis(std::time::SystemTime::now());
        let delay = Duration::from_millis(until.saturating_sub(now));
        message.double_ack_with(jetstream::AckKind::Nak(Some(delay))).await.map_err(&failed)
    }

    /// Stores `envelope` in dead-letter queue `dlq` (its own stream, one subject per message
    /// id: dead-lettered again, it replaces its copy), then ends the original for good.
    pub async fn dead_letter_message(
        &self,
        envelope: Envelope,
        dlq: &str,
    ) -> Result<(), NatsError> {
        let subjects = format!("outrigger-dlq.{}.>", names::escape(dlq));
        self.ensure_keyed(names::dead_letter_stream(dlq), subjects).await?;
        let subject = format!("outrigger-dlq.{}.{}", names::escape(dlq), envelope.id);
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: subject.clone(),
            cause,
        };
        let js = self.js().await?;
        js.publish(subject.clone(), envelope.to_json().into())
            .await
            .map_err(|e| failed(e.into()))?
            .await
            .map_err(|e| failed(e.into()))?;
        let leased = self.take_lease(envelope.id.as_u128());
        if let Some(message) = leased {
            message.double_ack_with(jetstream::AckKind::Term).await.map_err(&failed)?;
        }
        Ok(())
    }

    /// Ends this process's lease of message `id`: the message, to settle.
    fn take_lease(&self, id: u128) -> Option<jetstream::Message> {
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }

    /// Dead-letter queue `dlq`'s stream, made when missing.
    async fn dead_letter_stream(&self, dlq: &str) -> Result<stream::Stream, NatsError> {
        let subjects = format!("outrigger-dlq.{}.>", names::escape(dlq));
        self.ensure_keyed(names::dead_letter_stream(dlq), subjects).await
    }

    fn dead_letter_subject(dlq: &str, id: MessageId) -> String {
        format!("outrigger-dlq.{}.{id}", names::escape(dlq))
    }

    /// Dead letter `id` of `dlq`, with its stream sequence.
    async fn find_dead_letter(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<Option<(u64, Envelope)>, NatsError> {
        let stream = self.dead_letter_stream(dlq).await?;
        match stream.direct_get_last_for_subject(Self::dead_letter_subject(dlq, id)).await {
            Ok(found) => Ok(Envelope::from_json(&found.payload).ok().map(|e| (found.sequence, e))),
            Err(_) => Ok(None),
        }
    }

    /// A page of `dlq`'s dead letters, newest first: the stream walked down from its last
    /// sequence (2.9 reads one message at a time, and has no reverse read).
    pub async fn list_dead_letters(
        &self,
        dlq: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<super::DeadLetterPage, NatsError> {
        let mut stream = self.dead_letter_stream(dlq).await?;
        let name = names::dead_letter_stream(dlq);
        let state = stream
            .info()
            .await
            .map_err(|e| NatsError::Stream { stream: name, cause: e.into() })?
            .state
            .clone();
        let mut seq = match before {
            None => state.last_sequence,
            Some(id) => match self.find_dead_letter(dlq, id).await? {
                Some((seq, _)) => seq.saturating_sub(1),
                None => return Ok(super::DeadLetterPage { messages: Vec::new(), next: None }),
            },
        };
        let mut messages = Vec::new();
        // deleted sequences are gaps: bounded, so a sparse stream cannot make one page endless
        let mut budget = 10 * limit + 100;
        while seq >= state.first_sequence.max(1) && messages.len() <= limit && budget > 0 {
            if let Ok(found) = stream.direct_get(seq).await
                && let Ok(envelope) = Envelope::from_json(&found.payload)
            {
                messages.push(envelope);
            }
            seq -= 1;
            budget -= 1;
        }
        let next = (messages.len() > limit).then(|| {
            messages.truncate(limit);
            messages.last().map(|e| e.id)
        });
        Ok(super::DeadLetterPage { messages, next: next.flatten() })
    }

    pub async fn delete_dead_letter(&self, dlq: &str, id: MessageId) -> Result<bool, NatsError> {
        let stream = self.dead_letter_stream(dlq).await?;
        let purged = stream.purge().filter(Self::dead_letter_subject(dlq, id)).await;
        let purged = purged.map_err(|e| NatsError::Stream {
            stream: names::dead_letter_stream(dlq),
            cause: e.into(),
        })?;
        Ok(purged.purged > 0)
    }

    pub async fn purge_dead_letters(&self, dlq: &str) -> Result<u64, NatsError> {
        let stream = self.dead_letter_stream(dlq).await?;
        let purged = stream.purge().await.map_err(|e| NatsError::Stream {
            stream: names::dead_letter_stream(dlq),
            cause: e.into(),
        })?;
        Ok(purged.purged)
    }

    /// Moves dead letters back to their queue: published again under `<id>.r<replays>` (the
    /// plain id is within the duplicate window), then removed from the dead-letter queue.
    pub async fn replay_dead_letters(
        &self,
        dlq: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, NatsError> {
        let mut replayed = Vec::new();
        for id in ids {
            let Some((_, mut envelope)) = self.find_dead_letter(dlq, id).await? else { continue };
            super::mark_replayed(&mut envelope, dlq, std::time::SystemTime::now());
            let queue = envelope.queue.clone();
            self.ensure(&queue).await?;
            let replays = envelope.metadata.get("replays").and_then(|r| r.as_u64()).unwrap_or(1);
            let subject = names::subject(&queue);
            let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
                subject: subject.clone(),
                cause,
            };
            let message = jetstream::message::PublishMessage::build()
                .payload(envelope.to_json().into())
                .message_id(format!("{id}.r{replays}"));
            let js = self.js().await?;
            js.send_publish(subject.clone(), message)
                .await
                .map_err(|e| failed(e.into()))?
                .await
                .map_err(|e| failed(e.into()))?;
            self.delete_dead_letter(dlq, id).await?;
            replayed.push(id);
        }
        Ok(replayed)
    }

    /// `queue` as this service's consumer sees it, and its dead-letter queue.
    pub async fn depth(&self, queue: &str, dlq: &str) -> Result<[super::QueueDepth; 2], NatsError> {
        let pull = self.ensure(queue).await?;
        let info = pull.get_info().await.map_err(|e| NatsError::Stream {
            stream: names::queue_stream(queue),
            cause: e.into(),
        })?;
        let waiting = info.num_pending + info.num_ack_pending as u64;
        let mut dead = self.dead_letter_stream(dlq).await?;
        let state = dead
            .info()
            .await
            .map_err(|e| NatsError::Stream {
                stream: names::dead_letter_stream(dlq),
                cause: e.into(),
            })?
            .state
            .clone();
        let oldest_dead = (state.messages > 0)
            .then(|| (state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as u64);
        Ok([
            super::QueueDepth {
                queue: queue.to_owned(),
                messages: waiting,
                dead_letters: 0,
                oldest_published_ms: None,
                oldest_dead_letter_ms: None,
            },
            super::QueueDepth {
                queue: dlq.to_owned(),
                messages: 0,
                dead_letters: state.messages,
                oldest_published_ms: None,
                oldest_dead_letter_ms: oldest_dead,
            },
        ])
    }

    /// Acknowledges message `id` (the server confirms it), and forgets the state a park left.
    pub async fn ack_message(&self, id: u128) -> Result<(), NatsError> {
        let leased = self.take_lease(id);
        let Some(message) = leased else { return Ok(()) };
        message
            .double_ack()
            .await
            .map_err(|cause| NatsError::Stream { stream: message.subject.to_string(), cause })?;
        let Ok(info) = message.info() else { return Ok(()) };
        if info.delivered > 1 {
            let queue = message.subject.trim_start_matches("outrigger.").to_owned();
            let stream = self
                .ensure_keyed(
                    names::state_stream(&queue),
                    format!("outrigger-s.{}.>", names::escape(&queue)),
                )
                .await?;
            // best effort: a state left behind is one small message, replaced if ever reused
            let _ = stream.purge().filter(self.state_subject(&queue, info.stream_sequence)).await;
        }
        Ok(())
    }

    /// Publishes `batch` to its queues' subjects, each with its id as `Nats-Msg-Id` (a message
    /// relayed again within the stream's duplicate window is stored once), and waits for every
    /// acknowledgement. A queue whose stream refuses holds back only its own messages.
    pub async fn relay(&self, batch: &[Envelope]) -> Result<(), Unrelayed> {
        let mut unrelayed: Option<Unrelayed> = None;
        let mut queues: Vec<&str> = batch.iter().map(|e| e.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        for queue in queues {
            let sent = self.relay_queue(queue, batch.iter().filter(|e| e.queue == queue)).await;
            if let Err(error) = sent {
                let error = super::BrokerError::Nats(std::sync::Arc::new(error));
                let failed =
                    unrelayed.get_or_insert_with(|| Unrelayed { queues: HashSet::new(), error });
                failed.queues.insert(queue.to_owned());
            }
        }
        unrelayed.map_or(Ok(()), Err)
    }

    async fn relay_queue<'a>(
        &self,
        queue: &str,
        batch: impl Iterator<Item = &'a Envelope>,
    ) -> Result<(), NatsError> {
        self.ensure(queue).await?;
        let js = self.js().await?;
        let subject = names::subject(queue);
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: subject.clone(),
            cause,
        };
        let mut acks = Vec::new();
        for envelope in batch {
            let message = jetstream::message::PublishMessage::build()
                .payload(envelope.to_json().into())
                .message_id(envelope.id.to_string());
            let ack =
                js.send_publish(subject.clone(), message).await.map_err(|e| failed(e.into()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| failed(e.into()))?;
        }
        Ok(())
    }
}

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Refuses an existing stream whose settings would break a promise; accepts more (replicas,
/// limits it does not reach).
fn check(name: &str, found: &stream::Config, wanted: &stream::Config) -> Result<(), NatsError> {
    let refuse = |field: &'static str, found: String, wanted: String| {
        Err(NatsError::Incompatible { stream: name.to_owned(), field, found, wanted })
    };
    if found.storage != wanted.storage {
        return refuse("storage", format!("{:?}", found.storage), format!("{:?}", wanted.storage));
    }
    if found.retention != wanted.retention {
        let (f, w) = (format!("{:?}", found.retention), format!("{:?}", wanted.retention));
        return refuse("retention", f, w);
    }
    if found.subjects != wanted.subjects {
        return refuse("subjects", found.subjects.join(","), wanted.subjects.join(","));
    }
    if found.duplicate_window < wanted.duplicate_window {
        let (f, w) = (found.duplicate_window, wanted.duplicate_window);
        return refuse("duplicate_window", format!("{f:?}"), format!("at least {w:?}"));
    }
    Ok(())
}

/// What a park leaves for the message's next delivery.
#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    envelope: Envelope,
    attempts: u32,
    until: super::UnixMillis,
    /// The message's delivery count when it was parked.
    delivered: i64,
}

/// A step of the broker not built yet (work in progress, issue 22).
fn not_built(what: &'static str) -> super::BrokerError {
    super::BrokerError::Nats(Arc::new(NatsError::NotBuilt(what)))
}

fn broker(error: NatsError) -> super::BrokerError {
    super::BrokerError::Nats(Arc::new(error))
}

impl super::Remote for Nats {
    async fn relay(&self, batch: &[Envelope]) -> Result<(), Unrelayed> {
        Nats::relay(self, batch).await
    }

    fn system(&self) -> &'static str {
        "nats"
    }
}

impl super::Queue for Nats {
    async fn read(
        &self,
        queue: &str,
        _consumer: &str,
        read: super::Read,
    ) -> Result<Vec<super::Leased>, super::BrokerError> {
        if read.ordered {
            // refused by `validate` too: one key at a time across replicas is not built here
            return Err(not_built("ordered: true"));
        }
        let wait = read.wait.then_some(READ_BLOCK);
        self.read_messages(queue, read.max, wait).await.map_err(broker)
    }

    fn blocks_on_read(&self) -> bool {
        true
    }

    async fn next_due(
        &self,
        _queue: &str,
        _now: super::UnixMillis,
    ) -> Result<Option<super::UnixMillis>, super::BrokerError> {
        // the server times redeliveries itself
        Ok(None)
    }

    async fn ack(&self, _queue: &str, id: MessageId) -> Result<(), super::BrokerError> {
        self.ack_message(id.as_u128()).await.map_err(broker)
    }

    async fn park(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: super::UnixMillis,
    ) -> Result<(), super::BrokerError> {
        self.park_message(envelope, attempts, until).await.map_err(broker)
    }

    async fn dead_letter(
        &self,
        envelope: Envelope,
        dead_letter_queue: &str,
    ) -> Result<(), super::BrokerError> {
        self.dead_letter_message(envelope, dead_letter_queue).await.map_err(broker)
    }

    async fn dead_letters(
        &self,
        dead_letter_queue: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<super::DeadLetterPage, super::BrokerError> {
        self.list_dead_letters(dead_letter_queue, before, limit).await.map_err(broker)
    }

    async fn dead_letter_get(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, super::BrokerError> {
        let found = self.find_dead_letter(dead_letter_queue, id).await.map_err(broker)?;
        Ok(found.map(|(_, envelope)| envelope))
    }

    async fn dead_letter_delete(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<bool, super::BrokerError> {
        self.delete_dead_letter(dead_letter_queue, id).await.map_err(broker)
    }

    async fn dead_letter_purge(&self, dead_letter_queue: &str) -> Result<u64, super::BrokerError> {
        self.purge_dead_letters(dead_letter_queue).await.map_err(broker)
    }

    async fn dead_letter_replay(
        &self,
        dead_letter_queue: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, super::BrokerError> {
        self.replay_dead_letters(dead_letter_queue, ids).await.map_err(broker)
    }

    async fn depths(
        &self,
        lanes: &[super::Lane],
    ) -> Result<Vec<super::QueueDepth>, super::BrokerError> {
        let mut depths: Vec<super::QueueDepth> = Vec::new();
        for lane in lanes {
            let found = self.depth(&lane.queue, &lane.dead_letter_queue).await.map_err(broker)?;
            for depth in found {
                // a dead-letter queue fed by several lanes is one stream: counted once
                if !depths.iter().any(|d| d.queue == depth.queue) {
                    depths.push(depth);
                }
            }
        }
        Ok(depths)
    }
}
