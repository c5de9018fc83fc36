//! Prometheus metrics, with the `outrigger_` prefix and unit suffixes of DESIGN.md "Telemetry".
//!
//! Label handles are made when the stack is built, never per request: an upstream's counters
//! for each status code are created on first use and then read from a lock-free slot, so the hot
//! path does no string formatting and no registry lookup.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod process;

use outrigger_discovery::{Pool, State};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// The upstream label of requests that matched no upstream: a fixed value, so a client cannot
/// create label values (and memory) by sending made-up authorities.
pub const NO_UPSTREAM: &str = "(none)";

/// The most queues that get series of their own (published, depth, age): queue names come from
/// the app. Past it, the rest share the series of [`OTHER_QUEUES`].
pub const MAX_QUEUE_SERIES: usize = 1000;
/// The `queue` label of the queues past [`MAX_QUEUE_SERIES`].
pub const OTHER_QUEUES: &str = "(other)";

/// Latency buckets from 0.5 ms to 30 s: a sidecar's answers are sub-millisecond, its
/// upstreams' range up to the longest sensible request timeout.
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Commit buckets from 50 µs (one fdatasync on a fast disk) to 1 s (a stalled disk).
const COMMIT_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// A count read at each scrape.
struct Count(Box<dyn Fn() -> usize + Send + Sync>);

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Count")
    }
}

/// The process's metrics registry and its families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    hedges: IntCounterVec,
    circuit_state: IntGaugeVec,
    rate_limited: IntCounterVec,
    endpoints: IntGaugeVec,
    discovery_age: GaugeVec,
    published: IntCounterVec,
    outbox_pending: IntGauge,
    app_outbox_relayed: IntCounter,
    delivered: IntCounterVec,
    dead_letters: IntCounterVec,
    delivery_duration: HistogramVec,
    subscription_circuit: IntGaugeVec,
    subscription_concurrency: IntGaugeVec,
    subscription_paused: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_age: GaugeVec,
    deadletter_depth: IntGaugeVec,
    deadletter_age: GaugeVec,
    /// The queues the four gauges above show now: a queue gone from the next round loses its
    /// series, the others are overwritten.
    queues_shown: Arc<Mutex<QueueSeries>>,
    config_reloads: IntCounterVec,
    config_hash: prometheus::Gauge,
    shed: IntCounterVec,
    publish_buffer: IntGauge,
    grpc_responses: IntCounterVec,
    local_responses: IntCounterVec,
    ejections: IntCounterVec,
    health_checks: IntCounterVec,
    requests_in_flight: IntGauge,
    /// What `requests_in_flight` reads at each scrape (the app-facing listeners' count).
    in_flight: Arc<OnceLock<Count>>,
    process: process::Process,
    commit_duration: Histogram,
    spans_exported: IntCounter,
    spans_dropped: IntCounterVec,
    circuit_forced: IntGaugeVec,
    faults: IntCounterVec,
    shadow: IntCounterVec,
}

/// The queues each queue gauge shows a series for.
#[derive(Debug, Default)]
struct QueueSeries {
    depth: HashSet<String>,
    age: HashSet<String>,
    dead_depth: HashSet<String>,
    dead_age: HashSet<String>,
}

