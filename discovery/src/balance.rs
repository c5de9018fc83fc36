//! Picking one endpoint of the current set for a request.
//!
//! `round_robin` and `random` are here; `p2c_ewma` (power of two choices over peak-EWMA
//! latency, as Linkerd does) needs per-endpoint latency feedback and arrives with health
//! checking; until then it balances round-robin.

use std::sync::atomic::{AtomicUsize, Ordering};

use outrigger_config as config;
use rand::RngExt;

use crate::Endpoint;

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(AtomicUsize),
    Random,
}

impl Balancer {
    pub fn new(kind: config::LoadBalancer) -> Self {
        match kind {
            config::LoadBalancer::Random => Self::Random,
            config::LoadBalancer::RoundRobin | config::LoadBalancer::P2cEwma => {
                Self::RoundRobin(AtomicUsize::new(0))
            }
        }
    }

    /// One endpoint of `endpoints`, or `None` when the set is empty.
    pub fn pick<'e>(&self, endpoints: &'e [Endpoint]) -> Option<&'e Endpoint> {
        if endpoints.len() <= 1 {
            return endpoints.first();
        }
        let i = match self {
            // Relaxed: the counter only spreads load, it orders nothing
            Self::RoundRobin(next) => next.fetch_add(1, Ordering::Relaxed),
            Self::Random => rand::rng().random_range(0..endpoints.len()),
        };
        endpoints.get(i % endpoints.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<Endpoint> {
        (0..n).map(|i| Endpoint::new(([127, 0, 0, 1], 9000 + i).into())).collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let set = endpoints(3);
        let rr = Balancer::new(config::LoadBalancer::RoundRobin);
        let picked: Vec<u16> = (0..6).map(|_| rr.pick(&set).unwrap().addr.port()).collect();
        assert_eq!(picked, [9000, 9001, 9002, 9000, 9001, 9002]);
    }

    #[test]
    fn an_empty_set_gives_no_endpoint() {
        assert!(Balancer::new(config::LoadBalancer::Random).pick(&[]).is_none());
        assert!(Balancer::new(config::LoadBalancer::RoundRobin).pick(&[]).is_none());
    }

    #[test]
    fn random_only_picks_members_of_the_set() {
        let set = endpoints(4);
        let random = Balancer::new(config::LoadBalancer::Random);
        assert!((0..100).all(|_| set.contains(random.pick(&set).unwrap())));
    }
}
