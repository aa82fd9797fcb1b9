//! Vision Transformer (Dosovitskiy et al. 2021) in the DINOv2 / timm layout.
//!
//! ```text
//! x ─ patch_embed ─┬─ [cls | reg… | patches] + pos_embed ─ blocks × depth ─ norm ─┬─ cls token
//!                  │    (pos_embed is bicubic-resized to the input's patch grid)    └─ patch tokens
//! block(x) = x + drop_path(ls1 · attn(norm1(x)));  x + drop_path(ls2 · mlp(norm2(x)))
//! mlp(x)   = fc2(gelu(fc1(x)))                 (Ffn::Mlp)
//!          = fc2(silu(a) ⊙ b), [a | b] = fc1(x)  (Ffn::SwiGlu, DINOv2 giant)
//! ```
//! Parameter names follow timm (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `ls1.gamma`, …) so
//! `model.safetensors` written by [`crate::io`] is readable by timm's `VisionTransformer`.
//! Registers follow DINOv2-with-registers: they sit between the class token and the patches
//! and receive no position embedding.
//!
//! [`Precision::Bf16`] is mixed precision by hand (burn 0.21 has no autocast): parameters stay
//! f32 (so the optimizer updates f32 master weights), the block's linears and attention run on
//! bf16 casts, and LayerNorm, GELU, softmax statistics inside attention, residual sums and
//! everything after the encoder stay f32. On the CPU backend tensors stay f32 throughout and
//! the linears' products round their operands to bf16 inside the GEMM
//! ([`crate::linear::linear_bf16`]); attention's products do the same on CPUs with AMX tiles
//! or AVX-512 BF16 and stay f32 on others ([`crate::attention::attention`]). The DINO head has
//! the same switch ([`crate::DinoHead::with_precision`]).

use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Dropout, DropoutConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
    PaddingConfig2d,
};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Distribution, FloatDType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::attention::attention;
use crate::gelu::gelu;
use crate::layer_norm::layer_norm;
use crate::permute::permute_contiguous;
use crate::residual::residual;
use crate::{is_same, Cpu};

/// Architecture of a ViT. Presets: [`VitConfig::preset`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Side of the square image the position table was trained for.
    pub img_size: usize,
    pub patch_size: usize,
    /// Pixels the patch embedding reaches beyond its patch on every side: kernel p + 2·o, stride
    /// p, zero padding o, so the token grid is the same (overlapping patch embedding, as in
    /// PVTv2); 0 is ViT's patchify.
    #[serde(default)]
    pub patch_overlap: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Hidden width of the MLP over `embed_dim` (for SwiGLU: the gated width, half of fc1's).
    pub mlp_ratio: f64,
    #[serde(default)]
    pub ffn: Ffn,
    pub qkv_bias: bool,
    /// Initial LayerScale value; `None` disables LayerScale (DINO v1, plain timm ViTs).
    pub layer_scale_init: Option<f64>,
    /// Register tokens (Darcet et al. 2024); 0 for none.
    pub num_registers: usize,
    /// Maximum stochastic-depth rate, increased linearly over the blocks (DINOv2 uses a uniform
    /// rate; see `drop_path_uniform`).
    pub drop_path_rate: f64,
    #[serde(default)]
    pub drop_path_uniform: bool,
    pub norm_eps: f64,
    /// How the position table is resized for other input sizes.
    #[serde(default)]
    pub pos_interp: PosInterp,
}

/// Position-table resampling. Both are bicubic; they differ where the references differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosInterp {
    /// PyTorch `interpolate(bicubic, align_corners=False)` (a = -0.75, edge clamping): HF
    /// Dinov2Model and DINOv2.
    #[default]
    Bicubic,
    /// PyTorch bicubic with `antialias=True` (PIL's a = -0.5 kernel, weights renormalised at the
    /// borders): timm's `resample_abs_pos_embed`, HF `Dinov2WithRegistersModel`.
    BicubicAntialias,
    /// The original DINOv2 code: bicubic by the scale factor
    /// (n + 0.1) / g rather than to the size n, no antialiasing.
    BicubicDinov2Offset,
}

/// Arithmetic precision of the encoder's matmuls and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 matmuls and attention on f32 master weights (see the module docs).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision '{s}' (f32, bf16)")),
        }
    }
}

