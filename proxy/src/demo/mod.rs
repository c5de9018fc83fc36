//! `outrigger demo`: scripted upstreams, a sidecar on `examples/demo.yaml`, traffic, and a
//! live table of what the sidecar did with it. Each capability adds its scene here.

mod messages;
mod operator;
mod upstreams;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http::header::HOST;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::http::Body;
use crate::http::respond::ERROR_HEADER;
use crate::{app, config};
use upstreams::Behaviour;

/// The demo's configuration; the scripted upstreams' addresses replace its 127.0.0.1:1808x.
const DEMO_YAML: &str = include_str!("../../../examples/demo.yaml");

/// The scenes: the `Host` a request names, and what happens there.
const SCENES: [(&str, &str); 10] = [
    ("healthy", "answers 200 at once"),
    ("flaky", "every third answer is a 503; the sidecar retries it (up to 3 attempts)"),
    ("slow", "answers after 150-300 ms; the sidecar's request timeout is 250 ms"),
    ("outage", "fails from 4 s to 12 s; the circuit breaker opens, probes, and closes"),
    ("burst", "healthy, but rate-limited to 5 requests/s; the excess gets 429"),
    ("ejecting", "two endpoints, one always 503; outlier detection ejects it after 3 failures"),
    ("gone", "its only endpoint refuses connections"),
    (operator::TRIAL, "healthy; a 5/s rate limit in shadow mode: counts what it would refuse"),
    (operator::MAINTENANCE, "healthy; the operator forces its breaker open mid-run, then auto"),
    ("nowhere", "names no configured upstream"),
];

/// When the `outage` upstream fails, from the demo's start.
const OUTAGE: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(12));

