//! The size limits on caller-supplied text and JSON, in one place.
//!
//! Every string and JSON value a caller hands to plane-db is bounded. A value over its limit
//! is refused before any query runs (and, for [`PlaneDatabase::connect`](crate::PlaneDatabase::connect),
//! before the request is queued for a batch) with
//! [`Error::InvalidArgument`], whose `argument` names the
//! input and whose reason gives the size, the limit and the constant here that states it;
//! nothing is written. A value at its limit is stored verbatim.
//!
//! Sizes are counted in bytes: UTF-8 bytes for text, and the bytes of the compact JSON
//! serialization (as [`serde_json::to_string`] writes it) for JSON. The limits are chosen so
//! that normal use is far below them, and so that the database never fails on a value that
//! passes them: a key is the longest indexed text, and two key parts at their limit fit in
//! Postgres's b-tree index row (about 2,700 bytes), even incompressible.
//!
//! | Input | Limit | Where |
//! |---|---|---|
//! | key name | [`KEY_NAME_BYTES`] (1,000) | `connect`, `key().lookup` |
//! | key namespace | [`KEY_NAMESPACE_BYTES`] (1,000) | `connect`, `key().lookup` |
//! | key tag | [`KEY_TAG_BYTES`] (512) | `connect` |
//! | user | [`USER_BYTES`] (512) | `connect`, `revoke` |
//! | auth (JSON) | [`AUTH_BYTES`] (64 KiB) | `connect` |
//! | executable (JSON) | [`EXECUTABLE_BYTES`] (64 KiB) | `connect` |
//! | drone pool | [`DRONE_POOL_BYTES`] (256) | `connect`, `drone().register`, `drones_for_pool`, `pick_for_spawn` |
//! | Plane version, Plane hash | [`PLANE_VERSION_BYTES`], [`PLANE_HASH_BYTES`] (256) | `controller().heartbeat`, `node().register` |
//! | ACME TXT value | [`ACME_TXT_VALUE_BYTES`] (1 KiB) | `acme().set_txt` |
//! | event kind, key, payload | [`EVENT_KIND_BYTES`] (256), [`EVENT_KEY_BYTES`] (1 KiB), [`EVENT_PAYLOAD_BYTES`] (1 MiB) | [`events::emit`](crate::events::emit), [`events::emit_in_two_phase`](crate::events::emit_in_two_phase) |
//! | node name | [`NODE_NAME_BYTES`] (45) | `node().register` (parsed as a name), `node().id_of` |
//! | bearer token presented | [`BEARER_TOKEN_BYTES`] (256) | route lookups: a longer token is unknown (`NotFound`), not an error |
//!
//! Names the crate parses are bounded by their types: backend, drone, proxy, controller and
//! other entity names at [`MAX_NAME_LEN`](crate::types::MAX_NAME_LEN) characters, a
//! [`ClusterName`](crate::types::ClusterName) at a 253-character host and a port, a
//! [`Subdomain`](crate::types::Subdomain) at 63 characters. Ephemeral messages are bounded
//! by `NOTIFY`'s 8,000 bytes.
//!
//! ```no_run
//! use plane_db::connect::ConnectRequest;
//! use plane_db::types::KeyConfig;
//! use plane_db::{limits, ConnectError, Error};
//!
//! # async fn example(db: &plane_db::PlaneDatabase) {
//! let request = ConnectRequest {
//!     key: Some(KeyConfig {
//!         name: "x".repeat(limits::KEY_NAME_BYTES + 1),
//!         ..KeyConfig::default()
//!     }),
//!     ..ConnectRequest::default()
//! };
//! match db.connect(&request).await {
//!     Err(ConnectError::Other(Error::InvalidArgument { argument, reason })) => {
//!         assert_eq!(argument, "key.name");
//!         // "is 1001 bytes, more than the limit of 1000 bytes (plane_db::limits::KEY_NAME_BYTES)"
//!         assert!(reason.contains("1001 bytes"));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # }
//! ```

use crate::error::{Error, Result};

/// A limit and the name of its constant, for the refusal's message: `limit!(USER_BYTES)`.
macro_rules! limit {
    ($name:ident) => {
        ($crate::limits::$name, stringify!($name))
    };
}
pub(crate) use limit;

