//! The `dns` discovery source: A/AAAA records with the configured port, or SRV records with
//! their own ports and weights, re-resolved every `refresh`, or sooner when a record's TTL is.
//!
//! A name that does not exist or has no records of the type (NXDOMAIN, NODATA) is an answer:
//! the set becomes empty and requests get 503 `no-healthy-endpoints`, as Envoy's strict DNS
//! does. No answer (a timeout, SERVFAIL, REFUSED, no nameserver reachable) keeps the last set
//! and reports `Failing`, so a DNS outage does not become an outage of the upstream. hickory's
//! cache is cleared before every round, so a changed record is seen at the next refresh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::proto::rr::{Name, RData, Record};
use outrigger_config as config;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Endpoint, Snapshot, Status};

/// No `refresh` re-resolves more often than this, whatever the config says.
const MIN_REFRESH: Duration = Duration::from_millis(100);
/// A record TTL shorter than this (0 included) counts as this: a short TTL never makes the
/// source ask more than once a second.
const MIN_TTL: Duration = Duration::from_secs(1);
/// After a failed round the source tries again within this, even when `refresh` is longer.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// One query, over every nameserver; it is tried twice before the round fails.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn start(
    upstream: &str,
    dns: config::Dns,
    resolver: &config::Resolver,
    tx: watch::Sender<Snapshot>,
) {
    let name = match Name::from_ascii(&dns.name) {
        Ok(name) => name,
        Err(err) => {
            // validation checks the name first; this is hickory disagreeing with it
            let detail = format!("{:?} is not a DNS name: {err}", dns.name);
            tracing::error!(upstream, %detail, "dns discovery cannot start");
            tx.send_modify(|s| s.status = Status::Failing(detail));
            return;
        }
    };
    let query = match dns.record {
        config::DnsRecord::A => Query::A(dns.port.unwrap_or_default()),
        config::DnsRecord::Aaaa => Query::Aaaa(dns.port.unwrap_or_default()),
        config::DnsRecord::Srv => Query::Srv,
    };
    let source = Source {
        upstream: upstream.into(),
        name,
        query,
        refresh: dns.refresh.get(),
        nameservers: resolver
            .nameservers
            .as_ref()
            .map(|list| list.iter().map(|ns| ns.get()).collect()),
    };
    tokio::spawn(source.run(tx));
}

/// What to ask for, and the port A/AAAA endpoints get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Query {
    A(u16),
    Aaaa(u16),
    Srv,
}

/// What a published round changed, for the log.
#[derive(Debug)]
enum Change {
    /// The same set, after failures.
    Recovered,
    Set,
}

/// The endpoints of one round and the shortest TTL among the records that named them.
#[derive(Debug, Default, PartialEq)]
struct Found {
    endpoints: Vec<Endpoint>,
    ttl: Option<Duration>,
}

#[derive(Debug)]
struct Source {
    upstream: Arc<str>,
    name: Name,
    query: Query,
    refresh: Duration,
    /// `None`: the system's resolv.conf.
    nameservers: Option<Vec<SocketAddr>>,
}

// === impl Source ===

