//! `omnirad bench speed`: one inference, fine-tuning or DINOv2-style pretraining step on random
//! input, timed the way `bench/torch_reference.py` times PyTorch (median ms/step after warm-up),
//! with the time to the first finished step (kernel compilation on a fresh GPU) and peak memory.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use clap::{Args, ValueEnum};
use omnirad_model::{
    BalancedCheckpointing, CheckpointStrategy, DinoHeadConfig, NoCheckpointing, Precision, Train,
    Vit,
};
use omnirad_train::finetune::{classification_loss, Classifier};
use omnirad_train::optim::{AdamW, StepSettings};
use omnirad_train::params;
use omnirad_train::pretrain::param_group;
use omnirad_train::ssl::{LossConfig, SslBatch, SslModel, SslTrainer, StepValues};
use serde_json::json;

use crate::bench::median;
use crate::device::{parse_device, resolve_model, Device};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpeedMode {
    /// Encoder forward, class tokens read back.
    Infer,
    /// Classifier forward + cross-entropy + backward + AdamW step (layer-wise LR decay, clipping).
    Finetune,
    /// Student on masked global crops (+ local crops) and teacher on the globals, DINO + iBOT +
    /// KoLeo, backward, AdamW, EMA teacher update.
    Pretrain,
}

#[derive(Args)]
pub struct SpeedArgs {
    /// Preset (random init) or model directory.
    #[arg(long, default_value = "vit_s16")]
    model: String,
    #[arg(long, value_enum, default_value = "infer")]
    mode: SpeedMode,
    #[arg(long, default_value_t = 224, value_parser = crate::side)]
    img: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::bounded_count)]
    batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = crate::at_least_one)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Matmul/attention precision (bf16: mixed precision on f32 weights).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Pretrain mode: local crops per image (0 = OmniRad's global-only recipe; DINOv2 uses 8).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=64))]
    locals: usize,
    /// Pretrain mode: DINO head prototypes (DINOv2: 65536).
    #[arg(long, default_value_t = 65536, value_parser = crate::bounded_count)]
    prototypes: usize,
    /// Finetune and pretrain modes: recompute memory-bound activations (norms, GELU,
    /// elementwise ops) in the backward pass instead of keeping them (balanced checkpointing).
    #[arg(long)]
    grad_checkpoint: bool,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

/// Peak resident memory of this process (Linux `VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    Some(
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?
            * 1024,
    )
}

/// Bytes the GPU memory pool holds (it grows to the peak and keeps it).
fn device_reserved(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            use cubecl::Runtime;
            let client = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(*i));
            client.memory_usage().ok().map(|m| m.bytes_reserved)
        }
        #[cfg(feature = "wgpu")]
        Device::Wgpu => {
            use cubecl::Runtime;
            let client =
                cubecl::wgpu::WgpuRuntime::client(&cubecl::wgpu::WgpuDevice::DefaultDevice);
            client.memory_usage().ok().map(|m| m.bytes_reserved)
        }
        _ => None,
    }
}

/// Runs `step` warm-up + timed times; each call must end with a read-back so the device is done.
/// The time to the first step counts from `start` (before the model was built).
fn time_steps(
    start: Instant,
    warmup: usize,
    steps: usize,
    device: &Device,
    mut step: impl FnMut() -> Result<()>,
) -> Result<serde_json::Value> {
    let mut first = None;
    let mut times = Vec::new();
    let mut reserved = 0;
    for i in 0..warmup + steps.max(1) {
        let t = Instant::now();
        step()?;
        let dt = t.elapsed().as_secs_f64();
        first.get_or_insert(start.elapsed().as_secs_f64());
        reserved = reserved.max(device_reserved(device).unwrap_or(0));
        if i >= warmup {
            times.push(dt);
        }
    }
    Ok(json!({
        "ms_per_step": median(times) * 1e3,
        "time_to_first_step_s": first,
        "peak_rss_bytes": peak_rss(),
        "device_pool_bytes": (reserved > 0).then_some(reserved),
    }))
}

fn random<B: Backend>(shape: [usize; 4], dev: &B::Device) -> Tensor<B, 4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev)
}

