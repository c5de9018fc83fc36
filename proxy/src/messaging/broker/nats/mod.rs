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
//! - Ordering keys: a keyed message goes to its key's own subject; each consumer group keeps
//!   its place in each key in the state stream, changed by compare and set (`order.rs`).

mod names;
mod order;

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
/// How many settled messages one upkeep round deletes from a stream, on a server whose purge
/// cannot be used (before 2.9.15).
const TIDY_DELETES_PER_ROUND: u64 = 10_000;
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
    #[error(
        "nats: consumer {consumer} of stream {stream} exists with {field} {found}, and Outrigger \
         needs {wanted}: change or remove the consumer (Outrigger never changes one it did not \
         make that way)"
    )]
    IncompatibleConsumer {
        stream: String,
        consumer: String,
        field: &'static str,
        found: String,
        wanted: String,
    },
    #[error(
        "nats: {subject} was changed by other replicas {TRIES} times in a row while this one \
         tried to change it; the message is read again later",
        TRIES = 64
    )]
    Contended { subject: String },
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
    /// `nats+tls://`: TLS required, with `messaging.tls`'s files when given.
    tls: Option<Option<outrigger_config::Tls>>,
    /// Made at first use: NATS being down at startup is not an error.
    js: OnceCell<jetstream::Context>,
    /// The durable consumer: `service.name`.
    group: String,
    claim_idle: Duration,
    dedup_window: Duration,
    /// How many dead letters each dead-letter stream keeps, and how long.
    retention: super::embedded::Retention,
    /// Each queue's stream and consumer, once made or checked.
    streams: Mutex<HashMap<String, Opened>>,
    /// Outrigger's own streams (state, dead letters), once made.
    own: Mutex<HashMap<String, stream::Stream>>,
    /// Messages handed to this process, until settled.
    leases: Mutex<HashMap<u128, Lease>>,
}

/// A queue's stream and this service's consumer on it.
#[derive(Clone)]
struct Opened {
    stream: stream::Stream,
    consumer: consumer::PullConsumer,
}

/// A message handed to this process.
struct Lease {
    queue: String,
    message: jetstream::Message,
    /// Read for an ordered subscription: settling it gives its key's turn to the next message.
    ordered: bool,
}

impl Lease {
    fn keyed(&self) -> Option<order::Keyed<'_>> {
        let seq = self.message.info().map(|i| i.stream_sequence).ok()?;
        order::Keyed::of(&self.queue, &self.message, seq).filter(|_| self.ordered)
    }
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").field("group", &self.inner.group).finish_non_exhaustive()
    }
}

impl Nats {
    /// A broker on `servers` (`nats://` URLs, `tls://` for TLS with `tls`'s files) for
    /// durable consumer `group`.
    pub fn new(
        servers: Vec<String>,
        tls: Option<Option<outrigger_config::Tls>>,
        group: &str,
        claim_idle: Duration,
        dedup_window: Duration,
        retention: super::embedded::Retention,
    ) -> Self {
        let servers = servers.iter().filter_map(|s| s.parse().ok()).collect();
        Nats {
            inner: Arc::new(Inner {
                servers,
                tls,
                js: OnceCell::new(),
                group: group.to_owned(),
                claim_idle,
                dedup_window,
                retention,
                streams: Mutex::default(),
                own: Mutex::default(),
                leases: Mutex::default(),
            }),
        }
    }

    /// The JetStream context, connected at first use (the client reconnects by itself after).
    async fn js(&self) -> Result<&jetstream::Context, NatsError> {
        self.inner
            .js
            .get_or_try_init(|| async {
                let mut options = async_nats::ConnectOptions::new()
                    .connection_timeout(REQUEST_TIMEOUT)
                    .request_timeout(Some(REQUEST_TIMEOUT));
                if let Some(files) = &self.inner.tls {
                    options = options.require_tls(true);
                    let files = files.as_ref();
                    if let Some(ca) = files.and_then(|f| f.ca_file.clone()) {
                        options = options.add_root_certificates(ca);
                    }
                    if let Some((cert, key)) =
                        files.and_then(|f| f.cert_file.clone().zip(f.key_file.clone()))
                    {
                        options = options.add_client_certificate(cert, key);
                    }
                }
                let client = options
                    .connect(self.inner.servers.clone())
                    .await
                    .map_err(NatsError::Connect)?;
                Ok(jetstream::new(client))
            })
            .await
    }

