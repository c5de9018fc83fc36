//! Hot reload: a valid new file swaps the upstreams live (keeping an unchanged upstream's
//! state), an invalid one is refused and the old config keeps serving, a Kubernetes-style
//! symlink swap is picked up, and SIGHUP reloads at once.

use std::os::unix::fs::symlink;
use std::path::Path;

use outrigger_tests::{DEADLINE, Sidecar, Upstream, wait_until};

use crate::messaging::metric;

const APPLIED: &str = r#"outrigger_config_reloads_total{result="applied"}"#;
const INVALID: &str = r#"outrigger_config_reloads_total{result="invalid"}"#;

async fn wait_status(sidecar: &Sidecar, host: &str, status: u16) {
    wait_until(DEADLINE, &format!("{host} to answer {status}"), || async {
        (sidecar.get(host, "/").await.status() == status).then_some(())
    })
    .await;
}

fn two(a: &Upstream, b: &Upstream) -> String {
    format!("{}{}", a.yaml("alpha"), b.yaml("beta").replace("upstreams:\n", ""))
}

#[tokio::test]
async fn a_new_upstream_is_added_live_and_an_unchanged_one_keeps_its_breaker() {
    let alpha = Upstream::status(500).await;
    let beta = Upstream::status(200).await;
    let breaker = "    circuit_breaker: { consecutive_failures: 2, open_for: 60s }\n";
    let one = format!("{}{breaker}", alpha.yaml("alpha"));
    let sidecar = Sidecar::start(&one).await;
    assert_eq!(sidecar.get("beta", "/").await.status(), 404, "beta is not configured yet");
    for _ in 0..2 {
        sidecar.get("alpha", "/").await;
    }
    let open = sidecar.get("alpha", "/").await;
    assert_eq!(open.headers()["outrigger-error"], "circuit-open");

    let both = format!(
        "{}{breaker}{}",
        alpha.yaml("alpha"),
        beta.yaml("beta").replace("upstreams:\n", "")
    );
    sidecar.rewrite(&both);
    wait_status(&sidecar, "beta", 200).await;
    assert_eq!(metric(&sidecar, APPLIED).await, Some(1.0));
    let still = sidecar.get("alpha", "/").await;
    assert_eq!(still.headers()["outrigger-error"], "circuit-open", "alpha was not rebuilt");
    assert_eq!(alpha.requests(), 2, "nothing reached alpha while its breaker is open");
    let (_, running) = sidecar.admin("/v1/config").await;
    assert!(running.contains("\"beta\""), "/v1/config shows the running config: {running}");
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_running_config_keeps_serving() {
    let alpha = Upstream::status(200).await;
    let sidecar = Sidecar::start(&alpha.yaml("alpha")).await;
    let hash = metric(&sidecar, "outrigger_config_hash").await;

    sidecar.rewrite(&format!("{}    timeouts: {{ request: soon }}\n", alpha.yaml("alpha")));
    wait_until(DEADLINE, "the reload to be refused", || async {
        (metric(&sidecar, INVALID).await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(sidecar.get("alpha", "/").await.status(), 200, "the old config serves");
    assert_eq!(metric(&sidecar, APPLIED).await, Some(0.0));
    assert_eq!(metric(&sidecar, "outrigger_config_hash").await, hash, "the hash in force");
    let file = sidecar.config_path().display().to_string();
    let log = sidecar.log();
    assert!(
        log.contains(&format!("{file}:6:")) && log.contains("upstreams.alpha.timeouts.request"),
        "each problem logged as FILE:LINE:COL: field: {log}"
    );
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_picked_up() {
    let (alpha, beta) = (Upstream::status(200).await, Upstream::status(200).await);
    let sidecar = Sidecar::start(&alpha.yaml("alpha")).await;
    // lay the file out as the kubelet does: outrigger.yaml -> ..data/outrigger.yaml, with
    // ..data -> a versioned directory, swapped atomically on every update
    let path = sidecar.config_path();
    let dir = path.parent().unwrap();
    let version = |name: &str, text: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("outrigger.yaml"), text).unwrap();
    };
    let swap = |link: &Path, target: &str| {
        let tmp =
            link.with_file_name(format!("{}.swap", link.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, link).unwrap();
    };
    version("..2026_11_25_v1", &std::fs::read_to_string(&path).unwrap());
    swap(&dir.join("..data"), "..2026_11_25_v1");
    swap(&path, "..data/outrigger.yaml");

    version("..2026_11_25_v2", &sidecar.expand(&two(&alpha, &beta)));
    swap(&dir.join("..data"), "..2026_11_25_v2");
    wait_status(&sidecar, "beta", 200).await;
    assert_eq!(sidecar.get("alpha", "/").await.status(), 200);
}

#[tokio::test]
async fn sighup_reloads_at_once_even_when_nothing_changed() {
    let alpha = Upstream::status(200).await;
    let sidecar = Sidecar::start(&alpha.yaml("alpha")).await;
    sidecar.signal("HUP");
    wait_until(DEADLINE, "the SIGHUP reload", || async {
        (metric(&sidecar, APPLIED).await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(sidecar.get("alpha", "/").await.status(), 200);
}

#[tokio::test]
async fn a_refused_reload_never_logs_the_broker_password() {
    let alpha = Upstream::status(200).await;
    let sidecar = Sidecar::start(&alpha.yaml("alpha")).await;

    sidecar.rewrite(&format!(
        "{}messaging: {{ broker: \"redis://alice:s3cr3tPW@127.0.0.1:notaport/x\" }}\n",
        alpha.yaml("alpha")
    ));
    wait_until(DEADLINE, "the reload to be refused", || async {
        (metric(&sidecar, INVALID).await == Some(1.0)).then_some(())
    })
    .await;
    let log = sidecar.log();
    assert!(log.contains("messaging.broker"), "the problem is logged: {log}");
    assert!(log.contains("alice:***@"), "the URL is echoed redacted: {log}");
    assert!(!log.contains("s3cr3tPW"), "the password was logged: {log}");
}
