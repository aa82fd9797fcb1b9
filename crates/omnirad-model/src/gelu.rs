//! GELU with a vectorised CPU kernel.
//!
//! ```text
//! gelu(x)  = x·Φ(x),            Φ(x) = ½·erfc(−x/√2)
//! gelu'(x) = Φ(x) + x·φ(x),     φ(x) = exp(−x²/2)/√(2π)
//! ```
//! burn-flex 0.21 runs GELU and its backward one element at a time on one thread through libm's
//! scalar `erff`; on ViT-S/16 that made GELU the largest op of a block (BENCHMARKS.md). Here
//! erfc is Numerical Recipes' Chebyshev fit (`erfcc`: relative error below 1.2e-7 on the whole
//! line, so the negative tail keeps its relative accuracy) and exp a Cephes-style polynomial, both
//! branch-free, so the loop vectorises (AVX-512 or AVX2 picked at run time) and rayon splits it.
//!
//! Under autodiff the op keeps only its input and is marked memory-bound with a recompute rule,
//! as burn's own GELU; the graph is prepared with `BalancedCheckpointing`, so the output that the
//! next matmul's backward needs is recomputed from the input rather than stored: one
//! [tokens, 4·dim] tensor less per block, for one more (cheap) GELU pass. The op is registered on
//! `Autodiff<Cpu>` graphs only (recognised by type, as in [`crate::attention`]); other backends,
//! CUDA included, keep burn's fused GELU.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ActivationOps, FloatTensor};
use burn::tensor::{DType, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;

use crate::cpu_gemm::contiguous;
use crate::{cast_same, is_same, Cpu};

/// `x·Φ(x)` elementwise (the exact, erf-based GELU, not the tanh approximation).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let prim = x.into_primitive().tensor();
    let out = if is_same::<B::FloatTensorPrimitive, FlexTensor>() {
        cast_same(forward(cast_same(prim)))
    } else if is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>() {
        cast_same(autodiff_forward(cast_same(prim)))
    } else {
        B::gelu(prim)
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn autodiff_forward(x: FloatTensor<Autodiff<Cpu>>) -> FloatTensor<Autodiff<Cpu>> {
    let out = forward(x.primitive.clone());
    match GeluBackward
        .prepare::<BalancedCheckpointing>([x.node.clone()])
        .memory_bound()
        .retro_forward(RetroGelu(x.node.id))
        .parents([&x])
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = prep.checkpoint(&x);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct RetroGelu(NodeId);

impl RetroForward for RetroGelu {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.0);
        states.save(out_node, forward(x))
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Cpu, 1> for GeluBackward {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let x = ckpt.retrieve_node_output::<FlexTensor>(ops.state);
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<Cpu>(node.id, backward(x, d_out));
        }
    }
}

/// `x ← gelu(x)` on one thread, for kernels that fuse GELU into their output.
pub(crate) fn in_place(x: &mut [f32]) {
    kernels::gelu(x)
}

/// `g ← g·gelu'(x)` on one thread, as [`in_place`].
pub(crate) fn grad_in_place(x: &[f32], g: &mut [f32]) {
    kernels::gelu_grad(x, g)
}

/// Elements per rayon task: large enough to amortise scheduling, small enough to share work.
const CHUNK: usize = 16 * 1024;

fn forward(x: FlexTensor) -> FlexTensor {
    if x.dtype() != DType::F32 {
        return Cpu::gelu(x);
    }
    map_f32(x, |_, v| kernels::gelu(v))
}

fn backward(x: FlexTensor, d_out: FlexTensor) -> FlexTensor {
    if x.dtype() != DType::F32 || d_out.dtype() != DType::F32 {
        return Cpu::gelu_backward(x, d_out);
    }
    let x = contiguous(x);
    let xs = x.as_slice::<f32>().expect("contiguous f32");
    map_f32(d_out, |i, g| {
        kernels::gelu_grad(&xs[i * CHUNK..i * CHUNK + g.len()], g)
    })
}

/// Applies `f(i, chunk)` to the `CHUNK`-sized chunks of `t`'s f32 values on rayon's threads: in
/// place when `t` owns its buffer, else on a copy that each task makes of its own chunk (autodiff
/// keeps GELU's input, so the forward pass gets a shared one; a copy on the calling thread first
/// was 1/6 of the serial work of a fine-tuning step).
fn map_f32(t: FlexTensor, f: impl Fn(usize, &mut [f32]) + Sync) -> FlexTensor {
    let mut t = contiguous(t);
    let (start, end) = t.layout().contiguous_offsets().expect("contiguous");
    if let Some(storage) = t.try_storage_mut::<f32>() {
        storage[start..end]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, v)| f(i, v));
        return t;
    }
    let x = t.as_slice::<f32>().expect("contiguous f32");
    let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, o.write_copy_of_slice(x)))
    };
    // SAFETY: the chunks of `x` cover the output.
    let out = unsafe { crate::cpu_gemm::written(x.len(), write) };
    FlexTensor::from_data(TensorData::new(out, t.shape()))
}

