//! The Raft log and vote in RocksDB.
//!
//! `append` writes the entries, fsyncs the WAL and acknowledges, all on the
//! calling task. openraft 0.9's core awaits each append's flush before it
//! does anything else, so two appends never overlap: a separate fsync
//! thread (this store had one until the sixteenth session) could never
//! combine two flushes, and only added two thread hand-offs to every
//! append, on the leader and on each follower (docs/benchmarks.md, "The
//! Raft log's fsync on the appending task").
//!
//! The newest entries are also kept in memory, decoded, as they were
//! appended (the [`Tail`], up to [`TAIL_BYTES`]): replication to each
//! follower and the apply read them from there, so an entry is decoded from
//! RocksDB only when a lagging follower or a restart needs an older one.
//! The tail is derived: it is cut with the log (truncate, purge) and starts
//! empty.

// openraft's storage traits take and return `StorageError` by value; the
// helpers here return the same type rather than box it and unbox it at
// every trait boundary.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{io_err, CF_LOG, CF_META};
use crate::raft_types::{LogId, NodeId, StorageError, TypeConfig};

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const PURGED_KEY: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().expect("log keys are written as 8 bytes"))
}

fn sync_opts() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(io_err(e)).into()
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(io_err(e)).into()
}

/// How much of the newest log the [`Tail`] keeps, counted in encoded
/// bytes: a few seconds of writes under load, a few hundred of the largest
/// entries.
pub const TAIL_BYTES: usize = 8 << 20;

/// The newest log entries, decoded, with consecutive indexes ending at the
/// last one appended (or empty).
struct Tail {
    /// Each entry and the size of its encoding.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
    /// Entries are dropped from the front while `bytes` exceeds this (the
    /// newest one is always kept).
    cap: usize,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail { entries: VecDeque::new(), bytes: 0, cap }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        let follows = match self.entries.back() {
            Some((last, _)) => last.log_id.index.checked_add(1) == Some(entry.log_id.index),
            None => true,
        };
        if !follows {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > self.cap && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drop the entries from `index` on (the log was truncated there).
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drop the entries up to `index` (the log was purged up to it).
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// The entries of `range` if the tail holds its start (it then holds
    /// every entry of the log from there on); `None` when the range starts
    /// before the tail.
    fn get<RB: RangeBounds<u64>>(&self, start: u64, range: &RB) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).unwrap_or(usize::MAX);
        Some(self.entries.iter().skip(skip).map(|(e, _)| e).take_while(|e| range.contains(&e.log_id.index)).cloned().collect())
    }
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    tail: Arc<Mutex<Tail>>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        Self::with_tail_bytes(db, TAIL_BYTES)
    }

    /// A log store keeping up to `tail_bytes` of the newest entries in memory.
    pub(crate) fn with_tail_bytes(db: Arc<DB>, tail_bytes: usize) -> Self {
        LogStore { db, tail: Arc::new(Mutex::new(Tail::new(tail_bytes))) }
    }

    /// Write `entries` (not yet synced) and keep them in the tail.
    fn write_entries(&self, entries: impl IntoIterator<Item = Entry<TypeConfig>>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let raw = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.put_cf(self.cf_log(), index_key(entry.log_id.index), &raw);
            appended.push((entry, raw.len()));
        }
        self.db.write(batch).map_err(write_err)?;
        let mut tail = self.tail();
        for (entry, size) in appended {
            tail.push(entry, size);
        }
        Ok(())
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // The tail is only ever changed in whole steps; a panic elsewhere
        // while it was held leaves it consistent.
        self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cf_log(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_LOG).expect("column family exists once the store is open")
    }

    fn cf_meta(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_META).expect("column family exists once the store is open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(self.cf_meta(), key).map_err(read_err)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(read_err),
        }
    }

    fn put_meta_sync<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), rocksdb::Error> {
        let raw = serde_json::to_vec(value).expect("openraft ids serialize");
        self.db.put_cf_opt(self.cf_meta(), key, raw, &sync_opts())
    }
}

/// Make every write so far durable. Failpoint `raft-log-fsync` (builds
/// with the `failpoints` feature) makes it slow (`sleep(MS)`) or fail
/// (`return`, `return(MESSAGE)`).
fn fsync(db: &DB) -> std::io::Result<()> {
    fail::fail_point!("raft-log-fsync", |msg| Err(std::io::Error::other(msg.unwrap_or_else(|| "injected fsync failure".into()))));
    let started = std::time::Instant::now();
    let r = db.flush_wal(true).map_err(|e| std::io::Error::other(e.to_string()));
    crate::observe::fsync(started.elapsed());
    r
}

