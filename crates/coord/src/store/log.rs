//! The Raft log and vote in RocksDB, with group commit.
//!
//! `append` writes the entries at once (so they are readable for
//! replication right away) and hands openraft's flush callback to the
//! flusher thread. The flusher fsyncs the WAL once for every callback that
//! queued up while the previous fsync ran, then acknowledges them all: one
//! fsync covers many entries under load, and a single writer still pays
//! only one.

// openraft's storage traits take and return `StorageError` by value; the
// helpers here return the same type rather than box it and unbox it at
// every trait boundary.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::mpsc;
use std::sync::Arc;

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

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = db.clone();
        // Detached on purpose: it ends when every LogStore clone (and so the
        // sender) is dropped, which is when the Raft instance shuts down.
        std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flusher(flush_db, rx))
            .expect("spawning a thread at start-up");
        LogStore { db, flusher: tx }
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

fn flusher(db: Arc<DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        if cfg!(feature = "mutation-ack-before-fsync") {
            // The broken guarantee `cargo xtask mutants` must see caught:
            // acknowledged first, stored (maybe) afterwards.
            for cb in waiting.drain(..) {
                cb.log_io_completed(Ok(()));
            }
        }
        // Every callback here was queued after its entries were written, so
        // this one fsync makes all of them durable.
        let result = fsync(&db);
        if let Err(e) = &result {
            tracing::error!(error = %e, "fsync of the Raft log failed; nothing written since the last good fsync is acknowledged");
        }
        for cb in waiting {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            cb.log_io_completed(r);
        }
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
        let mut batch = WriteBatch::default();
        for entry in entries {
            let raw = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.put_cf(self.cf_log(), index_key(entry.log_id.index), raw);
        }
        self.db.write(batch).map_err(write_err)?;
        self.flusher.send(callback).map_err(|_| write_err("the log fsync thread has stopped"))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Conflicting entries from `log_id` on are replaced by the leader's.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_log(), index_key(log_id.index), index_key(u64::MAX));
        self.db.write_opt(batch, &sync_opts()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first (synced): a crash between the two
        // writes leaves extra entries below it, which is harmless.
        self.put_meta_sync(PURGED_KEY, &log_id)
            .map_err(|e| StorageError::from(StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Delete, io_err(e))))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_log(), index_key(0), index_key(log_id.index + 1));
        self.db.write(batch).map_err(write_err)
    }
}
