//! `omnirad embed`: items → preprocess → batch → encoder → pooled embedding → .npy/.csv.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use omnirad_data::loader::batches;
use omnirad_data::{discover, Item, Meta, Preprocess, ReadOptions};
use omnirad_model::Vit;

use crate::device::{model_stamps, parse_device, resolve_model, Device};
use crate::embed_parts::{Done, Parts};
use crate::ReadArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Pool {
    /// Final-norm class token (D values).
    Cls,
    /// Mean of final-norm patch tokens (D values).
    Mean,
    /// Both, concatenated as DINOv2's linear probe uses them (2D values).
    ClsMean,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model directory (config.json + model.safetensors) or preset name (random init).
    #[arg(long)]
    pub model: String,
    /// File, folder, CSV manifest or npz.
    #[arg(long)]
    pub input: PathBuf,
    /// Output: .npy (with .meta.csv and .labels.npy beside it) or .csv.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "cls")]
    pub pool: Pool,
    #[arg(long, default_value_t = 32, value_parser = crate::bounded_count)]
    pub batch: usize,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Encoder matmul/attention precision: bf16 for speed on GPUs and on CPUs with AMX or AVX-512
    /// BF16 (outputs stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: omnirad_model::Precision,
    /// Seed for preset (random-init) models.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop at the first unreadable item instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// Stop after this many input items (for time-sliced jobs): finished batches stay in
    /// OUT.parts/, and the same command run again continues after them, as it does after a kill.
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// One row of values (an embedding, class probabilities) per image, and the items that failed.
pub struct Rows {
    pub values: Array2<f32>,
    pub metas: Vec<Meta>,
    pub failed: Vec<(String, String)>,
}

impl Rows {
    /// The items' labels as [N, L], when every item has the same number L ≥ 1 of them.
    pub fn labels(&self) -> Option<Array2<i64>> {
        let l = self.metas.first().map_or(0, |m| m.labels.len());
        (l > 0 && self.metas.iter().all(|m| m.labels.len() == l))
            .then(|| Array2::from_shape_fn((self.metas.len(), l), |(i, j)| self.metas[i].labels[j]))
    }
}

/// Model input for a [N, C, S, S] host batch.
pub fn to_tensor<B: Backend>(
    data: Vec<f32>,
    shape: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

pub fn pool<B: Backend>(vit: &Vit<B>, x: Tensor<B, 4>, pool: Pool) -> Tensor<B, 2> {
    let out = vit.forward_features(x, None, &[], false);
    let mean = || out.patches.clone().mean_dim(1).squeeze_dim::<2>(1);
    match pool {
        Pool::Cls => out.cls.clone(),
        Pool::Mean => mean(),
        Pool::ClsMean => Tensor::cat(vec![out.cls.clone(), mean()], 1),
    }
}

/// How to run a job over a list of items.
pub struct BatchJob<'a> {
    pub read: &'a ReadOptions,
    pub batch: usize,
    /// Stop at the first unreadable item.
    pub strict: bool,
}

/// Embeds every image of every item; unreadable items are collected (or, with `strict`, fatal).
pub fn embed_items<B: Backend>(
    vit: &Vit<B>,
    pre: &Preprocess,
    items: Vec<Item>,
    job: &BatchJob,
    mode: Pool,
    device: &B::Device,
) -> Result<Rows> {
    let e = embed_resumable(vit, pre, items, job, mode, None, device)?;
    Ok(e.expect("only parts stop a job early"))
}

/// [`embed_items`] keeping finished batches in `parts`: continues after the items that earlier
/// runs finished; None when stopped by `parts.stop_after` before the last item.
pub fn embed_resumable<B: Backend>(
    vit: &Vit<B>,
    pre: &Preprocess,
    items: Vec<Item>,
    job: &BatchJob,
    mode: Pool,
    parts: Option<&Parts>,
    device: &B::Device,
) -> Result<Option<Rows>> {
    map_items(pre, items, job, parts, device, "embed", |x| {
        let e = pool(vit, x, mode);
        let dim = e.dims()[1];
        let v = e
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok((v, dim))
    })
}

/// The rows `rows` gives each batch of the items' images (model-ready [N, C, S, S] tensors),
/// decoded in parallel one batch ahead, with a progress bar; finished batches are kept in
/// `parts` (every 30 s and when stopping), and a rerun continues after them. None when stopped
/// by `parts.stop_after` before the last item.
pub fn map_items<B: Backend>(
    pre: &Preprocess,
    items: Vec<Item>,
    job: &BatchJob,
    parts: Option<&Parts>,
    device: &B::Device,
    what: &str,
    mut rows: impl FnMut(Tensor<B, 4>) -> Result<(Vec<f32>, usize)>,
) -> Result<Option<Rows>> {
    let (read, batch, strict) = (job.read, job.batch, job.strict);
    let n = items.len();
    let key = parts.map(|p| p.key(&items)).unwrap_or_default();
    let done = match parts {
        Some(p) => p.load(&key)?,
        None => Done::default(),
    };
    if done.items > 0 {
        eprintln!(
            "continuing after {} of {n} items (finished parts in {})",
            done.items,
            parts
                .map(|p| p.dir.display().to_string())
                .unwrap_or_default()
        );
    }
    let end = parts
        .and_then(|p| p.stop_after)
        .map_or(n, |s| s.clamp(done.items, n));
    let bar = item_bar(n, what);
    bar.set_position(done.items as u64);
    let todo: Vec<Item> = items.into_iter().take(end).skip(done.items).collect();
    let rx = batches(Arc::new(todo), batch, read.clone(), pre.clone(), 2);
    let Done {
        items: mut pos,
        mut dim,
        mut values,
        mut metas,
        mut failed,
    } = done;
    // Where the part not yet on disk starts: item, value, meta and failure positions.
    let mut unsaved = (pos, values.len(), metas.len(), failed.len());
    let mut saved_at = std::time::Instant::now();
    // Every 30 s, and when stopping.
    let mut save = |stop: bool, pos: usize, dim, values: &[f32], metas: &[Meta], failed: &[_]| {
        let due = stop || saved_at.elapsed() >= std::time::Duration::from_secs(30);
        let Some(p) = parts.filter(|_| due && pos > unsaved.0) else {
            return Ok(());
        };
        let (i, v, m, f) = unsaved;
        p.write(
            &key,
            i,
            pos - i,
            dim,
            &values[v..],
            &metas[m..],
            &failed[f..],
        )?;
        unsaved = (pos, values.len(), metas.len(), failed.len());
        saved_at = std::time::Instant::now();
        anyhow::Ok(())
    };
    for b in rx {
        pos += b.items;
        if strict {
            if let Some((id, err)) = b.failed.first() {
                bail!("{} (--strict)", failure_text(id, err));
            }
        }
        failed.extend(b.failed);
        if b.shape[0] > 0 {
            // Large multi-frame items can exceed the batch; split so memory stays bounded.
            let per = b.shape[1] * b.shape[2] * b.shape[3];
            for (chunk, m) in b.data.chunks(per * batch).zip(b.metas.chunks(batch)) {
                let x = to_tensor::<B>(
                    chunk.to_vec(),
                    [m.len(), b.shape[1], b.shape[2], b.shape[3]],
                    device,
                );
                let (v, d) = rows(x)?;
                if v.iter().any(|x| !x.is_finite()) {
                    bail!(
                        "the model produced NaN/Inf values (batch starting at {})",
                        m[0].id
                    );
                }
                dim = d;
                values.extend(v);
            }
            metas.extend(b.metas);
        }
        bar.set_position(pos as u64);
        save(false, pos, dim, &values, &metas, &failed)?;
    }
    if end < n {
        save(true, pos, dim, &values, &metas, &failed)?;
        bar.finish_and_clear();
        return Ok(None);
    }
    bar.finish_and_clear();
    let values = Array2::from_shape_vec((metas.len(), dim), values).expect("one row per image");
    Ok(Some(Rows {
        values,
        metas,
        failed,
    }))
}

/// A progress bar over `n` input items (hidden under CI, where it would only fill the log).
pub(crate) fn item_bar(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} items {{per_sec}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    if std::env::var_os("CI").is_some() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

pub(crate) fn sidecar(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.with_extension("");
    PathBuf::from(format!("{}.{suffix}", stem.display()))
}

pub(crate) fn labels_text(m: &Meta) -> String {
    m.labels
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(";")
}

/// Writes `.npy` (+ `.meta.csv`, `.labels.npy`) or `.csv`, and `.failed.txt` when items failed.
pub fn write_embeddings(out: &Path, e: &Rows) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "npy" => {
            crate::atomic::write_with(out, |p| {
                ndarray_npy::write_npy(p, &e.values)
                    .with_context(|| format!("writing {}", p.display()))
            })?;
            let meta = sidecar(out, "meta.csv");
            crate::atomic::write_with(&meta, |p| {
                let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
                writeln!(f, "index,id,modality,anatomy,labels")?;
                for (i, m) in e.metas.iter().enumerate() {
                    writeln!(
                        f,
                        "{i},{},{},{},{}",
                        csv_field(&m.id),
                        m.modality.name(),
                        m.anatomy.clone().unwrap_or_default(),
                        labels_text(m)
                    )?;
                }
                Ok(())
            })?;
            if let Some(labels) = e.labels() {
                crate::atomic::write_with(&sidecar(out, "labels.npy"), |p| {
                    ndarray_npy::write_npy(p, &labels)
                        .with_context(|| format!("writing {}", p.display()))
                })?;
            }
        }
        "csv" => crate::atomic::write_with(out, |p| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
            let d = e.values.ncols();
            write!(f, "id,modality,labels")?;
            (0..d).try_for_each(|j| write!(f, ",e{j}"))?;
            writeln!(f)?;
            for (m, row) in e.metas.iter().zip(e.values.rows()) {
                write!(
                    f,
                    "{},{},{}",
                    csv_field(&m.id),
                    m.modality.name(),
                    labels_text(m)
                )?;
                row.iter().try_for_each(|v| write!(f, ",{v}"))?;
                writeln!(f)?;
            }
            Ok(())
        })?,
        _ => bail!("{}: output must end in .npy or .csv", out.display()),
    }
    write_failed(out, &e.failed)
}

