//! `omnirad bench medmnist`: the MedMNIST v2 protocol for any encoder — official splits,
//! frozen features, a probe on train, test metrics beside the published references.
//! Modes: `knn` (DINO's weighted k-NN, k = 20, T = 0.07; needs no model selection), `linear` /
//! `mlp` (a linear or one-hidden-layer probe on standardised features) and `finetune` (the whole encoder with a linear head);
//! the last two choose their epoch on val by macro-F1. `--eval-split val` scores val instead,
//! with the epoch chosen on a stratified holdout of train, to choose between encoders or
//! settings without reading test; `--eval-split train --folds K` scores every train image by a
//! model fitted on the other K − 1 stratified folds, for the same choice on more images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use ndarray::{Array2, ArrayView2, Axis};
use omnirad_data::medmnist::{stratified_folds, stratified_holdout, MedMnistInfo, Task};
use omnirad_data::npy::read_npy;
use omnirad_data::{discover, Preprocess, ReadOptions, Split};
use omnirad_eval::baselines::{MEDMNIST_PLUS_DINO_LINEAR, MEDMNIST_V2, MEDMNIST_V2_MODELS};
use omnirad_eval::{evaluate, knn_scores, KnnConfig, Metrics};
use omnirad_model::Vit;
use omnirad_train::finetune::{ClassWeight, Views};
use omnirad_train::{linear_probe, ProbeConfig};
use serde_json::json;

use crate::device::{model_stamps, parse_device, resolve_model, stamp, Device};
use crate::embed::{embed_items, write_embeddings, BatchJob, Pool, Rows};
use crate::finetune::{Members, Scored};
use crate::run_log::RunLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Knn,
    Linear,
    /// One-hidden-layer MLP (GELU) on the frozen features, width --hidden.
    Mlp,
    /// Full fine-tuning with a linear head (layer-wise LR decay, warm-up + cosine, augmentation).
    Finetune,
    /// LoRA adapters (rank --lora-rank) on attention qkv/proj plus a linear head; encoder frozen.
    Lora,
}

#[derive(Args, Debug, Clone)]
pub struct MedMnistArgs {
    /// Folder holding the official `{name}.npz` / `{name}_{size}.npz` files.
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated dataset names (e.g. breastmnist,pneumoniamnist).
    #[arg(long, value_delimiter = ',')]
    pub datasets: Vec<String>,
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value = "knn")]
    pub mode: Mode,
    /// Which official file to read: 28 (MedMNIST v2) or 64/128/224 (MedMNIST+).
    #[arg(long, default_value_t = 28, value_parser = crate::side)]
    pub size: usize,
    /// Resize inputs to this side instead of the encoder's own (a multiple of its patch size;
    /// the position table is resampled): more tokens per image for small-image datasets.
    #[arg(long, value_parser = crate::side)]
    pub input_size: Option<usize>,
    #[arg(long, value_enum, default_value = "cls")]
    pub pool: Pool,
    #[arg(long, default_value_t = 20, value_parser = crate::at_least_one)]
    pub k: usize,
    /// Score this split. `val` chooses settings (which kept pretraining teacher or encoder to
    /// fine-tune, a learning rate) without reading test; the modes that select an epoch then
    /// select it on a stratified holdout of train the size of val (seeded per run), not on val.
    /// `train` (with --folds) cross-validates over train instead.
    #[arg(long, default_value = "test", value_parser = Split::parse)]
    pub eval_split: Split,
    /// With `--eval-split train`: K stratified folds of train (drawn per seed), each scored by
    /// a probe or fine-tune fitted on the others with its epoch chosen on val; the scores of
    /// all train images together. K times the held-out images of val, to choose between
    /// encoders or settings without reading test. (AUC over K models' pooled scores can run
    /// lower than one model's when their scales differ; ACC and macro-F1 are unaffected.)
    #[arg(long)]
    pub folds: Option<usize>,
    /// Linear probe / fine-tuning epochs (the val split picks the best); default 60 / 20, and
    /// fine-tuning makes at least 1800 optimizer steps unless this is given (BreastMNIST: 200).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 16, value_parser = crate::bounded_count)]
    pub lora_rank: usize,
    /// Encoder matmul and attention precision, all modes (bf16 = mixed precision on f32 weights).
    #[arg(long, default_value = "f32")]
    pub dtype: omnirad_model::Precision,
    /// Val-split score that picks the epoch (linear, mlp, lora, finetune): macro-f1, acc, auc, loss.
    #[arg(long, default_value = "macro-f1", value_parser = omnirad_train::finetune::Selection::parse)]
    pub select: omnirad_train::finetune::Selection,
    /// Hidden width of the MLP probe.
    #[arg(long, default_value_t = 256, value_parser = crate::bounded_count)]
    pub hidden: usize,
    /// Peak learning rate; default 1e-3 (linear, mlp, lora) / 5e-4 (finetune).
    #[arg(long, value_parser = crate::finetune::parse_positive)]
    pub lr: Option<f64>,
    /// Linear probe repeats with seeds seed, seed+1, …; the table shows mean ± std.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one)]
    pub seeds: usize,
    #[arg(long, default_value_t = 64, value_parser = crate::bounded_count)]
    pub batch: usize,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep extracted features here and reuse them when model, preprocessing, pooling and data
    /// file are unchanged (probes then train in seconds).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Write the table as OUT.md and OUT.json, and each finished run (dataset, seed) to
    /// OUT.runs.jsonl as it ends: the same command run again reuses those and trains only the rest.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fine-tuning and LoRA only (the other modes train no encoder).
    #[command(flatten, next_help_heading = "Fine-tuning and LoRA")]
    pub tune: crate::finetune::TuneArgs,
}

