//! `omnirad data slices`: every frame of multi-frame DICOMs and every slice of NIfTI volumes (and
//! every other image the readers give) written once as a 16-bit PNG, after the reader's intensity
//! policy, with a manifest that every `--input` and pretraining source reads. Pretraining draws
//! one image per sample: from a volume that means decoding the whole volume for one slice
//! (about 2.5 s for a 512×512×200 CT, BENCHMARKS.md), from a PNG a few milliseconds.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use omnirad_data::{discover, Image};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::embed::{csv_field, labels_text, note_skipped, report_failed, write_failed};
use crate::embed_parts::Parts;
use crate::names::{output_path, outside_outputs, OutputNames};
use crate::ReadArgs;

#[derive(Args, Debug)]
pub struct SlicesArgs {
    /// File, folder, CSV manifest or npz.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: a PNG per image (named by its path below --input, `_3` / `_axial12` for
    /// frames and slices) and manifest.csv (path, label, modality, anatomy, source id).
    #[arg(long)]
    pub out: PathBuf,
    /// Keep every Nth frame or slice of a multi-image file (neighbouring slices of a volume are
    /// near copies).
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one)]
    pub every: usize,
    /// Stop at the first unreadable item instead of skipping and listing it.
    #[arg(long)]
    pub strict: bool,
    /// Stop after this many input items; the same command run again continues after them (as
    /// it does after a kill).
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// Items decoded at a time (in parallel) between writes.
const CHUNK: usize = 32;

/// How far a stopped or killed run got: its first `items` items are done, and their manifest
/// rows are the first `bytes` bytes of `manifest.partial.csv` (appended after each chunk; this
/// file is rewritten atomically after the append, so rows past `bytes` are from a chunk that
/// did not finish).
#[derive(Serialize, Deserialize)]
struct Progress {
    key: String,
    items: usize,
    bytes: u64,
    written: usize,
    failed: Vec<(String, String)>,
}

