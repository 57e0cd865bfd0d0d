//! Fencing tokens: per destination, the highest lock token this node has
//! seen, kept durably in `<data-dir>/fencing.json`.
//!
//! A deployment's steps carry the token of the destination lock it holds.
//! Tokens only grow (they are Raft log indexes), so an assignment with a
//! lower token than one already seen comes from a deployment that lost the
//! lock, and must not touch the destination.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::util::write_atomic;

#[derive(Debug, Error)]
pub enum FencingError {
    #[error(
        "cannot read fencing tokens from {path}: {source}; fix or remove the file (removing it forgets which deployments lost their lock)"
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON of {{destination: token}}: {source}; fix or remove the file")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot record fencing token in {path}: {source}; check the data dir's disk and permissions")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The verdict on one assignment's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Lower than `highest`, the highest seen for the destination.
    Stale {
        highest: u64,
    },
}

#[derive(Debug)]
pub struct Fencing {
    path: PathBuf,
    highest: BTreeMap<String, u64>,
}

impl Fencing {
    pub fn open(data_dir: &Path) -> Result<Fencing, FencingError> {
        let path = data_dir.join("fencing.json");
        let highest = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FencingError::Parse { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(FencingError::Read { path, source }),
        };
        Ok(Fencing { path, highest })
    }

    /// Check `token` for `destination`; a new highest is made durable
    /// (fsync) before this returns `Accept`.
    pub fn check(&mut self, destination: &str, token: u64) -> Result<Verdict, FencingError> {
        let seen = self.highest.get(destination).copied().unwrap_or(0);
        // `cargo xtask mutants` builds this check broken on purpose to show
        // the tests catch it; no other build has the feature.
        if token < seen && !cfg!(feature = "mutation-skip-fencing") {
            return Ok(Verdict::Stale { highest: seen });
        }
        if token > seen {
            let mut next = self.highest.clone();
            next.insert(destination.to_string(), token);
            let bytes = serde_json::to_vec_pretty(&next).map_err(|e| FencingError::Write { path: self.path.clone(), source: e.into() })?;
            write_atomic(&self.path, &bytes).map_err(|source| FencingError::Write { path: self.path.clone(), source })?;
            self.highest = next;
        }
        Ok(Verdict::Accept)
    }

    pub fn highest(&self, destination: &str) -> Option<u64> {
        self.highest.get(destination).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_only_grow_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.check("prod", 5).unwrap(), Verdict::Accept);
        assert_eq!(f.check("prod", 5).unwrap(), Verdict::Accept);
        assert_eq!(f.check("staging", 1).unwrap(), Verdict::Accept);
        assert_eq!(f.check("prod", 4).unwrap(), Verdict::Stale { highest: 5 });
        assert_eq!(f.check("prod", 9).unwrap(), Verdict::Accept);
        drop(f);
        let mut f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.highest("prod"), Some(9));
        assert_eq!(f.check("prod", 8).unwrap(), Verdict::Stale { highest: 9 });
        assert_eq!(f.check("staging", 1).unwrap(), Verdict::Accept);
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fencing.json"), "{not json").unwrap();
        let e = Fencing::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }
}
