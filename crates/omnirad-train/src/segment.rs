//! Training and evaluating segmentation heads on a ViT encoder (frozen, or fine-tuned at a
//! lower learning rate): AdamW with warm-up + cosine, CE + soft Dice, joint image/mask
//! augmentation, the epoch chosen by mean foreground Dice on the val split.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};
use ndarray::{Array2, Array3, Axis};
use omnirad_data::augment::sample_rng;
use omnirad_data::preprocess::{normalize, to_channels};
use omnirad_data::seg::{window_starts, Pixels, SegSample, SegView, SegWindow};
use omnirad_data::Preprocess;
use omnirad_eval::{SegEvaluator, SegScores};
use omnirad_model::{ModelError, SegHeadConfig, Segmenter, Train, Vit};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::finetune::batch_tensor;
use crate::loss::ce_dice_loss;
use crate::optim::{AdamW, ParamGroup, StepSettings};
use crate::params;
use crate::schedule::Cosine;
use crate::state_file::{StateReader, StateWriter};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegTrainConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    /// Network input side (a multiple of the patch size).
    pub size: usize,
    pub window: SegWindow,
    /// Training views drawn from each image per epoch (several windows from a large image).
    pub views_per_image: usize,
    pub ce_weight: f64,
    pub dice_weight: f64,
    /// Encoder LR as a fraction of `lr`; 0 keeps the encoder frozen.
    pub backbone_lr: f64,
    /// Global gradient-norm limit; 0 disables.
    pub clip: f64,
    pub seed: u64,
}

impl Default for SegTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch: 8,
            lr: 1e-3,
            min_lr: 1e-6,
            warmup_epochs: 2,
            weight_decay: 1e-4,
            size: 128,
            window: SegWindow::Resize,
            views_per_image: 1,
            ce_weight: 1.0,
            dice_weight: 1.0,
            backbone_lr: 0.0,
            clip: 1.0,
            seed: 0,
        }
    }
}

/// Builds encoder + head with the head's weights drawn from `seed`.
pub fn build<B: Backend>(
    backbone: Vit<B>,
    head: &SegHeadConfig,
    in_chans: usize,
    seed: u64,
    dev: &B::Device,
) -> Segmenter<B> {
    B::seed(dev, seed ^ 0x5345_474d);
    let head = head.init(backbone.embed_dim(), backbone.patch_size, in_chans, dev);
    let m = Segmenter { backbone, head };
    // burn draws Conv2d weights lazily; fix them before any clone.
    params::materialize(&m);
    m
}

/// Model input [C, S, S] from a [0, 1] view: the encoder's channels and normalisation.
fn input(image: Array3<f32>, pre: &Preprocess) -> Array3<f32> {
    let mut a = to_channels(image, pre.channels);
    normalize(&mut a, &pre.normalize);
    a
}

/// One-hot targets [B, C, S, S] and valid weights [B, 1, S, S].
fn targets<B: Backend>(
    views: &[SegView],
    classes: usize,
    dev: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (h, w) = views[0].mask.dim();
    let mut y = vec![0f32; views.len() * classes * h * w];
    let mut valid = Vec::with_capacity(views.len() * h * w);
    for (b, v) in views.iter().enumerate() {
        for ((i, &m), &ok) in v.mask.iter().enumerate().zip(v.valid.iter()) {
            let c = (m as usize).min(classes - 1);
            y[(b * classes + c) * h * w + i] = 1.0;
            valid.push(ok as u8 as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(y, [views.len(), classes, h, w]), dev),
        Tensor::from_data(TensorData::new(valid, [views.len(), 1, h, w]), dev),
    )
}

/// Class probabilities [C, H, W] at the sample's own resolution.
pub fn predict_probs<B: Backend>(
    model: &Segmenter<B>,
    image: &Pixels,
    size: usize,
    window: SegWindow,
    pre: &Preprocess,
    batch: usize,
    dev: &B::Device,
) -> Array3<f32> {
    let (_, h, w) = image.dim();
    let to_host =
        |t: Tensor<B, 4>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
    match window {
        SegWindow::Resize => {
            let x = batch_tensor::<B>(vec![input(image.resized(None, size), pre)], dev);
            let p = softmax(model.forward(x), 1);
            let p = interpolate(
                p,
                [h, w],
                InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false),
            );
            let c = p.dims()[1];
            Array3::from_shape_vec((c, h, w), to_host(p)).expect("c×h×w")
        }
        SegWindow::Sliding { overlap } => {
            let corners: Vec<(usize, usize)> = window_starts(h, size, overlap)
                .into_iter()
                .flat_map(|t| {
                    window_starts(w, size, overlap)
                        .into_iter()
                        .map(move |l| (t, l))
                })
                .collect();
            let mut sum: Option<Array3<f32>> = None;
            let mut count = Array2::<f32>::zeros((h, w));
            for chunk in corners.chunks(batch.max(1)) {
                let views = chunk
                    .iter()
                    .map(|&(t, l)| input(image.window(t, l, size), pre))
                    .collect();
                let x = batch_tensor::<B>(views, dev);
                let p = softmax(model.forward(x), 1);
                let [n, c, _, _] = p.dims();
                let p = Array3::from_shape_vec((n * c, size, size), to_host(p)).expect("shape");
                let acc = sum.get_or_insert_with(|| Array3::zeros((c, h, w)));
                for (k, &(t, l)) in chunk.iter().enumerate() {
                    let (bh, bw) = (size.min(h - t), size.min(w - l));
                    for ci in 0..c {
                        let src = p.index_axis(Axis(0), k * c + ci);
                        let mut dst = acc.index_axis_mut(Axis(0), ci);
                        let mut dst = dst.slice_mut(ndarray::s![t..t + bh, l..l + bw]);
                        dst += &src.slice(ndarray::s![..bh, ..bw]);
                    }
                    count
                        .slice_mut(ndarray::s![t..t + bh, l..l + bw])
                        .mapv_inplace(|v| v + 1.0);
                }
            }
            let mut acc = sum.expect("at least one window");
            for mut plane in acc.outer_iter_mut() {
                plane /= &count;
            }
            acc
        }
    }
}

