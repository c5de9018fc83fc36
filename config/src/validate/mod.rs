//! Rules that span fields or sections, run on the deserialized `Config`. Each pushes an
//! `Issue` with a field path and goes on, so one run finds every problem; `load` turns the
//! path into a position. Types already refused what a single value can get wrong.

mod messaging;
mod route;
mod upstream;

use crate::model::{Backoff, Config, ExportError, Registry, Telemetry};
use crate::types::{ByteSize, Duration, HttpUrl, redact};

/// What to do about an `https://` etcd endpoint.
const ETCD_PLAIN_HTTP: &str = "an http:// client URL, e.g. http://10.0.0.5:2379: \
    give etcd a plain-HTTP client listener on a network you trust (--listen-client-urls)";

/// A broken rule, before it has a position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub(crate) path: String,
    pub(crate) message: String,
    pub(crate) expected: Option<String>,
    /// Other paths the rule read. When one of them, or anything inside one, was refused and
    /// replaced by its default, the rule judged a stand-in, and `load` drops the issue.
    pub(crate) reads: Vec<String>,
}

/// Every rule the config breaks, in no particular order.
pub(crate) fn validate(config: &Config) -> Vec<Issue> {
    let mut checks = Checks::default();
    checks.service(config);
    checks.outbound(config);
    checks.listeners(config);
    for upstream in &config.upstreams {
        checks.upstream(upstream, config.registry.is_some());
    }
    if let Some(registry) = &config.registry {
        checks.registry(registry);
    }
    checks.messaging(&config.messaging, config.service.app.is_some());
    checks.telemetry(&config.telemetry);
    if config.runtime.workers == Some(0) {
        checks.push("runtime.workers", "must be at least 1", Some("a whole number >= 1, got 0"));
    }
    checks.issues
}

impl Issue {
    /// Notes another path the rule read.
    fn reading(&mut self, path: impl Into<String>) {
        self.reads.push(path.into());
    }
}

#[derive(Debug, Default)]
struct Checks {
    issues: Vec<Issue>,
}

