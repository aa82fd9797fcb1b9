//! `omnirad finetune` (full or LoRA fine-tuning on a MedMNIST-style npz with official splits),
//! `omnirad probe` (the same with the encoder frozen: only the head trains) and
//! `omnirad predict` (class probabilities from a saved bundle for any readable input).
//!
//! Bundle directory:
//! ```text
//! OUT/bundle.json        task, classes, pooling, preprocessing, selected epoch, val/test metrics
//! OUT/encoder/           the fine-tuned encoder as a model directory (usable with --model)
//! OUT/head.safetensors   linear head, PyTorch layout: weight [C, D], bias [C]
//! OUT/history.jsonl      per epoch: train loss, val loss, val metrics, lr
//! OUT/run.json           the settings (a --resume must match them)
//! OUT/checkpoint.safetensors  after every epoch until the bundle is written: weights, best and
//!                        averaged weights, AdamW moments
//! OUT/members/K/         --soup / --ensemble: member K's run (history.jsonl, run.json, member.json;
//!                        checkpoint until done); an ensemble's members also hold their encoder/
//!                        and head.safetensors, in place of OUT's
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use ndarray::{Array2, Axis};
use omnirad_data::augment::Augment;
use omnirad_data::medmnist::{
    parse_file_name, stratified_holdout, MedMnistInfo, NpzRows, NpzSplit, Task,
};
use omnirad_data::{discover, ImageSource, Preprocess, Split};
use omnirad_eval::{evaluate, KnnConfig, Metrics, TaskKind};
use omnirad_model::{
    f32_tensors, load_model_dir, map_file, save_model_dir, write_f32_safetensors, F32Tensor,
    ModelConfig, Vit,
};
use omnirad_train::finetune::{
    batch_probabilities, batch_probabilities_and_features, features, finetune, load_state, predict,
    predict_and_features, save_state, ClassWeight, Classifier, FinetuneConfig, FinetuneResult,
    LabelledImages, Selection, Views,
};
use omnirad_train::knn_mix::{self, choose_lambda, votes, KnnBank, KnnMix};
use serde::{Deserialize, Serialize};

use crate::device::{parse_device, resolve_model, stamp, Device};
use crate::embed::{csv_field, map_items, report_failed, write_failed, BatchJob};
use crate::embed_parts::Parts;
use crate::run_dir::RunDir;
use crate::ReadArgs;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Epochs; by default 20, or more on small sets so that training makes at least 1800
    /// optimizer steps (BreastMNIST: 200).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 5e-4, value_parser = parse_positive)]
    pub lr: f64,
    #[arg(long, default_value_t = 64, value_parser = crate::bounded_count)]
    pub batch: usize,
    #[arg(long, default_value_t = 0.05, value_parser = parse_non_negative)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.75, value_parser = parse_layer_decay)]
    pub layer_decay: f64,
    #[arg(long, default_value_t = 2)]
    pub warmup_epochs: usize,
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub drop_path: f64,
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub dropout: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = parse_non_negative)]
    pub clip: f64,
    /// Val-split score that picks the epoch: macro-f1 (OmniRad), acc, auc or loss.
    #[arg(long, default_value = "macro-f1", value_parser = Selection::parse)]
    pub select: Selection,
    /// Head on the class token (cls) or on [class token, mean patch token] (cls-mean).
    #[arg(long, default_value = "cls", value_parser = ["cls", "cls-mean"])]
    pub pool: String,
    /// Train rank-R LoRA adapters on attention qkv/proj plus the head; the encoder stays frozen.
    #[arg(long, value_parser = crate::bounded_count)]
    pub lora_rank: Option<usize>,
    #[arg(long, default_value_t = 32.0, value_parser = parse_positive)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub lora_dropout: f64,
    /// Encoder matmul/attention precision: bf16 is mixed precision on f32 weights (faster on GPUs
    /// and on CPUs with AMX or AVX-512 BF16, slower on other CPUs; README).
    #[arg(long, default_value = "f32")]
    pub dtype: omnirad_model::Precision,
    #[command(flatten)]
    pub tune: TuneArgs,
}

/// Fine-tuning options that `finetune`/`probe` and `bench medmnist` share: what is trained and
/// scored beyond the schedule, each off by default.
#[derive(Args, Debug, Clone)]
pub struct TuneArgs {
    /// Recompute norms, activations and elementwise ops in the backward pass instead of keeping
    /// them: the same gradients with less memory (larger batches), a few % slower.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// LP-FT: train the head alone on the frozen encoder for N epochs before fine-tuning it all.
    #[arg(long, default_value_t = 0)]
    pub head_epochs: usize,
    /// Score, select and save an exponential moving average of the weights with this decay per
    /// step (e.g. 0.998; timm's model EMA).
    #[arg(long, value_parser = parse_ema)]
    pub ema: Option<f64>,
    /// Mixup with Beta(α, α) blending weights (0 = off; timm uses 0.8).
    #[arg(long, default_value_t = 0.0, value_parser = parse_mixup)]
    pub mixup: f64,
    /// balanced: weight the loss so every class counts the same (w_c = N / (C·n_c); multi-label:
    /// positives weighted n_neg / n_pos per label), for sets where the class that matters is rare.
    #[arg(long, default_value = "none", value_parser = ClassWeight::parse)]
    pub class_weight: ClassWeight,
    /// Training views: mild (OmniRad's crop 0.85–1, flip, ±7°) or strong (crop 0.5–1, flip,
    /// ±15°, brightness and contrast ±0.2).
    #[arg(long, default_value = "mild", value_parser = Views::parse)]
    pub augment: Views,
    /// Score val and test, and later `omnirad predict`, on the mean over each image and its
    /// left–right mirror.
    #[arg(long)]
    pub tta: bool,
    /// Sharpness-aware minimisation with radius ρ (e.g. 0.05): each step's gradient is taken
    /// at the weights moved ρ along the normalised gradient (twice the training compute).
    #[arg(long, value_parser = parse_positive)]
    pub sam: Option<f64>,
    /// A model soup: fine-tune N times from the same encoder and head init with seeds seed,
    /// seed+1000, …, each at its val-selected epoch, and average the N models' weights into one
    /// (N times the training, one model's inference).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub soup: usize,
    /// An ensemble: fine-tune N times as --soup does, keep all N models and average their class
    /// probabilities (N times the training and the inference; the bundle holds N models).
    #[arg(long, default_value_t = 1, conflicts_with = "soup", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub ensemble: usize,
    /// After fine-tuning, mix the head's class probabilities with a k-NN vote (k 20, cosine,
    /// T 0.07) over the training images in the fine-tuned feature space:
    /// p = (1 − λ)·head + λ·vote, λ ∈ {0, 0.1, …, 1} chosen on val (Jia et al. 2021). The
    /// bundle keeps the training features, which `predict` votes with.
    #[arg(long)]
    pub knn_mix: bool,
    /// L2-SP with strength λ: the encoder's weights decay toward their pretrained values
    /// instead of toward zero (decoupled, as AdamW's weight decay; Li et al. 2018). A weight's
    /// drift levels off near 1/λ, so λ 10 lets each move about 0.1.
    #[arg(long, value_parser = parse_positive)]
    pub l2sp: Option<f64>,
}

