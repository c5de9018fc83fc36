//! The etcd registry: `discovery: { registry: ... }` follows the instances written in a real
//! etcd, keeps serving through an etcd outage, and `service.register: true` keeps the sidecar's
//! own app registered under a lease while it is ready, and deletes it on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use outrigger_tests::{DEADLINE, Etcd, Kv, Sidecar, Upstream, free_port, wait_until};
use serde_json::Value;
use tokio::net::TcpListener;

const PREFIX: &str = "/outrigger/services";

fn key(service: &str, id: &str) -> String {
    format!("{PREFIX}/{service}/{id}")
}

fn instance(addr: SocketAddr) -> String {
    format!(r#"{{"address": "{addr}", "metadata": {{"zone": "test"}}}}"#)
}

fn registry_yaml(etcd: &Etcd) -> String {
    format!(
        "registry:\n  etcd: {{ endpoints: [\"{}\"], prefix: {PREFIX}, lease_ttl: 5s }}\n",
        etcd.endpoint()
    )
}

/// An upstream `payments` whose endpoints are the registry's `payments` instances.
fn payments_yaml(etcd: &Etcd) -> String {
    format!(
        "upstreams:\n  payments:\n    discovery: {{ registry: {{ service: payments }} }}\n{}",
        registry_yaml(etcd)
    )
}

/// The sidecar's `/readyz` check of the `payments` upstream, and the overall status code.
async fn payments_check(sidecar: &Sidecar) -> (u16, Value) {
    let (status, body) = sidecar.admin("/readyz").await;
    let json: Value = serde_json::from_str(&body).expect("readyz answers JSON");
    (status, json["checks"]["upstream.payments"].clone())
}

/// Sends `n` requests to `payments`, each answered 200.
async fn send_payments(sidecar: &Sidecar, n: usize) {
    for _ in 0..n {
        assert_eq!(sidecar.get("payments", "/charge").await.status(), 200);
    }
}

#[tokio::test]
async fn registry_instances_put_and_deleted_in_etcd_are_followed() {
    let etcd = Etcd::start().await;
    let (one, two) = (Upstream::status(200).await, Upstream::status(200).await);
    etcd.put(&key("payments", "one"), &instance(one.addr())).await;
    // an unreadable entry is skipped, not fatal
    etcd.put(&key("payments", "broken"), "not json").await;
    let sidecar = Sidecar::start(&payments_yaml(&etcd)).await;

    send_payments(&sidecar, 1).await;
    assert_eq!(one.requests(), 1);

    etcd.put(&key("payments", "two"), &instance(two.addr())).await;
    wait_until(DEADLINE, "traffic to the instance put second", || async {
        send_payments(&sidecar, 1).await;
        (two.requests() > 0).then_some(())
    })
    .await;

    etcd.delete(&key("payments", "one")).await;
    wait_until(DEADLINE, "ten requests in a row that skip the deleted instance", || async {
        let before = one.requests();
        send_payments(&sidecar, 10).await;
        (one.requests() == before).then_some(())
    })
    .await;
    let (before_one, before_two) = (one.requests(), two.requests());
    send_payments(&sidecar, 20).await;
    assert_eq!(one.requests(), before_one, "the deleted instance got traffic");
    assert_eq!(two.requests(), before_two + 20);
    assert!(sidecar.log().contains("registry entry skipped"), "{}", sidecar.log());
}

#[tokio::test]
async fn registry_endpoints_are_tried_in_turn() {
    let etcd = Etcd::start().await;
    let one = Upstream::status(200).await;
    etcd.put(&key("payments", "one"), &instance(one.addr())).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let endpoints = format!("\"{dead}\", \"{}\"", etcd.endpoint());
    let yaml = payments_yaml(&etcd).replace(&format!("\"{}\"", etcd.endpoint()), &endpoints);
    assert!(yaml.contains(&dead), "{yaml}");
    let sidecar = Sidecar::start(&yaml).await;

    send_payments(&sidecar, 3).await;
    assert_eq!(one.requests(), 3);
    let (status, check) = payments_check(&sidecar).await;
    assert_eq!((status, check["status"].as_str()), (200, Some("ok")), "{check}");
}

#[tokio::test]
async fn registry_outage_keeps_the_last_endpoints_and_changes_are_followed_after() {
    let mut etcd = Etcd::start().await;
    let (one, two) = (Upstream::status(200).await, Upstream::status(200).await);
    etcd.put(&key("payments", "one"), &instance(one.addr())).await;
    let sidecar = Sidecar::start(&payments_yaml(&etcd)).await;
    send_payments(&sidecar, 1).await;

    etcd.stop();
    let (status, check) = wait_until(DEADLINE, "/readyz to show the upstream degraded", || async {
        let (status, check) = payments_check(&sidecar).await;
        (check["status"] == "degraded").then_some((status, check))
    })
    .await;
    assert_eq!(status, 200, "a registry outage does not fail readiness: {check}");
    let detail = check["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("etcd unreachable for"), "{detail}");
    assert!(detail.contains("serving the last 1 endpoint(s)"), "{detail}");
    let before = one.requests();
    send_payments(&sidecar, 5).await;
    assert_eq!(one.requests(), before + 5, "traffic keeps flowing to the last endpoints");

    etcd.restart().await;
    etcd.put(&key("payments", "two"), &instance(two.addr())).await;
    wait_until(2 * DEADLINE, "traffic to an instance put after etcd came back", || async {
        send_payments(&sidecar, 1).await;
        (two.requests() > 0).then_some(())
    })
    .await;
    let (status, check) = payments_check(&sidecar).await;
    assert_eq!((status, check["status"].as_str()), (200, Some("ok")), "{check}");
}

#[tokio::test]
async fn registry_watch_that_resumes_past_a_compaction_reads_the_set_again() {
    let etcd = Etcd::start().await;
    let link = Link::to(etcd.addr()).await;
    let (one, two) = (Upstream::status(200).await, Upstream::status(200).await);
    etcd.put(&key("payments", "one"), &instance(one.addr())).await;
    let yaml = payments_yaml(&etcd).replace(&etcd.endpoint(), &format!("http://{}", link.addr));
    let sidecar = Sidecar::start(&yaml).await;
    send_payments(&sidecar, 1).await;

    // while the sidecar cannot reach etcd, the set changes and the history is compacted
    link.cut();
    wait_until(DEADLINE, "/readyz to show the upstream degraded", || async {
        (payments_check(&sidecar).await.1["status"] == "degraded").then_some(())
    })
    .await;
    etcd.put(&key("payments", "two"), &instance(two.addr())).await;
    etcd.delete(&key("payments", "one")).await;
    etcd.compact().await;
    link.restore();

    wait_until(2 * DEADLINE, "ten requests in a row to the new set", || async {
        let before = one.requests();
        send_payments(&sidecar, 10).await;
        (one.requests() == before && two.requests() > 0).then_some(())
    })
    .await;
    assert!(sidecar.log().contains("was compacted; reading the set again"), "{}", sidecar.log());
}

#[tokio::test]
async fn registry_replaced_by_a_new_etcd_cluster_is_read_again() {
    let mut etcd = Etcd::start().await;
    let (one, two) = (Upstream::status(200).await, Upstream::status(200).await);
    for _ in 0..3 {
        etcd.put(&key("payments", "one"), &instance(one.addr())).await;
    }
    let sidecar = Sidecar::start(&payments_yaml(&etcd)).await;
    send_payments(&sidecar, 1).await;

    // a new, empty cluster on the same address: its revisions start again from 1
    etcd.restart_empty().await;
    etcd.put(&key("payments", "two"), &instance(two.addr())).await;

    wait_until(2 * DEADLINE, "ten requests in a row to the new cluster's instance", || async {
        let before = (one.requests(), two.requests());
        for _ in 0..10 {
            sidecar.get("payments", "/charge").await;
        }
        (one.requests() == before.0 && two.requests() == before.1 + 10).then_some(())
    })
    .await;
    assert!(sidecar.log().contains("another cluster"), "{}", sidecar.log());
}

/// The registry entries of service `checkout`.
async fn checkout_entries(etcd: &Etcd) -> Vec<Kv> {
    etcd.keys(&format!("{PREFIX}/checkout/")).await
}

fn register_yaml(etcd: &Etcd, app: SocketAddr) -> String {
    format!(
        "service:\n  name: checkout\n  app: {{ url: \"http://{app}\", health_path: /healthz }}\n  register: true\n{}",
        registry_yaml(etcd)
    )
}

#[tokio::test]
async fn registry_self_registration_holds_a_lease_and_is_deleted_on_sigterm() {
    let etcd = Etcd::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&register_yaml(&etcd, app.addr())).await;

    let entry = wait_until(DEADLINE, "the sidecar's own registry entry", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;
    let port = app.addr().port();
    assert!(entry.key.ends_with(&format!("-{port}")), "instance id is HOSTNAME-PORT: {entry:?}");
    let value: Value = serde_json::from_str(&entry.value).expect("the value is JSON");
    let address = value["address"].as_str().expect("an address");
    assert!(address.ends_with(&format!(":{port}")), "the app's port is advertised: {address}");
    assert!(value["metadata"]["outrigger_version"].is_string(), "{value}");
    assert_ne!(entry.lease, 0, "the entry is attached to a lease");
    let ttl = etcd.lease_ttl(entry.lease).await.expect("the lease is alive");
    assert!((1..=5).contains(&ttl), "the lease has lease_ttl: {ttl}");

    let status = sidecar.terminate().await;

    assert!(status.success(), "{status:?}");
    assert_eq!(checkout_entries(&etcd).await, [], "the entry is deleted before the sidecar exits");
    assert_eq!(etcd.lease_ttl(entry.lease).await, None, "the lease is revoked");
}

#[tokio::test]
async fn registry_self_registration_comes_back_under_a_new_lease_when_its_lease_is_lost() {
    let etcd = Etcd::start().await;
    let app = Upstream::status(200).await;
    let _sidecar = Sidecar::start(&register_yaml(&etcd, app.addr())).await;
    let first = wait_until(DEADLINE, "the sidecar's own registry entry", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;

    etcd.revoke(first.lease).await; // as if it had expired: the key goes with it
    assert_eq!(checkout_entries(&etcd).await, []);

    let again = wait_until(DEADLINE, "the entry to be written again", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;
    assert_eq!(again.key, first.key);
    assert_ne!(again.lease, first.lease);
    assert!(etcd.lease_ttl(again.lease).await.is_some(), "the new lease is alive");
}

#[tokio::test]
async fn registry_self_registration_returns_after_etcd_is_killed_and_comes_back_empty() {
    let mut etcd = Etcd::start().await;
    let app = Upstream::status(200).await;
    let _sidecar = Sidecar::start(&register_yaml(&etcd, app.addr())).await;
    let first = wait_until(DEADLINE, "the sidecar's own registry entry", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;

    // etcd is killed and comes back without its data: no key, no lease
    etcd.restart_empty().await;
    let again = wait_until(2 * DEADLINE, "the entry to be written again", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;
    assert_eq!(again.key, first.key);
    assert_eq!(again.value, first.value);
    assert!(etcd.lease_ttl(again.lease).await.is_some(), "under a live lease");
}

#[tokio::test]
async fn registry_entry_is_removed_while_the_app_is_unhealthy_and_comes_back() {
    let etcd = Etcd::start().await;
    let app = ToggledApp::start().await;
    let sidecar = Sidecar::start(&register_yaml(&etcd, app.addr)).await;
    let first = wait_until(DEADLINE, "the sidecar's own registry entry", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;

    app.healthy.store(false, Ordering::SeqCst);
    wait_until(DEADLINE, "the entry to go while the app is unhealthy", || async {
        checkout_entries(&etcd).await.is_empty().then_some(())
    })
    .await;
    assert_eq!(sidecar.admin("/readyz").await.0, 503);

    app.healthy.store(true, Ordering::SeqCst);
    let again = wait_until(DEADLINE, "the entry to come back once the app is healthy", || async {
        checkout_entries(&etcd).await.into_iter().next()
    })
    .await;
    assert_eq!(again.key, first.key);
    assert_ne!(again.lease, first.lease, "registered again under a new lease");
}

/// An app whose every path answers 200 while `healthy`, else 503.
struct ToggledApp {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
}

impl ToggledApp {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free loopback port");
        let addr = listener.local_addr().expect("bound");
        let healthy = Arc::new(AtomicBool::new(true));
        let shared = healthy.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let healthy = shared.clone();
                let service = hyper::service::service_fn(move |_req| {
                    let status = if healthy.load(Ordering::SeqCst) { 200 } else { 503 };
                    let mut res = Response::new(Full::new(Bytes::from_static(b"app\n")));
                    *res.status_mut() = http::StatusCode::from_u16(status).expect("a status");
                    async move { Ok::<_, std::convert::Infallible>(res) }
                });
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
                });
            }
        });
        Self { addr, healthy }
    }
}

/// A TCP link to `target` that the test can cut (closing every connection through it and
/// refusing new ones) and restore: etcd unreachable for the sidecar, reachable for the test.
struct Link {
    addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl Link {
    async fn to(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free loopback port");
        let addr = listener.local_addr().expect("bound");
        let (up, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut up = watch.clone();
                if !*up.borrow_and_update() {
                    continue; // dropped: the connection closes at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}
