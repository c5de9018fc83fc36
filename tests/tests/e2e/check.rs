//! `outrigger check`: one line per dependency a sidecar would have, `✔` or `✘` with what to do,
//! exit 1 on any `✘`; each dependency real (an upstream and an app on loopback, redis-server,
//! etcd, PostgreSQL, an OTLP receiver), checked up and down; and `--admin` asking a running
//! sidecar.

use std::process::Command;

use outrigger_tests::{Etcd, OtlpReceiver, Postgres, Redis, Sidecar, Upstream, free_port};

/// `outrigger check ARGS`: exit code, and stdout then stderr. Waited for off the test's runtime,
/// which serves the upstreams, the app and the collector meanwhile.
async fn check(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let run = move || Command::new(outrigger_tests::binary()).arg("check").args(&args).output();
    let out = tokio::task::spawn_blocking(run).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), stdout + &String::from_utf8_lossy(&out.stderr))
}

/// A directory of the test's own, removed at its end.
pub(crate) struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `yaml` written to a file of its own, `$SCRATCH` standing for its directory.
pub(crate) fn write(yaml: &str) -> (Dir, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outrigger-check-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outrigger.yaml");
    std::fs::write(&path, yaml.replace("$SCRATCH", &dir.display().to_string())).unwrap();
    (Dir(dir), path)
}

/// A config naming every kind of dependency.
fn everything(upstream: &str, app: &str, redis: &str, etcd: &str, collector: &str) -> String {
    format!(
        "service: {{ name: shop, app: {{ url: \"http://{app}\", health_path: /healthz }} }}\n\
         upstreams:\n  payments: {{ discovery: {{ static: [\"{upstream}\"] }} }}\n\
         registry:\n  etcd: {{ endpoints: [\"{etcd}\"] }}\n\
         messaging: {{ broker: \"{redis}\", data_dir: \"$SCRATCH/data\" }}\n\
         telemetry:\n  tracing: {{ otlp_endpoint: \"{collector}\" }}\n"
    )
}

