//! `omnirad pretrain`: configuration, data, checkpoints. The step itself is in [`crate::ssl`].

pub mod checkpoint;
pub mod config;
pub mod data;

pub use checkpoint::{load_checkpoint, save_checkpoint};
pub use config::{param_group, PretrainConfig, Schedules};
pub use data::PretrainData;