/// Make `appended`'s entries durable, then tell openraft (on this task:
/// see the module's doc for why not on a thread of its own).
fn flush(db: &DB, callback: LogFlushed<TypeConfig>, appended: Instant) {
    let mut callback = Some(callback);
    if cfg!(feature = "mutation-ack-before-fsync") {
        // The broken guarantee `cargo xtask mutants` must see caught:
        // acknowledged first, stored (maybe) afterwards.
        if let Some(cb) = callback.take() {
            cb.log_io_completed(Ok(()));
        }
    }
    let result = fsync(db);
    if let Err(e) = &result {
        tracing::error!(error = %e, "fsync of the Raft log failed; nothing written since the last good fsync is acknowledged");
    }
    crate::observe::Stage::LogFlush.observe(appended.elapsed());
    if let Some(cb) = callback {
        cb.log_io_completed(result);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => *i + 1,
            Bound::Unbounded => 0,
        };
        if let Some(entries) = self.tail().get(start, &range) {
            return Ok(entries);
        }
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf_log(), rocksdb::IteratorMode::From(&index_key(start), rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(read_err)?;
            let index = index_of(&k);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED_KEY)?;
        let mut iter = self.db.iterator_cf(self.cf_log(), rocksdb::IteratorMode::End);
        let last = match iter.next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let entry: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
                Some(entry.log_id)
            }
        };
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta_sync(VOTE_KEY, vote).map_err(|e| StorageError::from(StorageIOError::write_vote(io_err(e))))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-applying from `last_applied`
        // after a crash, which openraft does anyway.
        let raw = serde_json::to_vec(&committed).expect("log ids serialize");
        self.db.put_cf(self.cf_meta(), COMMITTED_KEY, raw).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Failpoint `raft-log-append`: the write itself fails (`return`:
        // a full disk, say) before anything of this batch is stored.
        fail::fail_point!("raft-log-append", |msg| Err(write_err(
            msg.unwrap_or_else(|| "injected write failure: no space left on device".into())
        )));
        let appended = Instant::now();
        self.write_entries(entries)?;
        flush(&self.db, callback, appended);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Conflicting entries from `log_id` on are replaced by the leader's.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_log(), index_key(log_id.index), index_key(u64::MAX));
        let written = self.db.write_opt(batch, &sync_opts()).map_err(write_err);
        match written {
            Ok(()) => self.tail().truncate(log_id.index),
            // Whether the entries are gone is unknown: nothing is served
            // from memory until appends build the tail again.
            Err(_) => self.tail().clear(),
        }
        written
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first (synced): a crash between the two
        // writes leaves extra entries below it, which is harmless.
        self.put_meta_sync(PURGED_KEY, &log_id)
            .map_err(|e| StorageError::from(StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Delete, io_err(e))))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_log(), index_key(0), index_key(log_id.index + 1));
        self.db.write(batch).map_err(write_err)?;
        self.tail().purge(log_id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: &[Entry<TypeConfig>]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn tail_serves_what_it_holds_and_follows_truncate_purge_and_its_cap() {
        let mut t = Tail::new(100);
        for i in 1..=5 {
            t.push(entry(i), 10);
        }
        assert_eq!(t.get(2, &(2..4)).map(|e| indexes(&e)), Some(vec![2, 3]));
        assert_eq!(t.get(4, &(4..)).map(|e| indexes(&e)), Some(vec![4, 5]));
        // Past the end: nothing, as the log itself would answer.
        assert_eq!(t.get(9, &(9..)).map(|e| indexes(&e)), Some(vec![]));
        // Before the tail: not answered from memory.
        assert_eq!(t.get(0, &(0..3)).map(|e| indexes(&e)), None);
        t.truncate(4);
        assert_eq!(t.get(1, &(1..)).map(|e| indexes(&e)), Some(vec![1, 2, 3]));
        t.push(entry(4), 10);
        t.purge(2);
        assert_eq!(t.get(3, &(3..)).map(|e| indexes(&e)), Some(vec![3, 4]));
        assert_eq!(t.get(2, &(2..)), None);
        // Over the cap the oldest go: 3..=12 is 100 bytes.
        for i in 5..=12 {
            t.push(entry(i), 10);
        }
        assert_eq!((t.first_index(), t.bytes), (Some(3), 100));
        t.push(entry(13), 10);
        assert_eq!((t.first_index(), t.bytes), (Some(4), 100));
        // An entry larger than the cap still stays, alone.
        t.push(entry(14), 500);
        assert_eq!(t.get(14, &(14..)).map(|e| indexes(&e)), Some(vec![14]));
        assert_eq!((t.first_index(), t.bytes), (Some(14), 500));
        // An append that does not follow the tail starts it again.
        t.push(entry(40), 10);
        assert_eq!((t.first_index(), t.bytes), (Some(40), 10));
    }

    #[tokio::test]
    async fn reads_before_the_tail_come_from_rocksdb_and_agree_with_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = super::super::open(&dir.path().join("data"), "aaaa", 1).expect("open");
        // Room for about 10 blank entries.
        let size = serde_json::to_vec(&entry(1)).expect("encode").len();
        let mut store = LogStore::with_tail_bytes(db, size * 10);
        store.write_entries((1..=50).map(entry)).expect("append");
        let first_in_memory = store.tail().first_index().expect("a tail");
        assert!(first_in_memory > 30, "the tail keeps only the newest: starts at {first_in_memory}");
        let all = store.try_get_log_entries(1..=50).await.expect("read");
        assert_eq!(indexes(&all), (1..=50).collect::<Vec<_>>());
        let across = store.try_get_log_entries(first_in_memory - 3..first_in_memory + 2).await.expect("read");
        assert_eq!(indexes(&across), (first_in_memory - 3..first_in_memory + 2).collect::<Vec<_>>());
        // Truncated and appended again with another leader's entries: the
        // tail and the store both hold the new ones.
        store.truncate(LogId::new(CommittedLeaderId::new(1, 1), 45)).await.expect("truncate");
        let newer = (45..=47).map(|i| Entry { log_id: LogId::new(CommittedLeaderId::new(2, 2), i), payload: EntryPayload::Blank });
        store.write_entries(newer).expect("append");
        let from_memory = store.try_get_log_entries(44..).await.expect("read");
        assert_eq!(
            from_memory.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect::<Vec<_>>(),
            vec![(1, 44), (2, 45), (2, 46), (2, 47)]
        );
        store.tail().clear();
        let from_disk = store.try_get_log_entries(44..).await.expect("read");
        assert_eq!(from_disk, from_memory);
    }
}
