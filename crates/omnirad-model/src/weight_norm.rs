//! The DINO head's prototype layer, `weight_norm(Linear(D, K, bias=False))`, as one op with CPU
//! f32 kernels.
//!
//! ```text
//! forward:   ‖v_k‖ = √(Σ_j v_kj²),  W = g ⊙ v/‖v‖ (per row, [K, D]),  Y = Z·Wᵀ  [M, K]
//! backward:  dZ = dY·W,  dW = dYᵀ·Z,
//!            dg_k = Σ_j dW_kj · v_kj/‖v_k‖,   dv_k = (g_k/‖v_k‖) · (dW_k − dg_k · v_k/‖v_k‖)
//! ```
//! With DINOv2's 65 536 prototypes W is 64 MB and Y holds 256 KB per token. As tensor ops the
//! weight norm is four passes over W forward and about as many backward, and burn-flex zero-fills
//! and then re-copies every matmul output, all on the calling thread. Here W is built by one rayon
//! pass, each product is one `gemm` call into a fresh buffer, and dv overwrites dW in the pass that
//! computes dg. As burn's matmul, the op keeps W only when Z needs a gradient, and Z only when the
//! layer trains.
//!
//! The kernels run for f32 tensors of the CPU backend, with and without autodiff (recognised by
//! type, as in [`crate::linear`]); any other backend or dtype gets the tensor ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same, Cpu};

