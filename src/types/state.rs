//! The lifecycle of a backend: its status, its full state (as stored and sent
//! over the wire, JSON-compatible with Plane 0.5.5), and the public status
//! stream entries derived from it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The status of a backend: where it is in its lifecycle.
///
/// Statuses are ordered by lifecycle position ([`BackendStatus::as_int`]); a
/// backend only ever moves to a later status.
///
/// Serialized in lowercase, except [`BackendStatus::HardTerminating`], which
/// is `"hard-terminating"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendStatus {
    /// Assigned to a drone, which has not yet acknowledged it.
    Scheduled,
    /// The drone is loading the backend's image.
    Loading,
    /// The drone is starting the backend's process.
    Starting,
    /// The process runs; waiting for it to accept connections.
    Waiting,
    /// The backend accepts connections.
    Ready,
    /// The backend was asked to stop (soft termination, e.g. SIGTERM);
    /// proxies stop routing to it but its key is not yet released.
    Terminating,
    /// The backend is being killed (hard termination, e.g. SIGKILL).
    #[serde(rename = "hard-terminating")]
    HardTerminating,
    /// The backend has exited or was swept.
    Terminated,
}

/// A string or integer is not a backend status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid backend status {0:?}: expected one of scheduled, loading, starting, waiting, \
     ready, terminating, hard-terminating, terminated"
)]
pub struct InvalidStatus(pub String);

impl BackendStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [BackendStatus; 8] = [
        BackendStatus::Scheduled,
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
        BackendStatus::Terminating,
        BackendStatus::HardTerminating,
        BackendStatus::Terminated,
    ];

    /// The integer form of the status (as stored), increasing along the
    /// lifecycle, with gaps left for future statuses: 10, 20, 30, 40, 50, 60,
    /// 65, 70. This is the single source of truth for status ordering.
    pub const fn as_int(self) -> i32 {
        match self {
            BackendStatus::Scheduled => 10,
            BackendStatus::Loading => 20,
            BackendStatus::Starting => 30,
            BackendStatus::Waiting => 40,
            BackendStatus::Ready => 50,
            BackendStatus::Terminating => 60,
            BackendStatus::HardTerminating => 65,
            BackendStatus::Terminated => 70,
        }
    }

    /// The status with the given integer form, if any.
    pub fn from_int(value: i32) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_int() == value)
    }

    /// The string form of the status (as in JSON): `"scheduled"`, ...,
    /// `"hard-terminating"`, `"terminated"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Scheduled => "scheduled",
            BackendStatus::Loading => "loading",
            BackendStatus::Starting => "starting",
            BackendStatus::Waiting => "waiting",
            BackendStatus::Ready => "ready",
            BackendStatus::Terminating => "terminating",
            BackendStatus::HardTerminating => "hard-terminating",
            BackendStatus::Terminated => "terminated",
        }
    }
}

impl Ord for BackendStatus {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_int().cmp(&other.as_int())
    }
}

impl PartialOrd for BackendStatus {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendStatus {
    type Err = InvalidStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| InvalidStatus(s.to_owned()))
    }
}

/// How a backend is (or was) terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationKind {
    /// Asked to exit (e.g. SIGTERM). Serialized as `"soft"`.
    Soft,
    /// Killed (e.g. SIGKILL). Serialized as `"hard"`.
    Hard,
}

impl TerminationKind {
    /// The JSON form: `"soft"` or `"hard"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationKind::Soft => "soft",
            TerminationKind::Hard => "hard",
        }
    }
}

impl fmt::Display for TerminationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a backend is (or was) terminated. Serialized in lowercase without
/// separators (`"keyexpired"`, `"startuptimeout"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationReason {
    /// The backend was idle and swept.
    Swept,
    /// Termination was requested through the API.
    External,
    /// The backend's key lease expired.
    KeyExpired,
    /// The drone running the backend was lost.
    Lost,
    /// The backend did not become ready in time.
    StartupTimeout,
    /// An internal error happened while running the backend.
    InternalError,
}

