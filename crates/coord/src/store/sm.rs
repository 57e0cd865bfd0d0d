//! The state machine: `fleet_core::State` in memory, persisted to RocksDB.
//!
//! Each `apply` call writes the keys the core changed (each once, with its
//! last value), `last_applied` and the last membership in ONE write batch,
//! so the persisted state always matches a prefix of the log. It is not
//! fsynced by itself: the next log append's fsync covers it (one WAL for
//! the whole database), and a crash before that only means re-applying
//! from the persisted `last_applied`.
//! Building a snapshot fsyncs the WAL before the snapshot becomes current,
//! because the log behind a snapshot is purged.
//!
//! The current snapshot's bytes live in a file of their own
//! (`<data-dir>/snapshots/`, written and fsynced before anything points at
//! it); RocksDB holds only a pointer to it (`SNAPSHOT_KEY`: file, meta,
//! size), written in the same batch as the state it matches. A snapshot
//! stored as one RocksDB value passed through a write batch, the WAL, a
//! memtable and a table flush: about four copies of it in memory at once
//! (docs/benchmarks.md, "Where a long history's memory goes"). A pointer
//! left by an older release (the framed snapshot itself) is still read.

// openraft's storage traits take and return `StorageError` by value; the
// helpers here return the same type rather than box it and unbox it at
// every trait boundary.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use fleet_core::{Response, State};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::{io_err, CF_META, CF_SM, CF_SM_META};
use crate::raft_types::{LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const APPLIED_KEY: &[u8] = b"applied";
const SNAPSHOT_KEY: &[u8] = b"snapshot";
/// The directory, inside the data dir, that holds the snapshot file.
const SNAPSHOT_DIR: &str = "snapshots";

/// What `SNAPSHOT_KEY` holds: which file is the current snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotPointer {
    file: String,
    bytes: u64,
    meta: SnapshotMeta,
}

/// What is applied, shared by the state machine (writer), the snapshot
/// builder and the gRPC services (readers).
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

#[derive(Serialize, Deserialize)]
struct AppliedMeta {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// The keys applied entries changed since a [`Taker`] last took them, so it
/// recomputes only what they touch.
#[derive(Debug, Default)]
pub struct Touched {
    pub keys: BTreeSet<String>,
    /// Too many keys to list, or the whole state was replaced (a snapshot
    /// was installed): anything may have changed.
    pub everything: bool,
}

/// More changed keys than this between two looks count as "everything".
const MAX_TOUCHED_KEYS: usize = 65_536;

/// Who takes touched keys; each has its own collection.
#[derive(Debug, Clone, Copy)]
pub enum Taker {
    /// The change journal behind `/api/events`.
    Journal = 0,
    /// The leader's scheduler.
    Scheduler = 1,
    /// The leader's destination sync: only destination definitions
    /// ([`fleet_core::state::defined_destination`]).
    Sync = 2,
}

const TAKERS: [Taker; 3] = [Taker::Journal, Taker::Scheduler, Taker::Sync];

impl Taker {
    /// Whether this taker collects `key`.
    fn wants(self, key: &str) -> bool {
        match self {
            Taker::Journal => true,
            // What the scheduler acts on: deployments, destinations, nodes
            // (a lock or a dedup record alone never makes it act).
            Taker::Scheduler => !matches!(fleet_core::state::touched(key), fleet_core::state::Touched::Other),
            Taker::Sync => fleet_core::state::defined_destination(key).is_some(),
        }
    }
}

/// Per [`Taker`], `None` until it first takes the touched keys: nothing is
/// collected for nobody.
type Collections = [Option<Touched>; TAKERS.len()];

/// The takers' collections, and a wake-up for each taker that is waiting
/// for a key it wants ([`StateReader::touched`]): a taker's task wakes when
/// an applied entry changed something it collects, not on every entry.
#[derive(Clone, Default)]
struct TouchedCell {
    collections: Arc<Mutex<Collections>>,
    wake: Arc<[Notify; TAKERS.len()]>,
}

impl TouchedCell {
    fn lock(&self) -> MutexGuard<'_, Collections> {
        self.collections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake the takers `woken` names (after the collections' lock is
    /// released). A wake-up nobody waits for is kept for the next wait.
    fn wake(&self, woken: [bool; TAKERS.len()]) {
        for (notify, woken) in self.wake.iter().zip(woken) {
            if woken {
                notify.notify_one();
            }
        }
    }
}

/// Record `key` as changed for every taker collecting it; `woken` marks
/// the takers that collected it.
fn touch(cell: &mut Collections, key: &str, woken: &mut [bool; TAKERS.len()]) {
    for ((taker, t), woken) in TAKERS.iter().zip(cell.iter_mut()).zip(woken.iter_mut()) {
        let Some(t) = t.as_mut().filter(|_| taker.wants(key)) else { continue };
        *woken = true;
        if t.everything {
            continue;
        }
        t.keys.insert(key.to_string());
        if t.keys.len() > MAX_TOUCHED_KEYS {
            *t = Touched { everything: true, ..Touched::default() };
        }
    }
}

/// Every collecting taker must look at everything; answers which those are.
fn touch_everything(cell: &mut Collections) -> [bool; TAKERS.len()] {
    let mut woken = [false; TAKERS.len()];
    for (t, woken) in cell.iter_mut().zip(woken.iter_mut()) {
        if let Some(t) = t {
            *t = Touched { everything: true, ..Touched::default() };
            *woken = true;
        }
    }
    woken
}

/// The state keys one `apply` call changed, each with its last value
/// (`None`: deleted). Writing only the last value of each key is the same
/// as writing every change in order, and a batch of requests changes some
/// keys again and again: `seq` once per request, a lock taken and released
/// in the same batch. Fewer writes is fewer memtable inserts, which were
/// a tenth of the machine at 64 clients (docs/benchmarks.md).
#[derive(Default)]
struct Writes(HashMap<String, Option<Vec<u8>>>);

impl Writes {
    fn extend(&mut self, changes: Vec<fleet_core::Change>) {
        for c in changes {
            self.0.insert(c.key, c.value);
        }
    }
}

/// Read access to the applied state for the services.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
    applied: Arc<RwLock<Applied>>,
    index: watch::Receiver<u64>,
    touched: TouchedCell,
    snapshot_bytes: Arc<AtomicU64>,
}

impl StateReader {
    /// Run `f` over the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let guard = self.applied.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Size of the current snapshot (built here or installed from the
    /// leader); 0 before the first.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// What this coordinator's RocksDB holds in memory now.
    pub fn rocksdb_memory(&self) -> super::Memory {
        super::memory(&self.db)
    }