    /// Whether JetStream answers: the account's info, asked for (`outrigger check`).
    pub async fn ping(&self) -> Result<(), NatsError> {
        let js = self.js().await?;
        let asked = js.query_account().await;
        asked
            .map(drop)
            .map_err(|e| NatsError::Stream { stream: "(account)".into(), cause: e.into() })
    }

    /// The stream `queue`'s messages go to, as Outrigger needs it: made if missing, refused
    /// (never changed) if it exists with settings that would break a promise; and this
    /// service's durable consumer on it, made if missing (on 2.9 a "create" would silently
    /// change an existing one, so it is looked up first).
    async fn ensure(&self, queue: &str) -> Result<Opened, NatsError> {
        if let Some(found) = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner()).get(queue)
        {
            return Ok(found.clone());
        }
        let js = self.js().await?;
        let name = names::queue_stream(queue);
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![names::subject(queue), names::key_subjects(queue)],
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
        let wanted = consumer::pull::Config {
            durable_name: Some(group.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.inner.claim_idle,
            max_deliver: -1,
            max_ack_pending: -1,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        // looked up first: on 2.9 a "create" of an existing durable silently changes it
        match stream.consumer_info(&group).await {
            Ok(found) => check_consumer(&name, &group, &found.config, &wanted)?,
            Err(error) if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                stream.create_consumer(wanted).await.map_err(|e| failed(e.into()))?;
            }
            Err(error) => return Err(failed(error.into())),
        }
        let consumer = stream.get_consumer(&group).await.map_err(failed)?;
        let opened = Opened { stream, consumer };
        let mut streams = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(queue.to_owned(), opened.clone());
        Ok(opened)
    }