/// `x·W + b` with the matmul in `p`; the result is in `p` too, except on the CPU, where it is
/// f32 (the caller casts back).
/// The tokens of all images are one [B·N, D] matrix: on a [B, N, D] input burn's weight gradient
/// is B per-image products [D_in, D_out], each allocated, then summed — one GEMM over all
/// tokens writes a B-th of that memory.
fn linear<B: Backend>(l: &Linear<B>, x: Tensor<B, 3>, p: Precision) -> Tensor<B, 3> {
    let [b, n, d] = x.dims();
    let x = x.reshape([b * n, d]);
    let y = match (p, &l.bias) {
        (Precision::F32, Some(b)) => crate::linear::linear(x, l.weight.val(), b.val()),
        (Precision::F32, None) => l.forward(x),
        (Precision::Bf16, Some(b)) if bf16_in_gemm::<B>() => {
            crate::linear::linear_bf16(x, l.weight.val(), b.val())
        }
        (Precision::Bf16, _) => {
            let bf = FloatDType::BF16;
            let y = x.cast(bf).matmul(l.weight.val().cast(bf));
            match &l.bias {
                Some(b) => y + b.val().cast(bf).unsqueeze(),
                None => y,
            }
        }
    };
    let out = y.dims()[1];
    y.reshape([b, n, out])
}

/// Mixed precision on `B` rounds to bf16 inside the CPU GEMMs rather than casting tensors.
fn bf16_in_gemm<B: Backend>() -> bool {
    crate::linear::cpu_kernels::<B>()
}

/// Back to f32; a no-op (no graph node, no kernel) when already f32.
fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == burn::tensor::DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

/// The block's feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ffn {
    /// Linear-GELU-linear (ViT, DINOv2 S/B/L).
    #[default]
    Mlp,
    /// SwiGLU (Shazeer 2020) with one packed input projection, as DINOv2's `SwiGLUFFNFused`,
    /// HF's `Dinov2SwiGLUFFN` and timm's `SwiGLUPacked` store it.
    SwiGlu,
}

/// Named presets, as in timm / DINOv2.
pub const PRESETS: &[&str] = &[
    "vit_pico", "vit_tiny", "vit_s16", "vit_s14", "vit_b16", "vit_b14", "vit_l14", "vit_g14",
];

impl VitConfig {
    fn base(
        img_size: usize,
        patch_size: usize,
        embed_dim: usize,
        depth: usize,
        heads: usize,
    ) -> Self {
        Self {
            img_size,
            patch_size,
            patch_overlap: 0,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads: heads,
            mlp_ratio: 4.0,
            ffn: Ffn::Mlp,
            qkv_bias: true,
            layer_scale_init: Some(1e-5),
            num_registers: 0,
            drop_path_rate: 0.0,
            drop_path_uniform: false,
            norm_eps: 1e-6,
            pos_interp: PosInterp::Bicubic,
        }
    }

