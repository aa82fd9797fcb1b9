//! The ViT block's MLP with bf16 products, fc2(gelu(fc1(x))), as one op on bf16 blocks
//! (`cpu_gemm::amx`: AMX tiles or AVX-512 BF16): an autodiff op for training, and the same
//! forward pass for inference.
//!
//! ```text
//! forward:   H = X·W1 + b1,   G = gelu(H),   Y = G·W2 + b2
//! backward:  dG = dY·W2ᵀ,   dH = dG ⊙ gelu'(H),
//!            dW2 = Gᵀ·dY,  db2 = Σ_rows dY,  dW1 = Xᵀ·dH,  db1 = Σ_rows dH,  dX = dH·W1ᵀ
//! ```
//! with [`linear_bf16`]'s arithmetic: each product's operands rounded to bf16, sums in f32 and
//! rounded to bf16 (the bias added after). As three ops the hidden activation ([tokens, 4·dim],
//! the block's widest tensor) went through memory between them: GELU read H and wrote G, fc2
//! rounded G into its bf16 copy; backward wrote dG, GELU's gradient read it with H and wrote dH,
//! fc1 rounded dH. Here GELU runs on each block of 32 rows of H as the tiles finish it and writes
//! G rounded (fc2's operand, kept for dW2), and gelu' runs on each block of dG as its tiles finish
//! it, writing dH rounded (the operand of dW1 and dX) and adding up db1 on the way: the values of
//! the three ops, bit for bit (tests). Inference keeps no H, rounds X inside the tiles' panels and
//! keeps the weights packed, as [`linear_bf16`] does there.
//!
//! For `Autodiff<Cpu>` without a checkpointing strategy (which recomputes GELU's output instead
//! of keeping it) and for the CPU backend without autodiff, on a CPU with AMX or AVX-512 BF16;
//! everything else runs the three ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use crate::linear::linear_bf16;
use crate::{cast_same, is_same, Cpu};

