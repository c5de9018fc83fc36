//! The real `outrigger` binary as a child process, and clients that talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{DEADLINE, wait_until};

/// Why a request got no answer.
type Error = Box<dyn std::error::Error + Send + Sync>;

/// A free loopback port (bound, then released for the child to take), drawn below the
/// kernel's ephemeral range (32768 and up): a port the kernel hands out could become some
/// client's local port while a test restarts the server that listened on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let seed = u64::from(std::process::id()) << 32 ^ since.map_or(0, |d| d.as_nanos() as u64);
    loop {
        // splitmix64 of the seed and the draw: distinct processes draw distinct sequences
        let mut x =
            seed ^ DRAWN.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let port = 10_000 + (x % 22_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `outrigger` binary beside this test executable (`target/<profile>/outrigger`): the
/// README's test command builds it before the tests run.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join("outrigger");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p outrigger-proxy` first",
        bin.display()
    );
    bin
}

/// A scratch directory for one test, removed on drop.
#[derive(Debug)]
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new() -> Self {
        Self(crate::scratch_dir("e2e"))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running sidecar; killed when dropped.
#[derive(Debug)]
pub struct Sidecar {
    child: Child,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    scratch: Scratch,
    /// Arguments after `run --config FILE`, kept for restarts.
    args: Vec<String>,
    /// Variables set for the process beside the test's own, kept for restarts.
    env: Vec<(String, String)>,
}

impl Sidecar {
    /// Writes `yaml` (with `$OUTBOUND` and `$ADMIN` replaced by free loopback addresses and
    /// `$SCRATCH` by the test's own directory, which outlives restarts; an
    /// `outbound:` or `admin:` section is added when the YAML has none) and starts the binary.
    /// Returns once `/readyz` answers 200; panics with the sidecar's log after the deadline.
    pub async fn start(yaml: &str) -> Self {
        let sidecar = Self::spawn(yaml);
        sidecar.wait_ready().await;
        sidecar
    }

    /// Like `start`, but returns as soon as `/healthz` answers, ready or not.
    pub async fn start_unready(yaml: &str) -> Self {
        let sidecar = Self::spawn(yaml);
        let admin = sidecar.admin;
        wait_until(DEADLINE, "the sidecar to answer /healthz", || async move {
            admin_get(admin, "/healthz").await.ok().filter(|(s, _)| *s == 200)
        })
        .await;
        sidecar
    }

    /// Like `start_unready`, with more arguments after `run --config FILE`.
    pub async fn start_with_args(yaml: &str, args: &[&str]) -> Self {
        let sidecar =
            Self::spawn_with(yaml, args.iter().map(|a| a.to_string()).collect(), Vec::new());
        let admin = sidecar.admin;
        wait_until(DEADLINE, "the sidecar to answer /healthz", || async move {
            admin_get(admin, "/healthz").await.ok().filter(|(s, _)| *s == 200)
        })
        .await;
        sidecar
    }

    /// Like `start`, with `env` set in the sidecar's environment.
    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Self {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let sidecar = Self::spawn_with(yaml, Vec::new(), env);
        sidecar.wait_ready().await;
        sidecar
    }

    /// Starts the binary and returns at once, before it listens: for tests of its start.
    pub fn spawn(yaml: &str) -> Self {
        Self::spawn_with(yaml, Vec::new(), Vec::new())
    }

    fn spawn_with(yaml: &str, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        let outbound: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let scratch = Scratch::new();
        let text = expand(yaml, outbound, admin, &scratch);
        std::fs::write(scratch.0.join("outrigger.yaml"), text).expect("write the config");
        let child = launch(&scratch, &args, &env);
        Self { child, outbound, admin, scratch, args, env }
    }

    /// SIGKILL: no drain, no flush, no destructor; waits until the process is gone.
    pub fn kill9(&mut self) {
        crate::kill(&mut self.child);
    }

    /// Starts the binary again on the same YAML, ports and scratch directory (after `kill9`
    /// or an exit), and waits for `/readyz`.
    pub async fn restart(&mut self) {
        self.kill9();
        self.child = launch(&self.scratch, &self.args, &self.env);
        self.wait_ready().await;
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        while tokio::time::Instant::now() < until {
            if let Ok((200, _)) = admin_get(self.admin, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the sidecar was not ready within {DEADLINE:?}; its log:\n{}", self.log());
    }

    /// Everything the sidecar logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("outrigger.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status, up to the deadline.
    pub async fn terminate(self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit().await
    }

    /// The config file the sidecar runs on (`outrigger.yaml` in its scratch directory).
    pub fn config_path(&self) -> PathBuf {
        self.scratch.0.join("outrigger.yaml")
    }

    /// Rewrites the config file as `start` would (the same `$OUTBOUND`, `$ADMIN`, `$SCRATCH`
    /// and added sections), for a reload to pick up.
    pub fn rewrite(&self, yaml: &str) {
        std::fs::write(self.config_path(), self.expand(yaml)).expect("rewrite the config");
    }

    /// `yaml` as `start` writes it for this sidecar.
    pub fn expand(&self, yaml: &str) -> String {
        expand(yaml, self.outbound, self.admin, &self.scratch)
    }

    /// Sends a signal by name (`HUP`, `TERM`) and returns at once.
    pub fn signal(&self, name: &str) {
        let _ =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// SIGTERM, waits for the drain and the exit, then starts the binary again as `restart`
    /// does.
    pub async fn restart_after_sigterm(&mut self) {
        self.sigterm();
        self.wait_exited().await;
        self.restart().await;
    }

    /// Waits for the process to exit, up to the deadline.
    pub async fn wait_exit(mut self) -> std::process::ExitStatus {
        self.wait_exited().await
    }

    /// Waits for the process to exit, up to the deadline, keeping the handle (and its log).
    pub async fn wait_exited(&mut self) -> std::process::ExitStatus {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "no exit {DEADLINE:?} after SIGTERM; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET http://{outbound}{path}` with `Host: {host}`.
    pub async fn get(&self, host: &str, path: &str) -> Response<Bytes> {
        let req = Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
        send(self.outbound, req).await.expect("the sidecar answers")
    }

    /// Asserts that a plain request to `host` still gets 200: the sidecar kept serving.
    pub async fn assert_still_serving(&self, host: &str) {
        assert_eq!(
            self.get(host, "/still-serving").await.status(),
            200,
            "the sidecar stopped serving"
        );
    }

    /// Sends `req` to the outbound listener over a fresh HTTP/1.1 connection, exactly as built
    /// (an absolute URI goes out in absolute form).
    pub async fn send<B>(&self, req: Request<B>) -> Response<Bytes>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        send(self.outbound, req).await.expect("the sidecar answers")
    }

    /// Sends raw bytes and returns everything the sidecar writes back until it closes the
    /// connection, or until `wait` passes.
    pub async fn raw(&self, bytes: &[u8], wait: Duration) -> String {
        raw(self.outbound, bytes, wait).await
    }

    /// Like [`raw`](Self::raw), on the admin listener.
    pub async fn raw_admin(&self, bytes: &[u8], wait: Duration) -> String {
        raw(self.admin, bytes, wait).await
    }

    /// `GET` on the admin listener: status and body.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path).await.expect("the admin listener answers")
    }

    /// The sidecar's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// The sidecar's resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        let line = status.lines().find(|l| l.starts_with(field)).expect("a line of /proc status");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
    }

    /// How many file descriptors the sidecar holds open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("/proc fd").count()
    }
}

/// Runs `outrigger` on the scratch directory's config, appending to its log.
/// `yaml` with `$OUTBOUND`, `$ADMIN` and `$SCRATCH` filled in, and an `outbound:` or
/// `admin:` section added when it has none.
fn expand(yaml: &str, outbound: SocketAddr, admin: SocketAddr, scratch: &Scratch) -> String {
    let mut text = String::new();
    if !yaml.lines().any(|l| l.starts_with("outbound:")) {
        text.push_str("outbound: { listen: \"$OUTBOUND\" }\n");
    }
    if !yaml.lines().any(|l| l.starts_with("admin:")) {
        text.push_str("admin: { listen: \"$ADMIN\" }\n");
    }
    text.push_str(yaml);
    text.replace("$OUTBOUND", &outbound.to_string())
        .replace("$ADMIN", &admin.to_string())
        .replace("$SCRATCH", &scratch.0.display().to_string())
}

fn launch(scratch: &Scratch, args: &[String], env: &[(String, String)]) -> Child {
    let (stdout, stderr) = crate::log_to(&scratch.0.join("outrigger.log"));
    Command::new(binary())
        .args(["run", "--config"])
        .arg(scratch.0.join("outrigger.yaml"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // OUTRIGGER_TEST_LOG: a quieter level for long runs (scripts/soak)
        .env("OUTRIGGER_LOG", std::env::var("OUTRIGGER_TEST_LOG").unwrap_or("debug".into()))
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start outrigger")
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        crate::kill(&mut self.child);
        // a failed test shows what the sidecar said last: CI keeps nothing else
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
            eprintln!("--- the last {LOG_TAIL} lines of sidecar {} ---\n{tail}", self.admin);
        }
    }
}

/// How many of a sidecar's last log lines a failed test prints.
const LOG_TAIL: usize = 60;

/// One request over a fresh HTTP/1.1 connection to `addr`, body collected; `Err` when the
/// connection is refused or cut.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Result<Response<Bytes>, Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "admin").body(Full::new(Bytes::new())).unwrap();
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}
