//! Segmentation heads on ViT features.
//!
//! - **Adapter** (OmniRad's recipe, simplified): patch tokens from several blocks (4 evenly
//!   spaced by default), each through the encoder's final LayerNorm as DINOv2's
//!   `get_intermediate_layers(norm=True)`, reshaped to maps, concatenated and fused by a 1×1
//!   conv. A light CNN on the input keeps the detail a patch grid loses (maps at strides
//!   1, 2, 4, … below the patch size). A U-Net decoder upsamples the fused map stage by stage,
//!   concatenating the CNN map of each scale, to a 1×1 classifier at full resolution.
//! - **Linear** (DINOv2's linear segmentation baseline): a per-patch linear classifier on the
//!   same normalised tokens, logits bilinearly upsampled to the input size.
//!
//! Convolutions use GroupNorm rather than BatchNorm: batches of a few crops make batch
//! statistics noisy, and train and eval then compute the same function.
//!
//! ```text
//! x ─► ViT ─► taps l₁..l_n ─► LN ─► [B, n·D, H/p, W/p] ─► 1×1 conv ─► F
//! x ─► conv(s=1) ─► S₀ ─► conv(s=2) ─► S₁ … S_{K−1}        (K = ⌈log₂ p⌉)
//! F ─► up to S_{K−1} ─► cat ─► conv ─► … ─► up to S₀ ─► cat ─► conv ─► 1×1 ─► logits [B, C, H, W]
//! ```

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::vit::Vit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegHeadKind {
    Adapter,
    Linear,
}

