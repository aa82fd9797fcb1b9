//! `omnirad segment train|eval|predict` and `omnirad bench medsegbench`.
//!
//! Bundle directory:
//! ```text
//! OUT/segment.json        head config, training config, classes, data protocol, val/test scores
//! OUT/encoder/            the encoder as a model directory (fine-tuned when --backbone-lr > 0)
//! OUT/head.safetensors    the head's weights (burn names)
//! OUT/history.jsonl       per epoch: train loss terms, val Dice/IoU, lr
//! OUT/run.json            the settings (a --resume must match them)
//! OUT/checkpoint.safetensors  after every epoch: weights, best weights, AdamW moments
//! OUT/overlays/           a few test images: ground truth (green) and prediction (red) outlines
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};
use ndarray::{Array2, Array3, ArrayView2};
use omnirad_data::discover;
use omnirad_data::loader::image_chunks;
use omnirad_data::seg::{open_splits, Pixels, SegSample, SegSplits, SegWindow};
use omnirad_eval::baselines::{MEDSEGBENCH_DICE, MEDSEGBENCH_MODELS};
use omnirad_eval::{SegEvaluator, SegScores};
use omnirad_model::{
    load_model_dir, load_module, save_model_dir, save_module, ModelConfig, SegHeadConfig,
    SegHeadKind, Segmenter, Vit,
};
use omnirad_train::segment::{
    argmax, build, evaluate, load_state, predict_probs, save_state, train, SegTrainConfig,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::device::{model_stamps, parse_device, resolve_model, stamp, Device};
use crate::journal::{Journal, CHUNK};
use crate::run_dir::RunDir;
use crate::run_log::RunLog;
use crate::ReadArgs;

#[derive(Subcommand)]
pub enum SegmentCmd {
    /// Train a segmentation head on an encoder; writes a bundle and scores the test split.
    Train(TrainArgs),
    /// Dice/IoU of a bundle on a dataset split.
    Eval(EvalArgs),
    /// Masks and overlays for files or folders (PNG/JPEG/DICOM/NIfTI …).
    Predict(PredictArgs),
}

fn parse_window(s: &str) -> Result<String, String> {
    match s {
        "resize" | "sliding" => Ok(s.to_string()),
        _ => Err(format!("unknown window '{s}' (resize, sliding)")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct HeadArgs {
    /// Encoder matmul/attention precision: bf16 = mixed precision on f32 weights (for GPUs and
    /// CPUs with AMX or AVX-512 BF16).
    #[arg(long, default_value = "f32")]
    pub dtype: omnirad_model::Precision,
    /// adapter (multi-layer ViT taps + CNN detail branch + U-Net decoder) or linear (per patch).
    #[arg(long, default_value = "adapter", value_parser = SegHeadKind::parse)]
    pub head: SegHeadKind,
    /// Tapped blocks, 0-based (default: 4 evenly spaced for adapter, the last for linear).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    #[arg(long, default_value_t = 64, value_parser = crate::bounded_count)]
    pub width: usize,
    #[arg(long, default_value_t = 16, value_parser = crate::bounded_count)]
    pub conv_width: usize,
    /// Network input side (a multiple of the patch size).
    #[arg(long, default_value_t = 128, value_parser = crate::side)]
    pub size: usize,
    /// resize: whole image to --size; sliding: native resolution in --size windows.
    #[arg(long, value_parser = parse_window)]
    pub window: Option<String>,
    /// Overlap of neighbouring windows in pixels (sliding).
    #[arg(long, default_value_t = 32)]
    pub overlap: usize,
    #[arg(long, default_value_t = 30, value_parser = crate::at_least_one)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::bounded_count)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 2)]
    pub warmup_epochs: usize,
    /// Training views per image and epoch (default: 1 resized, 8 windows when sliding).
    #[arg(long)]
    pub views_per_image: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub ce_weight: f64,
    #[arg(long, default_value_t = 1.0)]
    pub dice_weight: f64,
    /// Fine-tune the encoder at this fraction of --lr (0 = frozen encoder).
    #[arg(long, default_value_t = 0.0)]
    pub backbone_lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl HeadArgs {
    fn window(&self, default: &str) -> Result<SegWindow> {
        Ok(match self.window.as_deref().unwrap_or(default) {
            "sliding" => {
                if self.overlap >= self.size {
                    bail!(
                        "--overlap {} must be smaller than the window --size {}",
                        self.overlap,
                        self.size
                    );
                }
                SegWindow::Sliding {
                    overlap: self.overlap,
                }
            }
            _ => SegWindow::Resize,
        })
    }

    fn train_config(&self, window: SegWindow) -> SegTrainConfig {
        SegTrainConfig {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            warmup_epochs: self.warmup_epochs,
            weight_decay: self.weight_decay,
            size: self.size,
            window,
            views_per_image: self.views_per_image.unwrap_or(match window {
                SegWindow::Resize => 1,
                SegWindow::Sliding { .. } => 8,
            }),
            ce_weight: self.ce_weight,
            dice_weight: self.dice_weight,
            backbone_lr: self.backbone_lr,
            seed: self.seed,
            ..SegTrainConfig::default()
        }
    }

    fn head_config(
        &self,
        kind: SegHeadKind,
        classes: usize,
        depth: usize,
    ) -> Result<SegHeadConfig> {
        let mut h = SegHeadConfig::new(kind, classes, depth);
        if let Some(l) = &self.layers {
            h.layers = l.clone();
        }
        h.width = self.width;
        h.conv_width = self.conv_width;
        h.validate(depth).map_err(anyhow::Error::msg)?;
        Ok(h)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Dataset: DRIVE / CHASE_DB1 / BUSI / images+masks folder, train/val/test folders, or a
    /// MedSegBench npz.
    #[arg(long)]
    pub data: PathBuf,
    /// Separate test folder (otherwise the dataset's own split, or a seeded 70/10/20).
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Encoder: model directory, public checkpoint, or preset (random init).
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub head: HeadArgs,
    /// Test images drawn as overlays into OUT/overlays.
    #[arg(long, default_value_t = 4)]
    pub overlays: usize,
    /// Stop at the first unreadable pair instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// Continue the run in --out from its last checkpoint (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this epoch (the checkpoint is kept; continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegBundle {
    pub kind: String,
    pub data: String,
    pub protocol: String,
    pub head: SegHeadConfig,
    pub train: SegTrainConfig,
    pub best_epoch: usize,
    pub val: serde_json::Value,
    pub test: serde_json::Value,
}

fn classes_of(splits: &SegSplits) -> usize {
    let max = splits
        .train
        .iter()
        .flat_map(|s| s.mask.iter().copied())
        .max()
        .unwrap_or(0) as usize;
    (max + 1).max(2)
}

/// `size` (named `what`) is a positive multiple of the encoder's patch size, at most
/// [`omnirad_data::preprocess::MAX_SIZE`].
fn check_size(what: &str, size: usize, cfg: &ModelConfig) -> Result<()> {
    let (p, max) = (cfg.vit.patch_size, omnirad_data::preprocess::MAX_SIZE);
    if size == 0 || !size.is_multiple_of(p) || size > max {
        bail!("{what} {size} is not a multiple of the encoder's patch size {p} up to {max}");
    }
    Ok(())
}

/// Trains one head on `splits`, prints per-epoch progress, scores test. With `run`, checkpoints
/// every epoch and resumes; returns None when stopped by `stop_after` before the last epoch.
#[allow(clippy::too_many_arguments)]
fn fit<B: Backend>(
    vit: Vit<B>,
    cfg: &ModelConfig,
    splits: &SegSplits,
    head: &SegHeadConfig,
    tc: &SegTrainConfig,
    dev: &B::Device,
    mut on_test_image: impl FnMut(&SegSample, &Array2<u8>),
    run: Option<&RunDir>,
) -> Result<Option<(omnirad_train::segment::SegResult<B>, SegScores)>> {
    check_size("--size", tc.size, cfg)?;
    if splits.train.is_empty() {
        bail!("no training pairs");
    }
    let model = build(vit, head, cfg.vit.in_chans, tc.seed, dev);
    eprintln!(
        "{:?} head: {} parameters (encoder {}, {})",
        head.kind,
        model.head.num_params(),
        model.backbone.num_params(),
        if tc.backbone_lr > 0.0 {
            "fine-tuned"
        } else {
            "frozen"
        }
    );
    let mut resume = None;
    let mut hist = None;
    if let Some(r) = run {
        r.start(&serde_json::json!({ "head": head, "train": tc, "encoder": cfg }))?;
        if r.resume {
            let state = load_state(&r.checkpoint(), &model, dev).context("--resume")?;
            eprintln!("resuming after epoch {}", state.epoch);
            resume = Some(state);
        }
        hist = Some(r.history(resume.as_ref().map_or(&[][..], |s| &s.history))?);
    }
    let mut save_error = None;
    let r = train(
        model,
        &splits.train,
        &splits.val,
        head.classes,
        &cfg.preprocess,
        tc,
        dev,
        resume,
        |l, state| {
            eprintln!(
                "epoch {:>3}: loss {:.4} (CE {:.4}, Dice loss {:.4}), val Dice {:.4} IoU {:.4}, lr {:.2e}",
                l.epoch, l.train_loss, l.train_ce, l.train_dice_loss, l.val_dice, l.val_iou, l.lr
            );
            let Some(r) = run else { return true };
            if let Some(h) = hist.as_mut() {
                h.push(l);
            }
            if let Err(e) = save_state(&r.checkpoint(), state) {
                save_error = Some(e);
                return false;
            }
            r.go_on(l.epoch)
        },
    );
    if let Some(e) = save_error {
        return Err(e).context("writing the checkpoint");
    }
    if r.history.len() < tc.epochs {
        return Ok(None);
    }
    let test = evaluate(
        &r.model,
        &splits.test,
        head.classes,
        tc.size,
        tc.window,
        &cfg.preprocess,
        tc.batch,
        dev,
        &mut on_test_image,
    );
    Ok(Some((r, test)))
}

fn scores_json(s: &SegScores) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

pub fn train_cmd(a: &TrainArgs) -> Result<()> {
    let splits = open_splits(&a.data, a.test_data.as_deref(), a.head.seed, a.strict)?;
    report_failed(&splits);
    let classes = classes_of(&splits);
    eprintln!(
        "{}: {} train / {} val / {} test images, {classes} classes ({})",
        a.data.display(),
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        splits.protocol
    );
    crate::with_backend!(a.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.head.seed)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, a.head.dtype)?);
        let head = a.head.head_config(a.head.head, classes, vit.blocks.len())?;
        let tc = a.head.train_config(a.head.window("resize")?);
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        let overlays = a.out.join("overlays");
        std::fs::create_dir_all(&overlays)?;
        let mut drawn = 0;
        let mut names = crate::names::OutputNames::new(None);
        let run = RunDir::new(&a.out, a.resume, a.stop_after);
        let Some((r, test)) = fit(
            vit,
            &cfg,
            &splits,
            &head,
            &tc,
            &dev,
            |s, pred| {
                if drawn < a.overlays {
                    drawn += 1;
                    let name = names.name(&s.id);
                    let written =
                        crate::names::output_path(&overlays, &name, ".png").and_then(|path| {
                            write_overlay(&s.pixels.to_f32(), Some(s.mask.view()), pred, &path)
                        });
                    if let Err(e) = written {
                        eprintln!("overlay {}: {e:#}", name.display());
                    }
                }
            },
            Some(&run),
        )?
        else {
            eprintln!("{}", run.stopped_message());
            return Ok(());
        };
        let bundle = SegBundle {
            kind: "segment".into(),
            data: a.data.display().to_string(),
            protocol: splits.protocol.clone(),
            head: head.clone(),
            train: tc.clone(),
            best_epoch: r.best_epoch,
            val: scores_json(&r.val),
            test: scores_json(&test),
        };
        save_bundle(&a.out, &r.model, &cfg, &bundle)?;
        run.finish();
        println!(
            "test: Dice {:.4} (pooled {:.4}), IoU {:.4} over {} images; epoch {} chosen on val Dice {:.4}",
            test.dice, test.dice_pooled, test.iou, test.images, r.best_epoch, r.val.dice
        );
        eprintln!("bundle written to {}", a.out.display());
        Ok(())
    })
}

fn report_failed(s: &SegSplits) {
    for (f, why) in &s.failed {
        eprintln!("skipped {f}: {why}");
    }
}

fn save_bundle<B: Backend>(
    out: &Path,
    m: &Segmenter<B>,
    cfg: &ModelConfig,
    b: &SegBundle,
) -> Result<()> {
    save_model_dir(&m.backbone, cfg, &out.join("encoder"))?;
    save_module(&m.head, &out.join("head.safetensors"))?;
    crate::atomic::write(&out.join("segment.json"), serde_json::to_string_pretty(b)?)?;
    Ok(())
}

fn load_bundle<B: Backend>(
    dir: &Path,
    dev: &B::Device,
) -> Result<(Segmenter<B>, ModelConfig, SegBundle)> {
    let path = dir.join("segment.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: not a segmentation bundle (no segment.json)",
            dir.display()
        )
    })?;
    let b: SegBundle = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid segment.json", path.display()))?;
    let (vit, cfg) = load_model_dir::<B>(&dir.join("encoder"), dev)?;
    b.head
        .validate(vit.blocks.len())
        .map_err(anyhow::Error::msg)
        .and_then(|()| check_size("train.size", b.train.size, &cfg))
        .with_context(|| format!("{}: invalid segmentation bundle", path.display()))?;
    let head = b
        .head
        .init::<B>(vit.embed_dim(), vit.patch_size, cfg.vit.in_chans, dev);
    let head = load_module(head, &dir.join("head.safetensors"))?;
    Ok((
        Segmenter {
            backbone: vit,
            head,
        },
        cfg,
        b,
    ))
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Bundle written by `segment train`.
    #[arg(long)]
    pub model: PathBuf,
    /// The dataset the bundle was trained on, as given to `segment train`.
    #[arg(long)]
    pub data: PathBuf,
    /// The separate test folder, if `segment train` was given one.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Split to score: train, val or test (as `segment train` splits the data).
    #[arg(long, default_value = "test", value_parser = ["train", "val", "test"])]
    pub split: String,
    /// Stop at the first unreadable pair instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

pub fn eval_cmd(a: &EvalArgs) -> Result<()> {
    crate::with_backend!(a.device, |B, dev| {
        let (m, cfg, b) = load_bundle::<B>(&a.model, &dev)?;
        let splits = open_splits(&a.data, a.test_data.as_deref(), b.train.seed, a.strict)?;
        report_failed(&splits);
        let samples = match a.split.as_str() {
            "train" => &splits.train,
            "val" => &splits.val,
            _ => &splits.test,
        };
        if let Some(bad) = samples
            .iter()
            .find(|s| s.mask.iter().any(|&v| v as usize >= b.head.classes))
        {
            bail!(
                "{}: mask holds a class ≥ {} (the bundle's head has {} classes)",
                bad.id,
                b.head.classes,
                b.head.classes
            );
        }
        let s = evaluate(
            &m,
            samples,
            b.head.classes,
            b.train.size,
            b.train.window,
            &cfg.preprocess,
            b.train.batch,
            &dev,
            |_, _| {},
        );
        println!("{}", serde_json::to_string_pretty(&s)?);
        Ok(())
    })
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Bundle written by `segment train`.
    #[arg(long)]
    pub model: PathBuf,
    /// File or folder (PNG/JPEG/TIFF, DICOM, NIfTI slices, npz split).
    #[arg(long)]
    pub input: PathBuf,
    /// Writes NAME_mask.png (class k as grey k·255/(C−1)) and NAME_overlay.png per image, NAME
    /// being its path below --input (subfolders kept); masks.csv maps ids to them, and
    /// masks.failed.txt lists unreadable files.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop at the first unreadable item instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// Stop after this many input items; the same command run again continues after them (as
    /// it does after a kill).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    #[command(flatten)]
    pub read: ReadArgs,
}

pub fn predict_cmd(a: &PredictArgs) -> Result<()> {
    crate::with_backend!(a.device, |B, dev| {
        let (m, cfg, b) = load_bundle::<B>(&a.model, &dev)?;
        let (items, skipped) = discover(&a.input, a.read.split)?;
        crate::embed::note_skipped(&a.input, skipped);
        let items = crate::names::outside_outputs(items, &a.input, &a.out)?;
        let read = a.read.options();
        let stamps: Vec<_> = [
            "segment.json",
            "head.safetensors",
            "encoder/config.json",
            "encoder/model.safetensors",
        ]
        .iter()
        .map(|f| stamp(&a.model.join(f)))
        .collect();
        let settings = format!(
            "segment predict|{}|{stamps:?}|{:?}|{read:?}",
            a.model.display(),
            a.device
        );
        let key = crate::embed_parts::job_key(&settings, &items);
        let list = a.out.join("masks.csv");
        let mut names = crate::names::OutputNames::new(Some(&a.input));
        // Rows are `id,NAME_mask.png,NAME_overlay.png`; names are never quoted, ids may be.
        let mut journal = Journal::open(&list, key, items.len(), |row| {
            if let Some(mask) = row.rsplit(',').nth(1) {
                names.reserve(PathBuf::from(mask.trim_end_matches("_mask.png")));
            }
        })?;
        let todo = journal.todo(items.len(), a.stop_after);
        let bar = crate::embed::item_bar(items.len(), "segment");
        bar.set_position(todo.start as u64);
        let scale = 255 / (b.head.classes - 1).max(1) as u32;
        for loaded in image_chunks(&items[todo.clone()], CHUNK, &read) {
            let n = loaded.len();
            let mut rows = String::new();
            let mut outputs = Vec::new();
            for (id, images) in loaded {
                let Some(images) = journal.images(id, images, a.strict)? else {
                    continue;
                };
                for im in images {
                    let pixels = Pixels::F32(im.data);
                    let pred = argmax(&predict_probs(
                        &m,
                        &pixels,
                        b.train.size,
                        b.train.window,
                        &cfg.preprocess,
                        b.train.batch,
                        &dev,
                    ));
                    let name = names.name(&im.meta.id);
                    let shown = crate::embed::csv_field(&name.display().to_string());
                    rows.push_str(&format!(
                        "{},{shown}_mask.png,{shown}_overlay.png\n",
                        crate::embed::csv_field(&im.meta.id),
                    ));
                    outputs.push((name, pixels, pred));
                }
            }
            outputs.par_iter().try_for_each(|(name, pixels, pred)| {
                let grey =
                    image::GrayImage::from_fn(pred.ncols() as u32, pred.nrows() as u32, |x, y| {
                        image::Luma(
                            [(pred[[y as usize, x as usize]] as u32 * scale).min(255) as u8],
                        )
                    });
                save_png(
                    &grey,
                    &crate::names::output_path(&a.out, name, "_mask.png")?,
                )?;
                write_overlay(
                    &pixels.to_f32(),
                    None,
                    pred,
                    &crate::names::output_path(&a.out, name, "_overlay.png")?,
                )
            })?;
            journal.commit(n, &rows, outputs.len())?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        journal.close(items.len(), "id,mask,overlay", "masks", &a.input)
    })
}

fn save_png<P: image::PixelWithColorType<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    path: &Path,
) -> Result<()>
where
    [P::Subpixel]: image::EncodableLayout,
{
    crate::atomic::write_with(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Pixels of class ≥ 1 with a 4-neighbour of another class (or the image edge).
fn outline(mask: ArrayView2<u8>) -> Array2<bool> {
    let (h, w) = mask.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        let c = mask[[y, x]];
        c > 0
            && (y == 0
                || x == 0
                || y + 1 == h
                || x + 1 == w
                || mask[[y - 1, x]] != c
                || mask[[y + 1, x]] != c
                || mask[[y, x - 1]] != c
                || mask[[y, x + 1]] != c)
    })
}

/// The image in grey/RGB with the ground-truth outline in green (when given) and the
/// prediction's in red; where they coincide, yellow.
pub fn write_overlay(
    image: &Array3<f32>,
    truth: Option<ArrayView2<u8>>,
    pred: &Array2<u8>,
    path: &Path,
) -> Result<()> {
    let (c, h, w) = image.dim();
    let p = outline(pred.view());
    let t = truth.map(outline);
    let px = |ch: usize, y: usize, x: usize| {
        (image[[ch.min(c - 1), y, x]].clamp(0.0, 1.0) * 255.0) as u8
    };
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let base = [px(0, y, x), px(1, y, x), px(2, y, x)];
        let on_t = t.as_ref().is_some_and(|t| t[[y, x]]);
        let on_p = p[[y, x]];
        image::Rgb(match (on_t, on_p) {
            (true, true) => [255, 255, 0],
            (true, false) => [0, 255, 0],
            (false, true) => [255, 0, 0],
            _ => base,
        })
    });
    save_png(&img, path)
}

