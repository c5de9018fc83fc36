//! `upstreams.NAME.routes`: per-call policies. The first route whose `match` fits a request
//! decides its `timeouts`, `retry`, `rate_limit`, `concurrency_limit`, `hedge` and `fault`; each section a route
//! gives replaces the upstream's whole section, one it omits is the upstream's. Endpoint-level
//! sections (discovery, balancing, health checks, the breaker, tls, ...) are parsed only so that
//! validation can refuse them by name: they stay per upstream (DESIGN.md, "Routes").

use super::{RateLimit, Retry};
use crate::types::Duration;
use serde::de::{Error, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// The `route` label of a request that no route matched.
pub const DEFAULT_ROUTE: &str = "(default)";

/// The struct name under which `yaml::De` lets a plain `off` through to the visitor: a section
/// that may also be switched off (`retry: off`).
pub(crate) const SECTION_OR_OFF: &str = "$outrigger::SectionOrOff";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Route {
    /// Unique within the upstream: the `route` label in metrics, logs and spans.
    pub name: String,
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    /// The route's requests may be retried whatever their method.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<super::ConcurrencyLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<super::Hedge>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<super::Fault>,
    // about endpoints, not calls: accepted here only to be refused by name
    #[serde(default, skip_serializing)]
    pub listen: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub discovery: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub load_balancer: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub protocol: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub circuit_breaker: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub health_check: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub tls: Option<OnUpstream>,
    #[serde(default, skip_serializing)]
    pub outlier_detection: Option<OnUpstream>,
}

/// Which requests a route takes: every condition given must hold; none given matches all.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RouteMatch {
    /// The path exactly (the query is not part of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whole segments: `/v1/charge` matches `/v1/charge` and `/v1/charge/7`, not `/v1/charges`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Any of these methods (case-sensitive, as HTTP's); empty: any method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Each header must be present with exactly this value; names in any letter case.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A route's `timeouts`: the per-call ones. `connect` and `idle` are about connections, which
/// the upstream's endpoints share.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RouteTimeouts {
    pub request: Duration,
    pub per_try: Option<Duration>,
}

/// A route's `retry`: a section of its own, or `off`.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteRetry {
    Off,
    On(Retry),
}

/// A section written on a route that belongs to the upstream; validation refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnUpstream;

// === impl Route ===

impl Route {
    /// The endpoint-level sections written on this route, by field name.
    pub fn upstream_only_fields(&self) -> impl Iterator<Item = &'static str> {
        [
            ("listen", self.listen),
            ("discovery", self.discovery),
            ("load_balancer", self.load_balancer),
            ("protocol", self.protocol),
            ("circuit_breaker", self.circuit_breaker),
            ("health_check", self.health_check),
            ("tls", self.tls),
            ("outlier_detection", self.outlier_detection),
        ]
        .into_iter()
        .filter_map(|(field, given)| given.map(|_| field))
    }
}

impl Route {
    /// `upstream` with this route's sections in place of its own: each section the route gives
    /// replaces the upstream's whole; `retry: off` removes it.
    pub fn over(&self, upstream: &super::Upstream) -> super::Upstream {
        let mut merged = upstream.clone();
        merged.routes = Vec::new();
        if let Some(t) = self.timeouts {
            merged.timeouts =
                super::Timeouts { request: t.request, per_try: t.per_try, ..merged.timeouts };
        }
        match &self.retry {
            Some(RouteRetry::Off) => merged.retry = None,
            Some(RouteRetry::On(retry)) => merged.retry = Some(retry.clone()),
            None => {}
        }
        if let Some(limit) = self.rate_limit {
            merged.rate_limit = Some(limit);
        }
        if let Some(limit) = self.concurrency_limit {
            merged.concurrency_limit = Some(limit);
        }
        if let Some(hedge) = self.hedge {
            merged.hedge = Some(hedge);
        }
        if let Some(fault) = self.fault {
            merged.fault = Some(fault);
        }
        merged
    }
}

impl Default for RouteTimeouts {
    /// The whole section replaces the upstream's, so a field left out takes the default of
    /// `timeouts` (not the upstream's value).
    fn default() -> Self {
        let upstream = super::Timeouts::default();
        RouteTimeouts { request: upstream.request, per_try: upstream.per_try }
    }
}

// === impl OnUpstream ===

impl<'de> Deserialize<'de> for OnUpstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| OnUpstream)
    }
}

// === impl RouteRetry ===

/// `Retry`'s fields, for the unknown-key check of a route's retry section.
const RETRY_FIELDS: &[&str] = &["max_attempts", "backoff", "on", "budget", "replay_buffer"];

impl<'de> Deserialize<'de> for RouteRetry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct(SECTION_OR_OFF, RETRY_FIELDS, RouteRetryVisitor)
    }
}

struct RouteRetryVisitor;

impl<'de> Visitor<'de> for RouteRetryVisitor {
    type Value = RouteRetry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a retry section, or off")
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<RouteRetry, E> {
        match v {
            "off" => Ok(RouteRetry::Off),
            _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RouteRetry, A::Error> {
        Retry::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RouteRetry::On)
    }
}

impl Serialize for RouteRetry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RouteRetry::Off => serializer.serialize_str("off"),
            RouteRetry::On(retry) => retry.serialize(serializer),
        }
    }
}