    /// A receiver that changes whenever an entry is applied.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.index.clone()
    }

    /// The keys changed since `taker`'s last call. The first call answers
    /// `everything` and starts the collection (one of each taker per
    /// coordinator).
    pub fn take_touched(&self, taker: Taker) -> Touched {
        let mut cell = self.touched.lock();
        match cell[taker as usize].replace(Touched::default()) {
            Some(t) => t,
            None => Touched { everything: true, ..Touched::default() },
        }
    }

    /// Wait until an applied entry changed a key `taker` collects (or the
    /// whole state was replaced) since its last take; at once if one did.
    /// Never ends for a taker that has not taken yet: it collects nothing.
    /// May end with nothing to take (a change it already took): take, and
    /// look.
    pub async fn touched(&self, taker: Taker) {
        self.touched.wake[taker as usize].notified().await
    }
}

pub struct StateMachine {
    db: Arc<DB>,
    applied: Arc<RwLock<Applied>>,
    index_tx: Arc<watch::Sender<u64>>,
    snapshot_seq: u64,
    touched: TouchedCell,
    snapshot_bytes: Arc<AtomicU64>,
    snapshot_lock: SnapshotLock,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(io_err(e)).into()
}

fn read_sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_state_machine(io_err(e)).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, io_err(e)).into()
}

fn sync_opts() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

impl StateMachine {
    /// Load the persisted state machine (the data dir alone is enough).
    pub fn open(db: Arc<DB>) -> Result<(Self, StateReader), StorageError> {
        let sm_cf = db.cf_handle(CF_SM).expect("column family exists once the store is open");
        let meta_cf = db.cf_handle(CF_SM_META).expect("column family exists once the store is open");
        let mut pairs = Vec::new();
        for item in db.iterator_cf(sm_cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(read_sm_err)?;
            let key = String::from_utf8(k.to_vec()).map_err(read_sm_err)?;
            pairs.push((key, v));
        }
        let state = State::load(pairs).map_err(read_sm_err)?;
        let meta: Option<AppliedMeta> = match db.get_cf(meta_cf, APPLIED_KEY).map_err(read_sm_err)? {
            None => None,
            Some(raw) => Some(serde_json::from_slice(&raw).map_err(read_sm_err)?),
        };
        let (last_applied, membership) = meta.map(|m| (m.last_applied, m.membership)).unwrap_or_default();
        let index = last_applied.map(|l| l.index).unwrap_or(0);
        let applied = Arc::new(RwLock::new(Applied { state, last_applied, membership }));
        let (tx, rx) = watch::channel(index);
        let touched = TouchedCell::default();
        let snapshot_bytes = Arc::new(AtomicU64::new(0));
        let reader = StateReader {
            db: db.clone(),
            applied: applied.clone(),
            index: rx,
            touched: touched.clone(),
            snapshot_bytes: snapshot_bytes.clone(),
        };
        let sm = StateMachine {
            db,
            applied,
            index_tx: Arc::new(tx),
            snapshot_seq: 0,
            touched,
            snapshot_bytes,
            snapshot_lock: SnapshotLock::default(),
        };
        let current = match sm.pointer()? {
            Some(Stored::File(p)) => {
                sm.snapshot_bytes.store(p.bytes, Ordering::Relaxed);
                Some(p.file)
            }
            Some(Stored::Inline(_, data)) => {
                sm.snapshot_bytes.store(data.len() as u64, Ordering::Relaxed);
                None
            }
            None => None,
        };
        // Files no pointer names: a snapshot written by a call that did not
        // finish (a crash between the file and its batch), or replaced.
        prune_snapshots(&sm.db, current.as_deref());
        Ok((sm, reader))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family exists once the store is open")
    }