    /// A stream of Outrigger's own (parked messages' state, a dead-letter queue): one message
    /// per subject, made when missing. With `limits` (a dead-letter queue's retention: how
    /// many, how old), an existing stream whose limits differ is given these: the stream is
    /// Outrigger's, and the configured retention is what a user expects to hold.
    async fn ensure_keyed(
        &self,
        name: String,
        subjects: String,
        limits: Option<(u64, Duration)>,
    ) -> Result<stream::Stream, NatsError> {
        if let Some(found) = self.inner.own.lock().unwrap_or_else(|e| e.into_inner()).get(&name) {
            return Ok(found.clone());
        }
        let js = self.js().await?;
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: name.clone(),
            cause,
        };
        let mut config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects],
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        };
        if let Some((max_messages, max_age)) = limits {
            config.max_messages = i64::try_from(max_messages).unwrap_or(i64::MAX);
            config.max_age = max_age;
            // the server wants the duplicate window within max_age (2 minutes by default)
            config.duplicate_window = max_age.min(Duration::from_secs(120));
        }
        let mut made =
            js.get_or_create_stream(config.clone()).await.map_err(|e| failed(e.into()))?;
        let found = made.info().await.map_err(|e| failed(e.into()))?.config.clone();
        if !found.allow_direct {
            let (field, wanted) = ("allow_direct", "true".to_owned());
            return Err(NatsError::Incompatible {
                stream: name,
                field,
                found: "false".into(),
                wanted,
            });
        }
        if limits.is_some()
            && (found.max_messages, found.max_age) != (config.max_messages, config.max_age)
        {
            tracing::info!(stream = %name, max_messages = config.max_messages, max_age = ?config.max_age, "the dead-letter stream takes messaging.dead_letter_retention");
            let updated = stream::Config {
                duplicate_window: found.duplicate_window.min(config.max_age),
                ..found.clone()
            };
            let updated = stream::Config {
                max_messages: config.max_messages,
                max_age: config.max_age,
                ..updated
            };
            js.update_stream(updated).await.map_err(|e| failed(e.into()))?;
        }
        let mut own = self.inner.own.lock().unwrap_or_else(|e| e.into_inner());
        own.insert(name.clone(), made.clone());
        Ok(made)
    }

    /// Queue `queue`'s state stream: parked messages' state, and each group's place in each
    /// ordering key.
    async fn state_stream(&self, queue: &str) -> Result<stream::Stream, NatsError> {
        let subjects = format!("outrigger-s.{}.>", names::escape(queue));
        self.ensure_keyed(names::state_stream(queue), subjects, None).await
    }

    /// The subject of the state of queue `queue`'s message at stream sequence `seq`.
    fn state_subject(&self, queue: &str, seq: u64) -> String {
        format!("outrigger-s.{}.r.{}.{seq}", names::escape(queue), names::escape(&self.inner.group))
    }

    /// Up to `max` messages of `queue` for this service's consumer, leased to this process;
    /// waiting up to `wait` for the first. With `ordered`, a message whose key has an older
    /// unsettled message waits for its turn instead.
    pub async fn read_messages(
        &self,
        queue: &str,
        max: usize,
        wait: Option<Duration>,
        ordered: bool,
    ) -> Result<Vec<super::Leased>, NatsError> {
        let pull = self.ensure(queue).await?.consumer;
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
        let mut failure = None;
        // drained to the end: a batch dropped early strands its messages until ack_wait; one
        // message that fails (a timeout, a contended key) holds back only itself
        while let Some(message) = batch.next().await {
            let taken = match message {
                Ok(message) => self.take_in(queue, message, ordered).await,
                Err(error) => Err(failed(error)),
            };
            match taken {
                Ok(Some(leased)) => found.push(leased),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(queue, error = %crate::error::chain(&error), "a message read from NATS is left for its redelivery");
                    failure.get_or_insert(error);
                }
            }
        }
        match (found.is_empty(), failure) {
            (true, Some(error)) => Err(error),
            _ => Ok(found),
        }
    }

    /// One delivered message: leased and handed on, or (ordered) put back until its key's turn,
    /// or acknowledged when settled already; `None` when it does not go to the app now.
    async fn take_in(
        &self,
        queue: &str,
        message: jetstream::Message,
        ordered: bool,
    ) -> Result<Option<super::Leased>, NatsError> {
        let failed = |cause| NatsError::Stream { stream: names::queue_stream(queue), cause };
        let (delivered, seq) =
            message.info().map(|i| (i.delivered, i.stream_sequence)).unwrap_or((1, 0));
        let keyed = order::Keyed::of(queue, &message, seq).filter(|_| ordered);
        let mut envelope = match Envelope::from_json(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                // not Outrigger's: ended for this group (it stays in the stream to be looked
                // at), and its key's turn passes on, or the key would wait for ever
                tracing::error!(queue, seq, %error, "a message on NATS is not an envelope; it is terminated for this consumer group");
                if let Some(keyed) = &keyed {
                    self.end_turn(keyed).await?;
                }
                let term = message.double_ack_with(jetstream::AckKind::Term).await;
                term.map_err(failed)?;
                return Ok(None);
            }
        };
        let mut attempts = u32::try_from(delivered - 1).unwrap_or(u32::MAX);
        if delivered > 1 {
            // parked before: its last envelope and attempt count are in its state
            if let Some(state) = self.state_of(queue, seq).await? {
                let since = delivered - state.delivered - 1;
                attempts = state.attempts.saturating_add(since.try_into().unwrap_or(0));
                envelope = state.envelope;
            }
        }
        if let Some(keyed) = &keyed {
            match self.take_turn(keyed).await? {
                order::Turn::Yours => {}
                order::Turn::Settled => {
                    message.double_ack().await.map_err(failed)?;
                    return Ok(None);
                }
                order::Turn::NotYet => {
                    let state = State::waiting(envelope, attempts, delivered);
                    self.wait(keyed, &message, state).await?;
                    return Ok(None);
                }
                order::Turn::Held => {
                    // back once the holder settles it (then skipped) or is gone
                    let state = State::waiting(envelope, attempts, delivered);
                    self.save_state(queue, seq, &state).await?;
                    let later = jetstream::AckKind::Nak(Some(self.inner.claim_idle));
                    message.double_ack_with(later).await.map_err(failed)?;
                    return Ok(None);
                }
            }
        }
        let id = envelope.id.as_u128();
        let lease = Lease { queue: queue.to_owned(), message, ordered };
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).insert(id, lease);
        Ok(Some(super::Leased { envelope, attempts }))
    }

    /// The state a park (or a wait for its key's turn) left for queue `queue`'s message at
    /// `seq`, if any. Read from the stream's leader: a direct get may be answered by a
    /// follower of a replicated stream that has not yet applied the state just confirmed.
    async fn state_of(&self, queue: &str, seq: u64) -> Result<Option<State>, NatsError> {
        let stream = self.state_stream(queue).await?;
        match stream.get_last_raw_message_by_subject(&self.state_subject(queue, seq)).await {
            Ok(found) => Ok(serde_json::from_slice(&found.payload).ok()),
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => {
                Err(NatsError::Stream { stream: names::state_stream(queue), cause: error.into() })
            }
        }
    }

    /// Writes `state` for `message` (confirmed), so its next delivery knows its envelope and
    /// attempt count.
    async fn save_state(&self, queue: &str, seq: u64, state: &State) -> Result<(), NatsError> {
        self.state_stream(queue).await?;
        let subject = self.state_subject(queue, seq);
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: subject.clone(),
            cause,
        };
        let js = self.js().await?;
        let body = serde_json::to_vec(state).expect("a state serializes");
        js.publish(subject.clone(), body.into())
            .await
            .map_err(|e| failed(e.into()))?
            .await
            .map_err(|e| failed(e.into()))?;
        Ok(())
    }

    /// Puts back a delivery whose key's turn has not come: its state kept (a wait is not an
    /// attempt), nak'd with a safety delay (`claim_idle`, should the release be lost), then
    /// noted as waiting, for the key's settle to nak it again with no delay.
    async fn wait(
        &self,
        keyed: &order::Keyed<'_>,
        message: &jetstream::Message,
        state: State,
    ) -> Result<(), NatsError> {
        let failed = |cause| NatsError::Stream { stream: names::queue_stream(keyed.queue), cause };
        self.save_state(keyed.queue, keyed.seq, &state).await?;
        let delay = jetstream::AckKind::Nak(Some(self.inner.claim_idle));
        message.double_ack_with(delay).await.map_err(failed)?;
        match &message.reply {
            Some(reply) => self.wait_turn(keyed, reply).await,
            None => Ok(()),
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
        let Some(lease) = leased else { return Ok(()) };
        if let Some(keyed) = lease.keyed() {
            // its retry is handed to an app again; the key's later messages still wait
            self.drop_hold(&keyed).await?;
        }
        let Lease { queue, message, .. } = lease;
        let info = message.info().map(|i| (i.delivered, i.stream_sequence)).unwrap_or((1, 0));
        let (delivered, seq) = info;
        self.save_state(&queue, seq, &State { envelope, attempts, until, delivered }).await?;
        let now = crate::messaging::envelope::unix_millis(std::time::SystemTime::now());
        let delay = Duration::from_millis(until.saturating_sub(now));
        let nak = message.double_ack_with(jetstream::AckKind::Nak(Some(delay))).await;
        nak.map_err(|cause| NatsError::Stream { stream: names::queue_stream(&queue), cause })
    }

    /// Stores `envelope` in dead-letter queue `dlq` (its own stream, one subject per message
    /// id: dead-lettered again, it replaces its copy), then ends the original for good.
    pub async fn dead_letter_message(
        &self,
        envelope: Envelope,
        dlq: &str,
    ) -> Result<(), NatsError> {
        self.dead_letter_stream(dlq).await?;
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
        if let Some(lease) = leased {
            // it gives up its key's turn once its dead letter is stored
            if let Some(keyed) = lease.keyed() {
                self.end_turn(&keyed).await?;
            }
            lease.message.double_ack_with(jetstream::AckKind::Term).await.map_err(&failed)?;
        }
        Ok(())
    }

    /// Ends this process's lease of message `id`: the message, to settle.
    fn take_lease(&self, id: u128) -> Option<Lease> {
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }

    /// Dead-letter queue `dlq`'s stream, made when missing.
    async fn dead_letter_stream(&self, dlq: &str) -> Result<stream::Stream, NatsError> {
        let subjects = format!("outrigger-dlq.{}.>", names::escape(dlq));
        let limits = (
            self.inner.retention.max_messages,
            Duration::from_millis(self.inner.retention.max_age_ms),
        );
        self.ensure_keyed(names::dead_letter_stream(dlq), subjects, Some(limits)).await
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
        let mut pull = self.ensure(queue).await?.consumer;
        let info = pull.info().await.map_err(|e| NatsError::Stream {
            stream: names::queue_stream(queue),
            cause: e.into(),
        })?;
        let waiting = info.num_pending + info.num_ack_pending as u64;
        // the first message above the ack floor is unsettled by definition: the oldest waiting
        let floor = info.ack_floor.stream_sequence;
        let oldest = match waiting {
            0 => None,
            _ => self
                .ensure(queue)
                .await?
                .stream
                .direct_get_next_for_subject(">", Some(floor + 1))
                .await
                .ok(),
        };
        let oldest_published = oldest.map(|m| (m.time.unix_timestamp_nanos() / 1_000_000) as u64);
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
                oldest_published_ms: oldest_published,
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

    /// Removes from `queue`'s stream what every consumer group reading it has settled: the
    /// messages at or below the lowest ack floor (as Redis's XTRIM MINID). A stream no group
    /// reads yet is left whole, for the group that comes.
    pub async fn tidy_queue(&self, queue: &str) -> Result<u64, NatsError> {
        let stream = self.ensure(queue).await?.stream;
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: names::queue_stream(queue),
            cause,
        };
        let mut floor: Option<u64> = None;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let settled = info.map_err(|e| failed(e.into()))?.ack_floor.stream_sequence;
            floor = Some(floor.map_or(settled, |f| f.min(settled)));
        }
        let Some(floor) = floor.filter(|f| *f > 0) else { return Ok(0) };
        let version = self.js().await?.client().server_info().version;
        if purge_keeps_pending(&version) {
            let purged = stream.purge().sequence(floor + 1).await.map_err(|e| failed(e.into()))?;
            return Ok(purged.purged);
        }
        // before 2.9.15 a purge forgets every consumer's unacknowledged messages (in flight or
        // parked: never redelivered), so settled messages are deleted one at a time instead
        let mut info = stream.clone();
        let first = info.info().await.map_err(|e| failed(e.into()))?.state.first_sequence;
        let mut deleted = 0;
        for seq in first..=floor.min(first.saturating_add(TIDY_DELETES_PER_ROUND - 1)) {
            match stream.delete_message(seq).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                // a gap (deleted before): nothing to do
                Err(error) if error.to_string().contains("no message found") => {}
                Err(error) => return Err(failed(error.into())),
            }
        }
        Ok(deleted)
    }

    /// Acknowledges message `id` (the server confirms it), and forgets the state a park left.
    /// A keyed message of an ordered subscription gives its key's turn to the next first.
    pub async fn ack_message(&self, id: u128) -> Result<(), NatsError> {
        let leased = self.take_lease(id);
        let Some(lease) = leased else { return Ok(()) };
        if let Some(keyed) = lease.keyed() {
            self.end_turn(&keyed).await?;
        }
        let Lease { queue, message, .. } = lease;
        let acked = message.double_ack().await;
        acked.map_err(|cause| NatsError::Stream { stream: names::queue_stream(&queue), cause })?;
        let Ok(info) = message.info() else { return Ok(()) };
        if info.delivered > 1 {
            let stream = self.state_stream(&queue).await?;
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
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: names::subject(queue),
            cause,
        };
        let mut acks = Vec::new();
        for envelope in batch {
            // a keyed message goes to its key's subject, where an ordered reader finds its turn
            let key = envelope.metadata.get("ordering_key").and_then(|k| k.as_str());
            let subject =
                key.map_or_else(|| names::subject(queue), |k| names::key_subject(queue, k));
            let message = jetstream::message::PublishMessage::build()
                .payload(envelope.to_json().into())
                .message_id(envelope.id.to_string());
            let ack = js.send_publish(subject, message).await.map_err(|e| failed(e.into()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| failed(e.into()))?;
        }
        Ok(())
    }
}