    /// `vit_pico` is a test/demo size (dim 64, depth 2, 32 px); the others match timm's
    /// `vit_{tiny,small,base,large}_patch{16,14}` (patch-14 ones at DINOv2's 224 crop);
    /// `vit_g14` is DINOv2's giant (SwiGLU of gated width 4096).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "vit_pico" => Self::base(32, 4, 64, 2, 2),
            "vit_tiny" => Self::base(224, 16, 192, 12, 3),
            "vit_s16" => Self::base(224, 16, 384, 12, 6),
            "vit_s14" => Self::base(224, 14, 384, 12, 6),
            "vit_b16" => Self::base(224, 16, 768, 12, 12),
            "vit_b14" => Self::base(224, 14, 768, 12, 12),
            "vit_l14" => Self::base(224, 14, 1024, 24, 16),
            "vit_g14" => Self {
                mlp_ratio: 4096.0 / 1536.0,
                ffn: Ffn::SwiGlu,
                ..Self::base(224, 14, 1536, 40, 24)
            },
            _ => return None,
        })
    }

    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Side of the patch embedding's convolution kernel.
    fn kernel(&self) -> usize {
        self.patch_size + 2 * self.patch_overlap
    }

    /// Checks the invariants `init` relies on, and that the weights fit in memory.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return Err(format!(
                "img_size {} is not a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        // Bounded so that a typo cannot build a kernel many patches wide (o = p: three).
        if self.patch_overlap > self.patch_size {
            return Err(format!(
                "patch_overlap {} is more than patch_size {}",
                self.patch_overlap, self.patch_size
            ));
        }
        if self.embed_dim == 0
            || self.num_heads == 0
            || !self.embed_dim.is_multiple_of(self.num_heads)
        {
            return Err(format!(
                "embed_dim {} is not a positive multiple of num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.depth == 0 || self.in_chans == 0 {
            return Err("depth and in_chans must be positive".into());
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_hidden() > 0) {
            return Err(format!("mlp_ratio {} must be a number > 0", self.mlp_ratio));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("norm_eps {} must be a number > 0", self.norm_eps));
        }
        let params = self.num_params();
        if !omnirad_data::can_allocate(4.0 * params) {
            return Err(format!(
                "{params:.3e} parameters ({:.1} GB in f32): more than this machine can allocate",
                4e-9 * params
            ));
        }
        Ok(())
    }

    /// Hidden width of each block's MLP. Rounded, not truncated: ratios read back from a
    /// checkpoint (4096/1536) must give the stored width again.
    fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio).round() as usize
    }

    /// Number of weights [`VitConfig::init`] makes, as f64 so that absurd sizes compare
    /// instead of overflowing.
    pub fn num_params(&self) -> f64 {
        let [d, h, k, c] = [
            self.embed_dim,
            self.mlp_hidden(),
            self.kernel(),
            self.in_chans,
        ]
        .map(|v| v as f64);
        let tokens = 1.0 + (self.grid() as f64).powi(2);
        let fc1 = if self.ffn == Ffn::SwiGlu { 2.0 * h } else { h };
        let qkv_bias = if self.qkv_bias { 3.0 * d } else { 0.0 };
        let layer_scale = if self.layer_scale_init.is_some() {
            2.0 * d
        } else {
            0.0
        };
        let block = 4.0 * d                      // two LayerNorms
            + 3.0 * d * d + qkv_bias + d * d + d // qkv, proj
            + d * fc1 + fc1 + h * d + d          // fc1, fc2
            + layer_scale;
        c * k * k * d + d                        // patch embedding
            + (1.0 + self.num_registers as f64 + tokens) * d // class, register and position tokens
            + d                                  // mask token
            + self.depth as f64 * block
            + 2.0 * d // final norm
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Vit<B> {
        let (d, o) = (self.embed_dim, self.patch_overlap);
        // timm/DINOv2 init: trunc_normal(0.02) for linears and tokens; N(0, 0.02) differs only
        // beyond 2σ, which matters for neither training nor tests.
        let w_init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let token = |shape: [usize; 3]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        let blocks = (0..self.depth)
            .map(|i| {
                let dp = if self.depth > 1 && !self.drop_path_uniform {
                    self.drop_path_rate * i as f64 / (self.depth - 1) as f64
                } else {
                    self.drop_path_rate
                };
                let hidden = self.mlp_hidden();
                let fc1_out = match self.ffn {
                    Ffn::Mlp => hidden,
                    Ffn::SwiGlu => 2 * hidden,
                };
                let ln = || {
                    LayerNormConfig::new(d)
                        .with_epsilon(self.norm_eps)
                        .init(device)
                };
                let lin = |i, o, bias| {
                    LinearConfig::new(i, o)
                        .with_bias(bias)
                        .with_initializer(w_init.clone())
                        .init(device)
                };
                let ls = |v: Option<f64>| {
                    v.map(|v| LayerScale {
                        gamma: Param::from_tensor(Tensor::full([d], v, device)),
                    })
                };
                Block {
                    norm1: ln(),
                    attn: Attention {
                        qkv: lin(d, 3 * d, self.qkv_bias),
                        proj: lin(d, d, true),
                        num_heads: self.num_heads,
                        qkv_lora: None,
                        proj_lora: None,
                        precision: Precision::F32,
                    },
                    ls1: ls(self.layer_scale_init),
                    norm2: ln(),
                    mlp: Mlp {
                        fc1: lin(d, fc1_out, true),
                        fc2: lin(hidden, d, true),
                        swiglu: self.ffn == Ffn::SwiGlu,
                        precision: Precision::F32,
                    },
                    ls2: ls(self.layer_scale_init),
                    drop_path: dp,
                    norm_eps: self.norm_eps,
                }
            })
            .collect();
        Vit {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([self.in_chans, d], [self.kernel(); 2])
                    .with_stride([self.patch_size; 2])
                    .with_padding(PaddingConfig2d::Explicit(o, o, o, o))
                    .init(device),
            },
            cls_token: token([1, 1, d]),
            reg_token: (self.num_registers > 0).then(|| token([1, self.num_registers, d])),
            pos_embed: token([1, 1 + self.grid() * self.grid(), d]),
            mask_token: Param::from_tensor(Tensor::zeros([1, d], device)),
            blocks,
            norm: LayerNormConfig::new(d)
                .with_epsilon(self.norm_eps)
                .init(device),
            norm_eps: self.norm_eps,
            patch_size: self.patch_size,
            num_registers: self.num_registers,
            pos_interp: self.pos_interp,
        }
    }
}

