//! `messaging:`: the broker, the outbox's memory, and the subscriptions whose messages are
//! delivered to the app. Subscriptions need `service.app` (checked in `validate`); their
//! retries share `Backoff` with HTTP but default slower.

use super::{Backoff, Tls};
use crate::types::{Broker, Duration, PostgresUrl, QueueName, TableName};
use serde::de::{MapAccess, Visitor, value::MapAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Messaging {
    pub broker: Broker,
    /// Redis: a replica's unacknowledged message is claimed by another after this.
    pub claim_idle: Duration,
    /// The embedded broker's and the outbox's durable store.
    pub data_dir: PathBuf,
    /// How long Idempotency-Keys and acknowledged ids are remembered.
    pub dedup_window: Duration,
    pub dead_letter_retention: Retention,
    pub subscriptions: Vec<Subscription>,
    /// The app's own transactional outbox table, relayed into Outrigger's outbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_outbox: Option<AppOutbox>,
    /// `rediss://`: whom to trust and an optional client certificate; `None`: the system's
    /// roots and no client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// `messaging.app_outbox`: where the app's outbox table is, and how often it is looked at
/// when no NOTIFY arrives. The database is `postgres` or `postgres_file`, exactly one
/// (checked in `validate`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AppOutbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresUrl>,
    /// A file holding the URL (a mounted Secret): read at each connection, so a rotated
    /// password is used from the next reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_file: Option<PathBuf>,
    #[serde(default = "defaults::outbox_table")]
    pub table: TableName,
    #[serde(default = "defaults::outbox_poll")]
    pub poll: Duration,
}

/// How many dead letters are kept, and for how long; the oldest go first.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Retention {
    pub max_messages: u64,
    pub max_age: Duration,
}

/// One queue consumed and delivered to `service.app.url` + `path`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Subscription {
    pub queue: QueueName,
    /// On the app; starts with `/`.
    pub path: String,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: NonZeroU32,
    #[serde(default = "defaults::backoff", deserialize_with = "Backoff::messaging")]
    pub backoff: Backoff,
    /// One delivery attempt.
    #[serde(default = "defaults::timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// One ordering key at a time, in publish order.
    #[serde(default)]
    pub ordered: bool,
    #[serde(default)]
    pub delivery: Delivery,
    /// Deliver each message twice, to test that the handler is idempotent.
    #[serde(default)]
    pub duplicate_deliveries: bool,
    pub throttle: Option<Throttle>,
    pub circuit_breaker: Option<SubscriptionBreaker>,
    /// `None`: `<queue>_deadletter`; see `dead_letter_queue()`.
    pub dead_letter_queue: Option<QueueName>,
    /// Queues delivered before `queue` by this subscription, highest priority first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority_lanes: Vec<QueueName>,
}

/// Deliveries in flight at once: a fixed number, or a range scaled with the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Concurrency {
    Fixed(NonZeroUsize),
    Scaled(ConcurrencyRange),
}

/// Reached through `deserialize_any` (see `Concurrency`), where a mapping's keys are not known
/// in advance, so serde itself refuses unknown keys here: same message, same position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyRange {
    #[serde(default = "defaults::min_concurrency")]
    pub min: usize,
    pub max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Acknowledge after the app's 2xx; redeliver on failure.
    #[default]
    AtLeastOnce,
    /// Acknowledge before delivering; a failed delivery is dropped and counted.
    AtMostOnce,
}

/// At most `messages` deliveries `per` period.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Throttle {
    pub messages: NonZeroU32,
    #[serde(default = "defaults::throttle_per")]
    pub per: Duration,
}

/// Stops delivering to an app that keeps failing, so it can recover.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SubscriptionBreaker {
    pub consecutive_failures: NonZeroU32,
    pub open_for: Duration,
    pub half_open_requests: NonZeroU32,
}

// === impl Subscription ===

impl Subscription {
    /// Where exhausted and permanently failed messages of `queue` go.
    pub fn dead_letter_queue(&self) -> QueueName {
        self.dead_letter_queue_of(&self.queue)
    }

    /// Where exhausted and permanently failed messages of `lane` go: the configured
    /// `dead_letter_queue` for every lane, else `<lane>_deadletter`.
    pub fn dead_letter_queue_of(&self, lane: &QueueName) -> QueueName {
        self.dead_letter_queue.clone().unwrap_or_else(|| lane.dead_letter())
    }

    /// Every queue it consumes, highest priority first: the `priority_lanes`, then `queue`.
    pub fn lanes(&self) -> Vec<QueueName> {
        self.priority_lanes.iter().chain([&self.queue]).cloned().collect()
    }
}

// === impl Concurrency ===

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency::Fixed(NonZeroUsize::new(8).expect("not zero"))
    }
}

/// A number, or `{ min, max }`.
impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ConcurrencyVisitor)
    }
}

struct ConcurrencyVisitor;

impl<'de> Visitor<'de> for ConcurrencyVisitor {
    type Value = Concurrency;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number from 1, or { min: 1, max: 32 }")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Concurrency, E> {
        usize::try_from(n)
            .ok()
            .and_then(NonZeroUsize::new)
            .map(Concurrency::Fixed)
            .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Concurrency, A::Error> {
        ConcurrencyRange::deserialize(MapAccessDeserializer::new(map)).map(Concurrency::Scaled)
    }
}

// === defaults ===

impl Default for Messaging {
    fn default() -> Self {
        Messaging {
            broker: Broker::Embedded,
            claim_idle: Duration::from_secs(30),
            data_dir: PathBuf::from("./outrigger-data"),
            dedup_window: Duration::from_secs(3600),
            dead_letter_retention: Retention::default(),
            subscriptions: Vec::new(),
            app_outbox: None,
            tls: None,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_messages: 10_000, max_age: Duration::from_secs(14 * 86_400) }
    }
}

impl Default for SubscriptionBreaker {
    fn default() -> Self {
        SubscriptionBreaker {
            consecutive_failures: NonZeroU32::new(10).expect("not zero"),
            open_for: Duration::from_secs(30),
            half_open_requests: NonZeroU32::new(1).expect("not zero"),
        }
    }
}

/// Defaults of the fields of structs that have required fields, hence no `Default`.
mod defaults {
    use super::{Backoff, Duration, NonZeroU32, TableName};

    pub(super) fn outbox_table() -> TableName {
        "outrigger_outbox".parse().expect("a valid table name")
    }

    pub(super) fn outbox_poll() -> Duration {
        Duration::from_secs(1)
    }

    pub(super) fn max_attempts() -> NonZeroU32 {
        NonZeroU32::new(5).expect("not zero")
    }

    pub(super) fn backoff() -> Backoff {
        Backoff::MESSAGING
    }

    pub(super) fn timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub(super) fn min_concurrency() -> usize {
        1
    }

    pub(super) fn throttle_per() -> Duration {
        Duration::from_secs(1)
    }
}
