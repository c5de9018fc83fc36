//! DNS discovery against Debian's real dnsmasq: record changes are followed, SRV ports are
//! used, NXDOMAIN empties the set, and a nameserver outage keeps the last endpoints serving.

use std::net::{Ipv6Addr, SocketAddr};

use outrigger_tests::{DEADLINE, Dnsmasq, Reply, Sidecar, Upstream, Zone, wait_until};

/// A sidecar whose `payments` upstream is discovered with `dns` (a YAML flow mapping's
/// fields), asking only `dns`.
async fn sidecar(dns: &Dnsmasq, fields: &str) -> Sidecar {
    let yaml = format!(
        "resolver: {{ nameservers: [\"{}\"] }}\nupstreams:\n  payments:\n    discovery: {{ dns: {{ {fields}, refresh: 200ms }} }}\n    load_balancer: round_robin\n",
        dns.addr()
    );
    Sidecar::start(&yaml).await
}

async fn upstream_at(ip: [u8; 4], port: u16) -> Upstream {
    Upstream::scripted_at(SocketAddr::from((ip, port)), [Reply::Status(200)]).await
}

/// `/readyz`'s status and its check of the `payments` upstream.
async fn readiness(sidecar: &Sidecar) -> (u16, serde_json::Value) {
    let (status, body) = sidecar.admin("/readyz").await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("readyz answers JSON");
    (status, json["checks"]["upstream.payments"].clone())
}

#[tokio::test]
async fn an_a_record_change_moves_traffic_to_the_new_address() {
    let old = upstream_at([127, 0, 0, 2], 0).await;
    let port = old.addr().port();
    let new = upstream_at([127, 0, 0, 3], port).await;
    let dns = Dnsmasq::start(Zone::new().host("payments.test", old.addr().ip())).await;
    let sidecar = sidecar(&dns, &format!("name: payments.test, port: {port}, record: a")).await;

    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert_eq!((old.requests(), new.requests()), (1, 0));

    dns.set_hosts(&Zone::new().host("payments.test", new.addr().ip()));
    wait_until(DEADLINE, "requests to reach the record's new address", || async {
        (sidecar.get("payments", "/").await.status() == 200 && new.requests() > 0).then_some(())
    })
    .await;
    let (old_seen, new_seen) = (old.requests(), new.requests());
    for _ in 0..5 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(old.requests(), old_seen, "the old address gets no more requests");
    assert_eq!(new.requests(), new_seen + 5);
}

#[tokio::test]
async fn aaaa_records_reach_ipv6_endpoints_on_the_configured_port() {
    let up = Upstream::scripted_at((Ipv6Addr::LOCALHOST, 0).into(), [Reply::Status(200)]).await;
    let dns = Dnsmasq::start(Zone::new().host("payments.test", up.addr().ip())).await;
    let port = up.addr().port();
    let sidecar = sidecar(&dns, &format!("name: payments.test, port: {port}, record: aaaa")).await;

    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn srv_records_send_traffic_to_each_targets_own_port() {
    let a = upstream_at([127, 0, 0, 2], 0).await;
    let b = upstream_at([127, 0, 0, 3], 0).await;
    let (a_port, b_port) = (a.addr().port(), b.addr().port());
    assert_ne!(a_port, b_port, "the targets need ports of their own");
    let zone = Zone::new()
        .host("a.payments.test", a.addr().ip())
        .host("b.payments.test", b.addr().ip())
        .srv("_http._tcp.payments.test", "a.payments.test", a_port, 10)
        .srv("_http._tcp.payments.test", "b.payments.test", b_port, 10);
    let dns = Dnsmasq::start(zone).await;
    let sidecar = sidecar(&dns, "name: _http._tcp.payments.test, record: srv").await;

    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert!(a.requests() > 0 && b.requests() > 0, "a: {}, b: {}", a.requests(), b.requests());
    assert_eq!(a.requests() + b.requests(), 10);
    let (_, check) = readiness(&sidecar).await;
    assert_eq!(check["detail"], "2 endpoint(s), 2 healthy", "{check}");
}

#[tokio::test]
async fn a_name_that_no_longer_exists_leaves_no_endpoints_and_requests_get_503() {
    let up = upstream_at([127, 0, 0, 2], 0).await;
    let dns = Dnsmasq::start(Zone::new().host("payments.test", up.addr().ip())).await;
    let port = up.addr().port();
    let sidecar = sidecar(&dns, &format!("name: payments.test, port: {port}, record: a")).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);

    dns.set_hosts(&Zone::new()); // payments.test now answers NXDOMAIN
    let res = wait_until(DEADLINE, "requests to find no endpoint", || async {
        let res = sidecar.get("payments", "/").await;
        (res.status() == 503).then_some(res)
    })
    .await;
    assert_eq!(res.headers()["outrigger-error"], "no-healthy-endpoints");
    let seen = up.requests();
    assert_eq!(sidecar.get("payments", "/").await.status(), 503);
    assert_eq!(up.requests(), seen, "nothing is forwarded to the old address");
    let (_, check) = readiness(&sidecar).await;
    assert_eq!(
        (&check["status"], &check["detail"]),
        (&"degraded".into(), &"0 endpoint(s), 0 healthy".into())
    );
}

#[tokio::test]
async fn with_the_nameserver_gone_traffic_keeps_flowing_and_readyz_shows_degraded() {
    let up = upstream_at([127, 0, 0, 2], 0).await;
    let mut dns = Dnsmasq::start(Zone::new().host("payments.test", up.addr().ip())).await;
    let port = up.addr().port();
    let sidecar = sidecar(&dns, &format!("name: payments.test, port: {port}, record: a")).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);

    dns.stop();
    let (status, check) = wait_until(DEADLINE, "readyz to show the upstream degraded", || async {
        let (status, check) = readiness(&sidecar).await;
        (check["status"] == "degraded").then_some((status, check))
    })
    .await;
    assert_eq!(status, 200, "a DNS outage does not fail readiness: {check}");
    let detail = check["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("serving the last 1 endpoint(s)"), "{detail}");
    for _ in 0..3 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(up.requests(), 4);
}
