//! One safetensors file holds a whole pretraining state (`state_file`): student and teacher
//! (backbone + heads), AdamW moments, the teacher centres, and the step in the metadata.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use omnirad_model::{CheckpointStrategy, ModelError};

use crate::ssl::{trainable_student, SslModel, SslTrainer};
use crate::state_file::{StateReader, StateWriter};

const FORMAT: &str = "omnirad-pretrain-1";

/// Writes `path` atomically.
pub fn save_checkpoint<B: Backend, C: CheckpointStrategy>(
    path: &Path,
    t: &SslTrainer<B, C>,
    step: usize,
) -> Result<(), ModelError> {
    let mut w = StateWriter::default();
    w.module("student.", &t.student().valid());
    w.module("teacher.", &t.teacher);
    w.adam(&t.opt);
    w.tensor("center.dino", &t.dino_center.value);
    w.tensor("center.ibot", &t.ibot_center.value);
    w.write(path, FORMAT, &t.opt, serde_json::json!({ "step": step }))
}

/// Restores `t` from `path`; returns the step to continue from. Every parameter of the current
/// model must be in the file with the same shape.
pub fn load_checkpoint<B: Backend, C: CheckpointStrategy>(
    path: &Path,
    t: &mut SslTrainer<B, C>,
) -> Result<usize, ModelError> {
    let mut r = StateReader::<B>::open(path, FORMAT, "pretraining", &t.device)?;
    let step = r.num("step")? as usize;
    let student: SslModel<B> = r.module("student.", t.student().valid());
    let teacher = r.module("teacher.", t.teacher.clone());
    let mut centers = Vec::new();
    for (name, c) in [
        ("center.dino", &t.dino_center),
        ("center.ibot", &t.ibot_center),
    ] {
        let v = r.take(name)?;
        let k = c.value.dims()[1];
        if v.dims()[0] != k {
            return Err(r.error(format!("{name}: {} prototypes, model has {k}", v.dims()[0])));
        }
        centers.push(v.reshape([1, k]));
    }
    r.finish(&mut t.opt, "different model config")?;
    t.student = Some(trainable_student(student));
    t.teacher = teacher;
    t.ibot_center.value = centers.pop().expect("two centres");
    t.dino_center.value = centers.pop().expect("two centres");
    Ok(step)
}
