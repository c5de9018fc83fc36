//! What loads: the empty file, the full example of DESIGN.md (`full.yaml`, copied verbatim),
//! a minimal upstream, context defaults, and the JSON the admin API prints.

use outrigger_config::*;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration as Std;

fn load(text: &str) -> Config {
    load_str("test.yaml", text).unwrap_or_else(|e| panic!("should load, got:\n{e}"))
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

#[test]
fn an_empty_file_is_all_defaults() {
    for text in ["", "# nothing but a comment\n", "---\n", "service:\nupstreams:\n"] {
        assert_eq!(load(text), Config::default(), "{text:?}");
    }
    let config = Config::default();
    assert_eq!(config.service.name, "outrigger");
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9901");
    assert_eq!(config.outbound.listen.to_string(), "127.0.0.1:4140");
    assert_eq!(config.outbound.limits.max_header_bytes.bytes(), 65_536);
    assert_eq!(config.outbound.limits.max_headers, 100);
    assert_eq!(config.outbound.limits.header_read_timeout.get(), Std::from_secs(10));
    assert_eq!(config.outbound.limits.max_publish_buffer.bytes(), 64 << 20);
    assert_eq!(config.messaging.broker, Broker::Embedded);
    assert_eq!(config.messaging.dead_letter_retention.max_age.get(), Std::from_secs(14 * 86_400));
    assert_eq!(config.telemetry.log.level, "info");
    assert_eq!(config.lifecycle.drain_timeout.get(), Std::from_secs(30));
    assert!(config.upstreams.is_empty() && config.registry.is_none());
}

#[test]
fn the_design_example_loads_and_lands_where_expected() {
    let config =
        load_file(std::path::Path::new("tests/full.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let app = config.service.app.as_ref().unwrap();
    assert_eq!((config.service.name.as_str(), app.url.port()), ("checkout", 8080));
    assert_eq!(app.health_path.as_deref(), Some("/healthz"));

    let payments = config.upstreams.get("payments").unwrap();
    assert_eq!(payments.listen.unwrap().to_string(), "127.0.0.1:4141");
    let Discovery::Static(endpoints) = &payments.discovery else { panic!("static discovery") };
    let endpoints: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    assert_eq!(endpoints, ["127.0.0.1:9001", "127.0.0.1:9002"]);
    assert_eq!(payments.timeouts.per_try.map(Duration::get), Some(Std::from_secs(3)));
    assert_eq!(payments.timeouts.request.get(), Std::from_secs(10));

    let retry = payments.retry.as_ref().unwrap();
    assert_eq!(retry.max_attempts, nz(3));
    assert_eq!(retry.backoff, Backoff::HTTP);
    use RetryOn::*;
    assert_eq!(retry.on, [ConnectFailure, Reset, Status(502), Status(503), Status(504)]);
    assert_eq!(retry.budget.ratio.get(), 0.2);

    let breaker = payments.circuit_breaker.unwrap();
    assert_eq!((breaker.failure_rate.get(), breaker.consecutive_failures), (0.5, Some(nz(5))));
    let rate_limit = payments.rate_limit.unwrap();
    assert_eq!((rate_limit.requests_per_second, rate_limit.effective_burst()), (nz(100), nz(20)));
    let limit = payments.concurrency_limit.unwrap();
    assert_eq!(
        (limit.max, limit.mode),
        (NonZeroUsize::new(256).unwrap(), outrigger_config::Mode::Enforce)
    );
    assert_eq!(payments.health_check.as_ref().unwrap().path.as_deref(), Some("/healthz"));
    assert_eq!(payments.tls.as_ref().unwrap().server_name.as_deref(), Some("api.example.com"));
    assert_eq!(payments.outlier_detection.unwrap().max_ejected_percent, 50);

    let etcd = &config.registry.as_ref().unwrap().etcd;
    assert_eq!(
        (etcd.endpoints.as_slice(), etcd.prefix.as_str()),
        (&["http://127.0.0.1:2379".to_owned()][..], "/outrigger/services")
    );
    let nameservers = config.resolver.nameservers.as_ref().unwrap();
    assert_eq!(nameservers[0].get().to_string(), "127.0.0.1:53");

    let sub = &config.messaging.subscriptions[0];
    assert_eq!(sub.queue.as_str(), "registration.welcome_email");
    assert_eq!(sub.dead_letter_queue().as_str(), "registration.welcome_email_deadletter");
    assert_eq!(sub.backoff, Backoff::MESSAGING);
    assert_eq!(sub.concurrency, Concurrency::Fixed(NonZeroUsize::new(8).unwrap()));
    assert_eq!(sub.throttle.unwrap().per.get(), Std::from_secs(60));
    assert_eq!(sub.circuit_breaker.unwrap().half_open_requests, nz(1));
    assert_eq!(config.messaging.dedup_window.get(), Std::from_secs(3600));
    let outbox = config.messaging.app_outbox.as_ref().expect("app_outbox");
    assert_eq!(
        outbox.postgres.as_ref().map(|u| u.as_str()),
        Some("postgres://app@127.0.0.1:5432/shop")
    );
    assert_eq!((outbox.table.as_str(), outbox.poll.get()), ("outrigger_outbox", Std::from_secs(1)));
    let tracing = config.telemetry.tracing.as_ref().unwrap();
    assert_eq!(tracing.service_name.as_deref(), Some("checkout"));
}

#[test]
fn a_minimal_upstream_gets_the_documented_defaults() {
    let config = load("upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n");
    let up = config.upstreams.get("payments").unwrap();
    assert_eq!(up.name.as_str(), "payments");
    assert_eq!((up.load_balancer, up.protocol), (LoadBalancer::P2cEwma, Protocol::Auto));
    assert_eq!(up.timeouts, Timeouts::default());
    assert_eq!(up.timeouts.connect.get(), Std::from_secs(1));
    assert_eq!(up.timeouts.request.get(), Std::from_secs(15));
    assert_eq!(up.timeouts.idle.get(), Std::from_secs(90));
    assert_eq!(up.timeouts.per_try, None);
    assert!(up.listen.is_none() && up.retry.is_none() && up.circuit_breaker.is_none());
    assert!(up.rate_limit.is_none() && up.health_check.is_none() && up.tls.is_none());
}

#[test]
fn empty_sections_take_their_defaults() {
    let config = load(concat!(
        "upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
        "    retry: {}\n    circuit_breaker:\n    health_check: { tcp: true }\n",
    ));
    let up = config.upstreams.get("payments").unwrap();
    assert_eq!(up.retry, Some(Retry::default()));
    assert_eq!(up.circuit_breaker, None, "an empty value is no section");
    assert_eq!(up.health_check.as_ref().unwrap().interval.get(), Std::from_secs(5));
}

#[test]
fn a_partial_backoff_takes_the_defaults_of_its_context() {
    let config = load(concat!(
        "service: { app: { url: http://127.0.0.1:8080 } }\n",
        "upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
        "    retry: { backoff: { jitter: none } }\n",
        "messaging:\n  subscriptions:\n    - { queue: q, path: /q, backoff: { jitter: none } }\n",
    ));
    let http = config.upstreams.get("payments").unwrap().retry.as_ref().unwrap().backoff;
    assert_eq!(http, Backoff { jitter: Jitter::None, ..Backoff::HTTP });
    let messaging = config.messaging.subscriptions[0].backoff;
    assert_eq!(messaging, Backoff { jitter: Jitter::None, ..Backoff::MESSAGING });
    assert_eq!(
        (messaging.initial.get(), messaging.max.get()),
        (Std::from_secs(1), Std::from_secs(60))
    );
}

#[test]
fn upstreams_keep_file_order_and_dotted_names() {
    let config = load(concat!(
        "upstreams:\n",
        "  zeta: { discovery: { static: [\"10.0.0.1:80\"] } }\n",
        "  payments.prod: { discovery: { dns: { name: payments.prod.svc, port: 80 } } }\n",
        "  alpha: { discovery: { file: endpoints/alpha.yaml } }\n",
    ));
    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["zeta", "payments.prod", "alpha"]);
}

#[test]
fn aliases_and_merge_keys_are_expanded() {
    let config = load(concat!(
        "upstreams:\n",
        "  a: &base\n    discovery: { static: [\"10.0.0.1:80\"] }\n    timeouts: { request: 5s }\n",
        "  b:\n    <<: *base\n    timeouts: { request: 7s }\n",
    ));
    let b = config.upstreams.get("b").unwrap();
    assert_eq!(b.discovery, config.upstreams.get("a").unwrap().discovery);
    assert_eq!(b.timeouts.request.get(), Std::from_secs(7), "written keys win over merged ones");
}

#[test]
fn concurrency_is_a_number_or_a_range() {
    let text = concat!(
        "service: { app: { url: http://127.0.0.1:8080 } }\n",
        "messaging:\n  subscriptions:\n",
        "    - { queue: a, path: /a, concurrency: 3 }\n",
        "    - { queue: b, path: /b, concurrency: { max: 32 } }\n",
    );
    let subs = load(text).messaging.subscriptions;
    assert_eq!(subs[0].concurrency, Concurrency::Fixed(NonZeroUsize::new(3).unwrap()));
    assert_eq!(subs[1].concurrency, Concurrency::Scaled(ConcurrencyRange { min: 1, max: 32 }));
}

#[test]
fn durations_and_sizes_round_trip_through_json() {
    let config = load(
        "outbound: { limits: { max_header_bytes: 65536, idle_timeout: 90s } }\nlifecycle: { drain_timeout: 1.5s }\n",
    );
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["outbound"]["limits"]["max_header_bytes"], "64KiB");
    assert_eq!(json["outbound"]["limits"]["idle_timeout"], "1m30s");
    assert_eq!(json["lifecycle"]["drain_timeout"], "1s500ms");
    let back: Config = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    for text in ["250ms", "5s", "1m", "1h", "14d", "100us"] {
        assert_eq!(text.parse::<Duration>().unwrap().to_string(), text);
    }
    for (text, bytes) in [("64KiB", 65_536), ("1MiB", 1_048_576), ("64KB", 64_000), ("512", 512)] {
        let size: ByteSize = text.parse().unwrap();
        assert_eq!((size.bytes(), size.to_string().parse::<ByteSize>().unwrap()), (bytes, size));
    }
}

#[test]
fn the_full_config_round_trips_through_json() {
    let config = load_file(std::path::Path::new("tests/full.yaml")).unwrap();
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), config);
}

