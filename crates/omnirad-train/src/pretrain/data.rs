//! Pretraining batches: sources mixed by weight, multi-crop views, iBOT masks.
//!
//! Everything random is drawn from (seed, step, position), never from shared state, so step k
//! gets the same images, views and masks whether the run started at 0 or resumed at k.

use std::path::PathBuf;

use omnirad_data::augment::{sample_rng, Augment, MultiCrop};
use omnirad_data::dicom::Window;
use omnirad_data::preprocess::{normalize, to_channels};
use omnirad_data::{discover, Image, Item, Normalize, ReadOptions, Split};
use rand::Rng;
use rayon::prelude::*;

use super::config::PretrainConfig;
use crate::masking::BlockMasking;
use crate::ssl::SslBatch;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    Source { path: PathBuf, msg: String },
    #[error("{0}")]
    Config(String),
}

struct Source {
    items: Vec<Item>,
    /// Running totals of the items' image counts: item i holds draws `ends[i − 1]..ends[i]`, so
    /// a draw takes each frame or slice of the source equally often.
    ends: Vec<usize>,
    weight: f64,
}

impl Source {
    fn images(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }
}

pub struct PretrainData {
    sources: Vec<Source>,
    read: ReadOptions,
    crops: MultiCrop,
    normalize: Normalize,
    channels: usize,
    masking: BlockMasking,
    mask_probability: f64,
    mask_ratio: (f64, f64),
    use_masks: bool,
    seed: u64,
}

/// Tries per sample before a bad item is given up on and another one drawn.
const RETRIES: usize = 8;

impl PretrainData {
    /// `channels` and `patch_size` come from the encoder.
    pub fn open(
        cfg: &PretrainConfig,
        channels: usize,
        patch_size: usize,
    ) -> Result<Self, DataError> {
        let window = Window::parse(&cfg.data.window).map_err(DataError::Config)?;
        let read = ReadOptions {
            window,
            ..Default::default()
        };
        let mut sources = Vec::new();
        for s in &cfg.data.sources {
            let err = |msg: String| DataError::Source {
                path: s.path.clone(),
                msg,
            };
            let split = Split::parse(&s.split).map_err(err)?;
            let (items, _) = discover(&s.path, split).map_err(|e| err(e.to_string()))?;
            if items.is_empty() {
                return Err(err("no readable images".into()));
            }
            // An item whose header cannot be read counts once; loading it reports the problem.
            let counts: Vec<usize> = items
                .par_iter()
                .map(|it| it.count(&read).unwrap_or(1).max(1))
                .collect();
            let ends = counts
                .iter()
                .scan(0, |total, c| {
                    *total += c;
                    Some(*total)
                })
                .collect();
            sources.push(Source {
                items,
                ends,
                weight: s.weight,
            });
        }
        let c = &cfg.crops;
        let mut global = Augment::global(c.global_size);
        global.scale = c.global_scale;
        let mut local = Augment::local(c.local_size);
        local.scale = c.local_scale;
        if c.xray {
            global = global.for_xray();
            local = local.for_xray();
        }
        for a in [&mut global, &mut local] {
            if let Some(p) = c.blur_p {
                a.blur_p = p;
            }
            if let Some(p) = c.solarize_p {
                a.solarize_p = p;
            }
            if let Some(j) = c.jitter {
                a.brightness = j;
                a.contrast = j;
            }
        }
        // DINOv2 never solarises local crops.
        local.solarize_p = 0.0;
        c.check_patch_multiple(patch_size)
            .map_err(DataError::Config)?;
        let grid = c.global_size / patch_size;
        Ok(Self {
            sources,
            read,
            crops: MultiCrop {
                global,
                n_global: c.n_global,
                local,
                n_local: c.n_local,
            },
            normalize: cfg.data.normalize.clone(),
            channels,
            masking: BlockMasking::new(grid, grid),
            mask_probability: cfg.mask.probability,
            mask_ratio: (cfg.mask.min_ratio, cfg.mask.max_ratio),
            use_masks: cfg.loss.ibot_weight > 0.0,
            seed: cfg.run.seed,
        })
    }

