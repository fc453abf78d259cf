//! [`TlsTestServer`]: a private throwaway server with TLS on, its CA and certificate made
//! with the `openssl` command at test time.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::embedded::Embedded;
use super::host::{self, UserIds};
use super::process::{self, log_tail};
use super::url::{local_url, percent_encode};
use super::{wire, HarnessError, TestDatabase, TestServer};

/// The command that makes the TLS test server's certificates.
const OPENSSL: &str = "openssl";
/// How long the test certificates are valid, in days.
const CERT_DAYS: u32 = 2;
/// The `openssl` configuration of the test certificates: extensions for a CA, and for a
/// server certificate valid for the host name `localhost` only (no IP address, so that
/// `127.0.0.1` with `sslmode=verify-full` is a host-name mismatch).
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = subject
prompt = no

[subject]
CN = plane-db test

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throwaway server with TLS on, made by [`private_tls_server`], and the CA files a
/// client needs to verify it.
///
/// Its certificate is signed by [`ca_cert`](Self::ca_cert) and valid for the host name
/// `localhost` only. The server accepts both TLS and plain connections (as a server with
/// `ssl = on` and the default `host` lines of `pg_hba.conf` does), on `127.0.0.1` only; a
/// client connecting to `localhost` reaches it there. Dropping it stops the server and
/// deletes its files, certificates included.
#[derive(Debug)]
pub struct TlsTestServer {
    server: TestServer,
    ca_cert: PathBuf,
    unrelated_ca_cert: PathBuf,
}

/// Starts a private throwaway server (as [`private_server`](super::private_server)) with
/// TLS on: makes a CA and a server certificate for `localhost` signed by it with the
/// `openssl` command, plus a second, unrelated CA (for tests of a wrong `sslrootcert`), and
/// turns on `ssl` with them.
///
/// Blocks for a few seconds. [`HarnessError::NoOpenssl`] if `openssl` is not installed,
/// [`HarnessError::NoPostgres`] if the server binaries are not.
pub fn private_tls_server() -> Result<TlsTestServer, HarnessError> {
    // Before initdb, so that a missing openssl is reported at once.
    run_openssl(Path::new("/"), "version", &[])?;
    let server = TestServer::start_embedded()?;
    let embedded = server.throwaway()?;
    let dir = embedded.root.join("tls");
    let (server_cert, server_key) = make_certificates(&dir, embedded.run_as())?;

    // The settings go into postgresql.conf (later lines win), read at the restart.
    server.stop()?;
    let setting = |path: &Path| path.display().to_string().replace('\'', "''");
    append_to_config(
        embedded,
        &format!(
            "\n# TLS for the plane-db tests\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
            setting(&server_cert),
            setting(&server_key)
        ),
    )?;
    server.start()?;

    // The server must now answer an SSLRequest with 'S'.
    if let Err(reason) = wire::offers_tls(embedded.port) {
        return Err(HarnessError::TlsNotOffered {
            reason,
            log: embedded.log_path.clone(),
            log_tail: log_tail(&embedded.log_path),
        });
    }
    Ok(TlsTestServer {
        ca_cert: dir.join("ca.crt"),
        unrelated_ca_cert: dir.join("unrelated-ca.crt"),
        server,
    })
}

impl TlsTestServer {
    /// The server, e.g. to [`stop`](TestServer::stop) and [`start`](TestServer::start) it.
    /// Its [`url_for`](TestServer::url_for) URLs name `127.0.0.1` without an `sslmode`
    /// (sqlx's default, `prefer`, encrypts without verifying).
    pub fn server(&self) -> &TestServer {
        &self.server
    }

