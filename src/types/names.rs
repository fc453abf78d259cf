//! Names of the entities of a cluster (backends, drones, controllers, ...),
//! and the kinds of nodes.
//!
//! The names follow Plane 0.5.5's rules:
//!
//! - A **backend** name has no prefix: it is 1 to [`MAX_NAME_LEN`] characters, each a
//!   lowercase ASCII letter, digit or `-` (Plane makes names like `5gnlc2uthninii`; a caller
//!   may choose one, see `SpawnConfig::id`). plane-db generates `ba-` names, which follow
//!   the same rule.
//! - Every other entity name is its type's prefix (`dr-` for a drone, `co-` for a
//!   controller, `px-` for a proxy, `ns-` for an ACME DNS server, `ak-` for a backend
//!   action) followed by at least one lowercase ASCII letter, digit or `-`, at most
//!   [`MAX_NAME_LEN`] characters long in total.
//!
//! The name types can only be built through validation (parsing, `TryFrom<String>`,
//! deserialization) or by generating a random name.

use super::tokens::{random_alphanumeric, LOWER_ALPHANUMERIC};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The maximum length of an entity name, prefix included, in characters.
pub const MAX_NAME_LEN: usize = 45;

/// How many random characters `new_random` appends to the prefix.
const RANDOM_SUFFIX_LEN: usize = 14;

/// An entity name failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name: {reason}")]
pub struct NameError {
    /// Which kind of name was being parsed: `"backend"`, `"drone"`,
    /// `"controller"`, `"proxy"`, `"acme dns server"` or `"backend action"`.
    pub kind: &'static str,
    /// What was wrong with it.
    pub reason: NameErrorReason,
}

/// What was wrong with an entity name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameErrorReason {
    /// The name does not start with the prefix of its type.
    #[error("expected prefix {expected:?}")]
    MissingPrefix {
        /// The prefix the name should start with.
        expected: &'static str,
    },
    /// The name is only the prefix, with nothing after it.
    #[error("nothing after the prefix")]
    Empty,
    /// The name is the empty string (for a backend name, which has no prefix).
    #[error("the name is empty")]
    EmptyName,
    /// The name contains a character that is not allowed.
    #[error("character {ch:?} at position {position} is not a lowercase letter, digit or '-'")]
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Its index, counted in characters from the start of the whole name
        /// (prefix included).
        position: usize,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{len} characters long, but at most {max} are allowed")]
    TooLong {
        /// The length of the name, in characters.
        len: usize,
        /// The maximum allowed length, in characters.
        max: usize,
    },
}

/// Checks `value` against the rules for a name with the given prefix (`""` for none).
fn validate_name(value: &str, prefix: &'static str, kind: &'static str) -> Result<(), NameError> {
    let fail = |reason| Err(NameError { kind, reason });
    let Some(rest) = value.strip_prefix(prefix) else {
        return fail(NameErrorReason::MissingPrefix { expected: prefix });
    };
    if rest.is_empty() {
        return fail(if prefix.is_empty() {
            NameErrorReason::EmptyName
        } else {
            NameErrorReason::Empty
        });
    }
    // The prefix is ASCII, so its length in bytes is its length in characters.
    let prefix_chars = prefix.len();
    let mut len = prefix_chars;
    for (i, ch) in rest.chars().enumerate() {
        if !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-') {
            return fail(NameErrorReason::InvalidChar {
                ch,
                position: prefix_chars + i,
            });
        }
        len += 1;
    }
    if len > MAX_NAME_LEN {
        return fail(NameErrorReason::TooLong {
            len,
            max: MAX_NAME_LEN,
        });
    }
    Ok(())
}

