//! Retries and backoff. `Backoff` is shared by HTTP retries and message redelivery, whose
//! defaults differ (25ms..1s against 1s..1m): a partly written `backoff:` takes the missing
//! fields from its context's defaults, so there is one field list and two constants.

use crate::GrpcStatus;
use crate::types::{ByteSize, Duration, Ratio};
use serde::de::{Error, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::num::NonZeroU32;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub max_attempts: NonZeroU32,
    pub backoff: Backoff,
    /// Which failures are retried.
    pub on: Vec<RetryOn>,
    pub budget: Budget,
    /// A request body is replayed only if it fits in this.
    pub replay_buffer: ByteSize,
}

/// A failure worth retrying: a connection that could not be opened, a reset, a per-try
/// timeout, an upstream answer with this status, or a gRPC call answered with this gRPC status
/// in its response head (`unavailable`; one of [`GrpcStatus::RETRYABLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    Timeout,
    Status(u16),
    Grpc(GrpcStatus),
}

/// Caps retries at `ratio` of recent requests plus `min_per_second`, against retry storms.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Budget {
    pub ratio: Ratio,
    pub min_per_second: u32,
}

/// The delay before attempt n+1: `initial × multiplier^n` (exponential), `initial + step × n`
/// (linear) or `initial` (fixed), capped at `max`, then jittered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    pub strategy: BackoffStrategy,
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Linear only; `None`: `initial`.
    pub step: Option<Duration>,
    pub jitter: Jitter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffStrategy {
    Exponential,
    Linear,
    Fixed,
}

/// How the delay is randomized: `full` (0..delay), `equal` (delay/2..delay), `decorrelated`
/// (AWS's "decorrelated jitter"), or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    Full,
    Equal,
    Decorrelated,
    None,
}

// === impl Retry ===

impl Default for Retry {
    fn default() -> Self {
        use RetryOn::{ConnectFailure, Reset, Status};
        Retry {
            max_attempts: NonZeroU32::new(3).expect("not zero"),
            backoff: Backoff::HTTP,
            on: vec![ConnectFailure, Reset, Status(502), Status(503), Status(504)],
            budget: Budget::default(),
            replay_buffer: ByteSize::kib(64),
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget { ratio: Ratio::new_const(0.2), min_per_second: 10 }
    }
}

// === impl RetryOn ===

const RETRY_ON: &str = "connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC \
                        status: cancelled, unknown, deadline-exceeded, resource-exhausted, \
                        aborted, internal, unavailable, data-loss";

impl RetryOn {
    fn status(code: u64) -> Option<RetryOn> {
        u16::try_from(code).ok().filter(|c| (100..=599).contains(c)).map(RetryOn::Status)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RetryOnVisitor)
    }
}

struct RetryOnVisitor;

impl Visitor<'_> for RetryOnVisitor {
    type Value = RetryOn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(RETRY_ON)
    }

    fn visit_u64<E: Error>(self, code: u64) -> Result<RetryOn, E> {
        RetryOn::status(code)
            .ok_or_else(|| E::custom(format!("{code} is not a status code (expected {RETRY_ON})")))
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<RetryOn, E> {
        match text {
            "connect-failure" => Ok(RetryOn::ConnectFailure),
            "reset" => Ok(RetryOn::Reset),
            "timeout" => Ok(RetryOn::Timeout),
            _ => match GrpcStatus::from_name(text) {
                Some(status) if GrpcStatus::RETRYABLE.contains(&status) => {
                    Ok(RetryOn::Grpc(status))
                }
                // `ok`, `not-found`, …: the caller's answer, the same on every attempt
                Some(status) => Err(E::custom(format!(
                    "gRPC status {status} is not retried: a new attempt would get the same answer (expected {RETRY_ON})"
                ))),
                None => self.visit_number(text),
            },
        }
    }
}