    /// The port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.server.port().unwrap_or_default()
    }

    /// The PEM file of the CA that signed the server's certificate: the `sslrootcert` that
    /// verifies it.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The PEM file of a CA that has nothing to do with the server: an `sslrootcert` that
    /// must not verify it.
    pub fn unrelated_ca_cert(&self) -> &Path {
        &self.unrelated_ca_cert
    }

    /// `postgres://postgres@{host}:{port}/{database}?{params}`, the parameters
    /// percent-encoded, e.g. `url("localhost", "db", &[("sslmode", "verify-full"),
    /// ("sslrootcert", path)])`.
    pub fn url(&self, host: &str, database: &str, params: &[(&str, &str)]) -> String {
        let mut url = local_url(host, self.port(), database);
        for (i, (key, value)) in params.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&percent_encode(key));
            url.push('=');
            url.push_str(&percent_encode(value));
        }
        url
    }

    /// The URL of `database` as a careful client names it: host `localhost`,
    /// `sslmode=verify-full`, `sslrootcert` the [`ca_cert`](Self::ca_cert).
    pub fn verify_full_url(&self, database: &str) -> String {
        let ca = self.ca_cert.to_string_lossy();
        self.url(
            "localhost",
            database,
            &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
        )
    }

    /// Like [`create_database`](super::create_database), on this server. Its `url` is the
    /// [`verify_full_url`](Self::verify_full_url).
    pub async fn create_database(&self) -> Result<TestDatabase, HarnessError> {
        let database = self.server.create_database().await?;
        Ok(TestDatabase {
            url: self.verify_full_url(&database.name),
            name: database.name,
        })
    }
}

/// Makes, in the new directory `dir`, the CA (`ca.crt`), an unrelated CA
/// (`unrelated-ca.crt`) and the server's certificate and key signed by the CA, the latter
/// two owned by `run_as` as PostgreSQL wants them. Returns the server's certificate and key.
fn make_certificates(
    dir: &Path,
    run_as: Option<UserIds>,
) -> Result<(PathBuf, PathBuf), HarnessError> {
    // Readable by the server's user (which may not be this process's).
    host::create_dir(dir, 0o755)?;
    let config = dir.join("openssl.cnf");
    fs::write(&config, OPENSSL_CONFIG).map_err(HarnessError::io(format!(
        "could not write {}",
        config.display()
    )))?;
    let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for (name, subject) in [
        ("ca", "/CN=plane-db test CA"),
        ("unrelated-ca", "/CN=plane-db unrelated test CA"),
    ] {
        run_openssl(
            dir,
            &format!(
                "req -x509 -new {new_key} -keyout {name}.key -out {name}.crt -days {CERT_DAYS} \
                 -config openssl.cnf -extensions ca_ext"
            ),
            &["-subj", subject],
        )?;
    }
    run_openssl(
        dir,
        &format!("req -new {new_key} -keyout server.key -out server.csr -config openssl.cnf"),
        &["-subj", "/CN=localhost"],
    )?;
    run_openssl(
        dir,
        &format!(
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -CAserial ca.srl \
             -out server.crt -days {CERT_DAYS} -extfile openssl.cnf -extensions server_ext"
        ),
        &[],
    )?;

    // PostgreSQL refuses a key file that others can read, or that belongs to another user
    // (root apart).
    let (server_cert, server_key) = (dir.join("server.crt"), dir.join("server.key"));
    fs::set_permissions(&server_key, fs::Permissions::from_mode(0o600)).map_err(
        HarnessError::io(format!("could not make {} private", server_key.display())),
    )?;
    host::chown_all(&[&server_cert, &server_key], run_as)?;
    Ok((server_cert, server_key))
}

/// Appends `text` to the server's `postgresql.conf` (read when it next starts).
fn append_to_config(embedded: &Embedded, text: &str) -> Result<(), HarnessError> {
    let path = embedded.data_dir.join("postgresql.conf");
    let mut conf = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(HarnessError::io(format!(
            "could not open {}",
            path.display()
        )))?;
    writeln!(conf, "{text}").map_err(HarnessError::io(format!(
        "could not write {}",
        path.display()
    )))
}

/// Runs `openssl` in `dir` with the words of `args`, then `extra` (arguments that hold
/// spaces); [`HarnessError::NoOpenssl`] if it is not installed.
fn run_openssl(dir: &Path, args: &str, extra: &[&str]) -> Result<(), HarnessError> {
    let mut command = Command::new(OPENSSL);
    command
        .args(args.split_whitespace())
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null());
    let could_not_run = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => HarnessError::NoOpenssl,
        _ => HarnessError::Io {
            context: format!("could not run {OPENSSL}"),
            source,
        },
    };
    process::run(&mut command, could_not_run).map(drop)
}