/// The accessors and conversions every name type shares; `$prefix` is checked by parsing
/// (`""` for none).
macro_rules! name_impls {
    ($ty:ident, prefix = $prefix:literal, kind = $kind:literal) => {
        impl $ty {
            /// The kind of entity, as used in error messages.
            pub const KIND: &'static str = $kind;

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Consumes the name and returns the underlying string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                validate_name(s, $prefix, $kind)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                validate_name(&value, $prefix, $kind)?;
                Ok(Self(value))
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

/// Defines one validated, prefixed entity-name newtype.
macro_rules! entity_name {
    ($(#[$attr:meta])* $ty:ident, prefix = $prefix:literal, kind = $kind:literal) => {
        $(#[$attr])*
        #[doc = ""]
        #[doc = concat!(
            "A valid ", $kind, " name is `", $prefix, "` followed by at least one ",
            "lowercase ASCII letter, digit or `-`, at most 45 characters in total. ",
            "It serializes as a plain string and is validated when deserialized."
        )]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $ty(String);

        impl $ty {
            #[doc = concat!("The prefix of every ", $kind, " name: `", $prefix, "`.")]
            pub const PREFIX: &'static str = $prefix;

            #[doc = concat!(
                "Generates a fresh random ", $kind, " name: `", $prefix,
                "` followed by 14 random characters from `[a-z0-9]`, ",
                "drawn from the operating system's CSPRNG."
            )]
            ///
            /// # Panics
            ///
            /// Panics if the operating system's random number generator fails.
            pub fn new_random() -> Self {
                let suffix = random_alphanumeric(RANDOM_SUFFIX_LEN, LOWER_ALPHANUMERIC);
                Self(format!("{}{}", $prefix, suffix))
            }
        }

        name_impls!($ty, prefix = $prefix, kind = $kind);
    };
}

/// The name of a backend (a session process run on a drone).
///
/// As in Plane 0.5.5, a backend name has **no prefix**: a valid backend name is 1 to 45
/// characters, each a lowercase ASCII letter, digit or `-`. So the names Plane makes
/// (14 random characters such as `5gnlc2uthninii`), the names a caller chooses
/// (`SpawnConfig::id`) and the `ba-` names plane-db makes ([`new_random`](Self::new_random))
/// are all accepted. It serializes as a plain string and is validated when deserialized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct BackendName(String);

impl BackendName {
    /// The prefix of the names [`new_random`](Self::new_random) makes: `ba-`. Parsing does
    /// not require it.
    pub const RANDOM_PREFIX: &'static str = "ba-";

    /// Generates a fresh random backend name: `ba-` followed by 14 random characters from
    /// `[a-z0-9]` (as many as a name Plane makes), drawn from the operating system's CSPRNG.
    /// The prefix is only a convenience for people reading logs: nothing relies on it.
    ///
    /// # Panics
    ///
    /// Panics if the operating system's random number generator fails.
    pub fn new_random() -> Self {
        let suffix = random_alphanumeric(RANDOM_SUFFIX_LEN, LOWER_ALPHANUMERIC);
        Self(format!("{}{}", Self::RANDOM_PREFIX, suffix))
    }
}

name_impls!(BackendName, prefix = "", kind = "backend");

entity_name!(
    /// The name of a drone (a node that runs backends).
    DroneName,
    prefix = "dr-",
    kind = "drone"
);

entity_name!(
    /// The name of a controller instance.
    ControllerName,
    prefix = "co-",
    kind = "controller"
);

entity_name!(
    /// The name of a proxy (a node that routes client traffic to backends).
    ProxyName,
    prefix = "px-",
    kind = "proxy"
);

entity_name!(
    /// The name of an ACME DNS server (a node that answers DNS-01 challenges).
    AcmeDnsServerName,
    prefix = "ns-",
    kind = "acme dns server"
);

entity_name!(
    /// The name (identifier) of an action sent to a drone about a backend.
    BackendActionName,
    prefix = "ak-",
    kind = "backend action"
);

/// The kind of a node that connects to the controller.
///
/// Its stored and JSON form is the variant name: `"Proxy"`, `"Drone"` or
/// `"AcmeDnsServer"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeKind {
    /// A proxy, which routes client traffic to backends.
    Proxy,
    /// A drone, which runs backends.
    Drone,
    /// An ACME DNS server, which answers DNS-01 challenges.
    AcmeDnsServer,
}

impl NodeKind {
    /// Every node kind.
    pub const ALL: [NodeKind; 3] = [NodeKind::Proxy, NodeKind::Drone, NodeKind::AcmeDnsServer];

    /// The stored (and JSON) form: `"Proxy"`, `"Drone"` or `"AcmeDnsServer"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Proxy => "Proxy",
            NodeKind::Drone => "Drone",
            NodeKind::AcmeDnsServer => "AcmeDnsServer",
        }
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string is not one of the node kinds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node kind {0:?}: expected \"Proxy\", \"Drone\" or \"AcmeDnsServer\"")]
pub struct InvalidNodeKind(pub String);

impl FromStr for NodeKind {
    type Err = InvalidNodeKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| InvalidNodeKind(s.to_owned()))
    }
}