/// `OUT.failed.txt` (id, tab, error per line) beside the output `out`; with no failures,
/// removes an earlier run's, which would otherwise be read as this run's.
pub fn write_failed(out: &Path, failed: &[(String, String)]) -> Result<()> {
    let file = sidecar(out, "failed.txt");
    if failed.is_empty() {
        return match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", file.display()))
            }
            _ => Ok(()),
        };
    }
    let text: String = failed
        .iter()
        .map(|(id, err)| format!("{id}\t{err}\n"))
        .collect();
    crate::atomic::write(&file, text)
}

/// Names the first failures on stderr (and where they are all listed, with an output file).
pub fn report_failed(out: Option<&Path>, failed: &[(String, String)]) {
    if failed.is_empty() {
        return;
    }
    match out {
        Some(out) => eprintln!(
            "{} item(s) could not be read (listed in {}):",
            failed.len(),
            sidecar(out, "failed.txt").display()
        ),
        None => eprintln!("{} item(s) could not be read:", failed.len()),
    }
    for (id, err) in failed.iter().take(10) {
        eprintln!("  {}", failure_text(id, err));
    }
}

/// An item's error message, led by its id unless the message names it already.
pub fn failure_text(id: &str, err: &str) -> String {
    if err.contains(id) {
        err.to_string()
    } else {
        format!("{id}: {err}")
    }
}

