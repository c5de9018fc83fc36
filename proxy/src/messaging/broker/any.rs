//! The queue the sidecar runs, and the remote broker it relays to, whichever broker it is: the
//! one `match` on the broker, and the one place a remote broker is made from the config.

use outrigger_config as config;

use super::embedded::{Embedded, Retention};
use super::nats::Nats;
use super::redis::{self, Redis};
use super::{
    BrokerError, DeadLetterPage, Lane, Leased, Queue, QueueDepth, Read, Remote, UnixMillis,
    Unrelayed,
};
use crate::messaging::envelope::{Envelope, MessageId};

/// The configured queue: the embedded store (`broker: embedded`) or Redis Streams.
#[derive(Debug, Clone)]
pub enum AnyQueue {
    Embedded(Embedded),
    Redis(Redis),
    Nats(Nats),
}

/// `$call` on whichever queue `$self` holds, bound to `$q`.
macro_rules! on_each {
    ($self:ident, $q:ident => $call:expr) => {
        match $self {
            AnyQueue::Embedded($q) => $call,
            AnyQueue::Redis($q) => $call,
            AnyQueue::Nats($q) => $call,
        }
    };
}

impl Queue for AnyQueue {
    async fn read(
        &self,
        queue: &str,
        consumer: &str,
        read: Read,
    ) -> Result<Vec<Leased>, BrokerError> {
        on_each!(self, q => q.read(queue, consumer, read).await)
    }

    fn blocks_on_read(&self) -> bool {
        on_each!(self, q => q.blocks_on_read())
    }

    fn messaging_system(&self) -> &'static str {
        on_each!(self, q => q.messaging_system())
    }

    async fn tidy(&self, queue: &str) -> Result<u64, BrokerError> {
        on_each!(self, q => q.tidy(queue).await)
    }

    async fn next_due(
        &self,
        queue: &str,
        now: UnixMillis,
    ) -> Result<Option<UnixMillis>, BrokerError> {
        on_each!(self, q => q.next_due(queue, now).await)
    }

    async fn ack(&self, queue: &str, id: MessageId) -> Result<(), BrokerError> {
        on_each!(self, q => q.ack(queue, id).await)
    }

    async fn park(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: UnixMillis,
    ) -> Result<(), BrokerError> {
        on_each!(self, q => q.park(envelope, attempts, until).await)
    }

    async fn dead_letter(
        &self,
        envelope: Envelope,
        dead_letter_queue: &str,
    ) -> Result<(), BrokerError> {
        on_each!(self, q => q.dead_letter(envelope, dead_letter_queue).await)
    }

    async fn dead_letters(
        &self,
        dead_letter_queue: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        on_each!(self, q => q.dead_letters(dead_letter_queue, before, limit).await)
    }

    async fn dead_letter_get(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        on_each!(self, q => q.dead_letter_get(dead_letter_queue, id).await)
    }

    async fn dead_letter_delete(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> Result<bool, BrokerError> {
        on_each!(self, q => q.dead_letter_delete(dead_letter_queue, id).await)
    }

    async fn dead_letter_purge(&self, dead_letter_queue: &str) -> Result<u64, BrokerError> {
        on_each!(self, q => q.dead_letter_purge(dead_letter_queue).await)
    }

    async fn dead_letter_replay(
        &self,
        dead_letter_queue: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, BrokerError> {
        on_each!(self, q => q.dead_letter_replay(dead_letter_queue, ids).await)
    }

    async fn depths(&self, lanes: &[Lane]) -> Result<Vec<QueueDepth>, BrokerError> {
        on_each!(self, q => q.depths(lanes).await)
    }
}

/// The configured remote broker: Redis Streams (one server or a cluster), or NATS JetStream.
#[derive(Debug, Clone)]
pub enum AnyRemote {
    Redis(Redis),
    Nats(Nats),
}

impl AnyRemote {
    /// The remote broker `messaging.broker` names, for consumer group `service`; `None` for
    /// `embedded`.
    pub fn from_config(
        cfg: &config::Messaging,
        service: &str,
        retention: Retention,
    ) -> Result<Option<Self>, redis::ConnectError> {
        let settings = || redis::Settings {
            claim_idle: cfg.claim_idle.get(),
            dedup_window: cfg.dedup_window.get(),
            retention,
            lanes: Lane::all(&cfg.subscriptions),
        };
        Ok(match &cfg.broker {
            config::Broker::Embedded => None,
            config::Broker::Redis(url) => Some(AnyRemote::Redis(Redis::new(
                url.as_str(),
                cfg.tls.as_ref(),
                service,
                settings(),
            )?)),
            config::Broker::RedisCluster(url) => {
                Some(AnyRemote::Redis(Redis::cluster(url.nodes(), service, settings())))
            }
            config::Broker::Nats(url) => Some(AnyRemote::Nats(Nats::new(
                url.servers(),
                url.tls().then(|| cfg.tls.clone()),
                service,
                cfg.claim_idle.get(),
                cfg.dedup_window.get(),
                retention,
            ))),
        })
    }

    /// Whether the broker answers (`outrigger check`): Redis's PING, JetStream's account info.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        match self {
            AnyRemote::Redis(redis) => redis.ping().await,
            AnyRemote::Nats(nats) => {
                nats.ping().await.map_err(|e| BrokerError::Nats(std::sync::Arc::new(e)))
            }
        }
    }

    /// The same broker as the queue deliveries read from.
    pub fn queue(&self) -> AnyQueue {
        match self {
            AnyRemote::Redis(redis) => AnyQueue::Redis(redis.clone()),
            AnyRemote::Nats(nats) => AnyQueue::Nats(nats.clone()),
        }
    }
}

impl Remote for AnyRemote {
    async fn relay(&self, batch: &[Envelope]) -> Result<(), Unrelayed> {
        match self {
            AnyRemote::Redis(redis) => redis.relay(batch).await,
            AnyRemote::Nats(nats) => Remote::relay(nats, batch).await,
        }
    }

    fn system(&self) -> &'static str {
        match self {
            AnyRemote::Redis(redis) => redis.system(),
            AnyRemote::Nats(nats) => nats.system(),
        }
    }

    fn refuses(&self, queue: &config::QueueName) -> Option<&'static str> {
        match self {
            AnyRemote::Redis(redis) => redis.refuses(queue),
            AnyRemote::Nats(nats) => nats.refuses(queue),
        }
    }
}