/// Cache file stem: md5 of everything the features depend on (the model and data files by
/// their [`stamp`]s).
fn cache_key(
    a: &MedMnistArgs,
    cfg: &omnirad_model::ModelConfig,
    file: &Path,
    split: Split,
) -> String {
    use md5::{Digest, Md5};
    let model_files = model_stamps(&a.model);
    let text = format!(
        "{}|{:?}|{}|{}|{:?}|{}|{:?}|{}",
        a.model,
        model_files,
        a.seed,
        serde_json::to_string(cfg).unwrap_or_default(),
        a.pool,
        file.display(),
        stamp(file),
        split.name()
    );
    // f32 keys stay as they were, so existing caches remain valid.
    let text = match a.dtype {
        omnirad_model::Precision::F32 => text,
        p => format!("{text}|{p:?}"),
    };
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
    format!("{name}-{}-{:x}", split.name(), Md5::digest(text.as_bytes()))
}

/// The run log's settings: every argument but the dataset list, seed count, output and cache
/// paths, and the model files' stamps.
fn log_settings(a: &MedMnistArgs) -> String {
    let settings = MedMnistArgs {
        datasets: vec![],
        seeds: 0,
        out: None,
        cache: None,
        ..a.clone()
    };
    format!("{settings:?}|{:?}", model_stamps(&a.model))
}

/// A run's name and id in the log: dataset, data file and its stamp, seed.
fn run_id(dataset: &str, file: &Path, seed: u64) -> (String, String) {
    (
        format!("{dataset} seed {seed}"),
        format!("{}|{:?}|{seed}", file.display(), stamp(file)),
    )
}

fn read_cached(stem: &Path) -> Result<Rows> {
    let values: Array2<f32> = read_npy(&stem.with_extension("npy"))?;
    let labels: Array2<i64> = read_npy(Path::new(&format!("{}.labels.npy", stem.display())))?;
    if labels.nrows() != values.nrows() {
        bail!("{}: cached features and labels disagree", stem.display());
    }
    let metas = labels
        .rows()
        .into_iter()
        .map(|l| omnirad_data::Meta {
            labels: l.to_vec(),
            ..Default::default()
        })
        .collect();
    Ok(Rows {
        values,
        metas,
        failed: vec![],
    })
}

fn file_for(data: &Path, name: &str, size: usize) -> PathBuf {
    data.join(if size == 28 {
        format!("{name}.npz")
    } else {
        format!("{name}_{size}.npz")
    })
}

struct Row {
    name: String,
    /// One entry per probe seed (k-NN is deterministic: one run).
    runs: Vec<Metrics>,
    model_size: usize,
}

