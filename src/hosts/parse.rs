//! Reading a URL that may list several hosts, as libpq does; sqlx reads the rest.

use super::{HostEntry, HostList, LoadBalanceHosts, TargetSessionAttrs, DEFAULT_CONNECT_TIMEOUT};
use crate::error::{Error, Result};
use sqlx::postgres::PgConnectOptions;
use std::time::Duration;

/// A URL read: sqlx's options for its first host, and its hosts when it needs more than
/// sqlx does (several hosts, `target_session_attrs`, `load_balance_hosts`).
#[derive(Debug, Clone)]
pub(crate) struct ParsedUrl {
    pub(crate) options: PgConnectOptions,
    pub(crate) hosts: Option<HostList>,
}

/// The parameters this module reads itself, and that sqlx does not get (it would ignore
/// the last three, and take only one host).
const OURS: [&str; 5] = [
    "host",
    "port",
    "target_session_attrs",
    "load_balance_hosts",
    "connect_timeout",
];

/// Reads `url` (argument `argument` of the caller, named in errors): a `postgres://` or
/// `postgresql://` URL, whose host part and `host` parameter may list several hosts.
pub(crate) fn parse_url(argument: &'static str, url: &str) -> Result<ParsedUrl> {
    let invalid = |reason: String| Error::InvalidArgument { argument, reason };
    let Some((scheme, rest)) = url.split_once("://") else {
        let reason = if url.contains('=') {
            "must be a postgres:// or postgresql:// URL (the key/value form `host=… \
             dbname=…` is not accepted)"
        } else {
            "must be a postgres:// or postgresql:// URL"
        };
        return Err(invalid(reason.to_string()));
    };
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return Err(invalid(
            "must be a postgres:// or postgresql:// URL".to_string(),
        ));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host_part) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, query),
        None => (tail, ""),
    };

    let mut kept = Vec::new();
    let mut params = Params::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key).map_err(&invalid)?;
        if OURS.contains(&key.as_str()) {
            let value = decode(value).map_err(&invalid)?;
            params.set(&key, value);
        } else {
            kept.push(pair);
        }
    }

    let mut hosts = match &params.host {
        // libpq: a `host` parameter wins over the URL's host part; its entries are names,
        // addresses or socket directories, without ports.
        Some(list) => list
            .split(',')
            .map(|host| (non_empty(host.to_string()), None))
            .collect::<Vec<_>>(),
        None => split_hosts(host_part).map_err(&invalid)?,
    };
    if let Some(list) = &params.port {
        let ports = list
            .split(',')
            .map(|port| parse_port(port).map_err(&invalid))
            .collect::<Result<Vec<_>>>()?;
        if ports.len() == 1 {
            for host in &mut hosts {
                host.1 = ports[0];
            }
        } else if ports.len() == hosts.len() {
            for (host, port) in hosts.iter_mut().zip(ports) {
                host.1 = port;
            }
        } else {
            return Err(invalid(format!(
                "{} ports given for {} hosts (give one port, or one per host)",
                ports.len(),
                hosts.len()
            )));
        }
    }
    let target = match &params.target {
        None => TargetSessionAttrs::Any,
        Some(value) => TargetSessionAttrs::parse(value).ok_or_else(|| {
            invalid(format!(
                "target_session_attrs={value:?} is not one of any, read-write, read-only, \
                 primary, standby, prefer-standby"
            ))
        })?,
    };
    let load_balance = match params.load_balance.as_deref() {
        None | Some("disable") => LoadBalanceHosts::Disable,
        Some("random") => LoadBalanceHosts::Random,
        Some(value) => {
            return Err(invalid(format!(
                "load_balance_hosts={value:?} is not one of disable, random"
            )))
        }
    };
    let connect_timeout = match params.connect_timeout.as_deref() {
        None => Some(DEFAULT_CONNECT_TIMEOUT),
        Some(value) => match value.trim().parse::<i64>() {
            // libpq: zero or less waits without limit; below 2 s means 2 s.
            Ok(seconds) if seconds <= 0 => None,
            Ok(seconds) => Some(Duration::from_secs(seconds.max(2) as u64)),
            Err(_) => {
                return Err(invalid(format!(
                    "connect_timeout={value:?} is not a whole number of seconds"
                )))
            }
        },
    };

    // sqlx reads everything else: the user, the password, the database and the other
    // parameters, from the URL with a placeholder host (each host is set afterwards).
    let mut single = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        single.push_str(userinfo);
        single.push('@');
    }
    single.push_str("localhost");
    single.push_str(path);
    if !kept.is_empty() {
        single.push('?');
        single.push_str(&kept.join("&"));
    }
    let base: PgConnectOptions = single.parse().map_err(|error: sqlx::Error| {
        // sqlx's message names what is wrong, not the URL (which may hold a password).
        invalid(error.to_string())
    })?;
    let list = HostList {
        hosts,
        target,
        load_balance,
        connect_timeout,
    };
    let plain = list.hosts.len() == 1
        && target == TargetSessionAttrs::Any
        && load_balance == LoadBalanceHosts::Disable;
    if plain {
        // One host, any server: exactly what sqlx makes of the URL, as before multi-host
        // URLs were read.
        let options = url
            .parse()
            .map_err(|error: sqlx::Error| invalid(error.to_string()))?;
        return Ok(ParsedUrl {
            options,
            hosts: None,
        });
    }
    Ok(ParsedUrl {
        options: list.options_for(&base, 0),
        hosts: Some(list),
    })
}

