//! AdamW (Loshchilov & Hutter 2019) with per-parameter LR / weight-decay multipliers and
//! global-norm gradient clipping.
//!
//! Written here because burn 0.21's optimizers take one learning rate for the whole module and
//! clip each tensor on its own; DINOv2 needs layer-wise LR decay, no decay on norms and biases,
//! and clipping by the norm of all gradients together. State is keyed by parameter path
//! (`backbone.blocks.3.attn.qkv.weight`) so checkpoints are readable and survive a restart.
//! ```text
//! g ← g · min(1, c / (‖g‖_all + 1e-6))
//! m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  m̂ = m/(1−β₁ᵗ);  v̂ = v/(1−β₂ᵗ)
//! θ ← θ·(1 − η·λ) − η·m̂/(√v̂ + ε)          η = lr·lr_mult,  λ = wd·wd_mult
//! ```

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

/// How one parameter is treated, decided from its path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    pub lr_mult: f64,
    pub wd_mult: f64,
}

#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Number of updates taken so far (t in the bias corrections).
    pub step: u64,
    /// First and second moments, flattened, by parameter path.
    pub state: HashMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

pub struct StepSettings<'a> {
    pub lr: f64,
    pub weight_decay: f64,
    /// Maximum global gradient norm; `None` for no clipping.
    pub clip: Option<f64>,
    pub group: &'a dyn Fn(&str) -> ParamGroup,
}

impl<B: Backend> AdamW<B> {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient. Returns the module and the global
    /// gradient norm before clipping.
    pub fn step<AB, M>(
        &mut self,
        module: M,
        mut grads: GradientsParams,
        s: &StepSettings,
    ) -> (M, f64)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut norm = GradNorm::<B> {
            grads: &grads,
            sum: None,
        };
        module.visit(&mut norm);
        let total = norm
            .sum
            .map(|t| t.into_scalar().elem::<f64>().sqrt())
            .unwrap_or(0.0);
        let scale = match s.clip {
            Some(c) if total > c => c / (total + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let mut mapper = Update {
            opt: self,
            grads: &mut grads,
            settings: s,
            scale,
            path: Vec::new(),
        };
        (module.map(&mut mapper), total)
    }
}

struct GradNorm<'a, B: Backend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GradNorm<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            let sq = g.powi_scalar(2).sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + sq,
                None => sq,
            });
        }
    }
}

struct Update<'a, 'b, B: Backend> {
    opt: &'a mut AdamW<B>,
    grads: &'a mut GradientsParams,
    settings: &'a StepSettings<'b>,
    scale: f64,
    path: Vec<String>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, '_, AB::InnerBackend> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.path.join(".");
        let group = (self.settings.group)(&path);
        let (lr, wd) = (
            self.settings.lr * group.lr_mult,
            self.settings.weight_decay * group.wd_mult,
        );
        let require_grad = tensor.is_require_grad();
        let shape = tensor.dims();
        let n = shape.iter().product::<usize>();
        let p = tensor.inner().reshape([n]);
        let g = grad.reshape([n]) * self.scale;
        let opt = &mut *self.opt;
        let (b1, b2) = (opt.beta1, opt.beta2);
        let (m, v) = match opt.state.remove(&path) {
            Some((m, v)) => (
                m * b1 + g.clone() * (1.0 - b1),
                v * b2 + g.powi_scalar(2) * (1.0 - b2),
            ),
            None => (g.clone() * (1.0 - b1), g.powi_scalar(2) * (1.0 - b2)),
        };
        let t = opt.step as i32;
        let m_hat = m.clone() / (1.0 - b1.powi(t));
        let v_hat = v.clone() / (1.0 - b2.powi(t));
        let p = p * (1.0 - lr * wd) - m_hat / (v_hat.sqrt() + opt.eps) * lr;
        opt.state.insert(path, (m, v));
        let mut out = Tensor::from_inner(p.reshape(shape));
        if require_grad {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

/// A flat tensor's values on the host.
pub(crate) fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 tensor")
}

/// Checkpoint I/O shared by pretraining and segmentation: the moments as flat host tensors, and
/// a checkpoint file read back as its `omnirad` metadata plus every tensor by name.
impl<B: Backend> AdamW<B> {
    /// (`adam_m.<path>` / `adam_v.<path>`, values), sorted by path so files are reproducible.
    pub fn moment_entries(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut paths: Vec<&String> = self.state.keys().collect();
        paths.sort();
        let mut out = Vec::new();
        for p in paths {
            let (m, v) = &self.state[p];
            out.push((format!("adam_m.{p}"), m.dims().to_vec(), host(m.clone())));
            out.push((format!("adam_v.{p}"), v.dims().to_vec(), host(v.clone())));
        }
        out
    }

    /// Takes the `adam_m.*` / `adam_v.*` tensors out of `tensors` as the optimiser state.
    pub fn restore_moments(
        &mut self,
        step: u64,
        tensors: &mut HashMap<String, Tensor<B, 1>>,
    ) -> Result<(), String> {
        self.step = step;
        self.state.clear();
        let keys: Vec<String> = tensors
            .keys()
            .filter(|k| k.starts_with("adam_m."))
            .cloned()
            .collect();
        for k in keys {
            let p = k["adam_m.".len()..].to_string();
            let m = tensors.remove(&k).expect("listed");
            let v = tensors
                .remove(&format!("adam_v.{p}"))
                .ok_or_else(|| format!("adam_v.{p} missing"))?;
            self.state.insert(p, (m, v));
        }
        Ok(())
    }
}

/// A checkpoint written with `write_f32_safetensors`: its `omnirad` metadata (checked to carry
/// `format`; `what` names the kind in the error) and every tensor, flat, on `dev`.
pub fn read_checkpoint<B: Backend>(
    data: &[u8],
    path: &std::path::Path,
    format: &str,
    what: &str,
    dev: &B::Device,
) -> Result<(serde_json::Value, HashMap<String, Tensor<B, 1>>), omnirad_model::ModelError> {
    let err = |reason: String| omnirad_model::ModelError::Weights {
        path: path.into(),
        reason,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(data).map_err(|e| err(e.to_string()))?;
    let meta: serde_json::Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("omnirad"))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    if meta["format"] != format {
        return Err(err(format!(
            "not an omnirad {what} checkpoint (format {})",
            meta["format"]
        )));
    }
    let tensors = omnirad_model::f32_tensors(data, path)?
        .into_iter()
        .map(|(name, (_, v))| {
            let n = v.len();
            (
                name,
                Tensor::from_data(burn::tensor::TensorData::new(v, [n]), dev),
            )
        })
        .collect();
    Ok((meta, tensors))
}
