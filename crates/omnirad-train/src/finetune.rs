//! Full fine-tuning of a ViT with a linear head: the OmniRad classification recipe (AdamW,
//! warm-up + cosine, gradient clipping, augmentation, selection on the val split) with DINOv2's
//! layer-wise LR decay.
//!
//! Loss: single-label — cross-entropy with label smoothing ε,
//!   L = −(1/N) Σ_i Σ_c q_ic · log softmax(z_i)_c,   q_ic = (1 − ε)·[c = y_i] + ε/C;
//! multi-label — binary cross-entropy with logits, L = (1/(N·C)) Σ softplus(z) − y·z.
//!
//! Class-balanced (`class_weight = balanced`, for sets where the class that matters is rare):
//! single-label — class weights w_c = N / (C·n_c) (scikit-learn's "balanced"), and
//!   L = Σ_i s_i·CE_i / Σ_i s_i,   s_i = Σ_c w_c·y_ic,
//! CE_i the smoothed cross-entropy above and s_i the weight of image i's class (blended like its
//! target under mixup). With ε = 0 this is PyTorch's `cross_entropy(z, y, weight=w)`; PyTorch
//! would also weight the smoothing term per class, which here stays uniform.
//! multi-label — positive weights p_c = n_neg,c / n_pos,c (PyTorch's `BCEWithLogitsLoss(pos_weight)`),
//!   L = (1/(N·C)) Σ p·y·softplus(−z) + (1 − y)·softplus(z).
//!
//! Mixup (Zhang et al. 2018, timm's batch mode): with λ ~ Beta(α, α) drawn per batch, image k is
//! blended with image n−1−k of the same batch, x̃_k = λ·x_k + (1 − λ)·x_{n−1−k}, and its target
//! row the same way, ỹ_k = λ·y_k + (1 − λ)·y_{n−1−k}, before smoothing.

use std::path::Path;

use burn::module::{AutodiffModule, Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::optim::GradientsParams;
use burn::tensor::activation::{log_softmax, sigmoid, softmax, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use ndarray::{Array2, Array3, ArrayView2};
use omnirad_data::augment::{sample_rng, Augment};
use omnirad_data::preprocess::{normalize, to_channels};
use omnirad_data::{ImageSource, Preprocess};
use omnirad_eval::{evaluate, Metrics, TaskKind};
use omnirad_model::{
    BalancedCheckpointing, CheckpointStrategy, ModelError, NoCheckpointing, Precision, Train, Vit,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, Anchor, StepSettings};
use crate::params;
use crate::pretrain::param_group;
use crate::schedule::Cosine;
use crate::state_file::{StateReader, StateWriter};

/// What the val split is scored by when choosing the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    MacroF1,
    Acc,
    Auc,
    Loss,
}

impl Selection {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "macro-f1" | "f1" => Ok(Self::MacroF1),
            "acc" => Ok(Self::Acc),
            "auc" => Ok(Self::Auc),
            "loss" => Ok(Self::Loss),
            _ => Err(format!(
                "unknown selection '{s}' (macro-f1, acc, auc, loss)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::MacroF1 => "macro-F1",
            Self::Acc => "ACC",
            Self::Auc => "AUC",
            Self::Loss => "loss",
        }
    }

    /// Higher is better.
    pub fn score(self, m: &Metrics, loss: f64) -> f64 {
        match self {
            Self::MacroF1 => m.macro_f1,
            Self::Acc => m.acc,
            Self::Auc => m.auc,
            Self::Loss => -loss,
        }
    }
}

/// How the training loss weights the classes (module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassWeight {
    /// Every image counts the same.
    #[default]
    None,
    /// Every class counts the same (multi-label: positives as much as negatives, per label).
    Balanced,
}

impl ClassWeight {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "balanced" => Ok(Self::Balanced),
            _ => Err(format!("unknown class weighting '{s}' (none, balanced)")),
        }
    }
}

/// The training views' augmentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Views {
    /// OmniRad's: [`Augment::finetune`].
    #[default]
    Mild,
    /// [`Augment::finetune_strong`].
    Strong,
}