impl HostList {
    /// `base` pointed at host `index` (whose `None`s are the defaults, as sqlx computes
    /// them from the environment).
    pub(crate) fn options_for(&self, base: &PgConnectOptions, index: usize) -> PgConnectOptions {
        let (host, port) = &self.hosts[index];
        let defaults = || PgConnectOptions::new_without_pgpass();
        let port = port.unwrap_or_else(|| defaults().get_port());
        let host = host
            .clone()
            .unwrap_or_else(|| defaults().get_host().to_string());
        // A host starting with `/` is a socket directory, which sqlx connects to by itself.
        base.clone().host(&host).port(port)
    }

    /// `host:port` of host `index`, for messages.
    pub(crate) fn describe(&self, index: usize) -> String {
        let (host, port) = &self.hosts[index];
        let host = host.as_deref().unwrap_or("(default host)");
        let shown = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        match port {
            Some(port) => format!("{shown}:{port}"),
            None => shown,
        }
    }
}

#[derive(Default)]
struct Params {
    host: Option<String>,
    port: Option<String>,
    target: Option<String>,
    load_balance: Option<String>,
    connect_timeout: Option<String>,
}

impl Params {
    fn set(&mut self, key: &str, value: String) {
        let slot = match key {
            "host" => &mut self.host,
            "port" => &mut self.port,
            "target_session_attrs" => &mut self.target,
            "load_balance_hosts" => &mut self.load_balance,
            _ => &mut self.connect_timeout,
        };
        *slot = Some(value);
    }
}

/// The URL's host part: `host[:port]` entries separated by commas, an IPv6 address in
/// brackets, names percent-encoded (a socket directory as `%2Fvar%2Frun%2Fpostgresql`).
/// An empty part is one entry with the defaults.
fn split_hosts(part: &str) -> std::result::Result<Vec<HostEntry>, String> {
    part.split(',')
        .map(|entry| {
            let (host, port) = if let Some(bracketed) = entry.strip_prefix('[') {
                let (address, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| format!("host {entry:?} has `[` without `]`"))?;
                let port =
                    match after {
                        "" => None,
                        _ => Some(after.strip_prefix(':').ok_or_else(|| {
                            format!("host {entry:?}: expected `:port` after `]`")
                        })?),
                    };
                (address.to_string(), port)
            } else {
                match entry.rsplit_once(':') {
                    Some((host, port)) => (decode(host)?, Some(port)),
                    None => (decode(entry)?, None),
                }
            };
            let port = match port {
                Some(port) => parse_port(port)?,
                None => None,
            };
            Ok((non_empty(host), port))
        })
        .collect()
}

