//! `outrigger check`: what a sidecar started with this config would find, one line per check,
//! `✔` or `✘` with what to do (as `linkerd check`). It asks each dependency the way the sidecar
//! does: the config through the same loader, each upstream through its own discovery source
//! (static, DNS, file, etcd) then a TCP connect to its endpoints, the broker's own health
//! question, the app's health path, the app's outbox table, the OTLP collector. With `--admin`,
//! it asks a running sidecar instead (`/readyz`, `/v1/endpoints`).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outrigger_config::{self as config, Config};
use outrigger_discovery::{Endpoints, SourceConfig, Status};

use crate::error::chain;
use crate::messaging::broker::AnyRemote;

/// How long a source may take to give its first endpoint set, and a connect or an HTTP call.
const WAIT: Duration = Duration::from_secs(5);

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub ok: bool,
    /// What was checked, and what was found.
    pub what: String,
    /// For a failure: what to do.
    pub fix: Option<String>,
}

impl Line {
    fn ok(what: impl Into<String>) -> Line {
        Line { ok: true, what: what.into(), fix: None }
    }

    fn failed(what: impl Into<String>, fix: impl Into<String>) -> Line {
        Line { ok: false, what: what.into(), fix: Some(fix.into()) }
    }
}

/// The lines as printed: `✔ what`, or `✘ what` and an indented `fix:` line.
pub fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for line in lines {
        out.push_str(if line.ok { "✔ " } else { "✘ " });
        out.push_str(&line.what);
        out.push('\n');
        if let Some(fix) = &line.fix {
            for (n, text) in fix.lines().enumerate() {
                out.push_str(if n == 0 { "    fix: " } else { "         " });
                out.push_str(text);
                out.push('\n');
            }
        }
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    match failed {
        0 => out.push_str(&format!("all {} checks passed\n", lines.len())),
        n => out.push_str(&format!("{n} of {} checks failed\n", lines.len())),
    }
    out
}

/// Every check of the config file at `path`.
pub async fn config_file(path: &Path) -> Vec<Line> {
    let config = match config::load_file(path) {
        Ok(config) => config,
        Err(problems) => {
            let what = format!("config {} is invalid:\n{problems}", path.display());
            let fix = "correct the lines above (`outrigger validate --config FILE` prints them)";
            return vec![Line::failed(what.trim_end(), fix)];
        }
    };
    let mut lines = vec![Line::ok(format!("config {} is valid", path.display()))];
    let sources =
        SourceConfig { resolver: config.resolver.clone(), registry: config.registry.clone() };
    for upstream in &config.upstreams {
        lines.push(upstream_line(upstream, &sources).await);
    }
    if let Some(registry) = &config.registry {
        lines.push(registry_line(&registry.etcd).await);
    }
    lines.extend(broker_lines(&config).await);
    if let Some(app) = &config.service.app {
        lines.push(app_line(app).await);
    }
    match config.telemetry.export(&|name| std::env::var(name).ok()) {
        Ok(Some(export)) => lines.push(collector_line(&export).await),
        Ok(None) => {}
        Err(error) => lines.push(Line::failed(
            format!("collector: {error}"),
            "correct telemetry.tracing.otlp_endpoint or the OTEL_EXPORTER_OTLP_* variables",
        )),
    }
    lines
}

