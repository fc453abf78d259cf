//! Connection URLs and SQL names: the URLs the harness hands out, the database in
//! `DATABASE_URL`'s URL replaced, passwords kept out of messages.

use super::SUPERUSER;

/// `postgres://postgres@{host}:{port}/{database}`, the database name percent-encoded: how
/// a client reaches a server (or PgBouncer) that the harness started.
pub(super) fn local_url(host: &str, port: u16, database: &str) -> String {
    format!(
        "postgres://{SUPERUSER}@{host}:{port}/{}",
        percent_encode(database)
    )
}

/// Splits a `postgres://` / `postgresql://` URL into everything before its path
/// (`scheme://authority`) and everything after it (`?query#fragment`, possibly empty).
pub(super) fn split_url(url: &str) -> Option<(&str, &str)> {
    let (authority_start, authority_end) = authority_range(url)?;
    let scheme = &url[..authority_start - "://".len()];
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return None;
    }
    let rest = &url[authority_end..];
    let tail_start = rest.find(&['?', '#'][..]).unwrap_or(rest.len());
    Some((&url[..authority_end], &rest[tail_start..]))
}

/// Where the authority (`user:password@host:port`) of `url` starts and ends.
fn authority_range(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + "://".len();
    let end = url[start..]
        .find(&['/', '?', '#'][..])
        .map_or(url.len(), |i| start + i);
    Some((start, end))
}

/// `url` with its database (path) replaced by `database`.
pub(super) fn with_database(url: &str, database: &str) -> Option<String> {
    let (head, tail) = split_url(url)?;
    Some(format!("{head}/{}{tail}", percent_encode(database)))
}

/// Percent-encodes everything but unreserved URL characters.
pub(super) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `url` with the password (if any) replaced by `***`, for error messages.
pub(super) fn redact_password(url: &str) -> String {
    let Some((authority_start, authority_end)) = authority_range(url) else {
        return url.to_owned();
    };
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..authority_start],
        &authority[..colon],
        &url[authority_start + at..]
    )
}

/// Quotes an SQL identifier.
pub(super) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_database_is_replaced() {
        let cases = [
            (
                "postgres://postgres:secret@127.0.0.1:5432/postgres",
                "postgres://postgres:secret@127.0.0.1:5432/plane_test_x",
            ),
            (
                "postgres://u@db.example:6543/main?sslmode=disable&application_name=t",
                "postgres://u@db.example:6543/plane_test_x?sslmode=disable&application_name=t",
            ),
            ("postgres://localhost", "postgres://localhost/plane_test_x"),
            ("postgres://localhost/", "postgres://localhost/plane_test_x"),
            (
                "postgresql://localhost:5432?sslmode=require",
                "postgresql://localhost:5432/plane_test_x?sslmode=require",
            ),
            (
                "postgres:///postgres?host=/var/run/postgresql",
                "postgres:///plane_test_x?host=/var/run/postgresql",
            ),
            ("POSTGRES://h/a/b#frag", "POSTGRES://h/plane_test_x#frag"),
        ];
        for (url, expected) in cases {
            assert_eq!(
                with_database(url, "plane_test_x").as_deref(),
                Some(expected),
                "{url}"
            );
        }
    }

    #[test]
    fn url_database_name_is_encoded() {
        assert_eq!(
            with_database("postgres://h/db", "a b/c?").as_deref(),
            Some("postgres://h/a%20b%2Fc%3F")
        );
        assert_eq!(
            local_url("localhost", 7, "a b"),
            "postgres://postgres@localhost:7/a%20b"
        );
    }

    #[test]
    fn non_postgres_urls_are_rejected() {
        for url in ["mysql://h/db", "localhost:5432/db", "", "postgres:/h/db"] {
            assert_eq!(with_database(url, "x"), None, "{url}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://user:secret@host:5432/db?x=1"),
            "postgres://user:***@host:5432/db?x=1"
        );
        assert_eq!(
            redact_password("postgres://user@host/db"),
            "postgres://user@host/db"
        );
        assert_eq!(redact_password("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("plane_test_ab"), "\"plane_test_ab\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