/// The name of any node, tagged by its kind: what node listings return.
///
/// Serializes as `{"kind": "Drone", "name": "dr-…"}` (the kind as [`NodeKind`] writes it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "name")]
pub enum AnyNodeName {
    /// A drone's name.
    Drone(DroneName),
    /// A proxy's name.
    Proxy(ProxyName),
    /// An ACME DNS server's name.
    AcmeDnsServer(AcmeDnsServerName),
}

impl AnyNodeName {
    /// Parses `name` as a name of the given kind (its prefix must match the kind).
    pub fn parse(kind: NodeKind, name: &str) -> Result<Self, NameError> {
        Ok(match kind {
            NodeKind::Drone => AnyNodeName::Drone(name.parse()?),
            NodeKind::Proxy => AnyNodeName::Proxy(name.parse()?),
            NodeKind::AcmeDnsServer => AnyNodeName::AcmeDnsServer(name.parse()?),
        })
    }

    /// The kind of node this name belongs to.
    pub fn kind(&self) -> NodeKind {
        match self {
            AnyNodeName::Drone(_) => NodeKind::Drone,
            AnyNodeName::Proxy(_) => NodeKind::Proxy,
            AnyNodeName::AcmeDnsServer(_) => NodeKind::AcmeDnsServer,
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        match self {
            AnyNodeName::Drone(name) => name.as_str(),
            AnyNodeName::Proxy(name) => name.as_str(),
            AnyNodeName::AcmeDnsServer(name) => name.as_str(),
        }
    }
}

impl fmt::Display for AnyNodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_node_name_checks_the_prefix_of_its_kind() {
        let drone = AnyNodeName::parse(NodeKind::Drone, "dr-abc").expect("drone name");
        assert_eq!(drone.kind(), NodeKind::Drone);
        assert_eq!(drone.as_str(), "dr-abc");
        assert_eq!(drone.to_string(), "dr-abc");
        let proxy = AnyNodeName::parse(NodeKind::Proxy, "px-1").expect("proxy name");
        assert_eq!(proxy.kind(), NodeKind::Proxy);
        assert!(AnyNodeName::parse(NodeKind::Proxy, "dr-abc").is_err());
        assert!(AnyNodeName::parse(NodeKind::AcmeDnsServer, "px-1").is_err());
        assert!(AnyNodeName::parse(NodeKind::Drone, "").is_err());
    }

    use super::*;

    fn reason<T: FromStr<Err = NameError>>(s: &str) -> NameErrorReason {
        match s.parse::<T>() {
            Ok(_) => panic!("{s:?} should not parse"),
            Err(err) => err.reason,
        }
    }

    #[test]
    fn prefixes_and_kinds() {
        assert_eq!(BackendName::RANDOM_PREFIX, "ba-");
        assert_eq!(DroneName::PREFIX, "dr-");
        assert_eq!(ControllerName::PREFIX, "co-");
        assert_eq!(ProxyName::PREFIX, "px-");
        assert_eq!(AcmeDnsServerName::PREFIX, "ns-");
        assert_eq!(BackendActionName::PREFIX, "ak-");
        assert_eq!(BackendName::KIND, "backend");
        assert_eq!(DroneName::KIND, "drone");
        assert_eq!(ControllerName::KIND, "controller");
        assert_eq!(ProxyName::KIND, "proxy");
        assert_eq!(AcmeDnsServerName::KIND, "acme dns server");
        assert_eq!(BackendActionName::KIND, "backend action");
    }

    #[test]
    fn valid_names_parse() {
        // Backend names have no prefix: Plane's (`5gnlc2uthninii`), ours (`ba-…`), any.
        for s in [
            "ba-a",
            "ba-0",
            "ba--",
            "ba-abc-123",
            "ba-x-",
            "ba-9z9z",
            "5gnlc2uthninii",
            "a",
            "-",
            "ba",
            "ba-",
            "dr-abc",
            "my-backend-1",
        ] {
            let name: BackendName = s.parse().unwrap();
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
        }
        assert_eq!("dr-x".parse::<DroneName>().unwrap().as_str(), "dr-x");
        assert_eq!("co-x".parse::<ControllerName>().unwrap().as_str(), "co-x");
        assert_eq!("px-x".parse::<ProxyName>().unwrap().as_str(), "px-x");
        assert_eq!(
            "ns-x".parse::<AcmeDnsServerName>().unwrap().as_str(),
            "ns-x"
        );
        assert_eq!(
            "ak-x".parse::<BackendActionName>().unwrap().as_str(),
            "ak-x"
        );
    }