    /// Images over all sources, every frame and slice counted.
    pub fn len(&self) -> usize {
        self.sources.iter().map(Source::images).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// NIfTI files among the sources: each draw of one decodes the whole volume for one slice.
    pub fn volume_files(&self) -> usize {
        let nifti = |p: &std::path::Path| {
            let name = p.to_string_lossy().to_ascii_lowercase();
            name.ends_with(".nii") || name.ends_with(".nii.gz")
        };
        self.sources
            .iter()
            .flat_map(|s| &s.items)
            .filter(|it| matches!(it, Item::File { path, .. } if nifti(path)))
            .count()
    }

    fn draw(&self, rng: &mut impl Rng) -> &Item {
        let total: f64 = self.sources.iter().map(|s| s.weight).sum();
        let mut u = rng.random_range(0.0..total);
        let src = self
            .sources
            .iter()
            .find(|s| {
                u -= s.weight;
                u < 0.0
            })
            .unwrap_or_else(|| self.sources.last().expect("at least one source"));
        // With one image per item this is the uniform draw over items.
        let u = rng.random_range(0..src.images());
        &src.items[src.ends.partition_point(|&e| e <= u)]
    }

    /// Views of one sample; bad items are replaced by fresh draws and reported.
    fn sample(
        &self,
        key: u64,
        index: u64,
        failed: &mut Vec<(String, String)>,
    ) -> Option<(Vec<Image>, Vec<Image>)> {
        let mut rng = sample_rng(self.seed, key, index);
        for _ in 0..RETRIES {
            let item = self.draw(&mut rng);
            match item.load(&self.read) {
                Ok(images) if !images.is_empty() => {
                    let img = &images[rng.random_range(0..images.len())];
                    return Some(self.crops.views(img, &mut rng));
                }
                Ok(_) => failed.push((item.id(), "no images".into())),
                Err(e) => failed.push((item.id(), e.to_string())),
            }
        }
        None
    }

    fn tensor(&self, views: &[Image]) -> Vec<f32> {
        let mut out = Vec::new();
        for v in views {
            let mut a = to_channels(v.data.clone(), self.channels);
            normalize(&mut a, &self.normalize);
            out.extend(a.iter());
        }
        out
    }

    /// Micro-batch `micro` of optimiser step `step`, with `batch` images, and the items that
    /// failed to load on the way. Err when a sample found no loadable item in `RETRIES` draws.
    pub fn batch(
        &self,
        step: u64,
        micro: u64,
        batch: usize,
    ) -> Result<(SslBatch, Vec<(String, String)>), DataError> {
        let key = step.wrapping_mul(1 << 16) ^ micro;
        let results: Vec<_> = (0..batch)
            .into_par_iter()
            .map(|i| {
                let mut failed = Vec::new();
                let v = self.sample(key, i as u64, &mut failed);
                (v, failed)
            })
            .collect();
        let mut failed = Vec::new();
        let mut samples = Vec::with_capacity(batch);
        for (v, f) in results {
            failed.extend(f);
            match v {
                Some(v) => samples.push(v),
                None => {
                    return Err(DataError::Config(format!(
                        "{RETRIES} draws in a row failed to load; last errors: {:?}",
                        &failed[failed.len().saturating_sub(3)..]
                    )))
                }
            }
        }
        let (ng, nl) = (self.crops.n_global, self.crops.n_local);
        // Crop-major order: all first global crops, then all second ones, …
        let globals: Vec<Image> = (0..ng)
            .flat_map(|c| samples.iter().map(move |s| s.0[c].clone()))
            .collect();
        let locals: Vec<Image> = (0..nl)
            .flat_map(|c| samples.iter().map(move |s| s.1[c].clone()))
            .collect();
        let (gs, ls) = (self.crops.global.size, self.crops.local.size);
        let n_img = ng * batch;
        let masks = if self.use_masks {
            let mut rng = sample_rng(self.seed ^ 0x6d61_736b, key, u64::MAX);
            self.masking
                .batch(n_img, self.mask_probability, self.mask_ratio, &mut rng)
        } else {
            vec![vec![false; self.masking.height * self.masking.width]; n_img]
        };
        Ok((
            SslBatch {
                batch,
                n_global: ng,
                n_local: nl,
                globals: self.tensor(&globals),
                global_shape: [n_img, self.channels, gs, gs],
                locals: self.tensor(&locals),
                local_shape: [nl * batch, self.channels, ls, ls],
                masks,
            },
            failed,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretrain::config::SourceSection;
    use std::path::Path;

    #[test]
    fn draws_take_every_frame_of_a_source_equally_often() {
        let dir = tempfile::tempdir().unwrap();
        let shared = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/dicom-pydicom"
        );
        for f in ["emri_small.dcm", "MR_small.dcm"] {
            std::fs::copy(Path::new(shared).join(f), dir.path().join(f)).unwrap();
        }
        let mut cfg = PretrainConfig::preset("omnirad").unwrap();
        cfg.data.sources = vec![SourceSection {
            path: dir.path().to_path_buf(),
            weight: 1.0,
            split: "train".into(),
        }];
        let patch = cfg.model.vit().unwrap().patch_size;
        let data = PretrainData::open(&cfg, 3, patch).unwrap();
        // 10 MR frames and 1: eleven images, the 10-frame file drawn 10 times in 11.
        assert_eq!(data.len(), 11);
        let n = 11_000;
        let mut rng = sample_rng(7, 0, 0);
        let multi = (0..n)
            .filter(|_| data.draw(&mut rng).id().ends_with("emri_small.dcm"))
            .count();
        // Binomial(11 000, 10/11): mean 10 000, sd 30.
        assert!((9_880..=10_120).contains(&multi), "{multi} of {n}");
    }
}
