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
//! kernel on CUDA, `cpu` below on CPU) and the backward pass keeps only Q, K and V,
//! recomputing P once — the memory profile of FlashAttention's backward, with burn's matmuls.
//!
//! burn offers no extension point for autodiff ops short of a new backend trait on every model
//! type, so [`attention`] recognises the autodiff backends omnirad builds (over [`crate::Cpu`],
//! `Cuda` and `Wgpu`) by type and registers the op on their graph; any other backend gets burn's op.
//!
//! On the CPU backend both f32 passes are omnirad's own (`cpu`): burn-flex 0.21 computes
//! attention one (image, head) pair after another on one thread, which was a fifth of ViT-S/16
//! inference time on two cores (BENCHMARKS.md) and would be most of it on sixteen, and the
//! backward pass through burn's ops materialises P, dP and dS for the whole batch. They work on
//! the qkv projection's output as it lies ([B, N, 3·H·d], each head a strided [N, d] block) and
//! write each head's output where the output projection reads it: splitting the heads out and
//! merging them back were two copies forward and two backward (7 % of a one-thread bf16
//! inference step, BENCHMARKS.md).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same, Cpu};

/// softmax(Q·Kᵀ/√d)·V (no mask, no bias) for every head, on the qkv projection's output as it
/// is: `qkv` [B, N, 3·H·d] holds each token's Q (heads side by side), then its K, then its V;
/// the output [B, N, H·d] is laid out as the output projection reads it. On the CPU backend
/// (f32 tensors) the kernels read each head where it lies and write it in place, so neither
/// the heads' split ([B, N, 3, H, d] → [3, B, H, N, d]) nor their merge is copied, forward or
/// backward; elsewhere the heads are permuted out and back around the backend's attention.
///
/// `bf16` asks for bf16 products on f32 tensors of the CPU backend (mixed precision there keeps
/// tensors f32, see `vit.rs`): both passes then run as bf16 blocks (`cpu_gemm::amx`: AMX
/// tiles, or AVX-512 BF16) where the CPU has them (`cpu::forward_bf16`, `cpu::backward_bf16`);
/// elsewhere, and on other backends (which get bf16 tensors instead), it changes nothing.
pub fn attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize, bf16: bool) -> Tensor<B, 3> {
    let [b, n, c] = qkv.dims();
    assert!(
        heads > 0 && c % (3 * heads) == 0,
        "attention: qkv's last axis ({c}) must be 3·heads·d with {heads} heads"
    );
    let bf16 = bf16 && crate::cpu_gemm::amx::available();
    if qkv.dtype() == DType::F32 {
        if is_same::<B::FloatTensorPrimitive, FlexTensor>() {
            let out = cpu_forward(cast_same(qkv.into_primitive().tensor()), heads, bf16);
            return Tensor::from_primitive(TensorPrimitive::Float(cast_same(out)));
        }
        // Any checkpointing strategy: the tensor type does not depend on it.
        if is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>() {
            let out = on_tokens(cast_same(qkv.into_primitive().tensor()), heads, bf16);
            return Tensor::from_primitive(TensorPrimitive::Float(cast_same(out)));
        }
    }
    let d = c / 3 / heads;
    let qkv = qkv
        .reshape([b, n, 3, heads, d])
        .permute([2, 0, 3, 1, 4])
        .reshape([3 * b, heads, n, d]);
    heads_first(qkv).swap_dims(1, 2).reshape([b, n, heads * d])
}

/// [`cpu::forward`], or [`cpu::forward_bf16`] in bf16 blocks.
fn cpu_forward(qkv: FlexTensor, heads: usize, bf16: bool) -> FlexTensor {
    if bf16 {
        cpu::forward_bf16(qkv, heads)
    } else {
        cpu::forward(qkv, heads)
    }
}

/// The CPU kernels as one op on the autodiff graph.
fn on_tokens(
    qkv: FloatTensor<Autodiff<Cpu>>,
    heads: usize,
    bf16: bool,
) -> FloatTensor<Autodiff<Cpu>> {
    let out = cpu_forward(qkv.primitive.clone(), heads, bf16);
    tracked(TokensBackward { heads, bf16 }, qkv, out)
}

#[derive(Debug)]
struct TokensBackward {
    heads: usize,
    /// bf16 products in bf16 blocks (see [`attention`]).
    bf16: bool,
}

