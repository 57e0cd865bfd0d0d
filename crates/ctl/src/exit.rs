//! Exit codes (DESIGN.md). CI depends on them; never renumber.

/// Succeeded.
pub const OK: i32 = 0;
/// Error talking to the cluster.
pub const CLUSTER: i32 = 1;
/// Usage error or invalid input.
pub const USAGE: i32 = 2;
/// Timed out (lock wait or deadline).
pub const TIMED_OUT: i32 = 5;
/// Rejected: the destination is busy (lock held by someone else).
pub const REJECTED: i32 = 7;