const WORKERS: usize = 4;
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not start a scripted upstream: {0}")]
    Upstream(#[from] std::io::Error),
    #[error("the embedded demo configuration is invalid:\n{0}")]
    Config(#[from] config::LoadError),
    #[error(transparent)]
    Start(#[from] app::StartError),
}

#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    by_class: [u64; 5],
    outcomes: BTreeMap<String, u64>,
}

type Tallies = Arc<Mutex<BTreeMap<&'static str, Tally>>>;

pub async fn run(length: Duration) -> Result<(), DemoError> {
    let healthy = upstreams::start(Behaviour::Healthy).await?;
    let flaky = upstreams::start(Behaviour::Flaky { every: 3 }).await?;
    let slow = upstreams::start(Behaviour::Slow { min: Duration::from_millis(150) }).await?;
    let (from, until) = OUTAGE;
    let outage =
        upstreams::start(Behaviour::Outage { started: Instant::now(), from, until }).await?;
    let burst = upstreams::start(Behaviour::Healthy).await?;
    let steady = upstreams::start(Behaviour::Healthy).await?;
    let broken = upstreams::start(Behaviour::Outage {
        started: Instant::now(),
        from: Duration::ZERO,
        until: Duration::MAX,
    })
    .await?;
    let trial = upstreams::start(Behaviour::Healthy).await?;
    let maintenance = upstreams::start(Behaviour::Healthy).await?;
    let gone = closed_port().await?;
    let handled = Arc::new(messages::Handled::default());
    let handler = messages::handler(handled.clone()).await?;
    let data_dir = std::env::temp_dir().join(format!("outrigger-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let yaml = DEMO_YAML
        .replace("127.0.0.1:18081", &healthy.to_string())
        .replace("127.0.0.1:18082", &flaky.to_string())
        .replace("127.0.0.1:18083", &slow.to_string())
        .replace("127.0.0.1:18084", &gone.to_string())
        .replace("127.0.0.1:18085", &outage.to_string())
        .replace("127.0.0.1:18086", &burst.to_string())
        .replace("127.0.0.1:18087", &steady.to_string())
        .replace("127.0.0.1:18088", &broken.to_string())
        .replace("127.0.0.1:18089", &trial.to_string())
        .replace("127.0.0.1:18091", &maintenance.to_string())
        .replace("127.0.0.1:18090", &handler.to_string())
        .replace("./outrigger-demo-data", &data_dir.display().to_string());
    let config = config::load_str("examples/demo.yaml", &yaml)?;
    let sidecar = app::start(config).await?;
    println!(
        "Outrigger demo: a sidecar on {} (admin http://{}), scripted upstreams:",
        sidecar.outbound, sidecar.admin
    );
    for (name, what) in SCENES {
        println!("  {name:<11} {what}");
    }
    println!(
        "  and messages: a welcome email published every 250 ms to queue {}; its handler fails",
        messages::QUEUE
    );
    println!(
        "  one in five twice (503) before it succeeds, and one in ten always (500): those are"
    );
    println!("  retried with backoff, their error history growing, then dead-lettered.");
    println!();

    let tallies: Tallies = Arc::default();
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let deadline = started + length;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (client, tallies, outbound) = (client.clone(), tallies.clone(), sidecar.outbound);
        workers.spawn(drive(worker, client, outbound, tallies, deadline));
    }
    // the last publishes leave time for their retries before the end
    let publishing_until = deadline - length.min(Duration::from_secs(2));
    let publisher =
        messages::publish(client.clone(), sidecar.outbound, handled.clone(), publishing_until);
    workers.spawn(publisher);
    let forcing_failed = Arc::new(Mutex::new(None));
    workers.spawn(operator::force_breaker(sidecar.admin, started, length, forcing_failed.clone()));
    let (forced_from, forced_until) = operator::forced_window(length);
    let forced = format!(
        "(forced open {:.1}s-{:.1}s)",
        forced_from.as_secs_f64(),
        forced_until.as_secs_f64()
    );
    let notes = |metrics: &str| {
        let shadow = operator::would_have_refused(metrics);
        let failed = forcing_failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let forced = failed.map_or(forced.clone(), |why| format!("(forcing failed: {why})"));
        BTreeMap::from([
            (operator::TRIAL, format!("(shadow: {shadow} would have been rate-limited)")),
            (operator::MAINTENANCE, forced),
        ])
    };
    // on a terminal the table redraws in place every second; in a log, only the final one
    let live = std::io::stdout().is_terminal();
    let redraw = format!("\x1b[{}F\x1b[J", SCENES.len() + 4);
    let mut shown = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < deadline {
        tick.tick().await;
        if live {
            let elapsed = started.elapsed().as_secs().min(length.as_secs());
            if shown {
                print!("{redraw}");
            }
            let metrics = scrape(&client, sidecar.admin).await;
            let when = format!("after {elapsed}s of {}s", length.as_secs());
            print_table(&tallies, &when, &notes(&metrics));
            print_messages(&handled, messages::counts(&metrics));
            shown = true;
        }
    }
    while workers.join_next().await.is_some() {}
    if shown {
        print!("{redraw}");
    }
    let metrics = scrape(&client, sidecar.admin).await;
    print_table(&tallies, &format!("after {}s", length.as_secs()), &notes(&metrics));
    print_messages(&handled, messages::counts(&metrics));
    let poison = handled.last_poison.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(envelope) = poison {
        println!(
            "A poison message on its third and last attempt, with the history of the first two:"
        );
        let pretty = serde_json::from_str::<serde_json::Value>(&envelope)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(envelope);
        println!("{pretty}");
        println!(
            "It failed once more and moved to {}_deadletter with its whole history.",
            messages::QUEUE
        );
        println!();
        // the handler is fixed: replay the dead letters, as an operator would
        handled.fixed.store(true, std::sync::atomic::Ordering::Relaxed);
        let before = messages::counts(&scrape(&client, sidecar.admin).await)[0];
        match messages::replay_all(&client, sidecar.admin).await {
            Ok(replayed) => {
                println!(
                    "The handler is fixed; `outrigger dlq replay {}_deadletter --all` sends the {replayed} dead letter(s) back:",
                    messages::QUEUE
                );
                let until = Instant::now() + Duration::from_secs(3);
                let mut delivered = 0;
                while Instant::now() < until && delivered < replayed {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    delivered = messages::counts(&scrape(&client, sidecar.admin).await)[0] - before;
                }
                println!(
                    "{delivered} of them delivered and acknowledged, their error history kept."
                );
            }
            Err(reason) => println!("replaying the dead letters failed: {reason}"),
        }
        println!();
    }
    println!(
        "outcome: `upstream` = the upstream's own answer passed through (`after N tries` when"
    );
    println!("the sidecar retried); any other word is the `outrigger-error` kind of an answer the");
    println!("sidecar gave itself. docs/request-path.md shows the order the policies act in.");
    sidecar.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

/// The messaging scene's line: what the app published and what the sidecar did with it.
fn print_messages(handled: &messages::Handled, [acked, retried, dead]: [u64; 3]) {
    use std::sync::atomic::Ordering::Relaxed;
    let published = handled.published.load(Relaxed);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<18} {published:>8} published: {acked} delivered, {retried} retried, {dead} dead-lettered",
        messages::QUEUE
    );
    let _ = writeln!(out);
    let _ = out.flush();
}

/// The sidecar's `/metrics` text (empty when it does not answer).
async fn scrape(client: &Client<HttpConnector, Body>, admin: SocketAddr) -> String {
    let req = Request::get(format!("http://{admin}/metrics")).body(Body::empty()).expect("valid");
    let body = match client.request(req).await {
        Ok(res) => res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default(),
        Err(_) => bytes::Bytes::new(),
    };
    String::from_utf8_lossy(&body).into_owned()
}

/// The sum of `name`'s series in a `/metrics` text whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|line| line.rsplit_once("} "))
        .filter(|(series, _)| {
            labels.iter().all(|(k, v)| series.split(',').any(|pair| pair == format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    listener.local_addr()
}

async fn drive(
    worker: usize,
    client: Client<HttpConnector, Body>,
    outbound: SocketAddr,
    tallies: Tallies,
    deadline: Instant,
) {
    let mut n = worker;
    while Instant::now() < deadline {
        let (host, _) = SCENES[n % SCENES.len()];
        n += 1;
        let req = Request::get(format!("http://{outbound}/demo"))
            .header(HOST, host)
            .body(Body::empty())
            .expect("a valid request");
        let sent = Instant::now();
        let outcome = match client.request(req).await {
            Ok(res) => {
                let status = res.status().as_u16();
                let header = |name: &str| {
                    res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
                };
                let outcome = match (header(ERROR_HEADER), header("outrigger-attempts")) {
                    (Some(kind), _) => kind,
                    (None, Some(n)) => format!("upstream after {n} tries"),
                    (None, None) => "upstream".to_owned(),
                };
                let _ = res.into_body().collect().await;
                Some((status, outcome))
            }
            Err(_) => None,
        };
        let elapsed = sent.elapsed();
        let (class, outcome) = match outcome {
            Some((status, kind)) => (usize::from(status / 100).clamp(1, 5) - 1, kind),
            None => (4, "client-error".to_owned()),
        };
        tally(&tallies, host, elapsed, class, outcome);
        tokio::time::sleep(PAUSE).await;
    }
}

fn tally(tallies: &Tallies, host: &'static str, elapsed: Duration, class: usize, outcome: String) {
    let mut tallies = tallies.lock().expect("no panics while the lock is held");
    let tally = tallies.entry(host).or_default();
    tally.latencies.push(elapsed);
    tally.by_class[class] += 1;
    *tally.outcomes.entry(outcome).or_default() += 1;
}

/// `notes`: a word after a scene's outcomes (what its operator did, what its shadow policy saw).
fn print_table(tallies: &Tallies, when: &str, notes: &BTreeMap<&str, String>) {
    let tallies = tallies.lock().expect("no panics while the lock is held");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{when:<18} {:>8} {:>5} {:>5} {:>5} {:>9} {:>9}  outcomes",
        "requests", "2xx", "4xx", "5xx", "p50", "p99"
    );
    for (host, _) in SCENES {
        let empty = Tally::default();
        let t = tallies.get(host).unwrap_or(&empty);
        let mut sorted = t.latencies.clone();
        sorted.sort_unstable();
        let outcomes: Vec<String> = t.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let note = notes.get(host).map_or(String::new(), |note| format!(" {note}"));
        let _ = writeln!(
            out,
            "{host:<18} {:>8} {:>5} {:>5} {:>5} {:>9} {:>9}  {}",
            sorted.len(),
            t.by_class[1],
            t.by_class[3],
            t.by_class[4],
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            outcomes.join(", ") + &note,
        );
    }
    let _ = writeln!(out);
    let _ = out.flush();
}

fn percentile(sorted: &[Duration], q: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    let d = sorted[i];
    if d < Duration::from_millis(10) {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{}ms", d.as_millis())
    }
}
