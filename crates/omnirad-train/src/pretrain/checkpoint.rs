//! One safetensors file holds a whole training state: student and teacher (backbone + heads),
//! AdamW moments, the teacher centres, and the step in the metadata. Written to a temporary file
//! and renamed, so a crash never leaves a half-written checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnirad_model::{write_f32_safetensors, CheckpointStrategy, ModelError};

use crate::optim::{host, read_checkpoint};
use crate::params;
use crate::ssl::{trainable_student, SslModel, SslTrainer};

const FORMAT: &str = "omnirad-pretrain-1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    File(#[from] ModelError),
}

/// Writes `path` atomically.
pub fn save_checkpoint<B: Backend, C: CheckpointStrategy>(
    path: &Path,
    t: &SslTrainer<B, C>,
    step: usize,
) -> Result<(), CheckpointError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (prefix, named) in [
        ("student.", params::collect(&t.student.valid())),
        ("teacher.", params::collect(&t.teacher)),
    ] {
        for p in named {
            tensors.push((format!("{prefix}{}", p.path), p.shape, host(p.value)));
        }
    }
    tensors.extend(t.opt.moment_entries());
    for (name, c) in [
        ("center.dino", &t.dino_center),
        ("center.ibot", &t.ibot_center),
    ] {
        let shape = c.value.dims().to_vec();
        tensors.push((name.into(), shape, host(c.value.clone().flatten::<1>(0, 1))));
    }
    // One metadata key: a HashMap with several would be written in random order, and
    // identical states should give identical files.
    let state = serde_json::json!({ "format": FORMAT, "step": step, "adam_step": t.opt.step });
    let meta = HashMap::from([("omnirad".to_string(), state.to_string())]);
    Ok(write_f32_safetensors(path, &tensors, Some(meta))?)
}

/// Restores `t` from `path`; returns the step to continue from. Every parameter of the current
/// model must be in the file with the same shape.
pub fn load_checkpoint<B: Backend, C: CheckpointStrategy>(
    path: &Path,
    t: &mut SslTrainer<B, C>,
) -> Result<usize, CheckpointError> {
    let fmt = |msg: String| CheckpointError::Format {
        path: path.into(),
        msg,
    };
    let data = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        source,
    })?;
    let dev = t.device.clone();
    let (meta, mut tensors) = read_checkpoint::<B>(&data, path, FORMAT, "pretraining", &dev)?;
    let num = |k: &str| {
        meta[k]
            .as_u64()
            .ok_or_else(|| fmt(format!("metadata {k} missing")))
    };
    let step = num("step")? as usize;
    let adam_step = num("adam_step")?;
    let mut missing = Vec::new();
    let mut take = |prefix: &str, path: &str, old: Tensor<B, 1>| match tensors
        .remove(&format!("{prefix}{path}"))
    {
        Some(new) if new.dims() == old.dims() => new,
        _ => {
            missing.push(format!("{prefix}{path}"));
            old
        }
    };
    let student: SslModel<B> =
        params::replace(t.student.valid(), |p, old| take("student.", p, old));
    let teacher = params::replace(t.teacher.clone(), |p, old| take("teacher.", p, old));
    if !missing.is_empty() {
        return Err(fmt(format!(
            "{} parameters missing or of another shape (different model config?): {}",
            missing.len(),
            missing
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    t.student = trainable_student(student);
    t.teacher = teacher;
    t.opt
        .restore_moments(adam_step, &mut tensors)
        .map_err(fmt)?;
    for (name, c) in [
        ("center.dino", &mut t.dino_center),
        ("center.ibot", &mut t.ibot_center),
    ] {
        let v = tensors
            .remove(name)
            .ok_or_else(|| fmt(format!("{name} missing")))?;
        let k = c.value.dims()[1];
        if v.dims()[0] != k {
            return Err(fmt(format!(
                "{name}: {} prototypes, model has {k}",
                v.dims()[0]
            )));
        }
        c.value = v.reshape([1, k]);
    }
    Ok(step)
}
