//! Cluster-level identifiers: cluster names, drone pools, subdomains and
//! node ids.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Maximum length of a DNS label, in characters.
const MAX_LABEL_LEN: usize = 63;

/// Maximum length of a host name, in characters.
const MAX_HOST_LEN: usize = 253;

/// Checks one DNS label: 1..=63 ASCII letters, digits or `-`, not starting or
/// ending with `-`. Returns a description of the problem otherwise.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("is empty".to_owned());
    }
    if let Some((position, ch)) = label
        .chars()
        .enumerate()
        .find(|(_, ch)| !(ch.is_ascii_alphanumeric() || *ch == '-'))
    {
        return Err(format!(
            "has character {ch:?} at position {position}, which is not an ASCII letter, digit or '-'"
        ));
    }
    // Only ASCII is left, so bytes and characters coincide.
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "is {} characters long, but at most {MAX_LABEL_LEN} are allowed",
            label.len()
        ));
    }
    if label.starts_with('-') {
        return Err("starts with '-'".to_owned());
    }
    if label.ends_with('-') {
        return Err("ends with '-'".to_owned());
    }
    Ok(())
}

/// Checks a port: decimal digits without a leading zero, 1..=65535.
fn check_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("the port after ':' is empty".to_owned());
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a decimal number"));
    }
    if port.starts_with('0') {
        return Err(format!(
            "port {port:?} has a leading zero or is zero (expected 1 to 65535)"
        ));
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port} is out of range (expected 1 to 65535)"))
}

/// Checks a cluster name; returns a description of the problem otherwise.
fn check_cluster_name(value: &str) -> Result<(), String> {
    let (host, port) = match value.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (value, None),
    };
    if host.is_empty() {
        return Err("the host name is empty".to_owned());
    }
    if host.parse::<Ipv4Addr>().is_err() {
        for label in host.split('.') {
            check_label(label).map_err(|problem| {
                if label.is_empty() {
                    "the host name has an empty label (leading, trailing or doubled '.')".to_owned()
                } else {
                    format!("label {label:?} {problem}")
                }
            })?;
        }
        if host.len() > MAX_HOST_LEN {
            return Err(format!(
                "the host name is {} characters long, but at most {MAX_HOST_LEN} are allowed",
                host.len()
            ));
        }
    }
    if let Some(port) = port {
        check_port(port)?;
    }
    Ok(())
}

/// A cluster name was invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster name {value:?}: {reason}")]
pub struct InvalidClusterName {
    /// The rejected value.
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

/// The name of a cluster: the host name (or IPv4 address) under which its
/// backends are served, optionally followed by `:port`.
///
/// The host is 1 to 253 characters of dot-separated labels, each 1 to 63 ASCII
/// letters, digits or `-` and not starting or ending with `-`. The port, if
/// any, is a decimal number from 1 to 65535 without leading zeros (so that
/// each cluster has exactly one spelling).
///
/// Serializes as a plain string and is validated when deserialized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    /// The cluster name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part (everything before `:port`).
    pub fn host(&self) -> &str {
        match self.0.split_once(':') {
            Some((host, _)) => host,
            None => &self.0,
        }
    }

    /// The explicit port, if the name has one.
    pub fn port(&self) -> Option<u16> {
        self.0
            .split_once(':')
            .and_then(|(_, port)| port.parse().ok())
    }

    /// Whether the cluster is served over HTTPS: true when the name has no
    /// explicit port or the port is 443.
    pub fn is_https(&self) -> bool {
        match self.port() {
            None => true,
            Some(port) => port == 443,
        }
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = InvalidClusterName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match check_cluster_name(s) {
            Ok(()) => Ok(Self(s.to_owned())),
            Err(reason) => Err(InvalidClusterName {
                value: s.to_owned(),
                reason,
            }),
        }
    }
}

