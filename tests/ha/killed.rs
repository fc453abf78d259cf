//! A test process that dies by SIGKILL while it owns a Patroni cluster leaves nothing
//! behind: the harness's reaper stops etcd, every Patroni, every PostgreSQL process (also
//! of a paused node) and HAProxy, and removes the cluster's directory.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plane_db::testing::{PatroniOptions, TestPatroniCluster};

/// Set in the child process: the file to write the cluster's directory to.
const OWNER_ENV: &str = "PLANE_DB_HA_CLUSTER_OWNER";
/// The test the child runs, selected with `--exact`.
const OWNER_TEST: &str = "killed::cluster_owner";

/// The child's side: starts a cluster, pauses one node (the reaper must wake it to stop
/// it), says where the cluster lives and waits to be killed. Does nothing (and passes) in
/// an ordinary run.
#[test]
fn cluster_owner() {
    let Some(report) = std::env::var_os(OWNER_ENV) else {
        return;
    };
    let cluster = TestPatroniCluster::start(&PatroniOptions::new(false)).unwrap();
    let standby = (0..cluster.node_count())
        .find(|&node| Some(node) != cluster.leader().unwrap())
        .unwrap();
    cluster.pause(standby).unwrap();
    let temporary = PathBuf::from(&report).with_extension("tmp");
    fs::write(&temporary, cluster.root().as_os_str().as_encoded_bytes()).unwrap();
    fs::rename(&temporary, &report).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

/// `pid → parent pid` of every process.
fn parents() -> HashMap<u32, u32> {
    let mut parents = HashMap::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse().ok())
        {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// Whether `pid` runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(!stat.rsplit_once(") ")?.1.starts_with('Z')))
        .unwrap_or(false)
}

/// The processes of the cluster in `root`: those with `root` in their command line (etcd,
/// Patroni, HAProxy, the postmasters) and the postmasters' children.
fn cluster_processes(root: &Path) -> Vec<u32> {
    let root = root.to_string_lossy().into_owned();
    let parents = parents();
    let mut found: Vec<u32> = parents
        .keys()
        .copied()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(&root))
                .unwrap_or(false)
        })
        .collect();
    let named = found.clone();
    found.extend(
        parents
            .iter()
            .filter(|(_, parent)| named.contains(parent))
            .map(|(pid, _)| *pid),
    );
    found.sort_unstable();
    found.dedup();
    found
}

#[test]
fn a_killed_test_process_leaves_no_cluster_behind() {
    if std::env::var_os(OWNER_ENV).is_some() {
        return;
    }
    let _one = crate::failover::ONE_CLUSTER_AT_A_TIME.blocking_lock();
    let report = std::env::temp_dir().join(format!("plane-db-ha-owner-{}", std::process::id()));
    let _ = fs::remove_file(&report);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", OWNER_TEST, "--nocapture", "--test-threads=1"])
        .env(OWNER_ENV, &report)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let root = loop {
        if let Ok(text) = fs::read_to_string(&report) {
            break PathBuf::from(text);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the process owning the cluster exited ({status}) before it was ready");
        }
        assert!(Instant::now() < deadline, "the cluster did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = fs::remove_file(&report);
    let processes = cluster_processes(&root);
    // etcd, 3 Patroni, HAProxy and 3 postmasters at least, plus their server processes.
    assert!(processes.len() > 8, "{processes:?}");

    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<u32> = processes
            .iter()
            .copied()
            .filter(|&pid| alive(pid))
            .collect();
        let left_now = cluster_processes(&root);
        if left.is_empty() && left_now.is_empty() && !root.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the SIGKILL: processes {left:?} / {left_now:?} left, directory {} {}",
            root.display(),
            if root.exists() { "left" } else { "gone" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "FIGURES ha reaper: {} processes of a cluster (one node paused) gone and its \
         directory removed {:.2} s after the SIGKILL of the test process",
        processes.len(),
        killed.elapsed().as_secs_f64()
    );
}