    #[test]
    fn missing_prefix() {
        assert_eq!(
            reason::<DroneName>("ba-abc"),
            NameErrorReason::MissingPrefix { expected: "dr-" }
        );
        assert_eq!(
            reason::<DroneName>(""),
            NameErrorReason::MissingPrefix { expected: "dr-" }
        );
        assert_eq!(
            reason::<DroneName>("dr"),
            NameErrorReason::MissingPrefix { expected: "dr-" }
        );
        // Plane checks only the two letters ("drone-1" is a Plane drone name); we keep the
        // dash (COMPATIBILITY.md).
        assert_eq!(
            reason::<DroneName>("drone-1"),
            NameErrorReason::MissingPrefix { expected: "dr-" }
        );
        assert_eq!(
            reason::<ControllerName>("ba-abc"),
            NameErrorReason::MissingPrefix { expected: "co-" }
        );
        assert_eq!(
            reason::<ProxyName>("PX-abc"),
            NameErrorReason::MissingPrefix { expected: "px-" }
        );
        assert_eq!(
            reason::<AcmeDnsServerName>("dr-abc"),
            NameErrorReason::MissingPrefix { expected: "ns-" }
        );
        assert_eq!(
            reason::<BackendActionName>("ba-abc"),
            NameErrorReason::MissingPrefix { expected: "ak-" }
        );
    }

    #[test]
    fn empty_after_prefix() {
        assert_eq!(reason::<DroneName>("dr-"), NameErrorReason::Empty);
        assert_eq!(reason::<AcmeDnsServerName>("ns-"), NameErrorReason::Empty);
        // A backend name has no prefix: only the empty string is empty.
        assert_eq!(reason::<BackendName>(""), NameErrorReason::EmptyName);
    }

    #[test]
    fn invalid_chars() {
        assert_eq!(
            reason::<BackendName>("ba-abX"),
            NameErrorReason::InvalidChar {
                ch: 'X',
                position: 5
            }
        );
        assert_eq!(
            reason::<BackendName>("ba-a_b"),
            NameErrorReason::InvalidChar {
                ch: '_',
                position: 4
            }
        );
        assert_eq!(
            reason::<BackendName>("ba- "),
            NameErrorReason::InvalidChar {
                ch: ' ',
                position: 3
            }
        );
        assert_eq!(
            reason::<BackendName>("ba-ab\0"),
            NameErrorReason::InvalidChar {
                ch: '\0',
                position: 5
            }
        );
        // Position is counted in characters, not bytes.
        assert_eq!(
            reason::<BackendName>("ba-é"),
            NameErrorReason::InvalidChar {
                ch: 'é',
                position: 3
            }
        );
        assert_eq!(
            reason::<ProxyName>("px-日本x!"),
            NameErrorReason::InvalidChar {
                ch: '日',
                position: 3
            }
        );
        assert_eq!(
            reason::<BackendName>("ba-aé!"),
            NameErrorReason::InvalidChar {
                ch: 'é',
                position: 4
            }
        );
        assert_eq!(
            reason::<BackendName>("ba-a.b"),
            NameErrorReason::InvalidChar {
                ch: '.',
                position: 4
            }
        );
    }

    #[test]
    fn length_boundaries() {
        let plane_at_max = "7".repeat(45);
        assert_eq!(
            plane_at_max.parse::<BackendName>().unwrap().as_str(),
            plane_at_max
        );
        assert_eq!(
            reason::<BackendName>(&"7".repeat(46)),
            NameErrorReason::TooLong { len: 46, max: 45 }
        );
        let at_max = format!("ba-{}", "a".repeat(42));
        assert_eq!(at_max.len(), 45);
        assert_eq!(at_max.parse::<BackendName>().unwrap().as_str(), at_max);

        let too_long = format!("ba-{}", "a".repeat(43));
        assert_eq!(too_long.len(), 46);
        assert_eq!(
            reason::<BackendName>(&too_long),
            NameErrorReason::TooLong { len: 46, max: 45 }
        );

        let way_too_long = format!("dr-{}", "7".repeat(1000));
        assert_eq!(
            reason::<DroneName>(&way_too_long),
            NameErrorReason::TooLong { len: 1003, max: 45 }
        );
    }