impl Views {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "mild" => Ok(Self::Mild),
            "strong" => Ok(Self::Strong),
            _ => Err(format!("unknown augmentation '{s}' (mild, strong)")),
        }
    }

    pub fn augment(self, size: usize) -> Augment {
        match self {
            Self::Mild => Augment::finetune(size),
            Self::Strong => Augment::finetune_strong(size),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    /// Train for at least this many optimizer steps: on a small set the epochs rise to
    /// ⌈min_steps / steps per epoch⌉ (BreastMNIST's 546 images give 9 steps an epoch, and 20
    /// epochs of them left it under-trained; BENCHMARKS.md). 0 = exactly `epochs`.
    #[serde(default)]
    pub min_steps: usize,
    pub batch: usize,
    /// Peak learning rate (after warm-up), for the head and the last block.
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    /// LR × decay^(depth + 1 − layer): lower layers move less.
    pub layer_decay: f64,
    pub drop_path: f64,
    /// Dropout before the head (OmniRad: 0.4).
    pub dropout: f64,
    pub label_smoothing: f64,
    #[serde(default)]
    pub class_weight: ClassWeight,
    #[serde(default)]
    pub views: Views,
    /// Global gradient-norm limit; 0 disables.
    pub clip: f64,
    /// Head on the class token alone, or on [class token, mean patch token] (DINOv2's linear).
    pub cls_mean: bool,
    pub select: Selection,
    pub seed: u64,
    /// Train LoRA adapters on attention qkv/proj (and the head) instead of the whole encoder.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Train the head alone on the frozen encoder (a probe that sees augmented images).
    #[serde(default)]
    pub frozen: bool,
    /// The encoder's matmul/attention precision; weights and optimizer state stay f32.
    #[serde(default)]
    pub precision: Precision,
    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// ([`omnirad_model::BalancedCheckpointing`]): same gradients, less memory, a little slower.
    #[serde(default)]
    pub grad_checkpoint: bool,
    /// LP-FT (Kumar et al. 2022): train the head alone on the frozen encoder for this many
    /// epochs first, so full fine-tuning starts from a fitted head instead of a random one whose
    /// large early gradients distort the pretrained features. 0 = plain fine-tuning.
    #[serde(default)]
    pub head_epochs: usize,
    /// Score, select and return an exponential moving average of the weights with this decay
    /// per step (timm's model EMA, with its warm-up: decay min(d, (1 + t)/(10 + t)) at step t).
    /// A smoother model than the last step's weights (on BreastMNIST it did not score better
    /// with 0.995; BENCHMARKS.md). None = off.
    #[serde(default)]
    pub ema: Option<f64>,
    /// Mixup's α (module doc); 0 = off.
    #[serde(default)]
    pub mixup: f64,
    /// Score val/test (and `omnirad predict`) on the mean of the probabilities for the image and
    /// its left–right mirror (the training views are mirrored half the time).
    #[serde(default)]
    pub tta: bool,
    /// SAM's neighbourhood radius ρ ([`crate::sam`]): each step's gradient is taken at
    /// θ + ρ·g/‖g‖ (twice the training compute). None = plain steps.
    #[serde(default)]
    pub sam: Option<f64>,
    /// After training, interpolate the head with a k-NN vote over the training set's features,
    /// λ chosen on val ([`crate::knn_mix`]).
    #[serde(default)]
    pub knn_mix: bool,
    /// L2-SP ([`crate::optim::Anchor`]): the encoder's weights decay toward their pretrained
    /// values with this strength, in place of `weight_decay` toward zero. None = off.
    #[serde(default)]
    pub l2sp: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl Default for LoraConfig {
    /// OmniRad's PEFT settings.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.1,
        }
    }
}

/// BreastMNIST fine-tuned best with about 1800 steps (200 epochs of 9; BENCHMARKS.md). At the
/// default batch of 64, sets of 5760 images and more keep their 20 epochs (PneumoniaMNIST's 4708
/// get 25).
pub const DEFAULT_MIN_STEPS: usize = 1800;

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            min_steps: DEFAULT_MIN_STEPS,
            batch: 64,
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 2,
            weight_decay: 0.05,
            layer_decay: 0.75,
            drop_path: 0.1,
            dropout: 0.0,
            label_smoothing: 0.1,
            class_weight: ClassWeight::None,
            views: Views::Mild,
            clip: 1.0,
            cls_mean: false,
            select: Selection::MacroF1,
            seed: 0,
            lora: None,
            frozen: false,
            precision: Precision::F32,
            grad_checkpoint: false,
            head_epochs: 0,
            ema: None,
            mixup: 0.0,
            tta: false,
            sam: None,
            knn_mix: false,
            l2sp: None,
        }
    }
}

impl FinetuneConfig {
    /// Epochs the user chose are run exactly (no step floor); None keeps the defaults.
    pub fn set_epochs(&mut self, epochs: Option<usize>) {
        if let Some(e) = epochs {
            self.epochs = e;
            self.min_steps = 0;
        }
    }

    /// The epochs a training set of `n` images gets: `epochs`, or more when they would make
    /// fewer than `min_steps` optimizer steps.
    pub fn epochs_for(&self, n: usize) -> usize {
        let steps_per_epoch = n.div_ceil(self.batch.max(1)).max(1);
        self.epochs.max(self.min_steps.div_ceil(steps_per_epoch))
    }
}

/// Encoder + linear head.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub backbone: Vit<B>,
    pub head: Linear<B>,
    pub dropout: Dropout,
    pub cls_mean: bool,
}

