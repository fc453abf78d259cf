//! A Patroni high-availability cluster for the failover tests: one etcd, a few PostgreSQL
//! nodes managed by Patroni (one primary, the others streaming standbys) and one HAProxy
//! in front of them, all on free ports of `127.0.0.1`, under one temporary directory.
//!
//! Patroni uses etcd's v2 API (its `etcd:` section), not `etcd3:`: Patroni 3.0.2's v3
//! client can overwrite the leader key after a hung primary wakes up, and the new primary's
//! acknowledged writes are then discarded. etcd 3.4 serves v2 only with `--enable-v2=true`.
//!
//! Everything here blocks the calling thread (like [`TestServer::stop`]): from async code,
//! call it inside `tokio::task::block_in_place` (multi-threaded runtime) or
//! `spawn_blocking`, so that the tasks writing to the cluster keep running meanwhile.
//!
//! [`TestServer::stop`]: crate::testing::TestServer::stop

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::host::{self, UserIds};
use super::process::{self, lock};
use super::reaper::Reaper;
use super::url::{local_url, quote_identifier};
use super::{wire, HarnessError, SUPERUSER};

/// Patroni's scope (cluster name); each cluster has an etcd of its own, so one name serves.
const SCOPE: &str = "plane";
/// How long [`TestPatroniCluster::start`] waits for etcd to answer.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`TestPatroniCluster::start`] waits for the whole cluster to be ready.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts at starting a cluster when one of its ports was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);
/// How many times [`TestPatroniCluster::switchover`] asks, and how long it waits each time
/// for the leader to change.
const SWITCHOVER_ATTEMPTS: usize = 5;
const SWITCHOVER_WAIT: Duration = Duration::from_secs(8);
/// How long teardown waits for the postmasters and etcd before SIGKILL.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`TestPatroniCluster::start`] sets up its cluster.
#[derive(Debug, Clone)]
pub struct PatroniOptions {
    /// Patroni's `synchronous_mode`: the primary waits for one standby (the sync standby)
    /// before a commit is acknowledged, and only that standby may be promoted.
    pub synchronous: bool,
    /// How many PostgreSQL nodes (at least 1; 3 by default: a primary and two standbys).
    pub nodes: usize,
    /// Further PostgreSQL parameters for every node, as `(name, value)`, on top of the
    /// harness's own (`fsync=off`, `max_connections=100`, `shared_buffers=32MB`, …; a
    /// parameter given here replaces the harness's value).
    pub parameters: Vec<(String, String)>,
}

impl PatroniOptions {
    /// Three nodes, with or without synchronous replication, and no extra parameters.
    pub fn new(synchronous: bool) -> Self {
        Self {
            synchronous,
            nodes: 3,
            parameters: Vec::new(),
        }
    }
}

impl Default for PatroniOptions {
    /// Three nodes in synchronous mode: what a test that counts acknowledged rows needs.
    fn default() -> Self {
        Self::new(true)
    }
}

/// One switch of timeline in Patroni's history (its `/history` key in the DCS): a
/// promotion, by failover or switchover.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineSwitch {
    /// The timeline that ended (the promoted node went on on `timeline + 1`).
    pub timeline: u32,
    /// The WAL position of the switch.
    pub lsn: u64,
    /// PostgreSQL's reason, e.g. `no recovery target specified`.
    pub reason: String,
    /// When the promoted node wrote the new timeline's history file (Patroni's record of
    /// the promotion; `None` if Patroni did not record it).
    pub promoted_at: Option<SystemTime>,
    /// The node promoted, if Patroni recorded it.
    pub new_leader: Option<String>,
}

/// The programs a cluster is made of.
#[derive(Debug, Clone)]
struct Programs {
    patroni: PathBuf,
    patronictl: PathBuf,
    etcd: PathBuf,
    haproxy: PathBuf,
    /// PostgreSQL's binary directory (`initdb`, `postgres`, `pg_rewind`, …).
    pg_bin_dir: PathBuf,
}

impl Programs {
    /// Finds them all; [`HarnessError::NoClusterComponent`] names the package of the first
    /// one missing.
    fn find() -> Result<Programs, HarnessError> {
        let find = |program, looked_in: &'static str, package| {
            let dirs: Vec<&str> = looked_in.split(", ").collect();
            host::find_program(program, &dirs).ok_or(HarnessError::NoClusterComponent {
                program,
                looked_in,
                package,
            })
        };
        let pg_bin_dir = host::find_bin_dir().ok_or(HarnessError::NoPostgres)?;
        // Patroni runs many of PostgreSQL's programs (pg_ctl, pg_basebackup, pg_rewind, …)
        // from one directory; a directory on PATH may hold links to only a few of them.
        let pg_bin_dir = fs::canonicalize(pg_bin_dir.join("postgres"))
            .ok()
            .and_then(|postgres| postgres.parent().map(Path::to_path_buf))
            .unwrap_or(pg_bin_dir);
        Ok(Programs {
            patroni: find("patroni", "/usr/bin, /usr/local/bin", "patroni")?,
            patronictl: find("patronictl", "/usr/bin, /usr/local/bin", "patroni")?,
            etcd: find("etcd", "/usr/bin, /usr/local/bin", "etcd-server")?,
            haproxy: find("haproxy", "/usr/sbin, /usr/bin, /usr/local/sbin", "haproxy")?,
            pg_bin_dir,
        })
    }
}

/// One PostgreSQL node and its Patroni.
#[derive(Debug)]
struct Node {
    /// Patroni's name for it: `n1`, `n2`, ….
    name: String,
    pg_port: u16,
    rest_port: u16,
    config: PathBuf,
    data_dir: PathBuf,
    /// Patroni's log; PostgreSQL's own messages land there too.
    log: PathBuf,
    /// Where the harness writes the pid of the running Patroni, for the reaper.
    patroni_pid_file: PathBuf,
    /// The running Patroni, if any.
    patroni: Mutex<Option<Child>>,
}

