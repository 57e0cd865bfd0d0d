pub mod checks;
pub mod harness;
pub mod json;
pub mod linearizability;
pub mod netns;
pub mod proxy;
pub mod values;
