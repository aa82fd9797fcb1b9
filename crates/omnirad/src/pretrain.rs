//! `omnirad pretrain`: the self-supervised training loop with progress, a JSONL metrics log,
//! atomic checkpoints, `--resume`, and a collapse watch.
//!
//! Run directory:
//! ```text
//! OUT/config.toml            resolved configuration (preset + file + flags)
//! OUT/metrics.jsonl          one line per step: losses, schedules, grad norm, collapse statistics
//! OUT/checkpoint.safetensors latest full training state (student, teacher, AdamW, centres, step)
//! OUT/teacher/               the teacher encoder as a model directory, usable with --model,
//!                            and its DINO head (dino_head.safetensors, DINOv2 layout) so
//!                            `--init OUT/teacher` continues SSL with it
//! OUT/teacher-stepN/         the same at every `run.keep_teacher_every`-th step, if set
//! OUT/eval.jsonl             with `run.eval_knn`: each kept teacher's val k-NN scores
//! OUT/teacher-best/          the kept teacher with the best mean val k-NN macro-F1 so far
//! OUT/failed.txt             items that could not be read
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use omnirad_data::{Preprocess, ResizeMode};
use omnirad_model::{
    import_dino_head, save_dino_head, save_model_dir, BalancedCheckpointing, CheckpointStrategy,
    DinoHeadConfig, ModelConfig, NoCheckpointing, Vit, VitConfig, DINO_HEAD_FILE,
};
use omnirad_train::pretrain::{
    load_checkpoint, param_group, save_checkpoint, PretrainConfig, PretrainData, Schedules,
};
use omnirad_train::ssl::{SslBatch, SslModel, SslTrainer};

use crate::device::{parse_device, resolve_model, Device};