#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// [B, C, H, W] → [B, h·w, D]: the stride-p, p×p convolution over non-overlapping patches
    /// (a remainder of H or W beyond whole patches is ignored, as the convolution does).
    ///
    /// On the CPU backend it runs as what it is, one GEMM over all patches: the image is cut into
    /// [B·h·w, C·p·p] rows (a row-copy permutation) and multiplied by the weight as a [C·p·p, D]
    /// matrix. burn-flex's convolution, and its weight gradient in particular, go through
    /// element-by-element strided copies, and its [B, D, h, w] output needs one more to become
    /// tokens: 1/8 of a `vit_pico` fine-tuning step at 32 px (BENCHMARKS.md). Other backends, and
    /// overlapping patches (kernel wider than the stride), keep burn's convolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let cpu = is_same::<B::FloatTensorPrimitive, FlexTensor>()
            || is_same::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Cpu>>>();
        let weight = self.proj.weight.val();
        let [d, c, k, _] = weight.dims();
        let p = self.proj.stride[0];
        let [b, _, ih, iw] = x.dims();
        let (h, w) = (ih / p, iw / p);
        if !cpu || x.dtype() != DType::F32 || k != p {
            return self.proj.forward(x).flatten::<3>(2, 3).swap_dims(1, 2);
        }
        let x = if (ih, iw) == (h * p, w * p) {
            x
        } else {
            x.narrow(2, 0, h * p).narrow(3, 0, w * p)
        };
        let rows = permute_contiguous(x.reshape([b, c, h, p, w, p]), [0, 2, 4, 1, 3, 5])
            .reshape([b * h * w, c * p * p]);
        let bias = match &self.proj.bias {
            Some(bias) => bias.val(),
            None => Tensor::zeros([d], &weight.device()),
        };
        let wmat = weight.reshape([d, c * p * p]).transpose();
        crate::linear::linear(rows, wmat, bias).reshape([b, h * w, d])
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub num_heads: usize,
    /// Low-rank adapters for parameter-efficient fine-tuning; merged away before saving.
    pub qkv_lora: Option<Lora<B>>,
    pub proj_lora: Option<Lora<B>>,
    #[module(skip)]
    pub precision: Precision,
}

/// LoRA (Hu et al. 2022): a frozen linear W plus a trained low-rank update,
/// `y = x·W + (α/r)·dropout(x)·A·B`, A ~ U(±1/√in) (PEFT's init), B = 0 so training starts
/// from the pretrained function. A is [in, r], B is [r, out] (burn's [in, out] convention).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl<B: Backend> Lora<B> {
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            lora_a: Param::from_tensor(Tensor::random(
                [d_in, rank],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            lora_b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale: alpha / rank as f64,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The update (α/r)·x·A·B for x [B, N, in].
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let x = self.dropout.forward(x).reshape([b * n, d]);
        let y = x.matmul(self.lora_a.val()).matmul(self.lora_b.val()) * self.scale;
        let out = y.dims()[1];
        y.reshape([b, n, out])
    }

    /// W + (α/r)·A·B, the linear with the adapter folded in.
    fn merge_into(&self, l: Linear<B>) -> Linear<B> {
        let delta = self.lora_a.val().matmul(self.lora_b.val()) * self.scale;
        Linear {
            weight: Param::from_tensor(l.weight.val() + delta),
            bias: l.bias,
        }
    }
}

/// The adapter's low-rank path stays f32: it is small, and it is what trains.
fn with_lora<B: Backend>(
    l: &Linear<B>,
    lora: &Option<Lora<B>>,
    x: Tensor<B, 3>,
    p: Precision,
) -> Tensor<B, 3> {
    match lora {
        Some(a) => to_f32(linear(l, x.clone(), p)) + a.forward(x),
        None => linear(l, x, p),
    }
}