impl TerminationReason {
    /// The JSON form: `"swept"`, `"external"`, `"keyexpired"`, `"lost"`,
    /// `"startuptimeout"` or `"internalerror"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Swept => "swept",
            TerminationReason::External => "external",
            TerminationReason::KeyExpired => "keyexpired",
            TerminationReason::Lost => "lost",
            TerminationReason::StartupTimeout => "startuptimeout",
            TerminationReason::InternalError => "internalerror",
        }
    }
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The address (IP and port) at which a backend accepts connections.
/// Serialized as the string `"ip:port"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendAddr(pub SocketAddr);

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<SocketAddr> for BackendAddr {
    fn from(value: SocketAddr) -> Self {
        Self(value)
    }
}

impl FromStr for BackendAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// The full state of a backend, as stored and sent over the wire.
///
/// Serialized as a JSON object tagged by `"status"`, e.g.
/// `{"status":"waiting","address":"127.0.0.1:8080"}` or
/// `{"status":"terminated","last_status":"ready","termination":"soft","reason":"swept","exit_code":0}`.
///
/// The `to_*` methods compute the next state; they never move a backend
/// backwards out of a termination state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum BackendState {
    /// Assigned to a drone, not yet acknowledged.
    #[default]
    Scheduled,
    /// The drone is loading the image.
    Loading,
    /// The drone is starting the process.
    Starting,
    /// The process runs; waiting for it to accept connections.
    Waiting {
        /// Where the backend will accept connections.
        address: BackendAddr,
    },
    /// The backend accepts connections.
    Ready {
        /// Where the backend accepts connections.
        address: BackendAddr,
    },
    /// Soft termination is in progress.
    Terminating {
        /// The status before termination started.
        last_status: BackendStatus,
        /// The kind of termination (always soft for states built by
        /// [`BackendState::to_terminating`]).
        termination: TerminationKind,
        /// Why the backend is being terminated.
        reason: TerminationReason,
    },
    /// Hard termination is in progress.
    #[serde(rename = "hard-terminating")]
    HardTerminating {
        /// The status before termination (soft or hard) started.
        last_status: BackendStatus,
        /// Why the backend is being terminated.
        reason: TerminationReason,
    },
    /// The backend has exited.
    Terminated {
        /// The status before termination started (or before it exited, if it
        /// exited on its own).
        last_status: BackendStatus,
        /// How it was terminated, if it was terminated rather than exiting on
        /// its own.
        termination: Option<TerminationKind>,
        /// Why it was terminated, if it was.
        reason: Option<TerminationReason>,
        /// The process's exit code, if known.
        exit_code: Option<i32>,
    },
}

impl BackendState {
    /// The status of this state.
    pub fn status(&self) -> BackendStatus {
        match self {
            BackendState::Scheduled => BackendStatus::Scheduled,
            BackendState::Loading => BackendStatus::Loading,
            BackendState::Starting => BackendStatus::Starting,
            BackendState::Waiting { .. } => BackendStatus::Waiting,
            BackendState::Ready { .. } => BackendStatus::Ready,
            BackendState::Terminating { .. } => BackendStatus::Terminating,
            BackendState::HardTerminating { .. } => BackendStatus::HardTerminating,
            BackendState::Terminated { .. } => BackendStatus::Terminated,
        }
    }

    /// The backend's address, for the waiting and ready states.
    pub fn address(&self) -> Option<BackendAddr> {
        match self {
            BackendState::Waiting { address } | BackendState::Ready { address } => Some(*address),
            _ => None,
        }
    }

    /// The loading state.
    pub fn to_loading(&self) -> BackendState {
        BackendState::Loading
    }

    /// The starting state.
    pub fn to_starting(&self) -> BackendState {
        BackendState::Starting
    }

    /// The waiting state, with the address the backend will listen on.
    pub fn to_waiting(&self, address: SocketAddr) -> BackendState {
        BackendState::Waiting {
            address: BackendAddr(address),
        }
    }

    /// The ready state, with the address the backend listens on.
    pub fn to_ready(&self, address: BackendAddr) -> BackendState {
        BackendState::Ready { address }
    }

    /// Starts a soft termination, remembering the current status. Returns the
    /// state unchanged if it is already terminating, hard-terminating or
    /// terminated.
    pub fn to_terminating(&self, reason: TerminationReason) -> BackendState {
        if self.status() >= BackendStatus::Terminating {
            return self.clone();
        }
        BackendState::Terminating {
            last_status: self.status(),
            termination: TerminationKind::Soft,
            reason,
        }
    }