fn parse_port(port: &str) -> std::result::Result<Option<u16>, String> {
    if port.is_empty() {
        return Ok(None);
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Percent-decoding (`+` stays `+`, as libpq reads it).
fn decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{text:?} has a bad percent-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> Vec<(Option<String>, Option<u16>)> {
        let parsed = parse_url("url", url).unwrap();
        match parsed.hosts {
            Some(list) => list.hosts,
            None => vec![(
                Some(parsed.options.get_host().to_string()),
                Some(parsed.options.get_port()),
            )],
        }
    }

    fn h(host: &str, port: Option<u16>) -> (Option<String>, Option<u16>) {
        (Some(host.to_string()), port)
    }

    fn refused(url: &str) -> String {
        match parse_url("url", url) {
            Err(Error::InvalidArgument { argument, reason }) => {
                assert_eq!(argument, "url");
                reason
            }
            other => panic!("{url}: {other:?}"),
        }
    }

    /// libpq's documented URI examples (section "Connection URIs") read as libpq reads them.
    #[test]
    fn libpq_examples() {
        assert_eq!(
            hosts("postgresql://localhost"),
            [h("localhost", Some(5432))]
        );
        assert_eq!(
            hosts("postgresql://localhost:5433"),
            [h("localhost", Some(5433))]
        );
        let parsed = parse_url("url", "postgresql://localhost/mydb").unwrap();
        assert_eq!(parsed.options.get_database(), Some("mydb"));
        let parsed = parse_url("url", "postgresql://user@localhost").unwrap();
        assert_eq!(parsed.options.get_username(), "user");
        let parsed = parse_url(
            "url",
            "postgresql://other@localhost/otherdb?connect_timeout=10&application_name=myapp",
        )
        .unwrap();
        assert_eq!(parsed.options.get_username(), "other");
        assert_eq!(parsed.options.get_database(), Some("otherdb"));
        assert_eq!(parsed.options.get_application_name(), Some("myapp"));
        assert!(parsed.hosts.is_none(), "one host, any server: sqlx alone");

        let parsed = parse_url(
            "url",
            "postgresql://host1:123,host2:456/somedb?target_session_attrs=any&application_name=myapp",
        )
        .unwrap();
        let list = parsed.hosts.unwrap();
        assert_eq!(list.hosts, [h("host1", Some(123)), h("host2", Some(456))]);
        assert_eq!(list.target, TargetSessionAttrs::Any);
        assert_eq!(list.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(parsed.options.get_host(), "host1");
        assert_eq!(parsed.options.get_port(), 123);
        assert_eq!(parsed.options.get_database(), Some("somedb"));
        assert_eq!(parsed.options.get_application_name(), Some("myapp"));

        assert_eq!(
            hosts("postgresql://[2001:db8::1234]:5433,[::1]/database?target_session_attrs=primary"),
            [h("2001:db8::1234", Some(5433)), h("::1", None)]
        );
        // A socket directory, in the `host` parameter or percent-encoded in the host part.
        let parsed = parse_url(
            "url",
            "postgresql:///dbname?host=/var/lib/postgresql&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            parsed.hosts.unwrap().hosts,
            [h("/var/lib/postgresql", None)]
        );
        assert_eq!(parsed.options.get_host(), "/var/lib/postgresql");
        assert_eq!(
            hosts("postgresql://%2Fvar%2Flib%2Fpostgresql,db2/dbname?target_session_attrs=standby"),
            [h("/var/lib/postgresql", None), h("db2", None)]
        );
    }

    #[test]
    fn host_and_port_parameters() {
        assert_eq!(
            hosts("postgres://u@/db?host=a,b,c&port=5432"),
            [h("a", Some(5432)), h("b", Some(5432)), h("c", Some(5432))]
        );
        assert_eq!(
            hosts("postgres://u@x:1/db?host=a,b&port=5433,5434"),
            [h("a", Some(5433)), h("b", Some(5434))]
        );
        assert_eq!(
            hosts("postgres://u@a:1,b/db?port=7"),
            [h("a", Some(7)), h("b", Some(7))]
        );
        let reason = refused("postgres://u@/db?host=a,b,c&port=1,2");
        assert!(reason.contains("2 ports given for 3 hosts"), "{reason}");
    }

    #[test]
    fn parameters_are_checked() {
        for target in [
            "any",
            "read-write",
            "read-only",
            "primary",
            "standby",
            "prefer-standby",
        ] {
            let url = format!("postgres://a,b/db?target_session_attrs={target}");
            let list = parse_url("url", &url).unwrap().hosts.unwrap();
            assert_eq!(list.target.as_str(), target);
        }
        let reason = refused("postgres://a,b/db?target_session_attrs=master");
        assert!(reason.contains("\"master\""), "{reason}");
        let list = parse_url("url", "postgres://a,b/db?load_balance_hosts=random")
            .unwrap()
            .hosts
            .unwrap();
        assert_eq!(list.load_balance, LoadBalanceHosts::Random);
        assert!(refused("postgres://a,b/db?load_balance_hosts=yes").contains("disable, random"));
        let timeout = |value: &str| {
            parse_url("url", &format!("postgres://a,b/db?connect_timeout={value}"))
                .unwrap()
                .hosts
                .unwrap()
                .connect_timeout
        };
        assert_eq!(timeout("10"), Some(Duration::from_secs(10)));
        assert_eq!(
            timeout("1"),
            Some(Duration::from_secs(2)),
            "libpq's minimum"
        );
        assert_eq!(timeout("0"), None, "libpq: no limit");
        assert!(refused("postgres://a,b/db?connect_timeout=soon").contains("soon"));
        // A single host with a target is checked too.
        let list = parse_url("url", "postgres://a/db?target_session_attrs=read-write")
            .unwrap()
            .hosts
            .unwrap();
        assert_eq!(list.hosts, [h("a", None)]);
    }

    #[test]
    fn bad_urls_say_why() {
        assert!(refused("mysql://h/db").contains("postgres://"));
        assert!(refused("host=db1 port=5432 dbname=plane").contains("key/value"));
        assert!(refused("postgres://a:99999,b/db").contains("99999"));
        assert!(refused("postgres://a:x,b/db").contains("\"x\""));
        assert!(refused("postgres://[::1,b/db").contains("without `]`"));
        assert!(refused("postgres://a%zz,b/db").contains("percent"));
    }

    #[test]
    fn the_password_stays_out_of_messages() {
        let parsed = parse_url("url", "postgres://u:hunter2@a:1,b:2/db?sslmode=require").unwrap();
        let list = parsed.hosts.unwrap();
        assert_eq!(list.describe(0), "a:1");
        assert_eq!(list.describe(1), "b:2");
        assert_eq!(parsed.options.get_username(), "u");
        let reason = refused("postgres://u:hunter2@a:1,b:2/db?sslmode=sometimes");
        assert!(!reason.contains("hunter2"), "{reason}");
    }
}
