//! KoLeo regulariser (Sablayrolles et al. 2019; DINOv2 `koleo_loss.py`): spreads the class tokens
//! of one crop's batch by penalising small nearest-neighbour distances.
//! ```text
//! z_i = x_i / max(‖x_i‖, ε),   nn(i) = argmax_{j≠i} z_i·z_j,
//! L = −(1/B) Σ_i log(‖z_i − z_nn(i) + ε‖₂ + ε),   ε = 1e-8
//! ```
//! (the inner ε is PyTorch's `PairwiseDistance` eps, kept for parity).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use omnirad_model::dino_head::l2_normalize;

const EPS: f64 = 1e-8;

/// x: `[B, D]` student class tokens (before the head); B ≥ 2. A scalar `[1]`.
pub fn koleo_loss<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = x.dims();
    let z = l2_normalize(x, EPS);
    let dots = z.clone().matmul(z.clone().transpose());
    let eye: Vec<bool> = (0..n * n).map(|i| i / n == i % n).collect();
    let eye = Tensor::<B, 2, Bool>::from_data(TensorData::new(eye, [n, n]), &z.device());
    // The self-similarity is 1; −1 keeps it from being its own neighbour (as the reference does).
    let nn = dots.mask_fill(eye, -1.0).argmax(1).reshape([n]);
    let diff = z.clone() - z.select(0, nn) + EPS;
    let dist = diff.powi_scalar(2).sum_dim(1).sqrt();
    (dist + EPS).log().mean().neg()
}