/// "mean ± std" over runs (population std), or the single value.
fn summary(runs: &[Metrics], f: fn(&Metrics) -> f64) -> String {
    let v: Vec<f64> = runs.iter().map(f).collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() == 1 {
        return format!("{mean:.3}");
    }
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    format!("{mean:.3} ± {sd:.3}")
}

/// A dataset's table row; its summary is printed as it is made.
fn row(name: &str, runs: Vec<Metrics>, model_size: usize, scored: &str) -> Row {
    eprintln!(
        "{name}: {scored} ACC {} AUC {} macro-F1 {}",
        summary(&runs, |m| m.acc),
        summary(&runs, |m| m.auc),
        summary(&runs, |m| m.macro_f1)
    );
    Row {
        name: name.to_string(),
        runs,
        model_size,
    }
}

pub fn run(a: &MedMnistArgs) -> Result<()> {
    if a.datasets.is_empty() {
        bail!("--datasets is empty (e.g. --datasets breastmnist,pneumoniamnist)");
    }
    match (a.eval_split, a.folds) {
        (Split::Train, Some(k)) if k >= 2 => {}
        (Split::Train, _) => {
            bail!("--eval-split train scores train by cross-validation: add --folds K (K >= 2)")
        }
        (_, Some(_)) => bail!("--folds cross-validates over train: add --eval-split train"),
        _ => {}
    }
    if !matches!(a.mode, Mode::Finetune | Mode::Lora) {
        if let Some(flag) = a.tune.first_set() {
            bail!(
                "{flag} applies to --mode finetune or lora (--mode {} works on frozen features)",
                format!("{:?}", a.mode).to_lowercase()
            );
        }
    }
    a.tune.check_l2sp(false, a.mode == Mode::Lora)?;
    let mut plan = Vec::new();
    for name in &a.datasets {
        let info = MedMnistInfo::get(name).with_context(|| {
            let known: Vec<_> = MedMnistInfo::all()
                .iter()
                .filter(|d| !d.is_3d)
                .map(|d| d.name)
                .collect();
            format!(
                "unknown dataset '{name}' (2D MedMNIST sets: {})",
                known.join(", ")
            )
        })?;
        if info.is_3d {
            bail!("{name} is a 3D dataset; bench medmnist covers the 2D sets");
        }
        let file = file_for(&a.data, name, a.size);
        if !file.is_file() {
            bail!(
                "{}: not found (expected the official {name} file for size {})",
                file.display(),
                a.size
            );
        }
        crate::finetune::warn_unofficial(&file);
        plan.push((info, file));
    }
    let mut log = RunLog::<Metrics>::open(a.out.as_deref(), log_settings(a))?;
    let seeds: Vec<u64> = match a.mode {
        // k-NN is deterministic: one run.
        Mode::Knn => vec![a.seed],
        _ => (a.seed..a.seed + a.seeds as u64).collect(),
    };
    let rows = crate::with_backend!(a.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.seed)?;
        let cfg = crate::device::with_input_size(cfg, a.input_size)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, a.dtype)?);
        let mut rows = Vec::new();
        for (info, file) in &plan {
            let mut runs = Vec::new();
            let mut todo = Vec::new();
            for &seed in &seeds {
                let (run, id) = run_id(info.name, file, seed);
                match log.get(&run, &id) {
                    Some(m) => runs.push((seed, m)),
                    None => todo.push(seed),
                }
            }
            if matches!(a.mode, Mode::Finetune | Mode::Lora) {
                for seed in todo {
                    let mut ft = omnirad_train::finetune::FinetuneConfig {
                        batch: a.batch,
                        seed,
                        cls_mean: a.pool == Pool::ClsMean,
                        select: a.select,
                        precision: a.dtype,
                        ..Default::default()
                    };
                    a.tune.apply(&mut ft);
                    if a.mode == Mode::Lora {
                        ft.lora = Some(omnirad_train::finetune::LoraConfig {
                            rank: a.lora_rank,
                            ..Default::default()
                        });
                        ft.lr = 1e-3;
                    }
                    ft.set_epochs(a.epochs);
                    ft.lr = a.lr.unwrap_or(ft.lr);
                    let run_on = |scored| {
                        crate::finetune::run_on_npz::<B>(
                            vit.clone(),
                            &cfg,
                            file,
                            &ft,
                            a.tune.members(),
                            &dev,
                            scored,
                            None,
                        )
                        .map(|o| o.expect("without a run directory nothing stops training early"))
                    };
                    let chose = |what: String, o: &crate::finetune::Outcome<B>| match o
                        .members
                        .as_slice()
                    {
                        [m] => eprintln!(
                            "{what}: fine-tuning chose epoch {} by {} {} ({})",
                            m.epoch,
                            selection_split(a),
                            a.select.name(),
                            selection_summary(a, &m.val)
                        ),
                        ms => eprintln!(
                            "{what}: {} of {} fine-tunes ({})",
                            a.tune.members().name(),
                            ms.len(),
                            selection_summary(a, &o.val)
                        ),
                    };
                    let m = match a.eval_split {
                        Split::Train => {
                            let y =
                                omnirad_data::medmnist::NpzSplit::load(file, Split::Train)?.labels;
                            let k = a.folds.unwrap_or(2);
                            let folds = stratified_folds(y.view(), k, seed);
                            let mut parts = Vec::new();
                            for (f, (rest, held)) in folds.iter().enumerate() {
                                let o = run_on(Scored::Fold { rest, held })?;
                                let what = format!("{} seed {seed} fold {}/{k}", info.name, f + 1);
                                chose(what.clone(), &o);
                                fold_scored(&what, &o.test);
                                parts.push((held, o.scores));
                            }
                            let task = crate::finetune::task_kind(info.task);
                            evaluate(task, y.view(), out_of_fold(y.nrows(), parts).view())
                        }
                        s => {
                            let o = run_on(if s == Split::Val {
                                Scored::Val
                            } else {
                                Scored::Test
                            })?;
                            chose(format!("{} seed {seed}", info.name), &o);
                            o.test
                        }
                    };
                    let (run, id) = run_id(info.name, file, seed);
                    log.record(&run, &id, &m)?;
                    runs.push((seed, m));
                }
            } else if !todo.is_empty() {
                let embed = |split: Split| -> Result<Rows> {
                    let key = a
                        .cache
                        .as_ref()
                        .map(|dir| dir.join(cache_key(a, &cfg, file, split)));
                    if let Some(hit) = key.as_ref().and_then(|k| read_cached(k).ok()) {
                        return Ok(hit);
                    }
                    let e = embed_split(&vit, &cfg.preprocess, file, split, a.pool, a.batch, &dev)?;
                    if let Some(k) = &key {
                        write_embeddings(&k.with_extension("npy"), &e)?;
                    }
                    Ok(e)
                };
                let train = embed(Split::Train)?;
                let ytr = labels(&train)?;
                let scored = match a.eval_split {
                    Split::Train => None,
                    s => {
                        let e = embed(s)?;
                        let y = labels(&e)?;
                        Some((e.values, y))
                    }
                };
                let multi = info.task == Task::MultiLabel;
                let task = crate::finetune::task_kind(info.task);
                // The probes choose their epoch on val, or (scoring val) on a holdout of train.
                let val = match (a.mode, a.eval_split) {
                    (Mode::Linear | Mode::Mlp, Split::Test | Split::Train) => {
                        let e = embed(Split::Val)?;
                        let y = labels(&e)?;
                        Some((e.values, y))
                    }
                    _ => None,
                };
                for seed in todo {
                    // Fitted on the `fit` rows of train, selecting on the `held` rows or val.
                    let fit_and_score = |fit: &[usize],
                                         held: Option<&[usize]>,
                                         eval: ArrayView2<f32>,
                                         what: &str| {
                        let rows = |idx: &[usize]| {
                            (train.values.select(Axis(0), idx), ytr.select(Axis(0), idx))
                        };
                        let (x, y) = rows(fit);
                        if a.mode == Mode::Knn {
                            let knn = KnnConfig {
                                k: a.k,
                                ..Default::default()
                            };
                            return knn_scores(
                                x.view(),
                                y.view(),
                                eval,
                                info.num_classes(),
                                multi,
                                knn,
                            );
                        }
                        let (xs, ys) = match (held, &val) {
                            (Some(h), _) => rows(h),
                            (None, Some((x, y))) => (x.clone(), y.clone()),
                            (None, None) => {
                                unreachable!("the probes select on val or a holdout")
                            }
                        };
                        let mut cfg = ProbeConfig {
                            seed,
                            select: a.select,
                            ..Default::default()
                        };
                        cfg.epochs = a.epochs.unwrap_or(cfg.epochs);
                        cfg.lr = a.lr.unwrap_or(cfg.lr);
                        if a.mode == Mode::Mlp {
                            cfg.hidden = a.hidden;
                        }
                        let r = linear_probe::<omnirad_model::Train<B>>(
                            (x.view(), y.view()),
                            (xs.view(), ys.view()),
                            eval,
                            info.num_classes(),
                            task,
                            &cfg,
                            &dev,
                        );
                        eprintln!(
                            "{what}: {:?} probe chose epoch {} by {} {} ({})",
                            a.mode,
                            r.best_epoch,
                            selection_split(a),
                            a.select.name(),
                            selection_summary(a, &r.val)
                        );
                        r.test_scores
                    };
                    let what = format!("{} seed {seed}", info.name);
                    let m = match &scored {
                        Some((x, y)) => {
                            let all: Vec<usize> = (0..ytr.nrows()).collect();
                            let scores = if a.eval_split == Split::Val && a.mode != Mode::Knn {
                                let (rest, held) = stratified_holdout(ytr.view(), y.nrows(), seed);
                                fit_and_score(&rest, Some(&held), x.view(), &what)
                            } else {
                                fit_and_score(&all, None, x.view(), &what)
                            };
                            evaluate(task, y.view(), scores.view())
                        }
                        None => {
                            let k = a.folds.unwrap_or(2);
                            let folds = stratified_folds(ytr.view(), k, seed);
                            let parts = folds
                                .iter()
                                .enumerate()
                                .map(|(f, (rest, held))| {
                                    let x = train.values.select(Axis(0), held);
                                    let what = format!("{what} fold {}/{k}", f + 1);
                                    let scores = fit_and_score(rest, None, x.view(), &what);
                                    let y = ytr.select(Axis(0), held);
                                    fold_scored(&what, &evaluate(task, y.view(), scores.view()));
                                    (held, scores)
                                })
                                .collect();
                            evaluate(task, ytr.view(), out_of_fold(ytr.nrows(), parts).view())
                        }
                    };
                    let (run, id) = run_id(info.name, file, seed);
                    log.record(&run, &id, &m)?;
                    runs.push((seed, m));
                }
            }
            runs.sort_by_key(|(seed, _)| *seed);
            let runs = runs.into_iter().map(|(_, m)| m).collect();
            rows.push(row(info.name, runs, cfg.preprocess.size, &scored_name(a)));
        }
        rows
    });
    let md = table(a, &rows);
    println!("{md}");
    if let Some(out) = &a.out {
        let j = json!({
            "model": a.model, "mode": format!("{:?}", a.mode).to_lowercase(), "dtype": format!("{:?}", a.dtype).to_lowercase(), "k": a.k, "seeds": a.seeds, "file_size": a.size,
            "pool": format!("{:?}", a.pool).to_lowercase(), "select": a.select.name(), "split": a.eval_split.name(), "folds": a.folds,
            "results": rows.iter().map(|r| json!({ "dataset": r.name, "input": format!("{}px resized to {}px", a.size, r.model_size), "runs": r.runs })).collect::<Vec<_>>(),
        });
        crate::atomic::write(&out.with_extension("md"), &md)?;
        crate::atomic::write(
            &out.with_extension("json"),
            serde_json::to_string_pretty(&j)?,
        )?;
    }
    Ok(())
}

