//! Every rule, as a table: a small bad YAML and the exact lines `outrigger validate` prints.
//! Rows are checked all together, so one run shows every row that differs.

const UP: &str = "upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n";
const APP: &str = "service: { app: { url: http://127.0.0.1:8080 } }\n";

/// (what the row shows, the YAML, the expected output lines).
fn rows() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let s = |t: &str| t.to_owned();
    let up = |t: &str| format!("{UP}{t}");
    let app = |t: &str| format!("{APP}{t}");
    vec![
        // --- from YAML to types ---
        (
            "yaml syntax error",
            s("service:\n  name: a\n   app: b\n"),
            vec!["outrigger.yaml:3:7: (yaml): mapping values are not allowed in this context"],
        ),
        // A construct left open is reported where it began, with or without a final line
        // break (the parser notices it only at the end of the file).
        (
            "an unclosed flow sequence, at its '['",
            s("service: [unclosed"),
            vec!["outrigger.yaml:1:10: (yaml): this '[' is never closed (expected ',' or ']')"],
        ),
        (
            "an unclosed flow sequence, at its '[', the file ending in a line break",
            s("service: [unclosed\n"),
            vec!["outrigger.yaml:1:10: (yaml): this '[' is never closed (expected ',' or ']')"],
        ),
        (
            // found by fuzzing (scripts/fuzz config): the parser placed it past the last line
            "an unclosed flow mapping, at its '{'",
            s("outbound:\n  limits: { max_headers: 100, header_read"),
            vec!["outrigger.yaml:2:11: (yaml): this '{' is never closed (expected ',' or '}')"],
        ),
        (
            "an unclosed flow mapping, at its '{', the file ending in a line break",
            s("outbound:\n  limits: { max_headers: 100, header_read\n"),
            vec!["outrigger.yaml:2:11: (yaml): this '{' is never closed (expected ',' or '}')"],
        ),
        (
            "an unclosed single-quoted string, at its quote",
            s("service: { name: 'checkout }"),
            vec![
                "outrigger.yaml:1:18: (yaml): this single-quoted string is never closed (expected a closing ')",
            ],
        ),
        (
            "an unclosed single-quoted string, at its quote, the file ending in a line break",
            s("service: { name: 'checkout }\n"),
            vec![
                "outrigger.yaml:1:18: (yaml): this single-quoted string is never closed (expected a closing ')",
            ],
        ),
        (
            "an unclosed double-quoted string, at its quote",
            s("admin:\n  listen: \"127.0.0.1:9901"),
            vec![
                "outrigger.yaml:2:11: (yaml): this double-quoted string is never closed (expected a closing \")",
            ],
        ),
        (
            "an unclosed double-quoted string, at its quote, the file ending in a line break",
            s("admin:\n  listen: \"127.0.0.1:9901\n"),
            vec![
                "outrigger.yaml:2:11: (yaml): this double-quoted string is never closed (expected a closing \")",
            ],
        ),
        (
            "a quote left open before the next key, at its quote",
            s("service:\n  name: 'checkout\n  register: true\n"),
            vec![
                "outrigger.yaml:2:9: (yaml): this single-quoted string goes on to a line indented too little (expected a closing ' on its line, or that line indented more)",
            ],
        ),
        (
            "an error inside an open '[' names where the '[' began",
            s("upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\" }\n"),
            vec![
                "outrigger.yaml:3:43: (yaml): while parsing a flow sequence, expected ',' or ']'; the '[' at line 3, column 26 is still open",
            ],
        ),
        (
            "a second document",
            s("service: {}\n---\nadmin: {}\n"),
            vec![
                "outrigger.yaml:2:1: (yaml): a second document; the configuration is one document",
            ],
        ),
        (
            "unknown top-level field",
            s("servce:\n  name: checkout\n"),
            vec![
                "outrigger.yaml:1:1: servce: unknown field (expected one of: service, admin, outbound, upstreams, registry, resolver, messaging, telemetry, lifecycle, runtime)",
            ],
        ),
        (
            "unknown nested field",
            up("    circuit_breakr: { window: 10s }\n"),
            vec![
                "outrigger.yaml:4:5: upstreams.payments.circuit_breakr: unknown field (expected one of: listen, discovery, load_balancer, protocol, timeouts, retry, circuit_breaker, rate_limit, concurrency_limit, health_check, tls, outlier_detection, hedge, fault, routes)",
            ],
        ),
        (
            "unknown discovery kind",
            s("upstreams:\n  payments:\n    discovery: { dsn: { name: x } }\n"),
            vec![
                "outrigger.yaml:3:18: upstreams.payments.discovery.dsn: unknown field (expected one of: static, dns, file, registry)",
            ],
        ),
        (
            "bad duration",
            up("    timeouts: { per_try: 3 seconds }\n"),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.timeouts.per_try: \"3 seconds\" is not a duration (expected e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "a bare number is not a duration",
            s("lifecycle: { drain_timeout: 30 }\n"),
            vec![
                "outrigger.yaml:1:29: lifecycle.drain_timeout: \"30\" is not a duration (expected e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "runtime: at least one worker",
            s("runtime: { workers: 0 }\n"),
            vec![
                "outrigger.yaml:1:21: runtime.workers: must be at least 1 (expected a whole number >= 1, got 0)",
            ],
        ),
        (
            "outbound: the whole sidecar's caps are at least 1",
            s("outbound: { limits: { max_requests: 0 } }\n"),
            vec![
                "outrigger.yaml:1:37: outbound.limits.max_requests: must be at least 1 (expected a whole number >= 1, got 0)",
            ],
        ),
        (
            "bad address",
            s("admin:\n  listen: localhost:9901\n"),
            vec![
                "outrigger.yaml:2:11: admin.listen: \"localhost:9901\" is not an address (expected IP:PORT, e.g. 127.0.0.1:4140)",
            ],
        ),
        (
            "bad endpoint",
            s("upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7\"] }\n"),
            vec![
                "outrigger.yaml:3:27: upstreams.payments.discovery.static[0]: \"10.0.0.7\" is not an endpoint (expected HOST:PORT, e.g. 10.0.0.7:8080 or payments.internal:8080)",
            ],
        ),
        (
            "bad enum value",
            up("    load_balancer: fastest\n"),
            vec![
                "outrigger.yaml:4:20: upstreams.payments.load_balancer: unknown value \"fastest\" (expected one of: p2c_ewma, round_robin, random)",
            ],
        ),
        (
            "string where a number goes",
            up("    retry: { max_attempts: three }\n"),
            vec![
                "outrigger.yaml:4:28: upstreams.payments.retry.max_attempts: \"three\" is not a number (expected a whole number from 1 to 4294967295)",
            ],
        ),
        (
            "zero where at least one is needed",
            up("    concurrency_limit: 0\n"),
            vec![
                "outrigger.yaml:4:24: upstreams.payments.concurrency_limit: 0 is not valid (expected a whole number >= 1)",
            ],
        ),
        (
            "a mapping where a list goes",
            app("messaging: { subscriptions: { queue: a } }\n"),
            vec![
                "outrigger.yaml:2:29: messaging.subscriptions: a mapping is not a list (expected a list, e.g. [a, b])",
            ],
        ),
        (
            "a scalar where a section goes",
            up("    timeouts: 5s\n"),
            vec![
                "outrigger.yaml:4:15: upstreams.payments.timeouts: \"5s\" is not a mapping (expected a mapping with keys: connect, request, per_try, idle)",
            ],
        ),
        (
            "not a boolean",
            s("service: { register: yes }\n"),
            vec![
                "outrigger.yaml:1:22: service.register: \"yes\" is not a boolean (expected true or false)",
            ],
        ),
        (
            "ratio out of range",
            up("    circuit_breaker: { failure_rate: 1.5 }\n"),
            vec![
                "outrigger.yaml:4:38: upstreams.payments.circuit_breaker.failure_rate: 1.5 is out of range (expected a number from 0.0 to 1.0, e.g. 0.2)",
            ],
        ),
        (
            "bad size",
            s("outbound: { limits: { max_header_bytes: 64 KiB } }\n"),
            vec![
                "outrigger.yaml:1:41: outbound.limits.max_header_bytes: \"64 KiB\" is not a size (expected a whole number of bytes with an optional unit, e.g. 512, 64KiB, 64Ki, 1MiB)",
            ],
        ),
        (
            "Kubernetes quantities are sizes: Ki, Mi, Gi by 1024",
            s("outbound: { limits: { max_header_bytes: 64Ki, max_publish_buffer: 1Gi } }\n"),
            vec!["(loaded without problems)"],
        ),
        (
            "a Kubernetes binary quantity is read by 1024",
            s("outbound: { limits: { max_publish_buffer: 512Ki } }\n"),
            vec![
                "outrigger.yaml:1:43: outbound.limits.max_publish_buffer: must be at least 1MiB, the largest payload (expected a size >= 1MiB, got 512KiB)",
            ],
        ),
        (
            "a Kubernetes decimal quantity is read by 1000",
            s("outbound: { limits: { max_publish_buffer: 1M } }\n"),
            vec![
                "outrigger.yaml:1:43: outbound.limits.max_publish_buffer: must be at least 1MiB, the largest payload (expected a size >= 1MiB, got 1MB)",
            ],
        ),
        (
            "a lone m is Kubernetes' thousandths, not mega",
            s("outbound: { limits: { max_publish_buffer: 128m } }\n"),
            vec![
                "outrigger.yaml:1:43: outbound.limits.max_publish_buffer: \"128m\" is not a size: in a Kubernetes quantity m means thousandths (expected 128M for megabytes, or 128Mi for mebibytes)",
            ],
        ),
        (
            "bad retry condition",
            up("    retry: { on: [reset, 700, flaky] }\n"),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.retry.on[1]: 700 is not a status code (expected connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC status: cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable, data-loss)",
                "outrigger.yaml:4:31: upstreams.payments.retry.on[2]: unknown value \"flaky\" (expected connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC status: cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable, data-loss)",
            ],
        ),
        (
            "gRPC status names in retry.on: a misspelt one, and one a retry cannot fix",
            up("    retry: { on: [unavailable, unavilable, not-found, UNAVAILABLE] }\n"),
            vec![
                "outrigger.yaml:4:32: upstreams.payments.retry.on[1]: unknown value \"unavilable\" (expected connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC status: cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable, data-loss)",
                "outrigger.yaml:4:44: upstreams.payments.retry.on[2]: gRPC status not-found is not retried: a new attempt would get the same answer (expected connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC status: cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable, data-loss)",
                "outrigger.yaml:4:55: upstreams.payments.retry.on[3]: unknown value \"UNAVAILABLE\" (expected connect-failure, reset, timeout, a status code from 100 to 599, or a gRPC status: cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable, data-loss)",
            ],
        ),
        (
            "bad upstream name",
            s("upstreams:\n  Payments_1:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n"),
            vec![
                "outrigger.yaml:2:3: upstreams.Payments_1: \"Payments_1\" is not a valid upstream name (expected a lowercase DNS name such as payments or payments.prod: a-z, 0-9 and -, dots between parts)",
            ],
        ),
        (
            "missing required field",
            s("upstreams:\n  payments:\n    timeouts: { request: 5s }\n"),
            vec!["outrigger.yaml:3:5: upstreams.payments.discovery: required field is missing"],
        ),
        (
            "duplicate keys",
            s("service:\n  name: a\n  name: b\nservice: {}\n"),
            vec![
                "outrigger.yaml:3:3: service.name: duplicate key (expected each key once; the first is at line 2)",
                "outrigger.yaml:4:1: service: duplicate key (expected each key once; the first is at line 1)",
            ],
        ),
        (
            "bad broker, password not echoed",
            s("messaging: { broker: kafka://k:9092 }\n"),
            vec![
                "outrigger.yaml:1:22: messaging.broker: \"kafka://k:9092\" is not a broker (expected embedded, redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT, nats://HOST:PORT or nats+tls://HOST:PORT)",
            ],
        ),
        (
            "three problems, in file order",
            s(concat!(
                "admin: { listen: \"9901\" }\n",
                "upstreams:\n  payments:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
                "    timeouts: { connect: 1s, request: 2s, per_try: 5s }\n",
                "    retry: { backoff: { multiplier: 0.5 } }\n",
            )),
            vec![
                "outrigger.yaml:1:18: admin.listen: \"9901\" is not an address (expected IP:PORT, e.g. 127.0.0.1:4140)",
                "outrigger.yaml:5:52: upstreams.payments.timeouts.per_try: must not exceed timeouts.request (expected at most 2s, got 5s)",
                "outrigger.yaml:6:37: upstreams.payments.retry.backoff.multiplier: must be at least 1.0 (expected a number >= 1.0, got 0.5)",
            ],
        ),
        (
            "durations are at most 365d: no Instant + duration overflows at run time",
            up(concat!(
                "    timeouts: { request: 200000000000000d, idle: 365d }\n",
                "    circuit_breaker: { open_for: 200000000000000d }\n",
            )),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.timeouts.request: \"200000000000000d\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)",
                "outrigger.yaml:5:34: upstreams.payments.circuit_breaker.open_for: \"200000000000000d\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "durations are at most 365d: the listener's and the drain's",
            s(concat!(
                "outbound: { limits: { header_read_timeout: 200000000000000d } }\n",
                "lifecycle: { drain_timeout: 365d1ns }\n",
            )),
            vec![
                "outrigger.yaml:1:44: outbound.limits.header_read_timeout: \"200000000000000d\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)",
                "outrigger.yaml:2:29: lifecycle.drain_timeout: \"365d1ns\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "a duration past u64 milliseconds is refused, not wrapped around to 1ms",
            s("messaging: { dedup_window: 18446744073709551617ms }\n"),
            vec![
                "outrigger.yaml:1:28: messaging.dedup_window: \"18446744073709551617ms\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "a refused broker URL is echoed without its password",
            s("messaging: { broker: \"redis://alice:s3cr3tPW@host:notaport/x\" }\n"),
            vec![
                "outrigger.yaml:1:22: messaging.broker: \"redis://alice:***@host:notaport/x\" is not a broker (expected embedded, redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT, nats://HOST:PORT or nats+tls://HOST:PORT)",
            ],
        ),
        (
            "the app's outbox names one database",
            s("messaging:\n  app_outbox: { table: orders_outbox }\n"),
            vec![
                "outrigger.yaml:2:15: messaging.app_outbox: names no database (expected postgres: postgres://USER@HOST:PORT/DATABASE, or postgres_file: a file holding it)",
            ],
        ),
        (
            "the app's outbox names not two databases",
            s(
                "messaging:\n  app_outbox: { postgres: \"postgres://db/shop\", postgres_file: /etc/pg }\n",
            ),
            vec![
                "outrigger.yaml:2:64: messaging.app_outbox.postgres_file: gives both postgres and postgres_file (expected postgres: postgres://USER@HOST:PORT/DATABASE, or postgres_file: a file holding it)",
            ],
        ),
        (
            "the app's outbox: no TLS yet, a password never echoed, a table SQL can hold, a poll",
            s(concat!(
                "messaging:\n",
                "  app_outbox:\n",
                "    postgres: \"postgres://app:s3cr3tPW@db/shop?sslmode=require\"\n",
                "    table: \"Orders; DROP TABLE x\"\n",
                "    poll: 0s\n",
            )),
            vec![
                "outrigger.yaml:3:15: messaging.app_outbox.postgres: sslmode=require is refused: TLS to PostgreSQL is not supported yet (expected sslmode=disable or prefer, with the database on a trusted network (the pod, or its node))",
                "outrigger.yaml:4:12: messaging.app_outbox.table: \"Orders; DROP TABLE x\" is not a table name (expected outrigger_outbox or app.outrigger_outbox: lowercase letters, digits and _)",
                "outrigger.yaml:5:11: messaging.app_outbox.poll: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        (
            "other refused URLs are echoed without their passwords",
            s(concat!(
                "service: { app: { url: \"http://app:s3cr3tPW@127.0.0.1:8080\" } }\n",
                "registry: { etcd: { endpoints: [\"http://root:s3cr3tPW@127.0.0.1:2379\"] } }\n",
                "telemetry: { tracing: { otlp_endpoint: \"https://otel:s3cr3tPW@collector:4318\" } }\n",
            )),
            vec![
                "outrigger.yaml:1:24: service.app.url: \"http://app:***@127.0.0.1:8080\" is not an app URL (expected http://HOST:PORT[/base], e.g. http://127.0.0.1:8080)",
                "outrigger.yaml:2:33: registry.etcd.endpoints[0]: \"http://root:***@127.0.0.1:2379\" is not an etcd endpoint (expected http://HOST:PORT, e.g. http://127.0.0.1:2379)",
                "outrigger.yaml:3:40: telemetry.tracing.otlp_endpoint: \"https://otel:***@collector:4318\" is not an http(s) URL (expected e.g. http://127.0.0.1:4318)",
            ],
        ),
        (
            "a URL where a list goes is echoed without its password",
            s("registry: { etcd: { endpoints: \"http://root:s3cr3tPW@127.0.0.1:2379\" } }\n"),
            vec![
                "outrigger.yaml:1:32: registry.etcd.endpoints: \"http://root:***@127.0.0.1:2379\" is not a list (expected a list, e.g. [a, b])",
            ],
        ),
        // --- semantic rules (validate.rs) ---
        (
            "per_try <= request",
            up("    timeouts: { request: 1s, per_try: 3s }\n"),
            vec![
                "outrigger.yaml:4:39: upstreams.payments.timeouts.per_try: must not exceed timeouts.request (expected at most 1s, got 3s)",
            ],
        ),
        (
            "backoff initial <= max",
            up("    retry:\n      backoff: { initial: 2s, max: 1s }\n"),
            vec![
                "outrigger.yaml:5:27: upstreams.payments.retry.backoff.initial: must not exceed backoff.max (expected at most 1s, got 2s)",
            ],
        ),
        (
            "backoff initial <= max, against a default",
            app(
                "messaging:\n  subscriptions:\n    - { queue: q, path: /q, backoff: { initial: 2m } }\n",
            ),
            vec![
                "outrigger.yaml:4:49: messaging.subscriptions[0].backoff.initial: must not exceed backoff.max (expected at most 1m, got 2m)",
            ],
        ),
        (
            "multiplier >= 1.0",
            up("    retry:\n      max_attempts: 3\n      backoff:\n        multiplier: 0.5\n"),
            vec![
                "outrigger.yaml:7:21: upstreams.payments.retry.backoff.multiplier: must be at least 1.0 (expected a number >= 1.0, got 0.5)",
            ],
        ),
        (
            "durations that must not be zero",
            up(concat!(
                "    timeouts: { connect: 0s, request: 0ms }\n",
                "    health_check: { tcp: true, interval: 0s }\n",
                "    circuit_breaker: { window: 0s, open_for: 0s }\n",
            )),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.timeouts.connect: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:4:39: upstreams.payments.timeouts.request: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:5:42: upstreams.payments.health_check.interval: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:6:32: upstreams.payments.circuit_breaker.window: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:6:46: upstreams.payments.circuit_breaker.open_for: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        (
            "more durations that must not be zero",
            s(concat!(
                "outbound: { limits: { header_read_timeout: 0s } }\n",
                "upstreams:\n  orders:\n    discovery: { dns: { name: orders.svc, port: 80, refresh: 0s } }\n",
            )),
            vec![
                "outrigger.yaml:1:44: outbound.limits.header_read_timeout: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:4:62: upstreams.orders.discovery.dns.refresh: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        (
            "listen addresses are unique: the default outbound",
            up("    listen: 127.0.0.1:4140\n"),
            vec![
                "outrigger.yaml:4:13: upstreams.payments.listen: listen address 127.0.0.1:4140 is already used by outbound.listen",
            ],
        ),
        (
            "listen addresses are unique: admin, and a wildcard",
            s(concat!(
                "admin: { listen: 127.0.0.1:5000 }\n",
                "upstreams:\n  a:\n    listen: 0.0.0.0:5000\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
                "  b:\n    listen: 127.0.0.1:5001\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
                "  c:\n    listen: 127.0.0.1:5001\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
            )),
            vec![
                "outrigger.yaml:4:13: upstreams.a.listen: listen address 0.0.0.0:5000 is already used by admin.listen",
                "outrigger.yaml:10:13: upstreams.c.listen: listen address 127.0.0.1:5001 is already used by upstreams.b.listen",
            ],
        ),
        (
            "health check: exactly one of path and tcp",
            s(concat!(
                "upstreams:\n",
                "  a:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    health_check: { interval: 5s }\n",
                "  b:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    health_check: { path: /healthz, tcp: true }\n",
                "  c:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    health_check: { path: healthz }\n",
            )),
            vec![
                "outrigger.yaml:4:19: upstreams.a.health_check: checks nothing (expected exactly one of: path, tcp: true)",
                "outrigger.yaml:7:19: upstreams.b.health_check: has both path and tcp: true (expected exactly one of: path, tcp: true)",
                "outrigger.yaml:10:27: upstreams.c.health_check.path: \"healthz\" does not start with / (expected a path such as /healthz)",
            ],
        ),
        (
            "tls: a client certificate and its key come together",
            s(concat!(
                "upstreams:\n",
                "  a:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    tls: { cert_file: /etc/outrigger/client.pem }\n",
                "  b:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    tls: { key_file: /etc/outrigger/client.key }\n",
                "  c:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n    tls: { cert_file: c.pem, key_file: c.key, ca_file: ca.pem }\n",
            )),
            vec![
                "outrigger.yaml:4:23: upstreams.a.tls.cert_file: needs key_file beside it (expected both cert_file and key_file (a client certificate and its key), or neither)",
                "outrigger.yaml:7:22: upstreams.b.tls.key_file: needs cert_file beside it (expected both cert_file and key_file (a client certificate and its key), or neither)",
            ],
        ),
        (
            "tls: server_name is a host name, files are not empty",
            up("    tls: { server_name: \"api example\", ca_file: \"\" }\n"),
            vec![
                "outrigger.yaml:4:25: upstreams.payments.tls.server_name: \"api example\" is not a DNS name or IP address (expected e.g. api.example.com)",
                "outrigger.yaml:4:49: upstreams.payments.tls.ca_file: must not be empty",
            ],
        ),
        (
            "concurrency: min >= 1 and min <= max",
            app(concat!(
                "messaging:\n  subscriptions:\n",
                "    - { queue: a, path: /a, concurrency: { min: 0, max: 4 } }\n",
                "    - { queue: b, path: /b, concurrency: { min: 8, max: 4 } }\n",
                "    - { queue: c, path: /c, concurrency: { max: 4, maximum: 9 } }\n",
            )),
            vec![
                "outrigger.yaml:4:49: messaging.subscriptions[0].concurrency.min: must be at least 1 (expected a whole number >= 1, got 0)",
                "outrigger.yaml:5:49: messaging.subscriptions[1].concurrency.min: must not exceed concurrency.max (expected at most 4, got 8)",
                "outrigger.yaml:6:52: messaging.subscriptions[2].concurrency.maximum: unknown field (expected one of: min, max)",
            ],
        ),
        (
            "dns: a port for a/aaaa, none for srv",
            s(concat!(
                "upstreams:\n",
                "  a:\n    discovery: { dns: { name: a.svc.cluster.local } }\n",
                "  b:\n    discovery: { dns: { name: _http._tcp.b.svc, record: srv, port: 80 } }\n",
            )),
            vec![
                "outrigger.yaml:3:23: upstreams.a.discovery.dns.port: required with record a (expected the port to connect to, e.g. 8080)",
                "outrigger.yaml:5:68: upstreams.b.discovery.dns.port: not allowed with record srv (expected no port: SRV records carry their own)",
            ],
        ),
        (
            "registry discovery needs the top-level registry",
            s("upstreams:\n  a:\n    discovery: { registry: { service: a } }\n"),
            vec![
                "outrigger.yaml:3:28: upstreams.a.discovery.registry: needs the top-level registry section (expected registry: { etcd: { endpoints: [...] } } at the top level)",
            ],
        ),
        (
            "service.register needs a registry and an app",
            s("service:\n  register: true\n"),
            vec![
                "outrigger.yaml:2:13: service.register: needs service.app (expected service.app.url, the instance to register)",
                "outrigger.yaml:2:13: service.register: needs the top-level registry section (expected registry: { etcd: { endpoints: [...] } })",
            ],
        ),
        (
            "subscriptions need service.app",
            s("messaging:\n  subscriptions:\n    - { queue: a, path: /a }\n"),
            vec![
                "outrigger.yaml:3:5: messaging.subscriptions: need service.app to deliver to (expected service.app.url, e.g. http://127.0.0.1:8080)",
            ],
        ),
        (
            "subscription queues are unique",
            app(concat!(
                "messaging:\n  subscriptions:\n",
                "    - { queue: orders.created, path: /a }\n",
                "    - { queue: orders.created, path: /b }\n",
            )),
            vec![
                "outrigger.yaml:5:16: messaging.subscriptions[1].queue: queue \"orders.created\" is already subscribed above (expected one subscription per queue)",
            ],
        ),
        (
            "a priority lane is not subscribed twice",
            app(concat!(
                "messaging:\n  subscriptions:\n",
                "    - { queue: orders, path: /a, priority_lanes: [orders.express] }\n",
                "    - { queue: refunds, path: /b, priority_lanes: [orders.express] }\n",
            )),
            vec![
                "outrigger.yaml:5:52: messaging.subscriptions[1].priority_lanes[0]: queue \"orders.express\" is already subscribed above (expected one subscription per queue)",
            ],
        ),
        (
            "messaging.tls needs a rediss:// or nats+tls:// broker",
            s("messaging:\n  broker: redis://127.0.0.1:6379\n  tls: { ca_file: ca.pem }\n"),
            vec![
                "outrigger.yaml:3:8: messaging.tls: applies to a rediss:// or nats+tls:// broker only (expected broker: rediss://HOST:PORT or nats+tls://HOST:PORT, or no tls section)",
            ],
        ),
        (
            "ordered needs at_least_once",
            app(concat!(
                "messaging:\n  subscriptions:\n",
                "    - { queue: orders, path: /a, ordered: true, delivery: at_most_once }\n",
            )),
            vec![
                "outrigger.yaml:4:43: messaging.subscriptions[0].ordered: cannot keep order with at_most_once (a message is gone before it is delivered) (expected ordered: true with delivery: at_least_once)",
            ],
        ),
        (
            "an environment variable that is not set",
            s("messaging:\n  broker: \"redis://:${OUTRIGGER_TEST_NEVER_SET}@redis:6379\"\n"),
            vec![
                "outrigger.yaml:2:11: messaging.broker: environment variable OUTRIGGER_TEST_NEVER_SET is not set (expected the variable set in the sidecar's environment (from a Secret), ${VAR:-default}, or $${ for a literal ${)",
            ],
        ),
        (
            "a queue name with an empty subject token on nats://",
            app(concat!(
                "messaging:\n  broker: nats://127.0.0.1:4222\n  subscriptions:\n",
                "    - { queue: orders..created, path: /a, ordered: true }\n",
            )),
            vec![
                "outrigger.yaml:5:16: messaging.subscriptions[0].queue: starts or ends with '.', or holds '..': with broker nats:// each dot starts a subject token, and NATS refuses an empty token (expected a queue name whose dots each sit between two other characters, such as orders.created)",
            ],
        ),
        (
            "max_headers >= 1",
            s("outbound: { limits: { max_headers: 0 } }\n"),
            vec![
                "outrigger.yaml:1:36: outbound.limits.max_headers: must be from 1 to 1000 (expected a whole number from 1 to 1000, got 0)",
            ],
        ),
        (
            "max_header_bytes >= 1KiB",
            s("outbound: { limits: { max_header_bytes: 512 } }\n"),
            vec![
                "outrigger.yaml:1:41: outbound.limits.max_header_bytes: must be at least 1KiB (expected a size >= 1KiB, got 512B)",
            ],
        ),
        (
            "max_publish_buffer >= 1MiB",
            s("outbound: { limits: { max_publish_buffer: 512KiB } }\n"),
            vec![
                "outrigger.yaml:1:43: outbound.limits.max_publish_buffer: must be at least 1MiB, the largest payload (expected a size >= 1MiB, got 512KiB)",
            ],
        ),
        (
            "static lists at least one endpoint",
            s("upstreams:\n  a:\n    discovery: { static: [] }\n"),
            vec![
                "outrigger.yaml:3:26: upstreams.a.discovery.static: must list at least one endpoint (expected e.g. [\"10.0.0.7:8080\"])",
            ],
        ),
        (
            "an https etcd endpoint is refused: the etcd client speaks plain HTTP",
            s(
                "registry:\n  etcd: { endpoints: [\"http://10.0.0.4:2379\", \"https://10.0.0.5:2379\"] }\n",
            ),
            vec![
                "outrigger.yaml:2:47: registry.etcd.endpoints[1]: \"https://10.0.0.5:2379\" is refused: TLS to etcd is not supported (expected an http:// client URL, e.g. http://10.0.0.5:2379: give etcd a plain-HTTP client listener on a network you trust (--listen-client-urls))",
            ],
        ),
        (
            "etcd endpoints and lease",
            s("registry:\n  etcd: { endpoints: [\"127.0.0.1:2379\"], lease_ttl: 500ms }\n"),
            vec![
                "outrigger.yaml:2:23: registry.etcd.endpoints[0]: \"127.0.0.1:2379\" is not an etcd endpoint (expected http://HOST:PORT, e.g. http://127.0.0.1:2379)",
                "outrigger.yaml:2:53: registry.etcd.lease_ttl: must be at least 1s (expected at least 1s, e.g. 10s, got 500ms)",
            ],
        ),
        (
            "paths start with /",
            s(concat!(
                "service: { app: { url: http://127.0.0.1:8080, health_path: healthz } }\n",
                "messaging: { subscriptions: [{ queue: a, path: events/a }] }\n",
            )),
            vec![
                "outrigger.yaml:1:60: service.app.health_path: \"healthz\" does not start with / (expected a path such as /healthz)",
                "outrigger.yaml:2:48: messaging.subscriptions[0].path: \"events/a\" does not start with / (expected a path such as /healthz)",
            ],
        ),
        (
            "outlier ejection percent",
            up("    outlier_detection: { max_ejected_percent: 150 }\n"),
            vec![
                "outrigger.yaml:4:47: upstreams.payments.outlier_detection.max_ejected_percent: must be at most 100 (expected a whole number from 0 to 100, got 150)",
            ],
        ),
        (
            "log level words",
            s("telemetry:\n  log: { level: \"info,outrigger=verbose\" }\n"),
            vec![
                "outrigger.yaml:2:17: telemetry.log.level: \"outrigger=verbose\" is not a log level (expected trace, debug, info, warn, error or off, or directives such as info,outrigger=debug)",
            ],
        ),
        (
            "otlp endpoint is an http url",
            s("telemetry:\n  tracing: { otlp_endpoint: \"127.0.0.1:4318\" }\n"),
            vec![
                "outrigger.yaml:2:29: telemetry.tracing.otlp_endpoint: \"127.0.0.1:4318\" is not an http(s) URL (expected e.g. http://127.0.0.1:4318)",
            ],
        ),
        (
            "a tracing section needs a collector from the YAML or the environment",
            s("telemetry:\n  tracing: { sample_ratio: 0.5 }\n"),
            vec![
                "outrigger.yaml:2:12: telemetry.tracing.otlp_endpoint: missing: no collector to export spans to (expected e.g. http://127.0.0.1:4318, or OTEL_EXPORTER_OTLP_ENDPOINT in the environment)",
            ],
        ),
        (
            "export headers are HTTP's",
            s(
                "telemetry:\n  tracing:\n    otlp_endpoint: http://c:4318\n    headers: { \"bad name\": x, ok: \"a\\nb\" }\n",
            ),
            vec![
                "outrigger.yaml:4:28: telemetry.tracing.headers.bad name: \"bad name\" is not an HTTP header name (expected letters, digits and !#$%&'*+-.^_`|~)",
                "outrigger.yaml:4:35: telemetry.tracing.headers.ok: holds a control character (a line break?) (expected one line of text)",
            ],
        ),
        (
            "a fault injects something, with a share from 0 to 100 and an HTTP status",
            up("    fault: {}\n"),
            vec![
                "outrigger.yaml:4:12: upstreams.payments.fault: injects nothing (expected delay: { percent, duration }, abort: { percent, status }, or both)",
            ],
        ),
        (
            "fault shares and statuses",
            up(
                "    fault: { delay: { percent: 100.5, duration: 0s }, abort: { percent: 0.5, status: 99 } }\n",
            ),
            vec![
                "outrigger.yaml:4:32: upstreams.payments.fault.delay.percent: 100.5 is out of range (expected a percentage from 0 to 100, decimals allowed, e.g. 5 or 0.1)",
                "outrigger.yaml:4:86: upstreams.payments.fault.abort.status: out of range (expected an HTTP status from 200 to 599, e.g. 503, got 99)",
            ],
        ),
        (
            "a concurrency limit's mapping form, and a mode",
            up(
                "    concurrency_limit: { max: 3, mod: shadow }\n    rate_limit: { requests_per_second: 5, mode: shadw }\n",
            ),
            vec![
                "outrigger.yaml:4:34: upstreams.payments.concurrency_limit.mod: unknown field (expected one of: max, mode)",
                "outrigger.yaml:5:49: upstreams.payments.rate_limit.mode: unknown value \"shadw\" (expected one of: enforce, shadow)",
            ],
        ),
        // --- one problem, one line: no echoes of a refused value ---
        (
            "a refused item is not also an empty list",
            s("upstreams:\n  a:\n    discovery: { static: [\"nope\"] }\n"),
            vec![
                "outrigger.yaml:3:27: upstreams.a.discovery.static[0]: \"nope\" is not an endpoint (expected HOST:PORT, e.g. 10.0.0.7:8080 or payments.internal:8080)",
            ],
        ),
        (
            "a refused request timeout is not judged as its default",
            up("    timeouts: { request: soon, per_try: 30s }\n"),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.timeouts.request: \"soon\" is not a duration (expected e.g. 250ms, 5s, 1m)",
            ],
        ),
        (
            "a refused required value is not also missing",
            up("    rate_limit: { requests_per_second: 0 }\n"),
            vec![
                "outrigger.yaml:4:40: upstreams.payments.rate_limit.requests_per_second: 0 is out of range (expected a whole number from 1 to 4294967295)",
            ],
        ),
        (
            "paths keep the written index after a removal",
            app(concat!(
                "messaging:\n  subscriptions:\n",
                "    - { queue: \"bad queue\", path: /a }\n",
                "    - { queue: b, path: /b, timeout: 0s }\n",
            )),
            vec![
                "outrigger.yaml:4:16: messaging.subscriptions[0].queue: \"bad queue\" is not a valid queue name (expected 1 to 200 of A-Z, a-z, 0-9, '.', '_' and '-', e.g. registration.welcome_email)",
                "outrigger.yaml:5:38: messaging.subscriptions[1].timeout: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        (
            "dotted upstream names are found in the file",
            s(concat!(
                "upstreams:\n  payments.prod:\n    discovery: { static: [\"10.0.0.7:8080\"] }\n",
                "    timeouts: { request: 0s }\n",
            )),
            vec![
                "outrigger.yaml:4:26: upstreams.payments.prod.timeouts.request: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        // --- routes ---
        (
            "a route without a name",
            up("    routes:\n      - match: { path: /a }\n"),
            vec![
                "outrigger.yaml:5:9: upstreams.payments.routes[0].name: required field is missing",
            ],
        ),
        (
            "a route with an empty name",
            up("    routes:\n      - { name: \"\", match: { path: /a } }\n"),
            vec![
                "outrigger.yaml:5:17: upstreams.payments.routes[0].name: must not be empty (expected e.g. charge)",
            ],
        ),
        (
            "a route named like the label of unmatched requests",
            up("    routes:\n      - { name: (default) }\n"),
            vec![
                "outrigger.yaml:5:17: upstreams.payments.routes[0].name: is the label of requests no route matched (expected another name)",
            ],
        ),
        (
            "two routes of one upstream with one name",
            up(
                "    routes:\n      - { name: charge, match: { path: /a } }\n      - { name: charge, match: { path: /b } }\n",
            ),
            vec![
                "outrigger.yaml:6:17: upstreams.payments.routes[1].name: \"charge\" is already the name of routes[0] (expected a name unique within the upstream)",
            ],
        ),
        (
            "endpoint-level sections on a route",
            up(concat!(
                "    routes:\n      - name: charge\n",
                "        discovery: { static: [\"10.0.0.8:8080\"] }\n",
                "        load_balancer: random\n        protocol: http2\n        listen: 127.0.0.1:4999\n",
                "        circuit_breaker: { open_for: 5s }\n        health_check: { tcp: true }\n",
                "        tls: {}\n        outlier_detection: { consecutive_failures: 3 }\n",
            )),
            vec![
                "outrigger.yaml:6:20: upstreams.payments.routes[0].discovery: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:7:24: upstreams.payments.routes[0].load_balancer: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:8:19: upstreams.payments.routes[0].protocol: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:9:17: upstreams.payments.routes[0].listen: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:10:26: upstreams.payments.routes[0].circuit_breaker: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:11:23: upstreams.payments.routes[0].health_check: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:12:14: upstreams.payments.routes[0].tls: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
                "outrigger.yaml:13:28: upstreams.payments.routes[0].outlier_detection: not allowed on a route (expected a section a route may set: idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault; this one is the upstream's)",
            ],
        ),
        (
            "an unknown field on a route",
            up("    routes:\n      - { name: charge, chaos: { after: 50ms } }\n"),
            vec![
                "outrigger.yaml:5:25: upstreams.payments.routes[0].chaos: unknown field (expected one of: name, match, idempotent, timeouts, retry, rate_limit, concurrency_limit, hedge, fault, listen, discovery, load_balancer, protocol, circuit_breaker, health_check, tls, outlier_detection)",
            ],
        ),
        // --- hedge ---
        (
            "a hedge after 0 and with max_extra out of range",
            up("    retry: {}\n    hedge: { after: 0s, max_extra: 0 }\n"),
            vec![
                "outrigger.yaml:5:21: upstreams.payments.hedge.after: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:5:36: upstreams.payments.hedge.max_extra: out of range (expected a whole number from 1 to 4, got 0)",
            ],
        ),
        (
            "a hedge with too many extra attempts",
            up("    retry: {}\n    hedge: { after: 50ms, max_extra: 5 }\n"),
            vec![
                "outrigger.yaml:5:38: upstreams.payments.hedge.max_extra: out of range (expected a whole number from 1 to 4, got 5)",
            ],
        ),
        (
            "a hedge on an upstream without retry",
            up("    hedge: { after: 50ms }\n"),
            vec![
                "outrigger.yaml:4:12: upstreams.payments.hedge: needs a retry section (expected retry on this upstream or route: hedges draw on its budget and replay buffer)",
            ],
        ),
        (
            "a route's hedge with retry: off",
            up(
                "    retry: {}\n    routes:\n      - { name: charge, retry: off, hedge: { after: 50ms } }\n",
            ),
            vec![
                "outrigger.yaml:6:44: upstreams.payments.routes[0].hedge: needs a retry section (expected retry on this upstream or route: hedges draw on its budget and replay buffer)",
            ],
        ),
        (
            "a route's hedge on an upstream without retry",
            up("    routes:\n      - { name: charge, hedge: { after: 50ms } }\n"),
            vec![
                "outrigger.yaml:5:32: upstreams.payments.routes[0].hedge: needs a retry section (expected retry on this upstream or route: hedges draw on its budget and replay buffer)",
            ],
        ),
        (
            "an unknown match rule",
            up("    routes:\n      - { name: charge, match: { host: a } }\n"),
            vec![
                "outrigger.yaml:5:34: upstreams.payments.routes[0].match.host: unknown field (expected one of: path, path_prefix, methods, headers)",
            ],
        ),
        (
            "route paths start with /, and path and path_prefix exclude each other",
            up(concat!(
                "    routes:\n      - { name: a, match: { path: v1 } }\n",
                "      - { name: b, match: { path_prefix: v1 } }\n",
                "      - { name: c, match: { path: /v1, path_prefix: /v1 } }\n",
            )),
            vec![
                "outrigger.yaml:5:35: upstreams.payments.routes[0].match.path: \"v1\" does not start with / (expected a path such as /healthz)",
                "outrigger.yaml:6:42: upstreams.payments.routes[1].match.path_prefix: \"v1\" does not start with / (expected a path such as /healthz)",
                "outrigger.yaml:7:53: upstreams.payments.routes[2].match.path_prefix: not allowed beside path (expected one of path (exact) or path_prefix (whole segments))",
            ],
        ),
        (
            "a method in lowercase, a bad header name",
            up(
                "    routes:\n      - { name: a, match: { methods: [GET, post], headers: { \"x tenant\": gold } } }\n",
            ),
            vec![
                "outrigger.yaml:5:44: upstreams.payments.routes[0].match.methods[1]: \"post\" is not an HTTP method (expected a method in capitals, e.g. GET, POST)",
                "outrigger.yaml:5:60: upstreams.payments.routes[0].match.headers: \"x tenant\" is not a header name (expected a header name such as x-tenant)",
            ],
        ),
        (
            "a route's per_try past its own request timeout",
            up(
                "    timeouts: { request: 60s }\n    routes:\n      - { name: a, timeouts: { request: 1s, per_try: 2s } }\n",
            ),
            vec![
                "outrigger.yaml:6:54: upstreams.payments.routes[0].timeouts.per_try: must not exceed timeouts.request (expected at most 1s, got 2s)",
            ],
        ),
        (
            "a route's timeouts are greater than 0",
            up("    routes:\n      - { name: a, timeouts: { request: 0s, per_try: 0s } }\n"),
            vec![
                "outrigger.yaml:5:41: upstreams.payments.routes[0].timeouts.request: must be greater than 0 (expected a duration such as 1s)",
                "outrigger.yaml:5:54: upstreams.payments.routes[0].timeouts.per_try: must be greater than 0 (expected a duration such as 1s)",
            ],
        ),
        (
            "a route's timeouts take only per-call fields",
            up("    routes:\n      - { name: a, timeouts: { connect: 1s } }\n"),
            vec![
                "outrigger.yaml:5:32: upstreams.payments.routes[0].timeouts.connect: unknown field (expected one of: request, per_try)",
            ],
        ),
        (
            "a route's retry is a section or off",
            up(concat!(
                "    routes:\n      - { name: a, retry: on }\n",
                "      - { name: b, retry: { max_attemps: 2 } }\n",
                "      - { name: c, retry: { backoff: { initial: 2s, max: 1s } } }\n",
            )),
            vec![
                "outrigger.yaml:5:27: upstreams.payments.routes[0].retry: \"on\" is not valid (expected a retry section, or off)",
                "outrigger.yaml:6:29: upstreams.payments.routes[1].retry.max_attemps: unknown field (expected one of: max_attempts, backoff, on, budget, replay_buffer)",
                "outrigger.yaml:7:49: upstreams.payments.routes[2].retry.backoff.initial: must not exceed backoff.max (expected at most 1s, got 2s)",
            ],
        ),
    ]
}

#[test]
fn each_rule_prints_exactly_its_lines() {
    let mut failures = Vec::new();
    let rows = rows();
    for (name, yaml, expected) in &rows {
        let actual = match outrigger_config::load_str("outrigger.yaml", yaml) {
            Ok(_) => String::from("(loaded without problems)"),
            Err(e) => e.to_string(),
        };
        if actual != expected.join("\n") {
            failures.push(format!(
                "row {name:?}\n  yaml:\n{yaml}\n  expected:\n{}\n  actual:\n{actual}\n",
                expected.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// However a broker URL is malformed, its password is not in any line `validate`, `run` or a
/// refused reload prints, and the line still names the field and the URL's other parts.
#[test]
fn no_problem_prints_a_password() {
    for broker in [
        "redis://alice:s3cr3tPW@host:notaport/x",
        "redis://alice:s3cr/3tPW@redis.internal:6379",
        "redis://alice:s3cr3tPW@redis.internal:6379/db0",
        "rediss://:s3cr3tPW@redis.internal:6379/0?password=s3cr3tPW",
        "redis://alice:s3cr@3tPW@redis.internal:6379x",
    ] {
        // as the broker, in a list where the broker goes, as a key: wherever a line quotes it
        for (yaml, quoted) in [
            (format!("messaging: {{ broker: {broker:?} }}\n"), true),
            (format!("messaging: {{ broker: [{broker:?}] }}\n"), false),
            (format!("messaging: {{ {broker:?}: x }}\n"), true),
        ] {
            let Err(e) = outrigger_config::load_str("outrigger.yaml", &yaml) else {
                panic!("{yaml} should be refused");
            };
            let printed = e.to_string();
            assert!(!printed.contains("s3cr"), "the password is printed:\n{printed}");
            assert!(printed.starts_with("outrigger.yaml:1:"), "{printed}");
            if quoted {
                assert!(printed.contains(":***@"), "the rest of the URL is shown:\n{printed}");
            }
        }
    }
}

#[test]
fn problems_carry_their_parts() {
    let Err(outrigger_config::LoadError::Invalid(problems)) =
        outrigger_config::load_str("f.yaml", "lifecycle: { drain_timeout: soon }\n")
    else {
        panic!("should be invalid");
    };
    let problem = &problems.0[0];
    assert_eq!((problem.file.as_str(), problem.line, problem.col), ("f.yaml", 1, 29));
    assert_eq!(problem.path, "lifecycle.drain_timeout");
    assert_eq!(problem.message, "\"soon\" is not a duration");
    assert_eq!(problem.expected.as_deref(), Some("e.g. 250ms, 5s, 1m"));
}

/// A syntax error may be noticed only where the file ends, but is never reported past it: cut
/// anywhere, the full example's problems are each on a line the editor shows, at most just past
/// its last character. (The `config` fuzz target checks the same on any input.)
#[test]
fn every_position_lies_inside_the_file_wherever_it_is_cut() {
    let full = std::fs::read_to_string("tests/full.yaml").expect("the full example");
    // Cutting inside a word changes little but the word: cut where the syntax changes.
    let cuts = full.char_indices().filter(|(_, c)| !c.is_alphanumeric() && *c != '_');
    for (cut, _) in cuts {
        for text in [full[..cut].to_owned(), format!("{}\n", &full[..cut])] {
            let Err(outrigger_config::LoadError::Invalid(problems)) =
                outrigger_config::load_str("outrigger.yaml", &text)
            else {
                continue;
            };
            let mut lines: Vec<&str> = text.split('\n').collect();
            if lines.len() > 1 && lines.last() == Some(&"") {
                lines.pop();
            }
            for problem in problems.iter() {
                let line = lines.get(problem.line.wrapping_sub(1));
                let end = line.map_or(0, |l| l.chars().count() + 1);
                assert!(
                    (1..=end).contains(&problem.col),
                    "outside the file:\n{problem}\nin {} lines:\n{text}",
                    lines.len()
                );
            }
        }
    }
}
