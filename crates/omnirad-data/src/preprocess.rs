//! Deterministic preprocessing: resize, channel handling, normalisation.

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::F32;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use ndarray::{s, Array3};
use serde::{Deserialize, Serialize};

use crate::image::Image;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How a non-square image reaches `size × size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Ignore the aspect ratio (MedMNIST+, MedSegBench, OmniRad's fine-tuning).
    #[default]
    Stretch,
    /// Keep the aspect ratio, fit inside and pad with zeros (before normalisation).
    Pad,
    /// Keep the aspect ratio, fill and centre-crop.
    Crop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Normalize {
    /// ImageNet mean/std (what DINOv2, timm and OmniRad checkpoints expect).
    Imagenet,
    /// Per-image, per-channel zero mean and unit variance.
    Zscore,
    Custom {
        mean: Vec<f32>,
        std: Vec<f32>,
    },
    None,
}

impl Normalize {
    /// Custom statistics must be numbers (stds > 0), one for all channels or one per channel
    /// of a `channels`-channel input where that is known.
    pub fn validate(&self, channels: Option<usize>) -> Result<(), String> {
        let Normalize::Custom { mean, std } = self else {
            return Ok(());
        };
        let fits = |n: usize| n == 1 || channels.map_or(n > 0, |c| n == c);
        if !fits(mean.len()) || !fits(std.len()) {
            let per = channels.map_or(String::new(), |c| format!(" for {c} channels"));
            return Err(format!(
                "normalize: {} means and {} stds{per} (give 1 or one per channel)",
                mean.len(),
                std.len(),
            ));
        }
        if !mean.iter().all(|m| m.is_finite()) || !std.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err("normalize: means must be numbers and stds numbers > 0".into());
        }
        Ok(())
    }
}

/// Everything needed to turn a [0, 1] image into model input; saved in the model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub size: usize,
    #[serde(default)]
    pub resize: ResizeMode,
    /// 3 replicates grey images; 1 averages RGB for native single-channel models.
    pub channels: usize,
    pub normalize: Normalize,
}

/// Largest `size` a preprocessing accepts: beyond any radiograph or scanner matrix, so that a
/// damaged or mistyped config is an error instead of an allocation that ends the process.
pub const MAX_SIZE: usize = 8192;

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            size: 224,
            resize: ResizeMode::Stretch,
            channels: 3,
            normalize: Normalize::Imagenet,
        }
    }
}

/// Bicubic (Catmull-Rom, as PIL) resize of one `[0, 1]` plane; SIMD via fast_image_resize.
pub fn resize_plane(
    src: &[f32],
    w: usize,
    h: usize,
    crop: Option<[f64; 4]>,
    dw: usize,
    dh: usize,
) -> Vec<f32> {
    let src_pixels: Vec<F32> = src.iter().map(|&v| F32::new(v)).collect();
    let src_img = TypedImageRef::new(w as u32, h as u32, &src_pixels).expect("buffer matches size");
    let mut dst = TypedImage::<F32>::new(dw as u32, dh as u32);
    let mut opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    if let Some([l, t, cw, ch]) = crop {
        opts = opts.crop(l, t, cw, ch);
    }
    // Typed, not `Resizer::resize`: that one dispatches over all 13 pixel types at run time, and
    // compiling their SIMD kernels was 63 % of this crate's LLVM IR (cargo llvm-lines).
    Resizer::new()
        .resize_typed(&src_img, &mut dst, &opts)
        .expect("same pixel type");
    dst.pixels().iter().map(|p| p.0.clamp(0.0, 1.0)).collect()
}

/// Resize every channel of a [C, H, W] array, optionally from a crop box (left, top, w, h).
pub fn resize_chw(a: &Array3<f32>, crop: Option<[f64; 4]>, dw: usize, dh: usize) -> Array3<f32> {
    let (c, h, w) = a.dim();
    if crop.is_none() && (h, w) == (dh, dw) {
        return a.clone();
    }
    let mut out = Array3::zeros((c, dh, dw));
    for ch in 0..c {
        let plane = a.slice(s![ch, .., ..]).as_standard_layout().to_owned();
        let r = resize_plane(plane.as_slice().expect("standard"), w, h, crop, dw, dh);
        out.slice_mut(s![ch, .., ..])
            .assign(&ndarray::Array2::from_shape_vec((dh, dw), r).expect("size"));
    }
    out
}

/// Replicate grey to 3 channels or average RGB to 1.
pub fn to_channels(a: Array3<f32>, channels: usize) -> Array3<f32> {
    let c = a.dim().0;
    match (c, channels) {
        (x, y) if x == y => a,
        (1, n) => ndarray::concatenate(ndarray::Axis(0), &vec![a.view(); n]).expect("same shape"),
        (_, 1) => a
            .mean_axis(ndarray::Axis(0))
            .expect("non-empty")
            .insert_axis(ndarray::Axis(0)),
        (_, n) => {
            let grey = a
                .mean_axis(ndarray::Axis(0))
                .expect("non-empty")
                .insert_axis(ndarray::Axis(0));
            ndarray::concatenate(ndarray::Axis(0), &vec![grey.view(); n]).expect("same shape")
        }
    }
}

pub fn normalize(a: &mut Array3<f32>, norm: &Normalize) {
    let c = a.dim().0;
    let (mean, std): (Vec<f32>, Vec<f32>) = match norm {
        Normalize::None => return,
        Normalize::Imagenet if c == 3 => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
        // A one-channel model under ImageNet stats uses their channel means.
        Normalize::Imagenet => (vec![0.449], vec![0.226]),
        Normalize::Custom { mean, std } => (mean.clone(), std.clone()),
        Normalize::Zscore => (0..c)
            .map(|i| {
                let p = a.slice(s![i, .., ..]);
                let m = p.mean().unwrap_or(0.0);
                (m, p.std(0.0).max(1e-6))
            })
            .unzip(),
    };
    for i in 0..c {
        let (m, sd) = (mean[i.min(mean.len() - 1)], std[i.min(std.len() - 1)]);
        a.slice_mut(s![i, .., ..]).mapv_inplace(|v| (v - m) / sd);
    }
}

impl Preprocess {
    /// Checks the values a model directory's config.json or a bundle could carry wrongly.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_SIZE).contains(&self.size) {
            return Err(format!(
                "preprocess.size {} must be from 1 to {MAX_SIZE}",
                self.size
            ));
        }
        if self.channels == 0 {
            return Err("preprocess.channels must be positive".into());
        }
        self.normalize
            .validate(Some(self.channels))
            .map_err(|e| format!("preprocess.{e}"))?;
        Ok(())
    }

    /// [C, size, size] model input.
    pub fn apply(&self, img: &Image) -> Array3<f32> {
        let (_, h, w) = img.data.dim();
        let n = self.size;
        let a = match self.resize {
            ResizeMode::Stretch => resize_chw(&img.data, None, n, n),
            ResizeMode::Crop => {
                let side = h.min(w) as f64;
                let crop = [(w as f64 - side) / 2.0, (h as f64 - side) / 2.0, side, side];
                resize_chw(&img.data, Some(crop), n, n)
            }
            ResizeMode::Pad => {
                let scale = n as f64 / h.max(w) as f64;
                let (nh, nw) = (
                    ((h as f64 * scale).round() as usize).clamp(1, n),
                    ((w as f64 * scale).round() as usize).clamp(1, n),
                );
                let r = resize_chw(&img.data, None, nw, nh);
                let mut out = Array3::zeros((img.channels(), n, n));
                let (t, l) = ((n - nh) / 2, (n - nw) / 2);
                out.slice_mut(s![.., t..t + nh, l..l + nw]).assign(&r);
                out
            }
        };
        let mut a = to_channels(a, self.channels);
        normalize(&mut a, &self.normalize);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Meta;

    fn img(c: usize, h: usize, w: usize) -> Image {
        let data = Array3::from_shape_fn((c, h, w), |(k, i, j)| ((k + i + j) % 7) as f32 / 6.0);
        Image {
            data,
            meta: Meta::default(),
        }
    }

    #[test]
    fn shapes_for_every_mode() {
        for mode in [ResizeMode::Stretch, ResizeMode::Pad, ResizeMode::Crop] {
            let p = Preprocess {
                size: 32,
                resize: mode,
                channels: 3,
                normalize: Normalize::None,
            };
            assert_eq!(p.apply(&img(1, 20, 50)).dim(), (3, 32, 32));
        }
    }

    #[test]
    fn pad_keeps_aspect_and_zero_border() {
        let p = Preprocess {
            size: 40,
            resize: ResizeMode::Pad,
            channels: 1,
            normalize: Normalize::None,
        };
        let mut im = img(1, 10, 40);
        im.data.fill(1.0);
        let out = p.apply(&im);
        // 10x40 -> 10x40 centred in 40x40: rows 15..25 are image, the rest padding.
        assert_eq!(out[[0, 0, 0]], 0.0);
        assert_eq!(out[[0, 14, 20]], 0.0);
        assert!((out[[0, 20, 20]] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn imagenet_normalisation_values() {
        let p = Preprocess {
            size: 4,
            resize: ResizeMode::Stretch,
            channels: 3,
            normalize: Normalize::Imagenet,
        };
        let mut im = img(1, 4, 4);
        im.data.fill(0.5);
        let out = p.apply(&im);
        for c in 0..3 {
            let want = (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((out[[c, 1, 1]] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn zscore_gives_zero_mean_unit_std() {
        let p = Preprocess {
            size: 16,
            resize: ResizeMode::Stretch,
            channels: 1,
            normalize: Normalize::Zscore,
        };
        let out = p.apply(&img(1, 16, 16));
        assert!(out.mean().unwrap().abs() < 1e-5);
        assert!((out.std(0.0) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn resize_plane_matches_pillow_bicubic() {
        #[derive(Deserialize)]
        struct Case {
            w: usize,
            h: usize,
            crop: Option<[f64; 4]>,
            out: Vec<f32>,
        }
        #[derive(Deserialize)]
        struct Fixture {
            w: usize,
            h: usize,
            src: Vec<f32>,
            cases: Vec<Case>,
        }
        let fx: Fixture =
            serde_json::from_str(include_str!("../tests/fixtures/resize_pil.json")).unwrap();
        for case in &fx.cases {
            let (dw, dh, crop) = (case.w, case.h, case.crop);
            let got = resize_plane(&fx.src, fx.w, fx.h, crop, dw, dh);
            assert_eq!(got.len(), case.out.len());
            for (i, (g, p)) in got.iter().zip(&case.out).enumerate() {
                let p = p.clamp(0.0, 1.0);
                assert!(
                    (g - p).abs() < 1e-6,
                    "{dw}x{dh} {crop:?} at {i}: {g} vs Pillow's {p}"
                );
            }
        }
    }
}
