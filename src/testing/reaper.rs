//! The reaper: a detached shell process per throwaway server, PgBouncer or Patroni cluster
//! that waits for the test process to be gone (however it ends, SIGKILL included), then
//! stops what the test process left running and deletes its files.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::HarnessError;

/// The reapers' shell function `alive PID`: whether the process runs (a zombie does not),
/// written once for both scripts.
macro_rules! alive_function {
    () => {
        r#"alive() {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        state=$(sed -e 's/^.*) //' -e 's/ .*$//' "/proc/$1/stat" 2>/dev/null)
        [ "$state" != Z ] || return 1
    fi
    return 0
}
"#
    };
}

/// The reaper's shell script: waits until the test process (`$1`) is gone, then stops the
/// process `$5` (a pid, or a file whose first line is one) if it still runs with `$3` on
/// its command line (signal `$4`, then SIGKILL after 10 s), and removes `$2`.
const REAPER_SCRIPT: &str = concat!(
    r#"# plane-db test server reaper
owner=$1
dir=$2
marker=$3
signal=$4
target=$5
"#,
    alive_function!(),
    r#"ours() {
    [ -r "/proc/$1/cmdline" ] || return 0
    tr '\000' '\n' < "/proc/$1/cmdline" | grep -qxF -- "$marker"
}
while alive "$owner"; do sleep 1; done
case "$target" in
    ''|*[!0-9]*) pid=$(head -n 1 "$target" 2>/dev/null) ;;
    *) pid=$target ;;
esac
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && alive "$pid" && ours "$pid"; then
    kill -"$signal" "$pid" 2>/dev/null
    i=0
    while alive "$pid" && [ "$i" -lt 100 ]; do
        sleep 0.1 2>/dev/null || sleep 1
        i=$((i + 1))
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; sleep 1; fi
fi
rm -rf "$dir"
"#
);

/// The reaper's shell script for a Patroni cluster: waits until the test process (`$1`) is
/// gone, then, for each further argument `SIGNAL=PIDFILE` in order, sends `SIGNAL` to the
/// process named by the first line of `PIDFILE` if it still runs with the cluster's
/// directory `$2` in its command line, and SIGCONT to it and its children (a paused node
/// must wake up to act on the signal and to end its children). After 10 s whatever of them
/// is left gets SIGKILL; then `$2` is removed.
const CLUSTER_REAPER_SCRIPT: &str = concat!(
    r#"# plane-db test cluster reaper
owner=$1
dir=$2
shift 2
"#,
    alive_function!(),
    r#"ours() {
    [ -r "/proc/$1/cmdline" ] || return 0
    tr '\000' '\n' < "/proc/$1/cmdline" | grep -qF -- "$dir"
}
children() {
    parent=$1
    for stat in /proc/[0-9]*/stat; do
        { read -r line < "$stat"; } 2>/dev/null || continue
        set -- ${line##*) }
        if [ "$2" = "$parent" ]; then
            child=${stat#/proc/}
            echo "${child%/stat}"
        fi
    done
}
while alive "$owner"; do sleep 1; done
pids=
for target in "$@"; do
    signal=${target%%=*}
    pid=$(head -n 1 "${target#*=}" 2>/dev/null)
    case "$pid" in ''|*[!0-9]*) continue ;; esac
    if alive "$pid" && ours "$pid"; then
        kids=$(children "$pid")
        kill -"$signal" "$pid" 2>/dev/null
        kill -CONT "$pid" $kids 2>/dev/null
        pids="$pids $pid $kids"
    fi
done
i=0
while [ -n "$pids" ] && [ "$i" -lt 100 ]; do
    left=
    for pid in $pids; do
        if alive "$pid"; then left="$left $pid"; fi
    done
    pids=$left
    if [ -n "$pids" ]; then sleep 0.1 2>/dev/null || sleep 1; fi
    i=$((i + 1))
done
if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; sleep 1; fi
rm -rf "$dir"
"#
);

/// A running reaper. Dropping it ends the reaper (the owner of the files it was to remove
/// cleans them up itself); a reaper that is never dropped, like the process-wide server's,
/// does its work once this process has exited.
#[derive(Debug)]
pub(super) struct Reaper(Child);

impl Reaper {
    /// The reaper of a throwaway server in `root`: the postmaster named by
    /// `root/data/postmaster.pid` gets a SIGINT (a fast shutdown), then `root` goes.
    pub(super) fn for_postgres(root: &Path) -> Result<Reaper, HarnessError> {
        let data = root.join("data");
        Reaper::spawn(
            "the throwaway PostgreSQL server",
            root,
            &data,
            "INT",
            data.join("postmaster.pid").as_os_str(),
        )
    }

    /// The reaper of a test PgBouncer in `root`, running as `pid` with the configuration
    /// file `config`: it gets a SIGTERM (PgBouncer's immediate shutdown), then `root` goes.
    pub(super) fn for_pgbouncer(
        root: &Path,
        config: &Path,
        pid: u32,
    ) -> Result<Reaper, HarnessError> {
        Reaper::spawn(
            "the test PgBouncer",
            root,
            config,
            "TERM",
            OsStr::new(&pid.to_string()),
        )
    }

    /// The reaper of a Patroni test cluster in `root`: each `(signal, pid file)` of
    /// `targets`, in order, names a process of the cluster and how to stop it (see
    /// [`CLUSTER_REAPER_SCRIPT`]); then `root` goes. The pid files are read only when the
    /// reaper acts, so a process restarted since then is found by its new pid.
    pub(super) fn for_cluster(
        root: &Path,
        targets: &[(&str, PathBuf)],
    ) -> Result<Reaper, HarnessError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(CLUSTER_REAPER_SCRIPT)
            .arg("plane-db-cluster-reaper")
            .arg(std::process::id().to_string())
            .arg(root);
        for (signal, pid_file) in targets {
            let mut target = OsString::from(format!("{signal}="));
            target.push(pid_file);
            command.arg(target);
        }
        Reaper::start(command, "the Patroni test cluster")
    }

    /// Starts [`REAPER_SCRIPT`]: once this process has exited, it stops `target` (a pid or
    /// a pid file) if it runs with `marker` on its command line, and removes `root`.
    fn spawn(
        what: &str,
        root: &Path,
        marker: &Path,
        signal: &str,
        target: &OsStr,
    ) -> Result<Reaper, HarnessError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("plane-db-reaper")
            .arg(std::process::id().to_string())
            .arg(root)
            .arg(marker)
            .arg(signal)
            .arg(target);
        Reaper::start(command, what)
    }

    /// Runs one of the reaper scripts, detached from this process's terminal and group.
    fn start(mut command: Command, what: &str) -> Result<Reaper, HarnessError> {
        let child = command
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(HarnessError::io(format!(
                "could not start the cleanup process for {what} (sh)"
            )))?;
        Ok(Reaper(child))
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