impl TuneArgs {
    /// These options in `cfg`.
    pub fn apply(&self, cfg: &mut FinetuneConfig) {
        cfg.grad_checkpoint = self.grad_checkpoint;
        cfg.head_epochs = self.head_epochs;
        cfg.ema = self.ema;
        cfg.mixup = self.mixup;
        cfg.class_weight = self.class_weight;
        cfg.views = self.augment;
        cfg.tta = self.tta;
        cfg.sam = self.sam;
        cfg.knn_mix = self.knn_mix;
        cfg.l2sp = self.l2sp;
    }

    pub fn members(&self) -> Members {
        Members::new(self.soup, self.ensemble)
    }

    /// `--l2sp` acts on the encoder's weights: an error for a probe or LoRA, which keep them.
    pub fn check_l2sp(&self, probe: bool, lora: bool) -> Result<()> {
        let why = match (self.l2sp.is_some(), probe, lora) {
            (true, true, _) => "`probe` keeps the encoder frozen",
            (true, _, true) => "LoRA keeps the encoder frozen and trains adapters",
            _ => return Ok(()),
        };
        bail!("--l2sp pulls the fine-tuned encoder toward its pretrained weights, but {why}")
    }

    /// The first of these flags that is set, for commands that train no encoder.
    pub fn first_set(&self) -> Option<&'static str> {
        [
            ("--grad-checkpoint", self.grad_checkpoint),
            ("--head-epochs", self.head_epochs > 0),
            ("--ema", self.ema.is_some()),
            ("--mixup", self.mixup > 0.0),
            ("--class-weight", self.class_weight != ClassWeight::None),
            ("--augment", self.augment != Views::Mild),
            ("--tta", self.tta),
            ("--sam", self.sam.is_some()),
            ("--soup", self.soup > 1),
            ("--ensemble", self.ensemble > 1),
            ("--knn-mix", self.knn_mix),
            ("--l2sp", self.l2sp.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, set)| set.then_some(flag))
    }
}

/// How a run's fine-tunes make one predictor (`--soup N`, `--ensemble N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Members {
    One,
    /// A uniform model soup: the N members' weights averaged into one model.
    Soup(usize),
    /// The N members kept; their class probabilities averaged.
    Ensemble(usize),
}

impl Members {
    /// From `--soup` and `--ensemble` (clap lets at most one of them exceed 1).
    pub fn new(soup: usize, ensemble: usize) -> Self {
        match (soup, ensemble) {
            (s, _) if s > 1 => Self::Soup(s),
            (_, e) if e > 1 => Self::Ensemble(e),
            _ => Self::One,
        }
    }

    pub fn count(self) -> usize {
        match self {
            Self::One => 1,
            Self::Soup(n) | Self::Ensemble(n) => n,
        }
    }

    /// "soup" or "ensemble" (for logs and settings); "" for one fine-tune.
    pub fn name(self) -> &'static str {
        match self {
            Self::One => "",
            Self::Soup(_) => "soup",
            Self::Ensemble(_) => "ensemble",
        }
    }
}

/// `s` as a finite number for which `ok` holds, else `what` (clap names the flag and value).
/// Training options are checked here: a NaN or out-of-range value otherwise shows up only as
/// NaN losses.
fn number(s: &str, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && ok(v) => Ok(v),
        _ => Err(what.to_string()),
    }
}

pub fn parse_positive(s: &str) -> Result<f64, String> {
    number(s, |v| v > 0.0, "must be a number > 0")
}

pub fn parse_non_negative(s: &str) -> Result<f64, String> {
    number(s, |v| v >= 0.0, "must be a number ≥ 0")
}

/// A probability or smoothing amount in [0, 1).
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    number(s, |v| (0.0..1.0).contains(&v), "must be a number in [0, 1)")
}

/// Layer-wise LR decay in (0, 1] (1 = none).
fn parse_layer_decay(s: &str) -> Result<f64, String> {
    number(
        s,
        |v| v > 0.0 && v <= 1.0,
        "must be a number in (0, 1] (1 = no decay)",
    )
}

/// Mixup's α: a finite number ≥ 0.
pub fn parse_mixup(s: &str) -> Result<f64, String> {
    number(
        s,
        |a| a >= 0.0,
        "mixup's α must be a number ≥ 0 (0 = off), e.g. 0.8",
    )
}

/// An EMA decay: strictly between 0 and 1.
pub fn parse_ema(s: &str) -> Result<f64, String> {
    number(
        s,
        |d| d > 0.0 && d < 1.0,
        "the EMA decay must be a number in (0, 1), e.g. 0.998",
    )
}

