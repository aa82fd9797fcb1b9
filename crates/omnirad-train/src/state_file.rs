//! One safetensors file per training state (pretraining, fine-tuning, segmentation): modules'
//! parameters under name prefixes, AdamW moments, extra tensors, and one JSON metadata entry
//! tagged with the file's format. Written to a temporary file and renamed, so a crash never
//! leaves half a checkpoint; read back into copies of template modules, naming what is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use omnirad_model::{write_f32_safetensors, F32Tensor, ModelError};

use crate::optim::{host, read_checkpoint, AdamW};
use crate::params;

/// The tensors of a state being written: each is read back from its device when the file
/// reaches it, so the state is never on the host twice.
#[derive(Default)]
pub struct StateWriter {
    tensors: Vec<F32Tensor<'static>>,
}

impl StateWriter {
    /// Every parameter of `m`, named `prefix` + its path.
    pub fn module<B: Backend, M: Module<B>>(&mut self, prefix: &str, m: &M) {
        for p in params::collect(m) {
            let name = format!("{prefix}{}", p.path);
            let value = p.value;
            let fetch = move || host(value.clone());
            self.tensors.push(F32Tensor::fetched(name, p.shape, fetch));
        }
    }

    pub fn tensor<B: Backend, const D: usize>(&mut self, name: &str, t: &Tensor<B, D>) {
        let shape = t.dims().to_vec();
        let flat = t.clone().reshape([shape.iter().product::<usize>()]);
        let fetch = move || host(flat.clone());
        self.tensors.push(F32Tensor::fetched(name, shape, fetch));
    }

    /// The moments; their step goes into the metadata as `adam_step`.
    pub fn adam<B: Backend>(&mut self, opt: &AdamW<B>) {
        self.tensors.extend(opt.moment_entries());
    }

    /// Writes the file; `meta` (a JSON object) gains `format` and the optimiser's `adam_step`.
    pub fn write<B: Backend>(
        self,
        path: &Path,
        format: &str,
        opt: &AdamW<B>,
        mut meta: serde_json::Value,
    ) -> Result<(), ModelError> {
        meta["format"] = format.into();
        meta["adam_step"] = opt.step.into();
        // One metadata key: a HashMap with several would be written in random order, and
        // identical states should give identical files.
        let meta = HashMap::from([("omnirad".to_string(), meta.to_string())]);
        write_f32_safetensors(path, &self.tensors, Some(meta))
    }
}

/// A state file read back: its metadata, and its tensors until taken.
pub struct StateReader<B: Backend> {
    path: PathBuf,
    pub meta: serde_json::Value,
    tensors: HashMap<String, Tensor<B, 1>>,
    missing: Vec<String>,
}

impl<B: Backend> StateReader<B> {
    /// Reads `path`, which must carry `format` (`what` names the kind in the error).
    pub fn open(
        path: &Path,
        format: &str,
        what: &str,
        dev: &B::Device,
    ) -> Result<Self, ModelError> {
        let data = omnirad_model::map_file(path)?;
        let (meta, tensors) = read_checkpoint::<B>(&data, path, format, what, dev)?;
        Ok(Self {
            path: path.into(),
            meta,
            tensors,
            missing: Vec::new(),
        })
    }

    pub fn error(&self, reason: String) -> ModelError {
        ModelError::Weights {
            path: self.path.clone(),
            reason,
        }
    }

    /// A non-negative integer from the metadata.
    pub fn num(&self, key: &str) -> Result<u64, ModelError> {
        self.meta[key]
            .as_u64()
            .ok_or_else(|| self.error(format!("metadata {key} missing")))
    }

    /// A metadata value of type `T`.
    pub fn field<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, ModelError> {
        serde_json::from_value(self.meta[key].clone())
            .map_err(|e| self.error(format!("{key}: {e}")))
    }

    /// `template` with every parameter replaced by the file's `prefix` + path; those absent or
    /// of another shape keep their value and are reported by [`Self::finish`].
    pub fn module<M: Module<B>>(&mut self, prefix: &str, template: M) -> M {
        let (tensors, missing) = (&mut self.tensors, &mut self.missing);
        params::replace(template, |p, old| {
            match tensors.remove(&format!("{prefix}{p}")) {
                Some(new) if new.dims() == old.dims() => new,
                _ => {
                    missing.push(format!("{prefix}{p}"));
                    old
                }
            }
        })
    }

    pub fn take(&mut self, name: &str) -> Result<Tensor<B, 1>, ModelError> {
        self.tensors
            .remove(name)
            .ok_or_else(|| self.error(format!("{name} missing")))
    }

    /// Fails if a module parameter was missing (`differs` suggests what may be different);
    /// otherwise restores `opt`'s moments and step.
    pub fn finish(mut self, opt: &mut AdamW<B>, differs: &str) -> Result<(), ModelError> {
        if !self.missing.is_empty() {
            return Err(self.error(format!(
                "{} parameters missing or of another shape ({differs}?): {}",
                self.missing.len(),
                self.missing[..self.missing.len().min(8)].join(", ")
            )));
        }
        let step = self.num("adam_step")?;
        opt.restore_moments(step, &mut self.tensors)
            .map_err(|e| self.error(e))
    }
}
