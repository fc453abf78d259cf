//! Secrets kept off the screen: tokens, secret tokens and anything named like a secret are
//! replaced before JSON or a table is printed (unless `--show-secrets`).

/// What a redacted secret is printed as; a static token keeps its `s.` prefix.
pub const REDACTED: &str = "****";

/// `value` with its secrets replaced by [`REDACTED`], for printing:
///
/// - the string value of every member whose name says it holds a secret: `token`, or ending
///   in `_token` (`static_token`, `secret_token`, `bearer_token`), or containing `secret` or
///   `password` (case-insensitive). Other values under such names (a fencing token's number,
///   null) are not secrets and stay;
/// - a static token (`s.` and 32 letters or digits) anywhere in any string, so one copied
///   under another name (an executable's environment, a free-text field) is hidden too.
pub fn redact(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => Value::String(redact_static_tokens(text)),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(name, member)| {
                    let member = match member {
                        Value::String(secret) if names_a_secret(name) => {
                            Value::String(redacted(secret))
                        }
                        other => redact(other),
                    };
                    (name.clone(), member)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Whether a JSON member of this name holds a secret (see [`redact`]).
fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "token"
        || name.ends_with("_token")
        || name.ends_with("-token")
        || name.contains("secret")
        || name.contains("password")
}

/// A secret's replacement: `s.****` for a static token, `****` for anything else.
fn redacted(secret: &str) -> String {
    if secret.starts_with(STATIC_PREFIX) {
        format!("{STATIC_PREFIX}{REDACTED}")
    } else {
        REDACTED.to_string()
    }
}

const STATIC_PREFIX: &str = plane_db::types::BearerToken::STATIC_PREFIX;

/// How many letters and digits follow `s.` in a static token.
const STATIC_TOKEN_LEN: usize = 32;

/// `text` with every static token in it (`s.` and 32 letters or digits, standing alone:
/// no letter or digit right before or after) replaced by `s.****`.
pub fn redact_static_tokens(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = text[at..].find(STATIC_PREFIX) {
        let start = at + found;
        let body = start + STATIC_PREFIX.len();
        let end = body + STATIC_TOKEN_LEN;
        let alone_before = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let is_token = end <= bytes.len()
            && bytes[body..end].iter().all(u8::is_ascii_alphanumeric)
            && bytes.get(end).is_none_or(|b| !b.is_ascii_alphanumeric());
        if alone_before && is_token {
            out.push_str(&text[copied..body]);
            out.push_str(REDACTED);
            copied = end;
            at = end;
        } else {
            at = body;
        }
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_by_name_and_static_tokens_anywhere() {
        let token = format!("s.{}", "A1".repeat(16));
        let value = serde_json::json!({
            "Spawn": {
                "static_token": token,
                "key": {"token": 42, "key": {"name": "k"}},
                "executable": {"env": {"GREETING": format!("hello {token}!")}},
            },
            "secret_token": "sekrit",
            "Token": "plain-bearer",
            "db_password": "hunter2",
            "list": [token.clone(), null],
            "static_token_or_null": null,
            "name": "s.short",
        });
        let shown = redact(&value);
        let text = shown.to_string();
        assert!(!text.contains(&token[2..]), "{text}");
        assert!(
            !text.contains("sekrit") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(!text.contains("plain-bearer"), "{text}");
        assert_eq!(shown["Spawn"]["static_token"], "s.****");
        assert_eq!(
            shown["Spawn"]["key"]["token"], 42,
            "a fencing token is no secret"
        );
        assert_eq!(
            shown["Spawn"]["executable"]["env"]["GREETING"],
            "hello s.****!"
        );
        assert_eq!(shown["secret_token"], "****");
        assert_eq!(shown["list"][0], "s.****");
        assert_eq!(shown["name"], "s.short", "not a static token");
    }

    #[test]
    fn only_whole_static_tokens_are_redacted() {
        let body = "x".repeat(32);
        assert_eq!(redact_static_tokens(&format!("s.{body}")), "s.****");
        assert_eq!(
            redact_static_tokens(&format!("a s.{body}, s.{body}")),
            "a s.****, s.****"
        );
        // Longer, shorter, or glued to a word: not a token of ours.
        for text in [
            format!("s.{body}x"),
            format!("s.{}", &body[1..]),
            format!("abs.{body}"),
            "s.".to_string(),
            "ends with s.".to_string(),
        ] {
            assert_eq!(redact_static_tokens(&text), text);
        }
        assert_eq!(redact_static_tokens("é s.é"), "é s.é");
    }
}