impl Source {
    async fn run(self, tx: watch::Sender<Snapshot>) {
        let mut resolver = None;
        loop {
            let started = Instant::now();
            let round = self.round(&mut resolver);
            let outcome = tokio::select! {
                outcome = round => outcome,
                _ = tx.closed() => return,
            };
            let wait = match outcome {
                Ok(found) => {
                    let wait = next_refresh(self.refresh, found.ttl);
                    self.publish(&tx, found.endpoints);
                    wait
                }
                Err(detail) => {
                    self.fail(&tx, detail);
                    retry_after_failure(self.refresh)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(crate::time::saturating_add(started, wait)) => {}
                _ = tx.closed() => return,
            }
        }
    }

    /// One resolution, from the nameservers themselves. `Err` is a failure to get an answer.
    async fn round(&self, resolver: &mut Option<TokioResolver>) -> Result<Found, String> {
        let resolver = match resolver {
            Some(resolver) => resolver,
            // built on first use, and again after a failure to read resolv.conf
            None => resolver.insert(build_resolver(self.nameservers.as_deref())?),
        };
        resolver.clear_cache();
        let name = &self.name;
        match self.query {
            Query::A(port) => answers(resolver.ipv4_lookup(name.clone()).await, name)
                .map(|records| ip_endpoints(&records, port)),
            Query::Aaaa(port) => answers(resolver.ipv6_lookup(name.clone()).await, name)
                .map(|records| ip_endpoints(&records, port)),
            Query::Srv => {
                let records = answers(resolver.srv_lookup(name.clone()).await, name)?;
                resolve_srv(resolver, &records).await
            }
        }
    }

    /// Publishes a confirmed set: receivers hear of it only when it or the status changed.
    fn publish(&self, tx: &watch::Sender<Snapshot>, endpoints: Vec<Endpoint>) {
        let endpoints = normalize(endpoints);
        let mut change = None;
        tx.send_if_modified(|s| {
            let same = *s.endpoints == *endpoints;
            if same && s.status == Status::Ready {
                s.confirmed = Some(Instant::now());
                return false;
            }
            let failing = matches!(s.status, Status::Failing(_));
            change = Some(if same && failing { Change::Recovered } else { Change::Set });
            *s = Snapshot::ready(endpoints.clone());
            true
        });
        let (upstream, name) = (&*self.upstream, &self.name);
        match change {
            None => {}
            Some(Change::Recovered) => {
                let n = endpoints.len();
                tracing::info!(upstream, %name, endpoints = n, "dns resolution recovered");
            }
            Some(Change::Set) if endpoints.is_empty() => {
                tracing::warn!(upstream, %name, "dns name has no records: no endpoints");
            }
            Some(Change::Set) => {
                let list: Vec<String> = endpoints.iter().map(|e| e.authority.to_string()).collect();
                let list = list.join(" ");
                tracing::info!(upstream, %name, endpoints = %list, "dns endpoints changed");
            }
        }
    }

    /// Keeps the last set and says why it may be stale.
    fn fail(&self, tx: &watch::Sender<Snapshot>, detail: String) {
        let detail = format!("dns: {detail}");
        let mut was_failing = false;
        tx.send_if_modified(|s| {
            was_failing = matches!(s.status, Status::Failing(_));
            let changed = s.status != Status::Failing(detail.clone());
            if changed {
                s.status = Status::Failing(detail.clone());
            }
            changed
        });
        if !was_failing {
            let upstream = &*self.upstream;
            let kept = tx.borrow().endpoints.len();
            tracing::warn!(upstream, %detail, kept, "dns resolution failing; keeping the last endpoints");
        }
    }
}

fn build_resolver(nameservers: Option<&[SocketAddr]>) -> Result<TokioResolver, String> {
    let mut builder = match nameservers {
        Some(list) => {
            let servers = list.iter().map(|addr| {
                let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                (udp.port, tcp.port) = (addr.port(), addr.port());
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            });
            let config = ResolverConfig::from_name_servers(servers.collect());
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio()
            .map_err(|err| format!("reading the system resolver configuration: {err}"))?,
    };
    let opts = builder.options_mut();
    // discovery asks DNS, not /etc/hosts, and sees every change: the cache only spans a round
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 64;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 1;
    // SRV targets: IPv4 when the target has any, else IPv6
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    builder.build().map_err(|err| format!("building the resolver: {err}"))
}

/// A lookup's answer records; no records (NXDOMAIN, NODATA) is an empty answer, not a failure.
fn answers(lookup: Result<Lookup, NetError>, name: &Name) -> Result<Vec<Record>, String> {
    match lookup {
        Ok(lookup) => Ok(lookup.answers().to_vec()),
        Err(err) if err.is_no_records_found() => Ok(Vec::new()),
        Err(err) => Err(format!("looking up {name}: {err}")),
    }
}

/// A/AAAA answers (and any CNAMEs on the way) as endpoints on `port`.
fn ip_endpoints(records: &[Record], port: u16) -> Found {
    let endpoints = records
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .map(|ip| Endpoint::new(SocketAddr::new(ip, port)))
        .collect();
    Found { endpoints, ttl: min_ttl(records) }
}

/// Resolves the targets of the best SRV priority that has any address.
async fn resolve_srv(resolver: &TokioResolver, records: &[Record]) -> Result<Found, String> {
    let mut ttl = min_ttl(records);
    for group in srv_groups(records) {
        let mut endpoints = Vec::new();
        for target in group {
            let lookup = resolver.lookup_ip(target.name.clone()).await.map(Lookup::from);
            let ips = answers(lookup, &target.name)?;
            ttl = shorter(ttl, min_ttl(&ips));
            let addrs = ips.iter().filter_map(|r| r.data.ip_addr());
            endpoints.extend(addrs.map(|ip| target.endpoint(ip)));
        }
        if !endpoints.is_empty() {
            return Ok(Found { endpoints, ttl });
        }
    }
    Ok(Found { endpoints: Vec::new(), ttl })
}

/// One SRV record's target, port and weight.
#[derive(Debug, Clone, PartialEq)]
struct SrvTarget {
    name: Name,
    port: u16,
    weight: u32,
}

impl SrvTarget {
    fn endpoint(&self, ip: IpAddr) -> Endpoint {
        Endpoint::weighted(SocketAddr::new(ip, self.port), self.weight)
    }
}

/// SRV records grouped by priority, lowest (most preferred) first. A weight of 0 counts as 1,
/// so an all-zero set balances evenly; a target of `.` ("no service here", RFC 2782) is left out.
fn srv_groups(records: &[Record]) -> Vec<Vec<SrvTarget>> {
    let mut srv: Vec<&SRV> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) if !srv.target.is_root() => Some(srv),
            _ => None,
        })
        .collect();
    srv.sort_by_key(|s| s.priority);
    srv.chunk_by(|a, b| a.priority == b.priority)
        .map(|group| {
            group
                .iter()
                .map(|s| SrvTarget {
                    name: s.target.clone(),
                    port: s.port,
                    weight: u32::from(s.weight.max(1)),
                })
                .collect()
        })
        .collect()
}