impl TrainArgs {
    pub fn config(&self, seed: u64) -> FinetuneConfig {
        let mut cfg = FinetuneConfig {
            batch: self.batch,
            lr: self.lr,
            min_lr: 1e-6,
            warmup_epochs: self.warmup_epochs,
            weight_decay: self.weight_decay,
            layer_decay: self.layer_decay,
            drop_path: self.drop_path,
            dropout: self.dropout,
            label_smoothing: self.label_smoothing,
            clip: self.clip,
            cls_mean: self.pool == "cls-mean",
            select: self.select,
            seed,
            lora: self
                .lora_rank
                .map(|rank| omnirad_train::finetune::LoraConfig {
                    rank,
                    alpha: self.lora_alpha,
                    dropout: self.lora_dropout,
                }),
            frozen: false,
            precision: self.dtype,
            ..FinetuneConfig::default()
        };
        self.tune.apply(&mut cfg);
        cfg.set_epochs(self.epochs);
        cfg
    }
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// MedMNIST-style npz with train/val/test splits (the dataset is recognised by its name).
    #[arg(long)]
    pub data: PathBuf,
    /// Encoder: model directory, public checkpoint, or preset (random init).
    #[arg(long)]
    pub model: String,
    /// Resize inputs to this side instead of the encoder's own (a multiple of its patch size;
    /// the position table is resampled): more tokens per image for small-image datasets.
    #[arg(long, value_parser = crate::side)]
    pub input_size: Option<usize>,
    /// Bundle directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this epoch (the checkpoint is kept; continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub kind: String,
    pub dataset: String,
    pub task: String,
    pub classes: usize,
    pub cls_mean: bool,
    /// The epoch val chose; 0 for a soup or an ensemble (its members' are listed).
    pub best_epoch: usize,
    pub val: serde_json::Value,
    pub test: serde_json::Value,
    pub finetune: FinetuneConfig,
    /// The fine-tunes a soup averages (`--soup N`); empty for one fine-tune.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soup: Vec<Member>,
    /// The fine-tunes of an ensemble (`--ensemble N`), each saved in `members/K/`; empty
    /// otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ensemble: Vec<Member>,
    /// The k-NN mix `predict` applies (`--knn-mix`), each model's training features in its
    /// `knn.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn: Option<KnnMix>,
}

pub fn task_kind(t: Task) -> TaskKind {
    match t {
        Task::Binary => TaskKind::Binary,
        Task::MultiLabel => TaskKind::MultiLabel,
        Task::MultiClass | Task::Ordinal => TaskKind::MultiClass,
    }
}

/// The task as `bundle.json` names it.
fn task_name(t: Task) -> &'static str {
    match t {
        Task::Binary => "binary",
        Task::MultiClass => "multiclass",
        Task::MultiLabel => "multilabel",
        Task::Ordinal => "ordinal",
    }
}

/// Warns when a MedMNIST file is not the official release its name claims (a subsample, a
/// re-export, another set under this name): the published rows beside its scores do not apply.
pub fn warn_unofficial(file: &Path) {
    let Some((info, size)) = parse_file_name(file) else {
        return;
    };
    let Some(&(_, official)) = info.md5.iter().find(|(s, _)| *s == size) else {
        return;
    };
    if let Ok(md5) = omnirad_data::medmnist::file_md5(file) {
        if md5 != official {
            eprintln!(
                "warning: {} is not the official {} release (md5 {md5}, official {official}; \
                 `omnirad data verify` compares its splits): published scores do not apply to it",
                file.display(),
                info.name
            );
        }
    }
}

/// The dataset of an npz file, from its name (`breastmnist.npz`, `pneumoniamnist_64.npz`).
pub fn dataset_of(file: &Path) -> Result<&'static MedMnistInfo> {
    let (info, _) = parse_file_name(file).with_context(|| {
        format!(
            "{}: not a MedMNIST file name (expected e.g. breastmnist.npz or breastmnist_64.npz)",
            file.display()
        )
    })?;
    if info.is_3d {
        bail!(
            "{}: {} is 3D; fine-tuning covers the 2D sets",
            file.display(),
            info.name
        );
    }
    Ok(info)
}

pub struct Outcome<B: Backend> {
    /// The selected model, a soup's average of its members' selected models, or an ensemble's
    /// members (whose class probabilities [`predict`] averages).
    pub models: Vec<Classifier<B>>,
    /// The fine-tunes `models` come from: one, or a soup's or an ensemble's members.
    pub members: Vec<Member>,
    /// The predictor's metrics on the selection split (val, or the holdout of `Scored::Val`).
    pub val: Metrics,
    /// Metrics and class scores (one row per image, in order) of the scored images.
    pub test: Metrics,
    pub scores: Array2<f64>,
    /// With `--knn-mix`: the chosen mix, and each model's training features it votes with.
    pub knn: Option<(KnnMix, Vec<KnnBank>)>,
}

/// One fine-tune of an outcome: its seed, the epoch its selection split chose, and its scores there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub seed: u64,
    pub epoch: usize,
    pub val: Metrics,
    /// A soup's or an ensemble's member's own scores on the scored split, beside the whole's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Metrics>,
}

/// Member `k` of a soup or an ensemble trains with seed `seed + 1000·k`: member 0 is the plain
/// fine-tune of `seed`, and the soups of seeds 0, 1, 2, … share no member.
fn member_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_add(1000 * k as u64)
}

/// What `run_on_npz` trains on, selects the epoch on, and scores.
#[derive(Clone, Copy, Debug)]
pub enum Scored<'a> {
    /// The official protocol: train on train, select on val, score test.
    Test,
    /// Train on train less a stratified holdout the size of val (drawn by the seed), select on
    /// that holdout, score val: to choose between encoders or settings without reading test.
    Val,
    /// Train on the `rest` rows of train, select on val, score the `held` rows: one fold of a
    /// cross-validation over train.
    Fold {
        rest: &'a [usize],
        held: &'a [usize],
    },
}

/// A split's images (as the file's 8-bit pixels) and labels.
type Rows = (NpzRows, Array2<i64>);