impl<B: Backend> Classifier<B> {
    /// Head weights drawn from `seed` (PyTorch's U(±1/√D)), zero bias.
    pub fn new(
        backbone: Vit<B>,
        classes: usize,
        cls_mean: bool,
        dropout: f64,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        let d = backbone.embed_dim() * if cls_mean { 2 } else { 1 };
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4845_4144);
        let bound = 1.0 / (d as f32).sqrt();
        let w: Vec<f32> = (0..d * classes)
            .map(|_| rng.random_range(-bound..=bound))
            .collect();
        Self {
            backbone,
            head: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(w, [d, classes]),
                    device,
                )),
                bias: Some(Param::from_tensor(Tensor::zeros([classes], device))),
            },
            dropout: DropoutConfig::new(dropout).init(),
            cls_mean,
        }
    }

    pub fn features(&self, x: Tensor<B, 4>, training: bool) -> Tensor<B, 2> {
        let out = self.backbone.forward_features(x, None, &[], training);
        if self.cls_mean {
            Tensor::cat(
                vec![out.cls, out.patches.mean_dim(1).squeeze_dim::<2>(1)],
                1,
            )
        } else {
            out.cls
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, training: bool) -> Tensor<B, 2> {
        let f = self.features(x, training);
        let f = if training { self.dropout.forward(f) } else { f };
        self.head.forward(f)
    }

    /// Class probabilities (softmax, or sigmoid per label) for `x`.
    pub fn probabilities(&self, x: Tensor<B, 4>, multi_label: bool) -> Tensor<B, 2> {
        self.head_probabilities(self.features(x, false), multi_label)
    }

    /// [`Self::probabilities`] of images whose features are `f` (eval mode: no dropout).
    fn head_probabilities(&self, f: Tensor<B, 2>, multi_label: bool) -> Tensor<B, 2> {
        let z = self.head.forward(f);
        if multi_label {
            sigmoid(z)
        } else {
            softmax(z, 1)
        }
    }
}

/// A split in memory: images and labels [N, 1] (class ids) or [N, C] (0/1 flags).
#[derive(Clone, Copy)]
pub struct LabelledImages<'a> {
    pub images: &'a dyn ImageSource,
    pub labels: ArrayView2<'a, i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val: Metrics,
    pub lr: f64,
}

pub struct FinetuneResult<B: Backend> {
    /// The model at the selected epoch (LoRA adapters merged into the encoder).
    pub model: Classifier<B>,
    /// 1-based.
    pub best_epoch: usize,
    pub val: Metrics,
    pub history: Vec<EpochLog>,
}

/// The training loss of the module doc, a scalar `[1]`; `y` one-hot (single-label) or 0/1 flags;
/// `weights` `[C]` the class weights w (single-label) or positive weights p (multi-label), None
/// for all ones.
pub fn classification_loss<B: Backend>(
    z: Tensor<B, 2>,
    y: Tensor<B, 2>,
    multi: bool,
    smoothing: f64,
    weights: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let weights = weights.map(|w| w.unsqueeze_dim::<2>(0));
    if multi {
        let bce = softplus(z.clone(), 1.0) - y.clone() * z.clone();
        match weights {
            None => bce.mean(),
            // p·y·softplus(−z) + (1 − y)·softplus(z) = bce + (p − 1)·y·softplus(−z).
            Some(p) => (bce + y * softplus(z.neg(), 1.0) * (p - 1.0)).mean(),
        }
    } else {
        let c = z.dims()[1] as f64;
        let q = y.clone() * (1.0 - smoothing) + smoothing / c;
        let ce = (log_softmax(z, 1) * q).sum_dim(1).neg();
        match weights {
            None => ce.mean(),
            Some(w) => {
                let s = (y * w).sum_dim(1);
                (ce * s.clone()).sum() / s.sum()
            }
        }
    }
}

/// The class weights of the module doc, from the training labels ([N, 1] class ids or [N, C]
/// flags). A class (or label side) with no training images gets weight 1: it never appears in
/// a target, so its weight is never used.
pub fn class_weights(labels: ArrayView2<i64>, classes: usize, multi: bool) -> Vec<f32> {
    let n = labels.nrows();
    if multi {
        (0..classes)
            .map(|c| {
                let pos = labels.column(c).iter().filter(|&&v| v == 1).count();
                if pos == 0 || pos == n {
                    1.0
                } else {
                    (n - pos) as f32 / pos as f32
                }
            })
            .collect()
    } else {
        let mut counts = vec![0usize; classes];
        for &y in labels.column(0) {
            if let Some(k) = usize::try_from(y).ok().and_then(|y| counts.get_mut(y)) {
                *k += 1;
            }
        }
        counts
            .iter()
            .map(|&k| match k {
                0 => 1.0,
                k => n as f32 / (classes * k) as f32,
            })
            .collect()
    }
}