fn run_mode<B: Backend>(a: &SpeedArgs, dev: &B::Device) -> Result<serde_json::Value> {
    let start = Instant::now();
    let (vit, cfg) = resolve_model::<B>(&a.model, dev, 0)?;
    anyhow::ensure!(
        a.img > 0 && a.img.is_multiple_of(cfg.vit.patch_size),
        "--img {} is not a positive multiple of the patch size {}",
        a.img,
        cfg.vit.patch_size
    );
    let vit = vit.with_precision(crate::device::precision::<B>(dev, a.dtype)?);
    let shape = [a.batch, cfg.vit.in_chans, a.img, a.img];
    let mut timing = match a.mode {
        SpeedMode::Infer => {
            let x = random::<B>(shape, dev);
            time_steps(start, a.warmup, a.steps, &a.device, || {
                let _ = vit.forward(x.clone()).into_data();
                Ok(())
            })?
        }
        SpeedMode::Finetune if a.grad_checkpoint => {
            finetune_steps::<B, BalancedCheckpointing>(a, vit, shape, start, dev)?
        }
        SpeedMode::Finetune => finetune_steps::<B, NoCheckpointing>(a, vit, shape, start, dev)?,
        SpeedMode::Pretrain if a.grad_checkpoint => {
            pretrain_steps::<B, BalancedCheckpointing>(a, vit, cfg.vit.patch_size, start, dev)?
        }
        SpeedMode::Pretrain => {
            pretrain_steps::<B, NoCheckpointing>(a, vit, cfg.vit.patch_size, start, dev)?
        }
    };
    let ms = timing["ms_per_step"].as_f64().unwrap_or(f64::NAN);
    timing["img_per_s"] = json!(a.batch as f64 / ms * 1e3);
    Ok(timing)
}

/// Classifier forward + cross-entropy + backward + AdamW (layer-wise LR decay, clipping).
fn finetune_steps<B: Backend, C: CheckpointStrategy>(
    a: &SpeedArgs,
    vit: Vit<B>,
    shape: [usize; 4],
    start: Instant,
    dev: &B::Device,
) -> Result<serde_json::Value> {
    let depth = vit.blocks.len();
    let group = |p: &str| param_group(p, depth, 0.75, 1.0);
    // In an Option so that the step can move the model into the optimizer as training does: a
    // clone left beside it would make every parameter update copy its buffer first.
    let mut model = Some(params::trainable(Classifier::<Train<B, C>>::from_inner(
        Classifier::new(vit, 10, false, 0.0, 0, dev),
    )));
    let mut opt = AdamW::<B>::new(0.9, 0.999, 1e-8);
    let x = random::<Train<B, C>>(shape, dev);
    let y = Tensor::<Train<B, C>, 2>::zeros([a.batch, 10], dev)
        .slice_assign([0..a.batch, 0..1], Tensor::ones([a.batch, 1], dev));
    time_steps(start, a.warmup, a.steps, &a.device, || {
        let m = model.take().expect("the model is put back after each step");
        let loss = classification_loss(m.forward(x.clone(), true), y.clone(), false, 0.1, None);
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let s = StepSettings {
            lr: 1e-5,
            weight_decay: 0.05,
            clip: Some(1.0),
            group: &group,
        };
        let m = model.insert(opt.step(m, grads, &s).0);
        // Reading a parameter back waits for the update.
        let _ = m.head.bias.as_ref().map(|b| b.val().into_data());
        Ok(())
    })
}

/// Student on masked global crops (+ locals), teacher on the globals, DINO + iBOT + KoLeo,
/// backward, AdamW, EMA teacher update.
fn pretrain_steps<B: Backend, C: CheckpointStrategy>(
    a: &SpeedArgs,
    vit: Vit<B>,
    patch: usize,
    start: Instant,
    dev: &B::Device,
) -> Result<serde_json::Value> {
    let depth = vit.blocks.len();
    let channels = vit.patch_embed.proj.weight.dims()[1];
    let head = DinoHeadConfig {
        in_dim: vit.embed_dim(),
        out_dim: a.prototypes,
        hidden_dim: 2048,
        bottleneck_dim: 256,
        nlayers: 3,
    };
    let model = SslModel {
        dino_head: head.init(dev),
        ibot_head: None,
        backbone: vit,
    }
    .with_precision(crate::device::precision::<B>(dev, a.dtype)?);
    let mut trainer =
        SslTrainer::<B, C>::with_strategy(model, LossConfig::default(), Some(3.0), dev);
    let batch = pretrain_batch(a, channels, patch);
    let v = StepValues {
        lr: 1e-4,
        weight_decay: 0.04,
        momentum: 0.996,
        teacher_temp: 0.07,
        freeze_last_layer: false,
    };
    let group = |p: &str| param_group(p, depth, 0.9, 0.2);
    let mut seed = 0;
    time_steps(start, a.warmup, a.steps, &a.device, || {
        seed += 1;
        // The step reads its loss statistics back, so it has finished when it returns.
        let s = trainer.step(std::slice::from_ref(&batch), &v, &group, seed);
        anyhow::ensure!(s.loss.is_finite(), "pretraining loss is {}", s.loss);
        Ok(())
    })
}