/// The elementwise math, written branch-free so that LLVM vectorises the loops.
mod kernels {
    use std::f32::consts::FRAC_1_SQRT_2;

    use crate::simd::{dispatch, exp_neg};

    /// Φ(x) = ½·erfc(−x/√2), with erfc(z) for z ≥ 0 from Numerical Recipes' `erfcc`.
    #[inline(always)]
    fn cdf(x: f32) -> f32 {
        let z = x.abs() * FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.5 * z);
        let p = 0.170_872_77f32;
        let p = p.mul_add(t, -0.822_152_23);
        let p = p.mul_add(t, 1.488_515_9);
        let p = p.mul_add(t, -1.135_204);
        let p = p.mul_add(t, 0.278_868_07);
        let p = p.mul_add(t, -0.186_288_06);
        let p = p.mul_add(t, 0.096_784_18);
        let p = p.mul_add(t, 0.374_091_96);
        let p = p.mul_add(t, 1.000_023_7);
        let p = p.mul_add(t, -1.265_512_2);
        let half_erfc = 0.5 * t * exp_neg((-z).mul_add(z, p));
        if x < 0.0 {
            half_erfc
        } else {
            1.0 - half_erfc
        }
    }

    #[inline(always)]
    fn gelu1(x: f32) -> f32 {
        x * cdf(x)
    }

    #[inline(always)]
    fn gelu_grad1(x: f32, g: f32) -> f32 {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        g * (x * INV_SQRT_2PI).mul_add(exp_neg(-0.5 * x * x), cdf(x))
    }

    dispatch! {
        /// `x ← gelu(x)`.
        gelu(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v = gelu1(*v);
            }
        }
    }

    dispatch! {
        /// `g ← g·gelu'(x)`.
        gelu_grad(x: &[f32], g: &mut [f32]) {
            for (g, &x) in g.iter_mut().zip(x) {
                *g = gelu_grad1(x, *g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        assert_close, test_values, BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };

    /// x·½·erfc(−x/√2) in f64, through libm.
    fn reference(x: f64) -> f64 {
        x * 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    fn reference_grad(x: f64) -> f64 {
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) + x * pdf
    }

    #[test]
    fn kernel_matches_f64_erfc_to_a_few_ulp_including_the_negative_tail() {
        let xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
        let mut ys = xs.clone();
        kernels::gelu(&mut ys);
        let mut gs = vec![1.0f32; xs.len()];
        kernels::gelu_grad(&xs, &mut gs);
        // Relative errors; gelu' crosses zero at −0.75 between terms of size 0.2, so there its
        // error is taken relative to 1 (its range is [−0.13, 1.13]). For x < −3 the f32
        // rounding of x² inside exp costs about x²·1e-7 relative, so the bound is looser there
        // (burn's libm path computes 1 + erf(x/√2) and has no correct digit below −5.5).
        let err =
            |got: f32, want: f64, floor: f64| (got as f64 - want).abs() / want.abs().max(floor);
        let worst = |pick: &dyn Fn(f32) -> bool, floor: f64| {
            let (mut w, mut wg) = ((0f64, 0f32), (0f64, 0f32));
            for ((&x, &y), &g) in xs.iter().zip(&ys).zip(&gs).filter(|((&x, _), _)| pick(x)) {
                let (e, eg) = (
                    err(y, reference(x as f64), 1e-30),
                    err(g, reference_grad(x as f64), floor),
                );
                if e > w.0 {
                    w = (e, x);
                }
                if eg > wg.0 {
                    wg = (eg, x);
                }
            }
            (w, wg)
        };
        let ((core, at), (core_grad, at_grad)) = worst(&|x| x >= -3.0, 1.0);
        assert!(core < 2e-6, "gelu: relative error {core:e} at x = {at}");
        assert!(
            core_grad < 2e-6,
            "gelu': relative error {core_grad:e} at {at_grad}"
        );
        let ((tail, at), (tail_grad, _)) = worst(&|x| x < -3.0, 1e-30);
        assert!(
            tail < 3e-5,
            "gelu tail: relative error {tail:e} at x = {at}"
        );
        assert!(tail_grad < 3e-5, "gelu' tail: relative error {tail_grad:e}");
        // Far tails: exact 0 / x, no NaN; NaN stays NaN.
        let mut t = [-200.0f32, -20.0, 20.0, 200.0, f32::NAN];
        kernels::gelu(&mut t);
        assert_eq!(&t[..4], &[0.0, 0.0, 20.0, 200.0][..]);
        assert!(t[4].is_nan());
    }

    #[test]
    fn cpu_tensor_matches_burns_gelu_on_every_layout() {
        let x = test_values::<Cpu, 3>([3, 50, 700], 1) * 3.0;
        let want = burn::tensor::activation::gelu(x.clone());
        let before = x.to_data();
        // Shared input (must not be written through), a transposed view, a narrowed one (non-zero
        // offset) and a uniquely owned one (written in place).
        assert_close(gelu(x.clone()), want.clone(), "shared");
        let t = |x: Tensor<Cpu, 3>| x.swap_dims(1, 2);
        assert_close(gelu(t(x.clone())), t(want.clone()), "transposed");
        let n = |x: Tensor<Cpu, 3>| x.narrow(2, 5, 600);
        assert_close(gelu(n(x.clone())), n(want.clone()), "narrowed");
        assert_close(gelu(x.clone() * 1.0), want, "owned");
        x.into_data().assert_eq(&before, true);
    }

    /// Output and gradients equal burn's GELU inside a small graph, under both checkpointing
    /// strategies (the op recomputes its output from its input when the next matmul needs it);
    /// more than two `CHUNK`s, the last one partial.
    fn grads_match_burn<C: CheckpointStrategy>() {
        type Ad<C> = Autodiff<Cpu, C>;
        let x = test_values::<Ad<C>, 2>([120, 300], 1) * 2.0;
        let w = test_values::<Ad<C>, 2>([300, 30], 2) * 0.1;
        let run = |act: fn(Tensor<Ad<C>, 2>) -> Tensor<Ad<C>, 2>| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let y = act(x.clone().mul_scalar(1.5)).matmul(w.clone());
            let grads = (y.clone() * y.clone()).sum().backward();
            [y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap()]
        };
        let want = run(burn::tensor::activation::gelu);
        let got = run(gelu);
        for (name, (a, b)) in ["out", "dx", "dw"].iter().zip(got.into_iter().zip(want)) {
            assert_close(a, b, name);
        }
    }

    #[test]
    fn autodiff_matches_burn_without_checkpointing() {
        grads_match_burn::<NoCheckpointing>();
    }

    #[test]
    fn autodiff_matches_burn_with_balanced_checkpointing() {
        grads_match_burn::<BalancedCheckpointing>();
    }
}