impl<B: Backend> Attention<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let p = self.precision;
        // [B, N, 3D]: each token's Q, K and V, heads side by side.
        let qkv = with_lora(&self.qkv, &self.qkv_lora, x, p);
        let qkv = match p {
            Precision::Bf16 if !bf16_in_gemm::<B>() => qkv.cast(FloatDType::BF16),
            _ => qkv,
        };
        // Fused in the forward pass also when training (see `crate::attention`); [B, N, D].
        let bf16 = p == Precision::Bf16 && bf16_in_gemm::<B>();
        let out = attention(qkv, self.num_heads, bf16);
        to_f32(with_lora(&self.proj, &self.proj_lora, out, p))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    /// [`Ffn::SwiGlu`]: fc1 holds the SiLU half first, then the linear half.
    pub swiglu: bool,
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let p = self.precision;
        if let (Some(b1), Some(b2), false) = (&self.fc1.bias, &self.fc2.bias, self.swiglu) {
            if p == Precision::Bf16 && bf16_in_gemm::<B>() {
                let [batch, n, d] = x.dims();
                let (w1, w2) = (self.fc1.weight.val(), self.fc2.weight.val());
                let y = crate::mlp::mlp_bf16(x.reshape([batch * n, d]), w1, b1.val(), w2, b2.val());
                let d_out = y.dims()[1];
                return y.reshape([batch, n, d_out]);
            }
        }
        // The activation in f32 (on GPU the casts fuse into its kernel).
        let h = to_f32(linear(&self.fc1, x, p));
        let h = if self.swiglu {
            let half = h.dims()[2] / 2;
            silu(h.clone().narrow(2, 0, half)) * h.narrow(2, half, half)
        } else {
            gelu(h)
        };
        to_f32(linear(&self.fc2, h, p))
    }
}

/// Per-channel residual scaling (Touvron et al. 2021, CaiT).
#[derive(Module, Debug)]
pub struct LayerScale<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub ls1: Option<LayerScale<B>>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub ls2: Option<LayerScale<B>>,
    pub drop_path: f64,
    /// ε of `norm1` and `norm2` (burn's `LayerNorm` keeps its own private).
    pub norm_eps: f64,
}

impl<B: Backend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 3>, training: bool) -> Tensor<B, 3> {
        let gamma = |ls: &Option<LayerScale<B>>| ls.as_ref().map(|ls| ls.gamma.val());
        let norm = |ln, x| layer_norm(x, ln, self.norm_eps);
        // drop_path(γ·y) = γ·drop_path(y): the mask goes on y, so that x + γ·y stays one op.
        let y = self.attn.forward(norm(&self.norm1, x.clone()));
        let x = residual(x, self.drop_path(y, training), gamma(&self.ls1));
        let y = self.mlp.forward(norm(&self.norm2, x.clone()));
        residual(x, self.drop_path(y, training), gamma(&self.ls2))
    }

    /// Stochastic depth (Huang et al. 2016): drop the whole residual of a sample with
    /// probability p, rescale survivors by 1/(1-p).
    fn drop_path(&self, y: Tensor<B, 3>, training: bool) -> Tensor<B, 3> {
        if !training || self.drop_path <= 0.0 {
            return y;
        }
        let keep = 1.0 - self.drop_path;
        let [b, _, _] = y.dims();
        let mask = Tensor::<B, 3>::random([b, 1, 1], Distribution::Bernoulli(keep), &y.device());
        y * mask / keep
    }
}

/// What the encoder returns for a batch of B images with an h×w patch grid.
#[derive(Debug, Clone)]
pub struct VitOutput<B: Backend> {
    /// Final-norm class token, [B, D].
    pub cls: Tensor<B, 2>,
    /// Final-norm patch tokens, [B, h·w, D], row-major over the grid.
    pub patches: Tensor<B, 3>,
    /// Final-norm register tokens, [B, R, D], when the model has registers.
    pub registers: Option<Tensor<B, 3>>,
    /// Raw outputs of the requested blocks (before the final norm), all tokens, [B, 1+R+h·w, D].
    pub intermediates: Vec<Tensor<B, 3>>,
    pub grid: [usize; 2],
}

