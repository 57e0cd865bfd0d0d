pub mod checks;
pub mod harness;
pub mod https;
pub mod json;
pub mod linearizability;
pub mod netns;
pub mod proxy;
pub mod values;