    fn pointer(&self) -> Result<Option<Stored>, StorageError> {
        let Some(raw) = self.db.get_cf(self.cf(CF_META), SNAPSHOT_KEY).map_err(read_sm_err)? else {
            return Ok(None);
        };
        if raw.first() == Some(&b'{') {
            return Ok(Some(Stored::File(serde_json::from_slice(&raw).map_err(read_sm_err)?)));
        }
        // An older release's record: the framed meta, then the data.
        let (meta, data) = split_frame(&raw).map_err(read_sm_err)?;
        let meta: SnapshotMeta = serde_json::from_slice(meta).map_err(read_sm_err)?;
        Ok(Some(Stored::Inline(meta, data.to_vec())))
    }

    fn stored_snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        Ok(match self.pointer()? {
            None => None,
            Some(Stored::Inline(meta, data)) => Some((meta, data)),
            Some(Stored::File(p)) => {
                let path = snapshot_dir(&self.db).join(&p.file);
                let damaged = |what: String| {
                    read_sm_err(format!(
                        "the current snapshot file {} {what}; this data dir is damaged: move it aside and rejoin this coordinator as a new member (`fleetctl cluster remove ID`, then `cluster add-learner`)",
                        path.display()
                    ))
                };
                let data = std::fs::read(&path).map_err(|e| damaged(format!("cannot be read ({e})")))?;
                if data.len() as u64 != p.bytes {
                    return Err(damaged(format!("has {} bytes where {} were written", data.len(), p.bytes)));
                }
                Some((p.meta, data))
            }
        })
    }
}

/// Where the current snapshot is.
enum Stored {
    File(SnapshotPointer),
    Inline(SnapshotMeta, Vec<u8>),
}

fn snapshot_dir(db: &DB) -> PathBuf {
    db.path().join(SNAPSHOT_DIR)
}

/// Remove every snapshot file but `keep` (best effort: a file left behind
/// costs disk space, not correctness).
fn prune_snapshots(db: &DB, keep: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(snapshot_dir(db)) else { return };
    for e in entries.flatten() {
        if keep != e.file_name().to_str() {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot remove an old snapshot file");
            }
        }
    }
}

/// Serializes storing snapshots: the builder runs apart from the state
/// machine, and one's pruning must not remove the file the other's
/// pointer, written in between, names.
type SnapshotLock = Arc<Mutex<()>>;

/// Write `data` as the current snapshot together with `batch` (the state
/// it matches, when installing): the file first, then the batch with the
/// pointer to it, synced, then older files removed.
/// The caller holds the [`SnapshotLock`].
fn store_snapshot(db: &DB, meta: &SnapshotMeta, data: &[u8], batch: WriteBatch) -> Result<(), StorageError> {
    let (file, bytes) = write_snapshot_file(db, meta, |w| w.write_all(data)).map_err(snap_err)?;
    point_at_snapshot(db, &file, bytes, meta, batch)
}

