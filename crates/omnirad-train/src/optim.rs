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
//! θ ← θ − η·λ·(θ − θ₀) − η·m̂/(√v̂ + ε)     η = lr·lr_mult,  λ = wd·wd_mult
//! ```
//! θ₀ = 0 (decoupled weight decay) except for the parameters an [`Anchor`] names: those decay
//! toward their anchored values with the anchor's strength in place of wd (L2-SP).

use std::collections::HashMap;

use burn::backend::flex::FlexTensor;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, ElementConversion, Shape, Tensor, TensorPrimitive};
use omnirad_model::{cast_same, is_same};

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
    /// Set by the trainer at every start (it is not part of the saved state).
    pub anchor: Option<Anchor<B>>,
}

/// L2-SP (Li et al. 2018, "Explicit Inductive Bias for Transfer Learning"): the named
/// parameters decay toward these values, the pretrained weights, instead of toward zero, so
/// fine-tuning on few images stays near what pretraining learned.
#[derive(Debug, Clone)]
pub struct Anchor<B: Backend> {
    /// Replaces the weight decay of the anchored parameters (still × their group's wd_mult).
    pub strength: f64,
    /// Flattened values by parameter path.
    pub values: HashMap<String, Tensor<B, 1>>,
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
            anchor: None,
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
        let total = grad_norm::<AB, M>(&module, &grads);
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

/// ‖g‖ over all of `module`'s parameters that have a gradient in `grads`.
pub(crate) fn grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut norm = GradNorm::<AB::InnerBackend> {
        grads,
        sum: None,
        host: 0.0,
    };
    module.visit(&mut norm);
    let device = norm.sum.map_or(0.0, |t| t.into_scalar().elem::<f64>());
    (device + norm.host).sqrt()
}

struct GradNorm<'a, B: Backend> {
    grads: &'a GradientsParams,
    /// Σ g² as a device tensor (read back once), and of CPU f32 gradients summed directly:
    /// burn's `powi` + `sum` allocated a squared copy of every gradient.
    sum: Option<Tensor<B, 1>>,
    host: f64,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for GradNorm<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            if g.dtype() == DType::F32 && is_same::<FloatTensor<AB::InnerBackend>, FlexTensor>() {
                let g: FlexTensor = cast_same(g.into_primitive().tensor());
                self.host += cpu::sum_squares(&g);
                return;
            }
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
        let opt = &mut *self.opt;
        let anchor = opt
            .anchor
            .as_ref()
            .and_then(|a| Some((a.strength, a.values.get(&path)?.clone())));
        let decay = anchor.as_ref().map_or(self.settings.weight_decay, |a| a.0);
        let (lr, wd) = (self.settings.lr * group.lr_mult, decay * group.wd_mult);
        let require_grad = tensor.is_require_grad();
        let shape = tensor.dims();
        let n = shape.iter().product::<usize>();
        let t = opt.step as i32;
        let c = Coeffs {
            scale: self.scale,
            beta1: opt.beta1,
            beta2: opt.beta2,
            bias1: 1.0 - opt.beta1.powi(t),
            bias2: 1.0 - opt.beta2.powi(t),
            lr,
            decay: 1.0 - lr * wd,
            eps: opt.eps,
        };
        let state = opt.state.remove(&path);
        let (mut p, m, v) = update(tensor.inner().reshape([n]), grad.reshape([n]), state, &c);
        if let Some((_, theta0)) = anchor.filter(|_| lr * wd != 0.0) {
            // θ·(1 − η·λ) above, plus η·λ·θ₀: θ − η·λ·(θ − θ₀).
            p = p + theta0 * (lr * wd);
        }
        opt.state.insert(path, (m, v));
        let mut out = Tensor::from_inner(p.reshape(shape));
        if require_grad {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}

/// The scalars of one parameter's update in the module doc's formula: `scale` is the clipping
/// factor, `bias1`/`bias2` are 1 − β₁ᵗ and 1 − β₂ᵗ, `decay` is 1 − η·λ.
struct Coeffs {
    scale: f64,
    beta1: f64,
    beta2: f64,
    bias1: f64,
    bias2: f64,
    lr: f64,
    decay: f64,
    eps: f64,
}