    #[test]
    fn error_messages() {
        let err = "xx-abc".parse::<DroneName>().unwrap_err();
        assert_eq!(err.kind, "drone");
        assert_eq!(
            err.to_string(),
            "invalid drone name: expected prefix \"dr-\""
        );
        let err = "".parse::<BackendName>().unwrap_err();
        assert_eq!(err.kind, "backend");
        assert_eq!(err.to_string(), "invalid backend name: the name is empty");
        let err = "5gnlc2uthninIi".parse::<BackendName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend name: character 'I' at position 12 is not a lowercase letter, digit or '-'"
        );
        let err = "ba-abX".parse::<BackendName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend name: character 'X' at position 5 is not a lowercase letter, digit or '-'"
        );
        let err = "dr-".parse::<DroneName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid drone name: nothing after the prefix"
        );
        let err = format!("ns-{}", "a".repeat(43))
            .parse::<AcmeDnsServerName>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid acme dns server name: 46 characters long, but at most 45 are allowed"
        );
        let err = "ak-\0".parse::<BackendActionName>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend action name: character '\\0' at position 3 is not a lowercase letter, digit or '-'"
        );
    }

    #[test]
    fn try_from_string_matches_from_str() {
        let name = BackendName::try_from("ba-hello".to_string()).unwrap();
        assert_eq!(name, "ba-hello".parse().unwrap());
        let err = ControllerName::try_from("co-Hello".to_string()).unwrap_err();
        assert_eq!(
            err,
            NameError {
                kind: "controller",
                reason: NameErrorReason::InvalidChar {
                    ch: 'H',
                    position: 3
                }
            }
        );
        assert_eq!(String::from(name.clone()), "ba-hello");
        assert_eq!(name.into_string(), "ba-hello");
    }

    #[test]
    fn random_names() {
        let a = BackendName::new_random();
        let b = BackendName::new_random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 3 + 14);
        assert!(a.as_str().starts_with("ba-"));
        assert!(a.as_str()[3..]
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        // A random name is itself valid.
        assert_eq!(a.as_str().parse::<BackendName>().unwrap(), a);

        assert!(DroneName::new_random().as_str().starts_with("dr-"));
        assert!(ControllerName::new_random().as_str().starts_with("co-"));
        assert!(ProxyName::new_random().as_str().starts_with("px-"));
        assert!(AcmeDnsServerName::new_random().as_str().starts_with("ns-"));
        assert!(BackendActionName::new_random().as_str().starts_with("ak-"));
    }

    #[test]
    fn serde_is_a_plain_string_and_validates() {
        let name: BackendName = "ba-abc".parse().unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"ba-abc\"");
        let back: BackendName = serde_json::from_str("\"ba-abc\"").unwrap();
        assert_eq!(back, name);

        // Plane's names, and names that look like other entities' (no prefix rule).
        for good in ["5gnlc2uthninii", "dr-abc", "ba-", "x"] {
            let json = format!("\"{good}\"");
            let back: BackendName = serde_json::from_str(&json).unwrap();
            assert_eq!(back.as_str(), good);
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        for bad in ["\"ba-ABC\"", "\"\"", "\"a_b\"", "12", "null"] {
            assert!(
                serde_json::from_str::<BackendName>(bad).is_err(),
                "{bad} should not deserialize"
            );
        }
        let err = serde_json::from_str::<BackendName>("\"ba-A\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid backend name: character 'A' at position 3"),
            "{err}"
        );
    }

    #[test]
    fn ordering_is_lexicographic() {
        let a: DroneName = "dr-a".parse().unwrap();
        let b: DroneName = "dr-b".parse().unwrap();
        let aa: DroneName = "dr-aa".parse().unwrap();
        assert!(a < b);
        assert!(a < aa);
        assert!(aa < b);
    }

    #[test]
    fn node_kind_strings() {
        assert_eq!(NodeKind::Proxy.as_str(), "Proxy");
        assert_eq!(NodeKind::Drone.as_str(), "Drone");
        assert_eq!(NodeKind::AcmeDnsServer.as_str(), "AcmeDnsServer");
        for kind in NodeKind::ALL {
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(kind.as_str().parse::<NodeKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
            let back: NodeKind = serde_json::from_str(&format!("\"{kind}\"")).unwrap();
            assert_eq!(back, kind);
        }
    }

    #[test]
    fn node_kind_rejects_other_strings() {
        for bad in ["proxy", "DRONE", "", "Acme", "Drone ", "acme_dns_server"] {
            assert_eq!(
                bad.parse::<NodeKind>(),
                Err(InvalidNodeKind(bad.to_string()))
            );
        }
        assert_eq!(
            "proxy".parse::<NodeKind>().unwrap_err().to_string(),
            "invalid node kind \"proxy\": expected \"Proxy\", \"Drone\" or \"AcmeDnsServer\""
        );
        assert!(serde_json::from_str::<NodeKind>("\"proxy\"").is_err());
    }
}
