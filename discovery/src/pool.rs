//! An upstream's endpoints as the balancer sees them: each discovered endpoint with its health
//! (active checks), its ejection (passive outlier detection) and its load (requests in flight,
//! peak-EWMA latency).
//!
//! A task follows the discovery source: an endpoint that stays in the set keeps its state (an
//! unhealthy endpoint does not become healthy because DNS answered again); a new one is probed
//! at once; a removed one stops being probed when its last request ends. Requests read the
//! current members without a lock: a `watch` of an `Arc`'d slice, and atomics per member.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balance::Balancer;
use crate::health::{self, Health, Probe};
use crate::load::PeakEwma;
use crate::outlier::{self, Ejections};
use crate::{Endpoint, Endpoints, Snapshot};

/// One endpoint and what is known about it.
#[derive(Debug)]
pub(crate) struct Member {
    pub endpoint: Endpoint,
    health: AtomicU8,
    /// Nanoseconds after the pool's epoch until which it is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    in_flight: AtomicU32,
    latency: Mutex<PeakEwma>,
    ejections: Mutex<Ejections>,
    /// What the proxy keeps per endpoint (its idle connections): made on first use, dropped
    /// with the member when discovery removes the endpoint and its last request ends.
    attached: OnceLock<Box<dyn Any + Send + Sync>>,
}

/// Where an endpoint stands, as the admin view and `outrigger_endpoints{state}` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Not probed yet (active checks only).
    Unchecked,
    Unhealthy,
    Ejected,
}

impl State {
    pub const ALL: [State; 4] =
        [State::Healthy, State::Unchecked, State::Unhealthy, State::Ejected];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unchecked => "unchecked",
            State::Unhealthy => "unhealthy",
            State::Ejected => "ejected",
        }
    }
}

/// One endpoint, for the admin view.
#[derive(Debug, Clone)]
pub struct EndpointReport {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: State,
    /// The latency estimate; `None` until the endpoint answered once.
    pub latency: Option<Duration>,
    pub in_flight: u32,
    pub ejections_in_a_row: u32,
}

impl Member {
    fn new(endpoint: Endpoint, health: Health) -> Self {
        Self {
            endpoint,
            health: AtomicU8::new(health as u8),
            ejected_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            latency: Mutex::default(),
            ejections: Mutex::default(),
            attached: OnceLock::new(),
        }
    }

    pub(crate) fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub(crate) fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::Relaxed);
    }

    fn ejected(&self, since_epoch: u64) -> bool {
        since_epoch < self.ejected_until.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate, in nanoseconds; `None` if never measured.
    pub(crate) fn latency(&self, now: Instant) -> Option<f64> {
        self.latency.lock().expect("no panics under the latency lock").estimate(now)
    }
}

/// The members of one upstream and how requests are spread over them.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: Arc<str>,
    endpoints: Endpoints,
    members: watch::Receiver<Arc<[Arc<Member>]>>,
    balancer: Balancer,
    outlier: Option<config::OutlierDetection>,
    checked: bool,
    epoch: Instant,
    events: Option<Events>,
}

/// What the pool is asked to do beyond following discovery.
#[derive(Clone, Default)]
pub struct PoolConfig {
    pub load_balancer: config::LoadBalancer,
    pub health_check: Option<(config::HealthCheck, Probe)>,
    pub outlier_detection: Option<config::OutlierDetection>,
    /// Told of each ejection and each health check's result (for metrics); nothing by default.
    pub events: Option<Events>,
}

/// Something that happened to one of the pool's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Ejected by outlier detection.
    Ejected,
    /// A health check answered: passed or failed.
    HealthCheck { passed: bool },
}

/// Where a pool reports its [`Event`]s.
#[derive(Clone)]
pub struct Events(Arc<dyn Fn(Event) + Send + Sync>);

impl Events {
    pub fn new(report: impl Fn(Event) + Send + Sync + 'static) -> Self {
        Events(Arc::new(report))
    }

    pub(crate) fn report(&self, event: Event) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl std::fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolConfig")
            .field("load_balancer", &self.load_balancer)
            .field("health_check", &self.health_check.as_ref().map(|(c, _)| c))
            .field("outlier_detection", &self.outlier_detection)
            .field("events", &self.events)
            .finish()
    }
}

