//! Fleet's pure domain.
//!
//! Everything here is plain data and plain functions: no I/O, no async
//! runtime, no clocks (time arrives as a field of the command that the Raft
//! leader stamped before proposing it, so every replica applies the same
//! value). The coordinator carries out what these functions decide.
//!
//! * [`command`]: what clients ask the replicated state machine to do, and
//!   what it answers.
//! * [`state`]: the replicated state machine itself and its `apply` function.
//! * [`names`]: validation of user-supplied names and texts.
//! * [`manifest`]: `fleet.yaml` and the destinations file, parsed and validated
//!   (`strategy`: blue-green, `recreate`, the canary, the route's address).
//! * [`saga`]: the planner (manifest + nodes → ordered, undoable steps).
//! * [`deploy`]: the deployment lifecycle and the saga engine.
//!   Its `canary` submodule is the canary's pause and promote.
//! * [`leader`]: the Raft leader's rules (node leases, time limits, aborts,
//!   what to send, what a returning node must forget) as actions that the
//!   coordinator carries out.
//! * [`sync`]: destination sync (servers observed vs committed, drift,
//!   when a catch-up deployment is due).

pub mod auth;
pub mod command;
pub mod deploy;
pub mod leader;
pub mod manifest;
pub mod names;
pub mod saga;
pub mod state;
pub mod sync;
pub mod views;
pub mod witness;

pub use command::{Command, LockView, Origin, Proposal, Request, Response, Via};
pub use state::{Change, State};
