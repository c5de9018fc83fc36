//! Where commands go: one Redis (`redis://`, `rediss://`) through redis-rs's
//! `ConnectionManager`, or a Redis Cluster (`redis+cluster://`) through its cluster connection,
//! which follows the slots (`MOVED`, `ASK`) and a failover by itself. The rest of the broker
//! holds a [`Conn`] and never asks which: every command or script it sends touches the keys of
//! one queue, all in one hash slot, so both kinds run it alike.
//!
//! Both connect lazily: Redis being down at startup is not an error, and a connection that
//! could not be made is tried again at the next command.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

/// Where a [`Conn`] comes from: one Redis, or a cluster's seed nodes.
pub(super) enum Source {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

/// A connection to the broker, cheap to clone; shared by the commands sent on it.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection made on first use and kept.
pub(super) struct Lazy {
    made: OnceCell<Conn>,
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
                client.get_async_connection().await.map(Conn::Cluster)
            }
        }
    }
}

impl Lazy {
    /// A connection answering within `response_timeout`, made at its first use.
    pub(super) fn new(response_timeout: Duration) -> Self {
        Lazy { made: OnceCell::new(), response_timeout }
    }

    /// The connection, made now if it never was (or its making failed last time).
    pub(super) async fn get(&self, source: &Source) -> RedisResult<Conn> {
        self.made.get_or_try_init(|| source.connect(self.response_timeout)).await.cloned()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
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
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
