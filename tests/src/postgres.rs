//! A real PostgreSQL (Debian's `postgresql` package) for the app-outbox tests: `initdb` into a
//! scratch directory, then `postgres` on a free loopback port with trust authentication for the
//! user `outrigger`. The server refuses to run as root, so as root both run as the `postgres`
//! user the package creates (through `setpriv`, which execs: the child's PID is the server's, and
//! `stop` kills the server itself). `psql` runs SQL for the tests' own inserts and assertions.
//! Killed on drop by its PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

const STARTUP: Duration = Duration::from_secs(30);

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl Postgres {
    /// Makes a cluster and starts it; returns once it accepts queries.
    pub async fn start() -> Self {
        let bin = bin_dir();
        let dir = crate::scratch_dir("postgres");
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("the data directory");
        if as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the scratch directory to postgres");
        }
        let (stdout, stderr) = crate::log_to(&dir.join("initdb.log"));
        let status = unprivileged(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "outrigger", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .expect("run initdb (Debian package postgresql; scripts/test installs it)");
        assert!(status.success(), "initdb failed: see {}", dir.join("initdb.log").display());
        let mut postgres = Postgres { child: None, port: free_port(), dir, bin };
        postgres.restart().await;
        postgres
    }

    /// `postgres://outrigger@127.0.0.1:PORT/postgres`, for `messaging.app_outbox.postgres`.
    pub fn url(&self) -> String {
        format!("postgres://outrigger@127.0.0.1:{}/postgres", self.port)
    }

    /// Kills the server (as a crash would); its port and data stay for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::kill(&mut child);
        }
    }

    /// Starts the server again on the same port and data (recovering after `stop`), and waits
    /// until it answers a query.
    pub async fn restart(&mut self) {
        self.stop();
        let (stdout, stderr) = crate::log_to(&self.dir.join("postgres.log"));
        let child = unprivileged(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "max_connections=50", "-c", "shared_buffers=16MB"])
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start postgres (Debian package postgresql; scripts/test installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_until(STARTUP, "postgres to answer a query", move || async move {
            run_psql(port, "SELECT 1").ok().filter(|out| out == "1")
        })
        .await;
    }

    /// Runs `sql` with `psql` (stopping at the first error); its output, unaligned, trimmed.
    pub fn psql(&self, sql: &str) -> String {
        run_psql(self.port, sql).unwrap_or_else(|error| panic!("psql {sql:?}: {error}"))
    }

    /// Like `psql`, or the error `psql` printed.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        run_psql(self.port, sql)
    }

    /// A `psql` session kept open: what the test sends it runs at once, in one connection,
    /// so a transaction can be held open (another replica's, say) while the test goes on.
    pub fn session(&self) -> Session {
        let child = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "outrigger"])
            .args(["-d", "postgres", "-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run psql (Debian package postgresql-client)");
        Session { child }
    }
}

/// An open `psql` session; killed on drop (its transaction rolls back).
#[derive(Debug)]
pub struct Session {
    child: Child,
}

impl Session {
    /// Sends `sql` (statements ending in `;`) to the session.
    pub fn send(&mut self, sql: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("psql's stdin");
        writeln!(stdin, "{sql}").and_then(|()| stdin.flush()).expect("write to psql");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        crate::kill(&mut self.child);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "outrigger", "-d", "postgres"])
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run psql (Debian package postgresql-client): {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// The newest installed server's `bin` directory, `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("PostgreSQL under /usr/lib/postgresql (Debian package postgresql; scripts/test installs it)");
    root.join(newest.to_string()).join("bin")
}

fn as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// `program`, run as the `postgres` user when the tests run as root.
fn unprivileged(program: &Path) -> Command {
    if !as_root() {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--reset-env"])
        .arg(program);
    command
}
