//! The command line: `--listen`, `--allowed-host`, `--cluster`, `--demo-drone` /
//! `--no-demo-drone`.

use plane_db::types::ClusterName;
use std::net::SocketAddr;

/// The address served when neither `--listen` nor `CONTROLLER_LISTEN` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The cluster the demo drone joins unless `--cluster` says otherwise.
pub const DEFAULT_CLUSTER: &str = "plane.example";

/// What `--help` prints.
pub const USAGE: &str = "\
usage: cargo run --example controller -- [--listen ADDR] [--allowed-host HOST]... [--cluster NAME] [--demo-drone | --no-demo-drone]

  --listen ADDR     address to serve on (env CONTROLLER_LISTEN; default 127.0.0.1:8080)
  --allowed-host HOST
                    another Host header to answer, as clients send it (name:port, or name
                    for port 80/443), e.g. a port-forward's or a reverse proxy's; repeatable
                    (env CONTROLLER_ALLOWED_HOSTS, comma-separated). Always answered: the
                    listen address, localhost:PORT, 127.0.0.1:PORT and [::1]:PORT
  --cluster NAME    the demo drone's cluster (default plane.example)
  --demo-drone      run a demo drone (the default without DATABASE_URL)
  --no-demo-drone   do not run one (the default with DATABASE_URL)

Uses DATABASE_URL's database, or a fresh database on a throwaway Postgres without it.";

/// Command-line options.
#[derive(Debug)]
pub struct Options {
    /// `--listen` (or `CONTROLLER_LISTEN`).
    pub listen: SocketAddr,
    /// `--allowed-host` (and `CONTROLLER_ALLOWED_HOSTS`): Host values answered besides the
    /// listen address's own.
    pub allowed_hosts: Vec<String>,
    /// `--cluster`.
    pub cluster: ClusterName,
    /// `None`: decided by where the database is.
    pub demo_drone: Option<bool>,
}

impl Options {
    /// Parses the arguments; `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
        let mut listen = std::env::var("CONTROLLER_LISTEN")
            .ok()
            .filter(|value| !value.trim().is_empty());
        let mut allowed_hosts: Vec<String> = std::env::var("CONTROLLER_ALLOWED_HOSTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|host| !host.is_empty())
            .map(str::to_string)
            .collect();
        let mut cluster = DEFAULT_CLUSTER.to_string();
        let mut demo_drone = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--listen" => listen = Some(args.next().ok_or("--listen needs an address")?),
                "--allowed-host" => {
                    allowed_hosts.push(args.next().ok_or("--allowed-host needs a host")?)
                }
                "--cluster" => cluster = args.next().ok_or("--cluster needs a name")?,
                "--demo-drone" => demo_drone = Some(true),
                "--no-demo-drone" => demo_drone = Some(false),
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        for host in &allowed_hosts {
            check_host(host)?;
        }
        let listen = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        Ok(Some(Options {
            listen: listen
                .trim()
                .parse()
                .map_err(|e| format!("invalid listen address {listen:?}: {e}"))?,
            cluster: cluster
                .parse()
                .map_err(|e| format!("invalid cluster {cluster:?}: {e}"))?,
            allowed_hosts,
            demo_drone,
        }))
    }
}

/// A Host header value: no scheme, path or spaces (`http://x` would never match a Host, and
/// the mistake would show only as refused requests).
fn check_host(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid --allowed-host {host:?}: expected a Host header value such as \
             controller.example.com or 127.0.0.1:9000"
        ))
    }
}
