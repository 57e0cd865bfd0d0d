//! Fencing tokens: per destination, the highest lock token this node has
//! seen, kept durably in `<data-dir>`.
//!
//! A deployment's steps carry the token of the destination lock it holds.
//! Tokens only grow (they are Raft log indexes), so an assignment with a
//! lower token than one already seen comes from a deployment that lost the
//! lock, and must not touch the destination.
//!
//! On disk: `fencing.json`, a snapshot `{destination: token}`, and
//! `fencing.log`, a [`Journal`] of the tokens recorded since, one line each.
//! What the node knows is the highest of both per destination. A new
//! token costs one appended line, synced by group commit: when a hundred
//! deployments start at once, their first steps share a few `fdatasync`s
//! instead of each rewriting and syncing the whole snapshot in turn (which
//! held every first step back by up to 0.1 s, the node's runtime with it).
//! Every [`SNAPSHOT_EVERY`] new tokens the snapshot is rewritten (write,
//! fsync, rename), so the log stays short; the journal only ever drops
//! lines a snapshot already holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::journal::{Journal, Position};
use crate::util::write_atomic;

/// New tokens between two snapshots. The log's journal keeps twice as
/// many lines, so none it drops is missing from the newest snapshot.
pub const SNAPSHOT_EVERY: usize = 512;

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
    /// The token may act. With `sync`, it is a new highest whose record
    /// is written but not yet on disk: [`Fencing::sync`] it before acting.
    Accept { sync: Option<Position> },
    /// Lower than `highest`, the highest seen for the destination.
    Stale { highest: u64 },
}

/// One line of `fencing.log`.
#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    destination: String,
    token: u64,
}

pub struct Fencing {
    snapshot: PathBuf,
    log: Journal,
    inner: Mutex<Inner>,
}

struct Inner {
    highest: BTreeMap<String, u64>,
    /// Tokens logged since the snapshot was last written.
    since_snapshot: usize,
}

impl Fencing {
    pub fn open(data_dir: &Path) -> Result<Fencing, FencingError> {
        let snapshot = data_dir.join("fencing.json");
        let mut highest: BTreeMap<String, u64> = match std::fs::read(&snapshot) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FencingError::Parse { path: snapshot.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(FencingError::Read { path: snapshot, source }),
        };
        let log_path = data_dir.join("fencing.log");
        // A torn last line (a crash mid-append) is skipped: its step never
        // ran, since a step waits for its token's sync.
        let (log, seen, torn) =
            Journal::open::<Seen>(&log_path, 2 * SNAPSHOT_EVERY).map_err(|source| FencingError::Read { path: log_path.clone(), source })?;
        if torn > 0 {
            tracing::warn!(path = %log_path.display(), lines = torn, "fencing log lines that do not decode were dropped (a crash mid-write leaves one; the step it was for never ran)");
        }
        let logged = seen.len();
        for s in seen {
            let t = highest.entry(s.destination).or_insert(0);
            *t = (*t).max(s.token);
        }
        let fencing = Fencing { snapshot, log, inner: Mutex::new(Inner { highest, since_snapshot: logged }) };
        if logged > 0 {
            // Fold what the log held into the snapshot now: the count of
            // lines since it is then known to be zero.
            let mut g = fencing.inner();
            fencing.write_snapshot(&mut g)?;
        }
        Ok(fencing)
    }

    /// Check `token` for `destination`. A new highest is recorded at once
    /// (a later, lower token is refused from now on) and written to the
    /// log; the answer then carries the position to [`Fencing::sync`]
    /// before the step acts.
    pub fn check(&self, destination: &str, token: u64) -> Result<Verdict, FencingError> {
        let mut g = self.inner();
        let seen = g.highest.get(destination).copied().unwrap_or(0);
        // `cargo xtask mutants` builds this check broken on purpose to show
        // the tests catch it; no other build has the feature.
        if token < seen && !cfg!(feature = "mutation-skip-fencing") {
            return Ok(Verdict::Stale { highest: seen });
        }
        if token <= seen {
            return Ok(Verdict::Accept { sync: None });
        }
        if g.since_snapshot >= SNAPSHOT_EVERY {
            // Durable when it returns; the journal keeps the lines after it.
            self.write_snapshot(&mut g)?;
        }
        let at = self
            .log
            .write(&Seen { destination: destination.to_string(), token })
            .map_err(|source| FencingError::Write { path: self.log.path().to_path_buf(), source })?;
        g.highest.insert(destination.to_string(), token);
        g.since_snapshot += 1;
        Ok(Verdict::Accept { sync: Some(at) })
    }

    /// Return once the tokens recorded up to `at` are on disk; tokens
    /// checked at the same time share one `fdatasync`. Blocks: call it off
    /// the async runtime's workers.
    pub fn sync(&self, at: Position) -> Result<(), FencingError> {
        self.log.sync(at).map_err(|source| FencingError::Write { path: self.log.path().to_path_buf(), source })
    }

