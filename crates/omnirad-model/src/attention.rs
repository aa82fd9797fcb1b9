//! Scaled dot-product attention whose forward pass stays fused under autodiff.
//!
//! ```text
//! forward:   S = s·Q·Kᵀ,  P = softmax(S),  O = P·V                  (s = 1/√d_head)
//! backward:  dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),
//!            dQ = s·dS·K,  dK = s·dSᵀ·Q                             (P recomputed from Q, K)
//! ```
//! burn 0.21's `Autodiff` backend runs `module::attention` as its unfused fallback (matmul,
//! max, exp, sum, div, matmul) and keeps three or four [B, H, N, N] tensors per block for the
//! backward pass. Here the forward pass is the inner backend's own attention (CubeCL's flash
//! kernel on CUDA, burn-flex's fused loop on CPU) and the backward pass keeps only Q, K and V,
//! recomputing P once — the memory profile of FlashAttention's backward, with burn's matmuls.
//!
//! burn offers no extension point for autodiff ops short of a new backend trait on every model
//! type, so [`attention`] recognises the autodiff backends omnirad builds (over [`crate::Cpu`] and
//! `Cuda`) by type and registers the op on their graph; any other backend gets burn's op.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same};

/// softmax(Q·Kᵀ/√d)·V (no mask, no bias) with Q, K and V stacked on the batch axis: `qkv` is
/// [3·B, H, N, d] (Q, then K, then V), the output [B, H, N, d]. Taken packed so that the
/// backward pass writes dQ, dK and dV into one tensor: three `narrow`s would each zero-fill a
/// gradient the size of all three and add them up.
pub fn attention<B: Backend>(qkv: Tensor<B, 4>) -> Tensor<B, 4> {
    assert_eq!(
        qkv.dims()[0] % 3,
        0,
        "attention: qkv's first axis must be 3·B"
    );
    let qkv = match on_autodiff_of::<B, crate::Cpu>(qkv) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    #[cfg(feature = "cuda")]
    let qkv = match on_autodiff_of::<B, crate::Cuda>(qkv) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    let [q, k, v] = split(qkv);
    burn::tensor::module::attention(q, k, v, None, None, AttentionModuleOptions::default())
}

/// Q, K, V as views of the packed tensor.
fn split<B: Backend>(qkv: Tensor<B, 4>) -> [Tensor<B, 4>; 3] {
    let b = qkv.dims()[0] / 3;
    [0, 1, 2].map(|i| qkv.clone().narrow(0, i * b, b))
}