/// Target rows [n, classes]: one-hot class ids, or the 0/1 flags of multi-label sets.
fn targets(labels: ArrayView2<i64>, idx: &[usize], classes: usize, multi: bool) -> Array2<f32> {
    Array2::from_shape_fn((idx.len(), classes), |(k, c)| {
        let i = idx[k];
        let hit = if multi {
            labels[[i, c]] == 1
        } else {
            labels[[i, 0]] == c as i64
        };
        hit as u8 as f32
    })
}

/// Mixup of the module doc, in place: row k of `x` and `y` becomes λ·row k + (1 − λ)·row n−1−k.
fn mixup(x: &mut [Array3<f32>], y: &mut Array2<f32>, lambda: f32) {
    let (x0, y0) = (x.to_vec(), y.clone());
    let blend = |a: &mut f32, &b: &f32| *a = lambda * *a + (1.0 - lambda) * b;
    for (k, xk) in x.iter_mut().enumerate() {
        let j = x0.len() - 1 - k;
        xk.zip_mut_with(&x0[j], blend);
        y.row_mut(k).zip_mut_with(&y0.row(j), blend);
    }
}

/// A host batch [N, C, H, W] from N equally sized [C, H, W] arrays.
pub(crate) fn batch_tensor<B: Backend>(
    arrays: Vec<ndarray::Array3<f32>>,
    dev: &B::Device,
) -> Tensor<B, 4> {
    let (c, h, w) = arrays[0].dim();
    let n = arrays.len();
    let v: Vec<f32> = arrays.into_iter().flat_map(|a| a.into_iter()).collect();
    Tensor::from_data(TensorData::new(v, [n, c, h, w]), dev)
}

/// Cross-entropy of predicted probabilities (BCE averaged over labels for multi-label), as a
/// model-selection score: `−(1/N) Σ_i log p_i[y_i]`, probabilities clamped to `[1e-7, 1 − 1e-7]`.
pub fn probability_loss(scores: ArrayView2<f64>, labels: ArrayView2<i64>, multi: bool) -> f64 {
    let (n, c) = scores.dim();
    let p = |i: usize, j: usize| scores[[i, j]].clamp(1e-7, 1.0 - 1e-7);
    let total: f64 = if multi {
        (0..n)
            .flat_map(|i| (0..c).map(move |j| (i, j)))
            .map(|(i, j)| {
                if labels[[i, j]] == 1 {
                    -p(i, j).ln()
                } else {
                    -(1.0 - p(i, j)).ln()
                }
            })
            .sum::<f64>()
            / c as f64
    } else {
        (0..n).map(|i| -p(i, labels[[i, 0]] as usize).ln()).sum()
    };
    total / n as f64
}

/// Class probabilities [N, C] for `images` (resized and normalised by `pre`), averaged over
/// `models` (one model, or an ensemble's members: each batch is preprocessed once for all); with
/// `tta`, the mean over each image and its left–right mirror.
pub fn predict<B: Backend>(
    models: &[Classifier<B>],
    images: &dyn ImageSource,
    pre: &Preprocess,
    multi: bool,
    batch: usize,
    tta: bool,
    dev: &B::Device,
) -> Array2<f64> {
    stack(&per_batch(images, pre, batch, dev, |x| {
        batch_probabilities(models, x, multi, tta)
    }))
}

/// [`predict`], and each model's [`features`] of `images`, from one forward pass per batch.
pub fn predict_and_features<B: Backend>(
    models: &[Classifier<B>],
    images: &dyn ImageSource,
    pre: &Preprocess,
    multi: bool,
    batch: usize,
    tta: bool,
    dev: &B::Device,
) -> (Array2<f64>, Vec<Array2<f32>>) {
    let parts = per_batch(images, pre, batch, dev, |x| {
        batch_probabilities_and_features(models, x, multi, tta)
    });
    let mut probabilities = Vec::new();
    let mut features = vec![Vec::new(); models.len()];
    for (p, per_model) in parts {
        probabilities.push(p);
        for (f, part) in features.iter_mut().zip(per_model) {
            f.push(part);
        }
    }
    (
        stack(&probabilities),
        features.iter().map(|f| stack(f)).collect(),
    )
}

/// The encoder features [N, D] `model` classifies `images` by (its pooling, eval mode).
pub fn features<B: Backend>(
    model: &Classifier<B>,
    images: &dyn ImageSource,
    pre: &Preprocess,
    batch: usize,
    dev: &B::Device,
) -> Array2<f32> {
    stack(&per_batch(images, pre, batch, dev, |x| {
        batch_features(model, x)
    }))
}