/// Fine-tunes `vit` on `file` as `scored` says, once or as the members of a soup or an ensemble
/// (they share the head init and differ in seed, [`member_seed`]). With `run`, prints each
/// epoch, checkpoints it and resumes (members each in `members/K/` of the run directory);
/// returns None when stopped by its `stop_after`.
#[allow(clippy::too_many_arguments)]
pub fn run_on_npz<B: Backend>(
    vit: Vit<B>,
    cfg: &ModelConfig,
    file: &Path,
    ft: &FinetuneConfig,
    members: Members,
    dev: &B::Device,
    scored: Scored,
    run: Option<&RunDir>,
) -> Result<Option<Outcome<B>>> {
    let info = dataset_of(file)?;
    let load = |s: Split| -> Result<Rows> {
        let rows = NpzRows::all(NpzSplit::load(file, s)?)?;
        let labels = rows.labels();
        Ok((rows, labels))
    };
    let rows_of = |set: &Rows, idx: &[usize]| (set.0.select(idx), set.1.select(Axis(0), idx));
    let (tr, va, te) = match scored {
        Scored::Test => (load(Split::Train)?, load(Split::Val)?, load(Split::Test)?),
        Scored::Val => {
            let (train, val) = (load(Split::Train)?, load(Split::Val)?);
            let (rest, held) = stratified_holdout(train.1.view(), val.0.len(), ft.seed);
            (rows_of(&train, &rest), rows_of(&train, &held), val)
        }
        Scored::Fold { rest, held } => {
            let train = load(Split::Train)?;
            if let Some(&i) = rest.iter().chain(held).find(|&&i| i >= train.0.len()) {
                bail!(
                    "{}: no train row {i} (train has {} images)",
                    file.display(),
                    train.0.len()
                );
            }
            (
                rows_of(&train, rest),
                load(Split::Val)?,
                rows_of(&train, held),
            )
        }
    };
    let task = task_kind(info.task);
    let multi = task == TaskKind::MultiLabel;
    let classes = info.num_classes();
    let model = Classifier::new(vit, classes, ft.cls_mean, ft.dropout, ft.seed, dev);
    let n = members.count();
    if let Some(r) = run {
        let mut settings = serde_json::json!({ "data": file, "finetune": ft, "encoder": cfg });
        if n > 1 {
            settings[members.name()] = n.into();
        }
        r.start(&settings)?;
        let (images, epochs) = (tr.0.len(), ft.epochs_for(tr.0.len()));
        eprintln!(
            "{}: {images} training images, {} steps an epoch, {epochs} epochs{}{}",
            info.name,
            images.div_ceil(ft.batch.max(1)),
            if epochs > ft.epochs {
                format!(" (at least {} steps; --epochs sets them)", ft.min_steps)
            } else {
                String::new()
            },
            if n > 1 {
                format!("; {} of {n} fine-tunes", a_an(members.name()))
            } else {
                String::new()
            }
        );
    }
    let data = Data {
        file,
        name: info.name,
        train: &tr,
        val: &va,
        task,
        augment: ft.views.augment(cfg.preprocess.size),
        pre: &cfg.preprocess,
    };
    let mut done = Vec::new();
    let mut models = Vec::new();
    for k in 0..n {
        let ft = FinetuneConfig {
            seed: member_seed(ft.seed, k),
            ..ft.clone()
        };
        let (mut member, picked) = if n == 1 {
            let Some(r) = train_one(model.clone(), &data, &ft, dev, run)? else {
                return Ok(None);
            };
            (member_of(&ft, &r), r.model)
        } else {
            match member(model.clone(), &data, &ft, dev, run, k + 1)? {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        if n > 1 {
            let s = predict(
                std::slice::from_ref(&picked),
                &te.0,
                data.pre,
                multi,
                ft.batch,
                ft.tta,
                dev,
            );
            let m = evaluate(task, te.1.view(), s.view());
            let (chosen_on, scored_on) = split_names(scored);
            eprintln!(
                "{} {} member {}/{n} (seed {}): epoch {} chosen by {chosen_on} {} (ACC {:.3} AUC {:.3} macro-F1 {:.3}); alone on {scored_on} ACC {:.3} AUC {:.3} macro-F1 {:.3}",
                info.name,
                members.name(),
                k + 1,
                member.seed,
                member.epoch,
                ft.select.name(),
                member.val.acc,
                member.val.auc,
                member.val.macro_f1,
                m.acc,
                m.auc,
                m.macro_f1
            );
            member.test = Some(m);
        }
        models.push(picked);
        done.push(member);
    }
    let models = match members {
        Members::Ensemble(_) => models,
        _ => vec![omnirad_train::params::mean(models)],
    };
    let head = |rows: &Rows| predict(&models, &rows.0, data.pre, multi, ft.batch, ft.tta, dev);
    let (val, test, scores, knn) = if ft.knn_mix {
        let banks: Vec<KnnBank> = models
            .iter()
            .map(|m| KnnBank {
                features: features(m, &tr.0, data.pre, ft.batch, dev),
                labels: tr.1.clone(),
            })
            .collect();
        let knn = KnnConfig::default();
        // One forward per split gives the head's probabilities and the features the vote needs.
        let head_and_vote = |rows: &Rows| {
            let (p, f) =
                predict_and_features(&models, &rows.0, data.pre, multi, ft.batch, ft.tta, dev);
            (p, votes(&banks, &f, classes, multi, knn))
        };
        let (head_val, vote_val) = head_and_vote(&va);
        let (lambda, val) = choose_lambda(
            head_val.view(),
            vote_val.view(),
            va.1.view(),
            task,
            ft.select,
        );
        let mix = KnnMix {
            lambda,
            k: knn.k,
            temperature: knn.temperature,
        };
        let alone = evaluate(task, va.1.view(), head_val.view());
        eprintln!(
            "{}: k-NN mix λ {lambda:.1} chosen by {} {}: ACC {:.3} AUC {:.3} macro-F1 {:.3} (the head alone {:.3} / {:.3} / {:.3})",
            info.name,
            split_names(scored).0,
            ft.select.name(),
            val.acc,
            val.auc,
            val.macro_f1,
            alone.acc,
            alone.auc,
            alone.macro_f1
        );
        let (head_test, vote_test) = head_and_vote(&te);
        let alone = evaluate(task, te.1.view(), head_test.view());
        eprintln!(
            "{}: the head alone on {}: ACC {:.3} AUC {:.3} macro-F1 {:.3}",
            info.name,
            split_names(scored).1,
            alone.acc,
            alone.auc,
            alone.macro_f1
        );
        let s = knn_mix::mix(head_test.view(), vote_test.view(), lambda);
        (
            val,
            evaluate(task, te.1.view(), s.view()),
            s,
            Some((mix, banks)),
        )
    } else {
        let val = if n == 1 {
            done[0].val.clone()
        } else {
            let s = head(&va);
            evaluate(task, va.1.view(), s.view())
        };
        let s = head(&te);
        (val, evaluate(task, te.1.view(), s.view()), s, None)
    };
    Ok(Some(Outcome {
        models,
        members: done,
        val,
        test,
        scores,
        knn,
    }))
}

/// The split a run selects on, and the one it scores.
fn split_names(scored: Scored) -> (&'static str, &'static str) {
    match scored {
        Scored::Test => ("val", "test"),
        Scored::Val => ("train-holdout", "val"),
        Scored::Fold { .. } => ("val", "held-out fold"),
    }
}

/// "a soup", "an ensemble".
fn a_an(noun: &str) -> String {
    let vowel = noun.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {noun}", if vowel { "an" } else { "a" })
}

fn member_of<B: Backend>(ft: &FinetuneConfig, r: &FinetuneResult<B>) -> Member {
    Member {
        seed: ft.seed,
        epoch: r.best_epoch,
        val: r.val.clone(),
        test: None,
    }
}

/// The training side of [`run_on_npz`], shared by the members of a soup or an ensemble.
struct Data<'a> {
    file: &'a Path,
    name: &'a str,
    train: &'a Rows,
    val: &'a Rows,
    task: TaskKind,
    augment: Augment,
    pre: &'a Preprocess,
}

/// Member `k` (from 1) of a soup or an ensemble. With `run`, it trains in `members/K/` of the
/// run directory (its own checkpoint and history) and leaves its selected model and scores there
/// once done, so a resumed run starts at the first unfinished member.
fn member<B: Backend>(
    model: Classifier<B>,
    data: &Data,
    ft: &FinetuneConfig,
    dev: &B::Device,
    run: Option<&RunDir>,
    k: usize,
) -> Result<Option<(Member, Classifier<B>)>> {
    let Some(r) = run else {
        return Ok(train_one(model, data, ft, dev, None)?.map(|o| (member_of(ft, &o), o.model)));
    };
    let dir = member_dir(r.dir, k);
    let (weights, summary) = (dir.join("selected.safetensors"), dir.join("member.json"));
    if r.resume && summary.is_file() {
        let text = std::fs::read_to_string(&summary)
            .with_context(|| format!("reading {}", summary.display()))?;
        let member: Member = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a member's summary", summary.display()))?;
        let model = omnirad_model::load_module(model, &weights)?;
        eprintln!("member {k}: done before (epoch {})", member.epoch);
        return Ok(Some((member, model)));
    }
    // A member the stopped run had not reached starts afresh.
    let member_run = RunDir::new(
        &dir,
        r.resume && dir.join("run.json").is_file(),
        r.stop_after,
    );
    member_run.start(&serde_json::json!({ "finetune": ft }))?;
    let Some(o) = train_one(model, data, ft, dev, Some(&member_run))? else {
        r.stopped_with(&member_run);
        return Ok(None);
    };
    let member = member_of(ft, &o);
    omnirad_model::save_module(&o.model, &weights)?;
    crate::atomic::write(&summary, serde_json::to_string_pretty(&member)?)?;
    member_run.finish();
    Ok(Some((member, o.model)))
}

/// One fine-tune of `model` on `data`. With `run`, prints each epoch, checkpoints it and
/// resumes; None when stopped by its `stop_after`.
fn train_one<B: Backend>(
    model: Classifier<B>,
    data: &Data,
    ft: &FinetuneConfig,
    dev: &B::Device,
    run: Option<&RunDir>,
) -> Result<Option<FinetuneResult<B>>> {
    let mut resume = None;
    let mut hist = None;
    if let Some(r) = run {
        if r.resume {
            let state = load_state(&r.checkpoint(), &model, ft, dev).context("--resume")?;
            eprintln!("resuming after epoch {}", state.history.len());
            resume = Some(state);
        }
        hist = Some(r.history(resume.as_ref().map_or(&[][..], |s| &s.history))?);
    }
    let mut save_error = None;
    let mut diverged = None;
    let result = finetune(
        model,
        LabelledImages {
            images: &data.train.0,
            labels: data.train.1.view(),
        },
        LabelledImages {
            images: &data.val.0,
            labels: data.val.1.view(),
        },
        data.task,
        &data.augment,
        data.pre,
        ft,
        dev,
        resume,
        |e, state| {
            if run.is_some() {
                eprintln!(
                    "{} epoch {:>3}: train loss {:.4}  val loss {:.4}  val ACC {:.3} AUC {:.3} macro-F1 {:.3}  lr {:.2e}",
                    data.name, e.epoch, e.train_loss, e.val_loss, e.val.acc, e.val.auc, e.val.macro_f1, e.lr
                );
            }
            // NaN weights cannot recover, and a bundle of them would still score (at chance).
            if !e.train_loss.is_finite() {
                diverged = Some((e.epoch, e.train_loss));
                return false;
            }
            let Some(r) = run else { return true };
            if let Some(h) = hist.as_mut() {
                h.push(e);
            }
            if let Err(err) = save_state(&r.checkpoint(), state) {
                save_error = Some(err);
                return false;
            }
            r.go_on(e.epoch)
        },
    );
    if let Some(e) = save_error {
        return Err(e).context("writing the checkpoint");
    }
    if let Some((epoch, loss)) = diverged {
        bail!(
            "{}: training diverged in epoch {epoch} (train loss {loss}); lower --lr (now {}){}",
            data.file.display(),
            ft.lr,
            if ft.clip > 0.0 {
                ""
            } else {
                " or clip gradients (--clip 1)"
            }
        );
    }
    Ok(result)
}

/// `frozen`: `omnirad probe` — only the head trains.
pub fn run(a: &FinetuneArgs, frozen: bool) -> Result<()> {
    let info = dataset_of(&a.data)?;
    warn_unofficial(&a.data);
    let mut ft = a.train.config(a.seed);
    ft.frozen = frozen;
    if frozen && ft.lora.is_some() {
        bail!(
            "--lora-rank adapts the encoder; `probe` keeps it frozen (use `finetune --lora-rank`)"
        );
    }
    a.train.tune.check_l2sp(frozen, ft.lora.is_some())?;
    crate::with_backend!(a.device, |B, dev| {
        crate::device::precision::<B>(&dev, ft.precision)?;
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.seed)?;
        let cfg = crate::device::with_input_size(cfg, a.input_size)?;
        let run = RunDir::new(&a.out, a.resume, a.stop_after);
        let members = a.train.tune.members();
        let Some(o) = run_on_npz::<B>(
            vit,
            &cfg,
            &a.data,
            &ft,
            members,
            &dev,
            Scored::Test,
            Some(&run),
        )?
        else {
            match members {
                Members::One => eprintln!("{}", run.stopped_message()),
                _ => eprintln!(
                    "stopped after epoch {} of {} member; continue with --resume (checkpoints in {})",
                    run.stopped_after(),
                    a_an(members.name()),
                    a.out.join("members").display()
                ),
            }
            return Ok(());
        };
        let chosen = match o.members.as_slice() {
            [m] => format!("epoch {} selected by val {}", m.epoch, ft.select.name()),
            ms => format!("{} of {} fine-tunes", a_an(members.name()), ms.len()),
        };
        eprintln!(
            "{}: {chosen}; test ACC {:.3} AUC {:.3} macro-F1 {:.3}",
            info.name, o.test.acc, o.test.auc, o.test.macro_f1
        );
        let bundle = Bundle {
            kind: "classifier".into(),
            dataset: info.name.into(),
            task: task_name(info.task).into(),
            classes: info.num_classes(),
            cls_mean: ft.cls_mean,
            best_epoch: match o.members.as_slice() {
                [m] => m.epoch,
                _ => 0,
            },
            val: serde_json::to_value(&o.val)?,
            test: serde_json::to_value(&o.test)?,
            finetune: ft.clone(),
            soup: match members {
                Members::Soup(_) => o.members.clone(),
                _ => Vec::new(),
            },
            ensemble: match members {
                Members::Ensemble(_) => o.members.clone(),
                _ => Vec::new(),
            },
            knn: o.knn.as_ref().map(|(mix, _)| *mix),
        };
        let banks = o.knn.as_ref().map(|(_, b)| b.as_slice()).unwrap_or(&[]);
        save_bundle(&a.out, &o.models, banks, &cfg, &bundle)?;
        run.finish();
        // A member's selected weights were kept only for a resume; its history stays.
        for k in 1..=members.count() {
            let _ = std::fs::remove_file(member_dir(&a.out, k).join("selected.safetensors"));
        }
        println!("{}", serde_json::to_string_pretty(&bundle.test)?);
        eprintln!("bundle written to {}", a.out.display());
        Ok(())
    })
}

