//! Training loops. So far: the linear probe on frozen features.

pub mod probe;

pub use probe::{linear_probe, ProbeConfig, ProbeResult};
