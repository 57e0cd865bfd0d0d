
pub mod checks;
pub mod harness;
pub mod values;
pub mod linearizability;
