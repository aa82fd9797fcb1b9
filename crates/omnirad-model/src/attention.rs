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
//! kernel on CUDA, [`cpu`] below on CPU) and the backward pass keeps only Q, K and V,
//! recomputing P once — the memory profile of FlashAttention's backward, with burn's matmuls.
//!
//! burn offers no extension point for autodiff ops short of a new backend trait on every model
//! type, so [`attention`] recognises the autodiff backends omnirad builds (over [`crate::Cpu`] and
//! `Cuda`) by type and registers the op on their graph; any other backend gets burn's op.
//!
//! On the CPU backend both f32 passes are omnirad's own ([`cpu`]): burn-flex 0.21 computes
//! attention one (image, head) pair after another on one thread, which was a fifth of ViT-S/16
//! inference time on two cores (BENCHMARKS.md) and would be most of it on sixteen, and the
//! backward pass through burn's ops materialises P, dP and dS for the whole batch.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{DType, FloatDType, Tensor, TensorMetadata, TensorPrimitive};

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
    let out = inner_forward::<B>(qkv.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The forward pass without autodiff: [`cpu::forward`] for f32 on the CPU backend, the
/// backend's own attention otherwise.
fn inner_forward<I: Backend>(qkv: FloatTensor<I>) -> FloatTensor<I> {
    if cpu_f32::<I>(&[&qkv]) {
        return cast_same(cpu::forward(cast_same(qkv)));
    }
    let [q, k, v] = split(inner::<I>(qkv));
    burn::tensor::module::attention(q, k, v, None, None, AttentionModuleOptions::default())
        .into_primitive()
        .tensor()
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
    let out = inner_forward::<I>(qkv.primitive.clone());
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
        let qkv: FloatTensor<I> = ckpt.retrieve_node_output(ops.state);
        let d_out = grads.consume::<I>(&ops.node);
        let [Some(node)] = ops.parents else { return };
        let d_qkv = if cpu_f32::<I>(&[&qkv, &d_out]) {
            cast_same(cpu::backward(cast_same(qkv), cast_same(d_out)))
        } else {
            let [q, k, v] = split(inner::<I>(qkv));
            Tensor::cat(gradients(q, k, v, inner::<I>(d_out)).to_vec(), 0)
                .into_primitive()
                .tensor()
        };
        grads.register::<I>(node.id, d_qkv);
    }
}