/// One AdamW update of a flat parameter `p` with gradient `g` and moments `state` (`None`: zero
/// moments, the first step); returns the new (θ, m, v). On the CPU backend in f32 it is one
/// parallel pass that updates θ, m and v in place (θ is copied first while another reference to
/// it lives); as the formula's 16 tensor ops, burn-flex ran each on one thread into a fresh
/// output. Elsewhere (CUDA, where burn fuses elementwise ops) the same formula as tensor ops.
fn update<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    state: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    c: &Coeffs,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let f32s = [
        Some(&p),
        Some(&g),
        state.as_ref().map(|s| &s.0),
        state.as_ref().map(|s| &s.1),
    ]
    .iter()
    .flatten()
    .all(|t| t.dtype() == DType::F32);
    if f32s && is_same::<B::FloatTensorPrimitive, FlexTensor>() {
        let prim = |t: Tensor<B, 1>| -> FlexTensor { cast_same(t.into_primitive().tensor()) };
        let back =
            |t: FlexTensor| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(cast_same(t)));
        let (m, v) = match state {
            Some((m, v)) => (prim(m), prim(v)),
            None => {
                let zeros = || FlexTensor::zeros(Shape::new([p.dims()[0]]), DType::F32);
                (zeros(), zeros())
            }
        };
        let (p, m, v) = cpu::update(prim(p), &prim(g), m, v, c);
        return (back(p), back(m), back(v));
    }
    let g = g * c.scale;
    let (m, v) = match state {
        Some((m, v)) => (
            m * c.beta1 + g.clone() * (1.0 - c.beta1),
            v * c.beta2 + g.powi_scalar(2) * (1.0 - c.beta2),
        ),
        None => (
            g.clone() * (1.0 - c.beta1),
            g.powi_scalar(2) * (1.0 - c.beta2),
        ),
    };
    let m_hat = m.clone() / c.bias1;
    let v_hat = v.clone() / c.bias2;
    let p = p * c.decay - m_hat / (v_hat.sqrt() + c.eps) * c.lr;
    (p, m, v)
}

mod cpu {
    use burn::backend::flex::FlexTensor;
    use rayon::prelude::*;

    use super::Coeffs;

    /// Elements per rayon task: large enough to amortise scheduling, small enough to share a
    /// ViT-S/16's largest matrices (590k values) between cores.
    const CHUNK: usize = 1 << 14;

    /// `t` as a contiguous tensor covering its whole buffer. `to_contiguous` borrows: where `t`
    /// already is one it returns a second handle on the same buffer, so `t` is dropped here, or
    /// `storage_mut` would copy the buffer (three copies of the model per step).
    fn whole(t: FlexTensor) -> FlexTensor {
        let c = t.to_contiguous();
        drop(t);
        c
    }

    /// Σ x² over an f32 tensor, in f64.
    pub(super) fn sum_squares(t: &FlexTensor) -> f64 {
        let t = t.to_contiguous();
        t.storage::<f32>()
            .par_chunks(CHUNK)
            .map(|c| {
                let mut acc = 0.0;
                kernels::sum_squares(c, &mut acc);
                acc
            })
            .sum()
    }