    /// Starts a hard termination. A soft termination in progress is escalated
    /// and keeps its `last_status`; otherwise the current status is
    /// remembered. Returns the state unchanged if it is already
    /// hard-terminating or terminated.
    pub fn to_hard_terminating(&self, reason: TerminationReason) -> BackendState {
        match self {
            BackendState::HardTerminating { .. } | BackendState::Terminated { .. } => self.clone(),
            BackendState::Terminating { last_status, .. } => BackendState::HardTerminating {
                last_status: *last_status,
                reason,
            },
            _ => BackendState::HardTerminating {
                last_status: self.status(),
                reason,
            },
        }
    }

    /// The terminated state, with the process's exit code if known. The
    /// termination kind and reason are carried over from a termination in
    /// progress (hard termination gives kind `hard`); a backend that exits on
    /// its own has neither. Returns the state unchanged if it is already
    /// terminated.
    pub fn to_terminated(&self, exit_code: Option<i32>) -> BackendState {
        match self {
            BackendState::Terminated { .. } => self.clone(),
            BackendState::HardTerminating {
                last_status,
                reason,
            } => BackendState::Terminated {
                last_status: *last_status,
                termination: Some(TerminationKind::Hard),
                reason: Some(*reason),
                exit_code,
            },
            BackendState::Terminating {
                last_status,
                termination,
                reason,
            } => BackendState::Terminated {
                last_status: *last_status,
                termination: Some(*termination),
                reason: Some(*reason),
                exit_code,
            },
            _ => BackendState::Terminated {
                last_status: self.status(),
                termination: None,
                reason: None,
                exit_code,
            },
        }
    }

    /// The terminated state recording that the backend was lost with its drone: what
    /// [`to_terminated`](Self::to_terminated) would give without an exit code (a termination
    /// in progress keeps its `last_status` and kind), with reason
    /// [`Lost`](TerminationReason::Lost).
    pub fn to_lost(&self) -> BackendState {
        match self.to_terminated(None) {
            BackendState::Terminated {
                last_status,
                termination,
                ..
            } => BackendState::Terminated {
                last_status,
                termination,
                reason: Some(TerminationReason::Lost),
                exit_code: None,
            },
            // to_terminated always returns a terminated state.
            other => other,
        }
    }
}

/// A timestamped, public view of a backend's status, with termination
/// details but without the backend's address.
///
/// `time` is serialized as integer milliseconds since the Unix epoch; the
/// optional fields are omitted from JSON when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatusStreamEntry {
    /// The status.
    pub status: BackendStatus,
    /// Why the backend is (or was) terminated, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_reason: Option<TerminationReason>,
    /// How the backend is (or was) terminated, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_kind: Option<TerminationKind>,
    /// For terminated backends, whether the process exited with a non-zero
    /// exit code; absent while the backend has not terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_error: Option<bool>,
    /// When the backend entered this status.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub time: DateTime<Utc>,
}