/// A limit in bytes, with the name of the constant that states it.
pub(crate) type Limit = (usize, &'static str);

/// A key's name: at most 1,000 bytes. Keys are per-document or per-user identifiers (a
/// UUID is 36 bytes, a URL path rarely more than a few hundred). The key's unique index holds
/// its namespace and name together, and Postgres refuses an index row over about 2,700 bytes
/// (SQLSTATE 54000); two parts of 1,000 bytes each stay below that even when incompressible.
pub const KEY_NAME_BYTES: usize = 1_000;

/// A key's namespace: at most 1,000 bytes, for the same reason as [`KEY_NAME_BYTES`] (the
/// two share one index row).
pub const KEY_NAMESPACE_BYTES: usize = 1_000;

/// A key's tag: at most 512 bytes. A tag is a version or a content hash (a SHA-256 in hex is
/// 64 bytes, an image reference with its digest about 150); it is stored with the key and
/// echoed in [`ConnectError::KeyHeld`](crate::ConnectError::KeyHeld).
pub const KEY_TAG_BYTES: usize = 512;

/// The user a token is issued to: at most 512 bytes. It is stored in every token row and
/// passed to the backend with each request; a user id or an e-mail address (at most 254
/// bytes) fits with room to spare.
pub const USER_BYTES: usize = 512;

/// The `auth` JSON of a connect request: at most 64 KiB serialized. It is stored in every
/// token row (one per connect) and passed to the backend with each request; claims of a
/// signed-in user are a few hundred bytes.
pub const AUTH_BYTES: usize = 64 * 1024;

/// The spawn config's `executable` JSON: at most 64 KiB serialized. It is stored in the
/// backend's spawn action (sent to its drone); an image, its arguments, environment and
/// resource limits are a few KiB even when generous.
pub const EXECUTABLE_BYTES: usize = 64 * 1024;

/// A drone pool's name: at most 256 bytes. Pools are operator-chosen labels (`gpu`,
/// `eu-large`); the name is stored in drone rows and matched on every pick.
pub const DRONE_POOL_BYTES: usize = 256;

/// The Plane version a controller or node reports: at most 256 bytes (a semantic version
/// with build metadata is a few dozen).
pub const PLANE_VERSION_BYTES: usize = 256;

/// The Plane git hash a controller or node reports: at most 256 bytes (a full SHA-256 commit
/// id in hex is 64).
pub const PLANE_HASH_BYTES: usize = 256;

/// An ACME DNS-01 TXT value: at most 1 KiB. The value ACME asks for is a base64url SHA-256
/// digest (43 bytes); one DNS TXT string holds 255 bytes.
pub const ACME_TXT_VALUE_BYTES: usize = 1_024;

/// An event's kind ([`NotificationPayload::kind`](crate::events::NotificationPayload::kind)):
/// at most 256 bytes. The crate's kinds are a few words; subscriptions filter on it.
pub const EVENT_KIND_BYTES: usize = 256;

/// An event's key: at most 1 KiB. The crate's keys are entity names (at most 45 bytes); a
/// caller's own kinds key on ids of the same sort.
pub const EVENT_KEY_BYTES: usize = 1_024;

/// An event's payload: at most 1 MiB serialized. Each event is a row that every subscriber
/// reads; the crate's own payloads are at most a spawn action, which
/// [`EXECUTABLE_BYTES`] bounds.
pub const EVENT_PAYLOAD_BYTES: usize = 1024 * 1024;

/// A node's name looked up by [`NodeDatabase::id_of`](crate::node::NodeDatabase::id_of):
/// at most 45 bytes, [`MAX_NAME_LEN`](crate::types::MAX_NAME_LEN), the longest name
/// [`NodeDatabase::register`](crate::node::NodeDatabase::register) accepts (node names are
/// ASCII, so characters and bytes agree).
pub const NODE_NAME_BYTES: usize = crate::types::MAX_NAME_LEN;

/// A bearer token presented to a route lookup: at most 256 bytes. The crate issues tokens of
/// 32 characters (34 for static ones); a longer one is no token of ours, so a lookup answers
/// `NotFound` without asking the database.
pub const BEARER_TOKEN_BYTES: usize = 256;

/// The refusal of a value of `size` bytes over `limit`.
fn too_large(argument: &'static str, size: usize, (limit, constant): Limit) -> Error {
    Error::InvalidArgument {
        argument,
        reason: format!(
            "is {size} bytes, more than the limit of {limit} bytes (plane_db::limits::{constant})"
        ),
    }
}

/// Refuses text over `limit` bytes or with a NUL (which Postgres `text` cannot hold). The
/// size is checked first: it costs nothing, and a huge value is not scanned.
pub(crate) fn check_text(argument: &'static str, value: &str, limit: Limit) -> Result<()> {
    if value.len() > limit.0 {
        return Err(too_large(argument, value.len(), limit));
    }
    crate::validate::check_text(argument, value)
}

/// Refuses JSON whose compact serialization is over `limit` bytes, or that holds a NUL in
/// a string or an object key (which Postgres `jsonb` cannot hold).
pub(crate) fn check_json(
    argument: &'static str,
    value: &serde_json::Value,
    limit: Limit,
) -> Result<()> {
    let size = json_size(argument, value)?;
    if size > limit.0 {
        return Err(too_large(argument, size, limit));
    }
    crate::validate::check_json(argument, value)
}

/// [`check_json`] for a JSON object held as a map (the `auth` of a request), without
/// copying it into a value.
pub(crate) fn check_json_object(
    argument: &'static str,
    map: &serde_json::Map<String, serde_json::Value>,
    limit: Limit,
) -> Result<()> {
    let size = json_size(argument, map)?;
    if size > limit.0 {
        return Err(too_large(argument, size, limit));
    }
    map.iter().try_for_each(|(key, value)| {
        crate::validate::check_text(argument, key)?;
        crate::validate::check_json(argument, value)
    })
}

/// The size of a value's compact JSON serialization, counted without building it.
fn json_size<T: serde::Serialize + ?Sized>(argument: &'static str, value: &T) -> Result<usize> {
    /// A writer that only counts.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_err(|source| Error::Serialize {
        what: argument,
        source,
    })?;
    Ok(count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(result: Result<()>) -> (&'static str, String) {
        match result {
            Err(Error::InvalidArgument { argument, reason }) => (argument, reason),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn text_at_the_limit_passes_and_one_byte_over_is_refused_with_sizes() {
        assert!(check_text("user", &"u".repeat(USER_BYTES), limit!(USER_BYTES)).is_ok());
        let (argument, why) = reason(check_text(
            "user",
            &"u".repeat(USER_BYTES + 1),
            limit!(USER_BYTES),
        ));
        assert_eq!(argument, "user");
        assert_eq!(
            why,
            "is 513 bytes, more than the limit of 512 bytes (plane_db::limits::USER_BYTES)"
        );
        // Bytes, not characters: 171 three-byte characters are 513 bytes.
        assert!(check_text("user", &"世".repeat(171), limit!(USER_BYTES)).is_err());
        assert!(check_text("user", &"世".repeat(170), limit!(USER_BYTES)).is_ok());
        // NUL is still refused within the limit.
        assert!(reason(check_text("user", "a\0", limit!(USER_BYTES)))
            .1
            .contains("NUL"));
    }

    #[test]
    fn json_is_measured_as_its_compact_serialization() {
        let value = serde_json::json!({"a": "\"x\""});
        let text = serde_json::to_string(&value).unwrap();
        assert_eq!(json_size("auth", &value).unwrap(), text.len());
        assert!(check_json("auth", &value, (text.len(), "AUTH_BYTES")).is_ok());
        let (argument, why) = reason(check_json("auth", &value, (text.len() - 1, "AUTH_BYTES")));
        assert_eq!(argument, "auth");
        assert!(
            why.starts_with(&format!("is {} bytes", text.len())),
            "{why}"
        );
        let serde_json::Value::Object(map) = value else {
            unreachable!()
        };
        assert!(check_json_object("auth", &map, (text.len(), "AUTH_BYTES")).is_ok());
        assert!(check_json_object("auth", &map, (text.len() - 1, "AUTH_BYTES")).is_err());
    }
}
