//! An append-only journal of JSON records, one per line, kept durable with
//! group commit.
//!
//! [`Journal::append`] writes a line and returns once it is on disk
//! (`fdatasync`). Appends that arrive while a sync runs share the next one:
//! whoever syncs covers every line written before it started.
//! [`Journal::write`] + [`Journal::sync`] are the same in two halves, so a
//! caller can act between the write (the line survives the process being
//! killed) and the sync (it survives the machine losing power); a
//! [`BackgroundSync`] thread does the second half for callers that do not
//! wait for it.
//!
//! The file holds at most `2 × keep` lines: when it would grow past that,
//! the last `keep` records are written to a new file that replaces it
//! atomically (write, fsync, rename, fsync the directory).
//!
//! Opening reads what a previous run left: every whole line that decodes
//! (a crash can leave the last line torn; it is skipped), or the JSON array
//! an older release wrote. The file is then rewritten in this format, so an
//! append never follows a torn line.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::util::write_atomic;

pub struct Journal {
    path: PathBuf,
    keep: usize,
    inner: Mutex<Inner>,
    /// Held while syncing, so one sync covers the appends waiting behind it.
    syncing: Mutex<()>,
    /// Lines known to be on disk (counted like `Inner::written`).
    synced: AtomicU64,
}

struct Inner {
    file: Arc<File>,
    /// The encoded last `keep` records (each ends in a newline).
    recent: VecDeque<Vec<u8>>,
    /// Lines in the current file.
    lines: usize,
    /// Lines appended since opening (a position for `synced`).
    written: u64,
    /// A write failed: the file may end in a partial line, so the next
    /// append rewrites it.
    damaged: bool,
}

