//! Durations serialized as seconds: a JSON number with millisecond precision (`1.25`), the
//! form the serialized overviews use (`heartbeat_age_seconds`, `age_seconds`). Used with
//! `#[serde(serialize_with = "…")]`.

use serde::Serializer;

/// `duration` as seconds, to the millisecond.
fn seconds(duration: &chrono::Duration) -> f64 {
    duration.num_milliseconds() as f64 / 1000.0
}

/// Serializes a duration as seconds.
pub(crate) fn serialize<S: Serializer>(
    duration: &chrono::Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(seconds(duration))
}

/// Serializes an optional duration as seconds, or `null`.
pub(crate) fn serialize_option<S: Serializer>(
    duration: &Option<chrono::Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => serializer.serialize_some(&seconds(duration)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct Ages {
        #[serde(serialize_with = "super::serialize")]
        age: chrono::Duration,
        #[serde(serialize_with = "super::serialize_option")]
        some: Option<chrono::Duration>,
        #[serde(serialize_with = "super::serialize_option")]
        none: Option<chrono::Duration>,
    }

    #[test]
    fn durations_are_seconds_to_the_millisecond() {
        let ages = Ages {
            age: chrono::Duration::microseconds(1_250_999),
            some: Some(chrono::Duration::milliseconds(-1_500)),
            none: None,
        };
        assert_eq!(
            serde_json::to_string(&ages).unwrap(),
            r#"{"age":1.25,"some":-1.5,"none":null}"#
        );
    }
}