/// Arg-max over classes.
pub fn argmax(p: &Array3<f32>) -> Array2<u8> {
    let (c, h, w) = p.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        (0..c)
            .max_by(|&a, &b| p[[a, y, x]].total_cmp(&p[[b, y, x]]))
            .unwrap_or(0) as u8
    })
}

/// Scores `samples` (at their own resolution, inside their field of view). `on_image` sees
/// each sample with its predicted mask.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &Segmenter<B>,
    samples: &[SegSample],
    classes: usize,
    size: usize,
    window: SegWindow,
    pre: &Preprocess,
    batch: usize,
    dev: &B::Device,
    mut on_image: impl FnMut(&SegSample, &Array2<u8>),
) -> SegScores {
    let mut e = SegEvaluator::new(classes);
    for s in samples {
        let pred = argmax(&predict_probs(
            model, &s.pixels, size, window, pre, batch, dev,
        ));
        e.add(pred.view(), s.mask.view(), s.fov.as_ref().map(|f| f.view()));
        on_image(s, &pred);
    }
    e.finish()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegEpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_ce: f64,
    pub train_dice_loss: f64,
    pub val_dice: f64,
    pub val_iou: f64,
    pub lr: f64,
}

/// The best epoch so far: its val score and model.
#[derive(Clone)]
pub struct SegBest<B: Backend> {
    pub epoch: usize,
    pub val: SegScores,
    pub model: Segmenter<B>,
}

/// Everything needed to continue training after an epoch (what a checkpoint holds).
#[derive(Clone)]
pub struct SegState<B: Backend> {
    /// Epochs completed.
    pub epoch: usize,
    pub step: usize,
    pub model: Segmenter<B>,
    pub opt: AdamW<B>,
    pub best: Option<SegBest<B>>,
    pub history: Vec<SegEpochLog>,
}

pub struct SegResult<B: Backend> {
    pub model: Segmenter<B>,
    /// 1-based.
    pub best_epoch: usize,
    pub val: SegScores,
    pub history: Vec<SegEpochLog>,
}

