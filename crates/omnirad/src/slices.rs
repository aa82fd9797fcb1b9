//! `omnirad data slices`: every frame of multi-frame DICOMs and every slice of NIfTI volumes (and
//! every other image the readers give) written once as a 16-bit PNG, after the reader's intensity
//! policy, with a manifest that every `--input` and pretraining source reads. Pretraining draws
//! one image per sample: from a volume that means decoding the whole volume for one slice
//! (about 2.5 s for a 512×512×200 CT, BENCHMARKS.md), from a PNG a few milliseconds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use omnirad_data::loader::image_chunks;
use omnirad_data::{discover, Image};
use rayon::prelude::*;

use crate::embed::{csv_field, labels_text, note_skipped};
use crate::embed_parts::job_key;
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
    let items = outside_outputs(items, &a.input, &a.out)?;
    let key = job_key(&format!("slices|{:?}|{}", read, a.every), &items);
    let list = a.out.join("manifest.csv");
    let mut names = OutputNames::new(Some(&a.input));
    // Names are plain ([A-Za-z0-9_-] and /), so the path column is never quoted.
    let mut journal = Journal::open(&list, key, items.len(), |row| {
        let file = row.split(',').next().unwrap_or_default();
        names.reserve(PathBuf::from(file.trim_end_matches(".png")));
    })?;
    let todo = journal.todo(items.len(), a.stop_after);
    let bar = crate::embed::item_bar(items.len(), "slices");
    bar.set_position(todo.start as u64);
    for loaded in image_chunks(&items[todo.clone()], CHUNK, &read) {
        let n = loaded.len();
        // Names in item order, so reruns and thread counts give the same files.
        let mut rows = String::new();
        let mut todo: Vec<(PathBuf, Image)> = Vec::new();
        for (id, images) in loaded {
            let Some(images) = journal.images(id, images, a.strict)? else {
                continue;
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
    journal.close(
        items.len(),
        "path,label,modality,anatomy,source",
        "images",
        &a.input,
    )
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
