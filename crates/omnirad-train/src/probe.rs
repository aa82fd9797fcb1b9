//! Linear (or one-hidden-layer MLP) probe on frozen features: standardise with train
//! statistics, train the head with AdamW, pick the epoch with the best validation score (macro-F1 by default, OmniRad's
//! rule) and report the test scores of that epoch.
//!
//! Loss: single-label — cross-entropy  `L = −(1/N) Σ_i log softmax(z_i)[y_i]`;
//! multi-label — binary cross-entropy with logits  `L = (1/(N·C)) Σ_{i,c} softplus(z_ic) − y_ic·z_ic`.

use burn::module::Param;
use burn::module::{AutodiffModule, Module};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{log_softmax, sigmoid, softmax, softplus};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use omnirad_eval::{evaluate, Metrics, TaskKind};
use omnirad_model::gelu;

use crate::finetune::{probability_loss, Selection};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Hidden width of a one-hidden-layer MLP head (GELU); 0 for a linear probe.
    pub hidden: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f32,
    pub batch: usize,
    pub seed: u64,
    /// Val-split score that picks the epoch (OmniRad: macro-F1).
    pub select: Selection,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            hidden: 0,
            epochs: 60,
            lr: 1e-3,
            weight_decay: 1e-4,
            batch: 256,
            seed: 0,
            select: Selection::MacroF1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// 1-based epoch chosen on the validation split.
    pub best_epoch: usize,
    pub val: Metrics,
    /// Class probabilities on the test split at the chosen epoch, [N_test, C].
    pub test_scores: Array2<f64>,
}

/// One split: features [N, D] and labels [N, 1] (class ids) or [N, C] (0/1 flags).
pub type Split<'a> = (ArrayView2<'a, f32>, ArrayView2<'a, i64>);

fn to_tensor<B: Backend>(x: &Array2<f32>, device: &B::Device) -> Tensor<B, 2> {
    let (n, d) = x.dim();
    Tensor::from_data(
        TensorData::new(x.iter().copied().collect::<Vec<f32>>(), [n, d]),
        device,
    )
}

/// Linear, or Linear–GELU–Linear when `out` is present.
#[derive(Module, Debug)]
pub struct ProbeHead<B: Backend> {
    pub first: Linear<B>,
    pub out: Option<Linear<B>>,
}

impl<B: Backend> ProbeHead<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = self.first.forward(x);
        match &self.out {
            Some(o) => o.forward(gelu(y)),
            None => y,
        }
    }
}

fn probs<B: Backend>(
    head: &ProbeHead<B>,
    x: &Array2<f32>,
    multi_label: bool,
    device: &B::Device,
) -> Array2<f64> {
    let logits = head.forward(to_tensor::<B>(x, device));
    let p = if multi_label {
        sigmoid(logits)
    } else {
        softmax(logits, 1)
    };
    let (n, c) = (x.nrows(), p.dims()[1]);
    let v: Vec<f32> = p.into_data().to_vec().expect("f32 probabilities");
    Array2::from_shape_vec((n, c), v.into_iter().map(|x| x as f64).collect()).expect("n x c")
}

/// Targets as dense [N, C]: one-hot for single-label, the flags themselves for multi-label.
fn targets(labels: ArrayView2<i64>, classes: usize, multi_label: bool) -> Array2<f32> {
    Array2::from_shape_fn((labels.nrows(), classes), |(i, c)| {
        let hit = if multi_label {
            labels[[i, c]] == 1
        } else {
            labels[[i, 0]] == c as i64
        };
        hit as u8 as f32
    })
}

pub fn linear_probe<B: AutodiffBackend>(
    train: Split,
    val: Split,
    test: ArrayView2<f32>,
    classes: usize,
    task: TaskKind,
    cfg: &ProbeConfig,
    device: &B::Device,
) -> ProbeResult {
    let multi = task == TaskKind::MultiLabel;
    // Standardise with train statistics (features of different encoders differ in scale).
    let mean: Array1<f32> = train.0.mean_axis(Axis(0)).expect("non-empty train split");
    let std: Array1<f32> = train.0.std_axis(Axis(0), 0.0).mapv(|s| s.max(1e-6));
    let norm = |x: ArrayView2<f32>| (&x - &mean) / &std;
    let (xtr, xva, xte) = (norm(train.0), norm(val.0), norm(test));
    let ytr = targets(train.1, classes, multi);

    // Weights drawn from our own seeded RNG (PyTorch's U(±1/√D)), not the backend's global
    // one, so a probe is reproducible whatever else runs in the process.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut linear = |i: usize, o: usize| {
        let bound = 1.0 / (i as f32).sqrt();
        let w = Array2::from_shape_simple_fn((i, o), || rng.random_range(-bound..=bound));
        let mut l: Linear<B> = LinearConfig::new(i, o)
            .with_initializer(Initializer::Zeros)
            .init(device);
        l.weight = Param::from_tensor(to_tensor::<B>(&w, device));
        l
    };
    let d = xtr.ncols();
    let mut head = match cfg.hidden {
        0 => ProbeHead {
            first: linear(d, classes),
            out: None,
        },
        h => ProbeHead {
            first: linear(d, h),
            out: Some(linear(h, classes)),
        },
    };
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .init::<B, ProbeHead<B>>();
    let mut order: Vec<usize> = (0..xtr.nrows()).collect();
    let mut best: Option<(f64, ProbeResult)> = None;
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch.max(1)) {
            let x = to_tensor::<B>(&xtr.select(Axis(0), chunk), device);
            let y = to_tensor::<B>(&ytr.select(Axis(0), chunk), device);
            let z = head.forward(x);
            let loss = if multi {
                (softplus(z.clone(), 1.0) - y * z).mean()
            } else {
                (log_softmax(z, 1) * y).sum_dim(1).mean().neg()
            };
            let grads = GradientsParams::from_grads(loss.backward(), &head);
            head = optim.step(cfg.lr, head, grads);
        }
        let inner = head.valid();
        let val_scores = probs(&inner, &xva, multi, device);
        let val_metrics = evaluate(task, val.1, val_scores.view());
        let score = cfg.select.score(
            &val_metrics,
            probability_loss(val_scores.view(), val.1, multi),
        );
        if best.as_ref().is_none_or(|(b, _)| score > *b) {
            let test_scores = probs(&inner, &xte, multi, device);
            best = Some((
                score,
                ProbeResult {
                    best_epoch: epoch,
                    val: val_metrics,
                    test_scores,
                },
            ));
        }
    }
    best.expect("at least one epoch").1
}