impl Backward<Cpu, 1> for TokensBackward {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let qkv: FlexTensor = ckpt.retrieve_node_output(ops.state);
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [Some(node)] = ops.parents else { return };
        let d_qkv = if self.bf16 {
            cpu::backward_bf16(qkv, d_out, self.heads)
        } else {
            cpu::backward(qkv, d_out, self.heads)
        };
        grads.register::<Cpu>(node.id, d_qkv);
    }
}

/// `op` on the graph with `qkv` as its one input, kept for the backward pass. Compute-bound, so
/// the checkpointing strategy never recomputes it: any strategy prepares it alike.
fn tracked<I: Backend, O: Backward<I, 1, State = NodeId>>(
    op: O,
    qkv: FloatTensor<Autodiff<I>>,
    out: FloatTensor<I>,
) -> FloatTensor<Autodiff<I>> {
    match op
        .prepare::<NoCheckpointing>([qkv.node.clone()])
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

/// Attention with Q, K and V stacked on the batch axis: `qkv` [3·B, H, N, d] (Q, then K, then
/// V), the output [B, H, N, d]; on backends other than the CPU one with f32 tensors. Taken
/// packed so that the backward pass writes dQ, dK and dV into one tensor: three `narrow`s would
/// each zero-fill a gradient the size of all three and add them up.
fn heads_first<B: Backend>(qkv: Tensor<B, 4>) -> Tensor<B, 4> {
    let qkv = match on_autodiff_of::<B, Cpu>(qkv) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    #[cfg(feature = "cuda")]
    let qkv = match on_autodiff_of::<B, crate::Cuda>(qkv) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    #[cfg(feature = "wgpu")]
    let qkv = match on_autodiff_of::<B, crate::Wgpu>(qkv) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    Tensor::from_primitive(TensorPrimitive::Float(inner_forward::<B>(
        qkv.into_primitive().tensor(),
    )))
}

/// The backend's own attention on the packed layout.
fn inner_forward<I: Backend>(qkv: FloatTensor<I>) -> FloatTensor<I> {
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
    let qkv: FloatTensor<Autodiff<I>> = cast_same(qkv.into_primitive().tensor());
    let out = inner_forward::<I>(qkv.primitive.clone());
    let out = cast_same(tracked(HeadsFirstBackward, qkv, out));
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn inner<I: Backend>(t: FloatTensor<I>) -> Tensor<I, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

#[derive(Debug)]
struct HeadsFirstBackward;

impl<I: Backend> Backward<I, 1> for HeadsFirstBackward {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let qkv: FloatTensor<I> = ckpt.retrieve_node_output(ops.state);
        let d_out = grads.consume::<I>(&ops.node);
        let [Some(node)] = ops.parents else { return };
        let [q, k, v] = split(inner::<I>(qkv));
        let d_qkv = Tensor::cat(gradients(q, k, v, inner::<I>(d_out)).to_vec(), 0);
        grads.register::<I>(node.id, d_qkv.into_primitive().tensor());
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

    use crate::cpu_gemm::amx::kernels::scale_or_round;
    use crate::cpu_gemm::amx::{blocks, Packed, Panel, BLOCK};
    use crate::cpu_gemm::kernels::narrow;
    use crate::cpu_gemm::{
        bf16_matrix, bf16s, contiguous, f32s, mm_new, written, Mat, Parallelism,
    };
    use gemmkit::bf16;

    /// One thread: the rayon tasks over heads and row blocks are the parallelism.
    fn mm(dst: &mut [f32], acc: bool, a: Mat, b: Mat, beta: f32) {
        crate::cpu_gemm::mm(dst, acc, a, b, beta, gemm::Parallelism::None)
    }

    /// Query rows of one block of the f32 kernels: `gemm` packs K (and V) again for every
    /// product, a cost per block, so blocks are as long as their [rows, N] f32 scores stay
    /// within `SCORES` values (2 MiB, a core's L2), and at least `MIN_ROWS` long. From 64 rows
    /// to these, f32 attention at ViT-B/14's 1370 tokens ran 1.5× faster forward and 1.35×
    /// forward + backward, ViT-S/16's at 197 tokens 1.2× forward (BENCHMARKS.md, "Attention
    /// blocks sized to the sequence").
    const SCORES: usize = 1 << 19;
    const MIN_ROWS: usize = 64;

    fn block_rows(n: usize) -> usize {
        (SCORES / n.max(1)).max(MIN_ROWS).min(n.max(1))
    }

    /// Query rows per forward task: [`block_rows`], or fewer (not below `MIN_ROWS`) where the
    /// (image, head) pairs are too few to give every thread four tasks (a batch of one image
    /// on many cores).
    fn task_rows(n: usize, pairs: usize) -> usize {
        let per_pair = (4 * rayon::current_num_threads()).div_ceil(pairs.max(1));
        block_rows(n).min(n.div_ceil(per_pair).max(MIN_ROWS))
    }

    /// Where each (image, head) lies in the token-major tensors of [`super::attention`]: its
    /// Q, K and V are [N, d] blocks of `qkv` [B, N, 3·H·d] with rows 3·H·d apart, its output
    /// (and the output's gradient) an [N, d] block of [B, N, H·d] with rows H·d apart.
    #[derive(Clone, Copy)]
    struct Tokens {
        n: usize,
        h: usize,
        d: usize,
        /// (image, head) pairs.
        pairs: usize,
    }

    impl Tokens {
        fn new(qkv: &FlexTensor, heads: usize) -> Self {
            let [b, n, c] = qkv.shape().dims::<3>();
            let d = c / 3 / heads;
            Self {
                n,
                h: heads,
                d,
                pairs: b * heads,
            }
        }

        /// Elements of the output [B, N, H·d].
        fn out_len(&self) -> usize {
            self.pairs * self.n * self.d
        }

        /// Offset of pair `t`'s Q (`part` 0), K (1) or V (2) in `qkv`.
        fn qkv_at(&self, t: usize, part: usize) -> usize {
            let (i, j) = (t / self.h, t % self.h);
            (i * self.n * 3 + part) * self.h * self.d + j * self.d
        }

        /// Offset of pair `t` in the output.
        fn out_at(&self, t: usize) -> usize {
            let (i, j) = (t / self.h, t % self.h);
            i * self.n * self.h * self.d + j * self.d
        }

        /// Pair `t`'s Q, K or V as an [N, d] matrix.
        fn qkv<'a>(&self, x: &'a [f32], t: usize, part: usize) -> Mat<'a> {
            let at = self.qkv_at(t, part);
            Mat::strided(&x[at..], self.n, self.d, 3 * self.h * self.d)
        }

        /// Pair `t`'s block of an output-shaped tensor (dO) as an [N, d] matrix.
        fn out<'a>(&self, x: &'a [f32], t: usize) -> Mat<'a> {
            Mat::strided(&x[self.out_at(t)..], self.n, self.d, self.h * self.d)
        }
    }

    /// A tensor written by rayon tasks in [rows, d] blocks that interleave in memory (the heads
    /// of a token-major tensor), which no `chunks_mut` can hand out.
    #[derive(Clone, Copy)]
    struct Blocks {
        ptr: *mut f32,
        stride: usize,
    }

    // SAFETY: tasks write disjoint elements (`put`'s contract).
    unsafe impl Send for Blocks {}
    unsafe impl Sync for Blocks {}

    impl Blocks {
        fn new(out: &mut [MaybeUninit<f32>], stride: usize) -> Self {
            Self {
                ptr: out.as_mut_ptr().cast(),
                stride,
            }
        }

        /// Copies the [rows, width] row-major `block` to rows `stride` apart from `at`.
        ///
        /// # Safety
        /// The rows lie inside the tensor, and no other task writes them.
        unsafe fn put(self, at: usize, block: &[f32], width: usize) {
            if width == 0 {
                return;
            }
            for (r, row) in block.chunks_exact(width).enumerate() {
                // SAFETY: the caller's promise.
                unsafe {
                    let dst = self.ptr.add(at + r * self.stride);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
                }
            }
        }
    }

    /// `qkv` [B, N, 3·H·d] → [B, N, H·d], in tasks of [`task_rows`] query rows of one
    /// (image, head).
    pub(super) fn forward(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let qkv = contiguous(qkv);
        let t = Tokens::new(&qkv, heads);
        let (n, d) = (t.n, t.d);
        let x = f32s(&qkv);
        let scale = 1.0 / (d as f32).sqrt();
        let task_rows = task_rows(n, t.pairs);
        let blocks = n.div_ceil(task_rows);
        let write = |out: &mut [MaybeUninit<f32>]| {
            let out = Blocks::new(out, t.h * d);
            (0..t.pairs * blocks).into_par_iter().for_each(|task| {
                let (pair, r0) = (task / blocks, task % blocks * task_rows);
                let rows = task_rows.min(n - r0);
                let [q, k, v] = [0, 1, 2].map(|part| t.qkv(x, pair, part));
                let mut p = mm_new(q.row_block(r0, rows), k.t(), scale, Parallelism::None);
                kernels::softmax_rows(&mut p, n);
                let o = mm_new(Mat::new(&p, rows, n), v, 1.0, Parallelism::None);
                // SAFETY: each task writes its own rows of its own head.
                unsafe { out.put(t.out_at(pair) + r0 * t.h * d, &o, d) };
            })
        };
        // SAFETY: the row blocks of every (image, head) cover the whole output.
        let out = unsafe { written(t.out_len(), write) };
        FlexTensor::from_data(TensorData::new(out, out_shape(&qkv, heads)))
    }

    fn out_shape(qkv: &FlexTensor, heads: usize) -> [usize; 3] {
        let [b, n, c] = qkv.shape().dims::<3>();
        [b, n, c / 3 / heads * heads]
    }

    /// [`forward`] with bf16 products in bf16 blocks (AMX or AVX-512 BF16), the arithmetic of
    /// PyTorch autocast's attention: Q, K and V rounded to bf16, S = s·Q·Kᵀ summed in f32,
    /// softmax in f32, P rounded to bf16, O = P·V summed in f32 and rounded to bf16. One task
    /// per (image, head), which rounds and packs its K and V once for all its blocks of 32
    /// query rows.
    pub(super) fn forward_bf16(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let qkv = contiguous(qkv);
        let t = Tokens::new(&qkv, heads);
        let (n, d) = (t.n, t.d);
        let x = f32s(&qkv);
        let scale = 1.0 / (d as f32).sqrt();
        let write = |out: &mut [MaybeUninit<f32>]| {
            let out = Blocks::new(out, t.h * d);
            (0..t.pairs).into_par_iter().for_each(|pair| {
                let [q, k, v] = [0, 1, 2].map(|part| bf16_matrix(t.qkv(x, pair, part)));
                let q = Mat::new(&q, n, d);
                let kt = Packed::new(Mat::new(&k, n, d).t(), false);
                let v = Packed::new(Mat::new(&v, n, d), false);
                let mut p = vec![0f32; BLOCK * n];
                let mut o = vec![0f32; BLOCK * d];
                for r0 in (0..n).step_by(BLOCK) {
                    let rows = BLOCK.min(n - r0);
                    let p = &mut p[..rows * n];
                    probabilities(q, &kt, r0, scale, p);
                    // SAFETY: `narrow` writes the whole row.
                    let p = unsafe {
                        Panel::with_rows(rows, n, |i, row| narrow(&p[i * n..][..n], row))
                    };
                    let o = &mut o[..rows * d];
                    blocks(&p, &v, |c0, c| store(o, d, c0, c, None));
                    // SAFETY: each task writes its own head.
                    unsafe { out.put(t.out_at(pair) + r0 * t.h * d, o, d) };
                }
            })
        };
        // SAFETY: the row blocks of every (image, head) cover the whole output.
        let out = unsafe { written(t.out_len(), write) };
        FlexTensor::from_data(TensorData::new(out, out_shape(&qkv, heads)))
    }

    /// Rows r0.. of P = softmax(s·Q·Kᵀ) into `p` ([rows, N]), from bf16 Q and packed Kᵀ.
    fn probabilities(q: Mat<bf16>, kt: &Packed, r0: usize, scale: f32, p: &mut [f32]) {
        let n = kt.cols();
        blocks(&Panel::new(q, r0, p.len() / n), kt, |c0, c| {
            store(p, n, c0, c, Some(scale))
        });
        kernels::softmax_rows(p, n);
    }

    /// `qkv` [B, N, 3·H·d] and dO [B, N, H·d] → dQ, dK, dV laid out as `qkv` (module doc's
    /// formulas, P recomputed block by block).
    pub(super) fn backward(qkv: FlexTensor, d_out: FlexTensor, heads: usize) -> FlexTensor {
        per_head_gradients(qkv, d_out, heads, |[q, k, v, g], [dq, dk, dv]| {
            let (n, d) = q.shape();
            let scale = 1.0 / (d as f32).sqrt();
            let block = block_rows(n);
            let mut p = vec![0f32; block * n];
            let mut dp = vec![0f32; block * n];
            for r0 in (0..n).step_by(block) {
                let rows = block.min(n - r0);
                let (q_r, g_r) = (q.row_block(r0, rows), g.row_block(r0, rows));
                let (p, dp) = (&mut p[..rows * n], &mut dp[..rows * n]);
                // dK and dV sum over the blocks.
                let acc = r0 > 0;
                mm(p, false, q_r, k.t(), scale);
                kernels::softmax_rows(p, n);
                mm(dv, acc, Mat::new(p, rows, n).t(), g_r, 1.0);
                mm(dp, false, g_r, v.t(), 1.0);
                // dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), in place of dP.
                kernels::softmax_grad_rows(p, dp, n, scale);
                let dq = &mut dq[r0 * d..(r0 + rows) * d];
                mm(dq, false, Mat::new(dp, rows, n), k, 1.0);
                mm(dk, acc, Mat::new(dp, rows, n).t(), q_r, 1.0);
            }
        })
    }

    /// [`backward`] with bf16 products in bf16 blocks (the forward pass's arithmetic, see
    /// [`forward_bf16`]): P and dS rounded to bf16 as products' inputs, the softmax and its
    /// Jacobian product in f32, each gradient a bf16-rounded sum. One task per (image, head),
    /// which keeps its whole bf16 P and dS ([N, N] each) for dV = Pᵀ·dO and dK = dSᵀ·Q.
    pub(super) fn backward_bf16(qkv: FlexTensor, d_out: FlexTensor, heads: usize) -> FlexTensor {
        per_head_gradients(qkv, d_out, heads, |[q, k, v, g], [dq, dk, dv]| {
            let (n, d) = q.shape();
            let scale = 1.0 / (d as f32).sqrt();
            let [q, k, v, g] = [q, k, v, g].map(bf16_matrix);
            let [q, k, v, g] = [&q, &k, &v, &g].map(|t| Mat::new(t, n, d));
            let (kt, vt) = (Packed::new(k.t(), false), Packed::new(v.t(), false));
            let mut p_all = vec![bf16::ZERO; n * n];
            let mut ds_all = vec![bf16::ZERO; n * n];
            let mut p = vec![0f32; BLOCK * n];
            let mut dp = vec![0f32; BLOCK * n];
            let k_rows = Packed::new(k, false);
            for r0 in (0..n).step_by(BLOCK) {
                let rows = BLOCK.min(n - r0);
                let (p, dp) = (&mut p[..rows * n], &mut dp[..rows * n]);
                probabilities(q, &kt, r0, scale, p);
                blocks(&Panel::new(g, r0, rows), &vt, |c0, c| {
                    store(dp, n, c0, c, Some(1.0))
                });
                // dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), in place of dP.
                kernels::softmax_grad_rows(p, dp, n, scale);
                let block = r0 * n..(r0 + rows) * n;
                p_all[block.clone()].copy_from_slice(&bf16s(p));
                ds_all[block.clone()].copy_from_slice(&bf16s(dp));
                let ds = Mat::new(&ds_all[block], rows, n);
                let dq = &mut dq[r0 * d..(r0 + rows) * d];
                blocks(&Panel::new(ds, 0, rows), &k_rows, |c0, c| {
                    store(dq, d, c0, c, None)
                });
            }
            // dV = Pᵀ·dO and dK = dSᵀ·Q, by blocks of their rows (P's and dS's columns).
            let (p_t, ds_t) = (Mat::new(&p_all, n, n).t(), Mat::new(&ds_all, n, n).t());
            for (out, a, b) in [(dv, p_t, g), (dk, ds_t, q)] {
                let b = Packed::new(b, false);
                for r0 in (0..n).step_by(BLOCK) {
                    let rows = BLOCK.min(n - r0);
                    let out = &mut out[r0 * d..(r0 + rows) * d];
                    blocks(&Panel::new(a, r0, rows), &b, |c0, c| {
                        store(out, d, c0, c, None)
                    });
                }
            }
        })
    }

    /// The backward passes' frame: dQ, dK and dV laid out as `qkv`, each (image, head) computed
    /// by `head([Q, K, V, dO], [dQ, dK, dV])` (all [N, d]; the gradients contiguous, written
    /// whole) in a rayon task of its own, and put in place.
    fn per_head_gradients(
        qkv: FlexTensor,
        d_out: FlexTensor,
        heads: usize,
        head: impl Fn([Mat; 4], [&mut [f32]; 3]) + Sync,
    ) -> FlexTensor {
        let (qkv, d_out) = (contiguous(qkv), contiguous(d_out));
        let t = Tokens::new(&qkv, heads);
        let (x, g) = (f32s(&qkv), f32s(&d_out));
        let span = t.n * t.d;
        let write = |grad: &mut [MaybeUninit<f32>]| {
            let grad = Blocks::new(grad, 3 * t.h * t.d);
            (0..t.pairs).into_par_iter().for_each(|pair| {
                let mut local = vec![0f32; 3 * span];
                let (dq, dkv) = local.split_at_mut(span);
                let (dk, dv) = dkv.split_at_mut(span);
                let [q, k, v] = [0, 1, 2].map(|part| t.qkv(x, pair, part));
                head([q, k, v, t.out(g, pair)], [dq, dk, dv]);
                for (part, block) in local.chunks_exact(span.max(1)).enumerate() {
                    // SAFETY: each task writes its own head's gradients.
                    unsafe { grad.put(t.qkv_at(pair, part), block, t.d) };
                }
            })
        };
        // SAFETY: the three gradients of every (image, head) cover the whole tensor.
        let grad = unsafe { written(3 * t.out_len(), write) };
        FlexTensor::from_data(TensorData::new(grad, qkv.shape().dims::<3>()))
    }

    /// `out` [rows, width] columns c0.. ← a 32-wide block of sums, times `s` or (`None`)
    /// rounded to bf16, as far as both reach.
    fn store(out: &mut [f32], width: usize, c0: usize, c: &[f32], s: Option<f32>) {
        let cols = BLOCK.min(width - c0);
        scale_or_round(c, s, &mut out[c0..], width, cols);
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
                    // The remainder as one more chunk, padded with a value of the row (neither
                    // the max nor the detector changes): the scalar loop kept LLVM from
                    // vectorising the pass.
                    let mut step = |c: &[f32; L]| {
                        for i in 0..L {
                            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
                            bad[i] += c[i] * 0.0;
                        }
                    };
                    for c in &mut chunks {
                        step(c.try_into().unwrap());
                    }
                    let mut last = [row[0]; L];
                    let rest = chunks.remainder();
                    last[..rest.len()].copy_from_slice(rest);
                    step(&last);
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
                    // The remainder as one more full chunk (−∞ padding, whose exp is 0): with
                    // rows of 197, the scalar loop was a third of the row's time.
                    let rest = chunks.into_remainder();
                    let mut c = [f32::NEG_INFINITY; L];
                    c[..rest.len()].copy_from_slice(rest);
                    for i in 0..L {
                        c[i] = exp_neg(c[i] - m);
                        sum[i] += c[i];
                    }
                    rest.copy_from_slice(&c[..rest.len()]);
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

    /// Q, K, V [B, H, N, d] as the qkv projection lays them out: [B, N, 3·H·d].
    fn tokens<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, n, d] = q.dims();
        Tensor::stack::<5>(vec![q, k, v], 0)
            .permute([1, 3, 0, 2, 4])
            .reshape([b, n, 3 * h * d])
    }

    /// [B, N, H·d] → [B, H, N, d].
    fn heads<B: Backend>(t: Tensor<B, 3>, h: usize) -> Tensor<B, 4> {
        let [b, n, c] = t.dims();
        t.reshape([b, n, h, c / h]).swap_dims(1, 2)
    }

    /// [B, N, 3·H·d] → [3·B, H, N, d] (Q's heads, then K's, then V's).
    fn heads_stacked<B: Backend>(t: Tensor<B, 3>, h: usize) -> Tensor<B, 4> {
        let [b, n, c] = t.dims();
        t.reshape([b, n, 3, h, c / 3 / h])
            .permute([2, 0, 3, 1, 4])
            .reshape([3 * b, h, n, c / 3 / h])
    }

    /// [`attention`] on Q, K, V [B, H, N, d], its output as [B, H, N, d].
    fn fused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = q.dims()[1];
        heads(attention(tokens(q, k, v), h, false), h)
    }

    fn same_as_unfused<C: CheckpointStrategy>(shape: [usize; 4]) {
        let fused = run::<C>(fused, shape);
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
    fn long_sequences_split_into_blocks_of_query_rows() {
        // 1100 tokens: the backward pass sums dK and dV over three blocks (the last partial),
        // the forward pass runs several tasks per (image, head).
        same_as_unfused::<NoCheckpointing>([1, 1, 1100, 8]);
    }

    #[test]
    fn bf16_inputs_keep_their_dtype_and_stay_close() {
        let to_bf16 = |t: Tensor<Ad<NoCheckpointing>, 4>| t.cast(FloatDType::BF16);
        let [out, dq, ..] = run::<NoCheckpointing>(
            |q, k, v| fused(to_bf16(q), to_bf16(k), to_bf16(v)).cast(FloatDType::F32),
            [1, 2, 16, 8],
        );
        let [ref_out, ref_dq, ..] = run::<NoCheckpointing>(unfused, [1, 2, 16, 8]);
        out.into_data()
            .assert_approx_eq::<f32>(&ref_out.into_data(), Tolerance::absolute(0.05));
        dq.into_data()
            .assert_approx_eq::<f32>(&ref_dq.into_data(), Tolerance::absolute(0.05));
    }

    /// The bf16 arithmetic of `cpu::forward_bf16` in f64, for one (image, head): Q, K, V rounded
    /// to bf16, S and O summed exactly, P and O rounded to bf16.
    fn bf16_reference(q: &[f32], k: &[f32], v: &[f32], n: usize, d: usize) -> Vec<f64> {
        let r = |x: f64| half::bf16::from_f64(x).to_f64();
        let [q, k, v] = [q, k, v].map(|t| t.iter().map(|&x| r(x as f64)).collect::<Vec<_>>());
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0; n * d];
        for i in 0..n {
            let s: Vec<f64> = (0..n)
                .map(|j| scale * (0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f64>())
                .collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| r(x / total)).collect();
            for t in 0..d {
                out[i * d + t] = r((0..n).map(|j| p[j] * v[j * d + t]).sum());
            }
        }
        out
    }

    /// [B, H, N, d] for the bf16 tests: 70 query rows make three blocks of 32, the last one
    /// short; d 16 pads the tiles' k, d 48 makes two blocks of output columns; 600 tokens make
    /// P's rows span several rounding tasks of a parallel conversion (which must not run inside
    /// a tile-holding task).
    const BF16_SHAPES: [(usize, usize, usize, usize); 3] =
        [(2, 3, 70, 16), (1, 2, 40, 48), (1, 3, 600, 8)];

    #[test]
    fn bf16_products_on_amx_follow_the_bf16_arithmetic() {
        if !crate::amx_here("attention's bf16 products") {
            return;
        }
        for (b, h, n, d) in BF16_SHAPES {
            let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([b, h, n, d], s));
            let qkv = tokens(q.clone(), k.clone(), v.clone());
            let half = heads(attention(qkv.clone(), h, true), h)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let full = unfused(q.clone(), k.clone(), v.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let [q, k, v] = [q, k, v].map(|t| t.into_data().to_vec::<f32>().unwrap());
            let span = n * d;
            for head in 0..b * h {
                let s = head * span..(head + 1) * span;
                let want = bf16_reference(&q[s.clone()], &k[s.clone()], &v[s.clone()], n, d);
                for (i, (&got, want)) in half[s].iter().zip(want).enumerate() {
                    // f32 sums may round P or O to the neighbouring bf16 value: two steps of 2⁻⁸.
                    assert!(
                        (got as f64 - want).abs() <= want.abs() / 64.0 + 1e-3,
                        "[{b}, {h}, {n}, {d}] head {head}, element {i}: {got} vs {want}"
                    );
                }
            }
            // Every output is a bf16 value, and the path differs from f32's (the flag off).
            assert!(half.iter().all(|x| x.to_bits() & 0xFFFF == 0));
            assert!(half.iter().zip(&full).any(|(a, b)| (a - b).abs() > 1e-3));
            let f32_path = heads(attention(qkv, h, false), h)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert!(f32_path
                .iter()
                .zip(&full)
                .all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }

    /// The bf16 backward arithmetic of `cpu::backward_bf16` in f64 for one (image, head): dQ,
    /// dK and dV as flat [N, d] vectors.
    fn bf16_backward_reference(t: [&[f32]; 4], n: usize, d: usize) -> [Vec<f64>; 3] {
        let r = |x: f64| half::bf16::from_f64(x).to_f64();
        let [q, k, v, g] = t.map(|t| t.iter().map(|&x| r(x as f64)).collect::<Vec<_>>());
        let scale = 1.0 / (d as f64).sqrt();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let (mut p, mut ds) = (vec![0.0; n * n], vec![0.0; n * n]);
        for i in 0..n {
            let row = |t: &[f64], j: usize| t[j * d..(j + 1) * d].to_vec();
            let s: Vec<f64> = (0..n)
                .map(|j| scale * dot(&row(&q, i), &row(&k, j)))
                .collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
            let pi: Vec<f64> = s.iter().map(|x| (x - max).exp() / total).collect();
            let dp: Vec<f64> = (0..n).map(|j| dot(&row(&g, i), &row(&v, j))).collect();
            let inner = dot(&pi, &dp);
            for j in 0..n {
                p[i * n + j] = r(pi[j]);
                ds[i * n + j] = r(scale * pi[j] * (dp[j] - inner));
            }
        }
        // C[i][t] = Σ_j A(i, j)·B[j][t], A read through `a`.
        let prod = |a: &dyn Fn(usize, usize) -> f64, b: &[f64]| {
            let mut c = vec![0.0; n * d];
            for i in 0..n {
                for t in 0..d {
                    c[i * d + t] = r((0..n).map(|j| a(i, j) * b[j * d + t]).sum());
                }
            }
            c
        };
        [
            prod(&|i, j| ds[i * n + j], &k),
            prod(&|i, j| ds[j * n + i], &q),
            prod(&|i, j| p[j * n + i], &g),
        ]
    }

    #[test]
    fn bf16_gradients_on_amx_follow_the_bf16_arithmetic() {
        if !crate::amx_here("attention's bf16 gradients") {
            return;
        }
        for (b, h, n, d) in BF16_SHAPES {
            let part = b * h * n * d;
            let qkv = test_values::<Cpu, 4>([3 * b, h, n, d], 5);
            let g = test_values::<Cpu, 4>([b, h, n, d], 6);
            // The kernels take the token layout, the reference below [3·B, H, N, d].
            let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(0, i * b, b));
            let x = tokens(q, k, v).into_primitive().tensor();
            let dy = g.clone().swap_dims(1, 2).reshape([b, n, h * d]);
            let dy = dy.into_primitive().tensor();
            let stacked = |t: FlexTensor| {
                let t = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(t));
                heads_stacked(t, h).into_data().to_vec::<f32>().unwrap()
            };
            let grad = stacked(cpu::backward_bf16(x.clone(), dy.clone(), h));
            let exact = stacked(cpu::backward(x, dy, h));
            let (x, g) = (
                qkv.into_data().to_vec::<f32>().unwrap(),
                g.into_data().to_vec::<f32>().unwrap(),
            );
            let span = n * d;
            for head in 0..b * h {
                let at = |t: &[f32], which: usize| t[which * part + head * span..][..span].to_vec();
                let (q, k, v, gh) = (at(&x, 0), at(&x, 1), at(&x, 2), at(&g, 0));
                let want = bf16_backward_reference([&q, &k, &v, &gh], n, d);
                for (which, want) in want.iter().enumerate() {
                    let got = at(&grad, which);
                    let top = want.iter().fold(0f64, |m, x| m.max(x.abs()));
                    for (i, (&got, &want)) in got.iter().zip(want).enumerate() {
                        // f32 sums may round P, dS or the gradient to a neighbouring bf16 value.
                        assert!(
                            (got as f64 - want).abs() <= want.abs() / 64.0 + top * 2e-3,
                            "[{b}, {h}, {n}, {d}] head {head}, gradient {which}, element {i}: {got} vs {want}"
                        );
                    }
                }
            }
            assert!(
                grad.iter().all(|x| x.to_bits() & 0xFFFF == 0),
                "gradients are bf16 values"
            );
            assert!(
                grad.iter().zip(&exact).any(|(a, b)| (a - b).abs() > 1e-3),
                "same as f32"
            );
        }
    }

    #[test]
    fn a_nan_query_makes_its_own_output_row_nan_and_no_other() {
        let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([1, 2, 70, 4], s));
        // Row 66 lies in the second block of query rows.
        let q = q.slice_assign(
            [0..1, 1..2, 66..67, 2..3],
            Tensor::full([1, 1, 1, 1], f32::NAN, &Default::default()),
        );
        let out = fused(q, k, v).into_data().to_vec::<f32>().unwrap();
        for (i, row) in out.chunks(4).enumerate() {
            let nan = i == 70 + 66;
            assert!(row.iter().all(|x| x.is_nan() == nan), "row {i}: {row:?}");
        }
    }

    #[test]
    fn without_gradients_it_matches_the_unfused_graph() {
        // 130 query rows: three blocks, the last one short.
        let [q, k, v] = [1, 2, 3].map(|s| test_values::<Cpu, 4>([2, 2, 130, 4], s));
        let a = fused(q.clone(), k.clone(), v.clone());
        let b = unfused(q, k, v);
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
    }
}
