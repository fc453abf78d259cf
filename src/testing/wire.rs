//! A few words of the PostgreSQL wire protocol, spoken with the standard library only, so
//! that they work whether or not the caller is inside an async runtime: is a server (or
//! PgBouncer) up, does it offer TLS, and one simple query (what the Patroni cluster's
//! readiness checks ask).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use super::{MAINTENANCE_DB, SUPERUSER};

/// Checks that the server on `127.0.0.1:port` accepts connections, like `pg_isready`: opens
/// a connection as the superuser to the maintenance database and waits for `ReadyForQuery`.
pub(super) fn probe(port: u16) -> Result<(), String> {
    let (mut stream, talking) = connect(port)?;
    stream.write_all(&startup_message()).map_err(&talking)?;
    loop {
        let (kind, payload) = read_message(&mut stream, port, &talking)?;
        match kind {
            // ReadyForQuery: the server is up; send Terminate.
            b'Z' => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                return Ok(());
            }
            // ErrorResponse, e.g. "the database system is starting up".
            b'E' => return Err(error_response_text(&payload)),
            // An authentication request other than AuthenticationOk: the server is up.
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0][..]) => return Ok(()),
            // AuthenticationOk, ParameterStatus, BackendKeyData, notices: keep reading.
            _ => {}
        }
    }
}

/// Runs `sql` (one statement, no parameters) as the superuser on the maintenance database
/// of the server (or proxy) on `127.0.0.1:port`, with the simple query protocol, and
/// returns the rows of its result as text (`None` for NULL). Reads wait 5 s at most, so a
/// hung server makes it fail rather than block.
pub(super) fn simple_query(port: u16, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let (mut stream, talking) = connect(port)?;
    stream.write_all(&startup_message()).map_err(&talking)?;
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    query.extend_from_slice(sql.as_bytes());
    query.push(0);
    let mut sent = false;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (kind, payload) = read_message(&mut stream, port, &talking)?;
        match kind {
            b'Z' if !sent => {
                stream.write_all(&query).map_err(&talking)?;
                sent = true;
            }
            b'Z' => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                return match error {
                    Some(error) => Err(error),
                    None => Ok(rows),
                };
            }
            b'E' if !sent => return Err(error_response_text(&payload)),
            b'E' => error = Some(error_response_text(&payload)),
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0][..]) => {
                return Err(format!("{} asked for a password", address(port)))
            }
            b'D' => rows.push(
                data_row(&payload)
                    .ok_or_else(|| format!("malformed data row from {}", address(port)))?,
            ),
            _ => {}
        }
    }
}

/// The StartupMessage (protocol 3.0) of the superuser to the maintenance database.
fn startup_message() -> Vec<u8> {
    let mut body = 196_608_u32.to_be_bytes().to_vec();
    for part in ["user", SUPERUSER, "database", MAINTENANCE_DB] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

/// Reads one message: its type byte and its body.
fn read_message(
    stream: &mut TcpStream,
    port: u16,
    talking: &impl Fn(io::Error) -> String,
) -> Result<(u8, Vec<u8>), String> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).map_err(talking)?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=1 << 20).contains(&length) {
        return Err(format!("malformed reply from {}", address(port)));
    }
    let mut payload = vec![0u8; length - 4];
    stream.read_exact(&mut payload).map_err(talking)?;
    Ok((header[0], payload))
}

/// The columns of a DataRow body, as text.
fn data_row(payload: &[u8]) -> Option<Vec<Option<String>>> {
    let count = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]) as usize;
    let mut rest = &payload[2..];
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let length = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if length < 0 {
            columns.push(None);
        } else {
            let (value, tail) = rest.split_at_checked(length as usize)?;
            columns.push(Some(String::from_utf8_lossy(value).into_owned()));
            rest = tail;
        }
    }
    Some(columns)
}

/// Whether the server on `127.0.0.1:port` answers an `SSLRequest` with `S` (willing to
/// start TLS). The connection is closed without a handshake.
pub(super) fn offers_tls(port: u16) -> Result<(), String> {
    let (mut stream, talking) = connect(port)?;
    // SSLRequest: length 8, then the code 80877103.
    let mut request = 8_u32.to_be_bytes().to_vec();
    request.extend_from_slice(&80_877_103_u32.to_be_bytes());
    stream.write_all(&request).map_err(&talking)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).map_err(&talking)?;
    match answer[0] {
        b'S' => Ok(()),
        b'N' => Err("it answered N to an SSLRequest".to_owned()),
        other => Err(format!("it answered {other:#04x} to an SSLRequest")),
    }
}

fn address(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A connection to `127.0.0.1:port` (waiting 1 s at most) whose reads and writes wait 5 s
/// at most, and how to describe an error while talking on it.
fn connect(port: u16) -> Result<(TcpStream, impl Fn(io::Error) -> String), String> {
    let address = address(port);
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|error| format!("connecting to {address}: {error}"))?;
    let talking = move |error: io::Error| format!("talking to {address}: {error}");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(talking)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(talking)?;
    Ok((stream, talking))
}

/// `"<SQLSTATE>: <message>"` from the body of an ErrorResponse.
fn error_response_text(payload: &[u8]) -> String {
    let mut code = "";
    let mut message = "";
    for field in payload.split(|&byte| byte == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("");
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    format!("server said {code}: {message}")
}
