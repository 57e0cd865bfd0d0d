//! The witness record: one JSON line per adapter action, written by
//! `fleet-node` (`--witness FILE`) when the action ends and read by the
//! tests and the chaos harness to prove that no two actions on one
//! destination overlapped in time and that fencing tokens never went back.
//!
//! One definition for the writer and every reader: a field that is renamed
//! or missing makes a line fail to parse instead of reading as "absent".

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One finished adapter action. Every field is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessLine {
    /// The node that carried the action out.
    pub node: String,
    /// When that node's process started (ms since the epoch): a node killed
    /// after running a step and before its result was stored runs the same
    /// attempt again after its restart, under a new `boot_ms`.
    pub boot_ms: i64,
    pub destination: String,
    pub deployment: String,
    pub step: u32,
    pub undo: bool,
    pub attempt: u32,
    /// Fencing token of the destination lock the action was sent under.
    pub token: u64,
    /// `start`, `health`, `switch`, `stop-old` or `command`; `check` when a
    /// handed-over step's check found it done and it was not run again.
    pub action: String,
    /// Wall clock (ms since the epoch) when the action began.
    pub start_ms: i64,
    /// Wall clock (ms since the epoch) when it ended.
    pub end_ms: i64,
    pub ok: bool,
}

/// A witness line that does not parse.
#[derive(Debug, Error)]
#[error("witness line {line} is not a witness record ({source}): {text}")]
pub struct WitnessError {
    /// 1-based line number.
    pub line: usize,
    pub text: String,
    #[source]
    pub source: serde_json::Error,
}

/// The line as the node writes it (one JSON object, no newline).
impl std::fmt::Display for WitnessLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

/// Every complete line of a witness file's text. The writer appends each
/// line (newline included) with one write, so only a last line without its
/// newline can be unfinished: it is left out. Any other line that does not
/// parse is an error, never skipped.
pub fn parse(text: &str) -> Result<Vec<WitnessLine>, WitnessError> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .split('\n')
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|source| WitnessError { line: i + 1, text: l.to_string(), source }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> WitnessLine {
        WitnessLine {
            node: "node-1".into(),
            boot_ms: 1,
            destination: "dev".into(),
            deployment: "d1".into(),
            step: 2,
            undo: false,
            attempt: 1,
            token: 7,
            action: "start".into(),
            start_ms: 100,
            end_ms: 150,
            ok: true,
        }
    }

    #[test]
    fn round_trips() {
        let text = format!("{}\n{}\n", line(), line());
        assert_eq!(parse(&text).unwrap(), vec![line(), line()]);
    }

    #[test]
    fn an_unfinished_last_line_is_left_out() {
        let full = line().to_string();
        let text = format!("{full}\n{}", &full[..full.len() / 2]);
        assert_eq!(parse(&text).unwrap(), vec![line()]);
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse(&full).unwrap(), vec![], "no newline yet: still being written");
    }

    #[test]
    fn a_missing_renamed_or_mistyped_field_fails() {
        let mut v = serde_json::to_value(line()).unwrap();
        v.as_object_mut().unwrap().remove("end_ms");
        let missing = format!("{v}\n");
        assert!(parse(&missing).is_err(), "a line without end_ms parsed");
        let renamed = format!("{}\n", line().to_string().replace("\"end_ms\"", "\"finished_ms\""));
        assert!(parse(&renamed).is_err(), "a line with end_ms renamed parsed");
        let mistyped = format!("{}\n", line().to_string().replace("\"token\":7", "\"token\":\"7\""));
        assert!(parse(&mistyped).is_err(), "a line with a string token parsed");
        // A broken line in the middle is an error too, not skipped.
        let text = format!("{}\n{{not json\n{}\n", line(), line());
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, 2);
    }
}
