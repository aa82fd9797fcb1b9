//! Metrics and evaluation protocols: what turns model outputs into the numbers in a table.

pub mod baselines;
pub mod knn;
pub mod metrics;

pub use knn::{knn_scores, KnnConfig};
pub use metrics::{evaluate, Metrics, TaskKind};
