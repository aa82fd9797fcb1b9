//! The residual update of a pre-norm block, with or without LayerScale, as one autodiff op.
//!
//! ```text
//! forward:   z = x + γ·y          (γ per channel, broadcast over rows; without LayerScale γ = 1)
//! backward:  dx = dz,  dy = γ·dz,  dγ = Σ_rows dz·y
//! ```
//! burn differentiates `x + y * γ` as two ops whose forward and backward passes burn-flex each
//! runs on the calling thread while rayon's workers wait: a ViT-S/16 block does four of them
//! forward and as many backward, 1/4 of the serial work in a fine-tuning step on two cores
//! (BENCHMARKS.md). Here the forward is one rayon pass, dx is dz itself (no copy) and dy and dγ
//! come from one pass over dz and y. The op is memory-bound with a recompute rule, as burn's own
//! add and mul are: under balanced checkpointing z is recomputed from x, y and γ.
//!
//! The kernels run for f32 tensors of the CPU backend, with and without autodiff (recognised by
//! type); any other backend or dtype gets burn's `x + y * γ`.

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
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use crate::{cast_same, is_same, Cpu};

/// `x + γ·y` over the last dimension (`x + y` without `gamma`).
pub fn residual<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    y: Tensor<B, D>,
    gamma: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let f32s = [
        Some(x.dtype()),
        Some(y.dtype()),
        gamma.as_ref().map(|g| g.dtype()),
    ]
    .iter()
    .flatten()
    .all(|&d| d == DType::F32);
    let flex = is_same::<B::FloatTensorPrimitive, FlexTensor>();
    let autodiff = is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
    if !f32s || !(flex || autodiff) || x.dims() != y.dims() {
        return match gamma {
            Some(g) => x + y * g.unsqueeze(),
            None => x + y,
        };
    }
    let (x, y) = (x.into_primitive().tensor(), y.into_primitive().tensor());
    let g = gamma.map(|g| g.into_primitive().tensor());
    let out = if flex {
        cast_same(cpu::forward(
            &cast_same(x),
            &cast_same(y),
            g.map(cast_same).as_ref(),
        ))
    } else {
        cast_same(autodiff_forward(
            cast_same(x),
            cast_same(y),
            g.map(cast_same),
        ))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

type AdTensor = FloatTensor<Autodiff<Cpu>>;

fn autodiff_forward(x: AdTensor, y: AdTensor, gamma: Option<AdTensor>) -> AdTensor {
    let out = cpu::forward(
        &x.primitive,
        &y.primitive,
        gamma.as_ref().map(|g| &g.primitive),
    );
    let retro = RetroResidual {
        x: x.node.id,
        y: y.node.id,
        gamma: gamma.as_ref().map(|g| g.node.id),
    };
    let Some(gamma) = gamma else {
        return AddBackward
            .prepare::<BalancedCheckpointing>([x.node.clone(), y.node.clone()])
            .memory_bound()
            .retro_forward(retro)
            .parents([&x, &y])
            .stateless(out);
    };
    match ScaledBackward
        .prepare::<BalancedCheckpointing>([x.node.clone(), y.node.clone(), gamma.node.clone()])
        .memory_bound()
        .retro_forward(retro)
        .parents([&x, &y, &gamma])
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&y), prep.checkpoint(&gamma));
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct RetroResidual {
    x: NodeId,
    y: NodeId,
    gamma: Option<NodeId>,
}

impl RetroForward for RetroResidual {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state::<FlexTensor>(&self.x);
        let y = states.get_state::<FlexTensor>(&self.y);
        let g = self.gamma.map(|id| states.get_state::<FlexTensor>(&id));
        states.save(out_node, cpu::forward(&x, &y, g.as_ref()))
    }
}

/// z = x + y.
#[derive(Debug)]
struct AddBackward;

impl Backward<Cpu, 2> for AddBackward {
    type State = ();

    fn backward(self, ops: Ops<(), 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<Cpu>(&ops.node);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<Cpu>(node.id, d_out.clone());
        }
    }
}

/// z = x + γ·y.
#[derive(Debug)]
struct ScaledBackward;

