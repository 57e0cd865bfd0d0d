//! Validation of names and free text that clients send.
//!
//! Checked twice: by `fleetctl`/the coordinator before a command is proposed
//! (so a bad request gets a clear error and costs no Raft round trip), and by
//! `apply` (so a command that slipped past can never corrupt the state).

use thiserror::Error;

/// Longest destination name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest lock reason, in bytes.
pub const MAX_REASON_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("{field} is empty; give a name such as `web-prod`")]
    Empty { field: &'static str },
    #[error("{field} `{value}` is longer than {max} characters; use a shorter name")]
    TooLong { field: &'static str, value: String, max: usize },
    #[error(
        "{field} `{value}` has the character {bad:?}; use lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit"
    )]
    BadChar { field: &'static str, value: String, bad: char },
    #[error("{field} is {len} bytes; keep it under {max} bytes")]
    TextTooLong { field: &'static str, len: usize, max: usize },
}

/// A destination (or app) name: `[a-z0-9][a-z0-9._-]*`, at most 63 chars.
pub fn validate_name(field: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { field });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { field, value: shorten(value), max: MAX_NAME_LEN });
    }
    for (i, c) in value.chars().enumerate() {
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(NameError::BadChar { field, value: value.to_string(), bad: c });
        }
    }
    Ok(())
}

/// The start of a value too long to repeat whole in an error message (an
/// error echoing a 70 KB name would not even fit in a gRPC header).
pub fn shorten(value: &str) -> String {
    const KEEP: usize = 40;
    match value.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
        None => value.to_string(),
    }
}

/// Free text (a lock reason): bounded size, anything else goes.
pub fn validate_text(field: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.len() > max {
        return Err(NameError::TextTooLong { field, len: value.len(), max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        let cases: &[(&str, bool)] = &[
            ("web", true),
            ("web-prod.eu_1", true),
            ("0day", true),
            ("", false),
            ("-web", false),
            (".web", false),
            ("Web", false),
            ("web prod", false),
            ("web/prod", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for (name, ok) in cases {
            assert_eq!(validate_name("destination", name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = validate_name("destination", "Web").unwrap_err().to_string();
        assert!(e.contains("use lowercase"), "{e}");
        let e = validate_text("reason", &"x".repeat(MAX_REASON_LEN + 1), MAX_REASON_LEN).unwrap_err().to_string();
        assert!(e.contains("keep it under"), "{e}");
    }

    #[test]
    fn a_long_value_is_not_repeated_whole() {
        let long = "ä".repeat(70_000);
        let e = validate_name("deployment id", &long).unwrap_err().to_string();
        assert!(e.len() < 300, "{} bytes: {}", e.len(), &e[..300]);
        assert!(e.contains("140000 bytes"), "{e}");
        assert_eq!(shorten("short"), "short");
    }
}
