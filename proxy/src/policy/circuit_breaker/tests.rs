//! The breaker driven step by step with paused time, and the layer around a scripted service.

use std::num::NonZeroU32;

use tower::{Layer, Service, ServiceExt};

use super::*;

fn cfg() -> config::CircuitBreaker {
    config::CircuitBreaker {
        failure_rate: config::Ratio::try_from(0.5).unwrap(),
        window: config::Duration::from_secs(10),
        min_requests: 4,
        consecutive_failures: NonZeroU32::new(3),
        open_for: config::Duration::from_secs(30),
        half_open_requests: NonZeroU32::new(2).unwrap(),
        mode: config::Mode::Enforce,
    }
}

fn pass(b: &mut Breaker, failed: bool) {
    let now = Instant::now();
    let admission = b.admit(now).expect("admitted");
    b.record(now, admission, failed);
}

#[tokio::test(start_paused = true)]
async fn opens_after_consecutive_failures_and_half_opens_after_open_for() {
    let mut b = Breaker::new(config::CircuitBreaker { min_requests: 100, ..cfg() }, Instant::now());
    pass(&mut b, true);
    pass(&mut b, false); // a success resets the run
    pass(&mut b, true);
    pass(&mut b, true);
    assert_eq!(b.state(), State::Closed);
    pass(&mut b, true);
    assert!(matches!(b.state(), State::Open { .. }), "three in a row");

    assert_eq!(b.admit(Instant::now()), Err(Duration::from_secs(30)));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(b.admit(Instant::now()), Err(Duration::from_secs(20)), "Retry-After counts down");
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(b.admit(Instant::now()), Ok(Admission::Probe));
    assert!(matches!(b.state(), State::HalfOpen { .. }));
}

#[tokio::test(start_paused = true)]
async fn opens_on_the_failure_rate_once_min_requests_were_seen() {
    let mut b = Breaker::new(
        config::CircuitBreaker { consecutive_failures: None, ..cfg() },
        Instant::now(),
    );
    pass(&mut b, true);
    pass(&mut b, false);
    pass(&mut b, true);
    assert_eq!(b.state(), State::Closed, "3 requests: below min_requests");
    pass(&mut b, true);
    assert!(matches!(b.state(), State::Open { .. }), "3 of 4 failed >= 50%");
}

