//! LayerNorm over the last dimension as one autodiff op with CPU f32 kernels.
//!
//! ```text
//! forward:   μ = mean(x),  σ = √(mean((x − μ)²) + ε),  x̂ = (x − μ)/σ,  y = γ·x̂ + β
//! backward:  dβ = Σ_rows dy,  dγ = Σ_rows dy·x̂,  g = γ·dy,
//!            dx = (g − mean(g) − x̂·mean(g·x̂))/σ
//! ```
//! burn 0.21's autodiff has no LayerNorm op: it differentiates the decomposition (mean, sub,
//! mul, mean, add, sqrt, div, mul, add), nine tensors per call and about twice as many passes
//! backward, each of which burn-flex runs on one thread. Here each pass is one rayon loop over
//! blocks of rows. As [`crate::gelu()`] the op is memory-bound with a recompute rule: the output the
//! next linear's backward needs is recomputed from x, γ and β (μ and σ are recomputed in the
//! backward pass too), so the graph keeps x alone, as for GELU.
//!
//! Registered on `Autodiff<Cpu>` graphs with f32 tensors and a bias; CPU inference runs the same
//! forward kernel (burn-flex's own LayerNorm sums in another order, so a model scored a little
//! differently in evaluation than when tracked), anything else (CUDA, wgpu) burn's
//! `LayerNorm::forward`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same, Cpu};

/// `ln` applied to `x` over its last dimension; `eps` is the ε `ln` was built with (burn keeps
/// it private).
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    ln: &LayerNorm<B>,
    eps: f64,
) -> Tensor<B, D> {
    let Some(beta) = &ln.beta else {
        return ln.forward(x);
    };
    let (gamma, beta) = (ln.gamma.val(), beta.val());
    let f32s = [x.dtype(), gamma.dtype(), beta.dtype()]
        .iter()
        .all(|&d| d == DType::F32);
    let tracked = is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
    if !f32s || !(tracked || is_same::<B::FloatTensorPrimitive, FlexTensor>()) {
        return ln.forward(x);
    }
    let dims = x.dims();
    let d = dims[D - 1];
    let x = x.reshape([dims.iter().product::<usize>() / d.max(1), d]);
    let [x, gamma, beta] = [
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    ];
    let out = if tracked {
        cast_same(autodiff_forward(
            cast_same(x),
            cast_same(gamma),
            cast_same(beta),
            eps,
        ))
    } else {
        let [x, gamma, beta] = [x, gamma, beta].map(cast_same::<_, FlexTensor>);
        cast_same(cpu::forward(&x, &gamma, &beta, eps as f32))
    };
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(out)).reshape(dims)
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(x: AdTensor, gamma: AdTensor, beta: AdTensor, eps: f64) -> AdTensor {
    let out = cpu::forward(&x.primitive, &gamma.primitive, &beta.primitive, eps as f32);
    let retro = RetroLayerNorm {
        x: x.node.id,
        gamma: gamma.node.id,
        beta: beta.node.id,
        eps: eps as f32,
    };
    let op = LayerNormBackward { eps: eps as f32 };
    match op
        .prepare::<BalancedCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .memory_bound()
        .retro_forward(retro)
        .parents([&x, &gamma, &beta])
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&gamma));
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct RetroLayerNorm {
    x: NodeId,
    gamma: NodeId,
    beta: NodeId,
    eps: f32,
}

impl RetroForward for RetroLayerNorm {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.x);
        let gamma = states.get_state::<FlexTensor>(&self.gamma);
        let beta = states.get_state::<FlexTensor>(&self.beta);
        states.save(out_node, cpu::forward(&x, &gamma, &beta, self.eps))
    }
}

#[derive(Debug)]
struct LayerNormBackward {
    eps: f32,
}

impl Backward<Cpu, 3> for LayerNormBackward {
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let x = ckpt.retrieve_node_output::<FlexTensor>(ops.state.0);
        let gamma = ckpt.retrieve_node_output::<FlexTensor>(ops.state.1);
        let d_out = grads.consume::<Cpu>(&ops.node);
        let (dx, dgamma, dbeta) = cpu::backward(&x, &gamma, &d_out, self.eps);
        let [px, pg, pb] = ops.parents;
        for (parent, grad) in [(px, dx), (pg, dgamma), (pb, dbeta)] {
            if let Some(node) = parent {
                grads.register::<Cpu>(node.id, grad);
            }
        }
    }
}