/// Trains the head (and the encoder when `cfg.backbone_lr > 0`) on `train`; keeps the epoch
/// with the best val Dice (ties to the later epoch). `resume` continues from a saved state
/// exactly (views and batch order are functions of seed and epoch). After every epoch
/// `on_epoch` sees the log and the state; returning false stops training there.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    model: Segmenter<B>,
    train: &[SegSample],
    val: &[SegSample],
    classes: usize,
    pre: &Preprocess,
    cfg: &SegTrainConfig,
    dev: &B::Device,
    resume: Option<SegState<B>>,
    mut on_epoch: impl FnMut(&SegEpochLog, &SegState<B>) -> bool,
) -> SegResult<B> {
    let state = resume.unwrap_or_else(|| SegState {
        epoch: 0,
        step: 0,
        model,
        opt: AdamW::<B>::new(0.9, 0.999, 1e-8),
        best: None,
        history: Vec::new(),
    });
    let mut student = Segmenter::<Train<B>>::from_inner(state.model);
    let frozen = cfg.backbone_lr <= 0.0;
    student = params::trainable_where(student, |p| !frozen || p.starts_with("head."));
    let per_epoch = train.len() * cfg.views_per_image.max(1);
    let steps_per_epoch = per_epoch.div_ceil(cfg.batch.max(1));
    let total = cfg.epochs * steps_per_epoch;
    let lr = Cosine::new(cfg.lr, cfg.min_lr, total)
        .with_warmup((cfg.warmup_epochs * steps_per_epoch).min(total), 0.0);
    let mut opt = state.opt;
    let group = |p: &str| ParamGroup {
        lr_mult: if p.starts_with("backbone.") {
            cfg.backbone_lr
        } else {
            1.0
        },
        wd_mult: if p.ends_with("bias") || p.ends_with("beta") || p.ends_with("gamma") {
            0.0
        } else {
            1.0
        },
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..per_epoch).collect();
    // Replay the shuffles of the epochs already done, so a resumed run sees the same batches.
    for _ in 0..state.epoch {
        order.shuffle(&mut rng);
    }
    let mut best = state.best;
    let mut history = state.history;
    let mut step = state.step;
    for epoch in state.epoch + 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let (mut sum, mut sum_ce, mut sum_dice) = (0.0, 0.0, 0.0);
        for chunk in order.chunks(cfg.batch.max(1)) {
            let views: Vec<SegView> = chunk
                .par_iter()
                .map(|&k| {
                    let mut r = sample_rng(cfg.seed, epoch as u64, k as u64);
                    train[k % train.len()].train_view(cfg.window, cfg.size, &mut r)
                })
                .collect();
            let x = batch_tensor::<Train<B>>(
                views
                    .par_iter()
                    .map(|v| input(v.image.clone(), pre))
                    .collect(),
                dev,
            );
            let (y, valid) = targets::<Train<B>>(&views, classes, dev);
            let (ce, dice) = ce_dice_loss(student.forward(x), y, valid);
            let loss = ce.clone() * cfg.ce_weight + dice.clone() * cfg.dice_weight;
            let n = chunk.len() as f64;
            // One read for the three logged values.
            let v: Vec<f64> = Tensor::cat(vec![loss.clone().inner(), ce.inner(), dice.inner()], 0)
                .into_data()
                .convert::<f64>()
                .to_vec()
                .expect("f64");
            sum += v[0] * n;
            sum_ce += v[1] * n;
            sum_dice += v[2] * n;
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            let settings = StepSettings {
                lr: lr.at(step),
                weight_decay: cfg.weight_decay,
                clip: (cfg.clip > 0.0).then_some(cfg.clip),
                group: &group,
            };
            student = opt.step(student, grads, &settings).0;
            step += 1;
        }
        let inner = student.valid();
        let scores = evaluate(
            &inner,
            val,
            classes,
            cfg.size,
            cfg.window,
            pre,
            cfg.batch,
            dev,
            |_, _| {},
        );
        let log = SegEpochLog {
            epoch,
            train_loss: sum / per_epoch as f64,
            train_ce: sum_ce / per_epoch as f64,
            train_dice_loss: sum_dice / per_epoch as f64,
            val_dice: scores.dice,
            val_iou: scores.iou,
            lr: lr.at(step.saturating_sub(1)),
        };
        history.push(log.clone());
        if best.as_ref().is_none_or(|b| scores.dice >= b.val.dice) {
            best = Some(SegBest {
                epoch,
                val: scores,
                model: inner.clone(),
            });
        }
        let state = SegState {
            epoch,
            step,
            model: inner,
            opt: opt.clone(),
            best: best.clone(),
            history: history.clone(),
        };
        if !on_epoch(&log, &state) {
            break;
        }
    }
    let b = best.expect("at least one epoch");
    SegResult {
        model: b.model,
        best_epoch: b.epoch,
        val: b.val,
        history,
    }
}

const FORMAT: &str = "omnirad-segment-1";

/// Writes `state` to one safetensors file, atomically: current and best weights, AdamW moments,
/// counters, best val scores and the history in the metadata.
pub fn save_state<B: Backend>(path: &Path, s: &SegState<B>) -> Result<(), ModelError> {
    let mut w = StateWriter::default();
    w.module("model.", &s.model);
    if let Some(b) = &s.best {
        w.module("best.", &b.model);
    }
    w.adam(&s.opt);
    let meta = serde_json::json!({
        "epoch": s.epoch,
        "step": s.step,
        "best_epoch": s.best.as_ref().map(|b| b.epoch),
        "best_val": s.best.as_ref().map(|b| &b.val),
        "history": s.history,
    });
    w.write(path, FORMAT, &s.opt, meta)
}

/// Reads a state written by [`save_state`] into copies of `template` (the freshly built model:
/// every parameter must be in the file with its shape).
pub fn load_state<B: Backend>(
    path: &Path,
    template: &Segmenter<B>,
    dev: &B::Device,
) -> Result<SegState<B>, ModelError> {
    let mut r = StateReader::<B>::open(path, FORMAT, "segmentation", dev)?;
    let (epoch, step) = (r.num("epoch")? as usize, r.num("step")? as usize);
    let history: Vec<SegEpochLog> = r.field("history")?;
    let model = r.module("model.", template.clone());
    let best = match r.field::<Option<usize>>("best_epoch")? {
        Some(epoch) => Some(SegBest {
            epoch,
            val: r.field("best_val")?,
            model: r.module("best.", template.clone()),
        }),
        None => None,
    };
    let mut opt = AdamW::<B>::new(0.9, 0.999, 1e-8);
    r.finish(&mut opt, "different head or encoder")?;
    Ok(SegState {
        epoch,
        step,
        model,
        opt,
        best,
        history,
    })
}