/// `z` [M, D] · (`g` [K, 1] ⊙ `v` [K, D] / ‖v‖_row)ᵀ → [M, K].
pub fn weight_norm_linear<B: Backend>(
    z: Tensor<B, 2>,
    g: Tensor<B, 2>,
    v: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let f32s = [z.dtype(), g.dtype(), v.dtype()]
        .iter()
        .all(|&d| d == DType::F32);
    let flex = is_same::<B::FloatTensorPrimitive, FlexTensor>();
    let autodiff = is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
    if !f32s || !(flex || autodiff) {
        return z.matmul(weight(g, v).transpose());
    }
    let [z, g, v] = [
        z.into_primitive().tensor(),
        g.into_primitive().tensor(),
        v.into_primitive().tensor(),
    ];
    let out = if flex {
        cast_same(cpu::forward(&cast_same(z), &cast_same(g), &cast_same(v)).0)
    } else {
        cast_same(autodiff_forward(cast_same(z), cast_same(g), cast_same(v)))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// W = g ⊙ v/‖v‖_row as tensor ops.
pub fn weight<B: Backend>(g: Tensor<B, 2>, v: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = v.clone().powi_scalar(2).sum_dim(1).sqrt();
    v * (g / norm)
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(z: AdTensor, g: AdTensor, v: AdTensor) -> AdTensor {
    let (out, w, norms) = cpu::forward(&z.primitive, &g.primitive, &v.primitive);
    let (input_trains, weights_train) = (z.is_tracked(), g.is_tracked() || v.is_tracked());
    // Compute-bound: no checkpointing strategy recomputes it, so any prepares it alike.
    match WeightNormBackward
        .prepare::<NoCheckpointing>([z.node.clone(), g.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = State {
                z: weights_train.then(|| prep.checkpoint(&z)),
                v: weights_train.then(|| (v.primitive.clone(), g.primitive.clone(), norms)),
                w: input_trains.then_some(w),
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug, Clone)]
struct State {
    /// Z, when g or v trains.
    z: Option<NodeId>,
    /// v, g and ‖v‖ per row, when g or v trains.
    v: Option<(FlexTensor, FlexTensor, Vec<f32>)>,
    /// W, when Z needs a gradient.
    w: Option<FlexTensor>,
}

#[derive(Debug)]
struct WeightNormBackward;

impl Backward<Cpu, 3> for WeightNormBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let State { z, v, w } = ops.state;
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [pz, pg, pv] = ops.parents;
        if let (Some(node), Some(w)) = (pz, w) {
            grads.register::<Cpu>(node.id, cpu::input_grad(&d_out, &w));
        }
        if let (Some(z), Some((v, g, norms))) = (z, v) {
            let z = ckpt.retrieve_node_output::<FlexTensor>(z);
            let (dg, dv) = cpu::weight_grads(&d_out, &z, &v, &g, &norms);
            if let Some(node) = pg {
                grads.register::<Cpu>(node.id, dg);
            }
            if let Some(node) = pv {
                grads.register::<Cpu>(node.id, dv);
            }
        }
    }
}

/// The formulas of the module doc on f32 slices; gemm splits each product over rayon's threads.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;
    use rayon::prelude::*;

    use crate::cpu_gemm::{f32s, matrix, mm, Mat, ALL};

    /// (Y, W, ‖v‖ per row).
    pub(super) fn forward(
        z: &FlexTensor,
        g: &FlexTensor,
        v: &FlexTensor,
    ) -> (FlexTensor, FlexTensor, Vec<f32>) {
        let (z, m, d) = matrix(z);
        let (v, k, d2) = matrix(v);
        let (g, k2, one) = matrix(g);
        assert!(d == d2 && k == k2 && one == 1, "weight_norm_linear: shapes");
        let mut w = vec![0f32; k * d];
        let mut norms = vec![0f32; k];
        if d > 0 {
            w.par_chunks_mut(d)
                .zip(norms.par_iter_mut())
                .zip(f32s(&v).par_chunks(d).zip(f32s(&g)))
                .for_each(|((w, norm), (v, &g))| {
                    *norm = v.iter().map(|&x| x * x).sum::<f32>().sqrt();
                    let s = g / *norm;
                    w.iter_mut().zip(v).for_each(|(w, &v)| *w = v * s);
                });
        }
        let mut y = vec![0f32; m * k];
        mm(
            &mut y,
            false,
            Mat::new(f32s(&z), m, d),
            Mat::new(&w, k, d).t(),
            1.0,
            ALL,
        );
        let w = FlexTensor::from_data(TensorData::new(w, [k, d]));
        (FlexTensor::from_data(TensorData::new(y, [m, k])), w, norms)
    }

    /// dZ = dY·W.
    pub(super) fn input_grad(d_out: &FlexTensor, w: &FlexTensor) -> FlexTensor {
        let (dy, m, k) = matrix(d_out);
        let (w, _, d) = matrix(w);
        let mut dz = vec![0f32; m * d];
        mm(
            &mut dz,
            false,
            Mat::new(f32s(&dy), m, k),
            Mat::new(f32s(&w), k, d),
            1.0,
            ALL,
        );
        FlexTensor::from_data(TensorData::new(dz, [m, d]))
    }

    /// (dg [K, 1], dv [K, D]) through dW = dYᵀ·Z; dv is written over dW.
    pub(super) fn weight_grads(
        d_out: &FlexTensor,
        z: &FlexTensor,
        v: &FlexTensor,
        g: &FlexTensor,
        norms: &[f32],
    ) -> (FlexTensor, FlexTensor) {
        let (dy, m, k) = matrix(d_out);
        let (z, _, d) = matrix(z);
        let (v, _, _) = matrix(v);
        let (g, _, _) = matrix(g);
        let mut dv = vec![0f32; k * d];
        mm(
            &mut dv,
            false,
            Mat::new(f32s(&dy), m, k).t(),
            Mat::new(f32s(&z), m, d),
            1.0,
            ALL,
        );
        let mut dg = vec![0f32; k];
        if d > 0 {
            dv.par_chunks_mut(d)
                .zip(dg.par_iter_mut())
                .zip(f32s(&v).par_chunks(d))
                .zip(f32s(&g).par_iter().zip(norms))
                .for_each(|(((dw, dg), v), (&g, &norm))| {
                    let inv = 1.0 / norm;
                    *dg = dw.iter().zip(v).map(|(&a, &b)| a * b).sum::<f32>() * inv;
                    let s = g * inv;
                    let c = *dg * inv;
                    dw.iter_mut()
                        .zip(v)
                        .for_each(|(dw, &v)| *dw = s * (*dw - c * v));
                });
        }
        (
            FlexTensor::from_data(TensorData::new(dg, [k, 1])),
            FlexTensor::from_data(TensorData::new(dv, [k, d])),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{test_values, BalancedCheckpointing, CheckpointStrategy};
    use burn::tensor::Tolerance;

    fn reference<B: Backend>(z: Tensor<B, 2>, g: Tensor<B, 2>, v: Tensor<B, 2>) -> Tensor<B, 2> {
        z.matmul(weight(g, v).transpose())
    }

    type Op<B> = fn(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>;

    /// Y and the gradients of Z, g and v under a weighted sum, against burn's tensor ops.
    fn check<C: CheckpointStrategy>(m: usize, d: usize, k: usize) {
        type Ad<C> = Autodiff<Cpu, C>;
        let run = |f: Op<Ad<C>>| {
            let z = test_values::<Ad<C>, 2>([m, d], 1).require_grad();
            // g away from 0, as DINO's (1 at init).
            let g = (test_values::<Ad<C>, 2>([k, 1], 2) * 0.1 + 1.0).require_grad();
            let v = test_values::<Ad<C>, 2>([k, d], 3).require_grad();
            let y = f(z.clone(), g.clone(), v.clone());
            let weights = test_values::<Ad<C>, 2>([m, k], 4);
            let grads = (y.clone() * weights).sum().backward();
            let grad = |t: &Tensor<Ad<C>, 2>| t.grad(&grads).unwrap().into_data();
            (y.into_data(), grad(&z), grad(&g), grad(&v))
        };
        let ours = run(weight_norm_linear);
        let reference = run(reference);
        let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-5);
        ours.0.assert_approx_eq::<f32>(&reference.0, tol);
        ours.1.assert_approx_eq::<f32>(&reference.1, tol);
        ours.2.assert_approx_eq::<f32>(&reference.2, tol);
        ours.3.assert_approx_eq::<f32>(&reference.3, tol);
    }

    #[test]
    fn matches_tensor_ops_and_their_gradients() {
        check::<crate::NoCheckpointing>(13, 24, 37);
        check::<BalancedCheckpointing>(5, 16, 64);
    }

    #[test]
    fn without_autodiff_and_with_a_frozen_layer_it_matches_too() {
        let z = test_values::<Cpu, 2>([6, 8], 5);
        let g = test_values::<Cpu, 2>([10, 1], 6) * 0.1 + 1.0;
        let v = test_values::<Cpu, 2>([10, 8], 7);
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-6);
        weight_norm_linear(z.clone(), g.clone(), v.clone())
            .into_data()
            .assert_approx_eq::<f32>(&reference(z.clone(), g.clone(), v.clone()).into_data(), tol);
        // Only Z trains (the teacher's head, a frozen last layer).
        type Ad = Autodiff<Cpu>;
        let za = Tensor::<Ad, 2>::from_inner(z).require_grad();
        let (ga, va) = (
            Tensor::<Ad, 2>::from_inner(g),
            Tensor::<Ad, 2>::from_inner(v),
        );
        let w = test_values::<Ad, 2>([6, 10], 8);
        let grad = |f: Op<Ad>| {
            let g = (f(za.clone(), ga.clone(), va.clone()) * w.clone())
                .sum()
                .backward();
            za.grad(&g).unwrap().into_data()
        };
        grad(weight_norm_linear).assert_approx_eq::<f32>(&grad(reference), tol);
    }
}