/// Write a new snapshot file with `write`, fsynced with its directory.
/// It becomes the current snapshot only when [`point_at_snapshot`] names
/// it. Answers the file's name and size.
fn write_snapshot_file(
    db: &DB,
    meta: &SnapshotMeta,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<(String, u64)> {
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    let dir = snapshot_dir(db);
    std::fs::create_dir_all(&dir)?;
    let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
    // Unique within this data dir: the index, the time and a counter (a
    // snapshot id comes from the leader and is not a file name).
    let file = format!("{index:020}-{}-{}.snap", fleet_net::now_ms(), WRITTEN.fetch_add(1, Ordering::Relaxed));
    let bytes = fleet_net::write_atomic_with(&dir.join(&file), write)?;
    Ok((file, bytes))
}

/// Make `file` the current snapshot: its pointer in `batch`, written
/// synced, then every other file removed. The caller holds the
/// [`SnapshotLock`].
fn point_at_snapshot(db: &DB, file: &str, bytes: u64, meta: &SnapshotMeta, mut batch: WriteBatch) -> Result<(), StorageError> {
    let pointer = SnapshotPointer { file: file.to_string(), bytes, meta: meta.clone() };
    let cf = db.cf_handle(CF_META).expect("column family exists once the store is open");
    batch.put_cf(cf, SNAPSHOT_KEY, serde_json::to_vec(&pointer).expect("snapshot pointer serializes"));
    db.write_opt(batch, &sync_opts()).map_err(snap_err)?;
    prune_snapshots(db, Some(file));
    Ok(())
}

// Snapshot data: a framed JSON header (last_applied + membership), then the
// state's key/value pairs, each framed. Framing: u32 big-endian length + bytes.

fn push_frame(out: &mut (impl std::io::Write + ?Sized), bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(&(bytes.len() as u32).to_be_bytes())?;
    out.write_all(bytes)
}

fn split_frame(buf: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    if buf.len() < 4 {
        return Err("truncated snapshot frame");
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("checked length")) as usize;
    let rest = &buf[4..];
    if rest.len() < len {
        return Err("truncated snapshot frame");
    }
    Ok((&rest[..len], &rest[len..]))
}

/// Write a snapshot to `out`: `meta`, then every pair of the state
/// machine's column family as `view` sees it (the pairs the state loads
/// from at start, in key order), each framed as it is read and read past
/// the block cache. The snapshot is never in memory whole: building it in
/// a buffer took, with 20 MB of locks, about 80 MB of a follower's 160 MB
/// peak heap (docs/benchmarks.md, "The memory after a lock fill").
fn encode_snapshot(db: &DB, view: &rocksdb::Snapshot<'_>, meta: &AppliedMeta, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    push_frame(out, &serde_json::to_vec(meta).expect("applied meta serializes"))?;
    let cf = db.cf_handle(CF_SM).expect("column family exists once the store is open");
    let mut opts = rocksdb::ReadOptions::default();
    opts.fill_cache(false);
    for item in view.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(std::io::Error::other)?;
        push_frame(out, &k)?;
        push_frame(out, &v)?;
    }
    Ok(())
}

/// The state machine's keys and values, as a snapshot carries them.
/// A snapshot's keys and values, borrowed from its bytes (a large snapshot
/// is not copied once more while it is installed).
type Pairs<'a> = Vec<(&'a str, &'a [u8])>;

