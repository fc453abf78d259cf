//! How the CLI prints: aligned tables (coloured on a terminal, plain when piped), JSON for
//! scripts, and ages an operator can read at a glance.

use chrono::{DateTime, Utc};
use plane_db::types::BackendStatus;
use std::io::{self, Write};

/// How a cell is coloured on a terminal. Colour only ever adds emphasis: the text says
/// everything on its own, so piped output loses nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Plain,
    /// Headers.
    Bold,
    Good,
    Busy,
    Bad,
    Dim,
}

impl Tone {
    fn ansi(self) -> Option<&'static str> {
        match self {
            Tone::Plain => None,
            Tone::Bold => Some("1"),
            Tone::Good => Some("32"),
            Tone::Busy => Some("33"),
            Tone::Bad => Some("31"),
            Tone::Dim => Some("2"),
        }
    }

    /// `text` in this tone when `color` is on, as is otherwise.
    pub fn paint(self, text: &str, color: bool) -> String {
        match self.ansi().filter(|_| color) {
            Some(code) => format!("\x1b[{code}m{text}\x1b[0m"),
            None => text.to_string(),
        }
    }

    /// The tone of a backend status: ready is good, the way there is busy, the way out is
    /// bad, and the end is dim.
    pub fn of_status(status: BackendStatus) -> Tone {
        match status {
            BackendStatus::Ready => Tone::Good,
            BackendStatus::Scheduled
            | BackendStatus::Loading
            | BackendStatus::Starting
            | BackendStatus::Waiting => Tone::Busy,
            BackendStatus::Terminating | BackendStatus::HardTerminating => Tone::Bad,
            BackendStatus::Terminated => Tone::Dim,
        }
    }
}

/// One cell: its text (already made safe for a terminal) and its tone.
pub struct Cell {
    text: String,
    tone: Tone,
}

impl Cell {
    pub fn new(text: impl AsRef<str>) -> Self {
        Cell::toned(text, Tone::Plain)
    }

    pub fn toned(text: impl AsRef<str>, tone: Tone) -> Self {
        Cell {
            text: printable(text.as_ref()),
            tone,
        }
    }

    /// An absent value, shown as `-`.
    pub fn none() -> Self {
        Cell::toned("-", Tone::Dim)
    }

    pub fn opt(value: Option<impl AsRef<str>>) -> Self {
        value.map_or_else(Cell::none, Cell::new)
    }
}

/// A table printed with its columns aligned.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prints the header and the rows, each column as wide as its widest cell; the last
    /// column is not padded, so lines carry no trailing spaces.
    pub fn print(&self, out: &mut impl Write, color: bool) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.text.chars().count());
            }
        }
        let last = self.headers.len().saturating_sub(1);
        let header: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell {
                text: (*h).to_string(),
                tone: Tone::Plain,
            })
            .collect();
        for (index, row) in std::iter::once(&header).chain(&self.rows).enumerate() {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column > 0 {
                    line.push_str("  ");
                }
                let pad = if column == last {
                    0
                } else {
                    widths[column] - cell.text.chars().count()
                };
                let tone = if index == 0 { Tone::Bold } else { cell.tone };
                line.push_str(&tone.paint(&cell.text, color));
                line.extend(std::iter::repeat_n(' ', pad));
            }
            // An empty last cell would leave the separator behind.
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `text` with control characters escaped, so a hostile value stored in the database (an
/// escape sequence, a newline) cannot rewrite the operator's terminal or break a table.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A timestamp as an operator reads it: UTC to the second.
pub fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// How long ago `at` was, as of `now`, in the largest unit that fits (`42s`, `5m`, `3h`,
/// `2d`); a time in the future (clock skew) reads `in 5s`.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds();
    let (future, seconds) = (seconds < 0, seconds.unsigned_abs());
    let text = match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

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

/// Prints `value` as pretty JSON followed by a newline.
pub fn json(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Prints `value` as one line of JSON (for streams: one object per line).
pub fn json_line(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_colour_only_when_asked() {
        let mut table = Table::new(&["ID", "STATUS"]);
        table.row(vec![
            Cell::new("ba-longer-name"),
            Cell::toned("ready", Tone::Good),
        ]);
        table.row(vec![Cell::new("ba-x"), Cell::none()]);
        let mut plain = Vec::new();
        table.print(&mut plain, false).unwrap();
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            "ID              STATUS\nba-longer-name  ready\nba-x            -\n"
        );
        let mut coloured = Vec::new();
        table.print(&mut coloured, true).unwrap();
        let coloured = String::from_utf8(coloured).unwrap();
        assert!(coloured.contains("\x1b[32mready\x1b[0m"), "{coloured:?}");
        assert!(coloured.starts_with("\x1b[1mID\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }

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

    #[test]
    fn ages_pick_a_readable_unit() {
        let now = DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let ago = |s: i64| age(now - chrono::Duration::seconds(s), now);
        assert_eq!(ago(0), "0s ago");
        assert_eq!(ago(119), "119s ago");
        assert_eq!(ago(120), "2m ago");
        assert_eq!(ago(3 * 3600), "3h ago");
        assert_eq!(ago(3 * 86400), "3d ago");
        assert_eq!(ago(-5), "in 5s");
    }
}