/// Runs the fused op when `B` is `Autodiff<I, _>` (whatever its checkpointing strategy: the
/// tensor type does not depend on it); hands the input back otherwise.
fn on_autodiff_of<B: Backend, I: Backend>(qkv: Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<I>>>() {
        return Err(qkv);
    }
    let out = cast_same(forward::<I>(cast_same(qkv.into_primitive().tensor())));
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn inner<I: Backend>(t: FloatTensor<I>) -> Tensor<I, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn forward<I: Backend>(qkv: FloatTensor<Autodiff<I>>) -> FloatTensor<Autodiff<I>> {
    let [q, k, v] = split(inner::<I>(qkv.primitive.clone()));
    let out =
        burn::tensor::module::attention(q, k, v, None, None, AttentionModuleOptions::default())
            .into_primitive()
            .tensor();
    // Compute-bound, so the checkpointing strategy never recomputes it: any `C` prepares it alike.
    match AttentionBackward
        .prepare::<burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>([qkv
            .node
            .clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = prep.checkpoint(&qkv);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 1> for AttentionBackward {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [q, k, v] = split(inner::<I>(ckpt.retrieve_node_output(ops.state)));
        let d_out = inner::<I>(grads.consume::<I>(&ops.node));
        if let [Some(node)] = ops.parents {
            let d_qkv = Tensor::cat(gradients(q, k, v, d_out).to_vec(), 0);
            grads.register::<I>(node.id, d_qkv.into_primitive().tensor());
        }
    }
}

/// The backward formulas of the module doc. Softmax and its Jacobian product run in f32 even
/// for bf16 inputs (as the fused kernels' statistics do); the matmuls run in the input dtype.
fn gradients<I: Backend>(
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    d_out: Tensor<I, 4>,
) -> [Tensor<I, 4>; 3] {
    let dtype = q.dtype();
    let low = |t: Tensor<I, 4>| t.cast(dtype);
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
    let p = softmax(scores.cast(FloatDType::F32) * scale, 3);
    let d_out = d_out.cast(dtype);
    let dv = low(p.clone()).swap_dims(2, 3).matmul(d_out.clone());
    let dp = d_out.matmul(v.swap_dims(2, 3)).cast(FloatDType::F32);
    let row = (dp.clone() * p.clone()).sum_dim(3);
    let ds = low(p * (dp - row) * scale);
    let dq = ds.clone().matmul(k);
    let dk = ds.swap_dims(2, 3).matmul(q);
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        assert_close, test_values, BalancedCheckpointing, CheckpointStrategy, Cpu, NoCheckpointing,
    };
    use burn::tensor::Tolerance;

    type Ad<C> = Autodiff<Cpu, C>;

    /// Output and input gradients of `f` under a random linear loss Σ O ⊙ W.
    fn run<C: CheckpointStrategy>(
        f: impl Fn(Tensor<Ad<C>, 4>, Tensor<Ad<C>, 4>, Tensor<Ad<C>, 4>) -> Tensor<Ad<C>, 4>,
        shape: [usize; 4],
    ) -> [Tensor<Cpu, 4>; 4] {
        let [q, k, v, w] = [1, 2, 3, 4].map(|s| test_values::<Ad<C>, 4>(shape, s));
        let [q, k, v] = [q, k, v].map(|t| t.require_grad());
        // A nonlinearity after the op, so its gradient is not the same at every position.
        let out = f(q.clone(), k.clone(), v.clone());
        let grads = (out.clone().tanh() * w).sum().backward();
        [
            out.inner(),
            q.grad(&grads).unwrap(),
            k.grad(&grads).unwrap(),
            v.grad(&grads).unwrap(),
        ]
    }

    fn unfused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let s = 1.0 / (q.dims()[3] as f64).sqrt();
        softmax(q.matmul(k.swap_dims(2, 3)) * s, 3).matmul(v)
    }

    fn packed<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        attention(Tensor::cat(vec![q, k, v], 0))
    }

    fn same_as_unfused<C: CheckpointStrategy>(shape: [usize; 4]) {
        let fused = run::<C>(packed, shape);
        let reference = run::<C>(unfused, shape);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.into_iter().zip(reference))
        {
            let scale = b.clone().abs().max().into_scalar();
            assert!(scale > 1e-3, "{name}: degenerate reference");
            assert_close(a, b, name);
        }
    }

    #[test]
    fn gradients_match_the_unfused_graph() {
        same_as_unfused::<NoCheckpointing>([2, 3, 17, 8]);
    }

    #[test]
    fn gradients_match_under_recomputation_and_on_the_flash_path() {
        // 600² scores exceed burn-flex's naive budget, so its tiled (flash) kernel runs.
        same_as_unfused::<BalancedCheckpointing>([1, 2, 600, 16]);
    }

    #[test]
    fn bf16_inputs_keep_their_dtype_and_stay_close() {
        let to_bf16 = |t: Tensor<Ad<NoCheckpointing>, 4>| t.cast(FloatDType::BF16);
        let [out, dq, ..] = run::<NoCheckpointing>(
            |q, k, v| packed(to_bf16(q), to_bf16(k), to_bf16(v)).cast(FloatDType::F32),
            [1, 2, 16, 8],
        );
        let [ref_out, ref_dq, ..] = run::<NoCheckpointing>(unfused, [1, 2, 16, 8]);
        out.into_data()
            .assert_approx_eq::<f32>(&ref_out.into_data(), Tolerance::absolute(0.05));
        dq.into_data()
            .assert_approx_eq::<f32>(&ref_dq.into_data(), Tolerance::absolute(0.05));
    }

    #[test]
    fn without_gradients_it_is_burns_op() {
        let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([2, 2, 9, 4], s));
        let a = packed(q.clone(), k.clone(), v.clone());
        let b = unfused(q, k, v);
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
    }
}