fn decode_snapshot(buf: &[u8]) -> Result<(AppliedMeta, Pairs<'_>), String> {
    let (meta, mut rest) = split_frame(buf)?;
    let meta: AppliedMeta = serde_json::from_slice(meta).map_err(|e| e.to_string())?;
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let (k, r) = split_frame(rest)?;
        let (v, r) = split_frame(r)?;
        pairs.push((std::str::from_utf8(k).map_err(|e| e.to_string())?, v));
        rest = r;
    }
    Ok((meta, pairs))
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    applied: Arc<RwLock<Applied>>,
    seq: u64,
    snapshot_bytes: Arc<AtomicU64>,
    snapshot_lock: SnapshotLock,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Writes the snapshot straight to its file and answers its meta with
    /// no bytes: openraft 0.9 keeps only the meta of a built snapshot, and
    /// reads the bytes through `get_current_snapshot` (the file) when it
    /// sends them.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _one_at_a_time = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (meta, applied_meta, view) = {
            // The state as RocksDB holds it at `last_applied`: every apply
            // writes its changes to RocksDB under the state's write lock,
            // and an install replaces them holding the snapshot lock, so
            // under this read lock the column family matches the state.
            // Applies wait only while the view is taken, not while the
            // snapshot is written from it.
            let guard = self.applied.read().unwrap_or_else(|p| p.into_inner());
            let held = std::time::Instant::now();
            let snapshot_id = match guard.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
                None => format!("0-0-{}", self.seq),
            };
            let meta = SnapshotMeta { last_log_id: guard.last_applied, last_membership: guard.membership.clone(), snapshot_id };
            let applied_meta = AppliedMeta { last_applied: guard.last_applied, membership: guard.membership.clone() };
            let view = self.db.snapshot();
            drop(guard);
            crate::observe::snapshot_hold(held.elapsed());
            (meta, applied_meta, view)
        };
        let (file, bytes) =
            write_snapshot_file(&self.db, &meta, |w| encode_snapshot(&self.db, &view, &applied_meta, w)).map_err(snap_err)?;
        drop(view);
        // The log up to `last_applied` may be purged once this returns, so
        // the applied state it replaces must be on disk first.
        self.db.flush_wal(true).map_err(snap_err)?;
        point_at_snapshot(&self.db, &file, bytes, &meta, WriteBatch::default())?;
        self.snapshot_bytes.store(bytes, Ordering::Relaxed);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let guard = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((guard.last_applied, guard.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = std::time::Instant::now();
        let mut responses = Vec::new();
        let mut batch = WriteBatch::default();
        let sm_cf = self.cf(CF_SM);
        let mut guard = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut touched = self.touched.lock();
        let mut woken = [false; TAKERS.len()];
        let mut writes = Writes::default();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            guard.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => vec![Response::Noop],
                EntryPayload::Membership(m) => {
                    guard.membership = StoredMembership::new(Some(entry.log_id), m);
                    vec![Response::Noop]
                }
                EntryPayload::Normal(proposal) => {
                    let (response, changes) = guard.state.apply_entry(entry.log_id.index, &proposal);
                    writes.extend(changes);
                    response
                }
            };
            responses.push(response);
        }
        let Some(last) = last else { return Ok(responses) };
        for (key, value) in writes.0 {
            match value {
                Some(v) => batch.put_cf(sm_cf, key.as_bytes(), v),
                None => batch.delete_cf(sm_cf, key.as_bytes()),
            }
            touch(&mut touched, &key, &mut woken);
        }
        let meta = AppliedMeta { last_applied: guard.last_applied, membership: guard.membership.clone() };
        batch.put_cf(self.cf(CF_SM_META), APPLIED_KEY, serde_json::to_vec(&meta).expect("applied meta serializes"));
        self.db.write(batch).map_err(sm_err)?;
        drop(touched);
        drop(guard);
        self.touched.wake(woken);
        self.index_tx.send_replace(last.index);
        crate::observe::Stage::Apply.observe(started.elapsed());
        tracing::debug!(index = last.index, entries = responses.len(), took_us = started.elapsed().as_micros() as u64, "applied");
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            applied: self.applied.clone(),
            seq: self.snapshot_seq,
            snapshot_bytes: self.snapshot_bytes.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let (applied_meta, pairs) = decode_snapshot(&data).map_err(snap_err)?;
        let state = State::load(pairs.iter().copied()).map_err(snap_err)?;

        // Replace the whole state machine, its applied marker and the stored
        // snapshot in one synced batch: a crash leaves either the old state
        // or the new one, never a mix.
        let mut batch = WriteBatch::default();
        let sm_cf = self.cf(CF_SM);
        batch.delete_range_cf(sm_cf, b"".as_slice(), [0xffu8; 1].as_slice());
        for (k, v) in &pairs {
            batch.put_cf(sm_cf, k.as_bytes(), v);
        }
        let new_meta = AppliedMeta { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        batch.put_cf(self.cf(CF_SM_META), APPLIED_KEY, serde_json::to_vec(&new_meta).expect("applied meta serializes"));
        // Held until the state is swapped too: a snapshot built in between
        // would read the new pairs from RocksDB under the old meta.
        let _one_at_a_time = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        store_snapshot(&self.db, meta, &data, batch)?;
        self.snapshot_bytes.store(data.len() as u64, Ordering::Relaxed);
        debug_assert_eq!(applied_meta.last_applied, meta.last_log_id);

        let mut guard = self.applied.write().unwrap_or_else(|p| p.into_inner());
        guard.state = state;
        guard.last_applied = meta.last_log_id;
        guard.membership = meta.last_membership.clone();
        let woken = touch_everything(&mut self.touched.lock());
        drop(guard);
        self.touched.wake(woken);
        self.index_tx.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.stored_snapshot()?.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use fleet_core::{Command, Proposal, Request};
    use openraft::{CommittedLeaderId, Entry};

    use super::*;

    fn request(id: &str, command: Command) -> Request {
        Request { request_id: Some(id.to_string()), at_ms: 1_000, command, origin: None }
    }

    fn acquire(id: &str, destination: &str) -> Request {
        let command = Command::AcquireLock { destination: destination.into(), holder: "ci".into(), reason: "test".into() };
        request(id, command)
    }

    fn destination(name: &str, adapter: &str) -> fleet_core::manifest::Destination {
        fleet_core::manifest::Destination {
            name: name.into(),
            adapter: adapter.into(),
            selector: Default::default(),
            queue: Default::default(),
            node_wait_ms: 1_000,
        }
    }

    /// A state machine on a fresh data dir (kept while the dir lives).
    fn fresh() -> (tempfile::TempDir, Arc<DB>, StateMachine, StateReader) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = super::super::open(&dir.path().join("data"), "aaaa", 1).expect("store opens");
        let (sm, reader) = StateMachine::open(db.clone()).expect("state machine opens");
        (dir, db, sm, reader)
    }

    /// Request `r{i}`: the lock of destination `d{i}`, with the longest reason allowed.
    fn big_lock(i: u64) -> Request {
        let reason = "r".repeat(fleet_core::names::MAX_REASON_LEN);
        request(&format!("r{i}"), Command::AcquireLock { destination: format!("d{i}"), holder: "ci".into(), reason })
    }

    fn normal(index: u64, requests: Vec<Request>) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Proposal(requests)) }
    }

    /// One apply call writes each key once, with its last value: a lock
    /// taken and released within it is gone from disk, and the state read
    /// back from RocksDB is the state applied in memory.
    #[test]
    fn one_apply_call_persists_the_last_value_of_each_key() {
        let (_dir, db, mut sm, reader) = fresh();
        let release = request("r3", Command::ReleaseLock { destination: "a".into(), holder: "ci".into() });
        let entries = vec![
            normal(1, vec![acquire("r1", "a"), acquire("r2", "b")]),
            normal(2, vec![release, acquire("r4", "c")]),
            Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 3), payload: EntryPayload::Blank },
        ];
        let responses = futures::executor::block_on(sm.apply(entries)).expect("apply");
        assert_eq!(responses.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);

        let sm_cf = db.cf_handle(CF_SM).expect("cf");
        assert!(db.get_cf(sm_cf, b"lock/a").expect("read").is_none(), "a lock released in the same call stays deleted");
        assert!(db.get_cf(sm_cf, b"lock/b").expect("read").is_some());
        assert!(db.get_cf(sm_cf, b"lock/c").expect("read").is_some());
        for id in ["r1", "r2", "r3", "r4"] {
            assert!(db.get_cf(sm_cf, format!("dedup/{id}")).expect("read").is_some(), "dedup/{id} persisted");
        }

        let in_memory = reader.read(|a| (a.state.clone(), a.last_applied));
        let (_again, reread) = StateMachine::open(db).expect("state machine reopens");
        assert_eq!(reread.read(|a| (a.state.clone(), a.last_applied)), in_memory);
        assert_eq!(in_memory.1.map(|l| l.index), Some(3));
    }

    /// Each taker gets the keys applied since its last take: the
    /// scheduler what it acts on (a destination and its lock, not a dedup
    /// record), the sync only destination definitions (a lock
    /// on a destination is not a new definition to sync at once).
    #[test]
    fn each_taker_collects_the_keys_it_wants_from_its_first_take() {
        let (_dir, _db, mut sm, reader) = fresh();
        for taker in TAKERS {
            assert!(reader.take_touched(taker).everything, "{taker:?}'s first take looks at everything");
        }
        let web = destination("web", "process");
        let entries = vec![
            normal(1, vec![request("r1", Command::PutDestinations { destinations: vec![web] })]),
            normal(2, vec![acquire("r2", "web")]),
        ];
        futures::executor::block_on(sm.apply(entries)).expect("apply");

        let sync = reader.take_touched(Taker::Sync);
        assert!(!sync.everything);
        assert_eq!(sync.keys.into_iter().collect::<Vec<_>>(), ["dest/web"]);
        let scheduler = reader.take_touched(Taker::Scheduler);
        assert!(scheduler.keys.contains("dest/web") && scheduler.keys.contains("lock/web"), "{:?}", scheduler.keys);
        assert!(!scheduler.keys.iter().any(|k| k.starts_with("dedup/")), "dedup records are nothing it acts on: {:?}", scheduler.keys);
        assert!(reader.take_touched(Taker::Sync).keys.is_empty(), "a take empties the taker's collection");
        assert!(!reader.take_touched(Taker::Journal).keys.is_empty(), "takers collect apart");
    }

    /// A taker's task is woken by an applied entry that changed a key it
    /// collects, not by every entry: a lock wakes the scheduler but not the
    /// sync, a request that changes no view wakes neither (before, both
    /// woke on every applied entry, on every coordinator, to find nothing).
    #[test]
    fn a_taker_wakes_only_for_the_keys_it_collects() {
        use futures::FutureExt;
        let (_dir, _db, mut sm, reader) = fresh();
        let woken = |taker| reader.touched(taker).now_or_never().is_some();
        let web = destination("web", "process");
        futures::executor::block_on(sm.apply(vec![normal(1, vec![request("r1", Command::PutDestinations { destinations: vec![web] })])]))
            .expect("apply");
        for taker in TAKERS {
            assert!(!woken(taker), "{taker:?} collects nothing before its first take, so nothing wakes it");
            reader.take_touched(taker);
        }

        let noted = Command::RecordAction { action: "other".into(), target: "web".into(), outcome: "ok".into() };
        futures::executor::block_on(sm.apply(vec![normal(2, vec![request("r2", noted)])])).expect("apply");
        assert!(woken(Taker::Journal), "the journal collects every key");
        assert!(!woken(Taker::Scheduler), "a request that changes no view does not wake the scheduler");
        assert!(!woken(Taker::Sync), "nor the sync");

        futures::executor::block_on(sm.apply(vec![normal(3, vec![acquire("r3", "web")])])).expect("apply");
        assert!(woken(Taker::Scheduler), "a lock wakes the scheduler");
        assert!(!woken(Taker::Sync), "a lock does not wake the sync");

        let web = destination("web", "docker");
        futures::executor::block_on(sm.apply(vec![normal(4, vec![request("r4", Command::PutDestinations { destinations: vec![web] })])]))
            .expect("apply");
        assert!(woken(Taker::Scheduler), "a destination wakes the scheduler");
        assert!(woken(Taker::Sync), "a destination wakes the sync");
        assert!(!woken(Taker::Scheduler), "one wake-up for one change");
    }

    /// Build a snapshot; answers it as openraft then reads it (the
    /// builder itself answers only its meta).
    fn build(sm: &mut StateMachine) -> Result<Snapshot<TypeConfig>, StorageError> {
        futures::executor::block_on(async {
            // Other tests build snapshots at the same time: the count only grows.
            let holds = crate::observe::snapshot_holds;
            let before = holds();
            let built = sm.get_snapshot_builder().await.build_snapshot().await?;
            assert!(holds() > before, "each build's hold on the state is on /metrics");
            assert!(built.snapshot.get_ref().is_empty(), "the builder keeps no copy of the bytes");
            let current = sm.get_current_snapshot().await?.expect("the built snapshot is the current one");
            assert_eq!(current.meta, built.meta);
            Ok(current)
        })
    }

    fn snapshot_files(db: &DB) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(snapshot_dir(db))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A snapshot's bytes go to a file of their own, not through RocksDB:
    /// its record there is a small pointer, its memtables stay small, and
    /// after a restart the same snapshot is served, its size known without
    /// reading it. Building another leaves one file.
    #[test]
    fn a_snapshot_is_a_file_that_survives_a_restart() {
        let (_dir, db, mut sm, reader) = fresh();
        // Locks with the longest reasons make a snapshot of over 4 MiB.
        futures::executor::block_on(sm.apply((1..=300u64).map(|i| normal(i, vec![big_lock(i)])))).expect("apply");
        let memtables_before = super::super::memory(&db).memtables;
        let built = build(&mut sm).expect("snapshot");
        let data = built.snapshot.into_inner();
        assert!(data.len() > 4 << 20, "{} bytes", data.len());
        assert_eq!(snapshot_files(&db).len(), 1, "{:?}", snapshot_files(&db));
        let pointer = db.get_cf(db.cf_handle(CF_META).expect("cf"), SNAPSHOT_KEY).expect("read").expect("a pointer");
        assert!(pointer.len() < 4096, "RocksDB holds a pointer, not the snapshot: {} bytes", pointer.len());
        let grown = super::super::memory(&db).memtables.saturating_sub(memtables_before);
        assert!(grown < 1 << 20, "the snapshot passed through a memtable: it grew by {grown} bytes");
        assert_eq!(reader.snapshot_bytes(), data.len() as u64);

        build(&mut sm).expect("second snapshot");
        assert_eq!(snapshot_files(&db).len(), 1, "the older file is removed: {:?}", snapshot_files(&db));
        drop(sm);

        let (mut again, reader) = StateMachine::open(db.clone()).expect("state machine reopens");
        assert_eq!(reader.snapshot_bytes(), data.len() as u64, "size known at start");
        let current = futures::executor::block_on(again.get_current_snapshot()).expect("read").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, built.meta.last_log_id);
        assert_eq!(current.snapshot.into_inner(), data);
    }

    /// A snapshot is written from RocksDB's view of the state, taken under
    /// the state's read lock, while applies go on: each entry here takes
    /// the lock of its own destination, so a snapshot at index `n` holds
    /// exactly the locks `d1`..`dn`, whichever applies it overlapped.
    #[test]
    fn a_snapshot_is_the_state_at_its_own_index_while_applies_go_on() {
        let (_dir, db, mut sm, reader) = fresh();
        futures::executor::block_on(sm.apply((1..=200u64).map(|i| normal(i, vec![big_lock(i)])))).expect("apply");
        let mut builder = futures::executor::block_on(sm.get_snapshot_builder());
        let applying = std::thread::spawn(move || {
            for i in 201..=400u64 {
                futures::executor::block_on(sm.apply([normal(i, vec![big_lock(i)])])).expect("apply");
            }
        });
        let built = futures::executor::block_on(builder.build_snapshot()).expect("snapshot");
        applying.join().expect("the applies end");
        let data = std::fs::read(snapshot_dir(&db).join(snapshot_files(&db).pop().expect("a snapshot file"))).expect("read");
        let (meta, pairs) = decode_snapshot(&data).expect("decodes");
        let index = meta.last_applied.expect("an index").index;
        assert_eq!(built.meta.last_log_id, meta.last_applied);
        assert!((200..=400).contains(&index), "{index}");
        let mut locks: Vec<u64> = pairs.iter().filter_map(|(k, _)| k.strip_prefix("lock/d")?.parse().ok()).collect();
        locks.sort();
        assert_eq!(locks, (1..=index).collect::<Vec<_>>(), "the locks of entries 1..={index}, no more, no fewer");
        State::load(pairs.iter().copied()).expect("the snapshot loads");
        assert_eq!(reader.read(|a| a.last_applied.map(|l| l.index)), Some(400));
    }

    /// Installing a snapshot writes its file and the state it carries in
    /// one step; a file no pointer names (a crash between the two) is
    /// removed at start; and a snapshot an older release stored inline in
    /// RocksDB is still served until the next one replaces it.
    #[test]
    fn installed_snapshots_replace_strays_and_older_inline_snapshots() {
        let source_dir = tempfile::tempdir().expect("temp dir");
        let source = super::super::open(&source_dir.path().join("data"), "aaaa", 1).expect("store opens");
        let (mut leader, leader_view) = StateMachine::open(source).expect("state machine opens");
        futures::executor::block_on(leader.apply(vec![normal(1, vec![acquire("r1", "a"), acquire("r2", "b")])])).expect("apply");
        let built = build(&mut leader).expect("snapshot");
        let meta = built.meta.clone();
        let data = built.snapshot.into_inner();

        let dir = tempfile::tempdir().expect("temp dir");
        let db = super::super::open(&dir.path().join("data"), "aaaa", 2).expect("store opens");
        // What an older release stored: the framed meta, then the data.
        let mut inline = Vec::new();
        push_frame(&mut inline, &serde_json::to_vec(&meta).expect("meta")).expect("write to memory");
        inline.extend_from_slice(&data);
        db.put_cf(db.cf_handle(CF_META).expect("cf"), SNAPSHOT_KEY, &inline).expect("write");
        std::fs::create_dir_all(snapshot_dir(&db)).expect("dir");
        std::fs::write(snapshot_dir(&db).join("00000000000000000009-1-0.snap.tmp"), b"half").expect("stray");
        let (mut sm, reader) = StateMachine::open(db.clone()).expect("state machine opens");
        assert!(snapshot_files(&db).is_empty(), "the stray is removed: {:?}", snapshot_files(&db));
        assert_eq!(reader.snapshot_bytes(), data.len() as u64);
        let old = futures::executor::block_on(sm.get_current_snapshot()).expect("read").expect("the inline snapshot");
        assert_eq!(old.snapshot.into_inner(), data);

        futures::executor::block_on(sm.install_snapshot(&meta, Box::new(Cursor::new(data.clone())))).expect("install");
        assert_eq!(snapshot_files(&db).len(), 1);
        drop(sm);
        let (mut again, reader) = StateMachine::open(db).expect("state machine reopens");
        assert_eq!(reader.read(|a| a.state.clone()), leader_view.read(|a| a.state.clone()));
        let current = futures::executor::block_on(again.get_current_snapshot()).expect("read").expect("a snapshot");
        assert_eq!(current.snapshot.into_inner(), data);
    }

    #[test]
    fn takers_are_listed_in_the_order_of_their_cells() {
        for (i, taker) in TAKERS.iter().enumerate() {
            assert_eq!(*taker as usize, i, "{taker:?}");
        }
    }
}