/// An upstream: its source gives endpoints, and at least one accepts a connection.
async fn upstream_line(upstream: &config::Upstream, sources: &SourceConfig) -> Line {
    let name = upstream.name.as_str();
    let endpoints = Endpoints::start(name, &upstream.discovery, sources);
    let source = endpoints.source();
    let fix_source = format!("correct upstreams.{name}.discovery, or start what it names");
    let started = tokio::time::Instant::now();
    let snapshot = loop {
        let snapshot = endpoints.snapshot();
        let settled = !matches!(snapshot.status, Status::Pending);
        if settled || started.elapsed() >= WAIT {
            break snapshot;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match (&snapshot.status, snapshot.endpoints.is_empty()) {
        (Status::Pending, _) => {
            let what =
                format!("upstream {name}: its {source} source gave no answer within {WAIT:?}");
            return Line::failed(what, fix_source);
        }
        (Status::Failing(why), _) => {
            return Line::failed(
                format!("upstream {name}: its {source} source fails: {why}"),
                fix_source,
            );
        }
        (Status::Ready, true) => {
            return Line::failed(
                format!("upstream {name}: its {source} source lists no endpoint"),
                fix_source,
            );
        }
        (Status::Ready, false) => {}
    }
    // with `tls`, the connector the sidecar would use: TCP, then the handshake it verifies
    let tls = upstream.tls.as_ref().map(|tls| crate::http::tls::Origination::new(name, tls));
    let connects = snapshot.endpoints.iter().map(|endpoint| {
        let tls = tls.clone();
        async move {
            let addr = endpoint.addr;
            if let Some(tls) = tls {
                return handshake(&tls, addr).await.map(|()| addr);
            }
            match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(addr),
                Ok(Err(error)) => Err(format!("{addr}: {error}")),
                Err(_) => Err(format!("{addr}: no answer within {WAIT:?}")),
            }
        }
    });
    let results = futures_util::future::join_all(connects).await;
    let reachable = results.iter().filter(|r| r.is_ok()).count();
    let total = results.len();
    if reachable == 0 {
        let errors: Vec<&str> =
            results.iter().filter_map(|r| r.as_ref().err()).map(String::as_str).collect();
        let what =
            format!("upstream {name}: no endpoint accepts a connection ({})", errors.join("; "));
        let fix = match &upstream.tls {
            Some(_) => format!(
                "start {name}, or correct upstreams.{name}.tls (its CA, server_name) or {fix_source}"
            ),
            None => format!("start {name}, or {fix_source}"),
        };
        return Line::failed(what, fix);
    }
    let how = if tls.is_some() { "a TLS connection" } else { "a connection" };
    Line::ok(format!("upstream {name}: {reachable} of {total} endpoints accept {how} ({source})"))
}

/// A TLS connection to `addr` through the upstream's own connector: TCP, then the handshake,
/// its certificate verified as a request's would be.
async fn handshake(
    tls: &crate::http::tls::Origination,
    addr: std::net::SocketAddr,
) -> Result<(), String> {
    use tower::ServiceExt;
    let connector =
        tls.connector(hyper_util::client::legacy::connect::HttpConnector::new(), WAIT, false);
    let uri: http::Uri = format!("https://{addr}/").parse().map_err(|e| format!("{addr}: {e}"))?;
    match connector.oneshot(uri).await {
        Ok(_) => Ok(()),
        Err(error) => Err(format!("{addr}: {}", chain(&*error))),
    }
}

/// The etcd registry: one of its endpoints accepts a connection.
async fn registry_line(etcd: &config::Etcd) -> Line {
    let mut errors = Vec::new();
    for endpoint in &etcd.endpoints {
        let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
        match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(authority)).await {
            Ok(Ok(_)) => {
                return Line::ok(format!("registry: etcd at {endpoint} accepts a connection"));
            }
            Ok(Err(error)) => errors.push(format!("{endpoint}: {error}")),
            Err(_) => errors.push(format!("{endpoint}: no answer within {WAIT:?}")),
        }
    }
    Line::failed(
        format!("registry: no etcd endpoint accepts a connection ({})", errors.join("; ")),
        "start etcd, or correct registry.etcd.endpoints",
    )
}