/// One model in `out/` (a fine-tune, a soup), or an ensemble's in `out/members/K/`, each with
/// its k-NN bank if `banks` has them; then `bundle.json`, last, so that a bundle is complete
/// once it has one.
fn save_bundle<B: Backend>(
    out: &Path,
    models: &[Classifier<B>],
    banks: &[KnnBank],
    cfg: &ModelConfig,
    b: &Bundle,
) -> Result<()> {
    for (k, m) in models.iter().enumerate() {
        let dir = match models {
            [_] => out.to_path_buf(),
            _ => member_dir(out, k + 1),
        };
        save_classifier(&dir, m, cfg)?;
        if let Some(bank) = banks.get(k) {
            save_bank(&dir.join(KNN_FILE), bank)?;
        }
    }
    crate::atomic::write(&out.join("bundle.json"), serde_json::to_string_pretty(b)?)?;
    Ok(())
}

/// A model's k-NN bank in its bundle directory.
const KNN_FILE: &str = "knn.safetensors";

/// Features [N, D] and labels [N, L] (as f32: class ids and 0/1 flags are exact).
fn save_bank(path: &Path, bank: &KnnBank) -> Result<()> {
    let f = &bank.features;
    let y = &bank.labels;
    write_f32_safetensors(
        path,
        &[
            F32Tensor::new("features", f.shape().to_vec(), f.iter().copied().collect()),
            F32Tensor::new(
                "labels",
                y.shape().to_vec(),
                y.iter().map(|&v| v as f32).collect(),
            ),
        ],
        None,
    )?;
    Ok(())
}