impl RetryOnVisitor {
    fn visit_number<E: Error>(self, text: &str) -> Result<RetryOn, E> {
        match text.parse() {
            Ok(code) => self.visit_u64(code),
            Err(_) => Err(E::custom(format!("unknown value {text:?} (expected {RETRY_ON})"))),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::ConnectFailure => serializer.serialize_str("connect-failure"),
            RetryOn::Reset => serializer.serialize_str("reset"),
            RetryOn::Timeout => serializer.serialize_str("timeout"),
            RetryOn::Status(code) => serializer.serialize_u16(*code),
            RetryOn::Grpc(status) => serializer.serialize_str(status.name()),
        }
    }
}

// === impl Backoff ===

impl Backoff {
    /// Between HTTP attempts: quick, since a caller is waiting.
    pub const HTTP: Backoff = Backoff {
        strategy: BackoffStrategy::Exponential,
        initial: Duration::from_millis(25),
        max: Duration::from_secs(1),
        multiplier: 2.0,
        step: None,
        jitter: Jitter::Full,
    };

    /// Between message deliveries: slow, since nobody waits and the app may need time.
    pub const MESSAGING: Backoff =
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60), ..Backoff::HTTP };

    /// The delay before retry number `retry` (0 for the first), given the previous delay (used
    /// by decorrelated jitter) and a random draw `unit` in `[0, 1)`: pure, so HTTP retries,
    /// message redelivery and discovery reconnects share one formula and tests pin the draw.
    pub fn delay_with(
        &self,
        retry: u32,
        previous: std::time::Duration,
        unit: f64,
    ) -> std::time::Duration {
        let cfg = self;
        let (initial, max) = (cfg.initial.get(), cfg.max.get());
        let base = match cfg.strategy {
            BackoffStrategy::Exponential => {
                // f64 keeps a large `retry` from overflowing; the cap applies right after
                let factor = cfg.multiplier.powi(i32::try_from(retry).unwrap_or(i32::MAX));
                std::time::Duration::try_from_secs_f64(initial.as_secs_f64() * factor)
                    .unwrap_or(max)
            }
            BackoffStrategy::Linear => {
                initial.saturating_add(cfg.linear_step().get().saturating_mul(retry))
            }
            BackoffStrategy::Fixed => initial,
        }
        .min(max);
        match cfg.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(unit),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(unit),
            Jitter::Decorrelated => {
                // min(max, random_between(initial, previous × 3))
                let high = previous.saturating_mul(3).max(initial);
                (initial + (high - initial).mul_f64(unit)).min(max)
            }
        }
    }

    /// The linear strategy's increment.
    pub fn linear_step(&self) -> Duration {
        self.step.unwrap_or(self.initial)
    }

    /// `deserialize_with` for a backoff whose missing fields come from `MESSAGING`.
    pub(crate) fn messaging<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BackoffFields::deserialize(deserializer).map(|f| f.or(Backoff::MESSAGING))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::HTTP
    }
}

/// Standing alone, a backoff is an HTTP retry's; see `Backoff::messaging` for the other context.
impl<'de> Deserialize<'de> for Backoff {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BackoffFields::deserialize(deserializer).map(|f| f.or(Backoff::default()))
    }
}

/// `Backoff` as written: what is absent comes from the context's defaults.
#[derive(Deserialize)]
#[serde(rename = "Backoff")]
struct BackoffFields {
    strategy: Option<BackoffStrategy>,
    initial: Option<Duration>,
    max: Option<Duration>,
    multiplier: Option<f64>,
    step: Option<Duration>,
    jitter: Option<Jitter>,
}

impl BackoffFields {
    fn or(self, defaults: Backoff) -> Backoff {
        Backoff {
            strategy: self.strategy.unwrap_or(defaults.strategy),
            initial: self.initial.unwrap_or(defaults.initial),
            max: self.max.unwrap_or(defaults.max),
            multiplier: self.multiplier.unwrap_or(defaults.multiplier),
            step: self.step.or(defaults.step),
            jitter: self.jitter.unwrap_or(defaults.jitter),
        }
    }
}
