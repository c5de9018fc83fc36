//! The `nats://` broker: NATS JetStream (issue 22). **Work in progress, not wired to the
//! config yet**: the connection, each queue's stream made (or an existing one checked), and the
//! relay. The queue side (reads through a durable pull consumer, park as a state subject plus a
//! nak with delay, dead letters, ordering) follows docs/design/nats-jetstream.md.

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
            let message = message.map_err(|e| failed(e))?;
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
        let leased = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&envelope.id.as_u128());
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
        message
            .double_ack_with(jetstream::AckKind::Nak(Some(delay)))
            .await
            .map_err(|cause| failed(cause))
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
        let leased = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&envelope.id.as_u128());
        if let Some(message) = leased {
            message
                .double_ack_with(jetstream::AckKind::Term)
                .await
                .map_err(|cause| failed(cause))?;
        }
        Ok(())
    }

    /// Acknowledges message `id` (the server confirms it), and forgets the state a park left.
    pub async fn ack_message(&self, id: u128) -> Result<(), NatsError> {
        let leased = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
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
        _dead_letter_queue: &str,
        _before: Option<MessageId>,
        _limit: usize,
    ) -> Result<super::DeadLetterPage, super::BrokerError> {
        Err(not_built("dead letters"))
    }

    async fn dead_letter_get(
        &self,
        _dead_letter_queue: &str,
        _id: MessageId,
    ) -> Result<Option<Envelope>, super::BrokerError> {
        Err(not_built("dead letters"))
    }

    async fn dead_letter_delete(
        &self,
        _dead_letter_queue: &str,
        _id: MessageId,
    ) -> Result<bool, super::BrokerError> {
        Err(not_built("dead letters"))
    }

    async fn dead_letter_purge(&self, _dead_letter_queue: &str) -> Result<u64, super::BrokerError> {
        Err(not_built("dead letters"))
    }

    async fn dead_letter_replay(
        &self,
        _dead_letter_queue: &str,
        _ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, super::BrokerError> {
        Err(not_built("dead letters"))
    }

    async fn depths(
        &self,
        _lanes: &[super::Lane],
    ) -> Result<Vec<super::QueueDepth>, super::BrokerError> {
        Ok(Vec::new())
    }
}