/// The broker, and the app's outbox table when there is one.
async fn broker_lines(config: &Config) -> Vec<Line> {
    let messaging = &config.messaging;
    let mut lines = Vec::new();
    let retention = crate::messaging::retention(messaging);
    match AnyRemote::from_config(messaging, config.service.name.as_str(), retention) {
        Ok(None) => lines.push(data_dir_line(&messaging.data_dir)),
        Ok(Some(remote)) => {
            let url = messaging.broker.to_string();
            match tokio::time::timeout(WAIT, remote.ping()).await {
                Ok(Ok(())) => lines.push(Line::ok(format!("broker {url} answers"))),
                Ok(Err(error)) => lines.push(Line::failed(
                    format!("broker {url}: {}", chain(&error)),
                    "start the broker, or correct messaging.broker (and messaging.tls)",
                )),
                Err(_) => lines.push(Line::failed(
                    format!("broker {url}: no answer within {WAIT:?}"),
                    "start the broker, or correct messaging.broker",
                )),
            }
            lines.push(data_dir_line(&messaging.data_dir));
        }
        Err(error) => lines.push(Line::failed(
            format!("broker {}: {error}", messaging.broker),
            "correct messaging.broker or messaging.tls",
        )),
    }
    if let Some(outbox) = &messaging.app_outbox {
        let table = outbox.table.as_str();
        lines.push(match crate::messaging::app_outbox::check(outbox).await {
            Ok(()) => Line::ok(format!("app outbox: table {table} is there and readable")),
            Err(error) => Line::failed(
                format!("app outbox: {}", chain(&error)),
                format!(
                    "start PostgreSQL or correct messaging.app_outbox; the table and its trigger:\n{}",
                    crate::messaging::app_outbox::ddl(&outbox.table).trim_end()
                ),
            ),
        });
    }
    lines
}

/// The outbox's directory: it exists (or can be made) and takes a file.
fn data_dir_line(dir: &Path) -> Line {
    let probe = dir.join(".outrigger-check");
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"check"))
        .and_then(|()| std::fs::remove_file(&probe));
    match written {
        Ok(()) => Line::ok(format!("messaging.data_dir {} is writable", dir.display())),
        Err(error) => Line::failed(
            format!("messaging.data_dir {}: {error}", dir.display()),
            "give the sidecar a writable directory (an emptyDir or a volume) and name it in messaging.data_dir",
        ),
    }
}

/// The app's health path answers 2xx (or, without one, its port accepts a connection).
async fn app_line(app: &config::App) -> Line {
    // an IPv6 address keeps its brackets: `[::1]:8080`
    let host = app.url.host();
    let authority = match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]:{}", app.url.port()),
        false => format!("{host}:{}", app.url.port()),
    };
    let Some(path) = &app.health_path else {
        return match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(&authority)).await {
            Ok(Ok(_)) => Line::ok(format!("app at {authority} accepts a connection")),
            _ => Line::failed(
                format!("app at {authority} accepts no connection"),
                "start the app, or correct service.app.url",
            ),
        };
    };
    let url = format!("http://{authority}{}{path}", app.url.base_path());
    match get(&url).await {
        Ok(status) if (200..300).contains(&status) => {
            Line::ok(format!("app health {url} answers {status}"))
        }
        Ok(status) => Line::failed(
            format!("app health {url} answers {status}"),
            "the app is up but says it is not healthy: see its logs",
        ),
        Err(error) => Line::failed(
            format!("app health {url}: {error}"),
            "start the app, or correct service.app.url and health_path",
        ),
    }
}

/// The OTLP collector takes an (empty) export, sent as the sidecar sends its spans.
async fn collector_line(export: &config::Export) -> Line {
    let url = &export.url;
    match crate::telemetry::otlp::probe(export, WAIT).await {
        Ok(()) => Line::ok(format!("collector {url} takes spans")),
        Err(error) => Line::failed(
            format!("collector {url}: {error}"),
            format!(
                "start the collector, or correct {} (its address, ca_file, headers)",
                export.url_from
            ),
        ),
    }
}

async fn get(url: &str) -> Result<u16, String> {
    let req = http::Request::get(url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    send(req).await
}

/// The status of one plain-HTTP call, within [`WAIT`].
async fn send(req: http::Request<Full<Bytes>>) -> Result<u16, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    match tokio::time::timeout(WAIT, client.request(req)).await {
        Ok(Ok(res)) => {
            // the status is the answer: the body is not waited for (a stalled one cannot hang)
            Ok(res.status().as_u16())
        }
        Ok(Err(error)) => Err(chain(&error)),
        Err(_) => Err(format!("no answer within {WAIT:?}")),
    }
}

