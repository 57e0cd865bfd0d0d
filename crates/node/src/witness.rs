//! The witness file: one JSON line per adapter action
//! ([`fleet_core::witness::WitnessLine`]), appended when the action ends.
//! Tests read it to prove that no two actions on one destination
//! overlapped in time.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The record, defined once in fleet-core for the node and every reader.
pub use fleet_core::witness::WitnessLine;

#[derive(Debug)]
pub struct Witness {
    path: PathBuf,
    file: std::fs::File,
}

impl Witness {
    /// Open `path` for appending (created if missing).
    pub fn open(path: &Path) -> std::io::Result<Witness> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Witness { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one line with a single `write` (O_APPEND keeps lines of
    /// several writers whole).
    pub fn record(&self, line: &WitnessLine) -> std::io::Result<()> {
        let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        text.push('\n');
        (&self.file).write_all(text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_node_writes_the_readers_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.jsonl");
        let w = Witness::open(&path).unwrap();
        let line = WitnessLine {
            node: "node-1".into(),
            boot_ms: 5,
            destination: "dev".into(),
            deployment: "d1".into(),
            step: 0,
            undo: true,
            attempt: 2,
            token: 3,
            action: "check".into(),
            start_ms: 10,
            end_ms: 20,
            ok: false,
        };
        w.record(&line).unwrap();
        w.record(&line).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(fleet_core::witness::parse(&text).unwrap(), vec![line.clone(), line]);
    }
}