/// Whether a purge of nats-server `version` (`2.9.10`) keeps consumers' unacknowledged
/// messages above the purged sequences: from 2.9.15 on (2.9.10 to 2.9.14 forget them all).
fn purge_keeps_pending(version: &str) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (2, 9, 15)
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
    if !found.allow_direct {
        // the dead-letter API and the age gauge read by direct get (what must be fresh, a
        // parked message's state and the ordering records, is read from the leader)
        return refuse("allow_direct", "false".into(), "true".into());
    }
    if found.duplicate_window < wanted.duplicate_window {
        let (f, w) = (found.duplicate_window, wanted.duplicate_window);
        return refuse("duplicate_window", format!("{f:?}"), format!("at least {w:?}"));
    }
    Ok(())
}

/// Refuses an existing durable consumer whose settings would break a promise: acks that are
/// not explicit, a filter (messages skipped), a push consumer, a delivery cap (the server
/// would stop redelivering before `max_attempts`), an ack-pending cap (parked messages count
/// toward it: delivery would stall). Another `ack_wait` is only logged: the replicas share it.
fn check_consumer(
    stream: &str,
    name: &str,
    found: &consumer::Config,
    wanted: &consumer::pull::Config,
) -> Result<(), NatsError> {
    let refuse = |field: &'static str, found: String, wanted: &str| {
        Err(NatsError::IncompatibleConsumer {
            stream: stream.to_owned(),
            consumer: name.to_owned(),
            field,
            found,
            wanted: wanted.to_owned(),
        })
    };
    if found.ack_policy != wanted.ack_policy {
        return refuse("ack_policy", format!("{:?}", found.ack_policy), "Explicit");
    }
    if let Some(subject) = &found.deliver_subject {
        return refuse("deliver_subject", subject.clone(), "none (a pull consumer)");
    }
    if !found.filter_subject.is_empty() {
        return refuse("filter_subject", found.filter_subject.clone(), "none");
    }
    if found.max_deliver > 0 {
        return refuse("max_deliver", found.max_deliver.to_string(), "-1 (unlimited)");
    }
    if found.max_ack_pending > 0 {
        return refuse("max_ack_pending", found.max_ack_pending.to_string(), "-1 (unlimited)");
    }
    if found.ack_wait != wanted.ack_wait {
        tracing::warn!(stream, consumer = name, found = ?found.ack_wait, claim_idle = ?wanted.ack_wait, "the durable consumer's ack_wait differs from messaging.claim_idle; the consumer's is used (the replicas share it)");
    }
    Ok(())
}

