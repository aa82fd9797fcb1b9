//! `omnirad demo`: the pipeline end to end on an embedded default. With no `--data`, it draws a
//! small synthetic multi-modality phantom set (CT, X-ray, ultrasound, fundus), writes it as PNGs
//! with a CSV manifest, reads it back through the normal readers and embeds it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use image::{GrayImage, RgbImage};
use ndarray::Array2;
use omnirad_data::{discover, Modality};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::{parse_device, resolve_model, Device};
use crate::embed::{embed_items, write_embeddings, BatchJob, Pool};
use crate::ReadArgs;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use these files instead of phantoms: a MedMNIST npz, a DICOM/NIfTI/image folder or a manifest.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Model directory or preset (random init).
    #[arg(long, default_value = "vit_pico")]
    pub model: String,
    /// Folder for the phantoms (when used) and embeddings.npy with its metadata.
    #[arg(long, default_value = "omnirad-demo")]
    pub out: PathBuf,
    /// Phantom images per modality.
    #[arg(long, default_value_t = 24, value_parser = crate::at_least_one)]
    pub per_modality: usize,
    /// cpu, cuda / cuda:N (a build with the `cuda` feature) or wgpu (with `wgpu`).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Seed for the phantoms and for preset (random-init) models.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub read: ReadArgs,
}

const PHANTOMS: [(&str, Modality); 4] = [
    ("ct", Modality::CT),
    ("xray", Modality::DX),
    ("us", Modality::US),
    ("fundus", Modality::Fundus),
];

