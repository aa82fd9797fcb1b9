//! Permute axes and lay the result out contiguously, with a row-copy CPU kernel.
//!
//! Cutting images into patch rows ([B, C, h, p, w, p] → [B, h, w, C, p, p]) is a permutation
//! that the next reshape must materialise. burn-flex 0.21 does that through a per-element
//! strided iterator, forward and again in the backward pass; for attention's head split and
//! merge (now read in place, `crate::attention`) that was about a tenth of a ViT-S/16
//! fine-tuning step.
//! Every permutation here keeps the last axis in place, so the copy moves whole rows (memcpy)
//! split over rayon's threads. The backward pass is the inverse permutation, copied the same way.
//! On backends other than the CPU one (and its autodiff) this is burn's `permute`, whose
//! kernels read strided tensors directly.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::{cast_same, is_same, Cpu};

/// `x.permute(axes)`, contiguous in memory on the CPU backend.
pub fn permute_contiguous<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    axes: [usize; D],
) -> Tensor<B, D> {
    let cpu = is_same::<B::FloatTensorPrimitive, FlexTensor>();
    let autodiff_cpu = is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
    if !cpu && !autodiff_cpu {
        return x.permute(axes);
    }
    let prim = x.into_primitive().tensor();
    let out = if cpu {
        cast_same(copy(&cast_same(prim), &axes))
    } else {
        cast_same(autodiff_forward(cast_same(prim), axes.to_vec()))
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn autodiff_forward(x: FloatTensor<Autodiff<Cpu>>, axes: Vec<usize>) -> FloatTensor<Autodiff<Cpu>> {
    let out = copy(&x.primitive, &axes);
    // The backward pass needs no tensor, only the axes. Recomputing the output would mean
    // keeping the input, which is the same size: marked compute-bound, so the output is kept.
    match PermuteBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(axes, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct PermuteBackward;

impl Backward<Cpu, 1> for PermuteBackward {
    type State = Vec<usize>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<Cpu>(&ops.node);
        let mut inverse = vec![0; ops.state.len()];
        for (i, &a) in ops.state.iter().enumerate() {
            inverse[a] = i;
        }
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<Cpu>(node.id, copy(&d_out, &inverse));
        }
    }
}

/// Rows per rayon task (a row is the last axis, 64 floats for a ViT head).
const ROWS_PER_TASK: usize = 256;

/// The permuted view of `x`, copied into a new contiguous tensor.
fn copy(x: &FlexTensor, axes: &[usize]) -> FlexTensor {
    let view = x.permute(axes);
    let layout = view.layout();
    let strides = layout.strides();
    if x.dtype() != DType::F32 || strides.last() != Some(&1) || strides.iter().any(|&s| s < 0) {
        return view.to_contiguous();
    }
    let shape = layout.shape().to_vec();
    let row = *shape.last().expect("at least one axis");
    let n: usize = shape.iter().product();
    let (src, start) = (x.storage::<f32>(), layout.start_offset() as isize);
    let write = |out: &mut [MaybeUninit<f32>]| {
        if row == 0 {
            return;
        }
        out.par_chunks_mut(row * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (j, dst) in chunk.chunks_mut(row).enumerate() {
                    // Source offset of row `task·ROWS_PER_TASK + j`, from its index over the outer axes.
                    let (mut rest, mut at) = (task * ROWS_PER_TASK + j, start);
                    for d in (0..shape.len() - 1).rev() {
                        at += (rest % shape[d]) as isize * strides[d];
                        rest /= shape[d];
                    }
                    let at = at as usize;
                    dst.write_copy_of_slice(&src[at..at + row]);
                }
            });
    };
    // SAFETY: the tasks write every row of the output.
    let out = unsafe { crate::cpu_gemm::written(n, write) };
    FlexTensor::from_data(TensorData::new(out, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{test_values, BalancedCheckpointing, CheckpointStrategy};

    #[test]
    fn equals_burns_permute_for_contiguous_strided_and_offset_inputs() {
        let x = test_values::<Cpu, 5>([2, 7, 3, 4, 8], 1);
        let axes = [2, 0, 3, 1, 4];
        let check = |x: Tensor<Cpu, 5>| {
            let got = permute_contiguous(x.clone(), axes);
            got.to_data().assert_eq(&x.permute(axes).into_data(), true);
        };
        check(x.clone());
        check(x.clone().swap_dims(1, 3)); // strided input
        check(x.clone().narrow(1, 2, 4)); // non-zero offset
        check(x.clone().swap_dims(0, 4)); // last axis not contiguous: burn-flex's copy
                                          // The copy is contiguous: a reshape after it is a view of the same values.
        let flat = permute_contiguous(x.clone(), axes).reshape([3 * 2 * 4, 7, 8]);
        flat.into_data().assert_eq(
            &x.permute(axes).reshape([3 * 2 * 4, 7, 8]).into_data(),
            true,
        );
    }

    fn grads_match_burn<C: CheckpointStrategy>() {
        type Ad<C> = Autodiff<Cpu, C>;
        let x = test_values::<Ad<C>, 3>([2, 5, 24], 1);
        let w = test_values::<Ad<C>, 3>([3, 2, 20], 2).reshape([3 * 2 * 4, 5, 1]) * 0.5 + 0.1;
        let axes = [2, 0, 3, 1, 4];
        type Permute<C> = fn(Tensor<Ad<C>, 5>, [usize; 5]) -> Tensor<Ad<C>, 5>;
        let run = |permute: Permute<C>| {
            let x = x.clone().require_grad();
            let p = permute(x.clone().reshape([2, 5, 3, 4, 2]), axes).reshape([24, 5, 2]);
            // Heads split as in attention: narrow, not squeeze.
            let (a, b) = (p.clone().narrow(0, 0, 8), p.narrow(0, 8, 16));
            let y = (a.exp().sum() + (b * w.clone().narrow(0, 8, 16)).tanh().sum()).sum();
            let grads = y.backward();
            x.grad(&grads).unwrap()
        };
        let want = run(|x, axes| x.permute(axes));
        run(permute_contiguous)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn gradient_is_the_inverse_permutation_without_checkpointing() {
        grads_match_burn::<NoCheckpointing>();
    }

    #[test]
    fn gradient_is_the_inverse_permutation_with_balanced_checkpointing() {
        grads_match_burn::<BalancedCheckpointing>();
    }
}
