
pub mod harness;
pub mod values;
pub mod linearizability;
