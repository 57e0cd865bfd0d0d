//! API tokens: what a token looks like and the hash the cluster keeps.
//!
//! `fleetctl tokens create` makes the secret (`fleet_` and 43 characters
//! of base64url, 256 random bits) and sends only its SHA-256; a
//! coordinator hashes the bearer token of each HTTP request and looks the
//! hash up in the replicated state.

use sha2::{Digest, Sha256};

/// Every token starts with this (so secret scanners can find leaked ones).
pub const TOKEN_PREFIX: &str = "fleet_";

/// SHA-256 of a token's secret, lowercase hex: what the cluster stores.
pub fn token_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Does `s` look like a token (the prefix and a sane length)? Checked
/// before hashing, so a mistyped header gets a useful answer.
pub fn looks_like_token(s: &str) -> bool {
    s.starts_with(TOKEN_PREFIX) && (TOKEN_PREFIX.len() + 16..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(token_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn what_looks_like_a_token() {
        for (s, ok) in [
            ("fleet_0123456789abcdef0123", true),
            ("fleet_short", false),
            ("Fleet_0123456789abcdef0123", false),
            ("0123456789abcdef0123456789", false),
            ("fleet_0123456789abcdef 0123", false),
        ] {
            assert_eq!(looks_like_token(s), ok, "{s:?}");
        }
    }
}
