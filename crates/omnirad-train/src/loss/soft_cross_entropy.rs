//! Cross-entropy of soft targets against tempered logits, row by row: the term the DINO
//! class-token and iBOT patch losses share.
//!
//! For logits s [N, K], targets p [N, K] (constants: the teacher's, detached) and temperature τ:
//! ```text
//! forward:   ℓ_n = −Σ_k p_nk · log softmax(s_n/τ)_k = lse_n · Σ_k p_nk − Σ_k p_nk · s_nk/τ,
//!            lse_n = log Σ_k exp(s_nk/τ)
//! backward:  ∂ℓ_n/∂s_nk = (softmax(s_n/τ)_k · Σ_k' p_nk' − p_nk) / τ
//! ```
//! As tensor ops (scale, log_softmax, product, row sum) this is about eight passes forward and
//! ten backward over [N, K] — with DINOv2's 65 536 prototypes and a few hundred masked patches,
//! tensors of 100+ MB — each of which burn-flex runs on one thread into freshly faulted memory:
//! 15 % of a ViT-S/16 pretraining step's samples on two cores (BENCHMARKS.md). On `Autodiff<Cpu>`
//! in f32 it is one op: a rayon pass over rows forward (max, then Σ exp, Σ p, Σ p·s) and one
//! backward that writes ∂ℓ/∂s, with only lse_n and Σ p kept between them. Anything else (CUDA,
//! where burn fuses elementwise ops; targets that carry gradients) runs the tensor ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use omnirad_model::{cast_same, is_same, Cpu};

/// ℓ_n of the module doc for every row: `[N]`.
pub fn soft_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    mut targets: Tensor<B, 2>,
    temp: f64,
) -> Tensor<B, 1> {
    let f32s = logits.dtype() == DType::F32 && targets.dtype() == DType::F32;
    if f32s && is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>() {
        let p: AdTensor = cast_same(targets.into_primitive().tensor());
        // The op gives the targets no gradient: targets on the graph take the tensor ops.
        if p.node.requirement.is_none() {
            let s = cast_same(logits.into_primitive().tensor());
            let out = autodiff_forward(s, p, temp);
            return Tensor::from_primitive(TensorPrimitive::Float(cast_same(out)));
        }
        targets = Tensor::from_primitive(TensorPrimitive::Float(cast_same(p)));
    }
    reference(logits, targets, temp)
}

/// The forward formula as burn tensor ops.
fn reference<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2>, temp: f64) -> Tensor<B, 1> {
    let lsm = log_softmax(logits / temp, 1);
    (targets * lsm).sum_dim(1).squeeze_dim::<1>(1).neg()
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(s: AdTensor, p: AdTensor, temp: f64) -> AdTensor {
    let inv_t = (1.0 / temp) as f32;
    let (loss, stats) = cpu::forward(&s.primitive, &p.primitive, inv_t);
    // Compute-bound as far as checkpointing goes: its output is N values, nothing to recompute.
    let op = SoftCrossEntropyBackward { inv_t };
    match op
        .prepare::<NoCheckpointing>([s.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&s), p.primitive.clone(), stats);
            prep.finish(state, loss)
        }
        OpsKind::UnTracked(prep) => prep.finish(loss),
    }
}

#[derive(Debug)]
struct SoftCrossEntropyBackward {
    inv_t: f32,
}

impl Backward<Cpu, 1> for SoftCrossEntropyBackward {
    /// The logits' node, the targets, and (lse_n, Σ_k p_nk) per row.
    type State = (NodeId, FlexTensor, Vec<(f32, f32)>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (s_id, p, stats) = ops.state;
        let s = ckpt.retrieve_node_output::<FlexTensor>(s_id);
        let d_loss = grads.consume::<Cpu>(&ops.node);
        let [Some(node)] = ops.parents else { return };
        grads.register::<Cpu>(node.id, cpu::backward(&s, &p, &stats, &d_loss, self.inv_t));
    }
}

