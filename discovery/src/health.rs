//! Active health checks: each endpoint is probed every `interval` (an HTTP GET of `path`, or a
//! TCP connect), each probe bounded by `timeout`. `unhealthy_threshold` failures in a row take
//! an endpoint out of balancing, `healthy_threshold` successes in a row bring it back. Its very
//! first probe decides alone (as in Envoy), so a new endpoint is judged within one probe.
//!
//! The probe itself is handed in by the caller (the proxy probes over its own client, TLS
//! included); `tcp_probe` is here for `tcp: true`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use outrigger_config as config;

use crate::pool::Member;

/// Probes one endpoint: `Ok` when it is healthy, else why not.
pub type Probe = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync,
>;

/// A health check connecting over TCP and closing at once.
pub fn tcp_probe() -> Probe {
    Arc::new(|addr| {
        Box::pin(async move {
            tokio::net::TcpStream::connect(addr).await.map(drop).map_err(|e| e.to_string())
        })
    })
}

/// An endpoint's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not probed yet: no traffic until the first probe passes.
    Unchecked = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Unchecked,
            1 => Self::Healthy,
            _ => Self::Unhealthy,
        }
    }
}

/// Consecutive results and the thresholds they are held to: no I/O, no clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Streak {
    health: Health,
    run: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Streak {
    pub(crate) fn new(cfg: &config::HealthCheck) -> Self {
        Self {
            health: Health::Unchecked,
            run: 0,
            healthy_threshold: cfg.healthy_threshold.get(),
            unhealthy_threshold: cfg.unhealthy_threshold.get(),
        }
    }

    /// Folds in one probe result; returns the health it leaves.
    pub(crate) fn record(&mut self, passed: bool) -> Health {
        let (same_direction, threshold, flipped) = match (self.health, passed) {
            (Health::Unchecked, true) => (false, 1, Health::Healthy),
            (Health::Unchecked, false) => (false, 1, Health::Unhealthy),
            (Health::Healthy, true) | (Health::Unhealthy, false) => {
                self.run = 0;
                return self.health;
            }
            (Health::Healthy, false) => (true, self.unhealthy_threshold, Health::Unhealthy),
            (Health::Unhealthy, true) => (true, self.healthy_threshold, Health::Healthy),
        };
        self.run = if same_direction { self.run + 1 } else { 1 };
        if self.run >= threshold {
            self.health = flipped;
            self.run = 0;
        }
        self.health
    }
}

/// Probes `member` until it leaves the endpoint set (its last `Arc` is dropped).
pub(crate) async fn check(
    upstream: Arc<str>,
    member: Weak<Member>,
    cfg: config::HealthCheck,
    probe: Probe,
    events: Option<crate::pool::Events>,
) {
    let mut streak = Streak::new(&cfg);
    let mut last_error = String::new();
    loop {
        let Some(target) = member.upgrade() else { return };
        let addr = target.endpoint.addr;
        let outcome = match tokio::time::timeout(cfg.timeout.get(), probe(addr)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {}", cfg.timeout)),
        };
        if let Some(events) = &events {
            events.report(crate::pool::Event::HealthCheck { passed: outcome.is_ok() });
        }
        let before = target.health();
        let after = streak.record(outcome.is_ok());
        target.set_health(after);
        match (&outcome, before == after) {
            (Ok(()), false) => tracing::info!(%upstream, endpoint = %addr, "endpoint healthy"),
            (Err(error), false) => {
                tracing::warn!(%upstream, endpoint = %addr, %error, "endpoint unhealthy");
            }
            (Err(error), true) if *error != last_error => {
                tracing::debug!(%upstream, endpoint = %addr, %error, "health check failed");
            }
            _ => {}
        }
        last_error = outcome.err().unwrap_or_default();
        drop(target);
        tokio::time::sleep(cfg.interval.get()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn streak(healthy: u32, unhealthy: u32) -> Streak {
        let cfg = config::HealthCheck {
            healthy_threshold: NonZeroU32::new(healthy).unwrap(),
            unhealthy_threshold: NonZeroU32::new(unhealthy).unwrap(),
            ..config::HealthCheck::default()
        };
        Streak::new(&cfg)
    }

    #[test]
    fn the_first_probe_decides_alone() {
        assert_eq!(streak(2, 3).record(true), Health::Healthy);
        assert_eq!(streak(2, 3).record(false), Health::Unhealthy);
    }

    #[test]
    fn it_takes_unhealthy_threshold_failures_in_a_row_to_go_unhealthy() {
        let mut s = streak(2, 3);
        s.record(true);
        assert_eq!(s.record(false), Health::Healthy);
        assert_eq!(s.record(false), Health::Healthy);
        assert_eq!(s.record(true), Health::Healthy, "a success breaks the run");
        assert_eq!(s.record(false), Health::Healthy);
        assert_eq!(s.record(false), Health::Healthy);
        assert_eq!(s.record(false), Health::Unhealthy);
    }

    #[test]
    fn it_takes_healthy_threshold_successes_in_a_row_to_come_back() {
        let mut s = streak(2, 1);
        s.record(false);
        assert_eq!(s.record(true), Health::Unhealthy);
        assert_eq!(s.record(false), Health::Unhealthy, "a failure breaks the run");
        assert_eq!(s.record(true), Health::Unhealthy);
        assert_eq!(s.record(true), Health::Healthy);
    }
}