    mod kernels {
        omnirad_model::simd::dispatch! {
            /// `acc` += Σ x² in f64, in 8 lanes (a sequential sum would not vectorise).
            sum_squares(x: &[f32], acc: &mut f64) {
                let mut lanes = [0f64; 8];
                let mut chunks = x.chunks_exact(8);
                for c in &mut chunks {
                    for i in 0..8 {
                        let v = c[i] as f64;
                        lanes[i] = v.mul_add(v, lanes[i]);
                    }
                }
                for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
                    *l += v as f64 * v as f64;
                }
                *acc += lanes.iter().sum::<f64>();
            }
        }
    }

    /// The module doc's formula element by element, in f32 with the scalars rounded to f32 as
    /// burn's scalar ops round them.
    pub(super) fn update(
        p: FlexTensor,
        g: &FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        c: &Coeffs,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        // Contiguous tensors covering their whole buffers, so `storage` is exactly the values.
        let (mut p, mut m, mut v) = (whole(p), whole(m), whole(v));
        let g = g.to_contiguous();
        let g = g.storage::<f32>();
        let [scale, b1, b2, bias1, bias2, lr, decay, eps] = [
            c.scale, c.beta1, c.beta2, c.bias1, c.bias2, c.lr, c.decay, c.eps,
        ]
        .map(|x| x as f32);
        let (one_b1, one_b2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        p.storage_mut::<f32>()
            .par_chunks_mut(CHUNK)
            .zip(m.storage_mut::<f32>().par_chunks_mut(CHUNK))
            .zip(v.storage_mut::<f32>().par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                let values = p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g);
                for (((p, m), v), &g) in values {
                    let g = g * scale;
                    *m = *m * b1 + g * one_b1;
                    *v = *v * b2 + g * g * one_b2;
                    *p = *p * decay - (*m / bias1) / ((*v / bias2).sqrt() + eps) * lr;
                }
            });
        (p, m, v)
    }
}

/// A flat tensor's values on the host.
pub(crate) fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 tensor")
}