/// `linear_bf16(gelu(linear_bf16(x, w1, b1)), w2, b2)`: `x` [M, d], `w1` [d, hidden], `w2`
/// [hidden, d_out] → [M, d_out].
pub fn mlp_bf16<B: Backend>(
    x: Tensor<B, 2>,
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    w2: Tensor<B, 2>,
    b2: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [m, d] = x.dims();
    let ([_, hidden], [_, d_out]) = (w1.dims(), w2.dims());
    let amx = [x.dtype(), w1.dtype(), b1.dtype(), w2.dtype(), b2.dtype()] == [DType::F32; 5]
        && m * d * hidden * d_out > 0
        && crate::cpu_gemm::amx::available();
    let (tracked, inference) = (
        is_same::<B, Autodiff<Cpu>>(),
        is_same::<B::FloatTensorPrimitive, FlexTensor>(),
    );
    if !(amx && (tracked || inference)) {
        return linear_bf16(crate::gelu(linear_bf16(x, w1, b1)), w2, b2);
    }
    let [x, w1, w2] = [x, w1, w2].map(|t| t.into_primitive().tensor());
    let [b1, b2] = [b1, b2].map(|t| t.into_primitive().tensor());
    let y = if tracked {
        let t = [x, w1, b1, w2, b2].map(cast_same::<_, AdTensor>);
        cast_same(autodiff_forward(t))
    } else {
        let [x, w1, b1, w2, b2] = [x, w1, b1, w2, b2].map(cast_same::<_, FlexTensor>);
        cast_same(cpu::infer(x, w1, b1, w2, b2))
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

/// `[x, w1, b1, w2, b2]` → Y, with the graph step.
fn autodiff_forward(t: [AdTensor; 5]) -> AdTensor {
    let [x, w1, b1, w2, b2] = t.each_ref().map(|t| t.primitive.clone());
    let (y, saved) = cpu::forward(x, w1, b1, w2, b2);
    // Only `Autodiff<Cpu>` comes here, whose graph has no checkpointing strategy.
    match MlpBackward
        .prepare::<NoCheckpointing>(t.each_ref().map(|t| t.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

#[derive(Debug)]
struct MlpBackward;

impl Backward<Cpu, 5> for MlpBackward {
    type State = cpu::Saved;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<Cpu>(&ops.node);
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let out = cpu::backward(&ops.state, &d_out, wanted);
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<Cpu>(node.id, grad);
            }
        }
    }
}

/// The formulas of the module doc on f32 slices, products in bf16 blocks.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{TensorData, TensorMetadata};
    use rayon::prelude::*;

    use std::mem::MaybeUninit;
    use std::sync::Arc;

    use crate::cpu_gemm::amx::kernels::{round_add, scale_or_round};
    use crate::cpu_gemm::amx::{self, blocks, Bf16Source, Packed, Panel, BLOCK};
    use crate::cpu_gemm::kernels::narrow;
    use crate::cpu_gemm::{contiguous, f32s, matrix, written, Mat, Operand};
    use crate::linear::{bias_grad, pack, packed_weight, sum_partials, BIAS_ROWS};
    use gemmkit::bf16;

    /// Rows per task of the backward pass: those of one partial sum of [`bias_grad`], so that
    /// db1 adds up in its order (the same bits as the three ops).
    const TASK: usize = BIAS_ROWS;

    /// What the backward pass reads: X and G as rounded, H, and the two weights.
    #[derive(Debug, Clone)]
    pub(super) struct Saved {
        x: Arc<Vec<bf16>>,
        h: Arc<Vec<f32>>,
        g: Arc<Vec<bf16>>,
        w1: FlexTensor,
        w2: FlexTensor,
    }

    pub(super) fn forward(
        x: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> (FlexTensor, Saved) {
        let (x, m, d) = matrix(&x);
        let (w1, w2) = (matrix(&w1).0, matrix(&w2).0);
        let xb = bf16::from_f32s(f32s(&x)).into_owned();
        let (g, h) = hidden(Mat::new(&xb, m, d), &pack(&w1), &b1, true);
        let y = output(&g, m, &pack(&w2), &b2);
        let saved = Saved {
            x: Arc::new(xb),
            h: Arc::new(h.expect("kept")),
            g: Arc::new(g),
            w1,
            w2,
        };
        (y, saved)
    }

    /// The forward pass without autodiff: X rounded inside the panels, H never stored, the
    /// weights packed once (`packed_weight`).
    pub(super) fn infer(
        x: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> FlexTensor {
        let (x, m, d) = matrix(&x);
        let (g, _) = hidden(Mat::new(f32s(&x), m, d), &packed_weight(&w1), &b1, false);
        output(&g, m, &packed_weight(&w2), &b2)
    }

    /// G = bf16(gelu(X·W1 + b1)) [m, hidden] by panels of 32 rows (in [`amx::row_tasks`], B
    /// met in [`amx::column_chunks`]), GELU on each panel's columns of H as a chunk finishes
    /// them, while they are in cache; and H when `keep_h`.
    fn hidden<T: Bf16Source>(
        x: Mat<T>,
        w1: &Packed,
        b1: &FlexTensor,
        keep_h: bool,
    ) -> (Vec<bf16>, Option<Vec<f32>>) {
        let (m, hidden) = (x.shape().0, w1.cols());
        let b1 = contiguous(b1.clone());
        let b1 = f32s(&b1);
        assert!(x.shape().1 > 0 && b1.len() == hidden, "mlp: shapes");
        // A task's rows of G (and of H, when kept) from row r0 on.
        let task = |r0: usize,
                    g: &mut [MaybeUninit<bf16>],
                    mut h: Option<&mut [MaybeUninit<f32>]>| {
            let panels = Panel::group(x, r0, g.len() / hidden);
            let (mut scratch, mut row) = (Vec::<f32>::new(), Vec::<f32>::new());
            for cols in amx::column_chunks(w1) {
                let width = cols.len();
                for (i, panel) in panels.iter().enumerate() {
                    let rows = i * BLOCK..i * BLOCK + panel.rows;
                    // This panel's H on these columns: in H where it is kept, else in scratch.
                    let (region, stride, at) = match h.as_deref_mut() {
                        Some(h) => (
                            &mut h[rows.start * hidden..rows.end * hidden],
                            hidden,
                            cols.start,
                        ),
                        None => {
                            scratch.reserve(BLOCK * width);
                            (
                                &mut scratch.spare_capacity_mut()[..panel.rows * width],
                                width,
                                0,
                            )
                        }
                    };
                    amx::blocks_in(panel, w1, cols.clone(), |c0, c| {
                        let bias = &b1[c0..(c0 + BLOCK).min(cols.end)];
                        round_add(c, bias, &mut region[at + c0 - cols.start..], stride)
                    });
                    // SAFETY: `blocks_in` wrote these columns of every row.
                    let region = unsafe { &*(region as *const [MaybeUninit<f32>] as *const [f32]) };
                    for (r, h) in rows.zip(region.chunks(stride)) {
                        row.clear();
                        row.extend_from_slice(&h[at..at + width]);
                        crate::gelu::in_place(&mut row);
                        narrow(&row, &mut g[r * hidden + cols.start..][..width]);
                    }
                }
            }
        };
        let mut h = None;
        let write_g = |g: &mut [MaybeUninit<bf16>]| {
            let g = amx::row_tasks(g, hidden, w1).into_par_iter();
            if keep_h {
                let write_h = |h: &mut [MaybeUninit<f32>]| {
                    let h = amx::row_tasks(h, hidden, w1).into_par_iter();
                    g.zip(h).for_each(|((r0, g), (_, h))| task(r0, g, Some(h)))
                };
                // SAFETY: the tasks write all m rows of H.
                h = Some(unsafe { written(m * hidden, write_h) });
            } else {
                g.for_each(|(r0, g)| task(r0, g, None));
            }
        };
        // SAFETY: the tasks write all m rows of G.
        (unsafe { written(m * hidden, write_g) }, h)
    }

    /// Y = G·W2 + b2, G with m rows.
    fn output(g: &[bf16], m: usize, w2: &Packed, b2: &FlexTensor) -> FlexTensor {
        let n = w2.cols();
        let b2 = contiguous(b2.clone());
        assert_eq!(f32s(&b2).len(), n, "mlp: shapes");
        let y = amx::product_packed(Mat::new(g, m, g.len() / m), w2, f32s(&b2));
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }

    /// The gradients of `[x, w1, b1, w2, b2]` that `wanted` asks for.
    pub(super) fn backward(
        s: &Saved,
        d_out: &FlexTensor,
        wanted: [bool; 5],
    ) -> [Option<FlexTensor>; 5] {
        let [want_x, want_w1, want_b1, want_w2, want_b2] = wanted;
        let (dy, m, d_out_cols) = matrix(d_out);
        let ([d, hidden], n) = (s.w1.shape().dims::<2>(), d_out_cols);
        let tensor =
            |v: Vec<f32>, shape: [usize; 2]| FlexTensor::from_data(TensorData::new(v, shape));
        let dyb = bf16::from_f32s(f32s(&dy));
        let dyb = Mat::new(&dyb, m, n);
        let dw2 = want_w2.then(|| {
            let g = Mat::new(&s.g, m, hidden);
            tensor(bf16::product(g.t(), dyb, None), [hidden, n])
        });
        let db2 = want_b2.then(|| bias_grad(d_out));
        if !(want_x || want_w1 || want_b1) {
            return [None, None, None, dw2, db2];
        }
        // dH, rounded, and db1's partial sums: dG's tiles by panels of 32 rows, gelu' on each.
        let w2 = bf16::from_f32s(f32s(&s.w2));
        let w2t = Packed::new(Mat::new(&w2, hidden, n).t(), true);
        let mut dh = Vec::with_capacity(m * hidden);
        let partials: Vec<Vec<f32>> = dh.spare_capacity_mut()[..m * hidden]
            .par_chunks_mut(TASK * hidden)
            .enumerate()
            .map(|(i, out)| {
                let mut sums = vec![0f32; hidden];
                let mut dg = vec![0f32; BLOCK * hidden];
                for (j, out) in out.chunks_mut(BLOCK * hidden).enumerate() {
                    let (r0, rows) = (i * TASK + j * BLOCK, out.len() / hidden);
                    let dg = &mut dg[..rows * hidden];
                    blocks(&Panel::new(dyb, r0, rows), &w2t, |c0, c| {
                        let cols = BLOCK.min(hidden - c0);
                        scale_or_round(c, None, &mut dg[c0..], hidden, cols)
                    });
                    let h = &s.h[r0 * hidden..(r0 + rows) * hidden];
                    let rows = dg.chunks_exact_mut(hidden).zip(h.chunks_exact(hidden));
                    for ((dg, h), out) in rows.zip(out.chunks_exact_mut(hidden)) {
                        crate::gelu::grad_in_place(h, dg);
                        sums.iter_mut().zip(&*dg).for_each(|(s, &v)| *s += v);
                        narrow(dg, out);
                    }
                }
                sums
            })
            .collect();
        // SAFETY: the tasks wrote all m rows.
        unsafe { dh.set_len(m * hidden) };
        let db1 = want_b1.then(|| sum_partials(&partials, hidden));
        let dh = Mat::new(&dh, m, hidden);
        let dw1 = want_w1.then(|| {
            let x = Mat::new(&s.x, m, d);
            tensor(bf16::product(x.t(), dh, None), [d, hidden])
        });
        let dx = want_x.then(|| {
            let w1 = bf16::from_f32s(f32s(&s.w1));
            tensor(
                bf16::product(dh, Mat::new(&w1, d, hidden).t(), None),
                [m, d],
            )
        });
        [dx, dw1, db1, dw2, db2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;

    type Ad = Autodiff<Cpu>;

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// [m, d] → [m, hidden] → [m, d_out]: partial row panels and column blocks, an inner
    /// dimension that is no multiple of 32; and a W1 that `amx` meets in column chunks (four,
    /// the last partial) with enough rows for tasks of several panels on a few threads.
    const SMALL: [usize; 4] = [150, 48, 80, 40];
    const LARGE: [usize; 4] = [1100, 768, 1100, 40];

    type Grads = Vec<Option<Vec<f32>>>;

    /// Y and the gradients of the tracked ones among [x, w1, b1, w2, b2], from the fused op
    /// (`fused`) or the three ops, for a loss Σ Y ⊙ R.
    fn run(shape: [usize; 4], fused: bool, tracked: [bool; 5]) -> (Vec<f32>, Grads) {
        let [m, d, hidden, d_out] = shape;
        let t2 = |shape: [usize; 2], seed, track: bool| {
            let t = Tensor::<Ad, 2>::from_inner(test_values::<Cpu, 2>(shape, seed) * 2.0);
            if track {
                t.require_grad()
            } else {
                t
            }
        };
        let t1 = |len: usize, seed, track: bool| {
            let t = Tensor::<Ad, 1>::from_inner(test_values::<Cpu, 1>([len], seed));
            if track {
                t.require_grad()
            } else {
                t
            }
        };
        let x = t2([m, d], 51, tracked[0]);
        let w1 = t2([d, hidden], 52, tracked[1]);
        let b1 = t1(hidden, 53, tracked[2]);
        let w2 = t2([hidden, d_out], 54, tracked[3]);
        let b2 = t1(d_out, 55, tracked[4]);
        let y = if fused {
            mlp_bf16(x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone())
        } else {
            let h = crate::gelu(linear_bf16(x.clone(), w1.clone(), b1.clone()));
            linear_bf16(h, w2.clone(), b2.clone())
        };
        let r = Tensor::<Ad, 2>::from_inner(test_values::<Cpu, 2>([m, d_out], 56));
        let grads = (y.clone() * r).sum().backward();
        let g2 = |t: &Tensor<Ad, 2>| t.grad(&grads).map(values);
        let g1 = |t: &Tensor<Ad, 1>| t.grad(&grads).map(values);
        let grads = vec![g2(&x), g2(&w1), g1(&b1), g2(&w2), g1(&b2)];
        (values(y.inner()), grads)
    }

    /// Without autodiff (H never stored, X rounded in the panels, the weights packed once) the
    /// output is the three ops' too, on the first call and with the weights packed already.
    #[test]
    fn inference_gives_the_three_ops_values() {
        if !crate::amx_here("the fused MLP's inference") {
            return;
        }
        for [m, d, hidden, d_out] in [SMALL, LARGE] {
            let x = test_values::<Cpu, 2>([m, d], 61) * 2.0;
            let (w1, b1) = (
                test_values::<Cpu, 2>([d, hidden], 62),
                test_values([hidden], 63),
            );
            let (w2, b2) = (
                test_values::<Cpu, 2>([hidden, d_out], 64),
                test_values([d_out], 65),
            );
            let h = crate::gelu(linear_bf16(x.clone(), w1.clone(), b1.clone()));
            let want = values(linear_bf16(h, w2.clone(), b2.clone()));
            for call in ["first", "second"] {
                let y = mlp_bf16(x.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone());
                assert_eq!(values(y), want, "[{m}, {d}, {hidden}]: {call} call");
            }
        }
    }

    /// The fused op's output and gradients are the three ops', bit for bit: with everything
    /// tracked, with frozen weights (LoRA, a frozen block), and with an input that needs no
    /// gradient.
    #[test]
    fn the_fused_op_gives_the_three_ops_values_and_gradients() {
        if !crate::amx_here("the fused MLP op") {
            return;
        }
        for (shape, tracked) in [
            (SMALL, [true; 5]),
            (SMALL, [true, false, false, false, false]),
            (SMALL, [false, true, true, true, true]),
            (LARGE, [true; 5]),
        ] {
            let (y, grads) = run(shape, true, tracked);
            let (want_y, want_grads) = run(shape, false, tracked);
            assert_eq!(y, want_y, "output, {shape:?} tracked {tracked:?}");
            for (i, (got, want)) in grads.iter().zip(&want_grads).enumerate() {
                assert_eq!(got.is_some(), tracked[i], "gradient {i} present");
                assert_eq!(got, want, "gradient {i}, {shape:?} tracked {tracked:?}");
            }
        }
    }
}