/// A bank written by [`save_bank`], checked against the model it votes for: `dim`-d features,
/// finite, one label row each, labels that are class ids (or 0/1 flags) of `bundle`'s task.
fn load_bank(path: &Path, dim: usize, bundle: &Bundle) -> Result<KnnBank> {
    let mut t = f32_tensors(&map_file(path)?, path)?;
    let mut get = |k: &str| {
        t.remove(k)
            .with_context(|| format!("{}: no tensor '{k}'", path.display()))
    };
    let ((fs, f), (ys, y)) = (get("features")?, get("labels")?);
    let multi = bundle.task == "multilabel";
    let width = if multi { bundle.classes } else { 1 };
    if fs.len() != 2 || fs[1] != dim || ys != [fs[0], width] || fs[0] == 0 {
        bail!(
            "{}: k-NN bank shapes {fs:?} (features) and {ys:?} (labels) do not fit {dim}-d features \
             with {width} label column(s) per image",
            path.display()
        );
    }
    if let Some(i) = f.iter().position(|v| !v.is_finite()) {
        bail!("{}: feature value {i} is {}", path.display(), f[i]);
    }
    let top = if multi {
        1
    } else {
        bundle.classes.saturating_sub(1)
    };
    if let Some(v) = y
        .iter()
        .find(|&&v| v.fract() != 0.0 || !(0.0..=top as f32).contains(&v))
    {
        bail!(
            "{}: label {v} is no {} of a {}-class task",
            path.display(),
            if multi { "0/1 flag" } else { "class id" },
            bundle.classes
        );
    }
    Ok(KnnBank {
        features: Array2::from_shape_vec((fs[0], dim), f).expect("checked shape"),
        labels: Array2::from_shape_vec((fs[0], width), y.into_iter().map(|v| v as i64).collect())
            .expect("checked shape"),
    })
}