#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub cls_token: Param<Tensor<B, 3>>,
    pub reg_token: Option<Param<Tensor<B, 3>>>,
    pub pos_embed: Param<Tensor<B, 3>>,
    /// Replaces masked patch embeddings in iBOT pretraining; unused at inference.
    pub mask_token: Param<Tensor<B, 2>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    /// ε of `norm`.
    pub norm_eps: f64,
    pub patch_size: usize,
    pub num_registers: usize,
    pub pos_interp: PosInterp,
}

/// Keys' cubic convolution kernel with parameter `a`.
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Row-major [n_out, n_in] weights of PyTorch's 1-D bicubic resampling with
/// `align_corners=False` and input-per-output `scale`: without antialiasing (`upsample_bicubic2d`: a = -0.75, 4 taps,
/// indices clamped at the edges) or with it (`_upsample_bicubic2d_aa`, PIL's algorithm:
/// a = -0.5, support widened when down-sampling, weights renormalised over valid taps).
fn bicubic_weights(n_in: usize, n_out: usize, scale: f64, antialias: bool) -> Vec<f32> {
    let mut w = vec![0f64; n_out * n_in];
    for i in 0..n_out {
        let row = &mut w[i * n_in..(i + 1) * n_in];
        if antialias {
            let center = scale * (i as f64 + 0.5);
            let support = 2.0 * scale.max(1.0);
            let inv = 1.0 / scale.max(1.0);
            let lo = ((center - support + 0.5) as isize).max(0) as usize;
            let hi = ((center + support + 0.5) as isize).min(n_in as isize) as usize;
            for (j, v) in row.iter_mut().enumerate().take(hi).skip(lo) {
                *v = cubic((j as f64 - center + 0.5) * inv, -0.5);
            }
            let total: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= total);
        } else {
            let src = (i as f64 + 0.5) * scale - 0.5;
            let x0 = src.floor();
            let t = src - x0;
            for k in -1..=2isize {
                let j = (x0 as isize + k).clamp(0, n_in as isize - 1) as usize;
                row[j] += cubic(t - k as f64, -0.75);
            }
        }
    }
    w.into_iter().map(|v| v as f32).collect()
}

impl<B: Backend> Vit<B> {
    pub fn embed_dim(&self) -> usize {
        self.cls_token.dims()[2]
    }

    /// Position table for an h×w grid: the stored table, bicubically resized when the grid
    /// differs from the one it was trained for (timm `resample_abs_pos_embed`).
    pub fn pos_embed_for(&self, h: usize, w: usize) -> Tensor<B, 3> {
        let pos = self.pos_embed.val();
        let [_, n, d] = pos.dims();
        let g = ((n - 1) as f64).sqrt().round() as usize;
        if g * g != n - 1 {
            // Non-square tables only come from imports; they are checked there.
            panic!("position table of {} patches is not a square grid", n - 1);
        }
        if (h, w) == (g, g) {
            return pos;
        }
        let cls_pos = pos.clone().narrow(1, 0, 1);
        let grid = pos.narrow(1, 1, n - 1);
        // Separable resampling as two matmuls with host-computed weights [out, in]: exact
        // PyTorch semantics on every backend, and differentiable.
        let dev = grid.device();
        let weights = |n: usize| {
            let (scale, aa) = match self.pos_interp {
                PosInterp::Bicubic => (g as f64 / n as f64, false),
                PosInterp::BicubicAntialias => (g as f64 / n as f64, true),
                PosInterp::BicubicDinov2Offset => (g as f64 / (n as f64 + 0.1), false),
            };
            Tensor::<B, 2>::from_data(
                TensorData::new(bicubic_weights(g, n, scale, aa), [n, g]),
                &dev,
            )
        };
        let (wy, wx) = (weights(h), weights(w));
        let y = wy
            .matmul(grid.reshape([g, g * d]))
            .reshape([h, g, d])
            .swap_dims(0, 1)
            .reshape([g, h * d]);
        let grid = wx
            .matmul(y)
            .reshape([w, h, d])
            .swap_dims(0, 1)
            .reshape([1, h * w, d]);
        Tensor::cat(vec![cls_pos, grid], 1)
    }