/// Checkpoint I/O shared by pretraining and segmentation: the moments as flat host tensors, and
/// a checkpoint file read back as its `omnirad` metadata plus every tensor by name.
impl<B: Backend> AdamW<B> {
    /// `adam_m.<path>` / `adam_v.<path>`, read back when written, sorted by path so files are
    /// reproducible.
    pub fn moment_entries(&self) -> Vec<omnirad_model::F32Tensor<'static>> {
        let mut paths: Vec<&String> = self.state.keys().collect();
        paths.sort();
        let mut out = Vec::new();
        for p in paths {
            for (name, t) in [("adam_m", &self.state[p].0), ("adam_v", &self.state[p].1)] {
                let t = t.clone();
                let shape = t.dims().to_vec();
                let fetch = move || host(t.clone());
                out.push(omnirad_model::F32Tensor::fetched(
                    format!("{name}.{p}"),
                    shape,
                    fetch,
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::tensor::{TensorData, Tolerance};
    use omnirad_model::Cpu;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn values<B: Backend>(n: usize, seed: u64) -> Tensor<B, 1> {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    /// Three steps from zero moments, with clipping and weight decay, on a length that is no
    /// multiple of the kernel's chunk: the CPU kernel (Flex) against the tensor formula (which
    /// the autodiff backend's primitive type takes).
    #[test]
    fn cpu_kernel_matches_the_tensor_formula() {
        type Ad = Autodiff<Cpu>;
        let n = 3 * (1 << 14) + 77;
        let (mut p, mut p_ad) = (values::<Cpu>(n, 1), values::<Ad>(n, 1));
        let (mut s, mut s_ad) = (None, None);
        for t in 1..=3 {
            let c = Coeffs {
                scale: 0.5,
                beta1: 0.9,
                beta2: 0.999,
                bias1: 1.0 - 0.9f64.powi(t),
                bias2: 1.0 - 0.999f64.powi(t),
                lr: 1e-2,
                decay: 1.0 - 1e-2 * 0.05,
                eps: 1e-8,
            };
            let (p1, m, v) = update(p, values::<Cpu>(n, 10 + t as u64), s, &c);
            let (p1_ad, m_ad, v_ad) = update(p_ad, values::<Ad>(n, 10 + t as u64), s_ad, &c);
            let tol = Tolerance::<f32>::rel_abs(1e-6, 1e-7);
            let host = |t: Tensor<Ad, 1>| TensorData::new(super::host(t), [n]);
            for (a, b) in [(&p1, p1_ad.clone()), (&m, m_ad.clone()), (&v, v_ad.clone())] {
                TensorData::new(super::host(a.clone()), [n]).assert_approx_eq::<f32>(&host(b), tol);
            }
            (p, p_ad, s, s_ad) = (p1, p1_ad, Some((m, v)), Some((m_ad, v_ad)));
        }
        assert!(host(p.clone() - values::<Cpu>(n, 1))
            .iter()
            .any(|d| d.abs() > 1e-3));
    }

    /// The CPU kernel writes p, m and v where they are: a handle left on any of them makes
    /// `storage_mut` copy it first, three copies of the model per step.
    #[test]
    fn cpu_kernel_updates_in_place() {
        let n = 1000;
        let c = Coeffs {
            scale: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            bias1: 0.1,
            bias2: 0.001,
            lr: 1e-2,
            decay: 1.0,
            eps: 1e-8,
        };
        let addr = |t: &Tensor<Cpu, 1>| {
            let t: FlexTensor = t.clone().into_primitive().tensor();
            t.as_slice::<f32>().unwrap().as_ptr() as usize
        };
        let (p, m, v) = (values(n, 1), values(n, 2), values(n, 3).abs());
        let before = [addr(&p), addr(&m), addr(&v)];
        let (p, m, v) = update(p, values(n, 4), Some((m, v)), &c);
        assert_eq!([addr(&p), addr(&m), addr(&v)], before);
    }

    /// ‖g‖ over all parameters, against the sum of squares written out over the gradients'
    /// values (a weight of 37·29 values, no multiple of the kernel's lanes, and a bias).
    #[test]
    fn gradient_norm_is_the_norm_of_all_gradients() {
        type Ad = Autodiff<Cpu>;
        let dev = Default::default();
        let linear = burn::nn::LinearConfig::new(37, 29).init::<Ad>(&dev);
        let x = values::<Ad>(2 * 37, 3).reshape([2, 37]);
        let loss = linear.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        let (w, b) = (&linear.weight, linear.bias.as_ref().unwrap());
        let squares = |v: Vec<f32>| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        let want = (squares(host(grads.get::<Cpu, 2>(w.id).unwrap().reshape([37 * 29])))
            + squares(host(grads.get::<Cpu, 1>(b.id).unwrap())))
        .sqrt();
        let got = grad_norm::<Ad, _>(&linear, &grads);
        assert!(want > 1.0, "degenerate gradients: {want}");
        assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
    }

    /// With a zero gradient the update is the decay alone: an anchored parameter moves η·λ_a of
    /// the way to its anchor, any other shrinks by η·λ toward zero.
    #[test]
    fn anchored_parameters_decay_toward_their_anchor() {
        type Ad = Autodiff<Cpu>;
        let dev = Default::default();
        let linear = burn::nn::LinearConfig::new(3, 2).init::<Ad>(&dev);
        let (w, b) = (linear.weight.val(), linear.bias.as_ref().unwrap().val());
        let w0 = values::<Cpu>(6, 7);
        let x = Tensor::<Ad, 2>::ones([1, 3], &dev);
        let loss = (linear.forward(x) * 0.0).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        let mut opt = AdamW::<Cpu>::new(0.9, 0.999, 1e-8);
        opt.anchor = Some(Anchor {
            strength: 2.0,
            values: HashMap::from([("weight".to_string(), w0.clone())]),
        });
        let group = |_: &str| ParamGroup {
            lr_mult: 1.0,
            wd_mult: 1.0,
        };
        let s = StepSettings {
            lr: 0.1,
            weight_decay: 0.05,
            clip: None,
            group: &group,
        };
        let (stepped, _) = opt.step(linear, grads, &s);
        let (w, w0, b) = (host(w.inner().reshape([6])), host(w0), host(b.inner()));
        let (w1, b1) = (
            host(stepped.weight.val().inner().reshape([6])),
            host(stepped.bias.unwrap().val().inner()),
        );
        for i in 0..6 {
            let want = w[i] - 0.1 * 2.0 * (w[i] - w0[i]);
            assert!(
                (w1[i] - want).abs() < 1e-6,
                "weight {i}: {} vs {want}",
                w1[i]
            );
        }
        for i in 0..2 {
            let want = b[i] * (1.0 - 0.1 * 0.05);
            assert!((b1[i] - want).abs() < 1e-6, "bias {i}: {} vs {want}", b1[i]);
        }
    }
}