/// `f` of each model-ready batch of `images` (decoded in parallel), in order.
fn per_batch<B: Backend, T>(
    images: &dyn ImageSource,
    pre: &Preprocess,
    batch: usize,
    dev: &B::Device,
    mut f: impl FnMut(Tensor<B, 4>) -> T,
) -> Vec<T> {
    let n = images.len();
    (0..n)
        .step_by(batch.max(1))
        .map(|lo| {
            let arrays: Vec<_> = (lo..n.min(lo + batch.max(1)))
                .into_par_iter()
                .map(|i| pre.apply(&images.image(i)))
                .collect();
            f(batch_tensor::<B>(arrays, dev))
        })
        .collect()
}

/// Per-batch rows stacked in order ([0, 0] when there are none).
fn stack<T: Clone>(parts: &[Array2<T>]) -> Array2<T> {
    if parts.is_empty() {
        return Array2::from_shape_vec((0, 0), Vec::new()).expect("empty");
    }
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    ndarray::concatenate(ndarray::Axis(0), &views).expect("batches of one width")
}

/// [`features`] of one model-ready batch `x` [N, C, H, W].
pub fn batch_features<B: Backend>(model: &Classifier<B>, x: Tensor<B, 4>) -> Array2<f32> {
    features_to_host(model.features(x, false))
}

fn features_to_host<B: Backend>(f: Tensor<B, 2>) -> Array2<f32> {
    let [n, d] = f.dims();
    let v = f.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    Array2::from_shape_vec((n, d), v).expect("n × features")
}

/// [`predict`] of one model-ready batch `x` [N, C, H, W]: class probabilities [N, classes].
pub fn batch_probabilities<B: Backend>(
    models: &[Classifier<B>],
    x: Tensor<B, 4>,
    multi: bool,
    tta: bool,
) -> Array2<f64> {
    classify(models, x, multi, tta, false).0
}

/// [`batch_probabilities`], and each model's features of `x` (as [`batch_features`]) from the
/// same forward pass.
pub fn batch_probabilities_and_features<B: Backend>(
    models: &[Classifier<B>],
    x: Tensor<B, 4>,
    multi: bool,
    tta: bool,
) -> (Array2<f64>, Vec<Array2<f32>>) {
    classify(models, x, multi, tta, true)
}

fn classify<B: Backend>(
    models: &[Classifier<B>],
    x: Tensor<B, 4>,
    multi: bool,
    tta: bool,
    keep_features: bool,
) -> (Array2<f64>, Vec<Array2<f32>>) {
    let host = |p: Tensor<B, 2>| p.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    let n = x.dims()[0];
    let mirrored = tta.then(|| x.clone().flip([3]));
    let mut sum: Vec<f64> = Vec::new();
    let mut features = Vec::new();
    for model in models {
        let f = model.features(x.clone(), false);
        if keep_features {
            features.push(features_to_host(f.clone()));
        }
        let mut p = host(model.head_probabilities(f, multi));
        if let Some(m) = &mirrored {
            let q = host(model.probabilities(m.clone(), multi));
            p.iter_mut().zip(q).for_each(|(a, b)| *a = 0.5 * (*a + b));
        }
        sum.resize(p.len(), 0.0);
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += f64::from(v));
    }
    let classes = sum.len() / n.max(1);
    let k = models.len() as f64;
    let p = Array2::from_shape_vec((n, classes), sum.into_iter().map(|s| s / k).collect())
        .expect("n × classes");
    (p, features)
}

/// The best epoch of a phase so far: its val metrics and model.
#[derive(Clone)]
pub struct FinetuneBest<B: Backend> {
    /// 1-based, numbered as the history numbers epochs (head-only epochs first).
    pub epoch: usize,
    pub val: Metrics,
    pub model: Classifier<B>,
}

/// Everything needed to continue a fine-tuning run after an epoch (what a checkpoint holds).
#[derive(Clone)]
pub struct FinetuneState<B: Backend> {
    /// In LP-FT's head-only phase (`cfg.head_epochs` > 0), whose epochs come first.
    pub head_phase: bool,
    /// Epochs completed in this phase.
    pub epoch: usize,
    /// Optimizer steps in this phase.
    pub step: usize,
    /// The weights being trained (LoRA adapters not merged).
    pub model: Classifier<B>,
    pub opt: AdamW<B>,
    /// The weight EMA (`cfg.ema`).
    pub average: Option<Classifier<B>>,
    pub best: Option<FinetuneBest<B>>,
    /// Every epoch so far, both phases.
    pub history: Vec<EpochLog>,
}

/// Where a phase starts: afresh after the `earlier` epochs, or from a saved state.
struct Start<B: Backend> {
    head_phase: bool,
    earlier: Vec<EpochLog>,
    resume: Option<FinetuneState<B>>,
}

