//! Exit codes (DESIGN.md). CI depends on them; never renumber.

/// Succeeded.
pub const OK: i32 = 0;
/// Error talking to the cluster.
pub const CLUSTER: i32 = 1;
/// Usage error or invalid input.
pub const USAGE: i32 = 2;
/// The deployment failed and every completed step was undone.
pub const FAILED: i32 = 3;
/// The deployment was cancelled (or superseded).
pub const CANCELLED: i32 = 4;
/// Timed out (lock wait or deadline).
pub const TIMED_OUT: i32 = 5;
/// Compensation failed: a human must act.
pub const COMPENSATION_FAILED: i32 = 6;
/// Rejected: the destination is busy (lock held by someone else).
pub const REJECTED: i32 = 7;
/// The user stopped watching (Ctrl-C); the deployment goes on.
pub const INTERRUPTED: i32 = 130;
