//! The checks of a caller's input that are not size limits (those are in
//! [`limits`](crate::limits), which uses these for NUL): text and JSON that Postgres cannot
//! hold, counts and batch sizes, durations handed to Postgres as intervals. A refusal is
//! [`Error::InvalidArgument`] naming the argument, before any query runs.

use crate::error::{Error, Result};

/// Postgres `text` cannot hold a NUL character: refuse one up front with a typed error that
/// names the argument, instead of a database error after a round trip.
pub(crate) fn check_text(argument: &'static str, value: &str) -> Result<()> {
    match value.find('\0') {
        Some(position) => Err(Error::InvalidArgument {
            argument,
            reason: format!("contains a NUL character at byte {position}"),
        }),
        None => Ok(()),
    }
}

/// [`check_text`] for every string of a JSON value (object keys too): Postgres's `jsonb`
/// cannot hold a NUL character either (it refuses `\0` with SQLSTATE 22P05).
pub(crate) fn check_json(argument: &'static str, value: &serde_json::Value) -> Result<()> {
    match value {
        serde_json::Value::String(s) => check_text(argument, s),
        serde_json::Value::Array(values) => values.iter().try_for_each(|v| check_json(argument, v)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_text(argument, k)?;
            check_json(argument, v)
        }),
        _ => Ok(()),
    }
}

/// The longest duration handed to Postgres as an interval (about 100 years): longer ones
/// mean "everything" and would push timestamps out of Postgres's range.
const MAX_INTERVAL_SECS: f64 = 100.0 * 365.25 * 24.0 * 3600.0;

/// `duration` in seconds for `make_interval(secs => …)`, capped at about 100 years.
pub(crate) fn interval_secs(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64().min(MAX_INTERVAL_SECS)
}

/// A batch size must be at least 1 (a batch of none never finishes).
pub(crate) fn check_batch_size(batch_size: i32) -> Result<()> {
    if batch_size < 1 {
        return Err(Error::InvalidArgument {
            argument: "batch_size",
            reason: format!("must be at least 1, got {batch_size}"),
        });
    }
    Ok(())
}

/// A count such as a limit must not be negative.
pub(crate) fn check_non_negative(argument: &'static str, value: i64) -> Result<()> {
    if value < 0 {
        return Err(Error::InvalidArgument {
            argument,
            reason: format!("must not be negative, got {value}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nul_is_refused_in_text_and_anywhere_in_json() {
        assert!(check_text("name", "ok").is_ok());
        match check_text("name", "a\0b") {
            Err(Error::InvalidArgument { argument, reason }) => {
                assert_eq!(argument, "name");
                assert_eq!(reason, "contains a NUL character at byte 1");
            }
            other => panic!("{other:?}"),
        }
        assert!(check_json("auth", &serde_json::json!({"a": [1, "b", {"c": null}]})).is_ok());
        assert!(check_json("auth", &serde_json::json!({"a": [1, "b\0"]})).is_err());
        assert!(check_json("auth", &serde_json::json!({"k\0": 1})).is_err());
    }

    #[test]
    fn counts_and_intervals() {
        assert!(check_batch_size(1).is_ok());
        assert!(check_batch_size(0).is_err());
        assert!(check_non_negative("limit", 0).is_ok());
        assert!(check_non_negative("limit", -1).is_err());
        assert_eq!(interval_secs(Duration::from_millis(1500)), 1.5);
        assert_eq!(interval_secs(Duration::MAX), MAX_INTERVAL_SECS);
    }
}