/// Every image of one split of an official file, embedded (an unreadable image is an error).
fn embed_split<B: Backend>(
    vit: &Vit<B>,
    pre: &Preprocess,
    file: &Path,
    split: Split,
    pool: Pool,
    batch: usize,
    dev: &B::Device,
) -> Result<Rows> {
    let read = ReadOptions {
        split,
        ..Default::default()
    };
    let (items, _) = discover(file, split)?;
    let job = BatchJob {
        read: &read,
        batch,
        strict: true,
    };
    embed_items::<B>(vit, pre, items, &job, pool, dev)
}

fn labels(e: &Rows) -> Result<Array2<i64>> {
    e.labels().context("a split without labelled images")
}

/// The k-NN probe (k = 20, class tokens) fitted on an official file's train split and scored
/// on `split`: what `bench medmnist --mode knn --eval-split` reports for one dataset.
pub fn knn_eval<B: Backend>(
    vit: &Vit<B>,
    pre: &Preprocess,
    file: &Path,
    split: Split,
    dev: &B::Device,
) -> Result<Metrics> {
    let info = omnirad_data::medmnist::parse_file_name(file)
        .map(|(info, _)| info)
        .with_context(|| format!("{}: not an official MedMNIST file name", file.display()))?;
    let embed = |split| embed_split(vit, pre, file, split, Pool::Cls, 64, dev);
    let (train, eval) = (embed(Split::Train)?, embed(split)?);
    let scores = knn_scores(
        train.values.view(),
        labels(&train)?.view(),
        eval.values.view(),
        info.num_classes(),
        info.task == Task::MultiLabel,
        KnnConfig::default(),
    );
    Ok(evaluate(
        crate::finetune::task_kind(info.task),
        labels(&eval)?.view(),
        scores.view(),
    ))
}