#[test]
fn json_of_the_config_redacts_the_redis_password() {
    let config = load("messaging: { broker: \"redis://app:s3cret@redis.internal:6379/0\" }\n");
    let Broker::Redis(url) = &config.messaging.broker else { panic!("a redis broker") };
    assert_eq!(
        url.as_str(),
        "redis://app:s3cret@redis.internal:6379/0",
        "the client gets the real URL"
    );
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""broker":"redis://app:***@redis.internal:6379/0""#), "{json}");
    assert!(!json.contains("s3cret") && !format!("{config:?}").contains("s3cret"));
}

#[test]
fn json_and_debug_of_the_config_show_the_otlp_headers_values_as_stars() {
    let config = load(
        "telemetry:\n  tracing:\n    otlp_endpoint: http://collector:4318\n    \
         headers: { authorization: \"Bearer s3cret\" }\n",
    );
    let tracing = config.telemetry.tracing.as_ref().expect("a tracing section");
    assert_eq!(tracing.headers["authorization"], "Bearer s3cret", "the exporter gets the value");
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""headers":{"authorization":"***"}"#), "{json}");
    assert!(!json.contains("s3cret") && !format!("{config:?}").contains("s3cret"));
}

#[test]
fn an_unreadable_file_says_so() {
    let err = load_file(std::path::Path::new("tests/no-such-file.yaml")).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }));
    assert!(err.to_string().starts_with("tests/no-such-file.yaml: cannot read: "), "{err}");
}