#[derive(Args)]
pub struct PretrainArgs {
    /// TOML configuration (required unless --resume, which reads OUT/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base recipe under the file: dinov2, omnirad or xr0 (overrides the file's `preset`).
    #[arg(long)]
    preset: Option<String>,
    /// Start from these weights: a model directory, a public checkpoint, or a preset.
    #[arg(long)]
    init: Option<String>,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue OUT's run from its checkpoint (same data order and random draws).
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps in this invocation (for time-sliced jobs; continue with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Stop at the first unreadable item instead of replacing it and listing it in failed.txt.
    #[arg(long)]
    strict: bool,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

pub fn run(a: &PretrainArgs) -> Result<()> {
    let resolved = a.out.join("config.toml");
    let ckpt = a.out.join("checkpoint.safetensors");
    let cfg = if a.resume {
        if !ckpt.exists() {
            bail!(
                "{}: nothing to resume (no checkpoint.safetensors)",
                a.out.display()
            );
        }
        if a.config.is_some() || a.preset.is_some() || a.init.is_some() {
            eprintln!(
                "note: --resume continues with {} (the run's own settings); --config/--preset/--init are ignored",
                resolved.display()
            );
        }
        PretrainConfig::load(&resolved, None)?
    } else {
        let Some(path) = &a.config else {
            bail!("--config FILE is required (or --resume to continue a run)");
        };
        if ckpt.exists() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        let mut cfg = PretrainConfig::load(path, a.preset.as_deref())?;
        if let Some(init) = &a.init {
            // Kept absolute in OUT/config.toml so `--resume` finds it from any folder.
            cfg.model.init = Some(match std::path::absolute(init) {
                Ok(p) if p.exists() => p.display().to_string(),
                _ => init.clone(),
            });
        }
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        crate::atomic::write(&resolved, cfg.to_toml().as_bytes())?;
        cfg
    };
    crate::with_backend!(a.device, |B, dev| if cfg.optim.grad_checkpoint {
        train::<B, BalancedCheckpointing>(a, &cfg, &dev)
    } else {
        train::<B, NoCheckpointing>(a, &cfg, &dev)
    })
}

fn build_encoder<B: Backend>(cfg: &PretrainConfig, dev: &B::Device) -> Result<(Vit<B>, VitConfig)> {
    B::seed(dev, cfg.run.seed);
    let (mut vit, vit_cfg) = match &cfg.model.init {
        Some(spec) => {
            let (m, c) = resolve_model::<B>(spec, dev, cfg.run.seed)?;
            (m, c.vit)
        }
        None => {
            let c = cfg.model.vit().map_err(anyhow::Error::msg)?;
            (c.init::<B>(dev), c)
        }
    };
    // Stochastic depth is a training setting: applied to imported encoders too.
    let depth = vit.blocks.len();
    for (i, b) in vit.blocks.iter_mut().enumerate() {
        b.drop_path = if cfg.model.drop_path_uniform || depth == 1 {
            cfg.model.drop_path_rate
        } else {
            cfg.model.drop_path_rate * i as f64 / (depth - 1) as f64
        };
    }
    Ok((vit, vit_cfg))
}

fn train<B: Backend, C: CheckpointStrategy>(
    a: &PretrainArgs,
    cfg: &PretrainConfig,
    dev: &B::Device,
) -> Result<()> {
    let (vit, vit_cfg) = build_encoder::<B>(cfg, dev)?;
    let depth = vit.blocks.len();
    let mut head = DinoHeadConfig {
        in_dim: vit.embed_dim(),
        out_dim: cfg.head.prototypes,
        hidden_dim: cfg.head.hidden_dim,
        bottleneck_dim: cfg.head.bottleneck_dim,
        nlayers: cfg.head.nlayers,
    };
    let head_file = cfg.head.init.clone().map(PathBuf::from).or_else(|| {
        let dir = PathBuf::from(cfg.model.init.as_ref()?);
        dir.join(DINO_HEAD_FILE).is_file().then_some(dir)
    });
    let dino_head = match head_file {
        Some(f) => {
            let (h, hc) = import_dino_head::<B>(&f, dev)
                .with_context(|| format!("loading the DINO head {}", f.display()))?;
            if hc.in_dim != head.in_dim {
                bail!(
                    "{}: DINO head takes {}-d tokens, the encoder makes {}-d ones",
                    f.display(),
                    hc.in_dim,
                    head.in_dim
                );
            }
            eprintln!(
                "pretrain: DINO head from {} ({} prototypes, bottleneck {}, {} layers)",
                f.display(),
                hc.out_dim,
                hc.bottleneck_dim,
                hc.nlayers
            );
            head = hc;
            h
        }
        None => head.init(dev),
    };
    let model = SslModel {
        ibot_head: cfg.head.separate_ibot_head.then(|| head.init(dev)),
        dino_head,
        backbone: vit,
    }
    .with_precision(crate::device::precision::<B>(dev, cfg.model.precision)?);
    let clip = (cfg.optim.clip_grad > 0.0).then_some(cfg.optim.clip_grad);
    let mut trainer = SslTrainer::<B, C>::with_strategy(model, cfg.loss.clone(), clip, dev);

    let data = Arc::new(PretrainData::open(
        cfg,
        vit_cfg.in_chans,
        vit_cfg.patch_size,
    )?);
    let volumes = data.volume_files();
    if volumes > 0 {
        eprintln!(
            "note: {volumes} NIfTI volume(s) among the sources: every draw decodes a whole volume for one slice; `omnirad data slices --input DIR --out SLICES` writes their slices once as PNGs (a source that reads much faster)"
        );
    }
    let eff = cfg.effective_batch();
    let epoch_length = match cfg.optim.epoch_length {
        0 => data.len().div_ceil(eff),
        n => n,
    };
    let sched = Schedules::new(cfg, epoch_length);
    let ckpt = a.out.join("checkpoint.safetensors");
    let start = if a.resume {
        load_checkpoint(&ckpt, &mut trainer)?
    } else {
        0
    };
    let end = match a.stop_after {
        Some(n) => (start + n).min(sched.total_steps),
        None => sched.total_steps,
    };
    let export = ModelConfig::new(
        vit_cfg,
        Preprocess {
            size: cfg.crops.global_size,
            resize: ResizeMode::Stretch,
            channels: trainer.teacher.backbone.patch_embed.proj.weight.dims()[1],
            normalize: cfg.data.normalize.clone(),
        },
    );
    eprintln!(
        "pretrain: {} images in {} source(s), {} steps ({} epochs × {epoch_length}), batch {} × {} accumulated, peak lr {:.2e}, from step {start}",
        data.len(),
        cfg.data.sources.len(),
        sched.total_steps,
        cfg.optim.epochs,
        cfg.optim.batch_size,
        cfg.optim.accumulate,
        cfg.peak_lr()
    );

    // Batches are built on a separate thread (rayon inside) while the model trains.
    let (tx, rx) = sync_channel::<Result<(Vec<SslBatch>, Vec<(String, String)>)>>(2);
    let producer = {
        let data = Arc::clone(&data);
        let (accum, bs) = (cfg.optim.accumulate, cfg.optim.batch_size);
        std::thread::spawn(move || {
            for step in start..end {
                let mut micro = Vec::with_capacity(accum);
                let mut failed = Vec::new();
                let mut res = Ok(());
                for k in 0..accum {
                    match data.batch(step as u64, k as u64, bs) {
                        Ok((b, f)) => {
                            micro.push(b);
                            failed.extend(f);
                        }
                        Err(e) => {
                            res = Err(anyhow::Error::from(e));
                            break;
                        }
                    }
                }
                let msg = res.map(|_| (micro, failed));
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
        })
    };

    let metrics_path = a.out.join("metrics.jsonl");
    let mut log = open_log(&metrics_path, start)?;
    // The eval log and the best score among the kept teachers before `start`.
    let mut eval = if cfg.run.eval_knn.is_empty() {
        None
    } else {
        if let Some(f) = cfg.run.eval_knn.iter().find(|f| !f.is_file()) {
            bail!("run.eval_knn: {} not found", f.display());
        }
        let path = a.out.join("eval.jsonl");
        let log = open_log(&path, start)?;
        let best = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["score"].as_f64())
            .reduce(f64::max);
        Some((log, best))
    };
    let mut failed_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.out.join("failed.txt"))
        .context("opening failed.txt")?;
    let bar = ProgressBar::new(sched.total_steps as u64).with_style(
        ProgressStyle::with_template("{spinner} pretrain [{bar:25}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template"),
    );
    bar.set_position(start as u64);
    let group = |p: &str| {
        param_group(
            p,
            depth,
            cfg.optim.layer_decay,
            cfg.optim.patch_embed_lr_mult,
        )
    };
    let mut warned_at: Option<usize> = None;
    for step in start..end {
        let (micro, failed) = rx.recv().context("data thread stopped")??;
        for (id, why) in &failed {
            writeln!(failed_log, "{id}\t{why}").context("writing failed.txt")?;
            if a.strict {
                bail!("{id}: {why} (--strict)");
            }
        }
        let v = sched.at(step);
        let t0 = Instant::now();
        let s = trainer.step(
            &micro,
            &v,
            &group,
            cfg.run.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let secs = t0.elapsed().as_secs_f64();
        if !s.loss.is_finite() {
            bail!(
                "loss became {} at step {step} (dino {}, ibot {}, koleo {}); the last checkpoint is {} — lower optim.base_lr or raise optim.clip_grad",
                s.loss, s.dino, s.ibot, s.koleo, ckpt.display()
            );
        }
        let line = serde_json::json!({
            "step": step,
            "epoch": step as f64 / epoch_length as f64,
            "loss": s.loss, "dino": s.dino, "ibot": s.ibot, "koleo": s.koleo,
            "lr": v.lr, "wd": v.weight_decay, "momentum": v.momentum, "teacher_temp": v.teacher_temp,
            "grad_norm": s.grad_norm,
            "teacher_entropy": s.teacher_entropy, "prototypes_used": s.prototypes_used,
            "embedding_std": s.embedding_std,
            "img_per_s": eff as f64 / secs,
            "failed": failed.len(),
        });
        writeln!(log, "{line}").context("writing metrics.jsonl")?;
        bar.set_message(format!(
            "loss {:.3} (dino {:.3} ibot {:.3} koleo {:.3}) lr {:.1e} τt {:.3} m {:.4} protos {:.0} std {:.2}",
            s.loss, s.dino, s.ibot, s.koleo, v.lr, v.teacher_temp, v.momentum, s.prototypes_used, s.embedding_std
        ));
        bar.inc(1);
        let collapsing = s.prototypes_used < cfg.run.min_prototypes_used
            || s.embedding_std < cfg.run.min_embedding_std;
        if collapsing && warned_at.is_none_or(|w| step >= w + 100) {
            bar.println(format!(
                "warning: step {step}: possible collapse — teacher uses {:.1} prototypes (min {}), embedding std {:.3} (min {})",
                s.prototypes_used, cfg.run.min_prototypes_used, s.embedding_std, cfg.run.min_embedding_std
            ));
            warned_at = Some(step);
        }
        let done = step + 1;
        if done % cfg.run.checkpoint_every.max(1) == 0 || done == end {
            save_checkpoint(&ckpt, &trainer, done)?;
            save_teacher(&trainer.teacher, &export, &a.out.join("teacher"))?;
        }
        let keep = cfg.run.keep_teacher_every;
        if keep > 0 && done % keep == 0 {
            save_teacher(
                &trainer.teacher,
                &export,
                &a.out.join(format!("teacher-step{done}")),
            )?;
            if let Some((log, best)) = &mut eval {
                let (line, score) = eval_teacher(
                    &trainer.teacher.backbone,
                    &export.preprocess,
                    cfg,
                    done,
                    dev,
                )?;
                writeln!(log, "{line}").context("writing eval.jsonl")?;
                bar.println(format!(
                    "step {done}: val k-NN macro-F1 {score:.3} (mean over run.eval_knn)"
                ));
                // Ties go to the later, longer-trained teacher.
                if best.is_none_or(|b| score >= b) {
                    save_teacher(&trainer.teacher, &export, &a.out.join("teacher-best"))?;
                    *best = Some(score);
                }
            }
        }
    }
    bar.finish();
    drop(rx);
    let _ = producer.join();
    eprintln!(
        "pretrain: step {end}/{}; teacher encoder in {}",
        sched.total_steps,
        a.out.join("teacher").display()
    );
    Ok(())
}

/// The teacher encoder as a model directory, with its DINO head so `--init DIR` continues SSL.
fn save_teacher<B: Backend>(teacher: &SslModel<B>, export: &ModelConfig, dir: &Path) -> Result<()> {
    save_model_dir(&teacher.backbone, export, dir)?;
    save_dino_head(&teacher.dino_head, &dir.join(DINO_HEAD_FILE))?;
    Ok(())
}

/// A kept teacher's k-NN scores on the val split of every `run.eval_knn` file, as an
/// eval.jsonl line, and their mean macro-F1 (the score `teacher-best/` is chosen by).
fn eval_teacher<B: Backend>(
    vit: &Vit<B>,
    pre: &Preprocess,
    cfg: &PretrainConfig,
    step: usize,
    dev: &B::Device,
) -> Result<(serde_json::Value, f64)> {
    let mut results = Vec::new();
    for file in &cfg.run.eval_knn {
        let m = crate::medmnist_bench::knn_eval(vit, pre, file, omnirad_data::Split::Val, dev)?;
        results.push(serde_json::json!({
            "file": file, "acc": m.acc, "auc": m.auc, "macro_f1": m.macro_f1,
        }));
    }
    let score = results
        .iter()
        .map(|r| r["macro_f1"].as_f64().unwrap_or(0.0))
        .sum::<f64>()
        / results.len() as f64;
    let line = serde_json::json!({
        "step": step, "teacher": format!("teacher-step{step}"), "split": "val",
        "score": score, "results": results,
    });
    Ok((line, score))
}

/// metrics.jsonl (or eval.jsonl) without lines from `start` on (a resumed run rewrites the steps after its
/// checkpoint), opened for appending. Written a whole line at a time, so that a reader following
/// the run (`tail -f`, a plot) never sees half a line.
fn open_log(path: &Path, start: usize) -> Result<std::io::LineWriter<std::fs::File>> {
    let kept: String = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| (s as usize) < start)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        Err(_) => String::new(),
    };
    crate::atomic::write(path, kept.as_bytes())?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(std::io::LineWriter::new(f))
}