/// What a running sidecar says of itself: each `/readyz` check, and each upstream's endpoints.
pub async fn admin(url: &str) -> Result<Vec<Line>, String> {
    let base = url.trim_end_matches('/');
    let ready = fetch_json(&format!("{base}/readyz")).await?;
    let mut lines = vec![Line::ok(format!(
        "sidecar at {base} answers ({})",
        ready["status"].as_str().unwrap_or("?")
    ))];
    if let Some(checks) = ready["checks"].as_object() {
        for (name, check) in checks {
            let status = check["status"].as_str().unwrap_or("?");
            let detail = check["detail"].as_str().filter(|d| !d.is_empty());
            let what = match detail {
                Some(detail) => format!("{name}: {status}: {detail}"),
                None => format!("{name}: {status}"),
            };
            lines.push(match status {
                "ok" => Line::ok(what),
                _ => Line::failed(what, fix_for(name)),
            });
        }
    }
    let endpoints = fetch_json(&format!("{base}/v1/endpoints")).await?;
    if let Some(upstreams) = endpoints["upstreams"].as_object() {
        for (name, upstream) in upstreams {
            let all = upstream["endpoints"].as_array().cloned().unwrap_or_default();
            let healthy = all.iter().filter(|e| e["state"] == "healthy").count();
            let what = format!("upstream {name}: {healthy} of {} endpoints healthy", all.len());
            lines.push(match healthy {
                0 => Line::failed(what, format!("see /v1/endpoints for each endpoint's state; correct upstreams.{name}.discovery or start {name}")),
                _ => Line::ok(what),
            });
        }
    }
    Ok(lines)
}

/// What to do about a failing `/readyz` check, by its name.
fn fix_for(check: &str) -> String {
    match check {
        "app" => "start the app, or correct service.app.url and health_path".into(),
        "broker" => "start the broker, or correct messaging.broker".into(),
        "app_outbox" => "start PostgreSQL, or correct messaging.app_outbox".into(),
        "listeners" => "see the sidecar's log: a listener could not bind".into(),
        name if name.starts_with("upstream.") => {
            format!("correct upstreams.{}.discovery, or start it", &name["upstream.".len()..])
        }
        _ => "see the sidecar's log".into(),
    }
}

async fn fetch_json(url: &str) -> Result<serde_json::Value, String> {
    let req =
        http::Request::get(url).body(Full::new(Bytes::new())).map_err(|e| format!("{url}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = match tokio::time::timeout(WAIT, client.request(req)).await {
        Ok(Ok(res)) => res,
        Ok(Err(error)) => {
            return Err(format!("cannot reach the sidecar at {url}: {}", chain(&error)));
        }
        Err(_) => return Err(format!("the sidecar at {url} gave no answer within {WAIT:?}")),
    };
    let body = http_body_util::Limited::new(res.into_body(), 1 << 20).collect();
    let bytes = match tokio::time::timeout(WAIT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) => return Err(format!("{url}: {error}")),
        Err(_) => {
            return Err(format!("the sidecar at {url} did not finish its answer within {WAIT:?}"));
        }
    };
    serde_json::from_slice(&bytes).map_err(|_| {
        format!("{url} did not answer JSON: {}", String::from_utf8_lossy(&bytes).trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_its_fix_and_the_tally_says_how_many_failed() {
        let lines = [
            Line::ok("config x.yaml is valid"),
            Line::failed("upstream payments: no endpoint accepts a connection", "start it\nor not"),
        ];
        assert_eq!(
            render(&lines),
            "✔ config x.yaml is valid\n\
             ✘ upstream payments: no endpoint accepts a connection\n    fix: start it\n         or not\n\
             1 of 2 checks failed\n"
        );
    }
}
