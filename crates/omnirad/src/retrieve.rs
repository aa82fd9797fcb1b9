//! `omnirad index build`, `omnirad retrieve` and `omnirad bench retrieval`.
//!
//! Index directory:
//! ```text
//! INDEX/index.json       model, pooling, dimension, and per item: id, modality, labels
//! INDEX/embeddings.npy   [N, D] f32
//! INDEX/parts/           while building: finished batches, so a stopped build continues
//! ```
//! Search is exact (one matrix product) up to 20 000 items and through an HNSW graph above,
//! built when the index is opened (hnsw_rs).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ndarray::Array2;
use omnirad_data::{discover, Item, Meta, Modality, ReadOptions, Split};
use omnirad_eval::retrieval::{retrieval_scores, Gallery};
use serde::{Deserialize, Serialize};

use crate::device::{model_stamps, parse_device, resolve_model, Device};
use crate::embed::{
    embed_items, embed_resumable, report_failed, write_failed, BatchJob, Pool, Rows,
};
use crate::embed_parts::Parts;
use crate::ReadArgs;

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[arg(long, value_enum, default_value = "cls")]
    pub pool: Pool,
    #[arg(long, default_value_t = 32, value_parser = crate::bounded_count)]
    pub batch: usize,
    /// Seed for preset (random-init) models.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop at the first unreadable item instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Encoder matmul/attention precision: bf16 = mixed precision on f32 weights (for GPUs and
    /// CPUs with AMX or AVX-512 BF16).
    #[arg(long, default_value = "f32")]
    pub dtype: omnirad_model::Precision,
}

/// An input path with an optional `=MODALITY` suffix (`drive/images=fundus`) that sets the
/// modality of everything read from it, for sources that do not record one.
pub fn input_spec(p: &Path) -> (PathBuf, Option<Modality>) {
    let s = p.to_string_lossy();
    match s.rsplit_once('=') {
        Some((path, m)) if !p.exists() && !m.contains(['/', '\\']) => {
            (PathBuf::from(path), Some(Modality::parse(m)))
        }
        _ => (p.to_path_buf(), None),
    }
}

/// The items under each of `inputs` (npz files read at `split`).
fn discover_inputs(inputs: &[PathBuf], split: Split) -> Result<Vec<Vec<Item>>> {
    let mut lists: Vec<Vec<Item>> = Vec::new();
    for spec in inputs {
        let (p, modality) = input_spec(spec);
        let (mut items, skipped) =
            discover(&p, split).with_context(|| format!("reading {}", p.display()))?;
        if let Some(m) = modality {
            for it in &mut items {
                if let Item::File { modality, .. } = it {
                    *modality = Some(m);
                }
            }
        }
        if skipped > 0 {
            eprintln!(
                "note: skipped {skipped} file(s) under {} that hold no image (other file types; DICOM objects such as DICOMDIR, reports, presentation states, segmentations)",
                p.display()
            );
        }
        lists.push(items);
    }
    Ok(lists)
}

fn encode_job<'a>(e: &EncodeArgs, opts: &'a ReadOptions) -> BatchJob<'a> {
    BatchJob {
        read: opts,
        batch: e.batch.max(1),
        strict: e.strict,
    }
}

fn report_skipped(emb: &Rows) {
    for (id, why) in emb.failed.iter().take(10) {
        eprintln!("skipped {id}: {why}");
    }
}

/// Embeds everything under `inputs` (npz files read at `split`), one result per input.
pub fn embed_inputs(
    e: &EncodeArgs,
    model: &str,
    inputs: &[PathBuf],
    read: &ReadArgs,
    split: Split,
) -> Result<Vec<Rows>> {
    let mut opts = read.options();
    opts.split = split;
    let lists = discover_inputs(inputs, split)?;
    crate::with_backend!(e.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(model, &dev, e.seed)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, e.dtype)?);
        let job = encode_job(e, &opts);
        let mut out = Vec::new();
        for items in lists {
            let emb = embed_items::<B>(&vit, &cfg.preprocess, items, &job, e.pool, &dev)?;
            report_skipped(&emb);
            out.push(emb);
        }
        Ok(out)
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexItem {
    pub id: String,
    pub modality: String,
    pub labels: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexInfo {
    /// As resolved when built: an absolute path for model directories and checkpoints.
    pub model: String,
    pub pool: Pool,
    pub seed: u64,
    pub dim: usize,
    pub items: Vec<IndexItem>,
    /// The [`model_stamps`] of `model` when built: retrieval refuses an encoder whose files
    /// changed since (a continued pretraining run rewrites its teacher in place), as its query
    /// embeddings would not be comparable. Absent in indexes of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_stamps: Option<Vec<Option<String>>>,
}

fn item(m: &Meta) -> IndexItem {
    IndexItem {
        id: m.id.clone(),
        modality: m.modality.name().to_string(),
        labels: m.labels.clone(),
    }
}

fn model_spec(m: &str) -> String {
    std::fs::canonicalize(m)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| m.to_string())
}