/// Trains `model` on `train`, scoring `val` after every epoch; returns the model of the epoch
/// `cfg.select` likes best (among the full fine-tuning epochs when `cfg.head_epochs` > 0; the
/// history and epoch numbers include the head-only epochs). `augment` makes the training views;
/// `pre` the evaluation inputs (and the channel count / normalisation of the training views).
/// `resume` continues from a saved state exactly (order, views, dropout and mixup draws are
/// functions of seed, epoch and step). After every epoch `on_epoch` sees the log and the state;
/// returning false stops training there (then the result is None).
#[allow(clippy::too_many_arguments)]
pub fn finetune<B: Backend>(
    model: Classifier<B>,
    train: LabelledImages,
    val: LabelledImages,
    task: TaskKind,
    augment: &Augment,
    pre: &Preprocess,
    cfg: &FinetuneConfig,
    dev: &B::Device,
    resume: Option<FinetuneState<B>>,
    mut on_epoch: impl FnMut(&EpochLog, &FinetuneState<B>) -> bool,
) -> Option<FinetuneResult<B>> {
    let on_epoch: &mut dyn FnMut(&EpochLog, &FinetuneState<B>) -> bool = &mut on_epoch;
    let mut phase = |model, cfg: &FinetuneConfig, start| {
        if cfg.grad_checkpoint {
            finetune_with::<B, BalancedCheckpointing>(
                model, train, val, task, augment, pre, cfg, dev, start, on_epoch,
            )
        } else {
            finetune_with::<B, NoCheckpointing>(
                model, train, val, task, augment, pre, cfg, dev, start, on_epoch,
            )
        }
    };
    if cfg.head_epochs == 0 || cfg.frozen || cfg.lora.is_some() {
        let start = Start {
            head_phase: false,
            earlier: Vec::new(),
            resume,
        };
        return phase(model, cfg, start);
    }
    // Both phases draw order and views from `cfg.seed` (head epoch k and full epoch k see the
    // same views), so a run stays reproducible from its one seed.
    let full = FinetuneConfig {
        head_epochs: 0,
        ..cfg.clone()
    };
    let (model, start) = match resume {
        Some(s) if !s.head_phase => (
            model,
            Start {
                head_phase: false,
                earlier: Vec::new(),
                resume: Some(s),
            },
        ),
        resume => {
            let probe = FinetuneConfig {
                epochs: cfg.head_epochs,
                min_steps: 0,
                warmup_epochs: cfg.warmup_epochs.min(cfg.head_epochs),
                frozen: true,
                ..full.clone()
            };
            let start = Start {
                head_phase: true,
                earlier: Vec::new(),
                resume,
            };
            let first = phase(model, &probe, start)?;
            let start = Start {
                head_phase: false,
                earlier: first.history,
                resume: None,
            };
            (first.model, start)
        }
    };
    phase(model, &full, start)
}

