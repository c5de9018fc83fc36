//! A real etcd (Debian's `etcd-server`) for registry tests: one member on free loopback client
//! and peer ports, with a scratch data directory, and a few calls over its v3 JSON gateway so a
//! test can put, delete and read registry keys. `stop` and `restart` keep the ports and the
//! data, as an outage would. Killed on drop by its own PID.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::{free_port, wait_until};

/// How long etcd may take to elect itself and answer.
const STARTUP: Duration = Duration::from_secs(30);

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    /// The lease the key is attached to; 0: none.
    pub lease: i64,
}

/// A running single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd and returns once it answers a read.
    pub async fn start() -> Self {
        let dir = crate::scratch_dir("etcd");
        let mut etcd = Self {
            child: None,
            client: ([127, 0, 0, 1], free_port()).into(),
            peer: ([127, 0, 0, 1], free_port()).into(),
            dir,
        };
        etcd.restart().await;
        etcd
    }

    /// Where etcd serves clients.
    pub fn addr(&self) -> SocketAddr {
        self.client
    }

    /// `http://127.0.0.1:PORT`, for `registry.etcd.endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Kills etcd (as a crash would); its ports and data stay for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::kill(&mut child);
        }
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let (stdout, stderr) = crate::log_to(&self.dir.join("etcd.log"));
        let (client, peer) = (format!("http://{}", self.client), format!("http://{}", self.peer));
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start etcd (Debian package etcd-server; scripts/test installs it)");
        self.child = Some(child);
        let addr = self.client;
        let ready = async move {
            wait_until(STARTUP, "etcd to answer a read", move || async move {
                call(addr, "/v3/kv/range", &json!({ "key": BASE64.encode("/") })).await.ok()
            })
            .await
        };
        if tokio::spawn(ready).await.is_err() {
            panic!("etcd did not start; its log:\n{}", self.log());
        }
    }

    /// Replaces etcd with an empty one on the same ports (a new cluster, as after a disaster
    /// recovery), and waits until it answers.
    pub async fn restart_empty(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.join("data")).expect("remove etcd's data");
        self.restart().await;
    }

    /// Everything etcd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Writes `key` (no lease).
    pub async fn put(&self, key: &str, value: &str) {
        let body = json!({ "key": BASE64.encode(key), "value": BASE64.encode(value) });
        self.call("/v3/kv/put", &body).await;
    }

    pub async fn delete(&self, key: &str) {
        self.call("/v3/kv/deleterange", &json!({ "key": BASE64.encode(key) })).await;
    }

    pub async fn get(&self, key: &str) -> Option<Kv> {
        let answer = self.call("/v3/kv/range", &json!({ "key": BASE64.encode(key) })).await;
        kvs(&answer).into_iter().next()
    }

    /// Every key starting with `prefix`, in key order.
    pub async fn keys(&self, prefix: &str) -> Vec<Kv> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix is not empty") += 1;
        let body = json!({ "key": BASE64.encode(prefix), "range_end": BASE64.encode(end) });
        kvs(&self.call("/v3/kv/range", &body).await)
    }

    /// Compacts the history up to the current revision: a watch asking for an older one is
    /// canceled.
    pub async fn compact(&self) {
        let answer = self.call("/v3/kv/range", &json!({ "key": BASE64.encode("/") })).await;
        let revision = int(&answer["header"]["revision"]).expect("a range has a revision");
        let body = json!({ "revision": revision.to_string(), "physical": true });
        self.call("/v3/kv/compaction", &body).await;
    }

    /// Ends `lease` and deletes its keys, as its expiry would.
    pub async fn revoke(&self, lease: i64) {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })).await;
    }

    /// The seconds `lease` has left, or `None` when it does not exist (expired or revoked).
    pub async fn lease_ttl(&self, lease: i64) -> Option<i64> {
        let answer = self.call("/v3/lease/timetolive", &json!({ "ID": lease.to_string() })).await;
        int(&answer["TTL"]).filter(|ttl| *ttl >= 0)
    }

    async fn call(&self, path: &str, body: &Value) -> Value {
        match call(self.client, path, body).await {
            Ok(answer) => answer,
            Err(error) => panic!("etcd {path}: {error}; its log:\n{}", self.log()),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `POST` to the gateway over a fresh connection: the answer's JSON, or why not.
async fn call(addr: SocketAddr, path: &str, body: &Value) -> Result<Value, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request");
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let bytes = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("answered {status}: {}", String::from_utf8_lossy(&bytes)))?;
    if !status.is_success() {
        return Err(format!("answered {status}: {json}"));
    }
    Ok(json)
}

fn kvs(answer: &Value) -> Vec<Kv> {
    let text = |v: &Value| {
        let bytes = BASE64.decode(v.as_str().unwrap_or("")).expect("etcd sends base64");
        String::from_utf8(bytes).expect("test keys and values are UTF-8")
    };
    let list = answer["kvs"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|kv| Kv {
            key: text(&kv["key"]),
            value: text(&kv["value"]),
            lease: int(&kv["lease"]).unwrap_or(0),
        })
        .collect()
}

/// etcd's JSON writes 64-bit integers as strings.
fn int(value: &Value) -> Option<i64> {
    match value {
        Value::String(text) => text.parse().ok(),
        other => other.as_i64(),
    }
}
