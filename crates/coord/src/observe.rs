//! Measurements taken deep inside the coordinator that `/metrics` reports:
//! recorded here by the code that sees them (the log store, the state
//! machine, the Raft RPCs), registered by the metrics module. Its own
//! module so the store does not depend on the metrics module, which reads
//! the store.
//!
//! Together they split a replicated write into its stages, as each
//! coordinator sees them: on the leader a write is proposed
//! (`raft_proposal_seconds`), appended and flushed (`raft_log_flush_seconds`,
//! of which `raft_log_fsync_seconds` is the fsync itself), replicated
//! (`raft_replicate_seconds`: the AppendEntries call, in which each follower
//! appends and flushes, `raft_follower_append_seconds` on the follower) and
//! applied (`raft_apply_seconds`). What the proposal takes beyond those is
//! openraft's own scheduling between them.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Every fsync of the Raft log: 50 µs .. ~1.6 s.
pub fn fsync_histogram() -> &'static Histogram {
    static FSYNC: OnceLock<Histogram> = OnceLock::new();
    FSYNC.get_or_init(|| Histogram::new(exponential_buckets(0.00005, 2.0, 16)))
}

/// One fsync of the Raft log took `took`.
pub fn fsync(took: Duration) {
    fsync_histogram().observe(took.as_secs_f64());
}

/// Each snapshot build's hold on the applied state (its read lock, while
/// it takes RocksDB's view of the state; the file is written from the view
/// after): applies wait meanwhile, so this is how long a snapshot can
/// stall writes. 1 ms .. ~65 s.
pub fn snapshot_hold_histogram() -> &'static Histogram {
    static HOLD: OnceLock<Histogram> = OnceLock::new();
    HOLD.get_or_init(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)))
}

static SNAPSHOT_HOLDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A snapshot build held the applied state for `took`.
pub fn snapshot_hold(took: Duration) {
    snapshot_hold_histogram().observe(took.as_secs_f64());
    SNAPSHOT_HOLDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many snapshot builds [`snapshot_hold`] recorded in this process.
pub fn snapshot_holds() -> u64 {
    SNAPSHOT_HOLDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A stage of a replicated write, timed where it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Log store: from entries handed to `append` until the fsync that
    /// covers them is done (the write to RocksDB, and the fsync).
    LogFlush,
    /// Leader: one AppendEntries call that carries entries, until its
    /// answer (the follower's append and flush included). Heartbeats are
    /// not counted.
    Replicate,
    /// Follower: handling one AppendEntries that carries entries: decode,
    /// append, flush, answer.
    FollowerAppend,
    /// State machine: one apply call (every entry it was given, and the
    /// state's write to RocksDB).
    Apply,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::LogFlush, Stage::Replicate, Stage::FollowerAppend, Stage::Apply];

    /// Its metric's name (without the `fleet_` prefix) and help text.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            Stage::LogFlush => ("raft_log_flush_seconds", "Raft log append until the fsync covering it is done"),
            Stage::Replicate => ("raft_replicate_seconds", "Leader: AppendEntries calls carrying entries, until the follower's answer"),
            Stage::FollowerAppend => {
                ("raft_follower_append_seconds", "Follower: handling an AppendEntries carrying entries (append and flush)")
            }
            Stage::Apply => ("raft_apply_seconds", "State machine: one apply call, its RocksDB write included"),
        }
    }

    /// 20 µs .. ~2.6 s.
    pub fn histogram(self) -> &'static Histogram {
        static STAGES: [OnceLock<Histogram>; 4] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
        STAGES[self as usize].get_or_init(|| Histogram::new(exponential_buckets(0.00002, 2.0, 18)))
    }

    /// This stage took `took` once.
    pub fn observe(self, took: Duration) {
        self.histogram().observe(took.as_secs_f64());
    }
}
