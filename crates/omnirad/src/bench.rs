//! `omnirad bench`: decode+preprocess throughput and encoder inference throughput.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use omnirad_data::loader::load_batch;
use omnirad_data::{discover, Preprocess};
use serde_json::json;

use crate::ReadArgs;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Decode + preprocess images/s over every file under --input (all cores, rayon).
    Decode {
        /// File, folder, CSV manifest or npz.
        #[arg(long)]
        input: PathBuf,
        /// Side of the preprocessed image.
        #[arg(long, default_value_t = 224, value_parser = crate::at_least_one)]
        size: usize,
        /// Passes over the input (the first also warms the page cache).
        #[arg(long, default_value_t = 3, value_parser = crate::at_least_one)]
        repeat: usize,
        /// Produce two DINOv2-style global training views per image instead of one eval view.
        #[arg(long)]
        augment: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// The MedMNIST v2 protocol: frozen features, a probe, test metrics beside published references.
    Medmnist(crate::medmnist_bench::MedMnistArgs),
    /// Segmentation heads on an encoder (DRIVE, CHASE_DB1, BUSI, MedSegBench npz): test Dice beside published U-Nets.
    Medsegbench(crate::segment::MedSegBenchArgs),
    /// Image-to-image retrieval by label: Recall@k, P@k, mAP@k of a query set against a gallery.
    Retrieval(crate::retrieve::RetrievalBenchArgs),
    /// Step speed on random input: inference, fine-tuning or pretraining; f32 or bf16.
    #[command(alias = "embed")]
    Speed(crate::speed::SpeedArgs),
}

/// Decodes every item and makes two augmented, normalised global views per image; returns the
/// number of source images.
fn augmented_views(
    items: &[omnirad_data::Item],
    read: &omnirad_data::ReadOptions,
    pre: &Preprocess,
) -> usize {
    use omnirad_data::augment::{sample_rng, Augment};
    use rayon::prelude::*;
    let aug = Augment::global(pre.size);
    items
        .par_iter()
        .enumerate()
        .map(|(i, it)| {
            let imgs = it.load(read).unwrap_or_default();
            let mut rng = sample_rng(0, 0, i as u64);
            for im in &imgs {
                for _ in 0..2 {
                    let mut v = omnirad_data::preprocess::to_channels(
                        aug.apply(im, &mut rng).data,
                        pre.channels,
                    );
                    omnirad_data::preprocess::normalize(&mut v, &pre.normalize);
                    std::hint::black_box(&v);
                }
            }
            imgs.len()
        })
        .sum()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let v = match cmd {
        BenchCmd::Decode {
            input,
            size,
            repeat,
            augment,
            read,
        } => {
            let read = read.options();
            let (items, _) = discover(&input, read.split)?;
            let pre = Preprocess {
                size,
                ..Preprocess::default()
            };
            let mut rates = Vec::new();
            let mut images = 0;
            for _ in 0..repeat.max(1) {
                let t = Instant::now();
                images = if augment {
                    augmented_views(&items, &read, &pre)
                } else {
                    load_batch(&items, &read, &pre).metas.len()
                };
                if images == 0 {
                    bail!("no readable image under {}", input.display());
                }
                rates.push(images as f64 / t.elapsed().as_secs_f64());
            }
            json!({ "bench": if augment { "decode+2 global views" } else { "decode+preprocess" }, "input": input, "items": items.len(), "images": images, "size": size,
                    "img_per_s_median": median(rates), "threads": rayon::current_num_threads() })
        }
        BenchCmd::Medmnist(a) => return crate::medmnist_bench::run(&a),
        BenchCmd::Medsegbench(a) => return crate::segment::bench_cmd(&a),
        BenchCmd::Retrieval(a) => return crate::retrieve::bench_cmd(&a),
        BenchCmd::Speed(a) => crate::speed::run(&a)?,
    };
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
