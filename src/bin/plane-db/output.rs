//! How the CLI prints: aligned tables (coloured on a terminal, plain when piped), JSON for
//! scripts, and ages an operator can read at a glance.

use crate::redact::redact;
use chrono::{DateTime, Utc};
use plane_db::types::BackendStatus;
use serde::Serialize;
use std::borrow::Cow;
use std::io::{self, Write};

/// What the command prints, and how: JSON or tables, coloured or not, secrets redacted
/// or not (from the global options).
pub struct Out {
    /// `--json`.
    pub json: bool,
    /// Whether tables are coloured (`--color`, the terminal, `NO_COLOR`).
    pub color: bool,
    /// `--show-secrets`.
    pub show_secrets: bool,
}

impl Out {
    /// `value` as it may be printed: secrets redacted unless `--show-secrets`.
    pub fn shown<'v>(&self, value: &'v serde_json::Value) -> Cow<'v, serde_json::Value> {
        if self.show_secrets {
            Cow::Borrowed(value)
        } else {
            Cow::Owned(redact(value))
        }
    }

    /// Prints `value` as pretty JSON (secrets redacted unless `--show-secrets`).
    pub fn json(&self, out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
        json(out, &self.shown(&serde_json::to_value(value)?))
    }

    /// Prints `value` as one line of JSON (secrets redacted unless `--show-secrets`).
    pub fn json_line(&self, out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
        json_line(out, &self.shown(&serde_json::to_value(value)?))
    }

    /// Prints `table`, and `empty` to stderr when it has no rows (so a script reading stdout
    /// gets only the header).
    pub fn table(&self, out: &mut impl Write, table: &Table, empty: &str) -> io::Result<()> {
        table.print(out, self.color)?;
        if table.is_empty() {
            eprintln!("plane-db: {empty}");
        }
        Ok(())
    }
}

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

/// Prints `value` as pretty JSON followed by a newline.
fn json(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Prints `value` as one line of JSON (for streams: one object per line).
fn json_line(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
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