    pub fn highest(&self, destination: &str) -> Option<u64> {
        self.inner().highest.get(destination).copied()
    }

    fn write_snapshot(&self, g: &mut MutexGuard<'_, Inner>) -> Result<(), FencingError> {
        let write = |e: std::io::Error| FencingError::Write { path: self.snapshot.clone(), source: e };
        let bytes = serde_json::to_vec_pretty(&g.highest).map_err(|e| write(e.into()))?;
        write_atomic(&self.snapshot, &bytes).map_err(write)?;
        g.since_snapshot = 0;
        Ok(())
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Fencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fencing").field("snapshot", &self.snapshot).field("log", &self.log.path()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check, and make a new token durable as the agent does.
    fn accept(f: &Fencing, destination: &str, token: u64) -> Verdict {
        let v = f.check(destination, token).unwrap();
        if let Verdict::Accept { sync: Some(at) } = v {
            f.sync(at).unwrap();
        }
        v
    }

    fn is_accept(v: &Verdict) -> bool {
        matches!(v, Verdict::Accept { .. })
    }

    #[test]
    fn tokens_only_grow_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fencing::open(dir.path()).unwrap();
        assert!(matches!(accept(&f, "prod", 5), Verdict::Accept { sync: Some(_) }));
        assert_eq!(accept(&f, "prod", 5), Verdict::Accept { sync: None });
        assert!(is_accept(&accept(&f, "staging", 1)));
        assert_eq!(accept(&f, "prod", 4), Verdict::Stale { highest: 5 });
        assert!(is_accept(&accept(&f, "prod", 9)));
        drop(f);
        let f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.highest("prod"), Some(9));
        assert_eq!(accept(&f, "prod", 8), Verdict::Stale { highest: 9 });
        assert_eq!(accept(&f, "staging", 1), Verdict::Accept { sync: None });
    }

    #[test]
    fn a_new_token_appends_a_line_and_leaves_the_snapshot_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fencing::open(dir.path()).unwrap();
        accept(&f, "prod", 5);
        let snapshot = std::fs::read(dir.path().join("fencing.json")).ok();
        let v = f.check("staging", 7).unwrap();
        // Refused from the moment it is recorded, before it is synced.
        assert_eq!(f.check("staging", 6).unwrap(), Verdict::Stale { highest: 7 });
        let Verdict::Accept { sync: Some(at) } = v else { panic!("{v:?}") };
        let log = std::fs::read_to_string(dir.path().join("fencing.log")).unwrap();
        assert!(log.lines().last().is_some_and(|l| l.contains("\"staging\"") && l.contains('7')), "{log}");
        f.sync(at).unwrap();
        assert_eq!(std::fs::read(dir.path().join("fencing.json")).ok(), snapshot, "a new token must not rewrite the snapshot");
    }

    #[test]
    fn many_destinations_fold_into_snapshots_and_every_token_survives() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * SNAPSHOT_EVERY + 17;
        {
            let f = Fencing::open(dir.path()).unwrap();
            for round in 1..=2u64 {
                for i in 0..n {
                    accept(&f, &format!("d{i}"), round * 1000 + i as u64);
                }
            }
        }
        let log_lines = std::fs::read_to_string(dir.path().join("fencing.log")).unwrap().lines().count();
        assert!(log_lines <= 4 * SNAPSHOT_EVERY, "the log is bounded: {log_lines} lines");
        let f = Fencing::open(dir.path()).unwrap();
        for i in 0..n {
            assert_eq!(f.highest(&format!("d{i}")), Some(2000 + i as u64), "d{i}");
        }
        // What the log held is now in the snapshot alone.
        let snapshot: BTreeMap<String, u64> = serde_json::from_slice(&std::fs::read(dir.path().join("fencing.json")).unwrap()).unwrap();
        assert_eq!(snapshot.len(), n);
        assert_eq!(snapshot.get("d0"), Some(&2000));
    }

    #[test]
    fn a_snapshot_from_an_older_release_and_a_torn_log_line_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fencing.json"), r#"{"prod": 9, "staging": 3}"#).unwrap();
        std::fs::write(dir.path().join("fencing.log"), "{\"destination\":\"staging\",\"token\":4}\n{\"destination\":\"prod\",\"tok")
            .unwrap();
        let f = Fencing::open(dir.path()).unwrap();
        assert_eq!(f.highest("prod"), Some(9));
        assert_eq!(f.highest("staging"), Some(4));
        assert_eq!(f.check("staging", 3).unwrap(), Verdict::Stale { highest: 4 });
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fencing.json"), "{not json").unwrap();
        let e = Fencing::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }
}