fn selection_summary(a: &MedMnistArgs, m: &Metrics) -> String {
    format!(
        "{} ACC {:.3} AUC {:.3} macro-F1 {:.3}",
        selection_split(a),
        m.acc,
        m.auc,
        m.macro_f1
    )
}

/// Fine-tuning's epochs and the options that change what is scored, for the table's caption.
fn schedule(a: &MedMnistArgs) -> String {
    if !matches!(a.mode, Mode::Finetune | Mode::Lora) {
        return String::new();
    }
    let d = omnirad_train::finetune::FinetuneConfig::default();
    let mut s = match a.epochs {
        Some(e) => format!(", {e} epochs"),
        None => format!(", {} epochs or {} steps if more", d.epochs, d.min_steps),
    };
    if a.tune.head_epochs > 0 && a.mode == Mode::Finetune {
        s += &format!(" after {} head-only", a.tune.head_epochs);
    }
    if let Some(d) = a.tune.ema {
        s += &format!(", weight EMA {d}");
    }
    if a.tune.mixup > 0.0 {
        s += &format!(", mixup α {}", a.tune.mixup);
    }
    if a.tune.class_weight == ClassWeight::Balanced {
        s += ", class-balanced loss";
    }
    if a.tune.augment == Views::Strong {
        s += ", strong augmentation";
    }
    if a.tune.tta {
        s += ", scored with mirror TTA";
    }
    if let Some(rho) = a.tune.sam {
        s += &format!(", SAM ρ {rho}");
    }
    if let Some(l) = a.tune.l2sp {
        s += &format!(", L2-SP λ {l}");
    }
    match a.tune.members() {
        Members::One => {}
        Members::Soup(n) => s += &format!(
            ", a uniform soup of {n} fine-tunes per seed (weights averaged; each at its selected epoch)"
        ),
        Members::Ensemble(n) => s += &format!(
            ", an ensemble of {n} fine-tunes per seed (class probabilities averaged; each at its selected epoch)"
        ),
    }
    if a.tune.knn_mix {
        s += ", mixed with a k-NN vote over train (k 20, λ chosen on the selection split)";
    }
    s
}