#[derive(Args, Debug, Clone)]
pub struct MedSegBenchArgs {
    /// Folder holding the datasets (drive/, chasedb1/, busi-256/ …, or NAME.npz).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "busi,drive")]
    pub datasets: Vec<String>,
    #[arg(long)]
    pub model: String,
    /// Heads to compare (each trained on the same encoder and splits).
    #[arg(long, value_delimiter = ',', default_value = "adapter,linear", value_parser = SegHeadKind::parse)]
    pub heads: Vec<SegHeadKind>,
    #[command(flatten)]
    pub head: HeadArgs,
    /// Writes OUT.md and OUT.json, and each trained head's row to OUT.runs.jsonl as it ends: the
    /// same command run again reuses those and trains only the rest.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

/// Where a named dataset lives under `root`, and its default window: vessel sets at native
/// resolution (thin structures vanish when resized), the others resized.
fn dataset_path(root: &Path, name: &str) -> Result<(PathBuf, &'static str)> {
    let window = if matches!(name, "drive" | "chasedb1") {
        "sliding"
    } else {
        "resize"
    };
    for cand in [
        root.join(name),
        root.join(format!("{name}-256")),
        root.join(format!("{name}.npz")),
        root.join(format!("{name}_256.npz")),
    ] {
        if cand.exists() {
            return Ok((cand, window));
        }
    }
    bail!(
        "dataset '{name}' not found under {} (looked for {name}/, {name}-256/, {name}.npz, {name}_256.npz)",
        root.display()
    )
}

#[derive(Clone, Serialize, Deserialize)]
struct BenchRow {
    dataset: String,
    method: String,
    dice: f64,
    dice_pooled: f64,
    iou: f64,
    images: usize,
    best_epoch: usize,
}

pub fn bench_cmd(a: &MedSegBenchArgs) -> Result<()> {
    let mut plan = Vec::new();
    for name in &a.datasets {
        plan.push((name.clone(), dataset_path(&a.data, name)?));
    }
    let mut rows = Vec::new();
    let mut protocols = Vec::new();
    let settings = MedSegBenchArgs {
        datasets: vec![],
        heads: vec![],
        out: None,
        ..a.clone()
    };
    let settings = format!("{settings:?}|{:?}", model_stamps(&a.model));
    let mut log = RunLog::<BenchRow>::open(a.out.as_deref(), settings)?;
    crate::with_backend!(a.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.head.seed)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, a.head.dtype)?);
        for (name, (path, default_window)) in &plan {
            let splits = open_splits(path, None, a.head.seed, false)?;
            report_failed(&splits);
            let classes = classes_of(&splits);
            let tc = a.head.train_config(a.head.window(default_window)?);
            protocols.push(format!(
                "{name}: {} train / {} val / {} test ({}), {}",
                splits.train.len(),
                splits.val.len(),
                splits.test.len(),
                splits.protocol,
                match tc.window {
                    SegWindow::Resize => format!("resized to {0}×{0}", tc.size),
                    SegWindow::Sliding { overlap } => format!(
                        "native resolution, {0}×{0} windows overlapping {overlap} px",
                        tc.size
                    ),
                }
            ));
            // The all-background answer: what a model that learned nothing scores.
            let mut e = SegEvaluator::new(classes);
            for s in &splits.test {
                let zero = Array2::<u8>::zeros(s.mask.dim());
                e.add(zero.view(), s.mask.view(), s.fov.as_ref().map(|f| f.view()));
            }
            let bg = e.finish();
            rows.push(BenchRow {
                dataset: name.clone(),
                method: "all background".into(),
                dice: bg.dice,
                dice_pooled: bg.dice_pooled,
                iou: bg.iou,
                images: bg.images,
                best_epoch: 0,
            });
            for &kind in &a.heads {
                let run = format!("{name}: the {kind:?} head");
                let id = format!("{}|{:?}|{kind:?}", path.display(), stamp(path));
                if let Some(row) = log.get(&run, &id) {
                    rows.push(row);
                    continue;
                }
                let head = a.head.head_config(kind, classes, vit.blocks.len())?;
                eprintln!("{run}: training");
                let (r, test) = fit(
                    vit.clone(),
                    &cfg,
                    &splits,
                    &head,
                    &tc,
                    &dev,
                    |_, _| {},
                    None,
                )?
                .expect("no stop without run files");
                let frozen = if tc.backbone_lr > 0.0 {
                    "fine-tuned encoder"
                } else {
                    "frozen encoder"
                };
                let row = BenchRow {
                    dataset: name.clone(),
                    method: format!("{} head, {frozen}", format!("{kind:?}").to_lowercase()),
                    dice: test.dice,
                    dice_pooled: test.dice_pooled,
                    iou: test.iou,
                    images: test.images,
                    best_epoch: r.best_epoch,
                };
                log.record(&run, &id, &row)?;
                rows.push(row);
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let mut md = format!(
        "omnirad `{}`; test split; Dice/IoU = mean over images of the mean over foreground classes (pooled = over all pixels); epoch chosen on val Dice.\n\n",
        a.model
    );
    for p in &protocols {
        md += &format!("- {p}\n");
    }
    md +=
        "\n| dataset | method | Dice | Dice (pooled) | IoU | epoch |\n|---|---|---|---|---|---|\n";
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} |\n",
            r.dataset, r.method, r.dice, r.dice_pooled, r.iou, r.best_epoch
        );
    }
    for name in &a.datasets {
        if let Some((_, v)) = MEDSEGBENCH_DICE.iter().find(|(n, _)| n == name) {
            for (m, d) in MEDSEGBENCH_MODELS.iter().zip(v) {
                md += &format!("| {name} | published: MedSegBench {m} | {d:.3} | | | |\n");
            }
        }
    }
    print!("{md}");
    if let Some(out) = &a.out {
        let write = |p: PathBuf, s: String| crate::atomic::write(&p, s);
        write(out.with_extension("md"), md)?;
        write(
            out.with_extension("json"),
            serde_json::to_string_pretty(
                &serde_json::json!({ "model": a.model, "protocols": protocols, "rows": rows }),
            )?,
        )?;
    }
    Ok(())
}