#[tokio::test]
async fn with_every_dependency_up_each_check_passes_and_check_exits_0() {
    let upstream = Upstream::status(200).await;
    let app = Upstream::health_checked(200, 200).await;
    let redis = Redis::start().await;
    let etcd = Etcd::start().await;
    let collector = OtlpReceiver::start().await;
    let yaml = everything(
        &upstream.addr().to_string(),
        &app.addr().to_string(),
        &redis.url(),
        &etcd.endpoint(),
        &collector.endpoint(),
    );
    let (_dir, path) = write(&yaml);
    let (code, out) = check(&["--config", &path.to_string_lossy()]).await;
    assert_eq!(code, 0, "{out}");
    for expected in [
        "✔ config ",
        "✔ upstream payments: 1 of 1 endpoints accept a connection (static)",
        &format!("✔ registry: etcd at {} accepts a connection", etcd.endpoint()),
        &format!("✔ broker {} answers", redis.url()),
        "✔ messaging.data_dir ",
        &format!("✔ app health http://{}/healthz answers 200", app.addr()),
        "✔ collector ",
        "all 7 checks passed",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    assert!(!out.contains('✘'), "{out}");
}

#[tokio::test]
async fn with_every_dependency_down_each_check_fails_with_what_to_do_and_check_exits_1() {
    let down = || format!("127.0.0.1:{}", free_port());
    let yaml = everything(
        &down(),
        &down(),
        &format!("redis://{}", down()),
        &format!("http://{}", down()),
        &format!("http://{}", down()),
    );
    let (_dir, path) = write(&yaml);
    let (code, out) = check(&["--config", &path.to_string_lossy()]).await;
    assert_eq!(code, 1, "{out}");
    for expected in [
        "✘ upstream payments: no endpoint accepts a connection",
        "fix: start payments, or correct upstreams.payments.discovery",
        "✘ registry: no etcd endpoint accepts a connection",
        "fix: start etcd, or correct registry.etcd.endpoints",
        "✘ broker redis://",
        "fix: start the broker, or correct messaging.broker",
        "✘ app health http://",
        "fix: start the app, or correct service.app.url and health_path",
        "✘ collector http://",
        "fix: start the collector, or correct telemetry.tracing.otlp_endpoint",
        "5 of 7 checks failed",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
}

#[tokio::test]
async fn an_invalid_config_is_one_failed_check_naming_each_problem() {
    let (_dir, path) = write("upstreams:\n  payments:\n    discovery: { static: [] }\n");
    let (code, out) = check(&["--config", &path.to_string_lossy()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✘ config "), "{out}");
    assert!(
        out.contains("upstreams.payments.discovery.static: must list at least one endpoint"),
        "{out}"
    );
    assert!(out.contains("1 of 1 checks failed"), "{out}");
}

#[tokio::test]
async fn a_missing_app_outbox_table_fails_with_its_ddl_and_passes_once_it_is_made() {
    let postgres = Postgres::start().await;
    let yaml = format!(
        "service: {{ name: shop }}\nmessaging:\n  data_dir: \"$SCRATCH/data\"\n  \
         app_outbox: {{ postgres: \"{}\" }}\n",
        postgres.url()
    );
    let (_dir, path) = write(&yaml);
    let (code, out) = check(&["--config", &path.to_string_lossy()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✘ app outbox: table outrigger_outbox"), "{out}");
    assert!(out.contains("CREATE TABLE \"outrigger_outbox\""), "the DDL to run: {out}");
    assert!(out.contains("NOTIFY") || out.contains("pg_notify"), "and the trigger: {out}");

    let ddl = out[out.find("CREATE TABLE").unwrap()..out.rfind("checks failed").unwrap()]
        .lines()
        .map(str::trim_start)
        .take_while(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join("\n");
    postgres.psql(&ddl);
    let (code, out) = check(&["--config", &path.to_string_lossy()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✔ app outbox: table outrigger_outbox is there and readable"), "{out}");
}

#[tokio::test]
async fn with_admin_it_asks_a_running_sidecar_and_fails_on_an_upstream_with_no_healthy_endpoint() {
    let up = Upstream::status(200).await;
    let yaml = format!(
        "{}  nowhere:\n    discovery: {{ static: [\"127.0.0.1:{}\"] }}\n    \
         health_check: {{ tcp: true, interval: 100ms, timeout: 500ms }}\n",
        up.yaml("payments"),
        free_port()
    );
    let sidecar = Sidecar::start_unready(&yaml).await;
    let admin = format!("http://{}", sidecar.admin);
    let (code, out) = outrigger_tests::wait_until(
        outrigger_tests::DEADLINE,
        "the health check to fail",
        || async {
            let out = check(&["--admin", &admin]).await;
            out.1.contains("✘ upstream nowhere: 0 of 1 endpoints healthy").then_some(out)
        },
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("✔ sidecar at {admin} answers")), "{out}");
    assert!(out.contains("✔ upstream payments: 1 of 1 endpoints healthy"), "{out}");
    assert!(out.contains("fix: see /v1/endpoints"), "{out}");

    let (code, out) = check(&["--admin", &format!("http://127.0.0.1:{}", free_port())]).await;
    assert_eq!(code, 1);
    assert!(out.contains("cannot reach the sidecar"), "{out}");
}

#[tokio::test]
async fn a_tls_upstream_passes_only_when_its_certificate_is_trusted() {
    use outrigger_tests::{Pki, Reply, SERVER_NAME, TlsServer};
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    let yaml = |ca: &std::path::Path| {
        format!(
            "upstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n    \
             tls: {{ server_name: {SERVER_NAME}, ca_file: \"{}\" }}\n",
            up.addr(),
            ca.display()
        )
    };
    let (_dir, trusted) = write(&yaml(&pki.ca_file));
    let (code, out) = check(&["--config", &trusted.to_string_lossy()]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("✔ upstream payments: 1 of 1 endpoints accept a TLS connection"), "{out}");

    // another CA: TCP connects, the handshake does not verify
    let (_dir, untrusted) = write(&yaml(&pki.other_ca_file));
    let (code, out) = check(&["--config", &untrusted.to_string_lossy()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✘ upstream payments: no endpoint accepts a connection"), "{out}");
    assert!(out.to_lowercase().contains("certificate"), "the handshake's own word: {out}");
    assert!(out.contains("correct upstreams.payments.tls"), "{out}");
}
