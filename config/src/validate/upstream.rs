//! The rules of one upstream: discovery that can find endpoints, timeouts that fit together,
//! a health check that checks one thing.

use super::Checks;
use crate::model::{Discovery, DnsRecord, Fault, Hedge, Tls, Upstream};
use crate::types::is_host;

impl Checks {
    pub(super) fn upstream(&mut self, upstream: &Upstream, has_registry: bool) {
        let path = format!("upstreams.{}", upstream.name);
        self.discovery(&format!("{path}.discovery"), &upstream.discovery, has_registry);

        let timeouts = &upstream.timeouts;
        self.positive(format!("{path}.timeouts.connect"), timeouts.connect);
        self.positive(format!("{path}.timeouts.request"), timeouts.request);
        self.positive(format!("{path}.timeouts.idle"), timeouts.idle);
        if let Some(per_try) = timeouts.per_try {
            self.positive(format!("{path}.timeouts.per_try"), per_try);
            if per_try > timeouts.request {
                let expected = format!("at most {}, got {per_try}", timeouts.request);
                self.push(
                    format!("{path}.timeouts.per_try"),
                    "must not exceed timeouts.request",
                    Some(&expected),
                )
                .reading(format!("{path}.timeouts.request"));
            }
        }
        if let Some(retry) = &upstream.retry {
            self.backoff(&format!("{path}.retry.backoff"), &retry.backoff);
        }
        if let Some(breaker) = &upstream.circuit_breaker {
            self.positive(format!("{path}.circuit_breaker.window"), breaker.window);
            self.positive(format!("{path}.circuit_breaker.open_for"), breaker.open_for);
        }
        if let Some(check) = &upstream.health_check {
            let at = format!("{path}.health_check");
            let expected = Some("exactly one of: path, tcp: true");
            match (&check.path, check.tcp) {
                (None, false) => {
                    self.push(&at, "checks nothing", expected);
                }
                (Some(_), true) => {
                    self.push(&at, "has both path and tcp: true", expected);
                }
                (Some(p), false) => self.absolute_path(format!("{at}.path"), p),
                (None, true) => {}
            }
            self.positive(format!("{at}.interval"), check.interval);
            self.positive(format!("{at}.timeout"), check.timeout);
        }
        if let Some(tls) = &upstream.tls {
            self.tls(&format!("{path}.tls"), tls);
        }
        if let Some(hedge) = &upstream.hedge {
            self.hedge(&format!("{path}.hedge"), hedge, upstream.retry.is_some());
        }
        if let Some(fault) = &upstream.fault {
            self.fault(&format!("{path}.fault"), fault);
        }
        self.routes(&path, upstream);
        if let Some(outlier) = &upstream.outlier_detection {
            self.positive(format!("{path}.outlier_detection.base_ejection"), outlier.base_ejection);
            if outlier.max_ejected_percent > 100 {
                let expected =
                    format!("a whole number from 0 to 100, got {}", outlier.max_ejected_percent);
                self.push(
                    format!("{path}.outlier_detection.max_ejected_percent"),
                    "must be at most 100",
                    Some(&expected),
                );
            }
        }
    }

    /// `hedge`: a delay, a cap, and a `retry` section to lend its budget and replay buffer.
    pub(super) fn hedge(&mut self, at: &str, hedge: &Hedge, retry: bool) {
        self.positive(format!("{at}.after"), hedge.after);
        if !(1..=Hedge::MAX_EXTRA).contains(&hedge.max_extra) {
            let expected =
                format!("a whole number from 1 to {}, got {}", Hedge::MAX_EXTRA, hedge.max_extra);
            self.push(format!("{at}.max_extra"), "out of range", Some(&expected));
        }
        if !retry {
            self.push(
                at,
                "needs a retry section",
                Some(
                    "retry on this upstream or route: hedges draw on its budget and replay buffer",
                ),
            );
        }
    }