/// What the table scores: "test", "val" or "train, 5-fold cross-validated".
fn scored_name(a: &MedMnistArgs) -> String {
    match (a.eval_split, a.folds) {
        (Split::Train, Some(k)) => format!("train, {k}-fold cross-validated"),
        (s, _) => s.name().to_string(),
    }
}

/// A fold's own scores, printed: their spread, and AUC per model beside the pooled one.
fn fold_scored(what: &str, m: &Metrics) {
    eprintln!(
        "{what}: held-out fold ACC {:.3} AUC {:.3} macro-F1 {:.3}",
        m.acc, m.auc, m.macro_f1
    );
}

/// One score table for all n items from the folds' (rows, scores) pairs.
fn out_of_fold(n: usize, parts: Vec<(&Vec<usize>, Array2<f64>)>) -> Array2<f64> {
    let classes = parts.first().map_or(0, |(_, s)| s.ncols());
    let mut out = Array2::zeros((n, classes));
    for (rows, scores) in parts {
        for (r, &i) in rows.iter().enumerate() {
            out.row_mut(i).assign(&scores.row(r));
        }
    }
    out
}

/// Where the epoch-selecting modes select their epoch.
fn selection_split(a: &MedMnistArgs) -> &'static str {
    match a.eval_split {
        Split::Val => "train-holdout",
        _ => "val",
    }
}

