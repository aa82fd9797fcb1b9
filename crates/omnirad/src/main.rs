//! `omnirad`: read medical images, run radiology foundation models, write what they produce.

mod atomic;
mod bench;
mod demo;
mod device;
mod embed;
mod embed_parts;
mod finetune;
mod info;
mod journal;
mod medmnist_bench;
mod names;
mod pretrain;
mod retrieve;
mod run_dir;
mod run_log;
mod segment;
mod slices;
mod speed;
mod viz;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use omnirad_data::dicom::Window;
use omnirad_data::nifti::SliceAxis;
use omnirad_data::{ReadOptions, Split};

#[derive(Parser)]
#[command(
    name = "omnirad",
    version,
    about = "Radiology foundation models in one binary: DICOM-native, CPU and CUDA."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What a file holds: format, modality, size, frames, transfer syntax, pixel statistics;
    /// for a folder, what `embed` would read from it (files parsed, pixels not decoded), skip, or fail on;
    /// for a model directory or bundle, its encoder, preprocessing, scores and weights files
    /// (headers checked against the config, weights not loaded); for a pretraining run, how far
    /// it got, its kept teachers and the command that continues it; for a retrieval index, its
    /// encoder (changed since the build or not) and items.
    Info {
        /// A file, folder, model directory, bundle, pretraining run or retrieval index.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Dataset file checks.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Convert a public checkpoint (HF Dinov2Model, timm ViT, DINOv2) into an omnirad model directory.
    Convert {
        /// Checkpoint: a .safetensors file or a directory with model.safetensors (+ HF config.json).
        input: PathBuf,
        /// Layout of the checkpoint (detected from its key names when omitted).
        #[arg(long, value_parser = omnirad_model::Layout::parse)]
        from: Option<omnirad_model::Layout>,
        /// Model directory to write (config.json + model.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Attention heads, for timm/DINOv2 files that do not record them (default: dim / 64).
        #[arg(long)]
        heads: Option<usize>,
        /// Load what fits: missing tensors keep their initial values, extra ones are ignored.
        #[arg(long)]
        allow_partial: bool,
    },
    /// Embeddings (class token and/or mean patch token) for a file, folder, manifest or npz split.
    Embed(embed::EmbedArgs),
    /// Fine-tune an encoder (fully, or LoRA adapters) with a linear head on a MedMNIST-style npz; writes a bundle.
    Finetune(finetune::FinetuneArgs),
    /// Train a linear head on a frozen encoder (same options and bundle as finetune).
    Probe(finetune::FinetuneArgs),
    /// Class probabilities from a fine-tuned bundle for files, folders, manifests or npz splits.
    Predict(finetune::PredictArgs),
    /// Self-supervised pretraining (DINOv2 / OmniRad / XR-0 recipes) from a TOML config.
    Pretrain(pretrain::PretrainArgs),
    /// Segmentation heads on an encoder: train, eval, predict (masks + overlays).
    Segment {
        #[command(subcommand)]
        cmd: segment::SegmentCmd,
    },
    /// Build a searchable index of embeddings.
    Index {
        #[command(subcommand)]
        cmd: IndexCmd,
    },
    /// The nearest cases in an index for query images, with cosine scores.
    Retrieve(retrieve::RetrieveArgs),
    /// 2-D projections (PCA, t-SNE, UMAP) as PNG/SVG plots and cluster-quality measures for one or two encoders.
    Viz(viz::VizArgs),
    /// The main job end to end on an embedded default (synthetic phantoms, or --data files).
    Demo(demo::DemoArgs),
    /// Compile and autotune the GPU kernels of the given steps once, into the persistent kernel cache (on wgpu: autotune results only).
    Warmup(speed::WarmupArgs),
    /// Benchmarks: throughput, and the MedMNIST / MedSegBench / retrieval protocols (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Embed files/folders/manifests/npz and store them as an index directory.
    Build(retrieve::IndexBuildArgs),
}

#[derive(Subcommand)]
enum DataCmd {
    /// Check a MedMNIST npz against the official md5 and split sizes.
    Verify {
        /// An official MedMNIST npz (`breastmnist.npz`, `pneumoniamnist_64.npz`, …).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every frame and slice of the input (multi-frame DICOM, NIfTI volumes, any image) as a
    /// 16-bit PNG with a manifest.csv, so pretraining reads 2D images instead of decoding a whole
    /// volume per sample.
    Slices(slices::SlicesArgs),
}

/// Reader options shared by commands that read images.
#[derive(Args, Clone, Debug)]
pub struct ReadArgs {
    /// npz split to read.
    #[arg(long, default_value = "test", value_parser = Split::parse)]
    pub split: Split,
    /// DICOM/CT window: file, lung, mediastinum, bone, brain, abdomen, liver, CENTER,WIDTH or pct:LO,HI.
    #[arg(long, default_value = "file", value_parser = Window::parse)]
    pub window: Window,
    /// NIfTI slicing axis: axial, coronal or sagittal.
    #[arg(long, default_value = "axial", value_parser = SliceAxis::parse)]
    pub axis: SliceAxis,
    /// For 4D NIfTI: the one time point to read (default: all).
    #[arg(long)]
    pub time: Option<usize>,
}

impl ReadArgs {
    pub fn options(&self) -> ReadOptions {
        ReadOptions {
            window: self.window.clone(),
            slice_axis: self.axis,
            time: self.time,
            split: self.split,
            ..Default::default()
        }
    }
}

/// Parses a count that must be at least 1 (k, epochs, seeds), so that 0 is a usage error naming
/// the flag rather than a panic or an empty loop deep inside a job.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number ≥ 1".into()),
    }
}

