//! Segmentation loss: pixel cross-entropy plus soft Dice (the usual U-Net / nnU-Net pairing:
//! CE gives dense gradients early, Dice keeps thin or small foreground from being drowned by
//! background). With logits z [B, C, H, W], one-hot targets y, valid-pixel weights v ∈ {0, 1}
//! (field of view, window padding) and p = softmax_c(z):
//! ```text
//! CE   = −Σ_{b,h,w} v · Σ_c y_c log p_c  /  Σ v
//! Dice = 1 − (1/(C−1)) Σ_{c≥1} (2 Σ v·p_c·y_c + s) / (Σ v·p_c + Σ v·y_c + s),   s = 1
//! L    = w_ce · CE + w_dice · Dice
//! ```
//! Dice sums run over the whole batch ("batch Dice"): crops without foreground then do not
//! dominate the average, and the foreground classes only (background would reward the trivial
//! all-background answer).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

const SMOOTH: f64 = 1.0;

/// Returns (CE, Dice) as scalars `[1]`. `y` one-hot `[B, C, H, W]`; `valid` `[B, 1, H, W]`.
pub fn ce_dice_loss<B: Backend>(
    z: Tensor<B, 4>,
    y: Tensor<B, 4>,
    valid: Tensor<B, 4>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let c = z.dims()[1];
    let logp = log_softmax(z, 1);
    let p = logp.clone().exp() * valid.clone();
    let y = y * valid.clone();
    let n = valid.sum().clamp_min(1.0);
    let ce = (logp * y.clone()).sum().neg() / n;
    let fg = |t: Tensor<B, 4>| t.narrow(1, 1, c - 1).swap_dims(0, 1).flatten::<2>(1, 3);
    let (p, y) = (fg(p), fg(y));
    let inter = (p.clone() * y.clone()).sum_dim(1);
    let denom = p.sum_dim(1) + y.sum_dim(1);
    let dice = ((inter * 2.0 + SMOOTH) / (denom + SMOOTH)).mean().neg() + 1.0;
    (ce, dice)
}