/// The formulas of the module doc on f32 rows, `ROWS` rows per rayon task.
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, TensorData, TensorMetadata};
    use rayon::prelude::*;

    use std::mem::MaybeUninit;

    use crate::cpu_gemm::{contiguous, f32s, written};

    /// Rows per rayon task.
    const ROWS: usize = 32;

    /// A contiguous copy (or `t` itself) and its [rows, cols] (1-D tensors: one row).
    fn matrix(t: &FlexTensor) -> (FlexTensor, usize, usize) {
        assert_eq!(t.dtype(), DType::F32, "layer_norm: f32 expected");
        let shape = t.shape();
        let d = shape[shape.num_dims() - 1];
        (contiguous(t.clone()), shape.num_elements() / d.max(1), d)
    }

    pub(super) fn forward(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        eps: f32,
    ) -> FlexTensor {
        let (x, m, d) = matrix(x);
        let (gamma, beta) = (contiguous(gamma.clone()), contiguous(beta.clone()));
        let (g, b) = (f32s(&gamma), f32s(&beta));
        assert!(g.len() == d && b.len() == d, "layer_norm: γ, β shapes");
        let write = |y: &mut [MaybeUninit<f32>]| {
            if d == 0 {
                return;
            }
            y.par_chunks_mut(ROWS * d)
                .zip(f32s(&x).par_chunks(ROWS * d))
                .for_each(|(y, x)| kernels::forward_rows(x, g, b, eps, y));
        };
        // SAFETY: the row blocks cover all m·d elements.
        let y = unsafe { written(m * d, write) };
        FlexTensor::from_data(TensorData::new(y, x.shape()))
    }

    /// (dx, dγ, dβ). dγ and dβ are partial sums over fixed blocks of rows added in block order,
    /// so they do not depend on how rayon schedules the blocks.
    pub(super) fn backward(
        x: &FlexTensor,
        gamma: &FlexTensor,
        d_out: &FlexTensor,
        eps: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, m, d) = matrix(x);
        let (dy, _, _) = matrix(d_out);
        let gamma = contiguous(gamma.clone());
        let g = f32s(&gamma);
        let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
        let mut partials = Vec::new();
        let write = |dx: &mut [MaybeUninit<f32>]| {
            if d == 0 {
                return;
            }
            partials = dx
                .par_chunks_mut(ROWS * d)
                .zip(f32s(&x).par_chunks(ROWS * d))
                .zip(f32s(&dy).par_chunks(ROWS * d))
                .map(|((dx, x), dy)| {
                    let mut dgb = vec![0f32; 2 * d];
                    let (dg, db) = dgb.split_at_mut(d);
                    kernels::backward_rows(x, dy, g, eps, dx, dg, db);
                    dgb
                })
                .collect::<Vec<_>>();
        };
        // SAFETY: the row blocks cover all m·d elements.
        let dx = unsafe { written(m * d, write) };
        for p in &partials {
            let (dg, db) = p.split_at(d);
            dgamma.iter_mut().zip(dg).for_each(|(a, &v)| *a += v);
            dbeta.iter_mut().zip(db).for_each(|(a, &v)| *a += v);
        }
        (
            FlexTensor::from_data(TensorData::new(dx, x.shape())),
            FlexTensor::from_data(TensorData::new(dgamma, [d])),
            FlexTensor::from_data(TensorData::new(dbeta, [d])),
        )
    }

    /// The row kernels. Sums over a row run in 16 lanes: a sequential f32 sum does not
    /// vectorise (LLVM may not reassociate it), and its chain of dependent adds made the op
    /// three times as slow as PyTorch's (BENCHMARKS.md, "LayerNorm's row sums in lanes").
    mod kernels {
        use std::mem::MaybeUninit;

        use crate::simd::dispatch;

        const L: usize = 16;

        /// Σ f(x) over a row, in L lanes.
        #[inline(always)]
        fn sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
            let mut acc = [0f32; L];
            let mut chunks = x.chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    acc[i] += f(c[i]);
                }
            }
            for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
                *a += f(v);
            }
            acc.iter().sum()
        }

        /// (μ, 1/σ) of a row, the variance from the deviations (two passes, as burn's).
        #[inline(always)]
        fn stats(x: &[f32], eps: f32) -> (f32, f32) {
            let n = x.len() as f32;
            let mean = sum(x, |v| v) / n;
            let var = sum(x, |v| (v - mean) * (v - mean)) / n;
            (mean, 1.0 / (var + eps).sqrt())
        }

        dispatch! {
            /// Each `d`-long row of `x` (d = γ's length) normalised into `y`.
            forward_rows(x: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [MaybeUninit<f32>]) {
                let d = g.len();
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (mean, rs) = stats(x, eps);
                    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
                        y.write(((x - mean) * rs).mul_add(g, b));
                    }
                }
            }
        }

        dispatch! {
            /// Each row's dx into `dx`; the rows' dγ and dβ added into `dg` and `db`.
            backward_rows(
                x: &[f32],
                dy: &[f32],
                g: &[f32],
                eps: f32,
                dx: &mut [MaybeUninit<f32>],
                dg: &mut [f32],
                db: &mut [f32]
            ) {
                let d = g.len();
                for ((dx, x), dy) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(dy.chunks_exact(d)) {
                    let (mean, rs) = stats(x, eps);
                    // Σ γ·dy and Σ γ·dy·x̂ in lanes; dγ, dβ per element.
                    let (mut sg, mut sgx) = ([0f32; L], [0f32; L]);
                    let mut step = |x: &[f32], dy: &[f32], g: &[f32], dg: &mut [f32], db: &mut [f32]| {
                        for i in 0..x.len() {
                            let xhat = (x[i] - mean) * rs;
                            let gdy = g[i] * dy[i];
                            dg[i] = dy[i].mul_add(xhat, dg[i]);
                            db[i] += dy[i];
                            sg[i] += gdy;
                            sgx[i] = gdy.mul_add(xhat, sgx[i]);
                        }
                    };
                    let full = d / L * L;
                    for c in (0..full).step_by(L) {
                        let r = c..c + L;
                        let [x, dy, g]: [&[f32; L]; 3] =
                            [&x[r.clone()], &dy[r.clone()], &g[r.clone()]].map(|s| s.try_into().unwrap());
                        let dg: &mut [f32; L] = (&mut dg[r.clone()]).try_into().unwrap();
                        let db: &mut [f32; L] = (&mut db[r]).try_into().unwrap();
                        step(x, dy, g, dg, db);
                    }
                    step(&x[full..], &dy[full..], &g[full..], &mut dg[full..], &mut db[full..]);
                    let a = sg.iter().sum::<f32>() / d as f32;
                    let b = sgx.iter().sum::<f32>() / d as f32;
                    for (((dx, &x), &dy), &g) in dx.iter_mut().zip(x).zip(dy).zip(g) {
                        let xhat = (x - mean) * rs;
                        dx.write((g.mul_add(dy, -a) - xhat * b) * rs);
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
        assert_close, test_values, BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };
    use burn::module::Param;
    use burn::nn::LayerNormConfig;

    /// Output and the gradients of x, γ and β against burn's LayerNorm inside a small graph
    /// (a matmul after it, so the recompute rule is exercised), under both checkpointing
    /// strategies; rows of very different scale and offset, a row count that is no multiple of
    /// the block size.
    fn grads_match_burn<C: CheckpointStrategy>() {
        type Ad<C> = Autodiff<Cpu, C>;
        let dev = Default::default();
        // d = 2·16 + 8: the kernels' 16 lanes and a remainder.
        let (rows, d) = (3 * 37, 40);
        let scale = test_values::<Ad<C>, 2>([rows, 1], 4).abs() * 10.0 + 0.01;
        let x =
            test_values::<Ad<C>, 2>([rows, d], 1) * scale + test_values::<Ad<C>, 2>([rows, 1], 5);
        let x = x.reshape([3, 37, d]);
        let w = test_values::<Ad<C>, 2>([d, 30], 2) * 0.1;
        let mut ln = LayerNormConfig::new(d)
            .with_epsilon(1e-6)
            .init::<Ad<C>>(&dev);
        ln.gamma = Param::from_tensor(test_values::<Ad<C>, 1>([d], 3));
        ln.beta = Some(Param::from_tensor(test_values::<Ad<C>, 1>([d], 6)));
        let run = |ours: bool| {
            let x = x.clone().require_grad();
            let y = if ours {
                layer_norm(x.clone(), &ln, 1e-6)
            } else {
                ln.forward(x.clone())
            };
            let z = y.clone().reshape([rows, d]).matmul(w.clone());
            let grads = (z.clone() * z).sum().backward();
            let beta = ln.beta.as_ref().expect("bias");
            [
                y.inner().reshape([rows * d]),
                x.grad(&grads).unwrap().reshape([rows * d]),
                ln.gamma.val().grad(&grads).unwrap(),
                beta.val().grad(&grads).unwrap(),
            ]
        };
        let (got, want) = (run(true), run(false));
        for (name, (a, b)) in ["out", "dx", "dγ", "dβ"]
            .iter()
            .zip(got.into_iter().zip(want))
        {
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

    /// A NaN in one row stays in that row's output and gradient (no silent zero), and only there.
    #[test]
    fn nan_stays_in_its_row() {
        let x = test_values::<Cpu, 2>([4, 8], 1);
        let x = x.slice_assign(
            [2..3, 5..6],
            Tensor::full([1, 1], f32::NAN, &Default::default()),
        );
        let xs = x.into_primitive().tensor();
        let ones = FlexTensor::from_data(burn::tensor::TensorData::new(vec![1f32; 8], [8]));
        let zeros = FlexTensor::from_data(burn::tensor::TensorData::new(vec![0f32; 8], [8]));
        let y = cpu::forward(&xs, &ones, &zeros, 1e-6);
        let (dx, _, _) = cpu::backward(&xs, &ones, &y, 1e-6);
        for t in [y, dx] {
            let v = t.as_slice::<f32>().unwrap();
            for (r, row) in v.chunks(8).enumerate() {
                assert_eq!(row.iter().all(|x| x.is_nan()), r == 2, "row {r}: {row:?}");
                assert!(r == 2 || row.iter().all(|x| x.is_finite()));
            }
        }
    }
}