impl Pool {
    /// Follows `endpoints` until every clone of the pool is dropped.
    pub fn start(upstream: &str, endpoints: Endpoints, cfg: PoolConfig) -> Self {
        let (tx, members) = watch::channel(Arc::from([]));
        let upstream: Arc<str> = upstream.into();
        let inner = Arc::new(Inner {
            upstream: upstream.clone(),
            endpoints: endpoints.clone(),
            members,
            balancer: Balancer::new(cfg.load_balancer),
            outlier: cfg.outlier_detection,
            checked: cfg.health_check.is_some(),
            epoch: Instant::now(),
            events: cfg.events.clone(),
        });
        // the first set is taken in now, so a fixed set serves from the first request
        let mut follow =
            Follow { upstream, health_check: cfg.health_check, events: cfg.events, tx };
        let mut discovered = endpoints.receiver();
        follow.apply(&discovered.borrow_and_update());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = discovered.changed() => if changed.is_err() { return },
                    _ = follow.tx.closed() => return,
                }
                follow.apply(&discovered.borrow_and_update());
            }
        });
        Self { inner }
    }

    pub fn upstream(&self) -> &Arc<str> {
        &self.inner.upstream
    }

    /// The discovery source behind the pool.
    pub fn endpoints(&self) -> &Endpoints {
        &self.inner.endpoints
    }

    /// Picks an endpoint for one request, avoiding `avoid` (those a retry already tried) when
    /// another is available. `None`: no endpoint is healthy.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Option<Picked> {
        // a short read of the current set, released before this returns: no clone of the slice
        let members = self.inner.members.borrow();
        let now = Instant::now();
        let since_epoch = self.since_epoch(now);
        let usable = |m: &Member| m.health() == Health::Healthy && !m.ejected(since_epoch);
        let fresh = |m: &Member| usable(m) && !avoid.contains(&m.endpoint.addr);
        let member = match avoid.is_empty() {
            true => self.inner.balancer.pick(&members, usable, now),
            false => self
                .inner
                .balancer
                .pick(&members, fresh, now)
                .or_else(|| self.inner.balancer.pick(&members, usable, now)),
        }?;
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked { member: member.clone(), pool: self.inner.clone(), sent: now })
    }

    /// Every member with its state, for the admin view and metrics.
    pub fn report(&self) -> Vec<EndpointReport> {
        let now = Instant::now();
        let since_epoch = self.since_epoch(now);
        self.inner
            .members
            .borrow()
            .iter()
            .map(|m| EndpointReport {
                addr: m.endpoint.addr,
                weight: m.endpoint.weight,
                state: match (m.ejected(since_epoch), m.health()) {
                    (true, _) => State::Ejected,
                    (false, Health::Healthy) => State::Healthy,
                    (false, Health::Unchecked) => State::Unchecked,
                    (false, Health::Unhealthy) => State::Unhealthy,
                },
                latency: m.latency(now).map(|nanos| Duration::from_nanos(nanos as u64)),
                in_flight: m.in_flight(),
                ejections_in_a_row: m
                    .ejections
                    .lock()
                    .expect("no panics under the ejections lock")
                    .in_a_row(),
            })
            .collect()
    }

    /// With active checks: has every endpoint had its first probe? (Readiness waits for it, so
    /// an app held until the sidecar is ready never meets an unchecked upstream.)
    pub fn checked(&self) -> bool {
        !self.inner.checked
            || self.inner.members.borrow().iter().all(|m| m.health() != Health::Unchecked)
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.epoch).as_nanos() as u64
    }
}

/// A request's hold on its endpoint: counted in flight until it ends, then its latency and
/// outcome feed the balancer and outlier detection.
#[derive(Debug)]
pub struct Picked {
    member: Arc<Member>,
    pool: Arc<Inner>,
    sent: Instant,
}

impl Picked {
    pub fn endpoint(&self) -> &Endpoint {
        &self.member.endpoint
    }

