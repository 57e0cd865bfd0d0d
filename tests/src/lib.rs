
pub mod harness;
pub mod linearizability;