impl SegHeadKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "adapter" => Ok(Self::Adapter),
            "linear" => Ok(Self::Linear),
            _ => Err(format!("unknown segmentation head '{s}' (adapter, linear)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegHeadConfig {
    pub kind: SegHeadKind,
    /// Including background.
    pub classes: usize,
    /// Blocks (0-based) whose outputs are tapped.
    pub layers: Vec<usize>,
    /// Channels of the fused ViT map (and the widest decoder stage).
    pub width: usize,
    /// Channels of the full-resolution CNN map; doubled at each stride-2 stage up to `width`.
    pub conv_width: usize,
}

impl SegHeadConfig {
    /// `n` blocks evenly spaced over `depth`, ending at the last (depth 12, n 4 → 2, 5, 8, 11).
    pub fn evenly_spaced(depth: usize, n: usize) -> Vec<usize> {
        let n = n.clamp(1, depth);
        let mut v: Vec<usize> = (1..=n).map(|i| i * depth / n - 1).collect();
        v.dedup();
        v
    }

    pub fn new(kind: SegHeadKind, classes: usize, depth: usize) -> Self {
        Self {
            kind,
            classes,
            layers: match kind {
                SegHeadKind::Adapter => Self::evenly_spaced(depth, 4),
                SegHeadKind::Linear => vec![depth - 1],
            },
            width: 64,
            conv_width: 16,
        }
    }

    pub fn validate(&self, depth: usize) -> Result<(), String> {
        if self.classes < 2 {
            return Err(format!(
                "{} classes: need background and ≥ 1 class",
                self.classes
            ));
        }
        // Ascending and distinct: the encoder returns each tapped layer once, in block order.
        if self.layers.is_empty()
            || self.layers.iter().any(|&l| l >= depth)
            || !self.layers.is_sorted_by(|a, b| a < b)
        {
            return Err(format!(
                "tapped layers {:?} must be ascending, distinct and below the depth {depth}",
                self.layers
            ));
        }
        if !self.width.is_multiple_of(8)
            || !self.conv_width.is_multiple_of(8)
            || self.conv_width == 0
        {
            return Err("width and conv_width must be positive multiples of 8".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(
        &self,
        embed_dim: usize,
        patch: usize,
        in_chans: usize,
        dev: &B::Device,
    ) -> SegHead<B> {
        let taps = self.layers.len() * embed_dim;
        match self.kind {
            SegHeadKind::Linear => SegHead {
                fuse: conv(taps, self.classes, 1, 1, dev),
                fuse_norm: None,
                stem: Vec::new(),
                decoder: Vec::new(),
                classifier: None,
                layers: self.layers.clone(),
            },
            SegHeadKind::Adapter => {
                // Stride-1, 2, 4, … stages while the stride stays below the patch size.
                let levels = (usize::BITS - (patch.max(2) - 1).leading_zeros()) as usize;
                let chans: Vec<usize> = (0..levels)
                    .map(|k| (self.conv_width << k).min(self.width))
                    .collect();
                let mut stem = Vec::new();
                let mut prev = in_chans;
                for (k, &c) in chans.iter().enumerate() {
                    stem.push(ConvNorm::new(prev, c, if k == 0 { 1 } else { 2 }, dev));
                    prev = c;
                }
                let mut decoder = Vec::new();
                let mut prev = self.width;
                for &c in chans.iter().rev() {
                    decoder.push(ConvNorm::new(prev + c, c, 1, dev));
                    prev = c;
                }
                SegHead {
                    fuse: conv(taps, self.width, 1, 1, dev),
                    fuse_norm: Some(GroupNormConfig::new(8, self.width).init(dev)),
                    stem,
                    decoder,
                    classifier: Some(conv(prev, self.classes, 1, 1, dev)),
                    layers: self.layers.clone(),
                }
            }
        }
    }
}

fn conv<B: Backend>(i: usize, o: usize, k: usize, stride: usize, dev: &B::Device) -> Conv2d<B> {
    let p = k / 2;
    Conv2dConfig::new([i, o], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(dev)
}

/// 3×3 conv → GroupNorm(8) → ReLU.
#[derive(Module, Debug)]
pub struct ConvNorm<B: Backend> {
    pub conv: Conv2d<B>,
    pub norm: GroupNorm<B>,
}

impl<B: Backend> ConvNorm<B> {
    fn new(i: usize, o: usize, stride: usize, dev: &B::Device) -> Self {
        Self {
            conv: conv(i, o, 3, stride, dev),
            norm: GroupNormConfig::new(8, o).init(dev),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        relu(self.norm.forward(self.conv.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct SegHead<B: Backend> {
    /// Adapter: taps → width; linear: taps → classes.
    pub fuse: Conv2d<B>,
    pub fuse_norm: Option<GroupNorm<B>>,
    /// CNN stages at strides 1, 2, 4, … (adapter only).
    pub stem: Vec<ConvNorm<B>>,
    /// Coarse to fine, one per stem stage (adapter only).
    pub decoder: Vec<ConvNorm<B>>,
    pub classifier: Option<Conv2d<B>>,
    pub layers: Vec<usize>,
}

fn resize<B: Backend>(x: Tensor<B, 4>, h: usize, w: usize) -> Tensor<B, 4> {
    let [_, _, xh, xw] = x.dims();
    if (xh, xw) == (h, w) {
        return x;
    }
    interpolate(
        x,
        [h, w],
        InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false),
    )
}

impl<B: Backend> SegHead<B> {
    /// Tapped patch tokens as one map [B, n·D, H/p, W/p].
    pub fn vit_maps(&self, vit: &Vit<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = vit.forward_features(x, None, &self.layers, false);
        let [gh, gw] = out.grid;
        let skip = 1 + vit.num_registers;
        let maps = out
            .intermediates
            .into_iter()
            .map(|t| {
                let [b, n, d] = t.dims();
                vit.norm
                    .forward(t.narrow(1, skip, n - skip))
                    .swap_dims(1, 2)
                    .reshape([b, d, gh, gw])
            })
            .collect();
        Tensor::cat(maps, 1)
    }

    /// Logits [B, C, H, W] from the image `x` and its ViT maps.
    pub fn forward(&self, x: Tensor<B, 4>, maps: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let fused = self.fuse.forward(maps);
        let Some(classifier) = &self.classifier else {
            return resize(fused, h, w);
        };
        let mut y = relu(self.fuse_norm.as_ref().expect("adapter").forward(fused));
        let mut skips = Vec::with_capacity(self.stem.len());
        let mut s = x;
        for stage in &self.stem {
            s = stage.forward(s);
            skips.push(s.clone());
        }
        for (stage, skip) in self.decoder.iter().zip(skips.into_iter().rev()) {
            let [_, _, sh, sw] = skip.dims();
            y = stage.forward(Tensor::cat(vec![resize(y, sh, sw), skip], 1));
        }
        classifier.forward(y)
    }
}

/// Encoder + head: the whole segmentation network.
#[derive(Module, Debug)]
pub struct Segmenter<B: Backend> {
    pub backbone: Vit<B>,
    pub head: SegHead<B>,
}

impl<B: Backend> Segmenter<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let maps = self.head.vit_maps(&self.backbone, x.clone());
        self.head.forward(x, maps)
    }
}