#[test]
fn the_reference_example_in_the_docs_loads() {
    let doc = std::fs::read_to_string("../docs/configuration.md").unwrap();
    let example = doc.split("```yaml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
    let config = load(example);
    let payments = config.upstreams.get("payments").unwrap();
    assert_eq!(
        payments.retry.as_ref().unwrap(),
        &Retry::default(),
        "the example shows the defaults"
    );
    assert_eq!(payments.circuit_breaker, Some(CircuitBreaker::default()));
    let charge = &payments.routes[0];
    assert_eq!((charge.name.as_str(), charge.retry.as_ref()), ("charge", Some(&RouteRetry::Off)));
    let merged = charge.over(payments);
    assert_eq!((merged.retry, merged.timeouts.per_try), (None, None), "replaced whole");
    assert_eq!(merged.timeouts.connect, payments.timeouts.connect, "connect stays the upstream's");
    assert_eq!(merged.circuit_breaker, payments.circuit_breaker);
    assert_eq!(config.messaging.subscriptions[0].backoff, Backoff::MESSAGING);
    assert_eq!(config.outbound, Outbound::default());
}

#[test]
fn the_tls_example_in_the_docs_loads() {
    let doc = std::fs::read_to_string("../docs/configuration.md").unwrap();
    let section = doc.split("### tls\n").nth(1).unwrap();
    let example =
        section.split("```yaml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
    let config = load(example);
    let api = config.upstreams.get("api.example.com").unwrap().tls.as_ref().unwrap();
    assert_eq!(api, &Tls::default(), "tls: {{}} means the system roots and the upstream's name");
    let payments = config.upstreams.get("payments").unwrap().tls.as_ref().unwrap();
    assert_eq!(payments.server_name.as_deref(), Some("payments.internal"));
    assert!(payments.cert_file.is_some() && payments.key_file.is_some());
}

#[test]
fn a_routes_hedge_replaces_the_upstreams_and_max_extra_defaults_to_1() {
    let config = load(concat!(
        "upstreams:\n  payments:\n    discovery: { static: [\"127.0.0.1:9001\"] }\n",
        "    retry: {}\n    hedge: { after: 100ms }\n",
        "    routes:\n      - { name: reads, hedge: { after: 20ms, max_extra: 3 } }\n",
        "      - { name: other }\n",
    ));
    let payments = config.upstreams.get("payments").unwrap();
    let hedge = |ms, max_extra| Some(Hedge { after: Duration::from_millis(ms), max_extra });
    assert_eq!(payments.hedge, hedge(100, 1));
    assert_eq!(payments.routes[0].over(payments).hedge, hedge(20, 3));
    assert_eq!(payments.routes[1].over(payments).hedge, hedge(100, 1), "the upstream's");
}
