//! Durable storage: one RocksDB database per coordinator holding the Raft
//! log, the vote and the state machine, in separate column families.
//!
//! Durability rules (see ARCHITECTURE.md):
//! * a log append is acknowledged to openraft only after the WAL is fsynced
//!   (on the appending task: see `log.rs`);
//! * a vote is written with a synced write before it is acknowledged;
//! * applying entries and recording `last_applied` is one atomic write batch;
//! * installing a snapshot replaces the whole state machine in one batch.

pub mod log;
pub mod sm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, DB};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const CF_LOG: &str = "log";
pub const CF_META: &str = "meta";
pub const CF_SM: &str = "sm";
pub const CF_SM_META: &str = "sm_meta";

/// Memtable memory of all column families together (see `open`).
const DB_WRITE_BUFFER_BYTES: usize = 32 << 20;
/// One memtable of one column family.
const CF_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// The block cache every column family shares (see `open`).
pub const BLOCK_CACHE_BYTES: usize = 8 << 20;
/// Which cluster and coordinator a data dir belongs to.
const IDENTITY_FILE: &str = "fleet-identity.json";

#[derive(Debug, Error)]
pub enum OpenError {
    #[error("cannot create data dir {path}: {source}; check that the parent exists and is writable")]
    Create { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not empty and is not a Fleet data dir (no RocksDB `CURRENT` file); point --data-dir at an empty or existing Fleet data dir"
    )]
    Foreign { path: PathBuf },
    #[error(
        "cannot open the data dir {path}: {source}. If it is damaged, move it aside and rejoin this coordinator as a new member (`fleetctl cluster remove ID`, then `cluster add-learner`)"
    )]
    Rocks { path: PathBuf, source: rocksdb::Error },
    #[error(
        "data dir {path} belongs to cluster {found_cluster} as coordinator {found_node}, but this coordinator is {node} of cluster {cluster} (from the CA certificate); use the right --data-dir, --id and CA, or an empty data dir"
    )]
    Mismatch { path: PathBuf, found_cluster: String, found_node: u64, cluster: String, node: u64 },
    #[error("data dir {path} has an unreadable identity record: {reason}; it is damaged, move it aside and rejoin this coordinator")]
    BadIdentity { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Identity {
    cluster_id: String,
    node_id: u64,
}

/// Open (or create) the data dir of coordinator `node_id` in `cluster_id`.
/// A directory that belongs to another cluster or coordinator is refused
/// before anything in it is changed.
pub fn open(path: &Path, cluster_id: &str, node_id: u64) -> Result<Arc<DB>, OpenError> {
    let exists = path.join("CURRENT").exists();
    if !exists {
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(OpenError::Foreign { path: path.to_path_buf() });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(|source| OpenError::Create { path: path.to_path_buf(), source })?;
            }
            Err(source) => return Err(OpenError::Create { path: path.to_path_buf(), source }),
        }
    }

    // The identity lives in a plain file checked BEFORE RocksDB opens: opening
    // replays and flushes the WAL, which would already change the directory.
    let identity_path = path.join(IDENTITY_FILE);
    let want = Identity { cluster_id: cluster_id.to_string(), node_id };
    if exists {
        let raw = std::fs::read(&identity_path)
            .map_err(|e| OpenError::BadIdentity { path: path.to_path_buf(), reason: format!("cannot read {IDENTITY_FILE}: {e}") })?;
        let found: Identity =
            serde_json::from_slice(&raw).map_err(|e| OpenError::BadIdentity { path: path.to_path_buf(), reason: e.to_string() })?;
        if found != want {
            return Err(OpenError::Mismatch {
                path: path.to_path_buf(),
                found_cluster: found.cluster_id,
                found_node: found.node_id,
                cluster: want.cluster_id,
                node: node_id,
            });
        }
    }

    let mut opts = Options::default();
    opts.create_if_missing(!exists);
    opts.create_missing_column_families(!exists);
    // Refuse to silently "repair" a damaged directory.
    opts.set_paranoid_checks(true);
    opts.set_max_background_jobs(2);
    // Memory: every column family's memtables together stay under
    // DB_WRITE_BUFFER_BYTES (RocksDB flushes the largest when they reach
    // it); by default each of the four could hold two 64 MiB memtables.
    opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES);
    // One block cache for every column family. Without it each one gets a
    // 32 MiB cache of its own; loading the state machine at start reads
    // every block of `sm`, and reads of old log entries fill `log`'s.
    let mut tables = BlockBasedOptions::default();
    tables.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    opts.set_block_based_table_factory(&tables);
    let cfs = [CF_LOG, CF_META, CF_SM, CF_SM_META].map(|name| {
        let mut cf = Options::default();
        cf.set_write_buffer_size(CF_WRITE_BUFFER_BYTES);
        cf.set_block_based_table_factory(&tables);
        ColumnFamilyDescriptor::new(name, cf)
    });
    let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| OpenError::Rocks { path: path.to_path_buf(), source })?;

    if !exists {
        write_identity(&identity_path, &want).map_err(|source| OpenError::Create { path: identity_path.clone(), source })?;
    }
    Ok(Arc::new(db))
}

