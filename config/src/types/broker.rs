//! `Broker`: `embedded`, a Redis URL (`redis://`, `rediss://` for TLS), or a Redis Cluster's
//! seed nodes (`redis+cluster://HOST:PORT[,HOST:PORT…]`).
//! The URL may carry a password, so everything that prints it (`Display`, `Debug`, serde for
//! `/v1/config`) writes `***` in its place; only `RedisUrl::as_str` gives the real one.

use super::net::split_host_port;
use super::{ValueError, redact, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where messages are stored and exchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Broker {
    /// The durable store in `messaging.data_dir`: one machine.
    #[default]
    Embedded,
    /// Redis Streams with consumer groups: several replicas share the work.
    Redis(RedisUrl),
    /// The same on a Redis Cluster, found from these seed nodes.
    RedisCluster(RedisClusterUrl),
    /// NATS JetStream, from these servers.
    Nats(NatsUrl),
}

/// `nats://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]`: the servers of one NATS cluster (4222
/// when no port is given), the credentials for each; `nats+tls://` for TLS to every one
/// (with `messaging.tls`).
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(String);

const NATS_SCHEME: &str = "nats://";
const NATS_TLS_SCHEME: &str = "nats+tls://";

impl NatsUrl {
    /// Each server as a URL with the credentials, `tls://` when TLS is required: for the
    /// client, never for a log.
    pub fn servers(&self) -> Vec<String> {
        match self.tls() {
            true => seed_urls(&self.0, NATS_TLS_SCHEME, "tls://"),
            false => seed_urls(&self.0, NATS_SCHEME, NATS_SCHEME),
        }
    }

    /// `nats+tls://`: TLS to every server, verified.
    pub fn tls(&self) -> bool {
        self.0.starts_with(NATS_TLS_SCHEME)
    }
}

impl FromStr for NatsUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let valid =
            seeds_valid(text, NATS_SCHEME, false) || seeds_valid(text, NATS_TLS_SCHEME, false);
        match valid {
            true => Ok(NatsUrl(text.to_owned())),
            false => Err(broker_error(text)),
        }
    }
}

impl fmt::Display for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NatsUrl({self})")
    }
}

/// `redis+cluster://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT…]`: seed nodes of one cluster, the
/// credentials (if any) for every node.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisClusterUrl(String);

impl RedisClusterUrl {
    /// Each seed node as a `redis://` URL with the credentials: for the client, never for a
    /// log.
    pub fn nodes(&self) -> Vec<String> {
        seed_urls(&self.0, CLUSTER_SCHEME, "redis://")
    }
}

const CLUSTER_SCHEME: &str = "redis+cluster://";

impl FromStr for RedisClusterUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        // every seed needs its port: a cluster has no default one to assume
        match seeds_valid(text, CLUSTER_SCHEME, true) {
            true => Ok(RedisClusterUrl(text.to_owned())),
            false => Err(broker_error(text)),
        }
    }
}

/// Whether `text` is `SCHEME[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]`, each port (required
/// when `port_required`) from 1.
fn seeds_valid(text: &str, scheme: &str, port_required: bool) -> bool {
    let rest = text.strip_prefix(scheme).map(|r| r.trim_end_matches('/'));
    rest.is_some_and(|rest| {
        let hosts = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
        !hosts.is_empty()
            && hosts.split(',').all(|host| {
                split_host_port(host).is_some_and(|(_, port)| match port {
                    None => !port_required,
                    Some(p) => p.parse::<u16>().is_ok_and(|p| p != 0),
                })
            })
    })
}

/// Each seed of `text` (after `scheme`) as a URL of scheme `each`, with the credentials.
fn seed_urls(text: &str, scheme: &str, each: &str) -> Vec<String> {
    let rest = text.strip_prefix(scheme).unwrap_or(text).trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    hosts.split(',').map(|host| format!("{each}{auth}{host}")).collect()
}

impl fmt::Display for RedisClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for RedisClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisClusterUrl({self})")
    }
}

/// `redis[s]://[USER[:PASSWORD]@]HOST[:PORT][/DB]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL as written, password included: for the Redis client, never for a log.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `rediss://`: connect with TLS.
    pub fn tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl FromStr for RedisUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let rest = text.strip_prefix("redis://").or_else(|| text.strip_prefix("rediss://"));
        let valid = rest.is_some_and(|rest| {
            let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let port_ok =
                |p: Option<&str>| p.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
            let db_ok = db.is_empty() || db.bytes().all(|b| b.is_ascii_digit());
            split_host_port(host_port).is_some_and(|(_, port)| port_ok(port)) && db_ok
        });
        match valid {
            true => Ok(RedisUrl(text.to_owned())),
            false => Err(broker_error(text)),
        }
    }
}