fn noise(rng: &mut StdRng, sd: f32) -> f32 {
    (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * sd
}

fn ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> bool {
    ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0
}

/// One phantom in [0, 1]; `kind` indexes PHANTOMS. Fundus returns RGB.
fn phantom(kind: usize, n: usize, rng: &mut StdRng) -> Vec<[f32; 3]> {
    let j = |rng: &mut StdRng, s: f32| rng.random_range(-s..=s);
    let (dx, dy, sc) = (j(rng, 3.0), j(rng, 3.0), 1.0 + j(rng, 0.1));
    let c = n as f32 / 2.0;
    let r = n as f32 * 0.45 * sc;
    let grey = |v: f32| [v; 3];
    (0..n * n)
        .map(|i| {
            let (x, y) = ((i % n) as f32 - dx, (i / n) as f32 - dy);
            let p = match kind {
                // Axial CT: body, two dark lungs, bright vertebra.
                0 if ellipse(x, y, c + r * 0.3, c, r * 0.25, r * 0.35)
                    || ellipse(x, y, c - r * 0.3, c, r * 0.25, r * 0.35) =>
                {
                    grey(0.08)
                }
                0 if ellipse(x, y, c, c + r * 0.45, r * 0.12, r * 0.12) => grey(0.95),
                0 if ellipse(x, y, c, c, r, r * 0.7) => grey(0.5),
                0 => grey(0.0),
                // Chest radiograph: bright body, dark lung fields crossed by ribs.
                1 if ellipse(x, y, c - r * 0.4, c, r * 0.3, r * 0.6)
                    || ellipse(x, y, c + r * 0.4, c, r * 0.3, r * 0.6) =>
                {
                    grey(if (y / (n as f32 / 10.0)).sin() > 0.8 {
                        0.5
                    } else {
                        0.25
                    })
                }
                1 if ellipse(x, y, c, c, r * 1.05, r) => grey(0.75),
                1 => grey(0.1),
                // Ultrasound: speckled sector from the top, one dark lesion.
                2 if y - 2.0 > 0.0 && (x - c).atan2(y - 2.0).abs() < 0.6 && y < n as f32 * 0.9 => {
                    let lesion = if ellipse(x, y, c, c * 1.1, r * 0.3, r * 0.2) {
                        0.3
                    } else {
                        1.0
                    };
                    grey((0.9 * rng.random::<f32>()).min(1.0) * lesion)
                }
                2 => grey(0.0),
                // Fundus (RGB): orange disc, bright optic disc, two dark vessels.
                _ if !ellipse(x, y, c, c, r, r) => grey(0.0),
                _ if ellipse(x, y, c + r * 0.4, c, r * 0.15, r * 0.15) => [1.0, 0.9, 0.6],
                _ if ((y - c) - 0.3 * (x - c)).abs() < 1.2
                    || ((y - c) + 0.5 * (x - c)).abs() < 1.0 =>
                {
                    [0.45, 0.1, 0.05]
                }
                _ => [0.85, 0.4, 0.15],
            };
            p.map(|v| (v + noise(rng, 0.05)).clamp(0.0, 1.0))
        })
        .collect()
}

fn write_phantoms(dir: &Path, per: usize, seed: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("phantoms"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 64;
    let mut manifest = String::from("path,label,modality\n");
    for (k, (name, modality)) in PHANTOMS.iter().enumerate() {
        for i in 0..per {
            let px = phantom(k, n, &mut rng);
            let rel = format!("phantoms/{name}_{i:03}.png");
            let q = |v: f32| (v * 255.0).round() as u8;
            if *modality == Modality::Fundus {
                RgbImage::from_fn(n as u32, n as u32, |x, y| {
                    image::Rgb(px[y as usize * n + x as usize].map(q))
                })
                .save(dir.join(&rel))?;
            } else {
                GrayImage::from_fn(n as u32, n as u32, |x, y| {
                    image::Luma([q(px[y as usize * n + x as usize][0])])
                })
                .save(dir.join(&rel))?;
            }
            manifest += &format!("{rel},{k},{}\n", modality.name());
        }
    }
    let path = dir.join("phantoms.csv");
    crate::atomic::write(&path, manifest)?;
    Ok(path)
}

/// Leave-one-out 1-NN accuracy under cosine similarity: how well the space separates groups.
pub fn nn_accuracy(x: &Array2<f32>, groups: &[String]) -> f64 {
    let mut unit = x.clone();
    for mut row in unit.rows_mut() {
        let norm = row.dot(&row).sqrt().max(1e-12);
        row /= norm;
    }
    // All cosine similarities in one matrix product.
    let sims = unit.dot(&unit.t());
    let n = x.nrows();
    let hits = (0..n)
        .filter(|&i| {
            let best = (0..n)
                .filter(|&j| j != i)
                .max_by(|&a, &b| sims[[i, a]].total_cmp(&sims[[i, b]]))
                .expect("n >= 2");
            groups[best] == groups[i]
        })
        .count();
    hits as f64 / n as f64
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let read = a.read.options();
    let input = match &a.data {
        Some(p) => p.clone(),
        None => {
            let m = write_phantoms(&a.out, a.per_modality, a.seed)?;
            println!(
                "1. wrote {} synthetic phantoms ({}) to {}",
                a.per_modality * PHANTOMS.len(),
                PHANTOMS.map(|p| p.0).join(", "),
                a.out.join("phantoms").display()
            );
            m
        }
    };
    let (items, _) = discover(&input, read.split)?;
    println!("2. found {} item(s) in {}", items.len(), input.display());
    let e = crate::with_backend!(a.device, |B, dev| {
        let (vit, cfg) = resolve_model::<B>(&a.model, &dev, a.seed)?;
        println!(
            "3. encoder {}: ViT dim {} depth {} patch {}, input {}px {}ch",
            a.model,
            cfg.vit.embed_dim,
            cfg.vit.depth,
            cfg.vit.patch_size,
            cfg.preprocess.size,
            cfg.preprocess.channels
        );
        let job = BatchJob {
            read: &read,
            batch: 32,
            strict: false,
        };
        embed_items::<B>(&vit, &cfg.preprocess, items, &job, Pool::ClsMean, &dev)?
    });
    let out = a.out.join("embeddings.npy");
    write_embeddings(&out, &e)?;
    println!(
        "4. embedded {} image(s) → {} ({} failed)",
        e.metas.len(),
        out.display(),
        e.failed.len()
    );
    let by_modality: Vec<String> = e
        .metas
        .iter()
        .map(|m| m.modality.name().to_string())
        .collect();
    let by_label: Vec<String> = e.metas.iter().map(|m| format!("{:?}", m.labels)).collect();
    let n = e.metas.len();
    if n >= 2 {
        let distinct = |g: &[String]| g.iter().collect::<std::collections::BTreeSet<_>>().len();
        if distinct(&by_modality) > 1 {
            println!(
                "5. leave-one-out 1-NN modality accuracy: {:.3} (chance ≈ {:.3})",
                nn_accuracy(&e.values, &by_modality),
                1.0 / distinct(&by_modality) as f64
            );
        }
        if e.metas.iter().all(|m| !m.labels.is_empty()) && distinct(&by_label) > 1 {
            println!(
                "   leave-one-out 1-NN label accuracy:    {:.3}",
                nn_accuracy(&e.values, &by_label)
            );
        }
    }
    println!("done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