pub fn run(a: &SlicesArgs) -> Result<()> {
    let read = a.read.options();
    let (items, skipped) = discover(&a.input, read.split)?;
    note_skipped(&a.input, skipped);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (items, own) = outside_outputs(items, &a.input, &a.out);
    if own > 0 {
        eprintln!(
            "note: left out {own} file(s) under {} (this job's outputs)",
            a.out.display()
        );
    }
    let (partial, progress_file) = (
        a.out.join("manifest.partial.csv"),
        a.out.join("slices.progress.json"),
    );
    let key = Parts {
        dir: a.out.clone(),
        settings: format!("slices|{:?}|{}", read, a.every),
        stop_after: None,
    }
    .key(&items);
    let mut names = OutputNames::new(Some(&a.input));
    let mut progress = resumed(&progress_file, &partial, &key, &mut names)?.unwrap_or(Progress {
        key,
        items: 0,
        bytes: 0,
        written: 0,
        failed: Vec::new(),
    });
    if progress.items > 0 {
        eprintln!(
            "continuing after {} of {} items (manifest rows so far in {})",
            progress.items,
            items.len(),
            partial.display()
        );
    }
    let end = a
        .stop_after
        .map_or(items.len(), |s| s.clamp(progress.items, items.len()));
    let bar = crate::embed::item_bar(items.len(), "slices");
    bar.set_position(progress.items as u64);
    for chunk in items[progress.items..end].chunks(CHUNK) {
        let loaded: Vec<_> = chunk
            .par_iter()
            .map(|it| (it.id(), it.load(&read)))
            .collect();
        // Names in item order, so reruns and thread counts give the same files.
        let mut rows = String::new();
        let mut todo: Vec<(PathBuf, Image)> = Vec::new();
        for (id, images) in loaded {
            let images = match images {
                Ok(v) => v,
                Err(e) if a.strict => return Err(e).context(format!("{id} (--strict)")),
                Err(e) => {
                    progress.failed.push((id, e.to_string()));
                    continue;
                }
            };
            for im in images.into_iter().step_by(a.every) {
                let name = names.name(&im.meta.id);
                let path = output_path(&a.out, &name, ".png")?;
                let m = &im.meta;
                rows.push_str(&format!(
                    "{}.png,{},{},{},{}\n",
                    name.display(),
                    labels_text(m),
                    m.modality.name(),
                    csv_field(m.anatomy.as_deref().unwrap_or("")),
                    csv_field(&m.id)
                ));
                todo.push((path, im));
            }
        }
        todo.par_iter()
            .try_for_each(|(path, im)| write_png16(path, im))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        f.write_all(rows.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", partial.display()))?;
        progress.items += chunk.len();
        progress.bytes += rows.len() as u64;
        progress.written += todo.len();
        crate::atomic::write(&progress_file, serde_json::to_string(&progress)?)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if end < items.len() {
        eprintln!(
            "stopped after {end} items; run the same command again to continue (progress in {})",
            progress_file.display()
        );
        return Ok(());
    }
    let list = a.out.join("manifest.csv");
    let rows = std::fs::read_to_string(&partial).unwrap_or_default();
    crate::atomic::write(&list, format!("path,label,modality,anatomy,source\n{rows}"))?;
    write_failed(&list, &progress.failed)?;
    let _ = std::fs::remove_file(&partial);
    let _ = std::fs::remove_file(&progress_file);
    eprintln!(
        "{} images written to {} (listed in {})",
        progress.written,
        a.out.display(),
        list.display()
    );
    report_failed(Some(&list), &progress.failed);
    if progress.written == 0 {
        bail!("{}: no readable images", a.input.display());
    }
    Ok(())
}

/// The progress of an earlier run of the same job (same settings and items), with the names it
/// gave reserved and its unfinished chunk's rows cut off; None to start afresh.
fn resumed(
    progress_file: &Path,
    partial: &Path,
    key: &str,
    names: &mut OutputNames,
) -> Result<Option<Progress>> {
    let earlier = std::fs::read_to_string(progress_file)
        .ok()
        .and_then(|t| serde_json::from_str::<Progress>(&t).ok());
    let Some(p) = earlier.filter(|p| p.key == key) else {
        if progress_file.exists() {
            eprintln!(
                "{}: progress of another job (other settings or inputs); starting over",
                progress_file.display()
            );
        }
        let _ = std::fs::remove_file(partial);
        return Ok(None);
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    f.set_len(p.bytes)
        .with_context(|| format!("truncating {}", partial.display()))?;
    let rows = std::fs::read_to_string(partial)
        .with_context(|| format!("reading {}", partial.display()))?;
    for row in rows.lines() {
        // Names are plain ([A-Za-z0-9_-] and /), so the path column is never quoted.
        let file = row.split(',').next().unwrap_or_default();
        names.reserve(PathBuf::from(file.trim_end_matches(".png")));
    }
    Ok(Some(p))
}

/// A [0, 1] image as a 16-bit grey or RGB PNG (v·65535 rounded: within 7.7e-6 of v when read
/// back, as the raster reader divides by 65535).
fn write_png16(path: &std::path::Path, im: &Image) -> Result<()> {
    let (c, h, w) = im.data.dim();
    let q = |v: f32| (v.clamp(0.0, 1.0) * 65535.0).round() as u16;
    let (w32, h32) = (w as u32, h as u32);
    crate::atomic::write_with(path, |tmp| {
        let saved = if c == 1 {
            let px: Vec<u16> = im.data.iter().map(|&v| q(v)).collect();
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(w32, h32, px)
                .expect("h·w values")
                .save_with_format(tmp, image::ImageFormat::Png)
        } else {
            let px: Vec<u16> = (0..h * w)
                .flat_map(|p| (0..3).map(move |k| (k, p)))
                .map(|(k, p)| q(im.data[[k, p / w, p % w]]))
                .collect();
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(w32, h32, px)
                .expect("h·w·3 values")
                .save_with_format(tmp, image::ImageFormat::Png)
        };
        saved.with_context(|| format!("writing {}", tmp.display()))
    })
}