/// Whether [`cpu`]'s kernels take these: f32 tensors of the CPU backend.
fn cpu_f32<I: Backend>(ts: &[&FloatTensor<I>]) -> bool {
    is_same::<FloatTensor<I>, burn::backend::flex::FlexTensor>()
        && ts.iter().all(|t| t.dtype() == DType::F32)
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

/// The f32 passes on the CPU backend, with single-threaded `gemm` calls (the library burn-flex
/// uses) in rayon tasks and the softmax on the vectorised exp of [`crate::simd`]. The forward
/// pass splits every (image, head) into blocks of query rows; the backward pass takes one task
/// per (image, head), walking its query-row blocks so that dK and dV accumulate without locks,
/// and never holds more than two [rows, N] blocks of P and dP per task.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{TensorData, TensorMetadata};
    use rayon::prelude::*;

    use std::mem::MaybeUninit;

    use crate::cpu_gemm::{contiguous, mm_new, mm_uninit, written, Mat, Parallelism};

    /// One thread: the rayon tasks over heads and row blocks are the parallelism.
    fn mm(dst: &mut [f32], acc: bool, a: Mat, b: Mat, beta: f32) {
        crate::cpu_gemm::mm(dst, acc, a, b, beta, gemm::Parallelism::None)
    }

    /// Query rows per task: enough rows for gemm's microkernel, and a batch of one image still
    /// splits over many cores (ViT-S/16: 6 heads × 4 blocks of its 197 tokens).
    const ROWS: usize = 64;

    /// `qkv` [3·B, H, N, d] → [B, H, N, d].
    pub(super) fn forward(qkv: FlexTensor) -> FlexTensor {
        let [b3, h, n, d] = qkv.shape().dims::<4>();
        let qkv = contiguous(qkv);
        let x = qkv.as_slice::<f32>().expect("contiguous f32");
        let (head, part) = (n * d, b3 / 3 * h * n * d);
        let (q, kv) = x.split_at(part);
        let (k, v) = kv.split_at(part);
        let scale = 1.0 / (d as f32).sqrt();
        let write = |out: &mut [MaybeUninit<f32>]| {
            if part == 0 {
                return;
            }
            out.par_chunks_mut(head).enumerate().for_each(|(i, o)| {
                let span = i * head..(i + 1) * head;
                let (q, k, v) = (&q[span.clone()], &k[span.clone()], &v[span]);
                o.par_chunks_mut(ROWS * d).enumerate().for_each(|(r, o)| {
                    let rows = o.len() / d;
                    let q = Mat::new(&q[r * ROWS * d..][..rows * d], rows, d);
                    let mut p = mm_new(q, Mat::new(k, n, d).t(), scale, Parallelism::None);
                    kernels::softmax_rows(&mut p, n);
                    let (p, v) = (Mat::new(&p, rows, n), Mat::new(v, n, d));
                    mm_uninit(o, p, v, 1.0, Parallelism::None);
                });
            })
        };
        // SAFETY: the row blocks of every (image, head) cover all `part` elements.
        let out = unsafe { written(part, write) };
        FlexTensor::from_data(TensorData::new(out, [b3 / 3, h, n, d]))
    }

    /// `qkv` [3·B, H, N, d] and dO [B, H, N, d] → dQ, dK, dV packed as `qkv` (module doc's
    /// formulas, P recomputed block by block).
    pub(super) fn backward(qkv: FlexTensor, d_out: FlexTensor) -> FlexTensor {
        let [b3, h, n, d] = qkv.shape().dims::<4>();
        let (qkv, d_out) = (contiguous(qkv), contiguous(d_out));
        let x = qkv.as_slice::<f32>().expect("contiguous f32");
        let g = d_out.as_slice::<f32>().expect("contiguous f32");
        let (head, part) = (n * d, b3 / 3 * h * n * d);
        let mut grad = vec![0f32; 3 * part];
        if part > 0 {
            let (q, kv) = x.split_at(part);
            let (k, v) = kv.split_at(part);
            let (gq, gkv) = grad.split_at_mut(part);
            let (gk, gv) = gkv.split_at_mut(part);
            let scale = 1.0 / (d as f32).sqrt();
            gq.par_chunks_mut(head)
                .zip(gk.par_chunks_mut(head))
                .zip(gv.par_chunks_mut(head))
                .enumerate()
                .for_each(|(i, ((dq, dk), dv))| {
                    let span = i * head..(i + 1) * head;
                    let k = Mat::new(&k[span.clone()], n, d);
                    let v = Mat::new(&v[span.clone()], n, d);
                    let (q, g) = (&q[span.clone()], &g[span]);
                    let mut p = vec![0f32; ROWS.min(n) * n];
                    let mut dp = vec![0f32; ROWS.min(n) * n];
                    for r0 in (0..n).step_by(ROWS) {
                        let rows = ROWS.min(n - r0);
                        let block = r0 * d..(r0 + rows) * d;
                        let q_r = Mat::new(&q[block.clone()], rows, d);
                        let g_r = Mat::new(&g[block.clone()], rows, d);
                        let (p, dp) = (&mut p[..rows * n], &mut dp[..rows * n]);
                        // dK and dV sum over the blocks.
                        let acc = r0 > 0;
                        mm(p, false, q_r, k.t(), scale);
                        kernels::softmax_rows(p, n);
                        mm(dv, acc, Mat::new(p, rows, n).t(), g_r, 1.0);
                        mm(dp, false, g_r, v.t(), 1.0);
                        // dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), in place of dP.
                        kernels::softmax_grad_rows(p, dp, n, scale);
                        mm(&mut dq[block], false, Mat::new(dp, rows, n), k, 1.0);
                        mm(dk, acc, Mat::new(dp, rows, n).t(), q_r, 1.0);
                    }
                });
        }
        FlexTensor::from_data(TensorData::new(grad, [b3, h, n, d]))
    }

    mod kernels {
        use crate::simd::{dispatch, exp_neg};

        dispatch! {
            /// Each `n`-long row of `s` ← softmax(row); a row holding NaN or ±∞ becomes NaN, as
            /// burn's softmax makes it (`exp_neg` would clamp NaN to a tiny finite value).
            softmax_rows(s: &mut [f32], n: usize) {
                const L: usize = 16;
                for row in s.chunks_exact_mut(n) {
                    // Lane-wise max (and a NaN detector: x·0 is NaN only for NaN and ±∞), so the
                    // reductions vectorise.
                    let mut max = [f32::NEG_INFINITY; L];
                    let mut bad = [0f32; L];
                    let mut chunks = row.chunks_exact(L);
                    for c in &mut chunks {
                        for i in 0..L {
                            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
                            bad[i] += c[i] * 0.0;
                        }
                    }
                    for (i, &x) in chunks.remainder().iter().enumerate() {
                        max[i] = if x > max[i] { x } else { max[i] };
                        bad[i] += x * 0.0;
                    }
                    if bad.iter().sum::<f32>().is_nan() {
                        row.fill(f32::NAN);
                        continue;
                    }
                    let m = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                    let mut sum = [0f32; L];
                    let mut chunks = row.chunks_exact_mut(L);
                    for c in &mut chunks {
                        for i in 0..L {
                            c[i] = exp_neg(c[i] - m);
                            sum[i] += c[i];
                        }
                    }
                    for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
                        *x = exp_neg(*x - m);
                        sum[i] += *x;
                    }
                    let inv = 1.0 / sum.iter().sum::<f32>();
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                }
            }
        }

        dispatch! {
            /// Row by row, `dp` ← s·p ⊙ (dp − Σ dp ⊙ p): the gradient of the scores through the
            /// softmax, scaled for S = s·Q·Kᵀ.
            softmax_grad_rows(p: &[f32], dp: &mut [f32], n: usize, s: f32) {
                const L: usize = 16;
                for (p, dp) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)) {
                    let mut acc = [0f32; L];
                    let (mut pc, mut gc) = (p.chunks_exact(L), dp.chunks_exact(L));
                    for (a, b) in (&mut pc).zip(&mut gc) {
                        for i in 0..L {
                            acc[i] += a[i] * b[i];
                        }
                    }
                    for (i, (a, b)) in pc.remainder().iter().zip(gc.remainder()).enumerate() {
                        acc[i] += a * b;
                    }
                    let dot: f32 = acc.iter().sum();
                    for (g, &p) in dp.iter_mut().zip(p) {
                        *g = s * p * (*g - dot);
                    }
                }
            }
        }
    }
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
    fn a_nan_query_makes_its_own_output_row_nan_and_no_other() {
        let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([1, 2, 70, 4], s));
        // Row 66 lies in the second block of query rows.
        let q = q.slice_assign(
            [0..1, 1..2, 66..67, 2..3],
            Tensor::full([1, 1, 1, 1], f32::NAN, &Default::default()),
        );
        let out = packed(q, k, v).into_data().to_vec::<f32>().unwrap();
        for (i, row) in out.chunks(4).enumerate() {
            let nan = i == 70 + 66;
            assert!(row.iter().all(|x| x.is_nan() == nan), "row {i}: {row:?}");
        }
    }

    #[test]
    fn without_gradients_it_matches_the_unfused_graph() {
        // 130 query rows: three blocks, the last one short.
        let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([2, 2, 130, 4], s));
        let a = packed(q.clone(), k.clone(), v.clone());
        let b = unfused(q, k, v);
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
    }
}