/// The module doc's formulas on f32 rows, blocks of rows per rayon task.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, TensorData, TensorMetadata};
    use rayon::prelude::*;

    /// Values per rayon task (whole rows): enough to amortise scheduling for small K.
    const BLOCK: usize = 1 << 14;

    fn rows(t: &FlexTensor) -> (FlexTensor, usize, usize) {
        assert_eq!(t.dtype(), DType::F32, "soft_cross_entropy: f32 expected");
        let [n, k] = t.shape().dims::<2>();
        // A contiguous view at an offset (the patch rows of the shared head's output) is read
        // in place.
        let t = if t.is_contiguous() {
            t.clone()
        } else {
            t.to_contiguous()
        };
        (t, n, k)
    }

    fn f32s(t: &FlexTensor) -> &[f32] {
        t.as_slice::<f32>().expect("contiguous f32")
    }

    /// (ℓ_n [N], (lse_n, Σ p) per row).
    pub(super) fn forward(
        s: &FlexTensor,
        p: &FlexTensor,
        inv_t: f32,
    ) -> (FlexTensor, Vec<(f32, f32)>) {
        let (s, n, k) = rows(s);
        let (p, n2, k2) = rows(p);
        assert!(
            n == n2 && k == k2,
            "soft_cross_entropy: logits and targets differ in shape"
        );
        let per_task = (BLOCK / k.max(1)).max(1);
        let mut out = vec![(0f32, 0f32, 0f32); n];
        if k > 0 {
            out.par_chunks_mut(per_task)
                .zip(f32s(&s).par_chunks(per_task * k))
                .zip(f32s(&p).par_chunks(per_task * k))
                .for_each(|((out, s), p)| {
                    for ((o, s), p) in out.iter_mut().zip(s.chunks_exact(k)).zip(p.chunks_exact(k))
                    {
                        *o = kernels::row(s, p, inv_t);
                    }
                });
        }
        let loss: Vec<f32> = out.iter().map(|r| r.0).collect();
        let stats = out.iter().map(|r| (r.1, r.2)).collect();
        (FlexTensor::from_data(TensorData::new(loss, [n])), stats)
    }

    /// ∂ℓ/∂s [N, K] for the upstream gradient `d_loss` [N].
    pub(super) fn backward(
        s: &FlexTensor,
        p: &FlexTensor,
        stats: &[(f32, f32)],
        d_loss: &FlexTensor,
        inv_t: f32,
    ) -> FlexTensor {
        let (s, n, k) = rows(s);
        let (p, _, _) = rows(p);
        let d_loss = d_loss.to_contiguous();
        let g = f32s(&d_loss);
        assert!(
            g.len() == n && stats.len() == n,
            "soft_cross_entropy: gradient shape"
        );
        let per_task = (BLOCK / k.max(1)).max(1);
        let mut ds = vec![0f32; n * k];
        if k > 0 {
            ds.par_chunks_mut(per_task * k)
                .zip(f32s(&s).par_chunks(per_task * k))
                .zip(f32s(&p).par_chunks(per_task * k))
                .zip(stats.par_chunks(per_task).zip(g.par_chunks(per_task)))
                .for_each(|(((ds, s), p), (stats, g))| {
                    let rows = ds
                        .chunks_exact_mut(k)
                        .zip(s.chunks_exact(k))
                        .zip(p.chunks_exact(k));
                    for (((ds, s), p), (&(lse, psum), &g)) in rows.zip(stats.iter().zip(g)) {
                        kernels::row_grad(ds, s, p, lse, psum, g * inv_t, inv_t);
                    }
                });
        }
        FlexTensor::from_data(TensorData::new(ds, [n, k]))
    }

    mod kernels {
        use omnirad_model::simd::{dispatch, exp_neg};

        /// Lanes of the vectorised reductions; each lane's f32 partial sums are moved into f64
        /// every `FLUSH` values so a 65 536-long row loses no more than a short one.
        const L: usize = 16;
        const FLUSH: usize = 1024;

        /// (ℓ, lse, Σ p) of one row. NaN or ±∞ logits make ℓ non-finite (through Σ p·s), as
        /// the tensor ops would.
        pub(super) fn row(s: &[f32], p: &[f32], inv_t: f32) -> (f32, f32, f32) {
            let mut max = f32::NEG_INFINITY;
            row_max(s, &mut max);
            let mut sums = [0f64; 3];
            row_sums(s, p, max, inv_t, &mut sums);
            let [sum_exp, psum, ps] = sums;
            let lse = (max * inv_t) as f64 + sum_exp.ln();
            (
                (lse * psum - ps * inv_t as f64) as f32,
                lse as f32,
                psum as f32,
            )
        }

        dispatch! {
            row_max(s: &[f32], out: &mut f32) {
                let mut max = [f32::NEG_INFINITY; L];
                let mut chunks = s.chunks_exact(L);
                for c in &mut chunks {
                    for i in 0..L {
                        max[i] = if c[i] > max[i] { c[i] } else { max[i] };
                    }
                }
                for (i, &x) in chunks.remainder().iter().enumerate() {
                    max[i] = if x > max[i] { x } else { max[i] };
                }
                *out = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            }
        }

        dispatch! {
            /// [Σ exp((s − max)/τ), Σ p, Σ p·s] into `out`.
            row_sums(s: &[f32], p: &[f32], max: f32, inv_t: f32, out: &mut [f64; 3]) {
                for (s, p) in s.chunks(FLUSH).zip(p.chunks(FLUSH)) {
                    let (mut e, mut ps, mut pp) = ([0f32; L], [0f32; L], [0f32; L]);
                    let (mut sc, mut pc) = (s.chunks_exact(L), p.chunks_exact(L));
                    for (a, b) in (&mut sc).zip(&mut pc) {
                        for i in 0..L {
                            e[i] += exp_neg((a[i] - max) * inv_t);
                            pp[i] += b[i];
                            ps[i] += b[i] * a[i];
                        }
                    }
                    for (i, (&a, &b)) in sc.remainder().iter().zip(pc.remainder()).enumerate() {
                        e[i] += exp_neg((a - max) * inv_t);
                        pp[i] += b;
                        ps[i] += b * a;
                    }
                    let total = |v: [f32; L]| v.iter().map(|&x| x as f64).sum::<f64>();
                    out[0] += total(e);
                    out[1] += total(pp);
                    out[2] += total(ps);
                }
            }
        }

        dispatch! {
            /// ds ← c·(exp(s/τ − lse)·Σp − p), c = (upstream gradient)/τ.
            row_grad(ds: &mut [f32], s: &[f32], p: &[f32], lse: f32, psum: f32, c: f32, inv_t: f32) {
                for ((d, &s), &p) in ds.iter_mut().zip(s).zip(p) {
                    *d = c * (exp_neg(s * inv_t - lse) * psum - p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::tensor::Tolerance;

    type Ad = Autodiff<Cpu>;

    /// Deterministic values in [lo, hi) (burn's process-wide RNG is shared with other tests).
    fn values<B: Backend, const D: usize>(
        shape: [usize; D],
        seed: u64,
        lo: f32,
        hi: f32,
    ) -> Tensor<B, D> {
        let n = shape.iter().product::<usize>();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        Tensor::from_data(burn::tensor::TensorData::new(v, shape), &Default::default())
    }

    /// Logits like the prototype layer's (cosines), targets a sharp softmax of other logits.
    fn tensors<B: Backend>(n: usize, k: usize, seed: u64) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let s = values([n, k], seed, -1.0, 1.0);
        let t = values::<B, 2>([n, k], seed + 1, -1.0, 1.0);
        (s, burn::tensor::activation::softmax(t / 0.04, 1))
    }

    /// ℓ and ∂(Σ_n w_n ℓ_n)/∂s from the op and from burn's tensor ops, under either
    /// checkpointing strategy.
    fn both<C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>(
        n: usize,
        k: usize,
        temp: f64,
    ) {
        let (s, p) = tensors::<Cpu>(n, k, 7);
        let w = values::<Cpu, 1>([n], 9, 0.5, 2.0);
        let run = |fused: bool| {
            let s = Tensor::<Autodiff<Cpu, C>, 2>::from_inner(s.clone()).require_grad();
            let p = Tensor::<Autodiff<Cpu, C>, 2>::from_inner(p.clone());
            let w = Tensor::<Autodiff<Cpu, C>, 1>::from_inner(w.clone());
            let l = if fused {
                soft_cross_entropy(s.clone(), p, temp)
            } else {
                reference(s.clone(), p, temp)
            };
            let g = (l.clone() * w).sum().backward();
            (l.inner(), s.grad(&g).expect("logits gradient"))
        };
        let (l, g) = run(true);
        let (l_ref, g_ref) = run(false);
        l.into_data()
            .assert_approx_eq::<f32>(&l_ref.into_data(), Tolerance::relative(1e-5));
        g.into_data()
            .assert_approx_eq::<f32>(&g_ref.into_data(), Tolerance::rel_abs(1e-4, 1e-7));
    }

    #[test]
    fn matches_tensor_ops_forward_and_backward() {
        both::<NoCheckpointing>(5, 37, 0.1);
        both::<BalancedCheckpointing>(3, 40, 0.07);
        // DINOv2's prototype count: rows longer than a flush block, a row per rayon task.
        both::<NoCheckpointing>(3, 65_536, 0.1);
    }

    #[test]
    fn hand_computed_row() {
        // s = [0, ln 3], τ = 1: softmax = [1/4, 3/4]; p = [1, 0] → ℓ = ln 4.
        // ∂ℓ/∂s = softmax·Σp − p = [−3/4, 3/4].
        let dev = Default::default();
        let s = Tensor::<Ad, 2>::from_floats([[0.0, 3f32.ln()]], &dev).require_grad();
        let p = Tensor::<Ad, 2>::from_floats([[1.0, 0.0]], &dev);
        let l = soft_cross_entropy(s.clone(), p, 1.0);
        let v = l.clone().into_data().to_vec::<f32>().unwrap();
        assert!((v[0] - 4f32.ln()).abs() < 1e-6, "{v:?}");
        let g = s
            .grad(&l.sum().backward())
            .unwrap()
            .to_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(
            (g[0] + 0.75).abs() < 1e-6 && (g[1] - 0.75).abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn non_finite_logits_give_a_non_finite_loss() {
        let (s, p) = tensors::<Cpu>(2, 33, 3);
        let mut v = s.into_data().to_vec::<f32>().unwrap();
        v[40] = f32::NAN;
        v[5] = f32::INFINITY;
        let s = Tensor::<Ad, 2>::from_data(burn::tensor::TensorData::new(v, [2, 33]), &p.device());
        let l = soft_cross_entropy(s, Tensor::from_inner(p), 0.1);
        let l = l.into_data().to_vec::<f32>().unwrap();
        assert!(l.iter().all(|x| !x.is_finite()), "{l:?}");
    }

    #[test]
    fn targets_on_the_graph_get_their_gradient() {
        // The op gives targets no gradient, so tracked targets take the tensor-op path.
        let (s, p) = tensors::<Cpu>(2, 8, 5);
        let s = Tensor::<Ad, 2>::from_inner(s);
        let p = Tensor::<Ad, 2>::from_inner(p).require_grad();
        let g = soft_cross_entropy(s, p.clone(), 0.1).sum().backward();
        assert!(p.grad(&g).is_some());
    }
}
