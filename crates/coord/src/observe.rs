//! Measurements taken deep inside the coordinator that `/metrics` reports:
//! recorded here by the code that sees them (the log store), registered by
//! the metrics module. Its own module so the store does not depend on the
//! metrics module, which reads the store.

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
