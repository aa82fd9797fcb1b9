//! DINO class-token loss (Caron et al. 2021; DINOv2 `dino_clstoken_loss.py`).
//!
//! For student logits s and teacher targets p_t over K prototypes, student temperature τ_s:
//! ```text
//! H(p_t, s) = −(1/B) Σ_b Σ_k p_t[b,k] · log softmax(s[b] / τ_s)[k]
//! ```
//! Teacher targets come from one of two normalisations of the teacher logits t at temperature τ_t:
//! - centering: p_t = softmax((t − c) / τ_t), then c ← m·c + (1 − m)·mean_b t  (the centre used at
//!   step k has seen batches ≤ k − 1, as DINOv2's deferred update);
//! - Sinkhorn-Knopp (3 iterations): Q = exp(t/τ_t)ᵀ normalised alternately so that every prototype
//!   row sums to 1/K and every sample column to 1/B; the targets are B·Qᵀ (rows sum to 1).
//!
//! The training step sums H over every (student crop, teacher crop) pair of different views and
//! divides by the number of pairs; DINOv2's own normaliser (N_g(N_g−1) + max(N_g·N_l, 1)) gives the
//! global-only (OmniRad) recipe a weight of 2/3 instead of 1, which we do not copy.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::soft_cross_entropy;

/// −mean_b Σ_k p_t·log softmax(s/τ_s): a scalar `[1]`.
pub fn cross_entropy<B: Backend>(
    student_logits: Tensor<B, 2>,
    teacher_probs: Tensor<B, 2>,
    student_temp: f64,
) -> Tensor<B, 1> {
    soft_cross_entropy(student_logits, teacher_probs, student_temp).mean()
}

/// Sinkhorn-Knopp teacher targets [B, K] for teacher logits [B, K].
///
/// The max is subtracted before `exp` (the reference does not): the first normalisation by ΣQ
/// cancels any global factor, so the result is the same and cannot overflow.
pub fn sinkhorn_knopp<B: Backend>(
    teacher_logits: Tensor<B, 2>,
    temp: f64,
    iterations: usize,
) -> Tensor<B, 2> {
    let [b, k] = teacher_logits.dims();
    let max = teacher_logits.clone().max();
    let mut q = ((teacher_logits - max.unsqueeze::<2>()) / temp).exp();
    q = q.clone() / q.sum().unsqueeze::<2>();
    for _ in 0..iterations {
        // Prototype marginals (columns of our [B, K] layout) → 1/K, then sample marginals → 1/B.
        // A prototype whose every entry underflowed keeps zero mass instead of becoming 0/0.
        q = q.clone() / (q.sum_dim(0).clamp_min(1e-30) * k as f64);
        q = q.clone() / (q.sum_dim(1).clamp_min(1e-30) * b as f64);
    }
    q * b as f64
}

/// The EMA centre of the teacher logits, [1, K].
#[derive(Debug, Clone)]
pub struct Center<B: Backend> {
    pub value: Tensor<B, 2>,
    pub momentum: f64,
}

impl<B: Backend> Center<B> {
    pub fn new(k: usize, momentum: f64, device: &B::Device) -> Self {
        Self {
            value: Tensor::zeros([1, k], device),
            momentum,
        }
    }

    /// softmax((t − c)/τ_t) with the current centre, then folds this batch into the centre.
    pub fn softmax_center(&mut self, teacher_logits: Tensor<B, 2>, temp: f64) -> Tensor<B, 2> {
        let p = softmax((teacher_logits.clone() - self.value.clone()) / temp, 1);
        let batch_mean = teacher_logits.mean_dim(0);
        self.value = self.value.clone() * self.momentum + batch_mean * (1.0 - self.momentum);
        p
    }
}
