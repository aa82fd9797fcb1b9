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
//! [`weight_norm_linear_bf16`] runs the three products in bf16, as [`crate::linear::linear_bf16`].

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same, Cpu, Precision};

/// `z` [M, D] · (`g` [K, 1] ⊙ `v` [K, D] / ‖v‖_row)ᵀ → [M, K].
pub fn weight_norm_linear<B: Backend>(
    z: Tensor<B, 2>,
    g: Tensor<B, 2>,
    v: Tensor<B, 2>,
) -> Tensor<B, 2> {
    op(z, g, v, Precision::F32)
}

/// [`weight_norm_linear`] with its products (forward, dZ and dW) in bf16 with f32 accumulation,
/// on f32 tensors, as [`crate::linear::linear_bf16`]; W and the weight-norm gradient stay f32.
pub fn weight_norm_linear_bf16<B: Backend>(
    z: Tensor<B, 2>,
    g: Tensor<B, 2>,
    v: Tensor<B, 2>,
) -> Tensor<B, 2> {
    op(z, g, v, Precision::Bf16)
}

fn op<B: Backend>(z: Tensor<B, 2>, g: Tensor<B, 2>, v: Tensor<B, 2>, p: Precision) -> Tensor<B, 2> {
    let f32s = [z.dtype(), g.dtype(), v.dtype()]
        .iter()
        .all(|&d| d == DType::F32);
    let flex = is_same::<B::FloatTensorPrimitive, FlexTensor>();
    let autodiff = is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
    if !f32s || !(flex || autodiff) {
        let w = weight(g, v).transpose();
        return match p {
            Precision::F32 => z.matmul(w),
            Precision::Bf16 => {
                let bf = FloatDType::BF16;
                z.cast(bf).matmul(w.cast(bf)).cast(FloatDType::F32)
            }
        };
    }
    let [z, g, v] = [
        z.into_primitive().tensor(),
        g.into_primitive().tensor(),
        v.into_primitive().tensor(),
    ];
    let out = if flex {
        cast_same(cpu::forward(&cast_same(z), &cast_same(g), &cast_same(v), p).0)
    } else {
        cast_same(autodiff_forward(
            cast_same(z),
            cast_same(g),
            cast_same(v),
            p,
        ))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// W = g ⊙ v/‖v‖_row as tensor ops.
pub fn weight<B: Backend>(g: Tensor<B, 2>, v: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = v.clone().powi_scalar(2).sum_dim(1).sqrt();
    v * (g / norm)
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(z: AdTensor, g: AdTensor, v: AdTensor, p: Precision) -> AdTensor {
    let (out, w, norms) = cpu::forward(&z.primitive, &g.primitive, &v.primitive, p);
    let (input_trains, weights_train) = (z.is_tracked(), g.is_tracked() || v.is_tracked());
    // Compute-bound: no checkpointing strategy recomputes it, so any prepares it alike.
    match WeightNormBackward(p)
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
struct WeightNormBackward(Precision);

impl Backward<Cpu, 3> for WeightNormBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let State { z, v, w } = ops.state;
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [pz, pg, pv] = ops.parents;
        let w = w.filter(|_| pz.is_some());
        let z = z.map(|z| ckpt.retrieve_node_output::<FlexTensor>(z));
        let weights = z
            .as_ref()
            .zip(v.as_ref())
            .map(|(z, (v, g, norms))| cpu::WeightState { z, v, g, norms });
        let (dz, dgv) = cpu::grads(&d_out, w.as_ref(), weights, self.0);
        if let (Some(node), Some(dz)) = (pz, dz) {
            grads.register::<Cpu>(node.id, dz);
        }
        if let Some((dg, dv)) = dgv {
            if let Some(node) = pg {
                grads.register::<Cpu>(node.id, dg);
            }
            if let Some(node) = pv {
                grads.register::<Cpu>(node.id, dv);
            }
        }
    }
}

/// The formulas of the module doc on f32 slices; the products split over rayon's threads, in
/// f32 or bf16 ([`Operand`](crate::cpu_gemm::Operand)).
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;
    use gemmkit::bf16;
    use rayon::prelude::*;

    use crate::cpu_gemm::{f32s, matrix, Mat, Operand};
    use crate::Precision;

    /// (Y, W, ‖v‖ per row).
    pub(super) fn forward(
        z: &FlexTensor,
        g: &FlexTensor,
        v: &FlexTensor,
        p: Precision,
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
        let y = match p {
            Precision::F32 => product::<f32>(f32s(&z), &w, m, d, k),
            Precision::Bf16 => product::<bf16>(f32s(&z), &w, m, d, k),
        };
        let w = FlexTensor::from_data(TensorData::new(w, [k, d]));
        (FlexTensor::from_data(TensorData::new(y, [m, k])), w, norms)
    }

    /// Z [m, d] · Wᵀ ([k, d]).
    fn product<T: Operand>(z: &[f32], w: &[f32], m: usize, d: usize, k: usize) -> Vec<f32> {
        let (z, w) = (T::from_f32s(z), T::from_f32s(w));
        T::product(Mat::new(&z, m, d), Mat::new(&w, k, d).t(), None)
    }

    /// What dg and dv need: Z, v, g and ‖v‖ per row.
    pub(super) struct WeightState<'a> {
        pub z: &'a FlexTensor,
        pub v: &'a FlexTensor,
        pub g: &'a FlexTensor,
        pub norms: &'a [f32],
    }

    /// dZ = dY·W when `w` is given, and (dg [K, 1], dv [K, D]) through dW = dYᵀ·Z when
    /// `weights` is.
    pub(super) fn grads(
        d_out: &FlexTensor,
        w: Option<&FlexTensor>,
        weights: Option<WeightState>,
        p: Precision,
    ) -> (Option<FlexTensor>, Option<(FlexTensor, FlexTensor)>) {
        match p {
            Precision::F32 => grads_as::<f32>(d_out, w, weights),
            Precision::Bf16 => grads_as::<bf16>(d_out, w, weights),
        }
    }

    /// [`grads`] with dY converted to `T` once for both products; dv is written over dW.
    fn grads_as<T: Operand>(
        d_out: &FlexTensor,
        w: Option<&FlexTensor>,
        weights: Option<WeightState>,
    ) -> (Option<FlexTensor>, Option<(FlexTensor, FlexTensor)>) {
        let (dy, m, k) = matrix(d_out);
        let dy = T::from_f32s(f32s(&dy));
        let dy = Mat::new(&dy, m, k);
        let dz = w.map(|w| {
            let (w, _, d) = matrix(w);
            let w = T::from_f32s(f32s(&w));
            let dz = T::product(dy, Mat::new(&w, k, d), None);
            FlexTensor::from_data(TensorData::new(dz, [m, d]))
        });
        let dgv = weights.map(|WeightState { z, v, g, norms }| {
            let (z, _, d) = matrix(z);
            let (v, _, _) = matrix(v);
            let (g, _, _) = matrix(g);
            let z = T::from_f32s(f32s(&z));
            let mut dv = T::product(dy.t(), Mat::new(&z, m, d), None);
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
        });
        (dz, dgv)
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

    /// The bf16 op is the f32 weight norm followed by [`crate::linear::linear_bf16`] (whose
    /// rounding is checked against its f64 definition): the same values up to an f32 ulp of W
    /// moving a bf16 rounding, for Y and all three gradients; and it is not the f32 op.
    #[test]
    fn bf16_matches_the_weight_norm_then_a_bf16_linear() {
        type Ad = Autodiff<Cpu>;
        let (m, d, k) = (21, 48, 70);
        let run = |f: Op<Ad>| {
            let z = test_values::<Ad, 2>([m, d], 21).require_grad();
            let g = (test_values::<Ad, 2>([k, 1], 22) * 0.1 + 1.0).require_grad();
            let v = test_values::<Ad, 2>([k, d], 23).require_grad();
            let y = f(z.clone(), g.clone(), v.clone());
            let grads = (y.clone() * test_values::<Ad, 2>([m, k], 24))
                .sum()
                .backward();
            let grad = |t: &Tensor<Ad, 2>| t.grad(&grads).unwrap().to_data().to_vec().unwrap();
            let y: Vec<f32> = y.into_data().to_vec().unwrap();
            [y, grad(&z), grad(&g), grad(&v)]
        };
        let ours = run(weight_norm_linear_bf16);
        let composed = run(|z, g, v| {
            let zeros = Tensor::zeros([v.dims()[0]], &Default::default());
            crate::linear::linear_bf16(z, weight(g, v).transpose(), zeros)
        });
        for (name, (o, r)) in ["y", "dz", "dg", "dv"]
            .iter()
            .zip(ours.iter().zip(&composed))
        {
            let scale = r.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (o, r)) in o.iter().zip(r).enumerate() {
                assert!(
                    (o - r).abs() <= r.abs() / 128.0 + 1e-4 * scale,
                    "{name}[{i}]: {o} vs {r}"
                );
            }
        }
        let full = run(weight_norm_linear);
        for (name, (o, f)) in ["y", "dz", "dv"]
            .iter()
            .zip([0, 1, 3].map(|i| (&ours[i], &full[i])))
        {
            let moved = o.iter().zip(f).filter(|(a, b)| a != b).count();
            assert!(
                moved > o.len() / 2,
                "{name}: only {moved} of {} differ from f32",
                o.len()
            );
        }
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
