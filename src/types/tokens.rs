//! Secret values handed to clients and backends: bearer tokens and secret tokens.
//!
//! Both are random strings drawn from the operating system's CSPRNG. Their
//! `Display` implementation prints the secret (it is what clients send back),
//! but their `Debug` implementation redacts it so that secrets do not end up in
//! logs by accident.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// ASCII letters (both cases) and digits: the alphabet of tokens.
pub(crate) const ALPHANUMERIC: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Lowercase ASCII letters and digits: the alphabet of random entity names.
pub(crate) const LOWER_ALPHANUMERIC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Number of random characters in a freshly generated token (excluding any prefix).
const TOKEN_RANDOM_LEN: usize = 32;

/// Fills `buf` from the operating system's CSPRNG.
///
/// # Panics
///
/// Panics if the operating system cannot provide random bytes. There is no
/// safe fallback for generating secrets, so this is treated as fatal.
fn fill_os_random(buf: &mut [u8]) {
    if let Err(err) = getrandom::fill(buf) {
        panic!("the operating system's random number generator failed: {err}");
    }
}

/// Returns `len` characters drawn uniformly at random from `alphabet`, using
/// the operating system's CSPRNG.
///
/// Uniformity is obtained by rejection sampling: a random byte is only used if
/// it is below the largest multiple of `alphabet.len()` that fits in a byte, so
/// that every symbol is exactly equally likely (no modulo bias).
///
/// `alphabet` must be non-empty, at most 256 symbols long, and ASCII (it is
/// only ever called with the constants of this module).
///
/// # Panics
///
/// Panics if the operating system cannot provide random bytes, or if
/// `alphabet` breaks the rules above (a programming error, not caller data).
pub(crate) fn random_alphanumeric(len: usize, alphabet: &[u8]) -> String {
    assert!(
        !alphabet.is_empty() && alphabet.len() <= 256 && alphabet.is_ascii(),
        "random_alphanumeric needs a non-empty ASCII alphabet of at most 256 symbols"
    );
    let n = alphabet.len();
    // Bytes at or above `limit` are rejected; `limit` is a multiple of `n`.
    let limit = 256 - (256 % n);

    let mut out = String::with_capacity(len);
    let mut produced = 0;
    let mut buf = [0u8; 64];
    while produced < len {
        fill_os_random(&mut buf);
        for &byte in &buf {
            if produced == len {
                break;
            }
            let value = usize::from(byte);
            if value < limit {
                out.push(char::from(alphabet[value % n]));
                produced += 1;
            }
        }
    }
    out
}

/// A bearer token that authorizes a client to connect to a backend.
///
/// Plain tokens are 32 random ASCII letters and digits. *Static* tokens (which
/// stay valid for the whole life of a backend, rather than one connection)
/// carry the prefix `s.`.
///
/// Only a digest of the token ([`BearerToken::digest`]) is meant to be stored.
/// `Display` prints the token; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BearerToken(String);

impl BearerToken {
    /// The prefix that marks a static token.
    pub const STATIC_PREFIX: &'static str = "s.";

    /// Generates a fresh, non-static token: 32 random characters from
    /// `[A-Za-z0-9]`, drawn from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Panics if the operating system's random number generator fails.
    pub fn new_random() -> Self {
        Self(random_alphanumeric(TOKEN_RANDOM_LEN, ALPHANUMERIC))
    }

    /// Generates a fresh static token: `s.` followed by 32 random characters
    /// from `[A-Za-z0-9]`, drawn from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Panics if the operating system's random number generator fails.
    pub fn new_random_static() -> Self {
        let mut token = String::with_capacity(Self::STATIC_PREFIX.len() + TOKEN_RANDOM_LEN);
        token.push_str(Self::STATIC_PREFIX);
        token.push_str(&random_alphanumeric(TOKEN_RANDOM_LEN, ALPHANUMERIC));
        Self(token)
    }

    /// Whether this is a static token (it starts with `s.`).
    pub fn is_static(&self) -> bool {
        self.0.starts_with(Self::STATIC_PREFIX)
    }