/// One phase of [`finetune`] with the autodiff checkpointing strategy `C`.
#[allow(clippy::too_many_arguments)]
fn finetune_with<B: Backend, C: CheckpointStrategy>(
    model: Classifier<B>,
    train: LabelledImages,
    val: LabelledImages,
    task: TaskKind,
    augment: &Augment,
    pre: &Preprocess,
    cfg: &FinetuneConfig,
    dev: &B::Device,
    start: Start<B>,
    on_epoch: &mut dyn FnMut(&EpochLog, &FinetuneState<B>) -> bool,
) -> Option<FinetuneResult<B>> {
    let multi = task == TaskKind::MultiLabel;
    let classes = model.head.weight.dims()[1];
    let depth = model.backbone.blocks.len();
    // Epochs of an earlier phase come first in the numbering.
    let offset = match &start.resume {
        Some(s) => s.history.len() - s.epoch,
        None => start.earlier.len(),
    };
    // The weights this phase starts from (the pretrained encoder, also when resuming).
    let anchor = cfg.l2sp.map(|strength| Anchor {
        strength,
        values: params::collect(&model)
            .into_iter()
            .filter(|p| p.path.starts_with("backbone."))
            .map(|p| (p.path, p.value))
            .collect(),
    });
    let (mut model, done, mut step, mut opt, mut best, mut history, resumed_average) =
        match start.resume {
            Some(s) => (
                s.model, s.epoch, s.step, s.opt, s.best, s.history, s.average,
            ),
            None => {
                let mut model = model;
                if let Some(l) = &cfg.lora {
                    B::seed(dev, cfg.seed ^ 0x4c4f_5241);
                    model.backbone = model.backbone.add_lora(l.rank, l.alpha, l.dropout, dev);
                }
                let opt = AdamW::<B>::new(0.9, 0.999, 1e-8);
                (model, 0, 0, opt, None, start.earlier, None)
            }
        };
    opt.anchor = anchor;
    model.backbone = model.backbone.with_precision(cfg.precision);
    for b in &mut model.backbone.blocks {
        b.drop_path = if cfg.frozen { 0.0 } else { cfg.drop_path };
    }
    let mut student = Classifier::<Train<B, C>>::from_inner(model);
    student = if cfg.frozen {
        params::trainable_where(student, |p| p.starts_with("head."))
    } else if cfg.lora.is_some() {
        params::trainable_where(student, |p| p.contains("_lora.") || p.starts_with("head."))
    } else {
        params::trainable(student)
    };
    let steps_per_epoch = train.images.len().div_ceil(cfg.batch.max(1));
    let epochs = cfg.epochs_for(train.images.len());
    let total = epochs * steps_per_epoch;
    let lr = Cosine::new(cfg.lr, cfg.min_lr, total)
        .with_warmup((cfg.warmup_epochs * steps_per_epoch).min(total), 0.0);
    let group = |p: &str| param_group(p, depth, cfg.layer_decay, 1.0);
    let weights = (cfg.class_weight == ClassWeight::Balanced).then(|| {
        let w = class_weights(train.labels, classes, multi);
        Tensor::<Train<B, C>, 1>::from_data(TensorData::new(w, [classes]), dev)
    });
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..train.images.len()).collect();
    // Replay the shuffles of the epochs already done, so a resumed run sees the same batches.
    for _ in 0..done {
        order.shuffle(&mut rng);
    }
    let mut average = resumed_average.or_else(|| {
        cfg.ema.map(|_| {
            params::materialize(&student);
            student.valid()
        })
    });
    for epoch in done + 1..=epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(cfg.batch.max(1)) {
            let arrays: Vec<_> = chunk
                .par_iter()
                .map(|&i| {
                    let mut r = sample_rng(cfg.seed, epoch as u64, i as u64);
                    let v = augment.apply(&train.images.image(i), &mut r);
                    let mut a = to_channels(v.data, pre.channels);
                    normalize(&mut a, &pre.normalize);
                    a
                })
                .collect();
            let step_seed = cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            B::seed(dev, step_seed);
            let mut arrays = arrays;
            let mut y = targets(train.labels, chunk, classes, multi);
            if cfg.mixup > 0.0 {
                // Its own stream, so switching mixup on leaves order and views as they were.
                let mut r = StdRng::seed_from_u64(cfg.seed ^ 0x4d49_5855 ^ step as u64);
                let beta = Beta::new(cfg.mixup, cfg.mixup).expect("mixup α > 0");
                mixup(&mut arrays, &mut y, beta.sample(&mut r) as f32);
            }
            let x = batch_tensor::<Train<B, C>>(arrays, dev);
            let y = Tensor::from_data(
                TensorData::new(y.into_raw_vec_and_offset().0, [chunk.len(), classes]),
                dev,
            );
            let z = student.forward(x.clone(), true);
            let loss =
                classification_loss(z, y.clone(), multi, cfg.label_smoothing, weights.clone());
            loss_sum += loss.clone().into_scalar().elem::<f64>() * chunk.len() as f64;
            let mut grads = GradientsParams::from_grads(loss.backward(), &student);
            if let Some(moved) = cfg
                .sam
                .and_then(|rho| crate::sam::ascend(student.clone(), &grads, rho))
            {
                // The same drop-path masks, so only the weights differ between the two passes.
                B::seed(dev, step_seed);
                let z = moved.forward(x, true);
                let loss = classification_loss(z, y, multi, cfg.label_smoothing, weights.clone());
                grads = GradientsParams::from_grads(loss.backward(), &moved);
            }
            let settings = StepSettings {
                lr: lr.at(step),
                weight_decay: cfg.weight_decay,
                clip: (cfg.clip > 0.0).then_some(cfg.clip),
                group: &group,
            };
            student = opt.step(student, grads, &settings).0;
            step += 1;
            if let (Some(d), Some(a)) = (cfg.ema, average.take()) {
                let m = d.min((1.0 + step as f64) / (10.0 + step as f64));
                average = Some(params::ema(a, &student.valid(), m));
            }
        }
        let inner = average.clone().unwrap_or_else(|| student.valid());
        let scores = predict(
            std::slice::from_ref(&inner),
            val.images,
            pre,
            multi,
            cfg.batch,
            cfg.tta,
            dev,
        );
        let m = evaluate(task, val.labels, scores.view());
        let val_loss = probability_loss(scores.view(), val.labels, multi);
        let log = EpochLog {
            epoch: epoch + offset,
            train_loss: loss_sum / train.images.len() as f64,
            val_loss,
            val: m.clone(),
            lr: lr.at(step.saturating_sub(1)),
        };
        history.push(log.clone());
        let score = cfg.select.score(&m, val_loss);
        // Ties go to the later epoch, as OmniRad's `>=`.
        if best
            .as_ref()
            .is_none_or(|b| score >= selection_score(cfg, &history, b.epoch))
        {
            best = Some(FinetuneBest {
                epoch: epoch + offset,
                val: m,
                model: inner,
            });
        }
        let state = FinetuneState {
            head_phase: start.head_phase,
            epoch,
            step,
            model: student.valid(),
            opt: opt.clone(),
            average: average.clone(),
            best: best.clone(),
            history: history.clone(),
        };
        if !on_epoch(&log, &state) {
            return None;
        }
    }
    let best = best.expect("at least one epoch");
    Some(FinetuneResult {
        model: Classifier {
            backbone: best.model.backbone.merge_lora(),
            ..best.model
        },
        best_epoch: best.epoch,
        val: best.val,
        history,
    })
}

