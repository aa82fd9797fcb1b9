//! DINO projection head (Caron et al. 2021; DINOv2 `dinov2/layers/dino_head.py`).
//!
//! ```text
//! x ─ Linear(D→hidden) ─ GELU ─ … ─ Linear(→bottleneck) ─ ℓ2-normalise ─ WeightNormLinear(→K) ─ logits
//! WeightNormLinear(z) = z · (g ⊙ v / ‖v‖_row)ᵀ        (no bias; g starts at 1)
//! ```
//! Parameter names follow DINOv2 (`mlp.{i}`, `last_layer.weight_g`, `last_layer.weight_v`), with
//! `mlp` indices counting linears only (PyTorch's Sequential also counts the GELUs: 0, 2, 4).

use crate::gelu::gelu;
use crate::Precision;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DinoHeadConfig {
    pub in_dim: usize,
    /// Number of prototypes K (DINOv2: 65 536 for ViT-S/B, 131 072 for ViT-L/g).
    pub out_dim: usize,
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
    /// Linear layers before the bottleneck output (DINOv2: 3).
    pub nlayers: usize,
}

impl DinoHeadConfig {
    /// DINOv2's head sizes for an encoder of width `in_dim`.
    pub fn dinov2(in_dim: usize) -> Self {
        Self {
            in_dim,
            out_dim: 65_536,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
        }
    }

    /// Number of weights [`DinoHeadConfig::init`] makes (as f64: see `VitConfig::num_params`).
    pub fn num_params(&self) -> f64 {
        let [i, h, b, k] = [
            self.in_dim,
            self.hidden_dim,
            self.bottleneck_dim,
            self.out_dim,
        ]
        .map(|v| v as f64);
        let mlp = match self.nlayers.max(1) {
            1 => i * b + b,
            n => (i * h + h) + (n - 2) as f64 * (h * h + h) + (h * b + b),
        };
        mlp + k * b + k // the weight-normed prototypes: direction and gain
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> DinoHead<B> {
        let dims: Vec<usize> = match self.nlayers.max(1) {
            1 => vec![self.in_dim, self.bottleneck_dim],
            n => std::iter::once(self.in_dim)
                .chain(std::iter::repeat_n(self.hidden_dim, n - 1))
                .chain(std::iter::once(self.bottleneck_dim))
                .collect(),
        };
        let mlp = dims
            .windows(2)
            .map(|io| {
                let mut l = LinearConfig::new(io[0], io[1])
                    .with_initializer(Initializer::Normal {
                        mean: 0.0,
                        std: 0.02,
                    })
                    .init(device);
                l.bias = Some(Param::from_tensor(Tensor::zeros([io[1]], device)));
                l
            })
            .collect();
        DinoHead {
            mlp,
            last_layer: WeightNormLinear {
                weight_g: Param::from_tensor(Tensor::ones([self.out_dim, 1], device)),
                weight_v: Param::from_tensor(Tensor::random(
                    [self.out_dim, self.bottleneck_dim],
                    Distribution::Normal(0.0, 0.02),
                    device,
                )),
            },
            precision: Precision::F32,
        }
    }
}

/// `torch.nn.utils.weight_norm(Linear(in, out, bias=False))`: weight = g · v / ‖v‖ per output row.
/// `weight_v` is stored as PyTorch stores it, [out, in].
#[derive(Module, Debug)]
pub struct WeightNormLinear<B: Backend> {
    pub weight_g: Param<Tensor<B, 2>>,
    pub weight_v: Param<Tensor<B, 2>>,
}

impl<B: Backend> WeightNormLinear<B> {
    pub fn weight(&self) -> Tensor<B, 2> {
        crate::weight_norm::weight(self.weight_g.val(), self.weight_v.val())
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        crate::weight_norm::weight_norm_linear(x, self.weight_g.val(), self.weight_v.val())
    }
}

#[derive(Module, Debug)]
pub struct DinoHead<B: Backend> {
    pub mlp: Vec<Linear<B>>,
    pub last_layer: WeightNormLinear<B>,
    /// Of the linears' products; GELU, the ℓ2 normalisation and the weight norm stay f32.
    #[module(skip)]
    pub precision: Precision,
}

/// `F.normalize(x, dim=-1, eps)`: x / max(‖x‖, eps).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(eps);
    x / norm
}

impl<B: Backend> DinoHead<B> {
    /// Prototype logits [N, K] for N token vectors [N, D].
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let n = self.mlp.len();
        let mut x = x;
        for (i, l) in self.mlp.iter().enumerate() {
            x = match (&l.bias, self.precision) {
                (Some(b), Precision::F32) => crate::linear::linear(x, l.weight.val(), b.val()),
                (Some(b), Precision::Bf16) => {
                    crate::linear::linear_bf16(x, l.weight.val(), b.val())
                }
                (None, _) => l.forward(x),
            };
            if i + 1 < n {
                x = gelu(x);
            }
        }
        let z = l2_normalize(x, 1e-12);
        let (g, v) = (
            self.last_layer.weight_g.val(),
            self.last_layer.weight_v.val(),
        );
        match self.precision {
            Precision::F32 => crate::weight_norm::weight_norm_linear(z, g, v),
            Precision::Bf16 => crate::weight_norm::weight_norm_linear_bf16(z, g, v),
        }
    }

    /// Runs the linears' products in `p` (parameters stay f32).
    pub fn with_precision(mut self, p: Precision) -> Self {
        self.precision = p;
        self
    }

    pub fn out_dim(&self) -> usize {
        self.last_layer.weight_v.dims()[0]
    }
}
