//! Picking one usable endpoint for a request.
//!
//! - `p2c_ewma` (the default): two distinct usable endpoints at random, and the one with the
//!   lower cost wins: peak-EWMA latency × (requests in flight + 1) ÷ weight. Linkerd's and
//!   Finagle's balancer: it follows latency without the herding of "always the fastest". An
//!   endpoint not measured yet takes its opponent's latency, so it wins or loses on its load.
//! - `round_robin`: the usable endpoints in turn (weights are not used).
//! - `random`: at random, in proportion to the weights.
//!
//! Usable = healthy and not ejected; the caller says which. No allocation per pick: the usable
//! members are counted and indexed in place.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outrigger_config as config;
use rand::RngExt;
use tokio::time::Instant;

use crate::pool::Member;

#[derive(Debug)]
pub(crate) enum Balancer {
    P2cEwma,
    RoundRobin(AtomicUsize),
    Random,
}

impl Balancer {
    pub(crate) fn new(kind: config::LoadBalancer) -> Self {
        match kind {
            config::LoadBalancer::P2cEwma => Self::P2cEwma,
            config::LoadBalancer::RoundRobin => Self::RoundRobin(AtomicUsize::new(0)),
            config::LoadBalancer::Random => Self::Random,
        }
    }

    /// One member for which `usable` holds, or `None`.
    pub(crate) fn pick<'m>(
        &self,
        members: &'m [Arc<Member>],
        usable: impl Fn(&Member) -> bool,
        now: Instant,
    ) -> Option<&'m Arc<Member>> {
        let count = members.iter().filter(|m| usable(m)).count();
        let nth = |n: usize| members.iter().filter(|m| usable(m)).nth(n);
        match count {
            0 => None,
            1 => nth(0),
            _ => match self {
                Self::RoundRobin(next) => {
                    // Relaxed: the counter only spreads load, it orders nothing
                    nth(next.fetch_add(1, Ordering::Relaxed) % count)
                }
                Self::Random => {
                    let total: u64 = members
                        .iter()
                        .filter(|m| usable(m))
                        .map(|m| u64::from(m.endpoint.weight.max(1)))
                        .sum();
                    let mut ticket = rand::rng().random_range(0..total);
                    members.iter().filter(|m| usable(m)).find(|m| {
                        let weight = u64::from(m.endpoint.weight.max(1));
                        let hit = ticket < weight;
                        ticket = ticket.saturating_sub(weight);
                        hit
                    })
                }
                Self::P2cEwma => {
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..count);
                    let b = (a + 1 + rng.random_range(0..count - 1)) % count;
                    let (a, b) = (nth(a)?, nth(b)?);
                    let (la, lb) = match (a.latency(now), b.latency(now)) {
                        (Some(la), Some(lb)) => (la, lb),
                        (Some(known), None) | (None, Some(known)) => (known, known),
                        (None, None) => (1.0, 1.0),
                    };
                    Some(if cost(a, la) <= cost(b, lb) { a } else { b })
                }
            },
        }
    }
}

/// What sending one more request to `member` is expected to cost, given its latency.
fn cost(member: &Member, latency: f64) -> f64 {
    let pending = f64::from(member.in_flight()) + 1.0;
    latency * pending / f64::from(member.endpoint.weight.max(1))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::Endpoint;
    use crate::pool::test_member;

    fn members(latencies_ms: &[u64]) -> Vec<Arc<Member>> {
        let now = Instant::now();
        latencies_ms
            .iter()
            .enumerate()
            .map(|(i, ms)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                test_member(Endpoint::new(addr), Some(Duration::from_millis(*ms)), now)
            })
            .collect()
    }

    fn port(m: &Arc<Member>) -> u16 {
        m.endpoint.addr.port()
    }

    fn tally(
        balancer: &Balancer,
        set: &[Arc<Member>],
        usable: impl Fn(&Member) -> bool,
    ) -> HashMap<u16, usize> {
        let now = Instant::now();
        let mut seen = HashMap::new();
        for _ in 0..1000 {
            *seen.entry(port(balancer.pick(set, &usable, now).unwrap())).or_default() += 1;
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_visits_every_usable_endpoint_in_turn() {
        let set = members(&[1, 1, 1]);
        let rr = Balancer::new(config::LoadBalancer::RoundRobin);
        let now = Instant::now();
        let picked: Vec<u16> =
            (0..6).map(|_| port(rr.pick(&set, |_| true, now).unwrap())).collect();
        assert_eq!(picked, [9000, 9001, 9002, 9000, 9001, 9002]);
        let skip_middle = |m: &Member| m.endpoint.addr.port() != 9001;
        let picked: Vec<u16> =
            (0..4).map(|_| port(rr.pick(&set, skip_middle, now).unwrap())).collect();
        assert!(!picked.contains(&9001));
    }

    #[tokio::test(start_paused = true)]
    async fn no_usable_endpoint_gives_none() {
        let set = members(&[1, 1]);
        let now = Instant::now();
        for kind in [
            config::LoadBalancer::P2cEwma,
            config::LoadBalancer::RoundRobin,
            config::LoadBalancer::Random,
        ] {
            let balancer = Balancer::new(kind);
            assert!(balancer.pick(&[], |_| true, now).is_none());
            assert!(balancer.pick(&set, |_| false, now).is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_favours_the_faster_endpoint() {
        let set = members(&[1, 50, 50]);
        let seen = tally(&Balancer::new(config::LoadBalancer::P2cEwma), &set, |_| true);
        // the fast one wins every comparison it is in: 2 of the 3 possible pairs
        assert!(seen[&9000] > 600, "{seen:?}");
        assert!(
            seen.get(&9001).copied().unwrap_or(0) > 100,
            "the slow ones still get some: {seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_weighs_requests_in_flight() {
        let set = members(&[10, 10]);
        let now = Instant::now();
        let p2c = Balancer::new(config::LoadBalancer::P2cEwma);
        let _busy: Vec<_> = (0..5).map(|_| crate::pool::hold(&set[0])).collect();
        assert!((0..50).all(|_| port(p2c.pick(&set, |_| true, now).unwrap()) == 9001));
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_gives_an_unmeasured_endpoint_its_share_until_it_is_measured() {
        let now = Instant::now();
        let set: Vec<Arc<Member>> = [Some(1), None]
            .into_iter()
            .enumerate()
            .map(|(i, ms)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                test_member(Endpoint::new(addr), ms.map(Duration::from_millis), now)
            })
            .collect();
        let seen = tally(&Balancer::new(config::LoadBalancer::P2cEwma), &set, |_| true);
        assert!(seen.get(&9001).copied().unwrap_or(0) > 300, "the newcomer is tried: {seen:?}");
        let _busy = crate::pool::hold(&set[1]);
        assert!(
            (0..50).all(|_| port(
                Balancer::new(config::LoadBalancer::P2cEwma).pick(&set, |_| true, now).unwrap()
            ) == 9000),
            "but not flooded: one request in flight makes it lose the tie"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn random_spreads_in_proportion_to_the_weights() {
        let now = Instant::now();
        let set: Vec<Arc<Member>> = [(9000, 1), (9001, 3)]
            .into_iter()
            .map(|(p, w)| {
                let endpoint = Endpoint::weighted(SocketAddr::from(([127, 0, 0, 1], p)), w);
                test_member(endpoint, Some(Duration::from_millis(1)), now)
            })
            .collect();
        let seen = tally(&Balancer::new(config::LoadBalancer::Random), &set, |_| true);
        assert!((650..=850).contains(&seen[&9001]), "about 3 in 4: {seen:?}");
    }
}