    /// The proxy's state for this endpoint, made by `T::default()` on first use and kept as
    /// long as the endpoint is a member. One type per pool: the first one asked for is kept.
    ///
    /// # Panics
    /// If another type was attached to this endpoint first.
    pub fn attached<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let attached = self.member.attached.get_or_init(|| Box::new(Arc::new(T::default())));
        attached.downcast_ref::<Arc<T>>().expect("one attached type per endpoint").clone()
    }

    /// The response headers arrived (`failed`: a 5xx), or the attempt failed (`failed`: true).
    pub fn finish(self, failed: bool) {
        let now = Instant::now();
        self.member
            .latency
            .lock()
            .expect("no panics under the latency lock")
            .observe(now.saturating_duration_since(self.sent), now);
        if let Some(cfg) = &self.pool.outlier {
            self.outcome(cfg, failed, now);
        }
    }

    fn outcome(&self, cfg: &config::OutlierDetection, failed: bool, now: Instant) {
        let failures = &self.member.consecutive_failures;
        if !failed {
            if failures.load(Ordering::Relaxed) != 0 {
                failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if failures.fetch_add(1, Ordering::Relaxed) + 1 < cfg.consecutive_failures.get() {
            return;
        }
        failures.store(0, Ordering::Relaxed);
        let members = self.pool.members.borrow().clone();
        let since_epoch = now.saturating_duration_since(self.pool.epoch).as_nanos() as u64;
        let ejected = members.iter().filter(|m| m.ejected(since_epoch)).count();
        let addr = self.member.endpoint.addr;
        let upstream = &self.pool.upstream;
        if self.member.ejected(since_epoch) {
            return;
        }
        if ejected >= outlier::max_ejected(cfg, members.len()) {
            tracing::info!(%upstream, endpoint = %addr, ejected, "not ejecting: max_ejected_percent reached");
            return;
        }
        let base = cfg.base_ejection.get();
        let returns_at = self
            .member
            .ejections
            .lock()
            .expect("no panics under the ejections lock")
            .eject(base, now);
        let until = returns_at.saturating_duration_since(self.pool.epoch).as_nanos() as u64;
        self.member.ejected_until.store(until, Ordering::Relaxed);
        let length = returns_at - now;
        tracing::warn!(%upstream, endpoint = %addr, ?length, "endpoint ejected after consecutive failures");
        if let Some(events) = &self.pool.events {
            events.report(Event::Ejected);
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.member.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The task's side: turns each discovered set into members.
struct Follow {
    upstream: Arc<str>,
    health_check: Option<(config::HealthCheck, Probe)>,
    events: Option<Events>,
    tx: watch::Sender<Arc<[Arc<Member>]>>,
}

impl Follow {
    fn apply(&mut self, snapshot: &Snapshot) {
        let current = self.tx.borrow().clone();
        let start_health =
            if self.health_check.is_some() { Health::Unchecked } else { Health::Healthy };
        let members: Arc<[Arc<Member>]> = snapshot
            .endpoints
            .iter()
            .map(|endpoint| {
                if let Some(kept) = current.iter().find(|m| m.endpoint == *endpoint) {
                    return kept.clone();
                }
                let member = Arc::new(Member::new(endpoint.clone(), start_health));
                if let Some((cfg, probe)) = &self.health_check {
                    tokio::spawn(health::check(
                        self.upstream.clone(),
                        Arc::downgrade(&member),
                        cfg.clone(),
                        probe.clone(),
                        self.events.clone(),
                    ));
                }
                member
            })
            .collect();
        self.tx.send_replace(members);
    }
}

#[cfg(test)]
pub(crate) fn test_member(
    endpoint: Endpoint,
    latency: Option<Duration>,
    now: Instant,
) -> Arc<Member> {
    let member = Arc::new(Member::new(endpoint, Health::Healthy));
    if let Some(latency) = latency {
        member.latency.lock().unwrap().observe(latency, now);
    }
    member
}

/// A request in flight on `member` until dropped.
#[cfg(test)]
pub(crate) fn hold(member: &Arc<Member>) -> impl Drop {
    struct Held(Arc<Member>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
    member.in_flight.fetch_add(1, Ordering::Relaxed);
    Held(member.clone())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn outlier(percent: u8) -> config::OutlierDetection {
        config::OutlierDetection {
            consecutive_failures: NonZeroU32::new(2).unwrap(),
            base_ejection: config::Duration::from_secs(10),
            max_ejected_percent: percent,
        }
    }

    fn pool(cfg: PoolConfig, ports: &[u16]) -> (watch::Sender<Snapshot>, Pool) {
        let (tx, endpoints) = Endpoints::driven();
        tx.send_replace(Snapshot::ready(ports.iter().map(|p| endpoint(*p)).collect::<Vec<_>>()));
        (tx, Pool::start("p", endpoints, cfg))
    }

    fn state_of(pool: &Pool, port: u16) -> State {
        pool.report().into_iter().find(|e| e.addr.port() == port).expect("a member").state
    }

    /// Sends one request to whichever endpoint the pool picks; `fail` decides by port.
    fn send(pool: &Pool, fail: impl Fn(u16) -> bool) -> u16 {
        let picked = pool.pick(&[]).expect("an endpoint");
        let port = picked.endpoint().addr.port();
        picked.finish(fail(port));
        port
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_is_ejected_after_consecutive_failures_and_returns_after_its_time() {
        let cfg = PoolConfig {
            load_balancer: config::LoadBalancer::RoundRobin,
            outlier_detection: Some(outlier(50)),
            ..PoolConfig::default()
        };
        let (_tx, pool) = pool(cfg, &[9000, 9001]);
        let ports: Vec<u16> = (0..8).map(|_| send(&pool, |p| p == 9001)).collect();
        assert_eq!(ports.iter().filter(|p| **p == 9001).count(), 2, "{ports:?}");
        assert_eq!(state_of(&pool, 9001), State::Ejected);

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(state_of(&pool, 9001), State::Healthy, "back after base_ejection");
        let ports: Vec<u16> = (0..4).map(|_| send(&pool, |_| false)).collect();
        assert!(ports.contains(&9001));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_stops_at_max_ejected_percent() {
        let cfg = PoolConfig {
            load_balancer: config::LoadBalancer::RoundRobin,
            outlier_detection: Some(outlier(50)),
            ..PoolConfig::default()
        };
        let (_tx, pool) = pool(cfg, &[9000, 9001]);
        for _ in 0..20 {
            send(&pool, |_| true);
        }
        let ejected = pool.report().iter().filter(|e| e.state == State::Ejected).count();
        assert_eq!(ejected, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pick_avoids_the_endpoints_already_tried_while_another_is_usable() {
        let (_tx, pool) = pool(PoolConfig::default(), &[9000, 9001]);
        let tried = [SocketAddr::from(([127, 0, 0, 1], 9000))];
        for _ in 0..20 {
            assert_eq!(pool.pick(&tried).unwrap().endpoint().addr.port(), 9001);
        }
        let both = [tried[0], SocketAddr::from(([127, 0, 0, 1], 9001))];
        assert!(pool.pick(&both).is_some(), "every endpoint tried: one of them again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_discovery_update_keeps_the_state_of_endpoints_that_stay() {
        let cfg = PoolConfig { outlier_detection: Some(outlier(100)), ..PoolConfig::default() };
        let (tx, pool) = pool(cfg, &[9000]);
        send(&pool, |_| true);
        send(&pool, |_| true);
        assert_eq!(state_of(&pool, 9000), State::Ejected);

        tx.send_replace(Snapshot::ready(vec![endpoint(9000), endpoint(9001)]));
        tokio::task::yield_now().await;
        assert_eq!(pool.report().len(), 2);
        assert_eq!(state_of(&pool, 9000), State::Ejected, "still ejected after the update");
        assert_eq!(state_of(&pool, 9001), State::Healthy);
        assert_eq!(pool.pick(&[]).unwrap().endpoint().addr.port(), 9001);

        tx.send_replace(Snapshot::ready(vec![endpoint(9001)]));
        tokio::task::yield_now().await;
        assert_eq!(pool.report().len(), 1, "a removed endpoint leaves the pool");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_counts_in_flight_until_it_ends() {
        let (_tx, pool) = pool(PoolConfig::default(), &[9000]);
        let picked = pool.pick(&[]).unwrap();
        assert_eq!(pool.report()[0].in_flight, 1);
        drop(picked);
        assert_eq!(pool.report()[0].in_flight, 0, "a dropped attempt frees its count");
    }
}