/// The URL with its password replaced by `***`.
impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl FromStr for Broker {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        match text {
            "embedded" => Ok(Broker::Embedded),
            _ if text.starts_with(CLUSTER_SCHEME) => text.parse().map(Broker::RedisCluster),
            _ if text.starts_with(NATS_SCHEME) || text.starts_with(NATS_TLS_SCHEME) => {
                text.parse().map(Broker::Nats)
            }
            _ if text.starts_with("redis") => text.parse().map(Broker::Redis),
            _ => Err(broker_error(text)),
        }
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broker::Embedded => f.write_str("embedded"),
            Broker::Redis(url) => url.fmt(f),
            Broker::RedisCluster(url) => url.fmt(f),
            Broker::Nats(url) => url.fmt(f),
        }
    }
}

/// Echoes `text` with its password as `***`: a URL refused for a typo still holds a real one.
fn broker_error(text: &str) -> ValueError {
    ValueError::new(
        format!("{:?} is not a broker", redact(text)),
        "embedded, redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT, nats://HOST:PORT or nats+tls://HOST:PORT",
    )
}

string_conversions!(Broker);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_never_print() {
        let broker: Broker = "redis://app:s3cret@redis.internal:6379/2".parse().unwrap();
        assert_eq!(broker.to_string(), "redis://app:***@redis.internal:6379/2");
        assert!(!format!("{broker:?}").contains("s3cret"));
        let Broker::Redis(url) = &broker else { panic!("a redis broker") };
        assert_eq!(url.as_str(), "redis://app:s3cret@redis.internal:6379/2");
        assert_eq!(
            "rediss://:pw@r:6380".parse::<Broker>().unwrap().to_string(),
            "rediss://:***@r:6380"
        );
        assert_eq!("redis://r".parse::<Broker>().unwrap().to_string(), "redis://r");
    }

    #[test]
    fn a_cluster_url_names_its_seed_nodes_with_their_credentials() {
        let broker: Broker =
            "redis+cluster://app:s3cret@r1:7000,r2:7001,[::1]:7002".parse().unwrap();
        assert_eq!(broker.to_string(), "redis+cluster://app:***@r1:7000,r2:7001,[::1]:7002");
        assert!(!format!("{broker:?}").contains("s3cret"));
        let Broker::RedisCluster(url) = &broker else { panic!("a cluster broker") };
        assert_eq!(
            url.nodes(),
            [
                "redis://app:s3cret@r1:7000",
                "redis://app:s3cret@r2:7001",
                "redis://app:s3cret@[::1]:7002"
            ]
        );
        let plain: RedisClusterUrl = "redis+cluster://127.0.0.1:7000/".parse().unwrap();
        assert_eq!(plain.nodes(), ["redis://127.0.0.1:7000"]);
        for bad in [
            "redis+cluster://",
            "redis+cluster://r1",
            "redis+cluster://r1:7000,",
            "redis+cluster://:pw@r1:0",
        ] {
            let err = bad.parse::<Broker>().unwrap_err().to_string();
            assert!(err.contains("is not a broker") && !err.contains(":pw@"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_nats_url_names_its_servers_with_their_credentials() {
        let broker: Broker = "nats://app:s3cret@n1:4222,n2".parse().unwrap();
        assert_eq!(broker.to_string(), "nats://app:***@n1:4222,n2");
        let Broker::Nats(url) = &broker else { panic!("a nats broker") };
        assert_eq!(url.servers(), ["nats://app:s3cret@n1:4222", "nats://app:s3cret@n2"]);
        for bad in ["nats://", "nats://n1:0", "nats://n1:4222,", "nats+tls://"] {
            assert!(bad.parse::<Broker>().is_err(), "{bad}");
        }
        let tls: Broker = "nats+tls://app:s3cret@n1:4222,n2".parse().unwrap();
        assert_eq!(tls.to_string(), "nats+tls://app:***@n1:4222,n2");
        let Broker::Nats(url) = &tls else { panic!("a nats broker") };
        assert!(url.tls());
        assert_eq!(url.servers(), ["tls://app:s3cret@n1:4222", "tls://app:s3cret@n2"]);
    }

    #[test]
    fn a_refused_url_is_echoed_without_its_password() {
        for bad in [
            "redis://alice:s3cr3tPW@host:notaport/x",
            "redis://alice:s3cr/3tPW@host:6379",
            "rediss://:s3cr3tPW@host:6379/db",
            "redis://host:6379/0?password=s3cr3tPW",
        ] {
            let err = bad.parse::<Broker>().unwrap_err().to_string();
            assert!(!err.contains("s3cr"), "{err}");
            assert!(err.contains("is not a broker"), "{err}");
        }
        let err = "redis://alice:s3cr3tPW@host:notaport/x".parse::<Broker>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""redis://alice:***@host:notaport/x" is not a broker (expected embedded, redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT, nats://HOST:PORT or nats+tls://HOST:PORT)"#
        );
    }

    #[test]
    fn refuses_other_brokers() {
        for bad in ["kafka://k:9092", "redis://", "redis://r:port", "redis://r/db0", "Embedded"] {
            assert!(bad.parse::<Broker>().is_err(), "{bad}");
        }
    }
}