/// Removes from `family` the series of the queues shown `before` and not `now`.
fn retire<T: prometheus::core::MetricVecBuilder>(
    family: &prometheus::core::MetricVec<T>,
    before: &HashSet<String>,
    now: &HashSet<String>,
) {
    for gone in before.difference(now) {
        let _ = family.remove_label_values(&[gone.as_str()]);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "outrigger_requests_total",
                "Requests answered, by upstream, route and final status",
            ),
            &["upstream", "route", "code"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "outrigger_request_duration_seconds",
                "Time from receiving a request to sending its response headers",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["upstream", "route"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new("outrigger_retries_total", "Retries sent, after the first attempt"),
            &["upstream"],
        )
        .expect("valid metric");
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "outrigger_circuit_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new("outrigger_rate_limited_total", "Requests refused by the rate limit"),
            &["upstream"],
        )
        .expect("valid metric");
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "outrigger_endpoints",
                "Endpoints of each upstream by state: healthy, unchecked, unhealthy, ejected",
            ),
            &["upstream", "state"],
        )
        .expect("valid metric");
        let discovery_age = GaugeVec::new(
            Opts::new(
                "outrigger_discovery_age_seconds",
                "Time since each upstream's discovery source last confirmed its endpoints",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let published = IntCounterVec::new(
            Opts::new(
                "outrigger_messages_published_total",
                "Messages stored by POST /v1/publish or from the app's outbox table, by queue \
                 (idempotent replays not counted)",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let outbox_pending =
            IntGauge::new("outrigger_outbox_pending", "Messages stored and not yet acknowledged")
                .expect("valid metric");
        let app_outbox_relayed = IntCounter::new(
            "outrigger_app_outbox_relayed_total",
            "Rows of the app's outbox table stored in the outbox and deleted from the table",
        )
        .expect("valid metric");
        let delivered = IntCounterVec::new(
            Opts::new(
                "outrigger_messages_delivered_total",
                "Deliveries to the app by queue and outcome: acked, retried, dead_lettered, \
                 dropped (at_most_once), duplicate (an acknowledged id read again, not delivered)",
            ),
            &["queue", "outcome"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "outrigger_deadletter_messages_total",
                "Messages moved to a dead-letter queue, by the queue they came from",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let delivery_duration = HistogramVec::new(
            HistogramOpts::new(
                "outrigger_delivery_duration_seconds",
                "Time from POSTing a message to the app to its answer (or timeout), per attempt",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["queue"],
        )
        .expect("valid metric");
        let subscription_circuit = IntGaugeVec::new(
            Opts::new(
                "outrigger_subscription_circuit_state",
                "A subscription's circuit breaker: 0 closed, 1 half-open, 2 open",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let subscription_concurrency = IntGaugeVec::new(
            Opts::new(
                "outrigger_subscription_concurrency",
                "A subscription's delivery slots now (fixed, or scaled between min and max)",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let subscription_paused = IntGaugeVec::new(
            Opts::new(
                "outrigger_subscription_paused",
                "1 while a subscription waits for the app to accept connections, else 0",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new("outrigger_queue_depth", "Messages stored and not acknowledged, by queue"),
            &["queue"],
        )
        .expect("valid metric");
        let queue_age = GaugeVec::new(
            Opts::new(
                "outrigger_queue_oldest_age_seconds",
                "Time since the oldest stored message of each queue was published",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let deadletter_depth = IntGaugeVec::new(
            Opts::new("outrigger_deadletter_depth", "Dead letters kept, by dead-letter queue"),
            &["queue"],
        )
        .expect("valid metric");
        let deadletter_age = GaugeVec::new(
            Opts::new(
                "outrigger_deadletter_oldest_age_seconds",
                "Time since the oldest dead letter of each dead-letter queue was dead-lettered",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "outrigger_config_reloads_total",
                "Config reloads by result: applied, or invalid (refused; the running config stays)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_hash = prometheus::Gauge::new(
            "outrigger_config_hash",
            "A hash of the config file's content in force (52 bits): differs between pods that \
             run different configs",
        )
        .expect("valid metric");
        let shed = IntCounterVec::new(
            Opts::new(
                "outrigger_shed_total",
                "Connections and requests answered 503 overloaded at a whole-sidecar cap, by \
                 the limit reached: max_connections, max_requests or max_publish_buffer",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let publish_buffer = IntGauge::new(
            "outrigger_publish_buffer_bytes",
            "Bytes of publish bodies held now, being read or stored (outbound.limits.max_publish_buffer)",
        )
        .expect("valid metric");
        for family in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(retries.clone()),
            Box::new(circuit_state.clone()),
            Box::new(rate_limited.clone()),
            Box::new(endpoints.clone()),
            Box::new(discovery_age.clone()),
            Box::new(published.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(app_outbox_relayed.clone()),
            Box::new(delivered.clone()),
            Box::new(dead_letters.clone()),
            Box::new(delivery_duration.clone()),
            Box::new(subscription_circuit.clone()),
            Box::new(subscription_concurrency.clone()),
            Box::new(subscription_paused.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_age.clone()),
            Box::new(deadletter_depth.clone()),
            Box::new(deadletter_age.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_hash.clone()),
            Box::new(shed.clone()),
            Box::new(publish_buffer.clone()),
        ] {
            registry.register(family).expect("registered once");
        }
        let grpc_responses = IntCounterVec::new(
            Opts::new(
                "outrigger_grpc_responses_total",
                "gRPC calls answered by an upstream, by the grpc-status the client got (by name)",
            ),
            &["upstream", "route", "grpc_status"],
        )
        .expect("valid metric");
        registry.register(Box::new(grpc_responses.clone())).expect("registered once");
        let hedges = IntCounterVec::new(
            Opts::new(
                "outrigger_hedges_total",
                "Hedges sent: extra attempts while an earlier one had not answered",
            ),
            &["upstream", "route"],
        )
        .expect("valid metric");
        registry.register(Box::new(hedges.clone())).expect("registered once");
        let local_responses = IntCounterVec::new(
            Opts::new(
                "outrigger_local_responses_total",
                "Answers Outrigger gave itself in place of an upstream's, by outrigger-error kind",
            ),
            &["upstream", "route", "kind"],
        )
        .expect("valid metric");
        let ejections = IntCounterVec::new(
            Opts::new("outrigger_ejections_total", "Endpoints ejected by outlier detection"),
            &["upstream"],
        )
        .expect("valid metric");
        let health_checks = IntCounterVec::new(
            Opts::new("outrigger_health_checks_total", "Active health checks, by result"),
            &["upstream", "result"],
        )
        .expect("valid metric");
        let requests_in_flight = IntGauge::new(
            "outrigger_requests_in_flight",
            "Requests from the app being handled now (outbound listeners)",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("outrigger_build_info", "Always 1; the running build's version as a label"),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "outrigger_store_commit_duration_seconds",
                "Durable commits of the embedded store (a group of publishes, acks, parks), \
                 from the write to the flush's return",
            )
            .buckets(COMMIT_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let spans_exported =
            IntCounter::new("outrigger_spans_exported_total", "Spans the OTLP collector accepted")
                .expect("valid metric");
        let spans_dropped = IntCounterVec::new(
            Opts::new(
                "outrigger_spans_dropped_total",
                "Spans never exported: queue_full (more finished than the exporter could send) \
                 or export_failed (the collector refused or was unreachable, after retries)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let circuit_forced = IntGaugeVec::new(
            Opts::new(
                "outrigger_circuit_forced",
                "1 while an operator forces the upstream's circuit breaker open or closed \
                 (outrigger circuit), else 0",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let faults = IntCounterVec::new(
            Opts::new(
                "outrigger_faults_injected_total",
                "Faults injected by `fault`: delay (a request held) or abort (answered with fault.abort.status)",
            ),
            &["upstream", "route", "kind"],
        )
        .expect("valid metric");
        let shadow = IntCounterVec::new(
            Opts::new(
                "outrigger_shadow_decisions_total",
                "Requests a policy in shadow mode would have refused, and forwarded: policy is the \
                 YAML section, decision the outrigger-error kind it would have answered",
            ),
            &["upstream", "route", "policy", "decision"],
        )
        .expect("valid metric");
        for reason in ["queue_full", "export_failed"] {
            spans_dropped.with_label_values(&[reason]);
        }
        let process = process::Process::new();
        for family in [
            Box::new(local_responses.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ejections.clone()),
            Box::new(health_checks.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(build_info),
            Box::new(commit_duration.clone()),
            Box::new(spans_exported.clone()),
            Box::new(spans_dropped.clone()),
            Box::new(circuit_forced.clone()),
            Box::new(faults.clone()),
            Box::new(shadow.clone()),
        ] {
            registry.register(family).expect("registered once");
        }
        process.register(&registry);
        Self {
            registry,
            requests,
            duration,
            retries,
            hedges,
            circuit_state,
            rate_limited,
            endpoints,
            discovery_age,
            published,
            outbox_pending,
            app_outbox_relayed,
            delivered,
            dead_letters,
            delivery_duration,
            subscription_circuit,
            subscription_concurrency,
            subscription_paused,
            queue_depth,
            queue_age,
            deadletter_depth,
            deadletter_age,
            queues_shown: Default::default(),
            config_reloads,
            config_hash,
            shed,
            publish_buffer,
            grpc_responses,
            local_responses,
            ejections,
            health_checks,
            requests_in_flight,
            in_flight: Arc::default(),
            process,
            commit_duration,
            spans_exported,
            spans_dropped,
            circuit_forced,
            faults,
            shadow,
        }
    }

    /// Where `outrigger_requests_in_flight` is read at each scrape: set once, by the listeners'
    /// owner.
    pub fn watch_in_flight(&self, count: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.in_flight.set(Count(Box::new(count)));
    }

    /// `outrigger_local_responses_total` of one upstream, route and kind: for answers given
    /// before any upstream's stack (a sidecar at its request cap).
    pub fn local_response(&self, upstream: &str, route: &str, kind: &str) -> IntCounter {
        self.local_responses.with_label_values(&[upstream, route, kind])
    }

    /// `outrigger_store_commit_duration_seconds`: the embedded store times each commit.
    pub fn commit_duration(&self) -> Histogram {
        self.commit_duration.clone()
    }

    /// `outrigger_faults_injected_total` of one upstream and route, by kind.
    pub fn faults(&self, upstream: &str, route: &str) -> crate::policy::fault::FaultCounts {
        crate::policy::fault::FaultCounts {
            delay: self.faults.with_label_values(&[upstream, route, "delay"]),
            abort: self.faults.with_label_values(&[upstream, route, "abort"]),
        }
    }

    /// `outrigger_shadow_decisions_total` of one upstream, route and shadow policy.
    pub fn shadow_decisions(
        &self,
        upstream: &str,
        route: &str,
        policy: &str,
        decision: &str,
    ) -> IntCounter {
        self.shadow.with_label_values(&[upstream, route, policy, decision])
    }

    /// What the span exporter counts: spans sent, and spans dropped by reason.
    pub fn span_counts(&self) -> crate::telemetry::trace::SpanCounts {
        crate::telemetry::trace::SpanCounts {
            exported: self.spans_exported.clone(),
            queue_full: self.spans_dropped.with_label_values(&["queue_full"]),
            export_failed: self.spans_dropped.with_label_values(&["export_failed"]),
        }
    }

    /// What the endpoint pool of `upstream` reports: ejections and health-check results.
    pub fn pool_events(&self, upstream: &str) -> outrigger_discovery::Events {
        let ejected = self.ejections.with_label_values(&[upstream]);
        let passed = self.health_checks.with_label_values(&[upstream, "passed"]);
        let failed = self.health_checks.with_label_values(&[upstream, "failed"]);
        outrigger_discovery::Events::new(move |event| match event {
            outrigger_discovery::Event::Ejected => ejected.inc(),
            outrigger_discovery::Event::HealthCheck { passed: true } => passed.inc(),
            outrigger_discovery::Event::HealthCheck { passed: false } => failed.inc(),
        })
    }

    /// `outrigger_publish_buffer_bytes`: the publish buffer keeps it equal to what it holds.
    pub fn publish_buffer(&self) -> IntGauge {
        self.publish_buffer.clone()
    }

    /// `outrigger_shed_total{limit}`, `limit` being `max_connections`, `max_requests` or
    /// `max_publish_buffer`.
    pub fn shed(&self, limit: &str) -> IntCounter {
        self.shed.with_label_values(&[limit])
    }

    /// `outrigger_config_reloads_total{result}`.
    pub fn config_reloads(&self, result: &str) -> IntCounter {
        self.config_reloads.with_label_values(&[result])
    }

    /// `outrigger_config_hash`.
    pub fn config_hash(&self) -> prometheus::Gauge {
        self.config_hash.clone()
    }

    /// Sets the queue and dead-letter gauges from the store's view at scrape time; queues no
    /// longer holding anything disappear.
    pub fn observe_queues(&self, depths: &[crate::messaging::broker::QueueDepth], now_ms: u64) {
        let age = |at: u64| now_ms.saturating_sub(at) as f64 / 1000.0;
        // the deepest queues keep series of their own; the rest are summed as "(other)"
        let mut depths: Vec<&crate::messaging::broker::QueueDepth> = depths.iter().collect();
        let mut other = None;
        if depths.len() > MAX_QUEUE_SERIES {
            depths.sort_by_key(|d| std::cmp::Reverse(d.messages + d.dead_letters));
            let mut sum = crate::messaging::broker::QueueDepth {
                queue: OTHER_QUEUES.to_owned(),
                messages: 0,
                dead_letters: 0,
                oldest_published_ms: None,
                oldest_dead_letter_ms: None,
            };
            for rest in depths.drain(MAX_QUEUE_SERIES..) {
                sum.add(rest);
            }
            other = Some(sum);
        }
        // each series is overwritten in place and only a queue no longer shown is removed, so a
        // scrape in the middle never misses a queue that is still there
        let mut shown = self.queues_shown.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = QueueSeries::default();
        for d in depths.into_iter().chain(other.as_ref()) {
            let q = [d.queue.as_str()];
            if d.messages > 0 {
                self.queue_depth.with_label_values(&q).set(d.messages as i64);
                now.depth.insert(d.queue.clone());
                if let Some(at) = d.oldest_published_ms {
                    self.queue_age.with_label_values(&q).set(age(at));
                    now.age.insert(d.queue.clone());
                }
            }
            if d.dead_letters > 0 {
                self.deadletter_depth.with_label_values(&q).set(d.dead_letters as i64);
                now.dead_depth.insert(d.queue.clone());
                if let Some(at) = d.oldest_dead_letter_ms {
                    self.deadletter_age.with_label_values(&q).set(age(at));
                    now.dead_age.insert(d.queue.clone());
                }
            }
        }
        retire(&self.queue_depth, &shown.depth, &now.depth);
        retire(&self.queue_age, &shown.age, &now.age);
        retire(&self.deadletter_depth, &shown.dead_depth, &now.dead_depth);
        retire(&self.deadletter_age, &shown.dead_age, &now.dead_age);
        *shown = now;
    }

    /// `outrigger_subscription_concurrency{queue}`.
    pub fn subscription_concurrency(&self, queue: &str) -> IntGauge {
        self.subscription_concurrency.with_label_values(&[queue])
    }

    /// `outrigger_subscription_paused{queue}`: 1 while the app refuses connections.
    pub fn subscription_paused(&self, queue: &str) -> IntGauge {
        self.subscription_paused.with_label_values(&[queue])
    }

    /// `outrigger_messages_delivered_total{queue,outcome}`: made once per subscription.
    pub fn messages_delivered(&self, queue: &str, outcome: &str) -> IntCounter {
        self.delivered.with_label_values(&[queue, outcome])
    }

    /// `outrigger_deadletter_messages_total{queue}`, `queue` being where the message came from.
    pub fn deadletter_messages(&self, queue: &str) -> IntCounter {
        self.dead_letters.with_label_values(&[queue])
    }

    /// `outrigger_delivery_duration_seconds{queue}`.
    pub fn delivery_duration(&self, queue: &str) -> Histogram {
        self.delivery_duration.with_label_values(&[queue])
    }

    /// `outrigger_subscription_circuit_state{queue}`.
    pub fn subscription_circuit_state(&self, queue: &str) -> IntGauge {
        self.subscription_circuit.with_label_values(&[queue])
    }

    /// `outrigger_messages_published_total{queue}`: made once per queue by its caller.
    pub fn messages_published(&self, queue: &str) -> IntCounter {
        self.published.with_label_values(&[queue])
    }

    /// `outrigger_outbox_pending`: the message store keeps it equal to what it holds.
    pub fn outbox_pending(&self) -> IntGauge {
        self.outbox_pending.clone()
    }

    /// `outrigger_app_outbox_relayed_total`.
    pub fn app_outbox_relayed(&self) -> IntCounter {
        self.app_outbox_relayed.clone()
    }

    /// `outrigger_retries_total{upstream}`, for an upstream with retries.
    pub fn retries(&self, upstream: &str) -> IntCounter {
        self.retries.with_label_values(&[upstream])
    }

    /// `outrigger_hedges_total{upstream,route}`, for a route (or upstream) that hedges.
    pub fn hedges(&self, upstream: &str, route: &str) -> IntCounter {
        self.hedges.with_label_values(&[upstream, route])
    }

    /// `outrigger_circuit_state{upstream}` and `outrigger_circuit_forced{upstream}`, for an
    /// upstream with a breaker.
    pub fn circuit_gauges(&self, upstream: &str) -> (IntGauge, IntGauge) {
        let labels = [upstream];
        (
            self.circuit_state.with_label_values(&labels),
            self.circuit_forced.with_label_values(&labels),
        )
    }

    /// `outrigger_rate_limited_total{upstream}`, for an upstream with a rate limit.
    pub fn rate_limited(&self, upstream: &str) -> IntCounter {
        self.rate_limited.with_label_values(&[upstream])
    }

    /// `outrigger_grpc_responses_total{upstream,route}`, one counter per status made on first use.
    pub fn grpc_responses(&self, upstream: &str, route: &str) -> GrpcResponses {
        GrpcResponses(Arc::new(GrpcHandles {
            labels: [upstream.into(), route.into()],
            family: self.grpc_responses.clone(),
            by_status: std::array::from_fn(|_| OnceLock::new()),
        }))
    }

    /// The handles of one upstream's requests that no route matched (or of [`NO_UPSTREAM`]).
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        self.route(name, outrigger_config::DEFAULT_ROUTE)
    }

    /// The handles of one route of an upstream: made once, when its stack is built.
    pub fn route(&self, upstream: &str, route: &str) -> UpstreamMetrics {
        UpstreamMetrics(Arc::new(Handles {
            name: upstream.into(),
            route: route.into(),
            local: self.local_responses.clone(),
            requests: self.requests.clone(),
            by_code: std::array::from_fn(|_| OnceLock::new()),
            duration: self.duration.with_label_values(&[upstream, route]),
        }))
    }

    /// Sets the endpoint gauges from the pools; called at each scrape, so the request path
    /// never touches them.
    pub fn observe_endpoints(&self, pools: &[Pool]) {
        for pool in pools {
            let upstream = pool.upstream();
            let report = pool.report();
            for state in State::ALL {
                let n = report.iter().filter(|e| e.state == state).count();
                self.endpoints
                    .with_label_values(&[upstream, state.as_str()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            if let Some(at) = pool.endpoints().snapshot().confirmed {
                self.discovery_age.with_label_values(&[upstream]).set(at.elapsed().as_secs_f64());
            }
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> Vec<u8> {
        if let Some(Count(count)) = self.in_flight.get() {
            self.requests_in_flight.set(i64::try_from(count()).unwrap_or(i64::MAX));
        }
        self.process.observe();
        let mut out = Vec::with_capacity(4096);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec does not fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One upstream's metric handles; cheap to clone.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics(Arc<Handles>);

#[derive(Debug)]
struct Handles {
    name: Box<str>,
    route: Box<str>,
    /// `outrigger_local_responses_total`: labels made on an answer of ours, off the fast path.
    local: IntCounterVec,
    requests: IntCounterVec,
    /// One counter per status code 100..=599, made on first use.
    by_code: [OnceLock<IntCounter>; 500],
    duration: prometheus::Histogram,
}

impl UpstreamMetrics {
    /// A request answered `status`, its response head `elapsed` after it came.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.count(status);
        self.0.duration.observe(elapsed.as_secs_f64());
    }

    /// A request its client gave up on before the answer: counted as 499, and not timed (the
    /// duration histogram runs to a response head, and there was none).
    pub fn cancelled(&self) {
        self.count(crate::error::CLIENT_CLOSED);
    }

    fn count(&self, status: u16) {
        let h = &self.0;
        if let Some(slot) = status.checked_sub(100).and_then(|i| h.by_code.get(usize::from(i))) {
            slot.get_or_init(|| {
                h.requests.with_label_values(&[&*h.name, &*h.route, &status.to_string()])
            })
            .inc();
        }
    }

    /// Counts an answer Outrigger gave itself, of `outrigger-error` kind `kind`.
    pub fn local(&self, kind: &'static str) {
        let h = &self.0;
        h.local.with_label_values(&[&*h.name, &*h.route, kind]).inc();
    }
}

/// One upstream's (and route's) gRPC status counters; cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcResponses(Arc<GrpcHandles>);

#[derive(Debug)]
struct GrpcHandles {
    labels: [Box<str>; 2],
    family: IntCounterVec,
    by_status: [OnceLock<IntCounter>; 17],
}

impl GrpcResponses {
    pub fn record(&self, status: outrigger_config::GrpcStatus) {
        let h = &self.0;
        let [upstream, route] = &h.labels;
        h.by_status[status.code() as usize]
            .get_or_init(|| h.family.with_label_values(&[upstream, route, status.name()]))
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_cap_the_shallowest_queues_share_one_series() {
        let metrics = Metrics::new();
        let depths: Vec<crate::messaging::broker::QueueDepth> = (0..MAX_QUEUE_SERIES as u64 + 2)
            .map(|n| crate::messaging::broker::QueueDepth {
                queue: format!("q{n}"),
                messages: n + 1,
                dead_letters: 0,
                oldest_published_ms: Some(1_000),
                oldest_dead_letter_ms: None,
            })
            .collect();
        metrics.observe_queues(&depths, 2_000);
        let text = String::from_utf8(metrics.encode()).unwrap();
        let series = text.lines().filter(|l| l.starts_with("outrigger_queue_depth{")).count();
        assert_eq!(series, MAX_QUEUE_SERIES + 1, "the cap, and one for the rest");
        assert!(text.contains(r#"outrigger_queue_depth{queue="(other)"} 3"#), "q0 and q1: 1 + 2");
        assert!(text.contains(r#"outrigger_queue_depth{queue="q1001"} 1002"#), "the deepest stay");
        assert!(!text.contains(r#"outrigger_queue_depth{queue="q0"}"#));
    }

    #[test]
    fn a_queue_emptied_loses_its_series_and_the_others_keep_theirs() {
        let metrics = Metrics::new();
        let depth = |queue: &str, messages, dead_letters| crate::messaging::broker::QueueDepth {
            queue: queue.to_owned(),
            messages,
            dead_letters,
            oldest_published_ms: Some(1_000),
            oldest_dead_letter_ms: Some(1_000),
        };
        metrics.observe_queues(&[depth("a", 2, 1), depth("b", 3, 0)], 2_000);
        metrics.observe_queues(&[depth("a", 0, 1), depth("b", 4, 0)], 3_000);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(!text.contains(r#"outrigger_queue_depth{queue="a"}"#), "{text}");
        assert!(!text.contains(r#"outrigger_queue_oldest_age_seconds{queue="a"}"#), "{text}");
        assert!(text.contains(r#"outrigger_queue_depth{queue="b"} 4"#), "{text}");
        assert!(text.contains(r#"outrigger_queue_oldest_age_seconds{queue="b"} 2"#), "{text}");
        assert!(text.contains(r#"outrigger_deadletter_depth{queue="a"} 1"#), "{text}");
    }

    #[test]
    fn counts_requests_by_upstream_route_and_code() {
        let metrics = Metrics::new();
        let payments = metrics.upstream("payments");
        payments.record(200, Duration::from_millis(3));
        payments.record(200, Duration::from_millis(4));
        payments.record(503, Duration::from_millis(1));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains(
                r#"outrigger_requests_total{code="200",route="(default)",upstream="payments"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"outrigger_requests_total{code="503",route="(default)",upstream="payments"} 1"#
        ));
        assert!(text.contains(
            r#"outrigger_request_duration_seconds_count{route="(default)",upstream="payments"} 3"#
        ));
        metrics.route("payments", "charge").record(201, Duration::from_millis(2));
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains(
                r#"outrigger_requests_total{code="201",route="charge",upstream="payments"} 1"#
            ),
            "{text}"
        );
    }
}

// === impl MetricsLayer ===

/// Counts each upstream answer by status and times it to its response headers.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: UpstreamMetrics,
}

impl MetricsLayer {
    pub fn new(metrics: UpstreamMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: UpstreamMetrics,
}

impl<S, Req, B> tower::Service<Req> for Measured<S>
where
    S: tower::Service<Req, Response = http::Response<B>, Error = crate::error::ProxyError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MeasuredFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        MeasuredFuture {
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
            started: tokio::time::Instant::now(),
            answered: false,
        }
    }
}

pin_project_lite::pin_project! {
    #[allow(missing_debug_implementations)]
    pub struct MeasuredFuture<F> {
        #[pin]
        inner: F,
        metrics: UpstreamMetrics,
        started: tokio::time::Instant,
        answered: bool,
    }
    impl<F> PinnedDrop for MeasuredFuture<F> {
        // a call dropped before its answer (the app went away) is counted as 499
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.answered {
                this.metrics.cancelled();
            }
        }
    }
}

impl<F, B> std::future::Future for MeasuredFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, crate::error::ProxyError>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let (status, local) = match &result {
            Ok(res) => {
                let local = res.extensions().get::<crate::error::LocalKind>().map(|k| k.0);
                (res.status(), local)
            }
            Err(err) => (err.status(), Some(err.kind())),
        };
        *this.answered = true;
        this.metrics.record(status.as_u16(), this.started.elapsed());
        if let Some(kind) = local {
            this.metrics.local(kind);
        }
        std::task::Poll::Ready(result)
    }
}