    /// `fault`: a delay, an abort or both; a delay that lasts; a status HTTP has.
    pub(super) fn fault(&mut self, at: &str, fault: &Fault) {
        if fault.delay.is_none() && fault.abort.is_none() {
            let expected = "delay: { percent, duration }, abort: { percent, status }, or both";
            self.push(at, "injects nothing", Some(expected));
        }
        if let Some(delay) = &fault.delay {
            self.positive(format!("{at}.delay.duration"), delay.duration);
        }
        if let Some(abort) = &fault.abort
            && !(200..=599).contains(&abort.status)
        {
            let expected =
                format!("an HTTP status from 200 to 599, e.g. 503, got {}", abort.status);
            self.push(format!("{at}.abort.status"), "out of range", Some(&expected));
        }
    }

    /// The names and pairs; the files themselves are read at startup (`proxy::http::tls`).
    pub(super) fn tls(&mut self, path: &str, tls: &Tls) {
        if let Some(name) = tls.server_name.as_deref()
            && !is_host(name)
        {
            let message = format!("{name:?} is not a DNS name or IP address");
            self.push(format!("{path}.server_name"), message, Some("e.g. api.example.com"));
        }
        for (field, file) in
            [("ca_file", &tls.ca_file), ("cert_file", &tls.cert_file), ("key_file", &tls.key_file)]
        {
            if let Some(file) = file {
                self.not_empty(format!("{path}.{field}"), &file.to_string_lossy());
            }
        }
        let expected =
            Some("both cert_file and key_file (a client certificate and its key), or neither");
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                self.push(format!("{path}.cert_file"), "needs key_file beside it", expected);
            }
            (None, Some(_)) => {
                self.push(format!("{path}.key_file"), "needs cert_file beside it", expected);
            }
            _ => {}
        }
    }

    fn discovery(&mut self, path: &str, discovery: &Discovery, has_registry: bool) {
        match discovery {
            Discovery::Static(endpoints) if endpoints.is_empty() => {
                let expected = Some("e.g. [\"10.0.0.7:8080\"]");
                let at = format!("{path}.static");
                // Reads its own list: an empty list may be what is left after refusing every item.
                self.push(&at, "must list at least one endpoint", expected).reading(at.clone());
            }
            Discovery::Static(_) => {}
            Discovery::Dns(dns) => {
                let at = format!("{path}.dns");
                if !is_host(&dns.name) {
                    let message = format!("{:?} is not a DNS name", dns.name);
                    self.push(
                        format!("{at}.name"),
                        message,
                        Some("e.g. payments.prod.svc.cluster.local"),
                    );
                }
                match (dns.record, dns.port) {
                    (DnsRecord::Srv, Some(_)) => {
                        let expected = Some("no port: SRV records carry their own");
                        self.push(format!("{at}.port"), "not allowed with record srv", expected);
                    }
                    (DnsRecord::A | DnsRecord::Aaaa, None) => {
                        let record = if dns.record == DnsRecord::A { "a" } else { "aaaa" };
                        let message = format!("required with record {record}");
                        self.push(
                            format!("{at}.port"),
                            message,
                            Some("the port to connect to, e.g. 8080"),
                        );
                    }
                    (DnsRecord::A | DnsRecord::Aaaa, Some(0)) => {
                        self.push(
                            format!("{at}.port"),
                            "must not be 0",
                            Some("a port from 1 to 65535"),
                        );
                    }
                    _ => {}
                }
                self.positive(format!("{at}.refresh"), dns.refresh);
            }
            Discovery::File(file) => {
                self.not_empty(format!("{path}.file"), &file.to_string_lossy())
            }
            Discovery::Registry(registry) => {
                self.not_empty(format!("{path}.registry.service"), &registry.service);
                if !has_registry {
                    let expected =
                        Some("registry: { etcd: { endpoints: [...] } } at the top level");
                    self.push(
                        format!("{path}.registry"),
                        "needs the top-level registry section",
                        expected,
                    )
                    .reading("registry");
                }
            }
        }
    }
}