/// Random crops in the layout the data loader makes: 2 globals per image (half of them with
/// 30% of patches masked, DINOv2's mask probability 0.5) and `locals` crops of 96/224 the size.
fn pretrain_batch(a: &SpeedArgs, channels: usize, patch: usize) -> SslBatch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let n_global = 2 * a.batch;
    let local = ((a.img * 96 / 224) / patch).max(1) * patch;
    let n_local = a.locals * a.batch;
    let grid = (a.img / patch) * (a.img / patch);
    let masks = (0..n_global)
        .map(|i| (0..grid).map(|j| i % 2 == 0 && j % 10 < 3).collect())
        .collect();
    SslBatch {
        batch: a.batch,
        n_global: 2,
        n_local: a.locals,
        globals: uniform(n_global * channels * a.img * a.img),
        global_shape: [n_global, channels, a.img, a.img],
        locals: uniform(n_local * channels * local * local),
        local_shape: [n_local, channels, local, local],
        masks,
    }
}

pub fn run(a: &SpeedArgs) -> Result<serde_json::Value> {
    let timing = crate::with_backend!(a.device, |B, dev| run_mode::<B>(a, &dev)?);
    let mut v = json!({
        "bench": "speed",
        "model": a.model,
        "mode": format!("{:?}", a.mode).to_lowercase(),
        "dtype": format!("{:?}", a.dtype).to_lowercase(),
        "img": a.img,
        "batch": a.batch,
        "device": format!("{:?}", a.device),
        "threads": rayon::current_num_threads(),
    });
    if a.dtype == Precision::Bf16 && matches!(a.device, Device::Cpu) {
        // Which kernel the CPU's bf16 products ran on: results differ by 2–3× between them.
        v["cpu_bf16"] = json!(omnirad_model::bf16_kernel());
    }
    if a.mode != SpeedMode::Infer {
        v["grad_checkpoint"] = json!(a.grad_checkpoint);
    }
    if a.mode == SpeedMode::Pretrain {
        v["locals"] = json!(a.locals);
        v["prototypes"] = json!(a.prototypes);
    }
    for (k, x) in timing.as_object().expect("object") {
        v[k] = x.clone();
    }
    Ok(v)
}

#[derive(Args)]
pub struct WarmupArgs {
    /// Preset or model directory whose shapes to compile for.
    #[arg(long, default_value = "vit_s16")]
    model: String,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "infer,finetune"
    )]
    modes: Vec<SpeedMode>,
    #[arg(long, default_value_t = 224, value_parser = crate::side)]
    img: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::bounded_count)]
    batch: usize,
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    #[arg(long, default_value_t = 65536, value_parser = crate::bounded_count)]
    prototypes: usize,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    device: Device,
}

/// One step of each mode: CubeCL compiles and autotunes every kernel it meets and, with the
/// cache `device::kernel_cache` configures, keeps them for later runs of the same shapes.
pub fn warmup(a: &WarmupArgs) -> Result<()> {
    for &mode in &a.modes {
        let s = SpeedArgs {
            model: a.model.clone(),
            mode,
            img: a.img,
            batch: a.batch,
            steps: 1,
            warmup: 0,
            dtype: a.dtype,
            locals: 0,
            prototypes: a.prototypes,
            grad_checkpoint: false,
            device: a.device,
        };
        let v = run(&s)?;
        eprintln!(
            "warmup {:?}: first step after {:.1} s",
            mode,
            v["time_to_first_step_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(dir) = crate::device::kernel_cache() {
        eprintln!("kernel cache: {}", dir.display());
    }
    Ok(())
}