/// What a park, or a wait for its key's turn, leaves for the message's next delivery.
#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    envelope: Envelope,
    attempts: u32,
    until: super::UnixMillis,
    /// The message's delivery count when it was parked.
    delivered: i64,
}

impl State {
    /// A delivery put back until its key's turn: not an attempt.
    fn waiting(envelope: Envelope, attempts: u32, delivered: i64) -> State {
        let now = crate::messaging::envelope::unix_millis(std::time::SystemTime::now());
        State { envelope, attempts, until: now, delivered }
    }
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

    fn refuses(&self, queue: &outrigger_config::QueueName) -> Option<&'static str> {
        (!queue.is_nats_subject()).then_some(
            "with broker nats:// each '.' starts a subject token, and NATS refuses an empty one: \
             no leading or trailing '.', no '..'",
        )
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
        self.read_messages(queue, read.max, wait, read.ordered).await.map_err(broker)
    }

    fn blocks_on_read(&self) -> bool {
        true
    }

    fn messaging_system(&self) -> &'static str {
        "nats"
    }

    async fn tidy(&self, queue: &str) -> Result<u64, super::BrokerError> {
        self.tidy_queue(queue).await.map_err(broker)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_without_direct_get_is_refused() {
        let wanted = stream::Config {
            name: "OUTRIGGER-Q-orders".into(),
            subjects: vec!["outrigger.orders".into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            allow_direct: true,
            ..Default::default()
        };
        assert!(check("OUTRIGGER-Q-orders", &wanted, &wanted).is_ok());
        let found = stream::Config { allow_direct: false, ..wanted.clone() };
        let refused = check("OUTRIGGER-Q-orders", &found, &wanted).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("exists with allow_direct false, and Outrigger needs true"),
            "{refused}"
        );
    }

    #[test]
    fn a_purge_is_used_only_on_servers_that_keep_consumers_pending_messages() {
        for (version, keeps) in [
            ("2.9.10", false),
            ("2.9.14", false),
            ("2.9.15", true),
            ("2.10.0", true),
            ("2.11.0-RC.1", true),
            ("3.0.0", true),
            ("garbage", false),
        ] {
            assert_eq!(purge_keeps_pending(version), keeps, "{version}");
        }
    }
}