impl Backward<Cpu, 3> for ScaledBackward {
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let y = ckpt.retrieve_node_output::<FlexTensor>(ops.state.0);
        let gamma = ckpt.retrieve_node_output::<FlexTensor>(ops.state.1);
        let d_out = grads.consume::<Cpu>(&ops.node);
        let [px, py, pg] = ops.parents;
        let (dy, dgamma) = cpu::backward(&y, &gamma, &d_out, py.is_some(), pg.is_some());
        if let Some(node) = px {
            grads.register::<Cpu>(node.id, d_out);
        }
        for (parent, grad) in [(py, dy), (pg, dgamma)] {
            if let (Some(node), Some(grad)) = (parent, grad) {
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

    const ROWS: usize = 32;

    fn contiguous_f32(t: &FlexTensor) -> FlexTensor {
        assert_eq!(t.dtype(), DType::F32, "residual: f32 expected");
        contiguous(t.clone())
    }

    /// The row length: γ's length, or the last dimension.
    fn row_len(t: &FlexTensor, gamma: Option<&FlexTensor>) -> usize {
        let shape = t.shape();
        let d = shape[shape.num_dims() - 1];
        if let Some(g) = gamma {
            assert_eq!(g.shape().num_elements(), d, "residual: γ length");
        }
        d.max(1)
    }

    pub(super) fn forward(
        x: &FlexTensor,
        y: &FlexTensor,
        gamma: Option<&FlexTensor>,
    ) -> FlexTensor {
        assert_eq!(x.shape(), y.shape(), "residual: x and y shapes");
        let d = row_len(x, gamma);
        let (x, y) = (contiguous_f32(x), contiguous_f32(y));
        let gamma = gamma.map(contiguous_f32);
        let write = |z: &mut [MaybeUninit<f32>]| {
            let blocks = z
                .par_chunks_mut(ROWS * d)
                .zip(f32s(&x).par_chunks(ROWS * d))
                .zip(f32s(&y).par_chunks(ROWS * d));
            match &gamma {
                Some(g) => blocks.for_each(|((zs, xs), ys)| {
                    let rows = zs.chunks_mut(d).zip(xs.chunks(d)).zip(ys.chunks(d));
                    for ((z, x), y) in rows {
                        for (((z, &x), &y), &g) in z.iter_mut().zip(x).zip(y).zip(f32s(g)) {
                            z.write(x + g * y);
                        }
                    }
                }),
                None => blocks.for_each(|((zs, xs), ys)| {
                    for ((z, &x), &y) in zs.iter_mut().zip(xs).zip(ys) {
                        z.write(x + y);
                    }
                }),
            }
        };
        // SAFETY: x, y and z have the same length, so the blocks write every element.
        let z = unsafe { written(x.shape().num_elements(), write) };
        FlexTensor::from_data(TensorData::new(z, x.shape()))
    }

    /// (dy, dγ), each only when wanted. dγ is a sum of partial sums over fixed blocks of rows
    /// added in block order, so it does not depend on how rayon schedules the blocks.
    pub(super) fn backward(
        y: &FlexTensor,
        gamma: &FlexTensor,
        d_out: &FlexTensor,
        want_dy: bool,
        want_dgamma: bool,
    ) -> (Option<FlexTensor>, Option<FlexTensor>) {
        let d = row_len(y, Some(gamma));
        let (y, gamma, dz) = (
            contiguous_f32(y),
            contiguous_f32(gamma),
            contiguous_f32(d_out),
        );
        assert_eq!(y.shape(), dz.shape(), "residual: y and dz shapes");
        let g = f32s(&gamma);
        let mut dy = vec![
            0f32;
            if want_dy {
                dz.shape().num_elements()
            } else {
                0
            }
        ];
        let blocks = f32s(&dz)
            .par_chunks(ROWS * d)
            .zip(f32s(&y).par_chunks(ROWS * d));
        let partial = |dzs: &[f32], ys: &[f32], dys: Option<&mut [f32]>| {
            if let Some(dys) = dys {
                for (dy, dz) in dys.chunks_mut(d).zip(dzs.chunks(d)) {
                    for ((dy, &dz), &g) in dy.iter_mut().zip(dz).zip(g) {
                        *dy = g * dz;
                    }
                }
            }
            let mut dg = vec![0f32; if want_dgamma { d } else { 0 }];
            if want_dgamma {
                for (dz, y) in dzs.chunks(d).zip(ys.chunks(d)) {
                    for ((dg, &dz), &y) in dg.iter_mut().zip(dz).zip(y) {
                        *dg += dz * y;
                    }
                }
            }
            dg
        };
        let partials: Vec<Vec<f32>> = if want_dy {
            dy.par_chunks_mut(ROWS * d)
                .zip(blocks)
                .map(|(dys, (dzs, ys))| partial(dzs, ys, Some(dys)))
                .collect()
        } else {
            blocks.map(|(dzs, ys)| partial(dzs, ys, None)).collect()
        };
        let dgamma = want_dgamma.then(|| {
            let mut sum = vec![0f32; d];
            for p in &partials {
                sum.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
            }
            FlexTensor::from_data(TensorData::new(sum, gamma.shape()))
        });
        let dy = want_dy.then(|| FlexTensor::from_data(TensorData::new(dy, dz.shape())));
        (dy, dgamma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        assert_close, test_values, BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };

    /// Output and the gradients of x, y and γ against burn's `x + y * γ` inside a small graph
    /// (a LayerNorm-like square after it, so z's recompute rule is exercised), under both
    /// checkpointing strategies, with and without γ; a row count that is no multiple of the block
    /// size.
    fn grads_match_burn<C: CheckpointStrategy>(with_gamma: bool) {
        type Ad<C> = Autodiff<Cpu, C>;
        let (b, n, d) = (3, 37, 24);
        let x = test_values::<Ad<C>, 3>([b, n, d], 1);
        let y = test_values::<Ad<C>, 3>([b, n, d], 2);
        let g = test_values::<Ad<C>, 1>([d], 3);
        let w = test_values::<Ad<C>, 2>([d, 5], 4);
        let run = |ours: bool| {
            let (x, y) = (x.clone().require_grad(), y.clone().require_grad());
            let g = g.clone().require_grad();
            // y goes through an op of its own first, as the block's attention output does.
            let y2 = y.clone() * 2.0;
            let z = match (ours, with_gamma) {
                (true, true) => residual(x.clone(), y2, Some(g.clone())),
                (true, false) => residual(x.clone(), y2, None),
                (false, true) => x.clone() + y2 * g.clone().unsqueeze(),
                (false, false) => x.clone() + y2,
            };
            let zz = (z.clone() * z.clone())
                .reshape([b * n, d])
                .matmul(w.clone());
            let grads = zz.sum().backward();
            let mut out = vec![
                z.inner().reshape([b * n * d]),
                x.grad(&grads).unwrap().reshape([b * n * d]),
                y.grad(&grads).unwrap().reshape([b * n * d]),
            ];
            if with_gamma {
                out.push(g.grad(&grads).unwrap());
            }
            out
        };
        let (got, want) = (run(true), run(false));
        for (name, (a, b)) in ["z", "dx", "dy", "dγ"]
            .iter()
            .zip(got.into_iter().zip(want))
        {
            assert_close(a, b, name);
        }
    }

    #[test]
    fn autodiff_matches_burn_without_checkpointing() {
        grads_match_burn::<NoCheckpointing>(true);
        grads_match_burn::<NoCheckpointing>(false);
    }

    #[test]
    fn autodiff_matches_burn_with_balanced_checkpointing() {
        grads_match_burn::<BalancedCheckpointing>(true);
        grads_match_burn::<BalancedCheckpointing>(false);
    }

    /// Only the wanted gradients: a frozen γ (LoRA, linear probes through the block) gets none,
    /// and y's gradient is still γ·dz.
    #[test]
    fn frozen_gamma_gets_no_gradient() {
        type Ad = Autodiff<Cpu>;
        let x = test_values::<Ad, 3>([2, 5, 8], 1).require_grad();
        let y = test_values::<Ad, 3>([2, 5, 8], 2).require_grad();
        let g = test_values::<Ad, 1>([8], 3);
        let grads = residual(x.clone(), y.clone(), Some(g.clone()))
            .sum()
            .backward();
        assert!(g.grad(&grads).is_none());
        let want = g.inner().unsqueeze::<3>().expand([2, 5, 8]);
        assert_close(y.grad(&grads).unwrap(), want, "dy");
    }

    /// Inference (no autodiff) takes the kernel too and matches burn; NaN stays where it was.
    #[test]
    fn inference_matches_burn_and_keeps_nan() {
        let x = test_values::<Cpu, 3>([2, 33, 16], 1);
        let y = test_values::<Cpu, 3>([2, 33, 16], 2);
        let g = test_values::<Cpu, 1>([16], 3);
        let want = x.clone() + y.clone() * g.clone().unsqueeze();
        assert_close(residual(x.clone(), y.clone(), Some(g)), want, "z");
        let y = y.slice_assign(
            [1..2, 4..5, 7..8],
            Tensor::full([1, 1, 1], f32::NAN, &Default::default()),
        );
        let z = residual(x, y, None).into_data().to_vec::<f32>().unwrap();
        let nan: Vec<usize> = (0..z.len()).filter(|&i| z[i].is_nan()).collect();
        assert_eq!(nan, vec![33 * 16 + 4 * 16 + 7]);
    }
}