impl BackendStatusStreamEntry {
    /// Builds the entry for `state`, which the backend entered at `time`.
    pub fn from_state(state: &BackendState, time: DateTime<Utc>) -> Self {
        let (termination_reason, termination_kind, exit_error) = match state {
            BackendState::Terminating { reason, .. } => {
                (Some(*reason), Some(TerminationKind::Soft), None)
            }
            BackendState::HardTerminating { reason, .. } => {
                (Some(*reason), Some(TerminationKind::Hard), None)
            }
            BackendState::Terminated {
                termination,
                reason,
                exit_code,
                ..
            } => (
                *reason,
                *termination,
                Some(matches!(exit_code, Some(code) if *code != 0)),
            ),
            _ => (None, None, None),
        };
        Self {
            status: state.status(),
            termination_reason,
            termination_kind,
            exit_error,
            time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_keeps_a_termination_in_progress_and_says_lost() {
        let ready = BackendState::Ready {
            address: BackendAddr("10.0.0.1:80".parse().unwrap()),
        };
        assert_eq!(
            ready.to_lost(),
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: None,
                reason: Some(TerminationReason::Lost),
                exit_code: None,
            }
        );
        let hard = ready.to_hard_terminating(TerminationReason::Swept);
        assert_eq!(
            hard.to_lost(),
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Hard),
                reason: Some(TerminationReason::Lost),
                exit_code: None,
            }
        );
    }
    use chrono::TimeZone;
    use serde_json::json;

    fn addr(s: &str) -> BackendAddr {
        BackendAddr(s.parse().unwrap())
    }

    /// One state of every variant (and both shapes of the optional fields).
    fn sample_states() -> Vec<BackendState> {
        vec![
            BackendState::Scheduled,
            BackendState::Loading,
            BackendState::Starting,
            BackendState::Waiting {
                address: addr("127.0.0.1:8080"),
            },
            BackendState::Ready {
                address: addr("[::1]:9000"),
            },
            BackendState::Terminating {
                last_status: BackendStatus::Ready,
                termination: TerminationKind::Soft,
                reason: TerminationReason::Swept,
            },
            BackendState::HardTerminating {
                last_status: BackendStatus::Waiting,
                reason: TerminationReason::KeyExpired,
            },
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Soft),
                reason: Some(TerminationReason::Swept),
                exit_code: Some(0),
            },
            BackendState::Terminated {
                last_status: BackendStatus::Loading,
                termination: None,
                reason: None,
                exit_code: None,
            },
        ]
    }

    #[test]
    fn status_strings() {
        let expected = [
            "scheduled",
            "loading",
            "starting",
            "waiting",
            "ready",
            "terminating",
            "hard-terminating",
            "terminated",
        ];
        for (status, s) in BackendStatus::ALL.into_iter().zip(expected) {
            assert_eq!(status.as_str(), s);
            assert_eq!(status.to_string(), s);
            assert_eq!(s.parse::<BackendStatus>().unwrap(), status);
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{s}\""));
            let back: BackendStatus = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(back, status);
        }
    }

    #[test]
    fn status_parse_errors() {
        for bad in [
            "",
            "Ready",
            "READY",
            "hardterminating",
            "hard_terminating",
            "ready ",
            "r\0eady",
            "bereit✓",
        ] {
            assert_eq!(
                bad.parse::<BackendStatus>(),
                Err(InvalidStatus(bad.to_string()))
            );
        }
        assert_eq!(
            "nope".parse::<BackendStatus>().unwrap_err().to_string(),
            "invalid backend status \"nope\": expected one of scheduled, loading, starting, \
             waiting, ready, terminating, hard-terminating, terminated"
        );
        assert!(serde_json::from_str::<BackendStatus>("\"hardterminating\"").is_err());
    }

    #[test]
    fn status_ints() {
        let ints: Vec<i32> = BackendStatus::ALL.iter().map(|s| s.as_int()).collect();
        assert_eq!(ints, vec![10, 20, 30, 40, 50, 60, 65, 70]);
        for status in BackendStatus::ALL {
            assert_eq!(BackendStatus::from_int(status.as_int()), Some(status));
        }
        for bad in [0, 1, 15, 55, 64, 66, 71, 100, -10, i32::MIN, i32::MAX] {
            assert_eq!(BackendStatus::from_int(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_order_matches_ints() {
        for a in BackendStatus::ALL {
            for b in BackendStatus::ALL {
                assert_eq!(a.cmp(&b), a.as_int().cmp(&b.as_int()), "{a} vs {b}");
                assert_eq!(a.partial_cmp(&b), Some(a.as_int().cmp(&b.as_int())));
                assert_eq!(a == b, a.as_int() == b.as_int());
            }
        }
        assert!(BackendStatus::Terminating < BackendStatus::HardTerminating);
        assert!(BackendStatus::HardTerminating < BackendStatus::Terminated);
        let mut sorted = BackendStatus::ALL;
        sorted.reverse();
        sorted.sort();
        assert_eq!(sorted, BackendStatus::ALL);
    }

    #[test]
    fn termination_kind_and_reason_json() {
        let kinds = [
            (TerminationKind::Soft, "soft"),
            (TerminationKind::Hard, "hard"),
        ];
        for (kind, s) in kinds {
            assert_eq!(kind.as_str(), s);
            assert_eq!(kind.to_string(), s);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{s}\""));
            let back: TerminationKind = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(back, kind);
        }
        let reasons = [
            (TerminationReason::Swept, "swept"),
            (TerminationReason::External, "external"),
            (TerminationReason::KeyExpired, "keyexpired"),
            (TerminationReason::Lost, "lost"),
            (TerminationReason::StartupTimeout, "startuptimeout"),
            (TerminationReason::InternalError, "internalerror"),
        ];
        for (reason, s) in reasons {
            assert_eq!(reason.as_str(), s);
            assert_eq!(reason.to_string(), s);
            assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{s}\""));
            let back: TerminationReason = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(back, reason);
        }
        assert!(serde_json::from_str::<TerminationReason>("\"key_expired\"").is_err());
        assert!(serde_json::from_str::<TerminationKind>("\"Soft\"").is_err());
    }

    #[test]
    fn backend_addr() {
        let a = addr("10.1.2.3:4567");
        assert_eq!(a.to_string(), "10.1.2.3:4567");
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"10.1.2.3:4567\"");
        let back: BackendAddr = serde_json::from_str("\"10.1.2.3:4567\"").unwrap();
        assert_eq!(back, a);
        assert_eq!("10.1.2.3:4567".parse::<BackendAddr>().unwrap(), a);
        let v6 = addr("[::1]:80");
        assert_eq!(serde_json::to_string(&v6).unwrap(), "\"[::1]:80\"");
        assert!("10.1.2.3".parse::<BackendAddr>().is_err());
        assert!(serde_json::from_str::<BackendAddr>("\"nope\"").is_err());
    }

    #[test]
    fn every_state_round_trips() {
        for state in sample_states() {
            let json = serde_json::to_string(&state).unwrap();
            let back: BackendState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, state, "{json}");
            let value = serde_json::to_value(&state).unwrap();
            assert_eq!(value["status"], json!(state.status().as_str()), "{json}");
        }
    }

    #[test]
    fn state_literal_json() {
        let cases: Vec<(BackendState, &str)> = vec![
            (BackendState::Scheduled, r#"{"status":"scheduled"}"#),
            (BackendState::Loading, r#"{"status":"loading"}"#),
            (BackendState::Starting, r#"{"status":"starting"}"#),
            (
                BackendState::Waiting {
                    address: addr("127.0.0.1:8080"),
                },
                r#"{"status":"waiting","address":"127.0.0.1:8080"}"#,
            ),
            (
                BackendState::Ready {
                    address: addr("127.0.0.1:8080"),
                },
                r#"{"status":"ready","address":"127.0.0.1:8080"}"#,
            ),
            (
                BackendState::Terminating {
                    last_status: BackendStatus::Ready,
                    termination: TerminationKind::Soft,
                    reason: TerminationReason::External,
                },
                r#"{"status":"terminating","last_status":"ready","termination":"soft","reason":"external"}"#,
            ),
            (
                BackendState::HardTerminating {
                    last_status: BackendStatus::Starting,
                    reason: TerminationReason::StartupTimeout,
                },
                r#"{"status":"hard-terminating","last_status":"starting","reason":"startuptimeout"}"#,
            ),
            (
                BackendState::Terminated {
                    last_status: BackendStatus::Ready,
                    termination: Some(TerminationKind::Soft),
                    reason: Some(TerminationReason::Swept),
                    exit_code: Some(0),
                },
                r#"{"status":"terminated","last_status":"ready","termination":"soft","reason":"swept","exit_code":0}"#,
            ),
            (
                BackendState::Terminated {
                    last_status: BackendStatus::HardTerminating,
                    termination: None,
                    reason: None,
                    exit_code: None,
                },
                r#"{"status":"terminated","last_status":"hard-terminating","termination":null,"reason":null,"exit_code":null}"#,
            ),
        ];
        for (state, expected) in cases {
            assert_eq!(serde_json::to_string(&state).unwrap(), expected);
            let parsed: BackendState = serde_json::from_str(expected).unwrap();
            assert_eq!(parsed, state);
        }
    }

    #[test]
    fn state_json_is_lenient_about_missing_options_but_strict_about_tags() {
        let parsed: BackendState =
            serde_json::from_str(r#"{"status":"terminated","last_status":"ready"}"#).unwrap();
        assert_eq!(
            parsed,
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: None,
                reason: None,
                exit_code: None,
            }
        );
        for bad in [
            r#"{"status":"hardterminating","last_status":"ready","reason":"lost"}"#,
            r#"{"status":"waiting"}"#,
            r#"{"status":"waiting","address":"not an address"}"#,
            r#"{"status":"Ready","address":"127.0.0.1:1"}"#,
            r#"{"address":"127.0.0.1:1"}"#,
            r#""scheduled""#,
        ] {
            assert!(
                serde_json::from_str::<BackendState>(bad).is_err(),
                "{bad} should not parse"
            );
        }
    }

    #[test]
    fn state_status_and_address() {
        let expected = [
            BackendStatus::Scheduled,
            BackendStatus::Loading,
            BackendStatus::Starting,
            BackendStatus::Waiting,
            BackendStatus::Ready,
            BackendStatus::Terminating,
            BackendStatus::HardTerminating,
            BackendStatus::Terminated,
            BackendStatus::Terminated,
        ];
        let states = sample_states();
        for (state, status) in states.iter().zip(expected) {
            assert_eq!(state.status(), status);
        }
        assert_eq!(states[3].address(), Some(addr("127.0.0.1:8080")));
        assert_eq!(states[4].address(), Some(addr("[::1]:9000")));
        for i in [0, 1, 2, 5, 6, 7, 8] {
            assert_eq!(states[i].address(), None);
        }
        assert_eq!(BackendState::default(), BackendState::Scheduled);
    }

    #[test]
    fn forward_transitions() {
        let s = BackendState::default();
        let s = s.to_loading();
        assert_eq!(s, BackendState::Loading);
        let s = s.to_starting();
        assert_eq!(s, BackendState::Starting);
        let s = s.to_waiting("127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            s,
            BackendState::Waiting {
                address: addr("127.0.0.1:8080")
            }
        );
        let s = s.to_ready(addr("127.0.0.1:8081"));
        assert_eq!(
            s,
            BackendState::Ready {
                address: addr("127.0.0.1:8081")
            }
        );
    }

    #[test]
    fn soft_termination_path() {
        let ready = BackendState::Ready {
            address: addr("127.0.0.1:8080"),
        };
        let terminating = ready.to_terminating(TerminationReason::External);
        assert_eq!(
            terminating,
            BackendState::Terminating {
                last_status: BackendStatus::Ready,
                termination: TerminationKind::Soft,
                reason: TerminationReason::External,
            }
        );
        // Already terminating: unchanged, even with another reason.
        assert_eq!(
            terminating.to_terminating(TerminationReason::Swept),
            terminating
        );
        let terminated = terminating.to_terminated(Some(143));
        assert_eq!(
            terminated,
            BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Soft),
                reason: Some(TerminationReason::External),
                exit_code: Some(143),
            }
        );
        // Terminated is final.
        assert_eq!(terminated.to_terminated(Some(0)), terminated);
        assert_eq!(
            terminated.to_terminating(TerminationReason::Lost),
            terminated
        );
        assert_eq!(
            terminated.to_hard_terminating(TerminationReason::Lost),
            terminated
        );
    }

    #[test]
    fn hard_termination_path() {
        let terminating = BackendState::Waiting {
            address: addr("127.0.0.1:8080"),
        }
        .to_terminating(TerminationReason::KeyExpired);
        // Escalation keeps the status from before the soft termination.
        let hard = terminating.to_hard_terminating(TerminationReason::External);
        assert_eq!(
            hard,
            BackendState::HardTerminating {
                last_status: BackendStatus::Waiting,
                reason: TerminationReason::External,
            }
        );
        assert_eq!(hard.to_hard_terminating(TerminationReason::Lost), hard);
        assert_eq!(hard.to_terminating(TerminationReason::Lost), hard);
        assert_eq!(
            hard.to_terminated(None),
            BackendState::Terminated {
                last_status: BackendStatus::Waiting,
                termination: Some(TerminationKind::Hard),
                reason: Some(TerminationReason::External),
                exit_code: None,
            }
        );

        // Hard termination straight from a running state.
        assert_eq!(
            BackendState::Loading.to_hard_terminating(TerminationReason::Lost),
            BackendState::HardTerminating {
                last_status: BackendStatus::Loading,
                reason: TerminationReason::Lost,
            }
        );
    }

    #[test]
    fn terminated_without_termination() {
        assert_eq!(
            BackendState::Starting.to_terminated(Some(1)),
            BackendState::Terminated {
                last_status: BackendStatus::Starting,
                termination: None,
                reason: None,
                exit_code: Some(1),
            }
        );
        assert_eq!(
            BackendState::Scheduled.to_terminating(TerminationReason::InternalError),
            BackendState::Terminating {
                last_status: BackendStatus::Scheduled,
                termination: TerminationKind::Soft,
                reason: TerminationReason::InternalError,
            }
        );
    }

    fn time() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_123).unwrap()
    }

    fn entry(status: BackendStatus) -> BackendStatusStreamEntry {
        BackendStatusStreamEntry {
            status,
            termination_reason: None,
            termination_kind: None,
            exit_error: None,
            time: time(),
        }
    }

    #[test]
    fn stream_entry_for_running_states() {
        let states = sample_states();
        for state in &states[..5] {
            assert_eq!(
                BackendStatusStreamEntry::from_state(state, time()),
                entry(state.status())
            );
        }
    }

    #[test]
    fn stream_entry_for_termination_states() {
        let states = sample_states();
        assert_eq!(
            BackendStatusStreamEntry::from_state(&states[5], time()),
            BackendStatusStreamEntry {
                termination_reason: Some(TerminationReason::Swept),
                termination_kind: Some(TerminationKind::Soft),
                ..entry(BackendStatus::Terminating)
            }
        );
        assert_eq!(
            BackendStatusStreamEntry::from_state(&states[6], time()),
            BackendStatusStreamEntry {
                termination_reason: Some(TerminationReason::KeyExpired),
                termination_kind: Some(TerminationKind::Hard),
                ..entry(BackendStatus::HardTerminating)
            }
        );
        assert_eq!(
            BackendStatusStreamEntry::from_state(&states[7], time()),
            BackendStatusStreamEntry {
                termination_reason: Some(TerminationReason::Swept),
                termination_kind: Some(TerminationKind::Soft),
                exit_error: Some(false),
                ..entry(BackendStatus::Terminated)
            }
        );
        assert_eq!(
            BackendStatusStreamEntry::from_state(&states[8], time()),
            BackendStatusStreamEntry {
                exit_error: Some(false),
                ..entry(BackendStatus::Terminated)
            }
        );
        let failed = BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: Some(TerminationKind::Hard),
            reason: Some(TerminationReason::Lost),
            exit_code: Some(137),
        };
        assert_eq!(
            BackendStatusStreamEntry::from_state(&failed, time()),
            BackendStatusStreamEntry {
                termination_reason: Some(TerminationReason::Lost),
                termination_kind: Some(TerminationKind::Hard),
                exit_error: Some(true),
                ..entry(BackendStatus::Terminated)
            }
        );
        let negative = BackendState::Starting.to_terminated(Some(-1));
        assert_eq!(
            BackendStatusStreamEntry::from_state(&negative, time()).exit_error,
            Some(true)
        );
    }

    #[test]
    fn stream_entry_json() {
        let running = BackendStatusStreamEntry::from_state(&BackendState::Loading, time());
        assert_eq!(
            serde_json::to_string(&running).unwrap(),
            r#"{"status":"loading","time":1700000000123}"#
        );
        let terminated = BackendStatusStreamEntry::from_state(
            &BackendState::Terminated {
                last_status: BackendStatus::Ready,
                termination: Some(TerminationKind::Soft),
                reason: Some(TerminationReason::Swept),
                exit_code: Some(0),
            },
            time(),
        );
        let json = serde_json::to_string(&terminated).unwrap();
        assert_eq!(
            json,
            r#"{"status":"terminated","termination_reason":"swept","termination_kind":"soft","exit_error":false,"time":1700000000123}"#
        );
        let back: BackendStatusStreamEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, terminated);

        let hard = BackendStatusStreamEntry::from_state(&sample_states()[6], time());
        assert_eq!(
            serde_json::to_string(&hard).unwrap(),
            r#"{"status":"hard-terminating","termination_reason":"keyexpired","termination_kind":"hard","time":1700000000123}"#
        );

        let parsed: BackendStatusStreamEntry =
            serde_json::from_str(r#"{"status":"ready","time":0}"#).unwrap();
        assert_eq!(
            parsed,
            BackendStatusStreamEntry {
                time: Utc.timestamp_millis_opt(0).unwrap(),
                ..entry(BackendStatus::Ready)
            }
        );
        assert!(serde_json::from_str::<BackendStatusStreamEntry>(
            r#"{"status":"ready","time":"2024-01-01T00:00:00Z"}"#
        )
        .is_err());
    }
}