    /// Token sequence before the first block: `[cls | registers | patches] + pos` (registers get no
    /// position). `mask` ([B, h·w], 1 = masked) swaps patch embeddings for the mask token.
    pub fn prepare_tokens(
        &self,
        x: Tensor<B, 4>,
        mask: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, [usize; 2]) {
        let [b, _, ih, iw] = x.dims();
        let (h, w) = (ih / self.patch_size, iw / self.patch_size);
        let d = self.embed_dim();
        let patches = self.patch_embed.forward(x);
        let patches = match mask {
            Some(m) => {
                let m = m.unsqueeze_dim::<3>(2);
                let tok = self.mask_token.val().unsqueeze::<3>();
                patches.clone() * (m.clone().neg() + 1.0) + tok * m
            }
            None => patches,
        };
        let cls = self.cls_token.val().expand([b, 1, d]);
        // Added as [B, N·D] + [1, N·D]: burn-flex adds a broadcast row with SIMD but walks
        // [B, N, D] + [1, N, D] element by element (2 % of a bf16 inference step).
        let n = 1 + h * w;
        let x = Tensor::cat(vec![cls, patches], 1).reshape([b, n * d])
            + self.pos_embed_for(h, w).reshape([1, n * d]);
        let x = x.reshape([b, n, d]);
        let x = match &self.reg_token {
            Some(reg) => {
                let r = self.num_registers;
                let cls = x.clone().narrow(1, 0, 1);
                let rest = x.clone().narrow(1, 1, h * w);
                Tensor::cat(vec![cls, reg.val().expand([b, r, d]), rest], 1)
            }
            None => x,
        };
        (x, [h, w])
    }

    /// Full forward. `layers` picks blocks (0-based) whose raw outputs are kept.
    pub fn forward_features(
        &self,
        x: Tensor<B, 4>,
        mask: Option<Tensor<B, 2>>,
        layers: &[usize],
        training: bool,
    ) -> VitOutput<B> {
        let (mut x, grid) = self.prepare_tokens(x, mask);
        let mut intermediates = Vec::with_capacity(layers.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, training);
            if layers.contains(&i) {
                intermediates.push(x.clone());
            }
        }
        let x = layer_norm(x, &self.norm, self.norm_eps);
        let [b, n, d] = x.dims();
        let r = self.num_registers;
        VitOutput {
            cls: x.clone().narrow(1, 0, 1).reshape([b, d]),
            registers: (r > 0).then(|| x.clone().narrow(1, 1, r)),
            patches: x.narrow(1, 1 + r, n - 1 - r),
            intermediates,
            grid,
        }
    }

    /// Adds LoRA adapters of rank `rank` to every attention qkv and output projection.
    pub fn add_lora(mut self, rank: usize, alpha: f64, dropout: f64, device: &B::Device) -> Self {
        for b in &mut self.blocks {
            let (i, o) = (b.attn.qkv.weight.dims()[0], b.attn.qkv.weight.dims()[1]);
            b.attn.qkv_lora = Some(Lora::new(i, o, rank, alpha, dropout, device));
            let (i, o) = (b.attn.proj.weight.dims()[0], b.attn.proj.weight.dims()[1]);
            b.attn.proj_lora = Some(Lora::new(i, o, rank, alpha, dropout, device));
        }
        self
    }

    /// Runs the blocks' matmuls and attention in `p` (parameters stay f32).
    pub fn with_precision(mut self, p: Precision) -> Self {
        if p == Precision::Bf16 && bf16_in_gemm::<B>() && !crate::cpu_gemm::native_bf16() {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| {
                eprintln!(
                    "note: this CPU has no AVX-512 BF16, so bf16 products are widened to f32 \
                     inside the GEMM and run slower than f32 (BENCHMARKS.md: about 0.9×)"
                )
            });
        }
        for b in &mut self.blocks {
            b.attn.precision = p;
            b.mlp.precision = p;
        }
        self
    }

    /// Folds every adapter into its linear: the same function as a plain ViT.
    pub fn merge_lora(mut self) -> Self {
        for b in &mut self.blocks {
            if let Some(a) = b.attn.qkv_lora.take() {
                b.attn.qkv = a.merge_into(b.attn.qkv.clone());
            }
            if let Some(a) = b.attn.proj_lora.take() {
                b.attn.proj = a.merge_into(b.attn.proj.clone());
            }
        }
        self
    }

    /// Inference forward: class tokens [B, D].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_features(x, None, &[], false).cls
    }
}
