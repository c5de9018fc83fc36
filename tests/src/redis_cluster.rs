//! A real Redis Cluster (Debian's `redis-server` with `--cluster-enabled yes`, three primaries
//! on free loopback ports, each with its own cluster bus port and append-only file), made with
//! `redis-cli --cluster create`, for the `redis+cluster://` broker. A node can be killed and
//! started again on its port and data (a crash and recovery); `cli` follows `MOVED` (`-c`), so
//! a test reads any key wherever its slot lives. Killed on drop by their PIDs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

const STARTUP: Duration = Duration::from_secs(20);
const NODES: usize = 3;

/// One node: its process (while up), its client and bus ports, its directory.
#[derive(Debug)]
struct Node {
    child: Option<Child>,
    /// SIGSTOPped: it answers nothing, so `cli` must not ask it.
    paused: bool,
    port: u16,
    bus: u16,
    dir: PathBuf,
}

/// A running three-node Redis Cluster.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts three nodes, joins them into one cluster covering every slot, and returns once
    /// every node says the cluster is `ok`.
    pub async fn start() -> Self {
        let dir = crate::scratch_dir("redis-cluster");
        let nodes = (0..NODES)
            .map(|i| {
                let node_dir = dir.join(format!("node-{i}"));
                std::fs::create_dir_all(&node_dir).expect("a node directory");
                Node {
                    child: None,
                    paused: false,
                    port: free_port(),
                    bus: free_port(),
                    dir: node_dir,
                }
            })
            .collect();
        let mut cluster = RedisCluster { nodes, dir };
        for i in 0..NODES {
            cluster.spawn(i);
        }
        for node in &cluster.nodes {
            let port = node.port;
            wait_until(STARTUP, "a cluster node to answer PING", move || async move {
                (cli_at(port, &["PING"]) == "PONG").then_some(())
            })
            .await;
        }
        let addrs: Vec<String> =
            cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, for `messaging.broker`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> =
            self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Runs `redis-cli -c` with `args` on a node that is up (following `MOVED` to the node
    /// that holds the key); its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let up = |n: &&Node| n.child.is_some() && !n.paused;
        let node = self.nodes.iter().find(up).expect("a node that is up");
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli_at(node.port, &all)
    }

    /// Kills node `i` (as a crash would): the slots it holds are down until `restart_node`.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            crate::kill(&mut child);
        }
    }

    /// Starts node `i` again on its ports and data, and waits for the cluster to be `ok`.
    pub async fn restart_node(&mut self, i: usize) {
        self.stop_node(i);
        self.spawn(i);
        self.wait_ok().await;
    }

    /// SIGSTOP node `i`: it holds its connections open and answers nothing (a replica that
    /// stops copying, say).
    pub fn pause_node(&mut self, i: usize) {
        self.signal(i, "STOP");
        self.nodes[i].paused = true;
    }

    /// SIGCONT after `pause_node`.
    pub fn resume_node(&mut self, i: usize) {
        self.signal(i, "CONT");
        self.nodes[i].paused = false;
    }

    fn signal(&self, i: usize, name: &str) {
        if let Some(child) = &self.nodes[i].child {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{name} a cluster node");
        }
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }

    /// Starts every node again, and waits for the cluster to be `ok`.
    pub async fn restart(&mut self) {
        self.stop();
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
        self.wait_ok().await;
    }

    /// Adds a replica of node `of` and waits until it has copied everything: returns its
    /// index. Killing `of` then fails over to it.
    pub async fn add_replica(&mut self, of: usize) -> usize {
        let i = self.nodes.len();
        let node_dir = self.dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir).expect("a node directory");
        self.nodes.push(Node {
            child: None,
            paused: false,
            port: free_port(),
            bus: free_port(),
            dir: node_dir,
        });
        self.spawn(i);
        let (port, primary) = (self.nodes[i].port, self.nodes[of].port);
        wait_until(STARTUP, "the replica to answer PING", move || async move {
            (cli_at(port, &["PING"]) == "PONG").then_some(())
        })
        .await;
        let id = cli_at(primary, &["CLUSTER", "MYID"]);
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node", &format!("127.0.0.1:{port}")])
            .arg(format!("127.0.0.1:{primary}"))
            .args(["--cluster-slave", "--cluster-master-id", &id])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster add-node");
        assert!(out.status.success(), "add-node: {}", String::from_utf8_lossy(&out.stdout));
        self.wait_replicated(of).await;
        // every node names it among the slot's holders, so a client that reads the layout
        // from any of them knows it (and keeps a connection to it)
        let ports: Vec<u16> =
            self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port).collect();
        wait_until(STARTUP, "every node to list the replica in CLUSTER SLOTS", move || {
            let ports = ports.clone();
            async move {
                let listed = |at: u16| {
                    cli_at(at, &["CLUSTER", "SLOTS"]).lines().any(|l| l == port.to_string())
                };
                ports.iter().all(|&at| listed(at)).then_some(())
            }
        })
        .await;
        i
    }

    /// Waits until node `of`'s replicas hold everything it does.
    pub async fn wait_replicated(&self, of: usize) {
        let primary = self.nodes[of].port;
        wait_until(STARTUP, "the replica to catch up", move || async move {
            let info = cli_at(primary, &["INFO", "replication"]);
            let field = |name: &str| {
                info.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned())
            };
            let offset = field("master_repl_offset:")?;
            let replica = field("slave0:")?;
            (replica.contains("state=online") && replica.contains(&format!("offset={offset},")))
                .then_some(())
        })
        .await;
    }

    /// Which node (by index) holds `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self.cli(&["CLUSTER", "KEYSLOT", key]).parse().expect("a slot number");
        let nodes = self.cli(&["CLUSTER", "NODES"]);
        let line = nodes.lines().find(|l| owns(l, slot)).expect("a node holds every slot");
        // `ID 127.0.0.1:PORT@BUS FLAGS …`
        let addr = line.split_whitespace().nth(1).expect("a node's address");
        let port = addr.split('@').next().and_then(|a| a.rsplit(':').next());
        let port: u16 = port.and_then(|p| p.parse().ok()).expect("a node's port");
        self.nodes.iter().position(|n| n.port == port).expect("a node of this cluster")
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut command = crate::redis::server(&node.dir);
        command
            .args(["--bind", "127.0.0.1", "--port", &node.port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-port", &node.bus.to_string()])
            .args(["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]);
        node.child = Some(crate::redis::spawn(&mut command));
    }

    async fn wait_ok(&self) {
        let ports: Vec<u16> =
            self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port).collect();
        wait_until(STARTUP, "every cluster node to say cluster_state:ok", || {
            let ports = ports.clone();
            async move {
                ports
                    .iter()
                    .all(|&port| cli_at(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                    .then_some(())
            }
        })
        .await;
    }
}

/// Does the `CLUSTER NODES` line `line` list `slot` among its ranges?
fn owns(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| match range.split_once('-') {
        Some((a, b)) => {
            a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
        }
        None => range.parse::<u16>() == Ok(slot),
    })
}

fn cli_at(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run redis-cli (Debian package redis-tools, installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.resume_node(i);
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