impl TryFrom<String> for ClusterName {
    type Error = InvalidClusterName;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match check_cluster_name(&value) {
            Ok(()) => Ok(Self(value)),
            Err(reason) => Err(InvalidClusterName { value, reason }),
        }
    }
}

impl From<ClusterName> for String {
    fn from(value: ClusterName) -> String {
        value.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The name of a pool of drones within a cluster. The default pool is the
/// empty string.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DronePoolName(String);

impl DronePoolName {
    /// The pool name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the default pool (the empty name).
    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for DronePoolName {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for DronePoolName {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Display for DronePoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subdomain was invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subdomain {value:?}: {reason}")]
pub struct InvalidSubdomain {
    /// The rejected value.
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

/// A single DNS label under which a backend is reachable: 1 to 63 ASCII
/// letters, digits or `-`, not starting or ending with `-`.
///
/// Serializes as a plain string and is validated when deserialized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subdomain(String);

impl Subdomain {
    /// The subdomain as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Describes what is wrong with a subdomain, if anything.
fn check_subdomain(value: &str) -> Result<(), String> {
    check_label(value).map_err(|problem| format!("it {problem}"))
}

impl fmt::Display for Subdomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Subdomain {
    type Err = InvalidSubdomain;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match check_subdomain(s) {
            Ok(()) => Ok(Self(s.to_owned())),
            Err(reason) => Err(InvalidSubdomain {
                value: s.to_owned(),
                reason,
            }),
        }
    }
}

impl TryFrom<String> for Subdomain {
    type Error = InvalidSubdomain;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match check_subdomain(&value) {
            Ok(()) => Ok(Self(value)),
            Err(reason) => Err(InvalidSubdomain { value, reason }),
        }
    }
}

impl From<Subdomain> for String {
    fn from(value: Subdomain) -> String {
        value.0
    }
}

impl AsRef<str> for Subdomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The database id of a node (drone, proxy or ACME DNS server). Serializes as
/// a JSON number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(i32);

impl NodeId {
    /// The id as an integer.
    pub fn as_i32(self) -> i32 {
        self.0
    }
}

impl From<i32> for NodeId {
    fn from(value: i32) -> Self {
        Self(value)
    }
}

impl From<NodeId> for i32 {
    fn from(value: NodeId) -> i32 {
        value.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_reason(s: &str) -> String {
        match s.parse::<ClusterName>() {
            Ok(_) => panic!("{s:?} should not parse as a cluster name"),
            Err(err) => {
                assert_eq!(err.value, s);
                err.reason
            }
        }
    }

    fn subdomain_reason(s: &str) -> String {
        match s.parse::<Subdomain>() {
            Ok(_) => panic!("{s:?} should not parse as a subdomain"),
            Err(err) => {
                assert_eq!(err.value, s);
                err.reason
            }
        }
    }

    #[test]
    fn valid_cluster_names() {
        for s in [
            "localhost",
            "plane.test",
            "Plane.Example.COM",
            "a",
            "a-b.c-d.e",
            "127.0.0.1",
            "10.0.0.255:8080",
            "localhost:9090",
            "example.com:443",
            "example.com:1",
            "example.com:65535",
            "xn--bcher-kva.example",
            "123.example",
        ] {
            let name: ClusterName = s.parse().unwrap();
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
            assert_eq!(ClusterName::try_from(s.to_string()).unwrap(), name);
        }
    }

    #[test]
    fn cluster_name_length_boundaries() {
        let label63 = "a".repeat(63);
        let ok: ClusterName = format!("{label63}.com").parse().unwrap();
        assert_eq!(ok.host().len(), 67);
        assert_eq!(
            cluster_reason(&format!("{label63}a.com")),
            format!("label \"{label63}a\" is 64 characters long, but at most 63 are allowed")
        );

        // 4 labels of 63 + 3 dots = 255; trim to exactly 253.
        let host253 = format!("{label63}.{label63}.{label63}.{}", "a".repeat(61));
        assert_eq!(host253.len(), 253);
        assert!(host253.parse::<ClusterName>().is_ok());
        assert!(format!("{host253}:8080").parse::<ClusterName>().is_ok());
        let host254 = format!("{label63}.{label63}.{label63}.{}", "a".repeat(62));
        assert_eq!(
            cluster_reason(&host254),
            "the host name is 254 characters long, but at most 253 are allowed"
        );
    }

    #[test]
    fn invalid_cluster_names() {
        assert_eq!(cluster_reason(""), "the host name is empty");
        assert_eq!(cluster_reason(":8080"), "the host name is empty");
        assert_eq!(
            cluster_reason("example..com"),
            "the host name has an empty label (leading, trailing or doubled '.')"
        );
        assert_eq!(
            cluster_reason("example.com."),
            "the host name has an empty label (leading, trailing or doubled '.')"
        );
        assert_eq!(
            cluster_reason(".example.com"),
            "the host name has an empty label (leading, trailing or doubled '.')"
        );
        assert_eq!(
            cluster_reason("-example.com"),
            "label \"-example\" starts with '-'"
        );
        assert_eq!(
            cluster_reason("example-.com"),
            "label \"example-\" ends with '-'"
        );
        assert_eq!(
            cluster_reason("exa_mple.com"),
            "label \"exa_mple\" has character '_' at position 3, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            cluster_reason("bücher.example"),
            "label \"bücher\" has character 'ü' at position 1, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            cluster_reason("exa\0mple.com"),
            "label \"exa\\0mple\" has character '\\0' at position 3, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            cluster_reason("http://example.com"),
            "port \"//example.com\" is not a decimal number"
        );
        assert_eq!(
            cluster_reason("[::1]:80"),
            "label \"[\" has character '[' at position 0, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            cluster_reason("example.com with space"),
            "label \"com with space\" has character ' ' at position 3, which is not an ASCII letter, digit or '-'"
        );
    }

    #[test]
    fn invalid_cluster_ports() {
        assert_eq!(
            cluster_reason("example.com:"),
            "the port after ':' is empty"
        );
        assert_eq!(
            cluster_reason("example.com:http"),
            "port \"http\" is not a decimal number"
        );
        assert_eq!(
            cluster_reason("example.com:+443"),
            "port \"+443\" is not a decimal number"
        );
        assert_eq!(
            cluster_reason("example.com:-1"),
            "port \"-1\" is not a decimal number"
        );
        assert_eq!(
            cluster_reason("example.com:80:80"),
            "port \"80:80\" is not a decimal number"
        );
        assert_eq!(
            cluster_reason("example.com:65536"),
            "port 65536 is out of range (expected 1 to 65535)"
        );
        assert_eq!(
            cluster_reason("example.com:99999999999999999999"),
            "port 99999999999999999999 is out of range (expected 1 to 65535)"
        );
        assert_eq!(
            cluster_reason("example.com:0443"),
            "port \"0443\" has a leading zero or is zero (expected 1 to 65535)"
        );
        assert_eq!(
            cluster_reason("example.com:0"),
            "port \"0\" has a leading zero or is zero (expected 1 to 65535)"
        );
    }

    #[test]
    fn cluster_name_error_message() {
        let err = "bad_host".parse::<ClusterName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid cluster name \"bad_host\": label \"bad_host\" has character '_' at position 3, which is not an ASCII letter, digit or '-'"
        );
    }

    #[test]
    fn cluster_https_host_and_port() {
        let c: ClusterName = "plane.example.com".parse().unwrap();
        assert!(c.is_https());
        assert_eq!(c.host(), "plane.example.com");
        assert_eq!(c.port(), None);

        let c: ClusterName = "plane.example.com:443".parse().unwrap();
        assert!(c.is_https());
        assert_eq!(c.host(), "plane.example.com");
        assert_eq!(c.port(), Some(443));

        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert!(!c.is_https());
        assert_eq!(c.host(), "localhost");
        assert_eq!(c.port(), Some(9090));

        let c: ClusterName = "localhost:4430".parse().unwrap();
        assert!(!c.is_https());
    }

    #[test]
    fn cluster_name_serde() {
        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"localhost:9090\"");
        let back: ClusterName = serde_json::from_str("\"localhost:9090\"").unwrap();
        assert_eq!(back, c);
        let err = serde_json::from_str::<ClusterName>("\"local_host\"").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid cluster name \"local_host\""),
            "{err}"
        );
        assert!(serde_json::from_str::<ClusterName>("9090").is_err());
    }

    #[test]
    fn drone_pool_name() {
        let default = DronePoolName::default();
        assert!(default.is_default());
        assert_eq!(default.as_str(), "");
        assert_eq!(default, DronePoolName::from(""));
        assert_eq!(serde_json::to_string(&default).unwrap(), "\"\"");

        let pool = DronePoolName::from("gpu".to_string());
        assert!(!pool.is_default());
        assert_eq!(pool.as_str(), "gpu");
        assert_eq!(pool.to_string(), "gpu");
        assert_eq!(pool, DronePoolName::from("gpu"));
        assert_eq!(serde_json::to_string(&pool).unwrap(), "\"gpu\"");
        let back: DronePoolName = serde_json::from_str("\"gpu\"").unwrap();
        assert_eq!(back, pool);
    }

    #[test]
    fn valid_subdomains() {
        let max = "z".repeat(63);
        for s in ["a", "A", "0", "a-b", "my-App-1", max.as_str()] {
            let sub: Subdomain = s.parse().unwrap();
            assert_eq!(sub.as_str(), s);
            assert_eq!(sub.to_string(), s);
            assert_eq!(Subdomain::try_from(s.to_string()).unwrap(), sub);
        }
    }

    #[test]
    fn invalid_subdomains() {
        assert_eq!(subdomain_reason(""), "it is empty");
        assert_eq!(
            subdomain_reason(&"z".repeat(64)),
            "it is 64 characters long, but at most 63 are allowed"
        );
        assert_eq!(subdomain_reason("-abc"), "it starts with '-'");
        assert_eq!(subdomain_reason("abc-"), "it ends with '-'");
        assert_eq!(subdomain_reason("-"), "it starts with '-'");
        assert_eq!(
            subdomain_reason("a.b"),
            "it has character '.' at position 1, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            subdomain_reason("ab\0"),
            "it has character '\\0' at position 2, which is not an ASCII letter, digit or '-'"
        );
        assert_eq!(
            subdomain_reason("añb"),
            "it has character 'ñ' at position 1, which is not an ASCII letter, digit or '-'"
        );
        let err = "a_b".parse::<Subdomain>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid subdomain \"a_b\": it has character '_' at position 1, which is not an ASCII letter, digit or '-'"
        );
    }

    #[test]
    fn subdomain_serde() {
        let sub: Subdomain = "my-app".parse().unwrap();
        assert_eq!(serde_json::to_string(&sub).unwrap(), "\"my-app\"");
        let back: Subdomain = serde_json::from_str("\"my-app\"").unwrap();
        assert_eq!(back, sub);
        assert!(serde_json::from_str::<Subdomain>("\"my.app\"").is_err());
        assert!(serde_json::from_str::<Subdomain>("\"\"").is_err());
    }

    #[test]
    fn node_id() {
        let id = NodeId::from(42);
        assert_eq!(id.as_i32(), 42);
        assert_eq!(i32::from(id), 42);
        assert_eq!(id.to_string(), "42");
        assert_eq!(NodeId::from(-7).to_string(), "-7");
        assert_eq!(serde_json::to_string(&id).unwrap(), "42");
        let back: NodeId = serde_json::from_str("42").unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<NodeId>("\"42\"").is_err());
        assert!(NodeId::from(1) < NodeId::from(2));
    }
}