    /// The token itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest of the token's bytes (32 bytes). This is what gets
    /// stored, so that a leaked database does not leak usable tokens.
    pub fn digest(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl From<String> for BearerToken {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for BearerToken {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Display for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_static() {
            f.write_str("BearerToken(\"s.****\")")
        } else {
            f.write_str("BearerToken(\"****\")")
        }
    }
}

/// A secret shared between the proxy and a backend, which the proxy sends to
/// the backend with every request so that the backend can tell that traffic
/// came through the proxy.
///
/// `Display` prints the secret; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretToken(String);

impl SecretToken {
    /// Generates a fresh secret: 32 random characters from `[A-Za-z0-9]`,
    /// drawn from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Panics if the operating system's random number generator fails.
    pub fn new_random() -> Self {
        Self(random_alphanumeric(TOKEN_RANDOM_LEN, ALPHANUMERIC))
    }

    /// The secret itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretToken {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretToken {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Display for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(\"****\")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_in(s: &str, alphabet: &[u8]) -> bool {
        s.bytes().all(|b| alphabet.contains(&b))
    }

    #[test]
    fn random_alphanumeric_has_requested_length_and_alphabet() {
        for len in [0, 1, 14, 32, 63, 64, 65, 200] {
            let s = random_alphanumeric(len, LOWER_ALPHANUMERIC);
            assert_eq!(s.len(), len);
            assert!(all_in(&s, LOWER_ALPHANUMERIC), "{s}");
        }
        let s = random_alphanumeric(100, b"x");
        assert_eq!(s, "x".repeat(100));
    }

    #[test]
    fn random_alphanumeric_uses_the_whole_alphabet() {
        // 36^... : with 5000 draws from 36 symbols, every symbol shows up
        // (probability of missing one is about 36 * (35/36)^5000, negligible).
        let s = random_alphanumeric(5000, LOWER_ALPHANUMERIC);
        for &b in LOWER_ALPHANUMERIC {
            assert!(
                s.as_bytes().contains(&b),
                "symbol {} never drawn",
                b as char
            );
        }
        let s = random_alphanumeric(5000, ALPHANUMERIC);
        for &b in ALPHANUMERIC {
            assert!(
                s.as_bytes().contains(&b),
                "symbol {} never drawn",
                b as char
            );
        }
    }

    #[test]
    fn random_alphanumeric_handles_full_byte_alphabet() {
        let alphabet: Vec<u8> = (0u8..128).chain(0u8..128).collect();
        let s = random_alphanumeric(50, &alphabet);
        assert_eq!(s.len(), 50);
    }

    #[test]
    fn bearer_token_random_properties() {
        let a = BearerToken::new_random();
        let b = BearerToken::new_random();
        assert_eq!(a.as_str().len(), 32);
        assert!(all_in(a.as_str(), ALPHANUMERIC));
        assert!(!a.is_static());
        assert_ne!(a, b);
    }

    #[test]
    fn static_bearer_token_properties() {
        let a = BearerToken::new_random_static();
        let b = BearerToken::new_random_static();
        assert_eq!(a.as_str().len(), 34);
        assert!(a.as_str().starts_with("s."));
        assert!(all_in(&a.as_str()[2..], ALPHANUMERIC));
        assert!(a.is_static());
        assert_ne!(a, b);
    }

    #[test]
    fn is_static_from_string() {
        assert!(BearerToken::from("s.abc".to_string()).is_static());
        assert!(!BearerToken::from("abc".to_string()).is_static());
        assert!(!BearerToken::from("S.abc").is_static());
        assert!(!BearerToken::from("").is_static());
    }

    #[test]
    fn digest_is_sha256_and_stable() {
        let token = BearerToken::from("abc");
        let digest = token.digest();
        assert_eq!(digest.len(), 32);
        // SHA-256("abc"), FIPS 180-2 test vector.
        let expected: [u8; 32] = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        assert_eq!(digest, expected);
        assert_eq!(token.digest(), BearerToken::from("abc").digest());

        let random = BearerToken::new_random();
        assert_eq!(random.digest().len(), 32);
        assert_eq!(random.digest(), random.clone().digest());
        assert_ne!(random.digest(), BearerToken::new_random().digest());
    }

    #[test]
    fn bearer_token_display_and_serde() {
        let token = BearerToken::from("s.Secret123");
        assert_eq!(token.to_string(), "s.Secret123");
        assert_eq!(token.as_str(), "s.Secret123");
        let json = serde_json::to_string(&token).unwrap();
        assert_eq!(json, "\"s.Secret123\"");
        let back: BearerToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back, token);
        assert!(serde_json::from_str::<BearerToken>("12").is_err());
    }

    #[test]
    fn bearer_token_debug_is_redacted() {
        let token = BearerToken::new_random();
        let debug = format!("{token:?}");
        assert_eq!(debug, "BearerToken(\"****\")");
        assert!(!debug.contains(token.as_str()));

        let token = BearerToken::new_random_static();
        let debug = format!("{token:?}");
        assert_eq!(debug, "BearerToken(\"s.****\")");
        assert!(!debug.contains(&token.as_str()[2..]));

        // Also when nested in other Debug output.
        let nested = format!("{:?}", Some(BearerToken::from("hunter2hunter2")));
        assert!(!nested.contains("hunter2"), "{nested}");
    }

    #[test]
    fn secret_token_properties() {
        let a = SecretToken::new_random();
        let b = SecretToken::new_random();
        assert_eq!(a.as_str().len(), 32);
        assert!(all_in(a.as_str(), ALPHANUMERIC));
        assert_ne!(a, b);
        assert_eq!(a.to_string(), a.as_str());

        let debug = format!("{a:?}");
        assert_eq!(debug, "SecretToken(\"****\")");
        assert!(!debug.contains(a.as_str()));

        let s = SecretToken::from("topsecret".to_string());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"topsecret\"");
        let back: SecretToken = serde_json::from_str("\"topsecret\"").unwrap();
        assert_eq!(back, s);
    }
}