/// An image side in pixels, 1 to [`omnirad_data::preprocess::MAX_SIZE`], so that a mistyped
/// size is a usage error instead of an allocation failure that ends the process.
fn side(s: &str) -> Result<usize, String> {
    from_one_to(s, omnirad_data::preprocess::MAX_SIZE)
}

/// A batch size, layer width, adapter rank or prototype count: 1 to 2^20, far above any real
/// one, for the same reason as [`side`].
fn bounded_count(s: &str) -> Result<usize, String> {
    from_one_to(s, 1 << 20)
}

fn from_one_to(s: &str, max: usize) -> Result<usize, String> {
    match s.parse() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {max}")),
    }
}

/// glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mappings that
/// the kernel zero-fills page by page and unmaps again on free; a training step allocates and
/// frees the same large activation and gradient buffers every step (the DINO head's
/// [tokens, 65 536] logits are tens of MiB). Served from the heap and not trimmed, they are
/// reused: two thirds fewer page faults in `bench speed --mode pretrain` and +11–15 % in
/// pretraining and bf16 fine-tuning (BENCHMARKS.md). Peak memory is unchanged; freed memory
/// stays with the process, as with PyTorch's caching allocators.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Makes the main thread one of rayon's threads. The CPU kernels split each op over rayon's
/// pool; called from a thread outside it, every op handed its tasks to the pool and slept until
/// they were done: two thread wake-ups per op, hundreds per step (6 % of a bf16 inference step's
/// samples in the kernel's wake-up path). As a member the main thread starts on the op's tasks
/// itself and the others join in; and the buffers the ops allocate stay in the main thread's
/// heap (`keep_freed_memory`), where a pool thread's heap would map and unmap every buffer over
/// 64 MiB. Not with a pool of one thread: the main thread waits on loader threads whose decoding
/// runs on the pool, which would then have no thread of its own to run it.
fn join_rayon_pool() {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads >= 2 {
        // Fails only when a global pool exists already, which nothing builds before this.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global();
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    join_rayon_pool();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info { file, json } => info::run(&file, json),
        Cmd::Data {
            cmd: DataCmd::Verify { file, json },
        } => info::verify(&file, json),
        Cmd::Data {
            cmd: DataCmd::Slices(a),
        } => slices::run(&a),
        Cmd::Convert {
            input,
            from,
            out,
            heads,
            allow_partial,
        } => convert(&input, from, &out, heads, allow_partial),
        Cmd::Embed(a) => embed::run(&a),
        Cmd::Demo(a) => demo::run(&a),
        Cmd::Pretrain(a) => pretrain::run(&a),
        Cmd::Finetune(a) => finetune::run(&a, false),
        Cmd::Probe(a) => finetune::run(&a, true),
        Cmd::Predict(a) => finetune::predict_cmd(&a),
        Cmd::Segment { cmd } => match cmd {
            segment::SegmentCmd::Train(a) => segment::train_cmd(&a),
            segment::SegmentCmd::Eval(a) => segment::eval_cmd(&a),
            segment::SegmentCmd::Predict(a) => segment::predict_cmd(&a),
        },
        Cmd::Index {
            cmd: IndexCmd::Build(a),
        } => retrieve::build_cmd(&a),
        Cmd::Retrieve(a) => retrieve::retrieve_cmd(&a),
        Cmd::Viz(a) => viz::run(&a),
        Cmd::Warmup(a) => speed::warmup(&a),
        Cmd::Bench { cmd } => bench::run(cmd),
    }
}

fn convert(
    input: &std::path::Path,
    from: Option<omnirad_model::Layout>,
    out: &std::path::Path,
    heads: Option<usize>,
    allow_partial: bool,
) -> Result<()> {
    use anyhow::Context;
    let imp = omnirad_model::import_checkpoint(input, from, heads)?;
    device::note_assumed_heads(&imp);
    let model = omnirad_model::load_imported::<omnirad_model::Cpu>(
        &imp,
        allow_partial,
        &Default::default(),
    )?;
    omnirad_model::save_model_dir(&model, &imp.config, out)
        .with_context(|| format!("writing {}", out.display()))?;
    let v = &imp.config.vit;
    println!(
        "{} → {}: ViT dim {} depth {} heads {} patch {} {:?} width {} ({}px native, {} registers, position resampling {:?})",
        input.display(),
        out.display(),
        v.embed_dim,
        v.depth,
        v.num_heads,
        v.patch_size,
        v.ffn,
        (v.embed_dim as f64 * v.mlp_ratio).round(),
        v.img_size,
        v.num_registers,
        v.pos_interp
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
