//! Training: self-supervised pretraining (DINOv2 / OmniRad / XR-0 recipes) and probes on frozen
//! features.
//!
//! `pretrain` (config, data, checkpoints) → `ssl` (student/teacher step) → `loss`, `masking`,
//! `schedule`, `optim`.

pub mod finetune;
pub mod knn_mix;
pub mod loss;
pub mod masking;
pub mod optim;
pub mod params;
pub mod pretrain;
pub mod probe;
pub mod sam;
pub mod schedule;
pub mod segment;
pub mod ssl;
pub mod state_file;

pub use probe::{linear_probe, ProbeConfig, ProbeHead, ProbeResult};
