//! `omnirad data slices`: every frame of multi-frame DICOMs and every slice of NIfTI volumes (and
//! every other image the readers give) written once as a 16-bit PNG, after the reader's intensity
//! policy, with a manifest that every `--input` and pretraining source reads. Pretraining draws
//! one image per sample: from a volume that means decoding the whole volume for one slice
//! (about 2.5 s for a 512×512×200 CT, BENCHMARKS.md), from a PNG a few milliseconds.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use omnirad_data::loader::{grouped, load_item};
use omnirad_data::{discover, Image, Item};
use rayon::prelude::*;

use crate::embed::{csv_field, failure_text, labels_text, note_skipped, report_failed};
use crate::embed_parts::Parts;
use crate::journal::{Journal, CHUNK};
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
    let key = Parts {
        dir: a.out.clone(),
        settings: format!("slices|{:?}|{}", read, a.every),
        stop_after: None,
    }
    .key(&items);
    let list = a.out.join("manifest.csv");
    let mut names = OutputNames::new(Some(&a.input));
    // Names are plain ([A-Za-z0-9_-] and /), so the path column is never quoted.
    let mut journal = Journal::open(&list, key, |row| {
        let file = row.split(',').next().unwrap_or_default();
        names.reserve(PathBuf::from(file.trim_end_matches(".png")));
    })?;
    let done = journal.progress.items;
    if done > 0 {
        eprintln!(
            "continuing after {done} of {} items (manifest rows so far in {})",
            items.len(),
            journal.rows_path().display()
        );
    }
    let end = a
        .stop_after
        .map_or(items.len(), |s| s.clamp(done, items.len()));
    let bar = crate::embed::item_bar(items.len(), "slices");
    bar.set_position(done as u64);
    let load = |it: &Item| (it.id(), load_item(it, &read));
    let count = |(_, r): &(String, Result<Vec<Image>, String>)| r.as_ref().map_or(0, Vec::len);
    for loaded in grouped(&items[done..end], CHUNK, load, count) {
        let n = loaded.len();
        // Names in item order, so reruns and thread counts give the same files.
        let mut rows = String::new();
        let mut todo: Vec<(PathBuf, Image)> = Vec::new();
        for (id, images) in loaded {
            let images = match images {
                Ok(v) => v,
                Err(e) if a.strict => bail!("{} (--strict)", failure_text(&id, &e)),
                Err(e) => {
                    journal.progress.failed.push((id, e));
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
        journal.commit(n, &rows, todo.len())?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if end < items.len() {
        journal.stopped();
        return Ok(());
    }
    let progress = journal.finish("path,label,modality,anatomy,source")?;
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