/// Sorted by address, each address once (weights of duplicates add up), so equal sets compare
/// equal and the balancer sees a stable order.
fn normalize(mut endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    endpoints.sort_by_key(|e| e.addr);
    let mut out: Vec<Endpoint> = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        match out.last_mut() {
            Some(last) if last.addr == e.addr => last.weight = last.weight.saturating_add(e.weight),
            _ => out.push(e),
        }
    }
    out
}

fn min_ttl(records: &[Record]) -> Option<Duration> {
    records.iter().map(|r| Duration::from_secs(u64::from(r.ttl))).min()
}

fn shorter(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When to ask again after an answer: at `refresh`, or at the records' TTL when that is
/// shorter; never sooner than `MIN_TTL` because of a TTL, nor than `MIN_REFRESH` at all.
fn next_refresh(refresh: Duration, ttl: Option<Duration>) -> Duration {
    let by_ttl = ttl.map_or(refresh, |ttl| ttl.max(MIN_TTL));
    refresh.min(by_ttl).max(MIN_REFRESH)
}

/// When to try again after a failed round.
fn retry_after_failure(refresh: Duration) -> Duration {
    refresh.clamp(MIN_REFRESH, MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::net::{DnsError, NoRecords};
    use hickory_resolver::proto::op::{Query as DnsQuery, ResponseCode};
    use hickory_resolver::proto::rr::RecordType;
    use hickory_resolver::proto::rr::rdata::A;

    const SEC: Duration = Duration::from_secs(1);

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str, ttl: u32) -> Record {
        let data = RData::SRV(SRV::new(priority, weight, port, name(target)));
        Record::from_rdata(name("_http._tcp.payments.test."), ttl, data)
    }

    fn a(ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name("payments.test."), ttl, RData::A(A(ip.into())))
    }

    fn no_records(code: ResponseCode) -> NetError {
        let query = DnsQuery::query(name("payments.test."), RecordType::A);
        NetError::from(NoRecords::new(query, code))
    }

    #[test]
    fn refresh_follows_a_shorter_ttl_but_never_below_a_second() {
        assert_eq!(next_refresh(5 * SEC, Some(30 * SEC)), 5 * SEC, "refresh is the longest wait");
        assert_eq!(next_refresh(5 * SEC, Some(2 * SEC)), 2 * SEC, "a shorter TTL wins");
        assert_eq!(next_refresh(5 * SEC, Some(Duration::ZERO)), SEC, "a TTL of 0 counts as 1s");
        assert_eq!(next_refresh(5 * SEC, None), 5 * SEC, "no records: refresh");
        let fast = Duration::from_millis(200);
        assert_eq!(next_refresh(fast, Some(SEC)), fast, "a short refresh is the user's choice");
        assert_eq!(next_refresh(Duration::from_nanos(1), None), MIN_REFRESH);
    }

    #[test]
    fn a_failed_round_is_retried_within_five_seconds() {
        assert_eq!(retry_after_failure(SEC), SEC);
        assert_eq!(retry_after_failure(Duration::from_secs(600)), MAX_RETRY);
        assert_eq!(retry_after_failure(Duration::from_nanos(1)), MIN_REFRESH);
    }

    #[test]
    fn nxdomain_and_nodata_are_empty_answers_and_other_errors_are_failures() {
        let n = name("payments.test.");
        let empty: Result<Vec<Record>, String> = Ok(Vec::new());
        assert_eq!(answers(Err(no_records(ResponseCode::NXDomain)), &n), empty);
        assert_eq!(answers(Err(no_records(ResponseCode::NoError)), &n), empty);
        let servfail = NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail));
        for transient in [NetError::Timeout, servfail, NetError::NoConnections] {
            let err = answers(Err(transient), &n).unwrap_err();
            assert!(err.starts_with("looking up payments.test."), "{err}");
        }
    }

    #[test]
    fn a_records_get_the_configured_port_and_the_shortest_ttl() {
        let found = ip_endpoints(&[a([10, 0, 0, 2], 30), a([10, 0, 0, 1], 5)], 8080);
        let addrs: Vec<String> = found.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.2:8080", "10.0.0.1:8080"]);
        assert!(found.endpoints.iter().all(|e| e.weight == 1));
        assert_eq!(found.ttl, Some(5 * SEC));
    }

    #[test]
    fn srv_records_keep_their_ports_and_weights_by_priority() {
        let records = [
            srv(20, 5, 9003, "backup.payments.test.", 60),
            srv(10, 30, 9001, "a.payments.test.", 60),
            srv(10, 0, 9002, "b.payments.test.", 60),
            srv(10, 7, 9004, ".", 60),
        ];
        let groups = srv_groups(&records);
        let target = |n: &str, port, weight| SrvTarget { name: name(n), port, weight };
        assert_eq!(
            groups,
            [
                vec![target("a.payments.test.", 9001, 30), target("b.payments.test.", 9002, 1)],
                vec![target("backup.payments.test.", 9003, 5)],
            ],
            "lowest priority first; weight 0 counts as 1; a `.` target means no service"
        );
        let e = groups[0][0].endpoint([10, 0, 0, 7].into());
        assert_eq!((e.addr.to_string(), e.weight), ("10.0.0.7:9001".to_owned(), 30));
    }

    #[test]
    fn sets_are_sorted_and_each_address_appears_once() {
        let at = |port, weight| Endpoint::weighted(([10, 0, 0, 1], port).into(), weight);
        let set = normalize(vec![at(9002, 1), at(9001, 2), at(9002, 3)]);
        assert_eq!(set, [at(9001, 2), at(9002, 4)]);
    }

    fn source() -> (Source, watch::Sender<Snapshot>, watch::Receiver<Snapshot>) {
        let source = Source {
            upstream: "payments".into(),
            name: name("payments.test"),
            query: Query::A(8080),
            refresh: 5 * SEC,
            nameservers: None,
        };
        let pending =
            Snapshot { endpoints: Arc::from([]), status: Status::Pending, confirmed: None };
        let (tx, rx) = watch::channel(pending);
        (source, tx, rx)
    }

    fn set(last_octets: &[u8]) -> Vec<Endpoint> {
        last_octets.iter().map(|&n| Endpoint::new(([10, 0, 0, n], 8080).into())).collect()
    }

    #[tokio::test]
    async fn an_unchanged_set_renews_its_confirmation_without_waking_receivers() {
        let (source, tx, mut rx) = source();
        source.publish(&tx, set(&[2, 1]));
        assert!(rx.has_changed().unwrap());
        let first = rx.borrow_and_update().clone();
        assert_eq!(*first.endpoints, set(&[1, 2]), "sorted");

        source.publish(&tx, set(&[1, 2]));
        assert!(!rx.has_changed().unwrap(), "the same set is not news");
        assert!(rx.borrow().confirmed >= first.confirmed);

        source.publish(&tx, set(&[3]));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update().endpoints, set(&[3]));
    }

    #[tokio::test]
    async fn a_failure_keeps_the_last_set_and_an_answer_clears_it() {
        let (source, tx, rx) = source();
        source.publish(&tx, set(&[1]));
        source.fail(&tx, "looking up payments.test: request timed out".into());
        let failing = rx.borrow().clone();
        assert_eq!(*failing.endpoints, set(&[1]), "the last good set still serves");
        assert!(
            matches!(&failing.status, Status::Failing(d) if d.contains("timed out")),
            "{:?}",
            failing.status
        );

        source.publish(&tx, set(&[1]));
        assert_eq!(rx.borrow().status, Status::Ready, "the same set, confirmed again");

        source.publish(&tx, Vec::new());
        let empty = rx.borrow().clone();
        assert_eq!(
            (empty.endpoints.len(), empty.status),
            (0, Status::Ready),
            "NXDOMAIN: an empty set"
        );
    }
}
