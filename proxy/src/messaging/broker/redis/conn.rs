//! Where commands go: one Redis (`redis://`, `rediss://`) through redis-rs's
//! `ConnectionManager`, or a Redis Cluster (`redis+cluster://`) through its cluster connection,
//! which follows the slots (`MOVED`, `ASK`) and a failover by itself. The rest of the broker
//! holds a [`Conn`] and never asks which: every command or script it sends touches the keys of
//! one queue, all in one hash slot, so both kinds run it alike.
//!
//! Both connect lazily: Redis being down at startup is not an error, and a connection that
//! could not be made is tried again at the next command. A cluster connection that lost every
//! node (the whole cluster was down) does not always find them again by itself: one that
//! answers that no node can be reached is dropped, and the next command makes a new one from
//! the seeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Where a [`Conn`] comes from: one Redis, or a cluster's seed nodes.
pub(super) enum Source {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

/// A connection to the broker, cheap to clone; shared by the commands sent on it.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    /// With the flag its failures set when it can reach no node: made again then.
    Cluster(ClusterConnection, Arc<AtomicBool>),
}

/// A connection made on first use and kept (while it works).
pub(super) struct Lazy {
    made: tokio::sync::Mutex<Option<Conn>>,
    /// How long an answer may take on it.
    response_timeout: Duration,
}

impl Source {
    async fn connect(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match self {
            Source::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(super::COMMAND_TIMEOUT))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                client.get_connection_manager_lazy(config).map(Conn::Single)
            }
            Source::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.clone())
                    .connection_timeout(super::COMMAND_TIMEOUT)
                    .response_timeout(response_timeout)
                    .retries(2)
                    .build()?;
                let conn = client.get_async_connection().await?;
                Ok(Conn::Cluster(conn, Arc::default()))
            }
        }
    }
}

impl Lazy {
    /// A connection answering within `response_timeout`, made at its first use.
    pub(super) fn new(response_timeout: Duration) -> Self {
        Lazy { made: tokio::sync::Mutex::new(None), response_timeout }
    }

    /// The connection, made now if it never was, its making failed last time, or it lost
    /// every node.
    pub(super) async fn get(&self, source: &Source) -> RedisResult<Conn> {
        let mut made = self.made.lock().await;
        match &*made {
            Some(Conn::Cluster(_, lost)) if lost.load(Ordering::Relaxed) => {}
            Some(conn) => return Ok(conn.clone()),
            None => {}
        }
        let conn = source.connect(self.response_timeout).await?;
        *made = Some(conn.clone());
        Ok(conn)
    }
}

impl Conn {
    /// How many replicas of the primary that holds `key`'s slot are online now (0 on one
    /// Redis: its replicas, if any, are not the sidecar's to wait for).
    pub(super) async fn replicas_of(&mut self, key: &str) -> RedisResult<usize> {
        let Conn::Cluster(conn, lost) = self else { return Ok(0) };
        let mut info = redis::cmd("INFO");
        info.arg("replication");
        let text: String = redis::from_redis_value(on_primary(conn, lost, key, info).await?)?;
        online_replicas(&text).ok_or_else(|| {
            let detail = "INFO replication did not come from a primary".to_owned();
            RedisError::from((ErrorKind::Client, "not the slot's primary", detail))
        })
    }

    /// Loads `script` on the primary that holds `key`'s slot; its SHA1. Not on every node (the
    /// cluster client's routing for `SCRIPT LOAD`, replicas included): a replica that is down
    /// or stalled would fail the load, and the relay with it, for every queue. A primary that
    /// lacks the script later (a promoted replica, a restart) answers `NOSCRIPT`, and it is
    /// loaded there then.
    pub(super) async fn load_script(&mut self, key: &str, script: &str) -> RedisResult<String> {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(script);
        match self {
            Conn::Single(conn) => load.query_async(conn).await,
            Conn::Cluster(conn, lost) => {
                Ok(redis::from_redis_value(on_primary(conn, lost, key, load).await?)?)
            }
        }
    }
}

/// `cmd` on the primary that holds `key`'s slot, marking the connection lost when it says so.
async fn on_primary(
    conn: &mut ClusterConnection,
    lost: &Arc<AtomicBool>,
    key: &str,
    cmd: Cmd,
) -> RedisResult<Value> {
    let primary = Route::with_key(key, SlotAddr::Master);
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(primary));
    watched(Box::pin(conn.route_command(cmd, route)), lost).await
}

/// The replicas a primary's `INFO replication` shows online (in sync, so `WAIT` counts them);
/// `None` when the answer is not a primary's (the command went elsewhere while the cluster's
/// layout changed).
fn online_replicas(info: &str) -> Option<usize> {
    info.lines().any(|l| l.trim() == "role:master").then(|| {
        let replica = |l: &&str| l.starts_with("slave") && l.contains(':');
        info.lines().filter(replica).filter(|l| l.contains("state=online")).count()
    })
}

/// Whether a cluster connection that answered `error` should be made again: only when it
/// can reach no node at all (one node down, or a failover, it follows by itself).
fn is_lost(error: &RedisError) -> bool {
    error.kind() == ErrorKind::ClusterConnectionNotFound
}

/// `answer`, marking the connection lost when it says so.
fn watched<'a, T: Send + 'a>(
    answer: RedisFuture<'a, T>,
    flag: &Arc<AtomicBool>,
) -> RedisFuture<'a, T> {
    let flag = flag.clone();
    Box::pin(async move {
        let answer = answer.await;
        if answer.as_ref().is_err_and(is_lost) {
            flag.store(true, Ordering::Relaxed);
        }
        answer
    })
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn, flag) => watched(conn.req_packed_command(cmd), flag),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn, flag) => {
                watched(conn.req_packed_commands(pipeline, offset, count), flag)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn, _) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_primarys_online_replicas_are_waited_for() {
        let primary = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=10.0.0.2,port=7001,state=online,offset=120,lag=0\r\n\
            slave1:ip=10.0.0.3,port=7001,state=wait_bgsave,offset=0,lag=0\r\n\
            master_failover_state:no-failover\r\n";
        assert_eq!(online_replicas(primary), Some(1), "one still in full sync");
        assert_eq!(online_replicas("role:master\r\nconnected_slaves:0\r\n"), Some(0));
        assert_eq!(online_replicas("role:slave\r\nmaster_host:10.0.0.1\r\n"), None);
        assert_eq!(online_replicas(""), None);
    }
}