/// Says how many files under `input` a folder scan passed over as holding no image.
pub fn note_skipped(input: &Path, skipped: usize) {
    if skipped > 0 {
        eprintln!(
            "note: skipped {skipped} file(s) under {} that hold no image (other file types; DICOM objects such as DICOMDIR, reports, presentation states, segmentations)",
            input.display()
        );
    }
}

pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn run(a: &EmbedArgs) -> Result<()> {
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "npy" && ext != "csv" {
        bail!("{}: output must end in .npy or .csv", a.out.display());
    }
    let read = a.read.options();
    let (items, skipped) = discover(&a.input, read.split)?;
    note_skipped(&a.input, skipped);
    let t0 = std::time::Instant::now();
    let parts = Parts {
        dir: crate::embed_parts::dir_for(&a.out),
        settings: format!(
            "{}|{:?}|{:?}|{:?}|{}|{:?}|{:?}",
            a.model,
            model_stamps(&a.model),
            a.pool,
            a.dtype,
            a.seed,
            a.device,
            read
        ),
        stop_after: a.stop_after,
    };
    let e = crate::with_backend!(a.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.seed)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, a.dtype)?);
        let job = BatchJob {
            read: &read,
            batch: a.batch,
            strict: a.strict,
        };
        embed_resumable::<B>(
            &vit,
            &cfg.preprocess,
            items,
            &job,
            a.pool,
            Some(&parts),
            &dev,
        )?
    });
    let Some(e) = e else {
        eprintln!("{}", parts.stopped_message());
        return Ok(());
    };
    if e.metas.is_empty() {
        // An empty matrix would read as a finished job to whatever consumes it next.
        write_failed(&a.out, &e.failed)?;
        report_failed(Some(&a.out), &e.failed);
        parts.remove();
        bail!(
            "no image could be read from {}; {} not written",
            a.input.display(),
            a.out.display()
        );
    }
    write_embeddings(&a.out, &e)?;
    parts.remove();
    eprintln!(
        "embedded {} image(s) → {} ({}×{}) in {:.1}s",
        e.metas.len(),
        a.out.display(),
        e.values.nrows(),
        e.values.ncols(),
        t0.elapsed().as_secs_f64()
    );
    report_failed(Some(&a.out), &e.failed);
    Ok(())
}