#[tokio::test(start_paused = true)]
async fn old_failures_leave_the_window() {
    let mut b = Breaker::new(
        config::CircuitBreaker { consecutive_failures: None, ..cfg() },
        Instant::now(),
    );
    pass(&mut b, true);
    pass(&mut b, true);
    tokio::time::advance(Duration::from_secs(11)).await;
    pass(&mut b, false);
    pass(&mut b, false);
    pass(&mut b, false);
    pass(&mut b, true);
    assert_eq!(b.state(), State::Closed, "1 of 4 in the window failed");
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_the_probes_and_their_success_closes() {
    let mut b = Breaker::new(cfg(), Instant::now());
    for _ in 0..3 {
        pass(&mut b, true);
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    let now = Instant::now();
    let (p1, p2) = (b.admit(now).unwrap(), b.admit(now).unwrap());
    assert_eq!(b.admit(now), Err(PROBING_RETRY_AFTER), "only two probes");
    b.record(now, p1, false);
    assert!(matches!(b.state(), State::HalfOpen { .. }));
    b.record(now, p2, false);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.admit(now), Ok(Admission::Normal));
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_a_cancelled_probe_frees_its_slot() {
    let mut b = Breaker::new(cfg(), Instant::now());
    for _ in 0..3 {
        pass(&mut b, true);
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    let now = Instant::now();
    let p1 = b.admit(now).unwrap();
    let p2 = b.admit(now).unwrap();
    b.cancel(p1);
    let p3 = b.admit(now).expect("the cancelled probe's slot is free");
    b.record(now, p2, true);
    assert_eq!(b.state(), State::Open { until: now + Duration::from_secs(30) });
    b.record(now, p3, false); // finished after the re-open: ignored
    assert!(matches!(b.state(), State::Open { .. }));
}

#[tokio::test(start_paused = true)]
async fn client_errors_are_not_failures_and_the_layer_answers_circuit_open() {
    let gauge = IntGauge::new("g", "g").unwrap();
    let forced = IntGauge::new("forced", "forced").unwrap();
    let layer = CircuitBreakerLayer::new(&Arc::from("p"), cfg(), (gauge.clone(), forced));
    let mut svc = layer.layer(tower::service_fn(|status: u16| async move {
        let mut res = Response::new(crate::http::Body::empty());
        *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Ok::<_, ProxyError>(res)
    }));
    for _ in 0..5 {
        assert_eq!(svc.ready().await.unwrap().call(404).await.unwrap().status(), 404);
    }
    assert_eq!(gauge.get(), 0, "4xx do not open the breaker");
    for _ in 0..3 {
        svc.ready().await.unwrap().call(503).await.unwrap();
    }
    assert_eq!(gauge.get(), 2, "open");
    let err = svc.ready().await.unwrap().call(200).await.unwrap_err();
    assert!(
        matches!(err, ProxyError::CircuitOpen { retry_after, .. } if retry_after == Duration::from_secs(30))
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    svc.ready().await.unwrap().call(200).await.unwrap();
    assert_eq!(gauge.get(), 1, "half-open after one good probe of two");
    svc.ready().await.unwrap().call(200).await.unwrap();
    assert_eq!(gauge.get(), 0, "closed");
}

#[tokio::test(start_paused = true)]
async fn a_trailers_only_grpc_answer_fails_by_its_status_not_its_http_200() {
    use crate::http::grpc::{Answered, GrpcStatus};
    let gauge = IntGauge::new("g", "g").unwrap();
    let forced = IntGauge::new("forced", "forced").unwrap();
    let layer = CircuitBreakerLayer::new(&Arc::from("p"), cfg(), (gauge.clone(), forced));
    let mut svc = layer.layer(tower::service_fn(|status: GrpcStatus| async move {
        let mut res = Response::new(crate::http::Body::empty());
        res.extensions_mut().insert(Answered(status)); // as forward.rs marks it
        Ok::<_, ProxyError>(res)
    }));
    for status in [GrpcStatus::NotFound, GrpcStatus::InvalidArgument, GrpcStatus::Ok] {
        for _ in 0..3 {
            svc.ready().await.unwrap().call(status).await.unwrap();
        }
    }
    assert_eq!(gauge.get(), 0, "the caller's statuses do not open the breaker");
    for _ in 0..3 {
        svc.ready().await.unwrap().call(GrpcStatus::Unavailable).await.unwrap();
    }
    assert_eq!(gauge.get(), 2, "three unavailable in a row open it");
}

#[tokio::test(start_paused = true)]
async fn forced_open_refuses_whatever_the_state_and_auto_gives_it_back_closed_and_fresh() {
    let mut b = Breaker::new(cfg(), Instant::now());
    pass(&mut b, true);
    pass(&mut b, true);
    b.force(Some(Forced::Open), Instant::now());
    assert_eq!(b.admit(Instant::now()), Err(Duration::from_secs(30)), "open_for as Retry-After");
    assert_eq!(b.gauge(), 2);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(b.admit(Instant::now()).is_err(), "no probe while forced: time does not end it");

    b.force(None, Instant::now());
    assert_eq!((b.forced(), b.state(), b.gauge()), (None, State::Closed, 0));
    pass(&mut b, true);
    pass(&mut b, true);
    assert_eq!(b.state(), State::Closed, "the two failures before the force were forgotten");
    pass(&mut b, true);
    assert!(matches!(b.state(), State::Open { .. }));
}

#[tokio::test(start_paused = true)]
async fn forced_closed_admits_an_open_breaker_and_no_outcome_opens_it() {
    let mut b = Breaker::new(cfg(), Instant::now());
    for _ in 0..3 {
        pass(&mut b, true);
    }
    assert!(matches!(b.state(), State::Open { .. }));
    b.force(Some(Forced::Closed), Instant::now());
    assert_eq!(b.gauge(), 0, "what it does now");
    for _ in 0..10 {
        assert_eq!(b.admit(Instant::now()), Ok(Admission::Normal));
        b.record(Instant::now(), Admission::Normal, true);
    }
    assert_eq!(b.gauge(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_control_forces_the_layer_and_moves_both_gauges() {
    let upstream: Arc<str> = "payments".into();
    let (state, forced) = (IntGauge::new("s", "s").unwrap(), IntGauge::new("f", "f").unwrap());
    let layer = CircuitBreakerLayer::new(&upstream, cfg(), (state.clone(), forced.clone()));
    let control = layer.control();
    let status = control.force(Some(Forced::Open));
    assert_eq!(status, CircuitStatus { state: "open", forced: Some(Forced::Open) });
    assert_eq!((state.get(), forced.get()), (2, 1));
    let status = control.force(None);
    assert_eq!(status, CircuitStatus { state: "closed", forced: None });
    assert_eq!((state.get(), forced.get()), (0, 0));
}