fn member_dir(out: &Path, k: usize) -> PathBuf {
    out.join("members").join(k.to_string())
}

/// `dir/encoder/` (a model directory) and `dir/head.safetensors`.
fn save_classifier<B: Backend>(dir: &Path, m: &Classifier<B>, cfg: &ModelConfig) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    save_model_dir(&m.backbone, cfg, &dir.join("encoder"))?;
    let w = m.head.weight.val().transpose();
    let [c, d] = w.dims();
    let w: Vec<f32> = w.into_data().convert::<f32>().to_vec().expect("f32");
    let bias: Vec<f32> = match &m.head.bias {
        Some(b) => b.val().into_data().convert::<f32>().to_vec().expect("f32"),
        None => vec![0.0; c],
    };
    write_f32_safetensors(
        &dir.join("head.safetensors"),
        &[
            F32Tensor::new("weight", vec![c, d], w),
            F32Tensor::new("bias", vec![c], bias),
        ],
        None,
    )?;
    Ok(())
}

/// A bundle written by `finetune`, ready to predict: its model (or an ensemble's members) and,
/// with a k-NN mix, each model's training features.
pub struct Predictor<B: Backend> {
    pub models: Vec<Classifier<B>>,
    pub cfg: ModelConfig,
    pub bundle: Bundle,
    banks: Vec<KnnBank>,
}

impl<B: Backend> Predictor<B> {
    pub fn load(dir: &Path, dev: &B::Device) -> Result<Self> {
        let text = std::fs::read_to_string(dir.join("bundle.json"))
            .with_context(|| format!("{}: not a bundle (no bundle.json)", dir.display()))?;
        let bundle: Bundle = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid bundle.json", dir.display()))?;
        // predict reads the task to choose sigmoids (multi-label) or a softmax: a misspelt one
        // must not fall back to the softmax.
        let tasks = [
            Task::Binary,
            Task::MultiClass,
            Task::MultiLabel,
            Task::Ordinal,
        ]
        .map(task_name);
        if !tasks.contains(&bundle.task.as_str()) {
            bail!(
                "{}: unknown task '{}' (one of {})",
                dir.join("bundle.json").display(),
                bundle.task,
                tasks.join(", ")
            );
        }
        if let Some(m) = &bundle.knn {
            let ok = (0.0..=1.0).contains(&m.lambda) && m.k >= 1 && m.temperature > 0.0;
            if !ok || !m.temperature.is_finite() {
                bail!(
                    "{}: invalid k-NN mix (λ {} must be in [0, 1], k {} at least 1, temperature {} positive)",
                    dir.join("bundle.json").display(),
                    m.lambda,
                    m.k,
                    m.temperature
                );
            }
        }
        let dirs: Vec<PathBuf> = if bundle.ensemble.is_empty() {
            vec![dir.to_path_buf()]
        } else {
            (1..=bundle.ensemble.len())
                .map(|k| member_dir(dir, k))
                .collect()
        };
        let (mut models, mut banks) = (Vec::new(), Vec::new());
        let mut first: Option<ModelConfig> = None;
        for (k, d) in dirs.iter().enumerate() {
            let (m, cfg) = load_classifier(d, &bundle, dev)?;
            if bundle.knn.is_some() {
                let dim = m.backbone.embed_dim() * if bundle.cls_mean { 2 } else { 1 };
                banks.push(load_bank(&d.join(KNN_FILE), dim, &bundle)?);
            }
            match &first {
                // predict feeds every member the same input.
                Some(f) if f.preprocess != cfg.preprocess => bail!(
                    "{}: ensemble member {} preprocesses its input differently from member 1",
                    dir.display(),
                    k + 1
                ),
                Some(_) => {}
                None => first = Some(cfg),
            }
            models.push(m);
        }
        Ok(Self {
            models,
            cfg: first.expect("a bundle has a model"),
            bundle,
            banks,
        })
    }

    /// Class probabilities [N, classes] of one model-ready batch `x` [N, C, H, W].
    pub fn probabilities(&self, x: Tensor<B, 4>) -> Array2<f64> {
        let b = &self.bundle;
        let multi = b.task == "multilabel";
        let Some(mix) = &b.knn else {
            return batch_probabilities(&self.models, x, multi, b.finetune.tta);
        };
        let (p, f) = batch_probabilities_and_features(&self.models, x, multi, b.finetune.tta);
        let v = votes(&self.banks, &f, b.classes, multi, mix.knn());
        knn_mix::mix(p.view(), v.view(), mix.lambda)
    }
}

