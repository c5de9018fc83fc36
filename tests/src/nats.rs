//! A real NATS server with JetStream (Debian's `nats-server`, 2.9 on bookworm) for the
//! `nats://` broker: one server on a free loopback port with a store directory of its own, so
//! `stop` and `restart` keep streams, consumers and their acknowledgements as a crash and
//! recovery would. Started from a config file, because `max_payload` (raised past NATS's 1 MiB
//! default, which a 1 MiB payload in its envelope exceeds) has no command-line flag. Killed on
//! drop by its PID.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{free_port, wait_until};

const STARTUP: Duration = Duration::from_secs(10);

/// A running nats-server with JetStream.
#[derive(Debug)]
pub struct Nats {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    dir: PathBuf,
    /// Started with TLS required (`nats+tls://`).
    tls: bool,
}

impl Nats {
    /// Starts the server and returns once JetStream answers its health check.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The same, requiring TLS with `pki`'s server certificate (for `localhost`).
    pub async fn start_tls(pki: &crate::Pki) -> Self {
        Self::start_with(Some(pki)).await
    }

    async fn start_with(pki: Option<&crate::Pki>) -> Self {
        let dir = crate::scratch_dir("nats");
        let (port, monitor) = (free_port(), free_port());
        let mut config = format!(
            "host: 127.0.0.1\nport: {port}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 8MB\n\
             jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n",
            dir.join("store").display()
        );
        if let Some(pki) = pki {
            config.push_str(&format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
                pki.server_cert_file.display(),
                pki.server_key_file.display()
            ));
        }
        std::fs::write(dir.join("nats.conf"), config).expect("write nats.conf");
        let mut nats = Nats { child: None, port, monitor, dir, tls: pki.is_some() };
        nats.restart().await;
        nats
    }

    /// `nats://127.0.0.1:PORT` (or `nats+tls://localhost:PORT`), for `messaging.broker`.
    pub fn url(&self) -> String {
        match self.tls {
            false => format!("nats://127.0.0.1:{}", self.port),
            true => format!("nats+tls://localhost:{}", self.port),
        }
    }

    /// Kills the server (as a crash would); its port and store stay for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::kill(&mut child);
        }
    }

    /// Starts the server again on the same port and store, and waits until JetStream is up.
    pub async fn restart(&mut self) {
        self.stop();
        let (stdout, stderr) = crate::log_to(&self.dir.join("nats.log"));
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start nats-server (Debian package nats-server; scripts/test installs it)");
        self.child = Some(child);
        let monitor = self.monitor;
        wait_until(STARTUP, "nats-server's JetStream to be healthy", move || async move {
            let url = format!("http://127.0.0.1:{monitor}/healthz?js-enabled-only=true");
            let ok = Command::new("curl").args(["-fs", &url]).output().ok()?;
            ok.status.success().then_some(())
        })
        .await;
    }

    /// The monitoring endpoint `path` (`/jsz?streams=true&consumers=true`, …) as JSON.
    pub fn monitor(&self, path: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.monitor);
        let out = Command::new("curl").args(["-fs", &url]).output().expect("run curl");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl Nats {
    /// Stream `name` as `/jsz` reports it, with its consumers; `Null` when there is none.
    pub fn stream(&self, name: &str) -> serde_json::Value {
        let jsz = self.monitor("/jsz?streams=true&consumers=true&config=true");
        let streams = jsz["account_details"][0]["stream_detail"].as_array().cloned();
        let found = streams.unwrap_or_default().into_iter().find(|s| s["name"] == name);
        found.unwrap_or(serde_json::Value::Null)
    }

    /// How many messages stream `name` holds (0 when there is no such stream).
    pub fn stream_messages(&self, name: &str) -> u64 {
        self.stream(name)["state"]["messages"].as_u64().unwrap_or(0)
    }

    /// Durable consumer `consumer` of stream `stream` as `/jsz` reports it.
    pub fn consumer(&self, stream: &str, consumer: &str) -> serde_json::Value {
        let consumers = self.stream(stream)["consumer_detail"].as_array().cloned();
        let found = consumers.unwrap_or_default().into_iter().find(|c| c["name"] == consumer);
        found.unwrap_or(serde_json::Value::Null)
    }

    /// A JetStream API request (`$JS.API.STREAM.CREATE.NAME`, …) with a JSON body, over
    /// NATS's text protocol on a connection of its own; the JSON answer.
    pub fn request(&self, subject: &str, body: &serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, BufReader, Read, Write};
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream.set_read_timeout(Some(STARTUP)).expect("a read timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("the server's INFO");
        let body = body.to_string();
        let mut writer = stream;
        write!(
            writer,
            "CONNECT {{\"verbose\":false,\"headers\":false}}\r\nSUB _INBOX.test 1\r\n\
             PUB {subject} _INBOX.test {}\r\n{body}\r\n",
            body.len()
        )
        .expect("send the request");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("the answer");
            if line.starts_with("PING") {
                writer.write_all(b"PONG\r\n").expect("PONG");
            } else if let Some(head) = line.strip_prefix("MSG ") {
                let size: usize =
                    head.split_whitespace().last().and_then(|n| n.parse().ok()).expect("a size");
                let mut payload = vec![0; size + 2];
                reader.read_exact(&mut payload).expect("the answer's body");
                return serde_json::from_slice(&payload[..size]).expect("a JSON answer");
            } else if line.starts_with("-ERR") {
                panic!("nats-server refused {subject}: {line}");
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