#[derive(Args, Debug)]
pub struct IndexBuildArgs {
    /// Model directory, public checkpoint or preset name.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub enc: EncodeArgs,
    /// Files, folders, manifests or npz files (repeatable).
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after this many input items (for time-sliced jobs): finished batches stay in
    /// OUT/parts/, and the same command run again continues after them, as it does after a kill.
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub read: ReadArgs,
}

pub fn build_cmd(a: &IndexBuildArgs) -> Result<()> {
    let items: Vec<Item> = discover_inputs(&a.input, a.read.split)?
        .into_iter()
        .flatten()
        .collect();
    let opts = a.read.options();
    let stamps = model_stamps(&a.model);
    let parts = Parts {
        dir: a.out.join("parts"),
        settings: format!(
            "{}|{:?}|{:?}|{:?}|{}|{:?}|{:?}",
            a.model, stamps, a.enc.pool, a.enc.dtype, a.enc.seed, a.enc.device, opts
        ),
        stop_after: a.stop_after,
    };
    let emb = crate::with_backend!(a.enc.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.enc.seed)?;
        let vit = vit.with_precision(crate::device::precision::<B>(&dev, a.enc.dtype)?);
        let job = encode_job(&a.enc, &opts);
        embed_resumable::<B>(
            &vit,
            &cfg.preprocess,
            items,
            &job,
            a.enc.pool,
            Some(&parts),
            &dev,
        )?
    });
    let Some(emb) = emb else {
        eprintln!("{}", parts.stopped_message());
        return Ok(());
    };
    let (values, metas) = (emb.values, emb.metas);
    if metas.is_empty() {
        report_failed(None, &emb.failed);
        bail!("no readable image in the inputs");
    }
    let dim = values.ncols();
    let info = IndexInfo {
        model: model_spec(&a.model),
        model_stamps: Some(stamps),
        pool: a.enc.pool,
        seed: a.enc.seed,
        dim,
        items: metas.iter().map(item).collect(),
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let npy = a.out.join("embeddings.npy");
    crate::atomic::write_with(&npy, |tmp| {
        ndarray_npy::write_npy(tmp, &values).with_context(|| format!("writing {}", tmp.display()))
    })?;
    let index = a.out.join("index.json");
    crate::atomic::write(&index, serde_json::to_string(&info)?)?;
    write_failed(&index, &emb.failed)?;
    parts.remove();
    eprintln!(
        "index of {} images ({dim}-d) written to {}",
        info.items.len(),
        a.out.display()
    );
    report_failed(Some(&index), &emb.failed);
    Ok(())
}

fn open_index(dir: &Path) -> Result<(IndexInfo, Array2<f32>)> {
    let p = dir.join("index.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: not an index (no index.json)", dir.display()))?;
    let info: IndexInfo =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid index", p.display()))?;
    let npy = dir.join("embeddings.npy");
    let values: Array2<f32> = omnirad_data::npy::read_npy(&npy)?;
    if values.dim() != (info.items.len(), info.dim) {
        bail!(
            "{}: holds {:?} embeddings but index.json lists {} items of dimension {}",
            npy.display(),
            values.dim(),
            info.items.len(),
            info.dim
        );
    }
    if values.iter().any(|v| !v.is_finite()) {
        bail!("{}: contains NaN or infinite values", npy.display());
    }
    Ok((info, values))
}

#[derive(Args, Debug)]
pub struct RetrieveArgs {
    /// Index directory written by `omnirad index build`.
    #[arg(long)]
    pub index: PathBuf,
    /// Query image(s): a file or folder.
    #[arg(long)]
    pub query: PathBuf,
    /// Nearest cases to list per query image.
    #[arg(long, default_value_t = 10, value_parser = crate::at_least_one)]
    pub k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// What became of the index's encoder since the build: `None` if its files are as they were
/// (or an index of an earlier version did not record them), else how they differ.
fn encoder_change(info: &IndexInfo) -> Option<&'static str> {
    let now = model_stamps(&info.model);
    let then = info.model_stamps.as_ref()?;
    (*then != now).then_some(if now.iter().all(Option::is_none) {
        "is gone (moved or deleted)"
    } else {
        "has changed since this index was built (its files differ)"
    })
}

/// `omnirad info` on an index directory.
pub fn describe_index(dir: &Path) -> Result<serde_json::Value> {
    let (info, _) = open_index(dir)?;
    let mut modalities = std::collections::BTreeMap::<&str, usize>::new();
    for i in &info.items {
        *modalities.entry(i.modality.as_str()).or_default() += 1;
    }
    let encoder = match (&info.model_stamps, encoder_change(&info)) {
        (None, _) => "not recorded (an index of an earlier version)".to_string(),
        (Some(_), None) => "unchanged since the build".to_string(),
        (Some(_), Some(what)) => format!("{what}: rebuild the index"),
    };
    Ok(serde_json::json!({
        "format": "retrieval index",
        "model": info.model,
        "encoder files": encoder,
        "pool": clap::ValueEnum::to_possible_value(&info.pool).map(|v| v.get_name().to_string()),
        "dim": info.dim,
        "items": info.items.len(),
        "modalities": modalities,
    }))
}

