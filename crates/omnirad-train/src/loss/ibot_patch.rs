//! iBOT masked-patch loss (Zhou et al. 2022; DINOv2 `ibot_patch_loss.py`, `forward_masked`).
//!
//! Over the M masked patch tokens of the student's global crops (patch j in image i(j)), with
//! teacher targets p_t (centred or Sinkhorn-Knopp, as for the class token, over masked tokens only):
//! ```text
//! L = −(1/N_img) Σ_j w_j Σ_k p_t[j,k] · log softmax(s[j] / τ_s)[k],   w_j = 1 / |masked(i(j))|
//! ```
//! N_img counts every global-crop image, masked or not, so each image contributes the mean over
//! its own masked tokens and images without masks contribute zero. Unmasked tokens never enter.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::soft_cross_entropy;

/// `weights` `[M]` are w_j; the result is a scalar `[1]`.
pub fn ibot_patch_loss<B: Backend>(
    student_logits: Tensor<B, 2>,
    teacher_probs: Tensor<B, 2>,
    weights: Tensor<B, 1>,
    n_images: usize,
    student_temp: f64,
) -> Tensor<B, 1> {
    let per_token = soft_cross_entropy(student_logits, teacher_probs, student_temp);
    (per_token * weights).sum() / n_images as f64
}
