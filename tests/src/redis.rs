//! A real Redis (Debian's `redis-server`) for broker tests: one server on a free loopback port
//! with a scratch directory and an append-only file, so `stop` and `restart` keep the data as a
//! crash and recovery would; `pause` and `resume` freeze it with SIGSTOP/SIGCONT (a slow or
//! hung broker). `cli` runs `redis-cli` against it for assertions. Killed on drop by its PID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

const STARTUP: Duration = Duration::from_secs(10);

/// A running redis-server.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// With TLS: the server's certificate and key, and the CA that signed them.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Redis {
    /// Starts Redis with `appendonly yes` and returns once it answers PING.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts Redis serving TLS only, with `pki`'s server certificate (valid for `localhost`).
    pub async fn start_tls(pki: &crate::Pki) -> Self {
        let files =
            (pki.server_cert_file.clone(), pki.server_key_file.clone(), pki.ca_file.clone());
        Self::start_with(Some(files)).await
    }

    async fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Self {
        let dir = crate::scratch_dir("redis");
        let mut redis = Self { child: None, port: free_port(), dir, tls };
        redis.restart().await;
        redis
    }

    /// `redis://127.0.0.1:PORT` (or `rediss://localhost:PORT`), for `messaging.broker`.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills Redis (as a crash would); its port and data stay for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::kill(&mut child);
        }
    }

    /// Starts Redis again on the same port and data, and waits until it answers PING.
    pub async fn restart(&mut self) {
        self.stop();
        let mut command = server(&self.dir);
        match &self.tls {
            None => command.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()]),
            Some((cert, key, ca)) => command
                .args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "optional"]),
        };
        self.child = Some(spawn(&mut command));
        let (port, tls) = (self.port, self.tls.as_ref().map(|t| t.2.clone()));
        wait_until(STARTUP, "redis to answer PING", move || {
            let tls = tls.clone();
            async move { (cli_at(port, tls.as_deref(), &["PING"]) == "PONG").then_some(()) }
        })
        .await;
    }

    /// SIGSTOP: Redis holds its connections open and answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{name} redis");
        }
    }

    /// Runs `redis-cli` with `args`; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_at(self.port, self.tls.as_ref().map(|t| t.2.as_path()), args)
    }
}

/// `redis-server` in the foreground, its data and log in `dir`: an append-only file flushed at
/// every write and no snapshots, as a broker that must not lose what it answered runs. The
/// caller adds where it listens.
pub(crate) fn server(dir: &std::path::Path) -> Command {
    let (stdout, stderr) = crate::log_to(&dir.join("redis.log"));
    let mut command = Command::new("redis-server");
    command
        .arg("--dir")
        .arg(dir)
        .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .stdout(stdout)
        .stderr(stderr);
    command
}

/// Starts `command` (made by [`server`]).
pub(crate) fn spawn(command: &mut Command) -> Child {
    command
        .spawn()
        .expect("start redis-server (Debian package redis-server; scripts/test installs it)")
}

fn cli_at(port: u16, ca: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command.args(["-p", &port.to_string()]);
    if let Some(ca) = ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    let out = command
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run redis-cli (Debian package redis-tools, installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume();
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