impl Checks {
    fn push(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        expected: Option<&str>,
    ) -> &mut Issue {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
            expected: expected.map(str::to_owned),
            reads: Vec::new(),
        });
        self.issues.last_mut().expect("just pushed")
    }

    /// For timeouts, intervals and windows, where zero would mean "never" or "always".
    fn positive(&mut self, path: impl Into<String>, duration: Duration) {
        if duration.is_zero() {
            self.push(path, "must be greater than 0", Some("a duration such as 1s"));
        }
    }

    fn absolute_path(&mut self, path: impl Into<String>, value: &str) {
        if !value.starts_with('/') {
            self.push(
                path,
                format!("{value:?} does not start with /"),
                Some("a path such as /healthz"),
            );
        }
    }

    fn not_empty(&mut self, path: impl Into<String>, value: &str) {
        if value.trim().is_empty() {
            self.push(path, "must not be empty", None);
        }
    }

    /// One backoff, for HTTP retries or message redelivery.
    fn backoff(&mut self, path: &str, backoff: &Backoff) {
        if backoff.initial > backoff.max {
            let message = "must not exceed backoff.max";
            let expected = format!("at most {}, got {}", backoff.max, backoff.initial);
            self.push(format!("{path}.initial"), message, Some(&expected))
                .reading(format!("{path}.max"));
        }
        if !(backoff.multiplier >= 1.0 && backoff.multiplier.is_finite()) {
            let expected = format!("a number >= 1.0, got {}", backoff.multiplier);
            self.push(format!("{path}.multiplier"), "must be at least 1.0", Some(&expected));
        }
        if let Some(step) = backoff.step {
            self.positive(format!("{path}.step"), step);
        }
    }

    fn service(&mut self, config: &Config) {
        let service = &config.service;
        self.not_empty("service.name", &service.name);
        if let Some(path) = service.app.as_ref().and_then(|app| app.health_path.as_deref()) {
            self.absolute_path("service.app.health_path", path);
        }
        if service.register && config.registry.is_none() {
            let expected = Some("registry: { etcd: { endpoints: [...] } }");
            self.push("service.register", "needs the top-level registry section", expected)
                .reading("registry");
        }
        if service.register && service.app.is_none() {
            let expected = Some("service.app.url, the instance to register");
            self.push("service.register", "needs service.app", expected).reading("service.app");
        }
    }

    fn outbound(&mut self, config: &Config) {
        let limits = &config.outbound.limits;
        let path = "outbound.limits";
        if limits.max_header_bytes < ByteSize::kib(1) {
            let expected = format!("a size >= 1KiB, got {}", limits.max_header_bytes);
            self.push(format!("{path}.max_header_bytes"), "must be at least 1KiB", Some(&expected));
        }
        if !(1..=1000).contains(&limits.max_headers) {
            let expected = format!("a whole number from 1 to 1000, got {}", limits.max_headers);
            self.push(format!("{path}.max_headers"), "must be from 1 to 1000", Some(&expected));
        }
        for (field, value) in
            [("max_connections", limits.max_connections), ("max_requests", limits.max_requests)]
        {
            if value == 0 {
                self.push(
                    format!("{path}.{field}"),
                    "must be at least 1",
                    Some("a whole number >= 1, got 0"),
                );
            }
        }
        // one whole payload must fit, or a publish of the largest size could never succeed
        if limits.max_publish_buffer < ByteSize::kib(1024) {
            let expected = format!("a size >= 1MiB, got {}", limits.max_publish_buffer);
            let field = format!("{path}.max_publish_buffer");
            self.push(field, "must be at least 1MiB, the largest payload", Some(&expected));
        }
        self.positive(format!("{path}.header_read_timeout"), limits.header_read_timeout);
        self.positive(format!("{path}.idle_timeout"), limits.idle_timeout);
    }

    /// Two listeners on one port cannot both bind: the later is reported, naming the earlier.
    /// A wildcard address (`0.0.0.0`) takes the port on every address of its family.
    fn listeners(&mut self, config: &Config) {
        let mut bound = vec![
            ("outbound.listen".to_owned(), config.outbound.listen.get()),
            ("admin.listen".to_owned(), config.admin.listen.get()),
        ];
        bound.extend(
            config
                .upstreams
                .iter()
                .filter_map(|u| Some((format!("upstreams.{}.listen", u.name), u.listen?.get()))),
        );
        for (i, (path, addr)) in bound.iter().enumerate() {
            let clash = bound[..i].iter().find(|(_, earlier)| {
                let same_ip = earlier.ip() == addr.ip()
                    || (earlier.is_ipv4() == addr.is_ipv4()
                        && (earlier.ip().is_unspecified() || addr.ip().is_unspecified()));
                addr.port() != 0 && earlier.port() == addr.port() && same_ip
            });
            if let Some((earlier_path, _)) = clash {
                let message = format!("listen address {addr} is already used by {earlier_path}");
                self.push(path.clone(), message, None).reading(earlier_path.clone());
            }
        }
    }

    fn registry(&mut self, registry: &Registry) {
        let etcd = &registry.etcd;
        if etcd.endpoints.is_empty() {
            let expected = Some("e.g. [\"http://127.0.0.1:2379\"]");
            // Reads its own list: an empty list may be what is left after refusing every item.
            self.push("registry.etcd.endpoints", "must list at least one endpoint", expected)
                .reading("registry.etcd.endpoints");
        }
        for (i, endpoint) in etcd.endpoints.iter().enumerate() {
            let path = format!("registry.etcd.endpoints[{i}]");
            let url = HttpUrl::parse(endpoint).filter(|u| u.port.is_some() && u.path.is_empty());
            match url {
                None => {
                    let message = format!("{:?} is not an etcd endpoint", redact(endpoint));
                    self.push(path, message, Some("http://HOST:PORT, e.g. http://127.0.0.1:2379"));
                }
                // The gateway client speaks plain HTTP only: refused here, not at run time as
                // an endpoint that never answers.
                Some(url) if url.https => {
                    let message =
                        format!("{:?} is refused: TLS to etcd is not supported", redact(endpoint));
                    self.push(path, message, Some(ETCD_PLAIN_HTTP));
                }
                Some(_) => {}
            }
        }
        self.absolute_path("registry.etcd.prefix", &etcd.prefix);
        if etcd.lease_ttl < Duration::from_secs(1) {
            let expected = format!("at least 1s, e.g. 10s, got {}", etcd.lease_ttl);
            self.push("registry.etcd.lease_ttl", "must be at least 1s", Some(&expected));
        }
    }

    fn telemetry(&mut self, telemetry: &Telemetry) {
        if let Err(word) = check_log_level(&telemetry.log.level) {
            let message = format!("{word:?} is not a log level");
            let expected = Some(
                "trace, debug, info, warn, error or off, or directives such as info,outrigger=debug",
            );
            self.push("telemetry.log.level", message, expected);
        }
        match telemetry.export(&|name| std::env::var(name).ok()) {
            Ok(_) => {}
            Err(ExportError::Missing) => {
                let expected =
                    "e.g. http://127.0.0.1:4318, or OTEL_EXPORTER_OTLP_ENDPOINT in the environment";
                self.push(
                    "telemetry.tracing.otlp_endpoint",
                    "missing: no collector to export spans to",
                    Some(expected),
                );
            }
            Err(ExportError::Grpc { var }) => {
                let message = format!("missing, and {var}=grpc (Outrigger exports OTLP over HTTP)");
                self.push(
                    "telemetry.tracing.otlp_endpoint",
                    message,
                    Some("the collector's OTLP/HTTP port, e.g. http://otel-collector:4318"),
                );
            }
            Err(ExportError::NotAUrl { from, value }) => {
                let message = format!("{:?} is not an http(s) URL", redact(&value));
                // a variable's problem is reported at the section that turned export on
                let field = if from.starts_with("OTEL_") { "telemetry" } else { from };
                let message = if field == from { message } else { format!("{from}: {message}") };
                self.push(field, message, Some("e.g. http://127.0.0.1:4318"));
            }
        }
        if let Some(tracing) = &telemetry.tracing {
            if let Some(name) = &tracing.service_name {
                self.not_empty("telemetry.tracing.service_name", name);
            }
            for (name, value) in &tracing.headers {
                let field = format!("telemetry.tracing.headers.{name}");
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    self.push(
                        &field,
                        format!("{name:?} is not an HTTP header name"),
                        Some("letters, digits and !#$%&'*+-.^_`|~"),
                    );
                } else if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                    self.push(
                        &field,
                        "holds a control character (a line break?)",
                        Some("one line of text"),
                    );
                }
            }
        }
    }
}

/// tracing's EnvFilter syntax, restricted to what a typo can break: `level` or
/// `target=level`, comma-separated. A bare word is a level here, not a target, so `verbose`
/// is refused instead of silently meaning "everything from a module named verbose".
fn check_log_level(directives: &str) -> Result<(), &str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word));
    let is_target = |word: &str| {
        !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-.".contains(&b))
    };
    for directive in directives.split(',').map(str::trim) {
        let ok = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(directive);
        }
    }
    Ok(())
}

/// A byte of an HTTP token (RFC 9110 5.6.2): what a header name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::check_log_level;

    #[test]
    fn log_levels_and_directives() {
        for ok in
            ["info", "WARN", "off", "info,outrigger=debug", "outrigger::http=trace, hyper=warn"]
        {
            assert_eq!(check_log_level(ok), Ok(()), "{ok}");
        }
        for (bad, word) in
            [("verbose", "verbose"), ("info,", ""), ("=debug", "=debug"), ("info,x=loud", "x=loud")]
        {
            assert_eq!(check_log_level(bad), Err(word), "{bad}");
        }
    }
}
