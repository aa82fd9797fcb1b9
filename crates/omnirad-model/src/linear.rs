//! `x·W + b` with CPU f32 kernels (W in burn's `Linear` layout, [d_in, d_out]).
//!
//! ```text
//! forward:   Y = X·W + 1·bᵀ
//! backward:  dX = dY·Wᵀ,  dW = Xᵀ·dY,  db = Σ_rows dY
//! ```
//! burn-flex 0.21 allocates every matmul output zero-filled and then copies it once more
//! (`FlexTensor::empty` re-aligns a `Vec<u8>` through `Bytes::from_bytes_vec`), then adds the
//! bias in a third pass over the output: 7 % of a ViT-S/16 fine-tuning step on two cores
//! (BENCHMARKS.md). Here the output starts as the bias rows and one `gemm` call accumulates X·W
//! into it; the backward pass writes dX and dW into fresh buffers that burn takes without a copy.
//! As burn's matmul, the op keeps X only when W trains and W only when X needs a gradient.
//!
//! The kernels run for f32 tensors of the CPU backend, with and without autodiff (recognised by
//! type, as in [`crate::attention`]); any other backend or dtype gets burn's `matmul` + add.
//! [`linear_bf16`] is the same op with its three products in bf16 (`cpu_gemm::Operand`):
//! burn-flex has no native bf16 arithmetic (a bf16 tensor there is converted to f32 and back
//! around every op), so on the CPU mixed precision keeps f32 tensors and narrows inside the GEMM.
//! Without gradient checkpointing the bf16 op keeps X for dW as it rounded it, as autocast
//! saves its bf16 casts: the f32 activation can be freed (bf16 fine-tuning's peak memory −16 %).

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

use std::sync::Arc;

use gemmkit::bf16;

use crate::{cast_same, is_same, Cpu, Precision};

/// `x` `[M, d_in]` · `w` `[d_in, d_out]` + `b` `[d_out]` → `[M, d_out]`.
pub fn linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 1>) -> Tensor<B, 2> {
    if !f32_on_cpu::<B>([x.dtype(), w.dtype(), b.dtype()]) {
        return x.matmul(w) + b.unsqueeze();
    }
    op(x, w, b, Precision::F32)
}

/// [`linear`] with its products in bf16 and f32 accumulation, on f32 tensors (the result too,
/// its values rounded to bf16 before the bias is added). Backends other than the CPU's run
/// burn's matmul on bf16 casts.
pub fn linear_bf16<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 1>) -> Tensor<B, 2> {
    if !f32_on_cpu::<B>([x.dtype(), w.dtype(), b.dtype()]) {
        let bf = FloatDType::BF16;
        let y = x.cast(bf).matmul(w.cast(bf)) + b.cast(bf).unsqueeze();
        return y.cast(FloatDType::F32);
    }
    op(x, w, b, Precision::Bf16)
}

/// Whether `B` is the CPU backend (with or without autodiff), where these kernels run.
pub fn cpu_kernels<B: Backend>() -> bool {
    is_same::<B::FloatTensorPrimitive, FlexTensor>()
        || is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>()
}

fn f32_on_cpu<B: Backend>(dtypes: [DType; 3]) -> bool {
    cpu_kernels::<B>() && dtypes.iter().all(|&d| d == DType::F32)
}

