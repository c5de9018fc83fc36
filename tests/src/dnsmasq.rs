//! Debian's real `dnsmasq` as the DNS server of discovery tests: in the foreground, on a free
//! loopback port (UDP and TCP), answering only from a hosts file and `--srv-host` records with
//! a TTL of 1 s. A record change is a rewritten hosts file and a SIGHUP to dnsmasq's own PID.
//! Names under `.test` that the zone lacks get NXDOMAIN; anything else gets REFUSED.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{DEADLINE, free_port};

/// The records dnsmasq serves.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    hosts: Vec<(IpAddr, String)>,
    srv: Vec<String>,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    /// An A record (AAAA for an IPv6 address): `name` resolves to `ip`. Call again for more.
    pub fn host(mut self, name: &str, ip: impl Into<IpAddr>) -> Self {
        self.hosts.push((ip.into(), name.to_owned()));
        self
    }

    /// An SRV record: `name` -> `target:port` with `weight`, priority 0. SRV records are fixed
    /// when dnsmasq starts; `Dnsmasq::set_hosts` changes only the host records.
    pub fn srv(mut self, name: &str, target: &str, port: u16, weight: u16) -> Self {
        self.srv.push(format!("{name},{target},{port},0,{weight}"));
        self
    }

    fn hosts_file(&self) -> String {
        self.hosts.iter().fold(String::new(), |mut text, (ip, name)| {
            let _ = writeln!(text, "{ip} {name}");
            text
        })
    }
}

/// A running dnsmasq; killed when dropped.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq serving `zone`; returns once it accepts connections on its port.
    pub async fn start(zone: Zone) -> Self {
        let dir = crate::scratch_dir("dnsmasq");
        std::fs::write(dir.join("hosts"), zone.hosts_file()).expect("write the hosts file");
        // a port free for TCP may still be taken for UDP: dnsmasq then exits, and we try another
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut child = spawn(&dir, addr, &zone);
            let until = tokio::time::Instant::now() + DEADLINE;
            while tokio::time::Instant::now() < until {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return Self { child, addr, dir };
                }
                if child.try_wait().expect("wait for dnsmasq").is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            crate::kill(&mut child);
        }
        panic!("dnsmasq did not start; its log:\n{}", read_log(&dir));
    }

    /// Where it answers, for `resolver.nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the host records with `zone`'s and has dnsmasq re-read them (SIGHUP).
    pub fn set_hosts(&self, zone: &Zone) {
        std::fs::write(self.dir.join("hosts"), zone.hosts_file()).expect("rewrite the hosts file");
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().expect("run kill");
        assert!(status.success(), "SIGHUP to dnsmasq {pid} failed");
    }

    /// Kills dnsmasq and waits for it to exit: nothing answers on its port afterwards.
    pub fn stop(&mut self) {
        crate::kill(&mut self.child);
    }

    /// Everything dnsmasq logged so far (every query is logged).
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(dir: &Path, addr: SocketAddr, zone: &Zone) -> Child {
    // Debian's dnsmasq-base puts it in /usr/sbin, which a non-root PATH may lack
    let binary = Path::new("/usr/sbin/dnsmasq");
    let binary = if binary.exists() { binary } else { Path::new("dnsmasq") };
    let mut cmd = Command::new(binary);
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--local-ttl=1",
        "--local=/test/",
        "--user=root",
        "--group=root",
        "--log-facility=-",
        "--log-queries",
    ]);
    cmd.arg(format!("--port={}", addr.port()))
        .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
    for srv in &zone.srv {
        cmd.arg(format!("--srv-host={srv}"));
    }
    let log = std::fs::File::create(dir.join("dnsmasq.log")).expect("a log file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup the log file")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start dnsmasq (Debian package dnsmasq-base; scripts/test installs it)")
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default()
}
