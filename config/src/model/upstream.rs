//! `upstreams:`: the services this app calls, and the policies each call goes through.
//! An absent policy section means no such policy (no retries, no breaker), not a default one;
//! only `discovery` is required. The map keeps file order, which is the order upstreams start.

use super::Retry;
use crate::types::{Duration, Endpoint, ListenAddr, Ratio, UpstreamName};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

/// The `upstreams:` map, in file order; each upstream carries its key as `name`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Upstreams(pub Vec<Upstream>);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Upstream {
    /// The key under `upstreams:`; requests whose authority's host is this name come here.
    #[serde(skip, default = "UpstreamName::unset")]
    pub name: UpstreamName,
    /// A dedicated port whose every request goes to this upstream.
    pub listen: Option<ListenAddr>,
    pub discovery: Discovery,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub rate_limit: Option<RateLimit>,
    /// In-flight requests beyond this get 503 `overloaded`.
    pub concurrency_limit: Option<ConcurrencyLimit>,
    pub health_check: Option<HealthCheck>,
    pub tls: Option<Tls>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Another attempt when the first is slow to answer; needs `retry` (its budget and replay
    /// buffer).
    pub hedge: Option<Hedge>,
    /// Injected delays and aborts, for resilience testing.
    pub fault: Option<Fault>,
    /// Per-call policies, first match wins; a request no route matches gets the sections above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<super::Route>,
}

/// Where an upstream's endpoints come from: exactly one source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// A fixed list; at least one.
    Static(Vec<Endpoint>),
    Dns(Dns),
    /// A YAML file listing endpoints, watched for changes.
    File(PathBuf),
    /// The top-level `registry`.
    Registry(RegistryDiscovery),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Dns {
    pub name: String,
    /// Required for `a`/`aaaa`; refused for `srv`, whose records carry their ports.
    pub port: Option<u16>,
    #[serde(default)]
    pub record: DnsRecord,
    /// Re-resolve this often (or at the record's TTL).
    #[serde(default = "Dns::default_refresh")]
    pub refresh: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsRecord {
    #[default]
    A,
    Aaaa,
    Srv,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RegistryDiscovery {
    pub service: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Power of two choices over a latency EWMA.
    #[default]
    P2cEwma,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The client's protocol: h2 in, h2 out.
    #[default]
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Timeouts {
    pub connect: Duration,
    /// The whole request: every attempt and backoff.
    pub request: Duration,
    /// One attempt; `None`: only `request` applies.
    pub per_try: Option<Duration>,
    /// An idle pooled connection is closed after this.
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct CircuitBreaker {
    /// Opens when this share of requests in `window` failed, once `min_requests` were seen.
    pub failure_rate: Ratio,
    pub window: Duration,
    pub min_requests: u32,
    /// Opens after this many failures in a row; `null` turns the rule off.
    pub consecutive_failures: Option<NonZeroU32>,
    pub open_for: Duration,
    pub half_open_requests: NonZeroU32,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct RateLimit {
    pub requests_per_second: NonZeroU32,
    /// `None`: `requests_per_second`.
    pub burst: Option<NonZeroU32>,
    #[serde(default)]
    pub mode: Mode,
}

/// Whether a policy refuses, or only says what it would have refused (DESIGN "Shadow mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    /// Decide as usual, keep the state, forward every request; count what would have happened.
    Shadow,
}

/// `concurrency_limit: N`, or `{ max: N, mode: shadow }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    pub max: NonZeroUsize,
    pub mode: Mode,
}

impl<'de> Deserialize<'de> for ConcurrencyLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // through MapAccessDeserializer the loader does not see the field list: refuse here
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            max: NonZeroUsize,
            #[serde(default)]
            mode: Mode,
        }
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = ConcurrencyLimit;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number >= 1, or { max: N, mode: enforce | shadow }")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ConcurrencyLimit, E> {
                // NonZeroUsize's own refusal, which the loader words as every other one
                let max =
                    NonZeroUsize::deserialize(serde::de::value::U64Deserializer::<E>::new(n))?;
                Ok(ConcurrencyLimit { max, mode: Mode::Enforce })
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ConcurrencyLimit, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ConcurrencyLimit, A::Error> {
                let full = Full::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ConcurrencyLimit { max: full.max, mode: full.mode })
            }
        }
        deserializer.deserialize_any(Either)
    }
}

