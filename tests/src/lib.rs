//! The end-to-end harness: the real `outrigger` binary, started with a YAML the test writes,
//! against real HTTP servers the test scripts, all on loopback.
//!
//! Nothing sleeps and hopes: every wait is `wait_until` a condition, with a deadline, failing
//! with what never happened. Every child process is killed when its handle drops.

#![forbid(unsafe_code)]

mod dnsmasq;
mod etcd;
mod grpc;
mod nats;
mod otlp;
mod postgres;
mod raw;
mod redis;
mod redis_cluster;
mod sidecar;
mod tls;
mod tmpfs;
mod upstream;

pub use dnsmasq::{Dnsmasq, Zone};
pub use etcd::{Etcd, Kv};
pub use grpc::{Call, GrpcAnswer, GrpcReply, GrpcUpstream, frame, grpc_bidi, grpc_call};
pub use nats::Nats;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use postgres::Postgres;
pub use raw::RawUpstream;
pub use redis::Redis;
pub use redis_cluster::RedisCluster;
pub use sidecar::{Sidecar, binary, free_port, send};
pub use tls::{Pki, SERVER_NAME, TlsServer};
pub use tmpfs::Tmpfs;
pub use upstream::{RefusingPort, Reply, Seen, Upstream};

use std::future::Future;
use std::time::Duration;

/// A child's stdout and stderr, both appended to the log file at `path` (kept across
/// restarts, so a test's failure message shows every run).
pub(crate) fn log_to(path: &std::path::Path) -> (std::process::Stdio, std::process::Stdio) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("a log file {}: {e}", path.display()));
    let out = log.try_clone().expect("dup the log file");
    (out.into(), log.into())
}

/// A fresh directory under the system's temp dir, `outrigger-KIND-PID-N`, for one test's files.
pub(crate) fn scratch_dir(kind: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outrigger-{kind}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// SIGKILL `child` and reap it: once this returns, nothing of it answers any more.
pub(crate) fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A small xorshift generator: pseudo-random choices that are the same in every run, so a
/// failure can be replayed.
#[derive(Debug, Clone)]
pub struct Dice(pub u64);

impl Dice {
    /// A number from 0 to `sides - 1`.
    pub fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some`, or panics after `deadline` saying what was awaited.
pub async fn wait_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        if tokio::time::Instant::now() >= until {
            panic!("waited {deadline:?} for {what}, and it never happened");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
