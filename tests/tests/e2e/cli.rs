//! The command line: `validate`, `run` refusing bad config, `--version`, SIGTERM.

use std::process::Command;

use outrigger_tests::{Sidecar, Upstream};

fn outrigger(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(outrigger_tests::binary()).args(args).output().expect("run outrigger");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn write(name: &str, yaml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outrigger-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

const BAD: &str = "upstreams:\n  payments:\n    discovery: { static: [\"127.0.0.1:9001\"] }\n    timeouts: { request: 3 seconds }\n    circuit_breakr: {}\n";

#[test]
fn validate_prints_ok_for_a_good_file() {
    let path = write(
        "good.yaml",
        "upstreams:\n  payments:\n    discovery: { static: [\"127.0.0.1:9001\"] }\n",
    );
    let (code, stdout, _) = outrigger(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!((code, stdout.as_str()), (0, "ok\n"));
}

#[test]
fn validate_prints_every_problem_with_file_line_column_and_exits_1() {
    let path = write("bad.yaml", BAD);
    let file = path.display();
    let (code, stdout, _) = outrigger(&["validate", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "{file}:4:26: upstreams.payments.timeouts.request: \"3 seconds\" is not a duration"
        )),
        "{stdout}"
    );
    assert!(
        lines[1]
            .starts_with(&format!("{file}:5:5: upstreams.payments.circuit_breakr: unknown field")),
        "{stdout}"
    );
}

#[test]
fn run_refuses_an_invalid_file_with_the_same_lines() {
    let path = write("bad-run.yaml", BAD);
    let (code, _, stderr) = outrigger(&["run", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("upstreams.payments.circuit_breakr: unknown field"), "{stderr}");
}

#[test]
fn validate_and_run_refuse_a_duration_too_long_for_the_clock() {
    // each of these once passed `validate`, then panicked at run time: the breaker aborted
    // the process, SIGTERM exited 101
    let path = write(
        "huge-duration.yaml",
        concat!(
            "upstreams:\n  payments:\n    discovery: { static: [\"127.0.0.1:9001\"] }\n",
            "    circuit_breaker: { open_for: 200000000000000d }\n",
            "lifecycle: { drain_timeout: 200000000000000d }\n",
        ),
    );
    let file = path.display();
    let (code, stdout, _) = outrigger(&["validate", "--config", &path.to_string_lossy()]);
    let too_long = "\"200000000000000d\" is too long (expected at most 365d, e.g. 250ms, 5s, 1m)";
    assert_eq!(
        (code, stdout),
        (
            1,
            format!(
                "{file}:4:34: upstreams.payments.circuit_breaker.open_for: {too_long}\n\
                 {file}:5:29: lifecycle.drain_timeout: {too_long}\n"
            )
        )
    );
    let (code, _, stderr) = outrigger(&["run", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{file}:5:29: lifecycle.drain_timeout: {too_long}")),
        "{stderr}"
    );
}

#[test]
fn validate_and_run_never_print_the_redis_password_of_a_refused_broker_url() {
    let path = write(
        "redis-password.yaml",
        "messaging:\n  broker: \"redis://alice:s3cr3tPW@host:notaport/x\"\n",
    );
    let file = path.display();
    let (code, stdout, stderr) = outrigger(&["validate", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(!stdout.contains("s3cr3tPW") && !stderr.contains("s3cr3tPW"), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!(
            "{file}:2:11: messaging.broker: \"redis://alice:***@host:notaport/x\" is not a broker \
             (expected embedded, redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT, nats://HOST:PORT or nats+tls://HOST:PORT)\n"
        )
    );
    let (code, stdout, stderr) = outrigger(&["run", "--config", &path.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(!stdout.contains("s3cr3tPW") && !stderr.contains("s3cr3tPW"), "{stdout}{stderr}");
    assert!(stderr.contains("\"redis://alice:***@host:notaport/x\" is not a broker"), "{stderr}");
}

#[test]
fn the_config_file_may_come_from_outrigger_config() {
    let path = write("env.yaml", "service: { name: from-env }\n");
    let out = Command::new(outrigger_tests::binary())
        .arg("validate")
        .env("OUTRIGGER_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn version_prints_the_version() {
    let (code, stdout, _) = outrigger(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("outrigger "), "{stdout}");
}

#[tokio::test]
async fn sigterm_fails_readiness_and_exits_0() {
    let up = Upstream::status(200).await;
    let yaml = format!("{}lifecycle: {{ drain_timeout: 2s }}\n", up.yaml("payments"));
    let sidecar = Sidecar::start(&yaml).await;

    let status = sidecar.terminate().await;

    assert_eq!(status.code(), Some(0));
}

/// `kill -SIGNAL PID` armed in a shell that waits for a line: firing it costs a pipe write, not
/// a fork and exec, so the signal lands within microseconds of the moment the test chooses.
struct ArmedSignal(std::process::Child);

impl ArmedSignal {
    fn at(signal: &str, pid: u32) -> Self {
        let shell = Command::new("sh")
            .args(["-c", &format!("read -r _ && kill -{signal} \"$0\""), &pid.to_string()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("a shell");
        Self(shell)
    }

    fn fire(mut self) {
        use std::io::Write;
        self.0.stdin.take().expect("its stdin").write_all(b"\n").expect("the shell reads");
        assert!(self.0.wait().expect("the shell ends").success(), "kill failed");
    }
}

/// Polls `/readyz` on fresh connections, as fast as they go, until it first answers 200.
async fn first_ready(admin: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let until = tokio::time::Instant::now() + outrigger_tests::DEADLINE * 3;
    while tokio::time::Instant::now() < until {
        let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
            tokio::task::yield_now().await;
            continue;
        };
        let probe = b"GET /readyz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n";
        let mut status = [0u8; 12];
        if stream.write_all(probe).await.is_ok()
            && stream.read_exact(&mut status).await.is_ok()
            && &status == b"HTTP/1.1 200"
        {
            return;
        }
    }
    panic!("/readyz never answered 200");
}

/// A large config: 2000 upstreams, each with a dedicated listener (one port on 2000 loopback
/// addresses), so the start has much to do after the first listener serves.
fn large_config() -> String {
    use std::fmt::Write;
    let port = outrigger_tests::free_port();
    let mut yaml = String::from("lifecycle: { drain_timeout: 2s }\nupstreams:\n");
    for n in 0..2000 {
        let listen = format!("127.1.{}.{}:{port}", n / 250, n % 250 + 1);
        let discovery = "discovery: { static: [\"127.0.0.1:9\"] }";
        writeln!(yaml, "  u{n}: {{ listen: \"{listen}\", {discovery} }}").unwrap();
    }
    yaml
}

/// Issue 17: readiness must not go green before the SIGTERM handler exists. With a large
/// config (a long start), a SIGTERM sent the moment `/readyz` first answers 200 drains and
/// exits 0; it must never kill the process by the signal's default action.
#[tokio::test]
async fn sigterm_the_moment_readiness_first_answers_200_drains_and_exits_0() {
    use std::os::unix::process::ExitStatusExt;
    let yaml = large_config();
    for attempt in 1..=3 {
        let mut sidecar = Sidecar::spawn(&yaml);
        let sigterm = ArmedSignal::at("TERM", sidecar.pid());
        first_ready(sidecar.admin).await;
        sigterm.fire();
        let status = sidecar.wait_exited().await;
        let log = sidecar.log();
        assert_eq!(
            (status.code(), status.signal()),
            (Some(0), None),
            "attempt {attempt}: SIGTERM right after readiness must drain, not kill: {status}; log:\n{log}"
        );
        assert!(log.contains("SIGTERM received") && log.contains("outrigger stopped"), "{log}");
    }
}

/// The same for SIGHUP, whose default action also ends a process: the moment `/readyz` first
/// answers 200, it reloads the config and the sidecar keeps running.
#[tokio::test]
async fn sighup_the_moment_readiness_first_answers_200_reloads_and_keeps_running() {
    let mut sidecar = Sidecar::spawn(&large_config());
    let sighup = ArmedSignal::at("HUP", sidecar.pid());
    first_ready(sidecar.admin).await;
    sighup.fire();
    outrigger_tests::wait_until(outrigger_tests::DEADLINE, "the reload SIGHUP asks for", || {
        let log = sidecar.log();
        let reloaded = log.contains("config reloaded") && log.contains("SIGHUP");
        async move { reloaded.then_some(()) }
    })
    .await;
    assert!(!sidecar.exited(), "SIGHUP must not end the sidecar; log:\n{}", sidecar.log());
    assert_eq!(sidecar.admin("/readyz").await.0, 200);
    let status = sidecar.terminate().await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn every_example_configuration_validates() {
    // the runner's CARGO_MANIFEST_DIR, not the compile-time one: a cached test binary built in
    // another checkout of the workspace is not rebuilt (cargo fingerprints relative paths)
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    let examples = std::path::Path::new(&manifest_dir).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, stdout, _) = outrigger(&["validate", "--config", &path.to_string_lossy()]);
            assert_eq!((code, stdout.as_str()), (0, "ok\n"), "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "examples/ holds the demo and a quick start");
}

#[test]
fn the_demo_shows_every_policy_and_a_dead_letter_with_nothing_installed() {
    let (code, stdout, stderr) = outrigger(&["demo", "--seconds", "6"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // each scene's last row shows its policy at work
    let row = |scene: &str| {
        let row = stdout.lines().rfind(|l| l.starts_with(&format!("{scene} ")));
        row.unwrap_or_else(|| panic!("a {scene} row:\n{stdout}")).to_owned()
    };
    for (scene, outcome) in [
        ("flaky", "upstream after 2 tries "),
        ("slow", "timeout "),
        ("burst", "rate-limited "),
        ("gone", "connect-failed "),
        ("nowhere", "unknown-upstream "),
    ] {
        assert!(row(scene).contains(outcome), "{scene} shows {outcome:?}:\n{stdout}");
    }
    for shown in [
        "A poison message on its third and last attempt",
        "\"stack_trace\": \"at send_welcome (mailer.rs:42)\"",
        "moved to welcome_email_deadletter",
        "The handler is fixed; `outrigger dlq replay welcome_email_deadletter --all` sends the",
    ] {
        assert!(stdout.contains(shown), "the demo shows {shown:?}:\n{stdout}");
    }
    let messages = stdout.lines().find(|l| l.starts_with("welcome_email ")).expect(&stdout);
    assert!(!messages.contains(" 0 dead-lettered"), "{messages}");
    assert!(!messages.contains(" 0 retried"), "{messages}");
    // a shadow rate limit refuses nothing and counts what it would have refused
    let trial = row("trial");
    assert!(!trial.contains("rate-limited "), "shadow mode enforces nothing: {trial}");
    let would = trial.split("(shadow: ").nth(1).and_then(|w| w.split(' ').next());
    assert!(would.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{trial}");
    // the operator's forced open answers circuit-open from a healthy upstream
    let maintenance = row("maintenance");
    assert!(maintenance.contains("circuit-open "), "{maintenance}");
    assert!(maintenance.contains("(forced open 2.4s-4.2s)"), "{maintenance}");
    let replay = stdout.lines().find(|l| l.ends_with("their error history kept.")).expect(&stdout);
    assert!(!replay.starts_with("0 "), "the replayed dead letters were delivered: {replay}");
}

/// A request to upstream `host` sent through `sidecar`, once `upstream` holds it: its answer.
async fn held_at(
    sidecar: &Sidecar,
    host: &'static str,
    upstream: &Upstream,
) -> tokio::task::JoinHandle<
    Result<http::Response<bytes::Bytes>, Box<dyn std::error::Error + Send + Sync>>,
> {
    let outbound = sidecar.outbound;
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get(format!("/{host}"))
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        outrigger_tests::send(outbound, req).await
    });
    outrigger_tests::wait_until(
        outrigger_tests::DEADLINE,
        "the request to reach its upstream",
        || async { (upstream.requests() == 1).then_some(()) },
    )
    .await;
    in_flight
}

#[tokio::test]
async fn a_slow_request_finishes_after_sigterm_while_readiness_fails_and_the_app_can_still_call_out()
 {
    let slow = Upstream::scripted([outrigger_tests::Reply::Delayed(
        std::time::Duration::from_secs(2),
        200,
    )])
    .await;
    let fast = Upstream::status(200).await;
    let yaml = format!(
        "{}{}lifecycle: {{ drain_timeout: 8s }}\n",
        slow.yaml("slow"),
        fast.yaml("fast").replace("upstreams:\n", "")
    );
    let sidecar = Sidecar::start(&yaml).await;
    let in_flight = held_at(&sidecar, "slow", &slow).await;

    sidecar.sigterm();
    outrigger_tests::wait_until(outrigger_tests::DEADLINE, "readiness to fail", || async {
        (sidecar.admin("/readyz").await.0 == 503).then_some(())
    })
    .await;
    // the app shuts down too, and still needs its calls while the slow one is in flight
    let during = sidecar.get("fast", "/during-drain").await;
    assert_eq!(during.status(), 200, "the app's calls keep working during the drain");

    let answered = in_flight.await.unwrap().expect("the slow request is answered");
    assert_eq!(answered.status(), 200, "the in-flight request finished");
    let status = sidecar.wait_exit().await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_failed_start_says_what_failed_and_why_down_to_the_operating_systems_word() {
    // a port taken by another process
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = write("taken.yaml", &format!("outbound: {{ listen: \"{addr}\" }}\n"));
    let (code, _, stderr) = outrigger(&["run", "--config", &config.to_string_lossy()]);
    assert_eq!(code, 1, "{stderr}");
    let said =
        format!("outrigger: cannot listen on {addr} (outbound.listen): Address already in use");
    assert!(stderr.contains(&said), "{stderr}");

    // a message store whose directory cannot be made: a file stands where it should be
    let blocker = write("not-a-directory", "");
    let config = write(
        "store.yaml",
        &format!(
            "outbound: {{ listen: \"127.0.0.1:0\" }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\n\
             service: {{ name: shop, app: {{ url: \"http://127.0.0.1:9\" }} }}\n\
             messaging:\n  data_dir: {}\n  subscriptions:\n    - {{ queue: orders, path: /orders }}\n",
            blocker.join("data").display()
        ),
    );
    let (code, _, stderr) = outrigger(&["run", "--config", &config.to_string_lossy()]);
    assert_eq!(code, 1, "{stderr}");
    let said = format!(
        "outrigger: cannot open the message store {}: cannot create its directory: Not a directory",
        blocker.join("data").join("messages.redb").display()
    );
    assert!(stderr.contains(&said), "{stderr}");
}

#[tokio::test]
async fn a_request_still_in_flight_at_the_drain_timeout_is_cut_and_the_sidecar_exits_cleanly() {
    // the connection's task outlives the listeners: shutdown must not need it gone (it once
    // held the graceful-shutdown handle, and the exit panicked with code 101)
    let stuck = Upstream::scripted([outrigger_tests::Reply::Delayed(
        std::time::Duration::from_secs(30),
        200,
    )])
    .await;
    let yaml = format!("{}lifecycle: {{ drain_timeout: 1s }}\n", stuck.yaml("stuck"));
    let sidecar = Sidecar::start(&yaml).await;
    let in_flight = held_at(&sidecar, "stuck", &stuck).await;

    sidecar.sigterm();
    let status = sidecar.wait_exit().await;
    assert_eq!(status.code(), Some(0), "a clean exit at the drain timeout");
    assert!(in_flight.await.unwrap().is_err(), "the stuck request was cut, not answered");
}

#[tokio::test]
async fn exit_with_app_ends_the_sidecar_once_the_app_is_gone() {
    let app = Upstream::health_checked(200, 200).await;
    let yaml = format!(
        "service:\n  name: job\n  app: {{ url: \"http://{}\", health_path: /healthz }}\nlifecycle: {{ drain_timeout: 2s }}\n",
        app.addr()
    );
    let sidecar = Sidecar::start_with_args(&yaml, &["--exit-with-app"]).await;
    sidecar.wait_ready().await;
    // the sidecar has seen the app up (its checks run every second)
    let seen = app.health_checks();
    outrigger_tests::wait_until(
        outrigger_tests::DEADLINE,
        "two more app health checks",
        || async { (app.health_checks() >= seen + 2).then_some(()) },
    )
    .await;
    app.set_health(503); // the job's work is done: its app goes away
    let status = sidecar.wait_exit().await;
    assert_eq!(status.code(), Some(0));

    // without a health path to watch, the flag is refused at once
    let (code, _, stderr) = outrigger(&[
        "run",
        "--config",
        write("nohealth.yaml", "service: { name: x }\n").to_str().unwrap(),
        "--exit-with-app",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--exit-with-app needs service.app.health_path"), "{stderr}");
}

#[tokio::test]
async fn a_secret_from_the_environment_reaches_the_broker_and_an_unset_one_is_named() {
    let redis = outrigger_tests::Redis::start().await;
    // the password-less test Redis takes any password for the default user
    let yaml = "messaging:\n  broker: \"${OUTRIGGER_TEST_BROKER}\"\n  data_dir: \"${OUTRIGGER_TEST_DIR:-/tmp/outrigger-env-default}\"\n";
    let path = write("env.yaml", yaml);
    let run = |env: Option<&str>| {
        let mut command = Command::new(outrigger_tests::binary());
        command.args(["validate", "--config", &path.to_string_lossy()]);
        command.env_remove("OUTRIGGER_TEST_BROKER").env_remove("OUTRIGGER_TEST_DIR");
        if let Some(url) = env {
            command.env("OUTRIGGER_TEST_BROKER", url);
        }
        let out = command.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(run(Some(&redis.url())), (Some(0), "ok\n".to_owned()));
    let (code, stdout) = run(None);
    assert_eq!(code, Some(1));
    assert_eq!(
        stdout,
        format!(
            "{}:2:11: messaging.broker: environment variable OUTRIGGER_TEST_BROKER is not set \
             (expected the variable set in the sidecar's environment (from a Secret), \
             ${{VAR:-default}}, or $${{ for a literal ${{)\n",
            path.display()
        )
    );
    // and `check` reaches the broker the variable names
    let out = Command::new(outrigger_tests::binary())
        .args(["check", "--config", &path.to_string_lossy()])
        .env("OUTRIGGER_TEST_BROKER", redis.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("✔ broker {} answers", redis.url())), "{stdout}");
}