impl Serialize for ConcurrencyLimit {
    /// A number when enforced (as it is written most often), else the mapping.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.mode == Mode::Enforce {
            return serializer.serialize_u64(self.max.get() as u64);
        }
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("max", &self.max)?;
        map.serialize_entry("mode", &self.mode)?;
        map.end()
    }
}

/// `hedge`: when no response head came `after` since the last attempt began, another attempt
/// goes to an endpoint not tried yet, up to `max_extra` extra attempts in flight.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Hedge {
    pub after: Duration,
    #[serde(default = "Hedge::default_max_extra")]
    pub max_extra: u32,
}

impl Hedge {
    /// The most extra attempts one call may have in flight.
    pub const MAX_EXTRA: u32 = 4;

    fn default_max_extra() -> u32 {
        1
    }
}

/// Active checks of each endpoint: an HTTP GET of `path`, or (`tcp: true`) a connect.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub tcp: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: NonZeroU32,
    pub unhealthy_threshold: NonZeroU32,
}

/// Originate TLS to the upstream: the app speaks plain HTTP to the sidecar, the sidecar speaks
/// HTTPS to the endpoints. The files are read when the sidecar starts, not by `validate`: they
/// often exist only where it runs (a mounted Secret).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Tls {
    /// SNI and the name the server's certificate must carry; `None`: the upstream's name.
    pub server_name: Option<String>,
    /// Trust only the CAs in this PEM bundle; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for mutual TLS; set together with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Passive ejection of endpoints that keep failing real requests.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct OutlierDetection {
    pub consecutive_failures: NonZeroU32,
    /// Ejection time, multiplied by how often the endpoint was ejected before.
    pub base_ejection: Duration,
    /// Never eject more than this percentage of the endpoints.
    pub max_ejected_percent: u8,
}

// === impl Upstreams ===

impl Upstreams {
    pub fn iter(&self) -> std::slice::Iter<'_, Upstream> {
        self.0.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.0.iter().find(|u| u.name.as_str() == name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Upstreams {
    type Item = &'a Upstream;
    type IntoIter = std::slice::Iter<'a, Upstream>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for Upstreams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(UpstreamsVisitor)
    }
}

struct UpstreamsVisitor;

impl<'de> Visitor<'de> for UpstreamsVisitor {
    type Value = Upstreams;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of upstream names to their settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Upstreams, A::Error> {
        let mut upstreams = Vec::new();
        while let Some(name) = map.next_key::<UpstreamName>()? {
            let upstream = map.next_value::<Upstream>()?;
            upstreams.push(Upstream { name, ..upstream });
        }
        Ok(Upstreams(upstreams))
    }
}

impl Serialize for Upstreams {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for upstream in &self.0 {
            map.serialize_entry(&upstream.name, upstream)?;
        }
        map.end()
    }
}

// === defaults ===

impl Dns {
    fn default_refresh() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(15),
            per_try: None,
            idle: Duration::from_secs(90),
        }
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failure_rate: Ratio::new_const(0.5),
            window: Duration::from_secs(10),
            min_requests: 20,
            consecutive_failures: NonZeroU32::new(5),
            open_for: Duration::from_secs(30),
            half_open_requests: NonZeroU32::new(3).expect("not zero"),
            mode: Mode::Enforce,
        }
    }
}

impl RateLimit {
    /// How many requests may come at once: `burst`, or one second's worth.
    pub fn effective_burst(&self) -> NonZeroU32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: None,
            tcp: false,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: NonZeroU32::new(2).expect("not zero"),
            unhealthy_threshold: NonZeroU32::new(3).expect("not zero"),
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: NonZeroU32::new(5).expect("not zero"),
            base_ejection: Duration::from_secs(30),
            max_ejected_percent: 50,
        }
    }
}

/// `fault`: a share of requests held for a while, and a share answered at once with a status,
/// before any policy sees them (DESIGN "Faults"). At least one of the two.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct FaultDelay {
    pub percent: crate::types::Percent,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct FaultAbort {
    pub percent: crate::types::Percent,
    /// The HTTP status answered, 200 to 599; a gRPC call gets the matching gRPC status.
    pub status: u16,
}