fn load_classifier<B: Backend>(
    dir: &Path,
    bundle: &Bundle,
    dev: &B::Device,
) -> Result<(Classifier<B>, ModelConfig)> {
    let (vit, cfg) = load_model_dir::<B>(&dir.join("encoder"), dev)?;
    let head_path = dir.join("head.safetensors");
    let mut head = f32_tensors(&map_file(&head_path)?, &head_path)?;
    let mut get = |k: &str| {
        head.remove(k)
            .with_context(|| format!("{}: no tensor '{k}'", head_path.display()))
    };
    let (ws, w) = get("weight")?;
    let (bs, b) = get("bias")?;
    let d = vit.embed_dim() * if bundle.cls_mean { 2 } else { 1 };
    if ws != [bundle.classes, d] || bs != [bundle.classes] {
        bail!(
            "{}: head shapes {ws:?}/{bs:?} do not match {} classes on {d}-d features",
            head_path.display(),
            bundle.classes
        );
    }
    let (c, n) = (ws[0], ws[1]);
    let wt: Vec<f32> = (0..n)
        .flat_map(|j| (0..c).map(move |i| (i, j)))
        .map(|(i, j)| w[i * n + j])
        .collect();
    let mut m = Classifier::new(vit, bundle.classes, bundle.cls_mean, 0.0, 0, dev);
    m.head.weight = Param::from_tensor(Tensor::from_data(TensorData::new(wt, [n, c]), dev));
    m.head.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(b, [c]),
        dev,
    )));
    Ok((m, cfg))
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Bundle directory written by `omnirad finetune`.
    #[arg(long)]
    pub model: PathBuf,
    /// File, folder, CSV manifest or npz (DICOM, NIfTI, PNG/JPEG, …).
    #[arg(long)]
    pub input: PathBuf,
    /// Write the CSV (id, p_0, …, p_{C−1}, predicted) here instead of printing it; unreadable
    /// items are listed in OUT.failed.txt, and finished batches kept in OUT.parts/ so that a
    /// killed or stopped job continues when run again.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_parser = crate::bounded_count)]
    pub batch: usize,
    /// Stop at the first unreadable item instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// With --out: stop after this many input items (finished batches stay in OUT.parts/; the
    /// same command run again continues after them).
    #[arg(long, requires = "out")]
    pub stop_after: Option<usize>,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// The bundle's class names (MedMNIST's label table), or the class numbers.
fn class_names(bundle: &Bundle) -> Vec<String> {
    match MedMnistInfo::get(&bundle.dataset) {
        Some(info) if info.num_classes() == bundle.classes => {
            info.labels.iter().map(|l| l.to_string()).collect()
        }
        _ => (0..bundle.classes).map(|c| c.to_string()).collect(),
    }
}

/// Size and time stamps of the files `load_bundle` reads, for the resume key.
fn bundle_stamps(dir: &Path, bundle: &Bundle) -> Vec<Option<String>> {
    let models: Vec<PathBuf> = if bundle.ensemble.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        (1..=bundle.ensemble.len())
            .map(|k| member_dir(dir, k))
            .collect()
    };
    let mut stamps = vec![stamp(&dir.join("bundle.json"))];
    for m in models {
        for f in [
            "head.safetensors",
            "encoder/config.json",
            "encoder/model.safetensors",
            KNN_FILE,
        ] {
            stamps.push(stamp(&m.join(f)));
        }
    }
    stamps
}

/// A MedMNIST file of another dataset is a legal input (any image is), but almost always a
/// mistake, and the probabilities would look as plausible as the right ones.
fn warn_other_dataset(input: &Path, dataset: &str) {
    let npz = input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
    if let Some((info, _)) = parse_file_name(input).filter(|_| npz) {
        if info.name != dataset {
            eprintln!(
                "warning: {} holds {} images; this bundle was trained on {dataset}",
                input.display(),
                info.name
            );
        }
    }
}

pub fn predict_cmd(a: &PredictArgs) -> Result<()> {
    let read = a.read.options();
    let job = BatchJob {
        read: &read,
        batch: a.batch,
        strict: a.strict,
    };
    let (rows, bundle, parts) = crate::with_backend!(a.device, |B, dev| {
        let predictor = Predictor::<B>::load(&a.model, &dev)?;
        let (items, skipped) = discover(&a.input, read.split)?;
        crate::embed::note_skipped(&a.input, skipped);
        warn_other_dataset(&a.input, &predictor.bundle.dataset);
        let parts = a.out.as_ref().map(|out| Parts {
            dir: crate::embed_parts::dir_for(out),
            settings: format!(
                "predict|{}|{:?}|{:?}|{:?}",
                a.model.display(),
                bundle_stamps(&a.model, &predictor.bundle),
                a.device,
                read
            ),
            stop_after: a.stop_after,
        });
        let rows = map_items::<B>(
            &predictor.cfg.preprocess,
            items,
            &job,
            parts.as_ref(),
            &dev,
            "predict",
            |x| {
                let p = predictor.probabilities(x);
                Ok((p.iter().map(|&v| v as f32).collect(), p.ncols()))
            },
        )?;
        (rows, predictor.bundle, parts)
    });
    let Some(rows) = rows else {
        let parts = parts.expect("only parts stop a job early");
        eprintln!("{}", parts.stopped_message());
        return Ok(());
    };
    if rows.metas.is_empty() {
        if let Some(out) = &a.out {
            write_failed(out, &rows.failed)?;
        }
        report_failed(a.out.as_deref(), &rows.failed);
        if let Some(p) = &parts {
            p.remove();
        }
        bail!("{}: no readable images", a.input.display());
    }
    let names = class_names(&bundle);
    let multi = bundle.task == "multilabel";
    let mut csv = String::from("id");
    (0..bundle.classes).for_each(|c| csv.push_str(&format!(",p_{c}")));
    csv.push_str(",predicted\n");
    for (m, p) in rows.metas.iter().zip(rows.values.rows()) {
        csv.push_str(&csv_field(&m.id));
        p.iter().for_each(|v| csv.push_str(&format!(",{v:.6}")));
        let predicted = if multi {
            let on: Vec<&str> = (0..p.len())
                .filter(|&c| p[c] >= 0.5)
                .map(|c| names[c].as_str())
                .collect();
            on.join(";")
        } else {
            let best = (0..p.len()).fold(0, |b, c| if p[c] > p[b] { c } else { b });
            names[best].clone()
        };
        csv.push_str(&format!(",{}\n", csv_field(&predicted)));
    }
    let classes: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(c, n)| format!("p_{c} = {n}"))
        .collect();
    eprintln!("{}: {}", bundle.dataset, classes.join(", "));
    match &a.out {
        Some(out) => {
            crate::atomic::write(out, &csv)?;
            write_failed(out, &rows.failed)?;
            if let Some(p) = &parts {
                p.remove();
            }
            eprintln!(
                "{} predictions written to {}",
                rows.metas.len(),
                out.display()
            );
        }
        None => print!("{csv}"),
    }
    report_failed(a.out.as_deref(), &rows.failed);
    Ok(())
}
