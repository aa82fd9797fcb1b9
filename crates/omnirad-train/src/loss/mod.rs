//! Losses, one per file as in DINOv2's `dinov2/loss/`.

pub mod dino_clstoken;
pub mod ibot_patch;
pub mod koleo;
pub mod segmentation;
pub mod soft_cross_entropy;

pub use dino_clstoken::{cross_entropy, sinkhorn_knopp, Center};
pub use ibot_patch::ibot_patch_loss;
pub use koleo::koleo_loss;
pub use segmentation::ce_dice_loss;
pub use soft_cross_entropy::soft_cross_entropy;