impl Node {
    fn postmaster_pid_file(&self) -> PathBuf {
        self.data_dir.join("postmaster.pid")
    }
}

/// A Patroni cluster started by [`TestPatroniCluster::start`]: etcd, one Patroni with its
/// PostgreSQL per node, HAProxy with a port for the primary and one for the standbys.
/// Nodes are numbered from 0 (Patroni names them `n1`, `n2`, …). The superuser `postgres`
/// connects without a password. Dropping it kills everything and deletes its directory
/// (a cleanup process does so if the test process dies first).
#[derive(Debug)]
pub struct TestPatroniCluster {
    root: PathBuf,
    programs: Programs,
    run_as: Option<UserIds>,
    synchronous: bool,
    etcd_port: u16,
    etcd_peer_port: u16,
    etcd_log: PathBuf,
    etcd_pid_file: PathBuf,
    etcd: Mutex<Option<Child>>,
    nodes: Vec<Node>,
    haproxy_primary_port: u16,
    haproxy_replica_port: u16,
    haproxy_log: PathBuf,
    haproxy_pid_file: PathBuf,
    haproxy: Mutex<Option<Child>>,
    /// Cleans up if this process dies; dropped (ended) by our own teardown.
    reaper: Option<Reaper>,
}

impl TestPatroniCluster {
    /// Starts a cluster: etcd, then all Patroni nodes at once (whichever wins the race
    /// bootstraps the primary with `initdb`; the others copy it with `pg_basebackup`), then
    /// HAProxy. Patroni runs with `ttl` 10 s, `loop_wait` 1 s, `retry_timeout` 3 s,
    /// `primary_start_timeout` 0 (a crashed primary is failed over, not restarted in place)
    /// and `pg_rewind`; PostgreSQL with `fsync=off` (process kills keep the page cache) and
    /// 100 connections. When running as root, everything runs as the `postgres` (else
    /// `nobody`) user, because `initdb` refuses root.
    ///
    /// Returns once the primary is writable through HAProxy, HAProxy's replica port reaches
    /// a standby, and every other node streams from the primary (one of them as the sync
    /// standby in synchronous mode): 8 to 10 s on 2 cores, about twice that when three
    /// clusters start at once. Missing programs are
    /// [`HarnessError::NoClusterComponent`] (naming the package to install); a start that
    /// fails is [`HarnessError::PatroniCluster`] with the tails of the logs.
    pub fn start(options: &PatroniOptions) -> Result<TestPatroniCluster, HarnessError> {
        if options.nodes == 0 {
            return Err(HarnessError::PatroniCluster {
                what: " needs at least one node".to_owned(),
                log_tails: String::new(),
            });
        }
        let programs = Programs::find()?;
        let run_as = host::server_user()?;
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let cluster = TestPatroniCluster::prepare(programs.clone(), run_as, options)?;
            match cluster.boot() {
                Ok(()) => {
                    tracing::info!(
                        dir = %cluster.root.display(),
                        nodes = cluster.nodes.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "started Patroni cluster for tests"
                    );
                    return Ok(cluster);
                }
                Err(error) if attempt < START_ATTEMPTS && cluster.port_was_taken() => {
                    tracing::info!(%error, "a port of the Patroni cluster was taken; retrying");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The directories, files and ports of a new cluster, and its reaper; nothing runs yet.
    fn prepare(
        programs: Programs,
        run_as: Option<UserIds>,
        options: &PatroniOptions,
    ) -> Result<TestPatroniCluster, HarnessError> {
        let root = host::create_temp_root()?;
        let ports = free_ports(2 + 2 * options.nodes + 2).inspect_err(|_| {
            let _ = fs::remove_dir_all(&root);
        })?;
        let nodes = (0..options.nodes)
            .map(|index| {
                let name = format!("n{}", index + 1);
                Node {
                    pg_port: ports[2 + 2 * index],
                    rest_port: ports[3 + 2 * index],
                    config: root.join(format!("{name}.yml")),
                    data_dir: root.join("data").join(&name),
                    log: root.join(format!("{name}.log")),
                    patroni_pid_file: root.join("pids").join(format!("patroni-{name}")),
                    patroni: Mutex::new(None),
                    name,
                }
            })
            .collect();
        let mut cluster = TestPatroniCluster {
            etcd_port: ports[0],
            etcd_peer_port: ports[1],
            etcd_log: root.join("etcd.log"),
            etcd_pid_file: root.join("pids").join("etcd"),
            etcd: Mutex::new(None),
            nodes,
            haproxy_primary_port: ports[ports.len() - 2],
            haproxy_replica_port: ports[ports.len() - 1],
            haproxy_log: root.join("haproxy.log"),
            haproxy_pid_file: root.join("pids").join("haproxy"),
            haproxy: Mutex::new(None),
            reaper: None,
            synchronous: options.synchronous,
            programs,
            run_as,
            root,
        };
        // From here on, dropping `cluster` stops what runs and removes the directory.
        cluster.reaper = Some(Reaper::for_cluster(
            &cluster.root,
            &cluster.reaper_targets(),
        )?);
        cluster.write_files(options)?;
        Ok(cluster)
    }

    /// What the reaper stops, in order: Patroni first (so that it restarts nothing), then
    /// HAProxy, then each postmaster (SIGQUIT, an immediate shutdown that also ends its
    /// children), then etcd.
    fn reaper_targets(&self) -> Vec<(&'static str, PathBuf)> {
        let mut targets: Vec<(&str, PathBuf)> = self
            .nodes
            .iter()
            .map(|node| ("KILL", node.patroni_pid_file.clone()))
            .collect();
        targets.push(("KILL", self.haproxy_pid_file.clone()));
        targets.extend(
            self.nodes
                .iter()
                .map(|node| ("QUIT", node.postmaster_pid_file())),
        );
        targets.push(("TERM", self.etcd_pid_file.clone()));
        targets
    }

    /// Creates the directories, configuration files and logs, owned by the user that runs
    /// the programs.
    fn write_files(&self, options: &PatroniOptions) -> Result<(), HarnessError> {
        let data = self.root.join("data");
        let run = self.run_dir();
        let etcd_dir = self.root.join("etcd");
        for dir in [&data, &run, &etcd_dir, &self.root.join("pids")] {
            host::create_dir(dir, 0o700)?;
        }
        let mut owned: Vec<PathBuf> = vec![self.root.clone(), data, run, etcd_dir.clone()];
        for log in self
            .nodes
            .iter()
            .map(|node| &node.log)
            .chain([&self.etcd_log, &self.haproxy_log])
        {
            File::create(log).map_err(HarnessError::io(format!(
                "could not create {}",
                log.display()
            )))?;
            owned.push(log.clone());
        }
        for node in &self.nodes {
            write_file(&node.config, &self.patroni_config(node, options))?;
            owned.push(node.config.clone());
        }
        write_file(&self.haproxy_config_path(), &self.haproxy_config())?;
        owned.push(self.haproxy_config_path());
        let owned: Vec<&Path> = owned.iter().map(PathBuf::as_path).collect();
        host::chown_all(&owned, self.run_as)
    }

    /// Starts etcd, the nodes and HAProxy and waits until the cluster is ready.
    fn boot(&self) -> Result<(), HarnessError> {
        self.start_etcd()?;
        for node in &self.nodes {
            self.spawn_patroni(node)?;
        }
        self.start_haproxy()?;
        self.wait_until_ready(CLUSTER_READY_TIMEOUT)
    }

    fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    fn haproxy_config_path(&self) -> PathBuf {
        self.root.join("haproxy.cfg")
    }

    /// A command running `program` in the cluster's directory, as the unprivileged user if
    /// this process is root.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.current_dir(&self.root).env("HOME", &self.root);
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts `command` logging to `log`, and records its pid in `pid_file` for the reaper.
    fn spawn(
        &self,
        mut command: Command,
        log: &Path,
        pid_file: &Path,
    ) -> Result<Child, HarnessError> {
        let program = Path::new(command.get_program()).display().to_string();
        let could_not_run = HarnessError::io(format!(
            "could not run {program}{}",
            self.run_as
                .map_or(String::new(), |(uid, _)| format!(" as uid {uid}"))
        ));
        let mut child = process::spawn_logged(&mut command, log, could_not_run)?;
        if let Err(error) = write_file(pid_file, &format!("{}\n", child.id())) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        Ok(child)
    }

    fn start_etcd(&self) -> Result<(), HarnessError> {
        let peer_port = self.etcd_peer_port;
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut command = self.command(&self.programs.etcd);
        command
            .args(["--name", "e1", "--data-dir"])
            .arg(self.root.join("etcd"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e1={peer}")])
            .args(["--initial-cluster-state", "new"])
            // Patroni's `etcd:` section speaks the v2 API (see the module's comment).
            .args(["--enable-v2=true"]);
        let mut etcd = self.spawn(command, &self.etcd_log, &self.etcd_pid_file)?;
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        let outcome = loop {
            if let Ok(Some(status)) = etcd.try_wait() {
                break Err(format!("'s etcd exited during startup ({status})"));
            }
            match http_get(self.etcd_port, "/health") {
                Ok((200, body)) if body.contains("true") => break Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => thread::sleep(POLL),
                Ok((status, body)) => {
                    break Err(format!(
                        "'s etcd was not healthy within {ETCD_READY_TIMEOUT:?} ({status} {body})"
                    ))
                }
                Err(error) => {
                    break Err(format!(
                        "'s etcd did not answer within {ETCD_READY_TIMEOUT:?} ({error})"
                    ))
                }
            }
        };
        // Kept even when it failed: teardown stops it.
        *lock(&self.etcd) = Some(etcd);
        outcome.map_err(|what| self.error(what, &[&self.etcd_log]))
    }
}

/// A port each, free a moment ago and all different.
fn free_ports(count: usize) -> Result<Vec<u16>, HarnessError> {
    // Holding every listener until all are chosen keeps them different.
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(HarnessError::io("could not find free ports on 127.0.0.1"))?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(HarnessError::io("could not find free ports on 127.0.0.1"))
}

/// Writes `text` to `path`.
fn write_file(path: &Path, text: &str) -> Result<(), HarnessError> {
    fs::write(path, text).map_err(HarnessError::io(format!(
        "could not write {}",
        path.display()
    )))
}

impl TestPatroniCluster {
    /// The directory holding all of the cluster's files (configurations, logs, data
    /// directories, etcd's data); it is removed when the cluster is dropped.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Patroni's name of node `node` (`n1` for node 0, …).
    pub fn node_name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// Whether the cluster runs in Patroni's synchronous mode.
    pub fn is_synchronous(&self) -> bool {
        self.synchronous
    }

    /// A URL for `database` through HAProxy's primary port: its health check asks each
    /// node's Patroni `GET /primary`, so new connections reach whichever node holds the
    /// leader key (connections to a node that loses it are cut).
    pub fn primary_url(&self, database: &str) -> String {
        local_url("127.0.0.1", self.haproxy_primary_port, database)
    }

    /// A URL for `database` through HAProxy's replica port: new connections go round the
    /// nodes whose Patroni answers `GET /replica` with 200 (running standbys).
    pub fn replicas_url(&self, database: &str) -> String {
        local_url("127.0.0.1", self.haproxy_replica_port, database)
    }

    /// A URL for `database` listing every node directly, for libpq-style multi-host
    /// failover: `postgres://postgres@127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/database`.
    /// It has no query string: the caller adds `target_session_attrs` and timeouts.
    pub fn multi_host_url(&self, database: &str) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.pg_port))
            .collect();
        let one = local_url("127.0.0.1", self.nodes[0].pg_port, database);
        one.replacen(
            &format!("127.0.0.1:{}", self.nodes[0].pg_port),
            &hosts.join(","),
            1,
        )
    }

    /// A URL for `database` on node `node` directly, whatever its role.
    pub fn node_url(&self, node: usize, database: &str) -> String {
        local_url("127.0.0.1", self.nodes[node].pg_port, database)
    }

    /// The PostgreSQL port of node `node`.
    pub fn node_port(&self, node: usize) -> u16 {
        self.nodes[node].pg_port
    }

    /// Patroni's log of node `node` (PostgreSQL's own messages are in it too).
    pub fn node_log(&self, node: usize) -> &Path {
        &self.nodes[node].log
    }

    /// The last lines of every log of the cluster (each node's, etcd's, HAProxy's), for the
    /// message of a failed test.
    pub fn log_tails(&self) -> String {
        let logs: Vec<&Path> = self.all_logs();
        tails(&logs)
    }

    /// The node holding the leader key in etcd now (`None` while there is none, e.g.
    /// between the old leader's key expiring and a standby taking it). The leader key is
    /// Patroni's own truth; the node may still be finishing its promotion.
    pub fn leader(&self) -> Result<Option<usize>, HarnessError> {
        let name = self
            .dcs_key("leader")
            .map_err(|what| self.plain_error(format!(": {what}")))?;
        Ok(name.and_then(|name| self.node_index(&name)))
    }

    /// The sync standby Patroni chose (its `/sync` key in etcd), if any: the node a
    /// failover promotes in synchronous mode. `None` in asynchronous mode.
    pub fn sync_standby(&self) -> Result<Option<usize>, HarnessError> {
        let Some(text) = self
            .dcs_key("sync")
            .map_err(|what| self.plain_error(format!(": {what}")))?
        else {
            return Ok(None);
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| self.plain_error(format!("'s /sync key is not JSON: {error}")))?;
        Ok(value
            .get("sync_standby")
            .and_then(serde_json::Value::as_str)
            .and_then(|name| self.node_index(name)))
    }

    /// Patroni's history of timeline switches (its `/history` key in etcd), oldest first;
    /// empty before the first promotion. Patroni updates it shortly after a promotion.
    pub fn history(&self) -> Result<Vec<TimelineSwitch>, HarnessError> {
        let Some(text) = self
            .dcs_key("history")
            .map_err(|what| self.plain_error(format!(": {what}")))?
        else {
            return Ok(Vec::new());
        };
        parse_history(&text)
            .ok_or_else(|| self.plain_error(format!("'s /history key could not be read: {text}")))
    }

    /// When Patroni promoted a node last, from its [`history`](Self::history) (the time the
    /// promoted node wrote its timeline history file), waiting up to `timeout` for Patroni
    /// to record a promotion to timeline `timeline` or later. With the time of a fault, it
    /// gives Patroni's own detection-and-promotion time.
    pub fn promoted_at(
        &self,
        timeline: u32,
        timeout: Duration,
    ) -> Result<SystemTime, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let history = self.history()?;
            if let Some(switch) = history
                .iter()
                .rev()
                .find(|switch| switch.timeline + 1 >= timeline)
            {
                if let Some(at) = switch.promoted_at {
                    return Ok(at);
                }
            }
            if Instant::now() >= deadline {
                return Err(self.plain_error(format!(
                    " recorded no promotion to timeline {timeline} within {timeout:?} \
                     (history: {history:?})"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// The timeline the leader writes on now (from the name of its current WAL file).
    pub fn timeline(&self) -> Result<u32, HarnessError> {
        let leader = self
            .leader()?
            .ok_or_else(|| self.plain_error(" has no leader".to_owned()))?;
        let value = self
            .query_one(
                self.nodes[leader].pg_port,
                "select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            )
            .map_err(|what| {
                self.plain_error(format!(": node {}: {what}", self.nodes[leader].name))
            })?;
        u32::from_str_radix(&value, 16)
            .map_err(|_| self.plain_error(format!("'s leader gave the timeline {value:?}")))
    }

    /// `CREATE DATABASE` on the primary (through HAProxy); returns a URL for it through
    /// HAProxy's primary port ([`primary_url`](Self::primary_url)).
    pub fn create_database(&self, name: &str) -> Result<String, HarnessError> {
        wire::simple_query(
            self.haproxy_primary_port,
            &format!("CREATE DATABASE {}", quote_identifier(name)),
        )
        .map_err(|what| self.plain_error(format!(" could not create database {name}: {what}")))?;
        Ok(self.primary_url(name))
    }

    /// Waits until a node other than `old` holds the leader key and runs as a primary
    /// (its PostgreSQL, asked directly, is out of recovery), for `timeout` at most.
    /// Returns that node and when it was first seen so.
    pub fn wait_for_new_leader(
        &self,
        old: usize,
        timeout: Duration,
    ) -> Result<(usize, Instant), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last;
            match self.leader() {
                Ok(Some(leader)) if leader != old => {
                    match self.query_one(self.nodes[leader].pg_port, "select pg_is_in_recovery()") {
                        Ok(value) if value == "f" => return Ok((leader, Instant::now())),
                        Ok(_) => {
                            last = format!(
                                "{} holds the leader key but is in recovery",
                                self.nodes[leader].name
                            )
                        }
                        Err(error) => last = format!("{}: {error}", self.nodes[leader].name),
                    }
                }
                Ok(Some(_)) => last = format!("{} is still the leader", self.nodes[old].name),
                Ok(None) => last = "no node holds the leader key".to_owned(),
                Err(error) => last = error.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(self.error(
                    format!(" elected no new leader within {timeout:?} (last: {last})"),
                    &self.all_logs(),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until node `node` streams from the current leader (a `streaming` row of its
    /// name in the leader's `pg_stat_replication`), for `timeout` at most; returns when it
    /// was first seen so.
    pub fn wait_for_streaming_replica(
        &self,
        node: usize,
        timeout: Duration,
    ) -> Result<Instant, HarnessError> {
        let deadline = Instant::now() + timeout;
        let name = &self.nodes[node].name;
        loop {
            let last;
            match self.leader() {
                Ok(Some(leader)) if leader == node => last = format!("{name} is the leader"),
                Ok(Some(leader)) => match self.replication(leader) {
                    Ok(rows) => match rows.iter().find(|row| &row.0 == name) {
                        Some(row) if row.1 == "streaming" => return Ok(Instant::now()),
                        Some(row) => {
                            last = format!("{name} is {} on {}", row.1, self.nodes[leader].name)
                        }
                        None => {
                            last = format!("{name} is not connected to {}", self.nodes[leader].name)
                        }
                    },
                    Err(error) => last = format!("{}: {error}", self.nodes[leader].name),
                },
                Ok(None) => last = "no node holds the leader key".to_owned(),
                Err(error) => last = error.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(self.error(
                    format!(
                        "'s node {name} did not stream from the leader within {timeout:?} \
                         (last: {last})"
                    ),
                    &[&self.nodes[node].log],
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the cluster is as [`start`](Self::start) leaves it: the primary writable
    /// through HAProxy, HAProxy's replica port reaching a standby, every other node
    /// streaming from the primary, and a sync standby in synchronous mode.
    pub fn wait_until_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let not_ready = match self.readiness() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(self.error(
                    format!(" was not ready within {timeout:?} (last: {not_ready})"),
                    &self.all_logs(),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Kills node `node`'s postmaster with SIGKILL (its pid from `postmaster.pid`), as a
    /// crash of PostgreSQL would; Patroni keeps running. Returns the pid killed.
    pub fn kill_postmaster(&self, node: usize) -> Result<u32, HarnessError> {
        let pid = self.postmaster_pid(&self.nodes[node]).ok_or_else(|| {
            self.plain_error(format!(
                "'s node {} has no running postmaster",
                self.nodes[node].name
            ))
        })?;
        process::send_signal(pid, "KILL")?;
        Ok(pid)
    }

    /// Stops node `node` as a hung machine would: SIGSTOP to its Patroni and to its
    /// postmaster with all its server processes. [`resume`](Self::resume) wakes them.
    pub fn pause(&self, node: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[node];
        let pids = self.node_processes(node);
        signal_all(&pids, "STOP")?;
        // A server process forked just before the postmaster stopped is caught now.
        let again: Vec<u32> = self
            .node_processes(node)
            .into_iter()
            .filter(|pid| !pids.contains(pid))
            .collect();
        signal_all(&again, "STOP")
    }

    /// Wakes node `node` after [`pause`](Self::pause) (SIGCONT to the same processes).
    pub fn resume(&self, node: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[node];
        signal_all(&self.node_processes(node), "CONT")
    }

    /// Kills node `node`'s Patroni with SIGKILL; its PostgreSQL keeps running (Patroni
    /// detaches the postmaster). Killing a Patroni that does not run does nothing.
    pub fn kill_patroni(&self, node: usize) -> Result<(), HarnessError> {
        if let Some(mut child) = lock(&self.nodes[node].patroni).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Rebuilds node `node` from the leader (`patronictl reinit --force`: its data
    /// directory is removed and copied afresh with `pg_basebackup`), for a former primary
    /// that does not come back as a standby by itself. Does not wait.
    pub fn reinit(&self, node: usize) -> Result<(), HarnessError> {
        let mut command = Command::new(&self.programs.patronictl);
        command
            .arg("-c")
            .arg(&self.nodes[node].config)
            .args(["reinit", SCOPE, &self.nodes[node].name, "--force"])
            .current_dir(&self.root)
            .stdin(Stdio::null());
        process::run(
            &mut command,
            HarnessError::io(format!(
                "could not run {}",
                self.programs.patronictl.display()
            )),
        )?;
        Ok(())
    }

    /// Starts node `node`'s Patroni again (after [`kill_patroni`](Self::kill_patroni)),
    /// with the same configuration; it takes over the running PostgreSQL, or starts it.
    /// Does not wait; restarting a Patroni that runs does nothing.
    pub fn restart_patroni(&self, node: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[node];
        {
            let mut patroni = lock(&node.patroni);
            if let Some(child) = patroni.as_mut() {
                if matches!(child.try_wait(), Ok(None)) {
                    return Ok(());
                }
            }
            *patroni = None;
        }
        self.spawn_patroni(node)
    }

    /// A planned switchover away from the current leader:
    /// `patronictl switchover --force --leader <leader>` (Patroni picks the candidate: the
    /// sync standby in synchronous mode). Returns the old leader once another node holds
    /// the leader key, asking again while Patroni refuses.
    pub fn switchover(&self) -> Result<usize, HarnessError> {
        let leader = self
            .leader()?
            .ok_or_else(|| self.plain_error(" has no leader to switch over from".to_owned()))?;
        // patronictl exits 0 when Patroni refuses (e.g. `503, Switchover failed` while a
        // rejoined node is not yet the sync standby): ask again until the leader changes.
        let mut said = Vec::new();
        for _ in 0..SWITCHOVER_ATTEMPTS {
            let mut command = Command::new(&self.programs.patronictl);
            command
                .arg("-c")
                .arg(&self.nodes[leader].config)
                .args([
                    "switchover",
                    "--force",
                    "--leader",
                    &self.nodes[leader].name,
                ])
                .current_dir(&self.root)
                .stdin(Stdio::null());
            let output = process::run(
                &mut command,
                HarnessError::io(format!(
                    "could not run {}",
                    self.programs.patronictl.display()
                )),
            )?;
            let deadline = Instant::now() + SWITCHOVER_WAIT;
            while Instant::now() < deadline {
                if matches!(self.leader(), Ok(Some(now)) if now != leader) {
                    return Ok(leader);
                }
                std::thread::sleep(POLL);
            }
            said.push(output.trim().to_string());
        }
        Err(self.plain_error(format!(
            " did not switch over from {} after {SWITCHOVER_ATTEMPTS} requests; patronictl said: {}",
            self.nodes[leader].name,
            said.join(" | ")
        )))
    }
}

// Internals of the cluster.
impl TestPatroniCluster {
    fn spawn_patroni(&self, node: &Node) -> Result<(), HarnessError> {
        let mut command = self.command(&self.programs.patroni);
        command.arg(&node.config);
        let child = self.spawn(command, &node.log, &node.patroni_pid_file)?;
        *lock(&node.patroni) = Some(child);
        Ok(())
    }

    fn start_haproxy(&self) -> Result<(), HarnessError> {
        let mut command = self.command(&self.programs.haproxy);
        command.arg("-f").arg(self.haproxy_config_path()).arg("-db");
        let child = self.spawn(command, &self.haproxy_log, &self.haproxy_pid_file)?;
        *lock(&self.haproxy) = Some(child);
        Ok(())
    }

    /// An error if a process of the cluster has exited (with its log's tail).
    fn check_running(&self) -> Result<(), HarnessError> {
        let exited = |slot: &Mutex<Option<Child>>| {
            lock(slot)
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
        };
        if let Some(status) = exited(&self.etcd) {
            return Err(self.error(format!("'s etcd exited ({status})"), &[&self.etcd_log]));
        }
        if let Some(status) = exited(&self.haproxy) {
            return Err(self.error(
                format!("'s HAProxy exited ({status})"),
                &[&self.haproxy_log],
            ));
        }
        for node in &self.nodes {
            if let Some(status) = exited(&node.patroni) {
                return Err(self.error(
                    format!("'s Patroni of node {} exited ({status})", node.name),
                    &[&node.log],
                ));
            }
        }
        Ok(())
    }

    /// `Ok` when the cluster is ready (see [`wait_until_ready`](Self::wait_until_ready)),
    /// else why not.
    fn readiness(&self) -> Result<(), String> {
        let leader = self
            .leader()
            .map_err(|error| error.to_string())?
            .ok_or("no node holds the leader key")?;
        let through_haproxy = self
            .query_one(self.haproxy_primary_port, "select pg_is_in_recovery()")
            .map_err(|error| format!("HAProxy's primary port: {error}"))?;
        if through_haproxy != "f" {
            return Err("HAProxy's primary port reaches a standby".to_owned());
        }
        if self.nodes.len() == 1 {
            return Ok(());
        }
        let replication = self.replication(leader)?;
        for (index, node) in self.nodes.iter().enumerate() {
            if index == leader {
                continue;
            }
            match replication.iter().find(|row| row.0 == node.name) {
                Some(row) if row.1 == "streaming" => {}
                Some(row) => return Err(format!("{} is {}", node.name, row.1)),
                None => return Err(format!("{} does not stream yet", node.name)),
            }
        }
        if self.synchronous {
            // Patroni names the sync standby in PostgreSQL a moment before it records it in
            // etcd (its `/sync` key, which decides whom a failover may promote): wait for both.
            let chosen = self
                .sync_standby()
                .map_err(|error| error.to_string())?
                .ok_or("Patroni has recorded no sync standby yet")?;
            let name = &self.nodes[chosen].name;
            if !replication
                .iter()
                .any(|row| &row.0 == name && row.2 == "sync")
            {
                return Err(format!("{name} is not yet a sync standby in PostgreSQL"));
            }
        }
        let through_replicas = self
            .query_one(self.haproxy_replica_port, "select pg_is_in_recovery()")
            .map_err(|error| format!("HAProxy's replica port: {error}"))?;
        if through_replicas != "t" {
            return Err("HAProxy's replica port reaches the primary".to_owned());
        }
        Ok(())
    }

    /// `(application_name, state, sync_state)` of every standby connected to `leader`.
    fn replication(&self, leader: usize) -> Result<Vec<(String, String, String)>, String> {
        let rows = wire::simple_query(
            self.nodes[leader].pg_port,
            "select application_name, state, sync_state from pg_stat_replication",
        )?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
                (text(0), text(1), text(2))
            })
            .collect())
    }

    /// The one value `sql` returns on `127.0.0.1:port`.
    fn query_one(&self, port: u16, sql: &str) -> Result<String, String> {
        let rows = wire::simple_query(port, sql)?;
        rows.into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
            .ok_or_else(|| format!("`{sql}` returned nothing"))
    }

    /// The value of Patroni's key `key` in etcd (v2 API), `None` if it does not exist.
    fn dcs_key(&self, key: &str) -> Result<Option<String>, String> {
        let path = format!("/v2/keys/service/{SCOPE}/{key}");
        match http_get(self.etcd_port, &path)? {
            (200, body) => {
                let value: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|error| format!("etcd's answer for {path} is not JSON: {error}"))?;
                Ok(value
                    .pointer("/node/value")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned))
            }
            (404, _) => Ok(None),
            (status, body) => Err(format!("etcd answered {status} for {path}: {body}")),
        }
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// The pid in `postmaster.pid` of `node`, if that process runs PostgreSQL on its data
    /// directory.
    fn postmaster_pid(&self, node: &Node) -> Option<u32> {
        let text = fs::read_to_string(node.postmaster_pid_file()).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let data_dir = node.data_dir.to_string_lossy();
        let ours = String::from_utf8_lossy(&cmdline).contains(data_dir.as_ref());
        (ours && alive(pid)).then_some(pid)
    }

    /// Node `node`'s Patroni and postmaster, each with all its descendants.
    fn node_processes(&self, node: &Node) -> Vec<u32> {
        let patroni = lock(&node.patroni).as_ref().map(Child::id);
        let roots: Vec<u32> = patroni
            .into_iter()
            .chain(self.postmaster_pid(node))
            .collect();
        process_trees(&roots)
    }

    fn all_logs(&self) -> Vec<&Path> {
        self.nodes
            .iter()
            .map(|node| node.log.as_path())
            .chain([self.etcd_log.as_path(), self.haproxy_log.as_path()])
            .collect()
    }

    /// Whether a start failed because a port chosen was taken meanwhile.
    fn port_was_taken(&self) -> bool {
        self.all_logs().iter().any(|log| {
            fs::read_to_string(log)
                .map(|text| text.to_ascii_lowercase().contains("address already in use"))
                .unwrap_or(false)
        })
    }

    /// [`HarnessError::PatroniCluster`] with the tails of `logs`.
    fn error(&self, what: String, logs: &[&Path]) -> HarnessError {
        HarnessError::PatroniCluster {
            what,
            log_tails: tails(logs),
        }
    }

    /// [`HarnessError::PatroniCluster`] without logs.
    fn plain_error(&self, what: String) -> HarnessError {
        HarnessError::PatroniCluster {
            what,
            log_tails: String::new(),
        }
    }

    /// The text of node `node`'s Patroni configuration.
    fn patroni_config(&self, node: &Node, options: &PatroniOptions) -> String {
        let mut parameters: Vec<(String, String)> = [
            ("fsync", "off"),
            ("synchronous_commit", "on"),
            // pg_rewind needs full page writes.
            ("full_page_writes", "on"),
            ("max_connections", "100"),
            ("shared_buffers", "32MB"),
            ("wal_keep_size", "64MB"),
        ]
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
        for (name, value) in &options.parameters {
            match parameters.iter_mut().find(|(known, _)| known == name) {
                Some(entry) => entry.1 = value.clone(),
                None => parameters.push((name.clone(), value.clone())),
            }
        }
        let parameters: String = parameters
            .iter()
            .map(|(name, value)| format!("        {name}: {}\n", yaml_string(value)))
            .collect();
        let run = self.run_dir();
        format!(
            "scope: {SCOPE}\n\
             namespace: /service/\n\
             name: {name}\n\
             restapi:\n  listen: 127.0.0.1:{rest}\n  connect_address: 127.0.0.1:{rest}\n\
             etcd:\n  host: 127.0.0.1:{etcd}\n\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: 10\n\
             \x20   loop_wait: 1\n\
             \x20   retry_timeout: 3\n\
             \x20   # Fail a crashed primary over instead of restarting it in place for 300 s.\n\
             \x20   primary_start_timeout: 0\n\
             \x20   maximum_lag_on_failover: 1048576\n\
             \x20   synchronous_mode: {synchronous}\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     use_slots: true\n\
             \x20     parameters:\n\
             {parameters}\
             \x20 initdb:\n  - encoding: UTF8\n  - locale: C.UTF-8\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n\
             \x20 bin_dir: {bin}\n\
             \x20 pgpass: {pgpass}\n\
             \x20 pg_hba:\n\
             \x20 - host replication replicator 127.0.0.1/32 trust\n\
             \x20 - host all all 127.0.0.1/32 trust\n\
             \x20 - local all all trust\n\
             \x20 authentication:\n\
             \x20   superuser: {{username: {SUPERUSER}, password: {SUPERUSER}}}\n\
             \x20   replication: {{username: replicator, password: replicator}}\n\
             \x20   rewind: {{username: rewinder, password: rewinder}}\n\
             \x20 parameters:\n\
             \x20   unix_socket_directories: {socket}\n\
             \x20 basebackup:\n  - checkpoint: fast\n\
             watchdog:\n  mode: 'off'\n",
            name = node.name,
            rest = node.rest_port,
            etcd = self.etcd_port,
            synchronous = self.synchronous,
            pg = node.pg_port,
            data = yaml_string(&node.data_dir.to_string_lossy()),
            bin = yaml_string(&self.programs.pg_bin_dir.to_string_lossy()),
            pgpass = yaml_string(&run.join(format!("pgpass-{}", node.name)).to_string_lossy()),
            socket = yaml_string(&run.to_string_lossy()),
        )
    }

    /// The text of HAProxy's configuration: a port routed by Patroni's `/primary` check and
    /// one by its `/replica` check. `retries 0`: after a failover the client retries
    /// itself, which is faster than HAProxy's own retries. Servers marked down have their
    /// sessions cut.
    fn haproxy_config(&self) -> String {
        let servers: String = self
            .nodes
            .iter()
            .map(|node| {
                format!(
                    "    server {} 127.0.0.1:{} check port {}\n",
                    node.name, node.pg_port, node.rest_port
                )
            })
            .collect();
        let listen = |name: &str, port: u16, check: &str| {
            format!(
                "listen {name}\n\
                 \x20   bind 127.0.0.1:{port}\n\
                 \x20   balance roundrobin\n\
                 \x20   option httpchk OPTIONS {check}\n\
                 \x20   http-check expect status 200\n\
                 \x20   default-server inter 500ms fastinter 250ms fall 2 rise 1 \
                 on-marked-down shutdown-sessions\n\
                 {servers}\n"
            )
        };
        format!(
            "global\n\
             \x20   maxconn 2000\n\
             \n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   retries 0\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 30m\n\
             \x20   timeout server 30m\n\
             \x20   timeout check 1s\n\
             \n\
             {}{}",
            listen("primary", self.haproxy_primary_port, "/primary"),
            listen("replicas", self.haproxy_replica_port, "/replica"),
        )
    }

    /// The fast teardown: SIGKILL to Patroni (so that it restarts nothing) and HAProxy,
    /// SIGQUIT to each postmaster (immediate shutdown; SIGCONT too, for a paused node),
    /// SIGTERM to etcd; then the directory goes. Under a second.
    fn teardown(&self) {
        for node in 0..self.nodes.len() {
            let _ = self.kill_patroni(node);
        }
        if let Some(mut child) = lock(&self.haproxy).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut postgres = Vec::new();
        for node in &self.nodes {
            if let Some(pid) = self.postmaster_pid(node) {
                let tree = process_trees(&[pid]);
                let _ = process::send_signal(pid, "QUIT");
                let _ = signal_all(&tree, "CONT");
                postgres.extend(tree);
            }
        }
        if let Some(mut child) = lock(&self.etcd).take() {
            let _ = process::stop(&mut child, "TERM", TEARDOWN_TIMEOUT);
        }
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        while postgres.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let left: Vec<u32> = postgres.into_iter().filter(|&pid| alive(pid)).collect();
        let _ = signal_all(&left, "KILL");
    }
}

impl Drop for TestPatroniCluster {
    fn drop(&mut self) {
        self.teardown();
        // Our own cleanup is done: the reaper is not needed any more.
        self.reaper = None;
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `text` as a single-quoted YAML scalar.
fn yaml_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The last lines of each of `logs`, each under a heading with its path.
fn tails(logs: &[&Path]) -> String {
    logs.iter()
        .map(|log| {
            format!(
                "\n--- last lines of {}:\n{}",
                log.display(),
                process::log_tail(log)
            )
        })
        .collect()
}

/// Patroni's `/history` value: `[[timeline, lsn, reason, timestamp?, new_leader?], …]`.
fn parse_history(text: &str) -> Option<Vec<TimelineSwitch>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value
        .as_array()?
        .iter()
        .map(|entry| {
            let entry = entry.as_array()?;
            let promoted_at = entry
                .get(3)
                .and_then(serde_json::Value::as_str)
                .and_then(|time| chrono::DateTime::parse_from_rfc3339(time).ok())
                .map(SystemTime::from);
            Some(TimelineSwitch {
                timeline: u32::try_from(entry.first()?.as_u64()?).ok()?,
                lsn: entry.get(1)?.as_u64()?,
                reason: entry.get(2)?.as_str().unwrap_or_default().to_owned(),
                promoted_at,
                new_leader: entry
                    .get(4)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
            })
        })
        .collect()
}

/// `GET path` over HTTP/1.0 from `127.0.0.1:port` (etcd, or a Patroni REST API): the status
/// and the body. Waits 1 s to connect and 2 s for the answer, so a hung node fails rather
/// than blocks.
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let failed = |error: std::io::Error| format!("GET http://{address}{path}: {error}");
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(1)).map_err(failed)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(failed)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(failed)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .map_err(failed)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(failed)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET http://{address}{path}: no HTTP status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// `roots` and all their descendants (from `/proc`).
fn process_trees(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let parent = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if let Some(parent) = parent {
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut found: Vec<u32> = roots.to_vec();
    let mut next = 0;
    while next < found.len() {
        if let Some(kids) = children.get(&found[next]) {
            found.extend(kids.iter().filter(|kid| !roots.contains(kid)));
        }
        next += 1;
    }
    found
}

/// Sends `signal` to each of `pids` at once (one `kill`); processes that are gone are
/// skipped.
fn signal_all(pids: &[u32], signal: &str) -> Result<(), HarnessError> {
    if pids.is_empty() {
        return Ok(());
    }
    Command::new("sh")
        .args([
            "-c",
            "signal=$1; shift; kill -s \"$signal\" \"$@\" 2>/dev/null; exit 0",
            "sh",
            signal,
        ])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .status()
        .map_err(HarnessError::io(format!("could not run kill -s {signal}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_parsed() {
        let text = r#"[[1, 50331808, "no recovery target specified", "2026-12-06T13:10:01.250000+00:00", "n2"], [2, 83886240, "no recovery target specified"]]"#;
        let history = parse_history(text).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].timeline, 1);
        assert_eq!(history[0].lsn, 50331808);
        assert_eq!(history[0].new_leader.as_deref(), Some("n2"));
        let at = history[0].promoted_at.unwrap();
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((seconds - 1_796_562_601.25).abs() < 0.001, "{seconds}");
        assert_eq!(history[1].promoted_at, None);
        assert_eq!(history[1].new_leader, None);
        assert!(parse_history("{}").is_none());
    }

    #[test]
    fn a_missing_program_names_its_package() {
        let error = HarnessError::NoClusterComponent {
            program: "etcd",
            looked_in: "/usr/bin, /usr/local/bin",
            package: "etcd-server",
        };
        let message = error.to_string();
        assert!(message.contains("`etcd`"), "{message}");
        assert!(message.contains("apt-get install etcd-server"), "{message}");
    }

    #[test]
    fn yaml_strings_are_quoted() {
        assert_eq!(yaml_string("off"), "'off'");
        assert_eq!(yaml_string("it's"), "'it''s'");
    }

    #[test]
    fn process_trees_include_descendants() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let tree = loop {
            let tree = process_trees(&[child.id()]);
            if tree.len() >= 2 || Instant::now() > deadline {
                break tree;
            }
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(tree[0], child.id());
        assert!(tree.len() >= 2, "{tree:?}");
        signal_all(&tree, "KILL").unwrap();
        let _ = child.wait();
        // The orphaned `sleep` dies a moment after the signal.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tree.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(tree.iter().all(|&pid| !alive(pid)), "{tree:?}");
    }
}