pub fn retrieve_cmd(a: &RetrieveArgs) -> Result<()> {
    let (info, values) = open_index(&a.index)?;
    if let Some(what) = encoder_change(&info) {
        bail!(
            "{}: the encoder {} {what}, and query embeddings must come from the encoder that \
             embedded the index: rebuild it with `omnirad index build`",
            a.index.join("index.json").display(),
            info.model
        );
    }
    let enc = EncodeArgs {
        pool: info.pool,
        batch: 32,
        seed: info.seed,
        strict: false,
        device: a.device,
        dtype: Default::default(),
    };
    let q = embed_inputs(
        &enc,
        &info.model,
        std::slice::from_ref(&a.query),
        &a.read,
        a.read.split,
    )?
    .remove(0);
    if q.metas.is_empty() {
        bail!("{}: no readable query image", a.query.display());
    }
    if q.values.ncols() != info.dim {
        bail!(
            "query embeddings are {}-d but the index holds {}-d ones",
            q.values.ncols(),
            info.dim
        );
    }
    let gallery = Gallery::new(values.view(), None);
    let hits = gallery.search(q.values.view(), a.k);
    let mut out = Vec::new();
    for (m, h) in q.metas.iter().zip(&hits) {
        let results: Vec<serde_json::Value> = h
            .iter()
            .map(|&(i, s)| {
                let it = &info.items[i];
                serde_json::json!({ "id": it.id, "score": s, "labels": it.labels, "modality": it.modality })
            })
            .collect();
        if !a.json {
            println!("{}:", m.id);
            for (r, &(i, s)) in h.iter().enumerate() {
                let it = &info.items[i];
                println!(
                    "  {:>3}  {s:.4}  {}  labels {:?}  {}",
                    r + 1,
                    it.id,
                    it.labels,
                    it.modality
                );
            }
        }
        out.push(serde_json::json!({ "query": m.id, "results": results }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RetrievalBenchArgs {
    /// Model directory, public checkpoint or preset name.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub enc: EncodeArgs,
    /// Labelled gallery: npz (read at --gallery-split), manifest or folder.
    #[arg(long)]
    pub gallery: PathBuf,
    #[arg(long, default_value = "train", value_parser = Split::parse)]
    pub gallery_split: Split,
    /// Labelled queries (default: the gallery file at --query-split).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    #[arg(long, default_value = "test", value_parser = Split::parse)]
    pub query_split: Split,
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    pub k: Vec<usize>,
    /// Writes OUT.md and OUT.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub read: ReadArgs,
}

pub fn bench_cmd(a: &RetrievalBenchArgs) -> Result<()> {
    if a.k.is_empty() || a.k.contains(&0) {
        bail!("--k needs positive cut-offs, e.g. 1,5,10");
    }
    let g = embed_inputs(
        &a.enc,
        &a.model,
        std::slice::from_ref(&a.gallery),
        &a.read,
        a.gallery_split,
    )?
    .remove(0);
    let qpath = a.queries.clone().unwrap_or_else(|| a.gallery.clone());
    let q = embed_inputs(
        &a.enc,
        &a.model,
        std::slice::from_ref(&qpath),
        &a.read,
        a.query_split,
    )?
    .remove(0);
    for (name, e) in [("gallery", &g), ("queries", &q)] {
        if e.metas.is_empty() {
            bail!("the {name} hold no readable image");
        }
        if let Some(m) = e.metas.iter().find(|m| m.labels.is_empty()) {
            bail!(
                "{}: {name} item without a label (retrieval is scored by label)",
                m.id
            );
        }
    }
    let kmax = *a.k.iter().max().expect("non-empty");
    let gallery = Gallery::new(g.values.view(), None);
    let ranked: Vec<Vec<usize>> = gallery
        .search(q.values.view(), kmax)
        .into_iter()
        .map(|r| r.into_iter().map(|x| x.0).collect())
        .collect();
    let ql: Vec<&Vec<i64>> = q.metas.iter().map(|m| &m.labels).collect();
    let gl: Vec<&Vec<i64>> = g.metas.iter().map(|m| &m.labels).collect();
    let scores = retrieval_scores(&ranked, &ql, &gl, &a.k);
    let mut md = format!(
        "omnirad `{}` ({:?} pooling): {} queries ({} {}) against {} gallery images ({} {}), cosine, {} search.\n\n| k | Recall@k | P@k | mAP@k |\n|---|---|---|---|\n",
        a.model,
        a.enc.pool,
        q.metas.len(),
        qpath.display(),
        a.query_split.name(),
        g.metas.len(),
        a.gallery.display(),
        a.gallery_split.name(),
        if gallery.is_approximate() { "HNSW" } else { "exact" }
    );
    for s in &scores {
        md += &format!(
            "| {} | {:.3} | {:.3} | {:.3} |\n",
            s.k, s.recall, s.precision, s.map
        );
    }
    print!("{md}");
    if let Some(out) = &a.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::atomic::write(&out.with_extension("md"), &md)?;
        crate::atomic::write(
            &out.with_extension("json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "model": a.model, "queries": q.metas.len(), "gallery": g.metas.len(), "scores": scores
            }))?,
        )?;
    }
    Ok(())
}
