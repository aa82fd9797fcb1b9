//! Metrics and evaluation protocols: what turns model outputs into the numbers in a table.

pub mod baselines;
pub mod cluster;
pub mod knn;
pub mod metrics;
pub mod projection;
pub mod retrieval;
pub mod seg_metrics;

pub use knn::{knn_scores, KnnConfig};
pub use metrics::{evaluate, Metrics, TaskKind};
pub use seg_metrics::{SegEvaluator, SegScores};