impl Journal {
    /// Open the journal at `path` (created if missing), with the last
    /// `keep` records a previous run left, oldest first, and how many
    /// lines could not be read.
    pub fn open<T: Serialize + DeserializeOwned>(path: &Path, keep: usize) -> std::io::Result<(Journal, Vec<T>, usize)> {
        let keep = keep.max(1);
        let (mut records, skipped) = match std::fs::read(path) {
            Ok(bytes) => decode::<T>(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(e) => return Err(e),
        };
        let drop = records.len().saturating_sub(keep);
        records.drain(..drop);
        let recent = records.iter().map(encode).collect::<std::io::Result<VecDeque<_>>>()?;
        write_atomic(path, &recent.iter().flatten().copied().collect::<Vec<u8>>())?;
        let file = Arc::new(OpenOptions::new().append(true).open(path)?);
        let lines = recent.len();
        let journal = Journal {
            path: path.to_path_buf(),
            keep,
            inner: Mutex::new(Inner { file, recent, lines, written: 0, damaged: false }),
            syncing: Mutex::new(()),
            synced: AtomicU64::new(0),
        };
        Ok((journal, records, skipped))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `record`; returns once it is durable.
    pub fn append<T: Serialize>(&self, record: &T) -> std::io::Result<()> {
        let at = self.write(record)?;
        self.sync(at)
    }

    /// Write `record` to the file without waiting for the disk, and
    /// return its position for [`Journal::sync`]. Once this returns, the
    /// line survives the process being killed (it is in the kernel's page
    /// cache), not yet the machine losing power.
    pub fn write<T: Serialize>(&self, record: &T) -> std::io::Result<Position> {
        let line = encode(record)?;
        let mut g = self.inner();
        g.recent.push_back(line.clone());
        if g.recent.len() > self.keep {
            g.recent.pop_front();
        }
        g.written += 1;
        if g.damaged || g.lines >= 2 * self.keep {
            // A rewrite is durable when it returns: its position is synced.
            self.rewrite(&mut g)?;
            return Ok(Position(g.written));
        }
        if let Err(e) = (&*g.file).write_all(&line) {
            g.damaged = true;
            return Err(e);
        }
        g.lines += 1;
        Ok(Position(g.written))
    }

    /// Return once every line written up to `at` is on disk. One
    /// `fdatasync` covers every line written before it started, so callers
    /// that arrive while one runs share the next.
    pub fn sync(&self, at: Position) -> std::io::Result<()> {
        let _turn = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if self.synced.load(Ordering::Acquire) >= at.0 {
            return Ok(());
        }
        // Everything written so far, `at` included, is in `file` or in a
        // rewrite that was synced when it was made.
        let (file, upto) = {
            let g = self.inner();
            (g.file.clone(), g.written)
        };
        file.sync_data()?;
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// The position up to which every line is known to be on disk.
    pub fn synced(&self) -> Position {
        Position(self.synced.load(Ordering::Acquire))
    }

    /// Replace the file with the last `keep` records (durable on return).
    fn rewrite(&self, g: &mut MutexGuard<'_, Inner>) -> std::io::Result<()> {
        let bytes: Vec<u8> = g.recent.iter().flatten().copied().collect();
        write_atomic(&self.path, &bytes)?;
        g.file = Arc::new(OpenOptions::new().append(true).open(&self.path)?);
        g.lines = g.recent.len();
        g.damaged = false;
        self.synced.fetch_max(g.written, Ordering::AcqRel);
        Ok(())
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A place in the journal: the count of lines appended since it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(u64);

/// A thread that makes written lines durable for callers that do not wait:
/// [`BackgroundSync::sync_later`] returns at once, and the thread syncs up
/// to the furthest position asked of it, one `fdatasync` for all that
/// waited meanwhile. It stops when this is dropped.
pub struct BackgroundSync {
    tx: std::sync::mpsc::Sender<Position>,
}

impl BackgroundSync {
    pub fn start(journal: Arc<Journal>) -> std::io::Result<BackgroundSync> {
        let (tx, rx) = std::sync::mpsc::channel::<Position>();
        std::thread::Builder::new().name("journal-sync".into()).spawn(move || {
            while let Ok(mut at) = rx.recv() {
                while let Ok(later) = rx.try_recv() {
                    at = at.max(later);
                }
                if let Err(e) = journal.sync(at) {
                    tracing::error!(path = %journal.path().display(), error = %e, "cannot sync the journal to disk; a crash of this machine could lose its latest lines (check the disk and free space)");
                }
            }
        })?;
        Ok(BackgroundSync { tx })
    }

    /// Have every line up to `at` synced soon; returns at once.
    pub fn sync_later(&self, at: Position) {
        let _ = self.tx.send(at);
    }
}

fn encode<T: Serialize>(record: &T) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// The records in `bytes` and the number of lines that did not decode:
/// JSON lines, or one JSON array (the format before this one).
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> (Vec<T>, usize) {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_some_and(|i| bytes[i] == b'[') {
        return match serde_json::from_slice::<Vec<T>>(bytes) {
            Ok(list) => (list, 0),
            Err(_) => (Vec::new(), 1),
        };
    }
    let mut records = Vec::new();
    let mut skipped = 0;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
        match serde_json::from_slice(line) {
            Ok(r) => records.push(r),
            Err(_) => skipped += 1,
        }
    }
    (records, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn appends_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, old, skipped) = Journal::open::<u32>(&path, 10).unwrap();
        assert!(old.is_empty());
        assert_eq!(skipped, 0);
        for i in 0..5u32 {
            j.append(&i).unwrap();
        }
        assert_eq!(lines(&path), ["0", "1", "2", "3", "4"]);
        drop(j);
        let (_, old, _) = Journal::open::<u32>(&path, 10).unwrap();
        assert_eq!(old, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_file_is_rewritten_with_the_last_records_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _, _) = Journal::open::<u32>(&path, 3).unwrap();
        for i in 0..100u32 {
            j.append(&i).unwrap();
            let n = lines(&path).len();
            assert!((1..=6).contains(&n), "{n} lines after {i}");
            assert_eq!(lines(&path).last().map(String::as_str), Some(i.to_string().as_str()));
        }
        drop(j);
        let (_, old, _) = Journal::open::<u32>(&path, 3).unwrap();
        assert_eq!(old, [97, 98, 99]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_later_appends_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "1\n2\n{\"torn").unwrap();
        let (j, old, skipped) = Journal::open::<serde_json::Value>(&path, 10).unwrap();
        assert_eq!(old, [serde_json::json!(1), serde_json::json!(2)]);
        assert_eq!(skipped, 1);
        j.append(&serde_json::json!(3)).unwrap();
        drop(j);
        let (_, old, skipped) = Journal::open::<u32>(&path, 10).unwrap();
        assert_eq!((old, skipped), (vec![1, 2, 3], 0));
    }

    #[test]
    fn the_array_an_older_release_wrote_is_read_and_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "[1,2,3,4]").unwrap();
        let (j, old, _) = Journal::open::<u32>(&path, 3).unwrap();
        assert_eq!(old, [2, 3, 4]);
        assert_eq!(lines(&path), ["2", "3", "4"]);
        j.append(&5).unwrap();
        drop(j);
        assert_eq!(Journal::open::<u32>(&path, 3).unwrap().1, [3, 4, 5]);
    }

    #[test]
    fn a_written_line_is_in_the_file_before_its_sync_and_synced_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _, _) = Journal::open::<u32>(&path, 10).unwrap();
        let first = j.write(&1u32).unwrap();
        let second = j.write(&2u32).unwrap();
        assert!(first < second);
        // A process killed now leaves both lines (the page cache has them).
        assert_eq!(lines(&path), ["1", "2"]);
        assert!(j.synced() < first);
        // One sync covers every line written before it.
        j.sync(first).unwrap();
        assert!(j.synced() >= second);
        // A rewrite (past 2 × keep lines) is durable when written.
        drop(j);
        let (j, _, _) = Journal::open::<u32>(&path, 1).unwrap();
        let plain = j.write(&3u32).unwrap();
        assert!(j.synced() < plain);
        let rewritten = j.write(&4u32).unwrap();
        assert!(j.synced() >= rewritten);
        assert_eq!(lines(&path), ["4"]);
    }

    #[test]
    fn the_background_sync_reaches_the_furthest_position_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _, _) = Journal::open::<u32>(&path, 100).unwrap();
        let j = Arc::new(j);
        let syncer = BackgroundSync::start(j.clone()).unwrap();
        let mut last = j.write(&0u32).unwrap();
        for i in 1..20u32 {
            last = j.write(&i).unwrap();
            syncer.sync_later(last);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while j.synced() < last {
            assert!(std::time::Instant::now() < deadline, "synced {:?}, asked {last:?}", j.synced());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Stops with its owner; what it synced reads back in order.
        drop(syncer);
        assert_eq!(Journal::open::<u32>(&path, 100).unwrap().1, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn concurrent_appends_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _, _) = Journal::open::<u32>(&path, 1000).unwrap();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || (0..50u32).for_each(|i| j.append(&(t * 1000 + i)).unwrap()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(j);
        let (_, mut old, skipped) = Journal::open::<u32>(&path, 1000).unwrap();
        assert_eq!(skipped, 0);
        old.sort_unstable();
        let want: Vec<u32> = (0..4u32).flat_map(|t| (0..50).map(move |i| t * 1000 + i)).collect();
        assert_eq!(old, want);
    }
}
