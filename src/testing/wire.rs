//! A few words of the PostgreSQL wire protocol, spoken with the standard library only, so
//! that they work whether or not the caller is inside an async runtime: is a server (or
//! PgBouncer) up, and does it offer TLS.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use super::{MAINTENANCE_DB, SUPERUSER};

/// Checks that the server on `127.0.0.1:port` accepts connections, like `pg_isready`: opens
/// a connection as the superuser to the maintenance database and waits for `ReadyForQuery`.
pub(super) fn probe(port: u16) -> Result<(), String> {
    let (mut stream, talking) = connect(port)?;

    // StartupMessage, protocol 3.0.
    let mut body = 196_608_u32.to_be_bytes().to_vec();
    for part in ["user", SUPERUSER, "database", MAINTENANCE_DB] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    stream.write_all(&message).map_err(&talking)?;

    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).map_err(&talking)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=1 << 20).contains(&length) {
            return Err(format!("malformed reply from {}", address(port)));
        }
        let mut payload = vec![0u8; length - 4];
        stream.read_exact(&mut payload).map_err(&talking)?;
        match header[0] {
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