fn write_identity(path: &Path, identity: &Identity) -> std::io::Result<()> {
    fleet_net::write_atomic(path, &serde_json::to_vec(identity).expect("plain struct serializes"))
}

/// What RocksDB holds in memory now, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Memtables of every column family (written, not yet flushed to tables).
    pub memtables: u64,
    /// The shared block cache (at most [`BLOCK_CACHE_BYTES`]).
    pub block_cache: u64,
    /// Index and filter blocks of the open table files.
    pub table_readers: u64,
}

/// RocksDB's memory by part, from its own estimates.
pub fn memory(db: &DB) -> Memory {
    let mut m = Memory::default();
    let int = |cf, name: &str| db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
    for name in [CF_LOG, CF_META, CF_SM, CF_SM_META] {
        let Some(cf) = db.cf_handle(name) else { continue };
        m.memtables += int(cf, "rocksdb.cur-size-all-mem-tables");
        m.table_readers += int(cf, "rocksdb.estimate-table-readers-mem");
        // Shared: every column family reports the same cache.
        m.block_cache = int(cf, "rocksdb.block-cache-usage");
    }
    m
}

/// Map any displayable error into openraft's storage error for `subject`.
pub(crate) fn io_err(e: impl std::fmt::Display) -> openraft::AnyError {
    openraft::AnyError::error(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::log::LogStore;
    use super::sm::StateMachine;
    use super::*;

    #[test]
    fn refuses_other_cluster_and_other_node() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        drop(open(&p, "aaaa", 1).unwrap());
        assert!(matches!(open(&p, "bbbb", 1), Err(OpenError::Mismatch { .. })));
        assert!(matches!(open(&p, "aaaa", 2), Err(OpenError::Mismatch { .. })));
        drop(open(&p, "aaaa", 1).unwrap());
    }

    /// Reading more than the block cache holds, from two column families,
    /// leaves RocksDB's cache at its shared bound. Each column family had
    /// a 32 MiB cache of its own before: loading a large state machine
    /// at start kept up to 32 MiB of `sm` blocks in memory, and old log
    /// reads as much again.
    #[test]
    fn block_cache_is_one_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("data"), "aaaa", 1).unwrap();
        let value = vec![7u8; 4096];
        for name in [CF_SM, CF_LOG] {
            let cf = db.cf_handle(name).unwrap();
            // 24 MiB per column family, flushed into table files.
            for i in 0..6_144u32 {
                db.put_cf(cf, format!("{name}/{i:08}"), &value).unwrap();
            }
            db.flush_cf(cf).unwrap();
        }
        assert!(memory(&db).table_readers > 0, "{:?}", memory(&db));
        for name in [CF_SM, CF_LOG] {
            let cf = db.cf_handle(name).unwrap();
            let read = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|kv| kv.unwrap().1.len()).sum::<usize>();
            assert_eq!(read, 6_144 * 4096);
        }
        let m = memory(&db);
        assert!(m.block_cache > (BLOCK_CACHE_BYTES / 2) as u64, "reading filled the cache: {m:?}");
        assert!(m.block_cache <= BLOCK_CACHE_BYTES as u64, "one cache, at most {BLOCK_CACHE_BYTES} bytes: {m:?}");
        let per_cf: u64 = [CF_SM, CF_LOG]
            .iter()
            .map(|n| db.property_int_value_cf(db.cf_handle(n).unwrap(), "rocksdb.block-cache-capacity").unwrap().unwrap())
            .max()
            .unwrap();
        assert_eq!(per_cf, BLOCK_CACHE_BYTES as u64, "every column family uses the shared cache");
    }

    /// A fresh store in a directory of its own, for openraft's suite.
    struct FreshStore;

    impl openraft::testing::StoreBuilder<crate::raft_types::TypeConfig, LogStore, StateMachine, tempfile::TempDir> for FreshStore {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), crate::raft_types::StorageError> {
            let setup = |e: &dyn std::fmt::Display| {
                crate::raft_types::StorageError::from(openraft::StorageIOError::write(io_err(format!("test store setup: {e}"))))
            };
            let dir = tempfile::tempdir().map_err(|e| setup(&e))?;
            let db = open(&dir.path().join("data"), "aaaa", 1).map_err(|e| setup(&e))?;
            let log = LogStore::new(db.clone());
            let (sm, _reader) = StateMachine::open(db)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage suite (log state, reads, truncate, purge,
    /// vote, apply of blank and membership entries, snapshot transfer)
    /// over the real log store and state machine, in-memory tail included.
    #[test]
    fn passes_openraft_storage_suite() {
        openraft::testing::Suite::test_all(FreshStore).expect("openraft's storage suite");
    }

    #[test]
    fn refuses_foreign_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        assert!(matches!(open(dir.path(), "aaaa", 1), Err(OpenError::Foreign { .. })));
    }
}