fn table(a: &MedMnistArgs, rows: &[Row]) -> String {
    let split = match (a.mode, a.eval_split) {
        (Mode::Knn, Split::Val) => {
            "Val split (the published references are test-split scores).".to_string()
        }
        (Mode::Knn, Split::Train) => format!(
            "Train split, {}-fold cross-validated: stratified folds drawn per seed, each scored by a k-NN on the others (the published references are test-split scores).",
            a.folds.unwrap_or(2)
        ),
        (Mode::Knn, _) => "Test split.".to_string(),
        (_, Split::Train) => format!(
            "Train split, {}-fold cross-validated: stratified folds drawn per seed, each scored by a model fitted on the others at the epoch chosen by val {} (the published references are test-split scores).",
            a.folds.unwrap_or(2),
            a.select.name()
        ),
        (_, Split::Val) => format!(
            "Val split at the epoch chosen by {} on a stratified holdout of train the size of val, drawn per seed (the published references are test-split scores).",
            a.select.name()
        ),
        _ => format!("Test split at the epoch chosen by val {}.", a.select.name()),
    };
    let mut s = format!(
        "omnirad `{}`, {}, {} features; input {}px files resized to {}px (bicubic). {split}\n\n",
        a.model,
        match a.mode {
            Mode::Knn => format!("k-NN probe (k = {})", a.k),
            Mode::Linear => "linear probe".to_string(),
            Mode::Mlp => format!("MLP probe (hidden {})", a.hidden),
            Mode::Finetune => "full fine-tuning, linear head".to_string(),
            Mode::Lora => format!(
                "LoRA (rank {}) on attention + linear head, encoder frozen",
                a.lora_rank
            ),
        } + match a.dtype {
            omnirad_model::Precision::Bf16 => " (bf16 mixed precision)",
            omnirad_model::Precision::F32 => "",
        } + &schedule(a),
        format!("{:?}", a.pool).to_lowercase(),
        a.size,
        rows.first().map(|r| r.model_size).unwrap_or(0)
    );
    s += "| dataset | ACC | AUC | macro-F1 | published (AUC / ACC) |\n|---|---|---|---|---|\n";
    for r in rows {
        let mut refs: Vec<String> = MEDMNIST_V2
            .iter()
            .filter(|(n, _)| *n == r.name)
            .flat_map(|(_, v)| {
                v.iter()
                    .zip(MEDMNIST_V2_MODELS)
                    .map(|((auc, acc), m)| format!("{m} {auc:.3} / {acc:.3}"))
            })
            .collect();
        let col = match a.size {
            28 => Some(0),
            64 => Some(1),
            128 => Some(2),
            224 => Some(3),
            _ => None,
        };
        if let (Some(c), Some((_, v))) = (
            col,
            MEDMNIST_PLUS_DINO_LINEAR.iter().find(|(n, _)| *n == r.name),
        ) {
            refs.push(format!(
                "DINO ViT-B/16 linear ({}px) – / {:.3}",
                a.size,
                v[c] / 100.0
            ));
        }
        s += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            summary(&r.runs, |m| m.acc),
            summary(&r.runs, |m| m.auc),
            summary(&r.runs, |m| m.macro_f1),
            refs.join("; ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_fold_puts_each_folds_scores_on_its_rows() {
        let (a, b) = (vec![1, 3], vec![0, 2, 4]);
        let sa = ndarray::array![[0.1, 0.9], [0.3, 0.7]];
        let sb = ndarray::array![[1.0, 0.0], [0.8, 0.2], [0.6, 0.4]];
        let got = out_of_fold(5, vec![(&a, sa), (&b, sb)]);
        let want = ndarray::array![[1.0, 0.0], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]];
        assert_eq!(got, want);
    }
}
