//! The witness file: one JSON line per adapter action, appended when the
//! action ends. Tests read it to prove that no two actions on one
//! destination overlapped in time.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WitnessLine {
    pub node: String,
    pub destination: String,
    pub deployment: String,
    pub step: u32,
    pub undo: bool,
    pub attempt: u32,
    pub token: u64,
    /// `start`, `health`, `switch`, `stop-old` or `command`; `check` when a
    /// handed-over step's check found it done and it was not run again.
    pub action: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub ok: bool,
}

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