/// `cfg.select`'s score of the logged epoch `epoch` (1-based, as numbered in `history`).
fn selection_score(cfg: &FinetuneConfig, history: &[EpochLog], epoch: usize) -> f64 {
    let log = &history[epoch - 1];
    cfg.select.score(&log.val, log.val_loss)
}

const FORMAT: &str = "omnirad-finetune-1";

/// Writes `state` to one safetensors file, atomically: current, best and averaged weights,
/// AdamW moments, and the counters and history in the metadata.
pub fn save_state<B: Backend>(path: &Path, s: &FinetuneState<B>) -> Result<(), ModelError> {
    let mut w = StateWriter::default();
    w.module("model.", &s.model);
    if let Some(b) = &s.best {
        w.module("best.", &b.model);
    }
    if let Some(a) = &s.average {
        w.module("average.", a);
    }
    w.adam(&s.opt);
    let meta = serde_json::json!({
        "head_phase": s.head_phase,
        "epoch": s.epoch,
        "step": s.step,
        "best_epoch": s.best.as_ref().map(|b| b.epoch),
        "history": s.history,
    });
    w.write(path, FORMAT, &s.opt, meta)
}

/// Reads a state written by [`save_state`] into copies of `template` (the classifier the run
/// started from; `cfg` adds its LoRA adapters): every parameter must be in the file.
pub fn load_state<B: Backend>(
    path: &Path,
    template: &Classifier<B>,
    cfg: &FinetuneConfig,
    dev: &B::Device,
) -> Result<FinetuneState<B>, ModelError> {
    let mut r = StateReader::<B>::open(path, FORMAT, "fine-tuning", dev)?;
    let (epoch, step) = (r.num("epoch")? as usize, r.num("step")? as usize);
    let head_phase: bool = r.field("head_phase")?;
    let history: Vec<EpochLog> = r.field("history")?;
    let best_epoch: Option<usize> = r.field("best_epoch")?;
    let fits = |e: usize| (1..=history.len()).contains(&e);
    if !fits(epoch) || best_epoch.is_some_and(|e| !fits(e)) {
        return Err(r.error(format!(
            "epoch {epoch} or best epoch {best_epoch:?} is not in the history of {} epochs",
            history.len()
        )));
    }
    let mut template = template.clone();
    if let Some(l) = cfg.lora.as_ref().filter(|_| !head_phase) {
        template.backbone = template.backbone.add_lora(l.rank, l.alpha, l.dropout, dev);
    }
    let model = r.module("model.", template.clone());
    let best = best_epoch.map(|e| FinetuneBest {
        epoch: e,
        val: history[e - 1].val.clone(),
        model: r.module("best.", template.clone()),
    });
    let average = cfg.ema.map(|_| r.module("average.", template));
    let mut opt = AdamW::<B>::new(0.9, 0.999, 1e-8);
    r.finish(&mut opt, "another model, head or LoRA rank")?;
    Ok(FinetuneState {
        head_phase,
        epoch,
        step,
        model,
        opt,
        average,
        best,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_blends_each_row_with_its_mirror_in_the_batch() {
        let mut x: Vec<Array3<f32>> = [1.0, 2.0, 4.0]
            .iter()
            .map(|&v| Array3::from_elem((1, 2, 2), v))
            .collect();
        let mut y = ndarray::array![[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]];
        mixup(&mut x, &mut y, 0.25);
        // Row 0 pairs with row 2, row 1 (the middle of an odd batch) with itself.
        assert!(x[0].iter().all(|&v| v == 0.25 * 1.0 + 0.75 * 4.0));
        assert!(x[1].iter().all(|&v| v == 2.0));
        assert!(x[2].iter().all(|&v| v == 0.25 * 4.0 + 0.75 * 1.0));
        assert_eq!(y, ndarray::array![[0.25, 0.75], [0.0, 1.0], [0.75, 0.25]]);
    }
}