fn op<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 1>, g: Precision) -> Tensor<B, 2> {
    let [x, w, b] = [
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        b.into_primitive().tensor(),
    ];
    let out = if is_same::<B::FloatTensorPrimitive, FlexTensor>() {
        let keep = cpu::Keep::PackedW;
        cast_same(cpu::forward(cast_same(x), cast_same(w), cast_same(b), g, keep).0)
    } else {
        // Without checkpointing X is kept for dW: as bf16 when the products are. Under a
        // checkpointing strategy X stays a graph node, so that it can be recomputed instead.
        let keep_rounded = g == Precision::Bf16 && is_same::<B, Autodiff<Cpu>>();
        cast_same(autodiff_forward(
            cast_same(x),
            cast_same(w),
            cast_same(b),
            g,
            keep_rounded,
        ))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(
    x: AdTensor,
    w: AdTensor,
    b: AdTensor,
    g: Precision,
    keep_rounded: bool,
) -> AdTensor {
    let (out, rounded) = cpu::forward(
        x.primitive.clone(),
        w.primitive.clone(),
        b.primitive.clone(),
        g,
        if keep_rounded {
            cpu::Keep::RoundedX
        } else {
            cpu::Keep::Nothing
        },
    );
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    // Compute-bound: no checkpointing strategy recomputes it, so any prepares it alike.
    match LinearBackward(g)
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x_state = w_tracked.then(|| match rounded {
                Some((x, k)) if keep_rounded => SavedX::Bf16(Arc::new(x), k),
                _ => SavedX::Node(prep.checkpoint(&x)),
            });
            let w_state = x_tracked.then(|| prep.checkpoint(&w));
            prep.finish((x_state, w_state), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Where the backward pass reads X from.
#[derive(Debug, Clone)]
enum SavedX {
    /// The f32 tensor's graph node.
    Node(NodeId),
    /// X as the forward pass rounded it, [M, k]: half the f32 tensor's memory, which the graph
    /// can then free (autocast also saves its bf16 casts), and no second rounding for dW.
    Bf16(Arc<Vec<bf16>>, usize),
}

#[derive(Debug)]
struct LinearBackward(Precision);

impl Backward<Cpu, 3> for LinearBackward {
    type State = (Option<SavedX>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (x_state, w_state) = ops.state;
        let x = x_state.map(|x| match x {
            SavedX::Node(id) => cpu::Input::F32(ckpt.retrieve_node_output::<FlexTensor>(id)),
            SavedX::Bf16(x, k) => cpu::Input::Bf16(x, k),
        });
        let w = w_state.map(|id| ckpt.retrieve_node_output::<FlexTensor>(id));
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [px, pw, pb] = ops.parents;
        if let Some(node) = pb {
            grads.register::<Cpu>(node.id, cpu::bias_grad(&d_out));
        }
        let x = x.filter(|_| pw.is_some());
        let w = w.filter(|_| px.is_some());
        let (dw, dx) = cpu::grads(x, w, &d_out, self.0);
        if let (Some(node), Some(dw)) = (pw, dw) {
            grads.register::<Cpu>(node.id, dw);
        }
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Cpu>(node.id, dx);
        }
    }
}

pub(crate) use cpu::{bias_grad, pack, packed_weight, sum_partials, BIAS_ROWS};

/// The formulas of the module doc on f32 slices; gemm splits each product over rayon's threads.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{TensorData, TensorMetadata};
    use rayon::prelude::*;

    use std::borrow::Cow;
    use std::sync::{Arc, Mutex};

    use crate::cpu_gemm::{amx, contiguous, f32s, matrix, Mat, Operand};
    use crate::Precision;
    use gemmkit::bf16;

    /// What a bf16 forward pass keeps for later.
    #[derive(Clone, Copy, PartialEq)]
    pub(super) enum Keep {
        /// X as rounded, for dW.
        RoundedX,
        Nothing,
        /// W rounded and packed, for the next call with the same W (inference: in training W
        /// changes every step, and a kept reference would make AdamW copy it).
        PackedW,
    }

    /// Y = X·W + b in the arithmetic `g`, and for bf16 X as rounded ([M, k]) when asked to.
    pub(super) fn forward(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        g: Precision,
        keep: Keep,
    ) -> (FlexTensor, Option<(Vec<bf16>, usize)>) {
        match g {
            Precision::F32 => (forward_as::<f32>(x, w, b).0, None),
            Precision::Bf16 if keep != Keep::RoundedX && amx::available() => {
                (forward_amx(x, w, b, keep == Keep::PackedW), None)
            }
            Precision::Bf16 => forward_as::<bf16>(x, w, b),
        }
    }

    /// The bf16 Y in bf16 blocks (AMX or AVX-512 BF16) with X rounded as its panels are
    /// packed (no rounded copy of X is written and read back: 4 % of a one-thread bf16
    /// inference step), and W packed once when `keep_w` ([`packed_weight`]).
    fn forward_amx(x: FlexTensor, w: FlexTensor, b: FlexTensor, keep_w: bool) -> FlexTensor {
        let [m, k] = x.shape().dims::<2>();
        let [k2, n] = w.shape().dims::<2>();
        assert!(k == k2 && b.shape().num_elements() == n, "linear: shapes");
        if m * k * n == 0 {
            return forward_as::<bf16>(x, w, b).0;
        }
        let (x, b) = (contiguous(x), contiguous(b));
        let w = if keep_w { packed_weight(&w) } else { pack(&w) };
        let y = amx::product_packed(Mat::new(f32s(&x), m, k), &w, f32s(&b));
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }

    /// Whether [`packed_weight`] holds W's buffer.
    #[cfg(test)]
    pub(super) fn is_kept(w: &FlexTensor) -> bool {
        let ptr = f32s(w).as_ptr();
        let cache = PACKED.lock().unwrap_or_else(|e| e.into_inner());
        cache.iter().any(|(t, _)| f32s(t).as_ptr() == ptr)
    }

    /// W [k, n] rounded to bf16 and packed for the tiles.
    pub(crate) fn pack(w: &FlexTensor) -> Arc<amx::Packed> {
        let (w, k, n) = matrix(w);
        let w = bf16::from_f32s(f32s(&w));
        Arc::new(amx::Packed::new(Mat::new(&w, k, n), true))
    }

    /// Weights packed for the tile products, with the tensor whose buffer each was packed from.
    static PACKED: Mutex<Vec<(FlexTensor, Arc<amx::Packed>)>> = Mutex::new(Vec::new());

    /// W [k, n] rounded and packed for bf16 blocks, once while its buffer lives: at batch 8 each
    /// weight meets only ~1600 rows, and rounding and packing it again at every call took 12 %
    /// of a one-thread bf16 inference step. Safe because the cache holds a reference to the
    /// buffer: no other tensor gets its address while cached, and burn-flex's in-place ops (and
    /// AdamW's, `storage_mut`) copy a buffer with another reference before writing it. An
    /// entry whose buffer only the cache still holds is dropped at the next miss.
    pub(crate) fn packed_weight(w: &FlexTensor) -> Arc<amx::Packed> {
        let Some(values) = w.as_slice::<f32>() else {
            return pack(w);
        };
        let same = |t: &FlexTensor| {
            let v = t.as_slice::<f32>().expect("cached contiguous");
            v.as_ptr() == values.as_ptr() && v.len() == values.len() && t.shape() == w.shape()
        };
        let mut cache = PACKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = cache.iter().find(|(t, _)| same(t)) {
            return p.clone();
        }
        cache.retain(|(t, _)| !t.is_unique());
        let p = pack(w);
        // A bound for models whose weights all stay alive (thousands of linears).
        if cache.len() < 4096 {
            cache.push((w.clone(), p.clone()));
        }
        p
    }

    /// Y, and X converted to `T` when that made a copy.
    fn forward_as<T: Operand>(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
    ) -> (FlexTensor, Option<(Vec<T>, usize)>) {
        let (x, m, k) = matrix(&x);
        let (w, k2, n) = matrix(&w);
        let b = contiguous(b);
        assert!(k == k2 && b.shape().num_elements() == n, "linear: shapes");
        let (x, w) = (T::from_f32s(f32s(&x)), T::from_f32s(f32s(&w)));
        let y = T::product(Mat::new(&x, m, k), Mat::new(&w, k, n), Some(f32s(&b)));
        let rounded = match x {
            Cow::Owned(x) => Some((x, k)),
            Cow::Borrowed(_) => None,
        };
        (FlexTensor::from_data(TensorData::new(y, [m, n])), rounded)
    }

    /// X for dW: the f32 tensor, or its bf16 rounding [M, k] kept by a bf16 forward pass.
    pub(super) enum Input {
        F32(FlexTensor),
        Bf16(Arc<Vec<bf16>>, usize),
    }

    /// dW = Xᵀ·dY when `x` is given and dX = dY·Wᵀ when `w` is, in the arithmetic `g`.
    pub(super) fn grads(
        x: Option<Input>,
        w: Option<FlexTensor>,
        d_out: &FlexTensor,
        g: Precision,
    ) -> (Option<FlexTensor>, Option<FlexTensor>) {
        let x_f32 = match &x {
            Some(Input::F32(x)) => Some(matrix(x)),
            _ => None,
        };
        let x_f32 = x_f32.as_ref().map(|(x, _, k)| (f32s(x), *k));
        match (g, &x) {
            (Precision::F32, Some(Input::Bf16(..))) => {
                unreachable!("only a bf16 forward pass keeps a bf16 X")
            }
            (Precision::F32, _) => grads_as(x_f32.map(|(x, k)| (Cow::Borrowed(x), k)), w, d_out),
            (Precision::Bf16, Some(Input::Bf16(x, k))) => {
                grads_as(Some((Cow::Borrowed(x.as_slice()), *k)), w, d_out)
            }
            (Precision::Bf16, _) => grads_as(x_f32.map(|(x, k)| (bf16::from_f32s(x), k)), w, d_out),
        }
    }

    /// [`grads`] with X in `T` ([M, k]) and dY converted to `T` once for both products.
    fn grads_as<T: Operand>(
        x: Option<(Cow<[T]>, usize)>,
        w: Option<FlexTensor>,
        d_out: &FlexTensor,
    ) -> (Option<FlexTensor>, Option<FlexTensor>) {
        let (dy, m, n) = matrix(d_out);
        let dy = T::from_f32s(f32s(&dy));
        let dy = Mat::new(&dy, m, n);
        let dw = x.map(|(x, k)| {
            let dw = T::product(Mat::new(&x, m, k).t(), dy, None);
            FlexTensor::from_data(TensorData::new(dw, [k, n]))
        });
        let dx = w.map(|w| {
            let (w, k, _) = matrix(&w);
            let w = T::from_f32s(f32s(&w));
            let dx = T::product(dy, Mat::new(&w, k, n).t(), None);
            FlexTensor::from_data(TensorData::new(dx, [m, k]))
        });
        (dw, dx)
    }

    /// db = Σ_rows dY: partial sums over fixed blocks of rows, added in block order, so the
    /// result does not depend on how rayon schedules the blocks (resumed runs stay bit-identical).
    pub(crate) fn bias_grad(d_out: &FlexTensor) -> FlexTensor {
        let (g, _, n) = matrix(d_out);
        if n == 0 {
            return sum_partials(&[], 0);
        }
        let partials: Vec<Vec<f32>> = f32s(&g)
            .par_chunks(BIAS_ROWS * n)
            .map(|rows| {
                let mut acc = vec![0f32; n];
                for row in rows.chunks_exact(n) {
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
                acc
            })
            .collect();
        sum_partials(&partials, n)
    }

    /// Rows per partial sum of [`bias_grad`].
    pub(crate) const BIAS_ROWS: usize = 64;

    /// The n column sums [n] from partial sums in their order.
    pub(crate) fn sum_partials(partials: &[Vec<f32>], n: usize) -> FlexTensor {
        let mut db = vec![0f32; n];
        for p in partials {
            db.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
        }
        FlexTensor::from_data(TensorData::new(db, [n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;
    use burn::tensor::Tolerance;

    type Ad = Autodiff<Cpu>;

    fn burn_linear<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 1>) -> Tensor<B, 2> {
        x.matmul(w) + b.unsqueeze()
    }

    /// Output and all three gradients against burn's matmul + add, on a shape with a row count
    /// that is no multiple of anything (and a weight read through a transposed view).
    #[test]
    fn matches_burn_matmul_and_its_gradients() {
        let (m, k, n) = (197, 48, 72);
        let run = |f: fn(Tensor<Ad, 2>, Tensor<Ad, 2>, Tensor<Ad, 1>) -> Tensor<Ad, 2>| {
            let x = test_values::<Ad, 2>([m, k], 1).require_grad();
            let wt = test_values::<Ad, 2>([n, k], 2).require_grad();
            let b = test_values::<Ad, 1>([n], 3).require_grad();
            let y = f(x.clone(), wt.clone().transpose(), b.clone());
            // A weighted sum, so every output element gets its own gradient.
            let weights = test_values::<Ad, 2>([m, n], 4);
            let g = (y.clone() * weights).sum().backward();
            let grad = |t: &Tensor<Ad, 2>| t.grad(&g).unwrap().into_data();
            (
                y.into_data(),
                grad(&x),
                grad(&wt),
                b.grad(&g).unwrap().into_data(),
            )
        };
        let ours = run(linear);
        let reference = run(burn_linear);
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
        ours.0.assert_approx_eq::<f32>(&reference.0, tol);
        ours.1.assert_approx_eq::<f32>(&reference.1, tol);
        ours.2.assert_approx_eq::<f32>(&reference.2, tol);
        ours.3.assert_approx_eq::<f32>(&reference.3, tol);
    }

    /// The bf16 op against its definition computed in f64: operands rounded to bf16, exact
    /// products and sums, the result rounded to bf16 (then the bias added in f32). The op sums
    /// in f32, so a result next to a rounding boundary may land one bf16 step away: the bound is
    /// one step (at most 2⁻⁷ of the result's magnitude). Forward, dX and dW; and unlike f32.
    #[test]
    fn bf16_products_round_their_operands_and_their_result_to_bf16() {
        use half::bf16;
        let (m, k, n) = (67, 300, 40);
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        // C = round(Σ_l round(A[i,l])·round(B[l,j])) for A [rows, depth], B [depth, cols].
        let reference = |a: &[f32], b: &[f32], rows: usize, depth: usize, cols: usize| {
            let mut c = vec![0f64; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    let s: f64 = (0..depth)
                        .map(|l| r(a[i * depth + l]) * r(b[l * cols + j]))
                        .sum();
                    c[i * cols + j] = r(s as f32);
                }
            }
            c
        };
        let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|i| v[(i % rows) * cols + i / rows])
                .collect()
        };
        let vals = |t: Tensor<Ad, 2>| t.into_data().to_vec::<f32>().unwrap();
        let x = test_values::<Ad, 2>([m, k], 11).require_grad();
        let w = test_values::<Ad, 2>([k, n], 12).require_grad();
        let b = test_values::<Ad, 1>([n], 13).require_grad();
        let dy = test_values::<Ad, 2>([m, n], 14);
        let y = linear_bf16(x.clone(), w.clone(), b.clone());
        let g = (y.clone() * dy.clone()).sum().backward();
        let (xv, wv, bv, dyv) = (
            vals(x.clone()),
            vals(w.clone()),
            b.clone().into_data().to_vec::<f32>().unwrap(),
            vals(dy),
        );
        let check = |name: &str, ours: Vec<f32>, want: Vec<f64>, bias: &dyn Fn(usize) -> f64| {
            for (i, (o, w)) in ours.iter().zip(&want).enumerate() {
                let err = (*o as f64 - (w + bias(i))).abs();
                assert!(
                    err <= w.abs() / 128.0 + 1e-6,
                    "{name}[{i}]: {o} vs {}",
                    w + bias(i)
                );
            }
        };
        check("y", vals(y.clone()), reference(&xv, &wv, m, k, n), &|i| {
            bv[i % n] as f64
        });
        let dx = x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
        check(
            "dx",
            dx,
            reference(&dyv, &transpose(&wv, k, n), m, n, k),
            &|_| 0.0,
        );
        let dw = w.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
        check(
            "dw",
            dw,
            reference(&transpose(&xv, m, k), &dyv, k, m, n),
            &|_| 0.0,
        );
        // The bias gradient is a sum of f32 rows, as in the f32 op.
        let db = b.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
        for (j, d) in db.iter().enumerate() {
            let want: f32 = (0..m).map(|i| dyv[i * n + j]).sum();
            assert!((d - want).abs() <= 1e-4 * want.abs().max(1.0), "db[{j}]");
        }
        // And it is not the f32 op: bf16 rounding moves the result.
        let full = vals(linear(x, w, b));
        let moved = full.iter().zip(&vals(y)).filter(|(a, b)| a != b).count();
        assert!(
            moved > m * n / 2,
            "only {moved} of {} outputs differ from f32",
            m * n
        );
        // An empty inner dimension: every row is the bias.
        let bias = test_values::<Cpu, 1>([4], 15);
        let y = linear_bf16(
            test_values::<Cpu, 2>([3, 0], 16),
            test_values([0, 4], 17),
            bias.clone(),
        );
        let rows: Vec<f32> = bias.into_data().to_vec::<f32>().unwrap().repeat(3);
        assert_eq!(y.into_data().to_vec::<f32>().unwrap(), rows);
    }

    #[test]
    fn without_autodiff_and_with_a_frozen_weight_it_matches_too() {
        let dev = burn::backend::flex::FlexDevice;
        let x = test_values::<Cpu, 2>([5, 7], 5);
        let w = test_values::<Cpu, 2>([7, 3], 6);
        let b = test_values::<Cpu, 1>([3], 7);
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
        linear(x.clone(), w.clone(), b.clone())
            .into_data()
            .assert_approx_eq::<f32>(
                &burn_linear(x.clone(), w.clone(), b.clone()).into_data(),
                tol,
            );
        // Only X trains (LoRA and probes freeze the encoder's weights, the reverse of this).
        let xa = Tensor::<Ad, 2>::from_data(x.into_data(), &dev).require_grad();
        let wa = Tensor::<Ad, 2>::from_data(w.into_data(), &dev);
        let ba = Tensor::<Ad, 1>::from_data(b.into_data(), &dev);
        let g = linear(xa.clone(), wa.clone(), ba.clone()).sum().backward();
        let ours = xa.grad(&g).unwrap().into_data();
        assert!(wa.grad(&g).is_none());
        let g = burn_linear(xa.clone(), wa, ba).sum().backward();
        ours.assert_approx_eq::<f32>(&xa.grad(&g).unwrap().into_data(), tol);
    }

    /// Without checkpointing the bf16 op keeps X as it rounded it, with a checkpointing strategy
    /// it keeps X's node (to recompute it): the same gradients, bit for bit, including X made by
    /// an op before it (here a GELU, which the checkpointing strategy recomputes).
    #[test]
    fn bf16_gradients_are_the_same_with_x_kept_rounded_or_recomputed() {
        fn grads<B: burn::tensor::backend::AutodiffBackend>() -> [Vec<f32>; 3] {
            let x = test_values::<B, 2>([37, 24], 31).require_grad();
            let w = test_values::<B, 2>([24, 19], 32).require_grad();
            let b = test_values::<B, 1>([19], 33).require_grad();
            let y = linear_bf16(crate::gelu(x.clone()), w.clone(), b.clone());
            let g = (y * test_values::<B, 2>([37, 19], 34)).sum().backward();
            let v = |t: Tensor<B::InnerBackend, 2>| t.into_data().to_vec::<f32>().unwrap();
            [
                v(x.grad(&g).unwrap()),
                v(w.grad(&g).unwrap()),
                v(b.grad(&g).unwrap().unsqueeze()),
            ]
        }
        let kept = grads::<Ad>();
        let recomputed = grads::<Autodiff<Cpu, crate::BalancedCheckpointing>>();
        assert_eq!(kept, recomputed);
    }

    /// Without autodiff, in bf16 blocks, X is rounded as its panels are packed rather than first:
    /// the same outputs, bit for bit, on a shape with partial blocks on every side.
    #[test]
    fn bf16_outputs_are_the_same_with_x_rounded_inside_the_panels() {
        if !crate::amx_here("the rounding inside the panels") {
            return;
        }
        let (m, k, n) = (67, 300, 40);
        let x = test_values::<Cpu, 2>([m, k], 41);
        let w = test_values::<Cpu, 2>([k, n], 42);
        let b = test_values::<Cpu, 1>([n], 43);
        let inside = linear_bf16(x.clone(), w.clone(), b.clone());
        assert_eq!(values(inside), rounded_first(&x, &w, &b));
    }

    fn values(t: Tensor<Cpu, 2>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// The bf16 op's outputs when tracked: it rounds X into a copy first (kept for dW) and
    /// packs W afresh.
    fn rounded_first(x: &Tensor<Cpu, 2>, w: &Tensor<Cpu, 2>, b: &Tensor<Cpu, 1>) -> Vec<f32> {
        let x = Tensor::<Ad, 2>::from_inner(x.clone()).require_grad();
        let w = Tensor::<Ad, 2>::from_inner(w.clone());
        values(linear_bf16(x, w, Tensor::from_inner(b.clone())).inner())
    }

    /// The packed weights kept between calls (`packed_weight`) follow W: a weight updated in
    /// place as an optimizer would, a new weight at a freed weight's address, and a view of a
    /// larger buffer each give the outputs of the tracked op, which packs W afresh.
    #[test]
    fn bf16_outputs_follow_weights_that_change() {
        if !crate::amx_here("the packed weights kept between calls") {
            return;
        }
        let (m, k, n) = (40, 70, 33);
        let x = test_values::<Cpu, 2>([m, k], 51);
        let b = test_values::<Cpu, 1>([n], 52);
        let (v, fresh) = (values, |w: &Tensor<Cpu, 2>| rounded_first(&x, w, &b));
        let mut w = test_values::<Cpu, 2>([k, n], 53);
        for step in 0..3 {
            let kept = v(linear_bf16(x.clone(), w.clone(), b.clone()));
            assert_eq!(kept, fresh(&w), "step {step}");
            // In place where burn-flex may (the buffer otherwise unshared), as AdamW's update.
            w = w.mul_scalar(1.5).add_scalar(0.25);
        }
        // Freed, and new values likely at the same address.
        let shape_values = w.clone().into_data();
        drop(w);
        let w = Tensor::<Cpu, 2>::from_data(shape_values, &Default::default()).neg();
        assert_eq!(v(linear_bf16(x.clone(), w.clone(), b.clone())), fresh(&w));
        // Columns 0..n of a wider buffer, and its first k·n values read as a [k, n] matrix.
        let wide = test_values::<Cpu, 2>([k, 2 * n], 54);
        for w in [
            wide.clone().narrow(1, 0, n),
            wide.clone()
                .reshape([2 * k * n])
                .narrow(0, 0, k * n)
                .reshape([k, n]),
        ] {
            assert_eq!(v(linear_bf16(x.clone(), w.clone(), b.clone())), fresh(&w));
        }
    }

    /// Only inference keeps packed weights: in training W changes at every step, and a kept
    /// reference would make AdamW copy it (the checkpointed op also rounds X in the panels).
    #[test]
    fn training_keeps_no_packed_weights() {
        if !crate::amx_here("the packed weights kept between calls") {
            return;
        }
        type Checkpointed = Autodiff<Cpu, crate::BalancedCheckpointing>;
        let w = test_values::<Cpu, 2>([24, 40], 61);
        let x = test_values::<Checkpointed, 2>([30, 24], 62).require_grad();
        let wa = Tensor::<Checkpointed, 2>::from_inner(w.clone()).require_grad();
        let b = test_values::<Checkpointed, 1>([40], 63);
        let y = linear_bf16(x.clone(), wa.clone(), b.clone());
        let g = y.sum().backward();
        assert!(wa.grad(&g).is_some());
        let prim = |t: &Tensor<Cpu, 2>| t.clone().into_primitive().tensor();
        assert!(!cpu::is_kept(&prim(&w)), "kept while training");
        linear_bf16(test_values::<Cpu, 2>([30, 24], 62), w.clone(), b.inner());
        assert!(cpu::is_kept(&prim(&w)), "not kept for inference");
    }

    #[test]
    fn a_nan_input_row_makes_its_own_output_row_nan_and_no_other() {
        let mut v = test_values::<Cpu, 2>([4, 8], 8)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        v[8 + 3] = f32::NAN;
        let dev = Default::default();
        let x = Tensor::<Cpu, 2>::from_data(burn::tensor::TensorData::new(v, [4, 8]), &dev);
        for op in [linear::<Cpu>, linear_bf16::<Cpu>] {
            let y = op(x.clone(), test_values([8, 5], 9), test_values([5], 10));
            let y = y.into_data().to_vec::<f32>().unwrap();
            for (i, row) in y.chunks(5).enumerate() {
                assert_eq!(row.iter().all(|v| v.is_nan()), i == 1, "row {i}: {row:?}");
                assert!(i == 1 || row.iter().all(|v| v.is_finite()));
            }
        }
    }
}
