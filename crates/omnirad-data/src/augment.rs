//! Training augmentations on [0, 1] [C, H, W] images, deterministic under a seed.
//!
//! Rotation, blur and noise are written here (not taken from imageproc) because they act on our
//! f32 channel-first arrays directly; crops and resizes go through fast_image_resize.

use ndarray::{s, Array3, Zip};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::preprocess::resize_chw;

/// One view's augmentation recipe. Probabilities are real probabilities (DINOv2's blur
/// probabilities were inverted by a bug; we do not copy it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub size: usize,
    /// RandomResizedCrop area fraction range and aspect-ratio range.
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub hflip: f64,
    pub vflip: f64,
    /// Max rotation in degrees (uniform ±).
    pub rotate: f64,
    pub brightness: f32,
    pub contrast: f32,
    /// Gamma drawn log-uniformly in [1/(1+g), 1+g].
    pub gamma: f32,
    /// Saturation jitter, applied only to colour images.
    pub saturation: f32,
    pub jitter_p: f64,
    pub blur_p: f64,
    pub blur_sigma: (f32, f32),
    pub noise_p: f64,
    pub noise_std: f32,
    pub solarize_p: f64,
}

impl Augment {
    /// DINOv2 global crop adapted to radiology: no hue jitter, no grayscale op.
    pub fn global(size: usize) -> Self {
        Self {
            size,
            scale: (0.32, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: 0.5,
            vflip: 0.0,
            rotate: 0.0,
            brightness: 0.4,
            contrast: 0.4,
            gamma: 0.0,
            saturation: 0.2,
            jitter_p: 0.8,
            blur_p: 0.5,
            blur_sigma: (0.1, 2.0),
            noise_p: 0.0,
            noise_std: 0.0,
            solarize_p: 0.2,
        }
    }

    /// DINOv2 local crop.
    pub fn local(size: usize) -> Self {
        Self {
            scale: (0.05, 0.32),
            solarize_p: 0.0,
            ..Self::global(size)
        }
    }

    /// Mild fine-tuning recipe (OmniRad: RandomResizedCrop 0.85–1, flip, ±7°).
    pub fn finetune(size: usize) -> Self {
        Self {
            scale: (0.85, 1.0),
            rotate: 7.0,
            brightness: 0.0,
            contrast: 0.0,
            jitter_p: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
            ..Self::global(size)
        }
    }

    /// Stronger fine-tuning views for small training sets: RandomResizedCrop 0.5–1, flip, ±15°,
    /// brightness and contrast ±0.2 (p 0.8).
    pub fn finetune_strong(size: usize) -> Self {
        Self {
            scale: (0.5, 1.0),
            rotate: 15.0,
            brightness: 0.2,
            contrast: 0.2,
            jitter_p: 0.8,
            ..Self::finetune(size)
        }
    }

    /// Laterality matters on projection X-rays (heart on the left): no left-right flips there.
    pub fn for_xray(mut self) -> Self {
        self.hflip = 0.0;
        self.saturation = 0.0;
        self
    }

    pub fn apply(&self, img: &Image, rng: &mut StdRng) -> Image {
        let (c, h, w) = img.data.dim();
        let crop = random_resized_crop_box(h, w, self.scale, self.ratio, rng);
        let mut a = resize_chw(&img.data, Some(crop), self.size, self.size);
        let hflip = self.hflip > 0.0
            && !img.meta.modality.is_projection_xray()
            && rng.random_bool(self.hflip);
        if hflip {
            a.invert_axis(ndarray::Axis(2));
        }
        if self.vflip > 0.0 && rng.random_bool(self.vflip) {
            a.invert_axis(ndarray::Axis(1));
        }
        if self.rotate > 0.0 {
            let deg = rng.random_range(-self.rotate..=self.rotate);
            a = rotate(&a, deg.to_radians() as f32);
        }
        if self.jitter_p > 0.0 && rng.random_bool(self.jitter_p) {
            let b = 1.0 + rng.random_range(-self.brightness..=self.brightness);
            let k = 1.0 + rng.random_range(-self.contrast..=self.contrast);
            let mean = a.mean().unwrap_or(0.0);
            a.mapv_inplace(|v| (((v * b) - mean) * k + mean).clamp(0.0, 1.0));
            if self.gamma > 0.0 {
                let g = (rng.random_range(-1.0f32..=1.0) * (1.0 + self.gamma).ln()).exp();
                a.mapv_inplace(|v| v.powf(g));
            }
            if c == 3 && self.saturation > 0.0 {
                let f = 1.0 + rng.random_range(-self.saturation..=self.saturation);
                let grey = a.mean_axis(ndarray::Axis(0)).expect("3 channels");
                for ch in 0..3 {
                    Zip::from(a.slice_mut(s![ch, .., ..]))
                        .and(&grey)
                        .for_each(|v, g| *v = (g + (*v - g) * f).clamp(0.0, 1.0));
                }
            }
        }
        if self.blur_p > 0.0 && rng.random_bool(self.blur_p) {
            let sigma = rng.random_range(self.blur_sigma.0..=self.blur_sigma.1);
            a = gaussian_blur(&a, sigma);
        }
        if self.noise_p > 0.0 && rng.random_bool(self.noise_p) {
            let sd = self.noise_std;
            a.mapv_inplace(|v| (v + sd * standard_normal(rng)).clamp(0.0, 1.0));
        }
        if self.solarize_p > 0.0 && rng.random_bool(self.solarize_p) {
            a.mapv_inplace(|v| if v >= 0.5 { 1.0 - v } else { v });
        }
        Image {
            data: a,
            meta: img.meta.clone(),
        }
    }
}

/// N global + M local views of one image, as DINOv2's multi-crop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiCrop {
    pub global: Augment,
    pub n_global: usize,
    pub local: Augment,
    pub n_local: usize,
}

impl MultiCrop {
    pub fn views(&self, img: &Image, rng: &mut StdRng) -> (Vec<Image>, Vec<Image>) {
        let g = (0..self.n_global)
            .map(|_| self.global.apply(img, rng))
            .collect();
        let l = (0..self.n_local)
            .map(|_| self.local.apply(img, rng))
            .collect();
        (g, l)
    }
}

/// Per-sample RNG from (seed, epoch, index): the same views whatever the thread schedule.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> StdRng {
    let mix = seed
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    StdRng::seed_from_u64(mix)
}

/// torchvision's RandomResizedCrop box (left, top, width, height): 10 tries, then centre crop.
pub fn random_resized_crop_box(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut StdRng,
) -> [f64; 4] {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ar = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ar).sqrt().round();
        let ch = (target / ar).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w as f64 && ch <= h as f64 {
            let top = rng.random_range(0.0..=(h as f64 - ch));
            let left = rng.random_range(0.0..=(w as f64 - cw));
            return [left.floor(), top.floor(), cw, ch];
        }
    }
    let r = w as f64 / h as f64;
    let (cw, ch) = if r < ratio.0 {
        (w as f64, (w as f64 / ratio.0).round())
    } else if r > ratio.1 {
        ((h as f64 * ratio.1).round(), h as f64)
    } else {
        (w as f64, h as f64)
    };
    [
        ((w as f64 - cw) / 2.0).floor(),
        ((h as f64 - ch) / 2.0).floor(),
        cw,
        ch,
    ]
}

fn standard_normal(rng: &mut StdRng) -> f32 {
    // Box-Muller; avoids pulling rand_distr in for one distribution.
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Rotation about the centre with bilinear sampling and zero fill.
pub fn rotate(a: &Array3<f32>, theta: f32) -> Array3<f32> {
    let (c, h, w) = a.dim();
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let (sn, cs) = theta.sin_cos();
    let mut out = Array3::zeros((c, h, w));
    for i in 0..h {
        for j in 0..w {
            let (y, x) = (i as f32 - cy, j as f32 - cx);
            let sx = cs * x + sn * y + cx;
            let sy = -sn * x + cs * y + cy;
            if sx < 0.0 || sy < 0.0 || sx > (w - 1) as f32 || sy > (h - 1) as f32 {
                continue;
            }
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            for k in 0..c {
                let top = a[[k, y0, x0]] * (1.0 - fx) + a[[k, y0, x1]] * fx;
                let bot = a[[k, y1, x0]] * (1.0 - fx) + a[[k, y1, x1]] * fx;
                out[[k, i, j]] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    out
}

/// Separable Gaussian blur, radius 3σ, edges replicated.
///
/// Each pass adds the kernel's taps as whole shifted rows (o += k_t · row shifted by t), which
/// the compiler vectorises; per-pixel indexing made the blur half of the time of
/// `bench decode --augment` (BENCHMARKS.md). Taps are summed in the same order per pixel either
/// way.
pub fn gaussian_blur(a: &Array3<f32>, sigma: f32) -> Array3<f32> {
    let r = (3.0 * sigma).ceil().max(1.0) as usize;
    let k: Vec<f32> = (-(r as isize)..=r as isize)
        .map(|x| (-(x * x) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
    let (c, h, w) = a.dim();
    if c * h * w == 0 {
        return a.clone();
    }
    let src = a.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    // Horizontal: each row padded by r replicated edge values on both sides.
    let mut tmp = vec![0f32; c * h * w];
    let mut padded = vec![0f32; w + 2 * r];
    for (row, out) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        padded[..r].fill(row[0]);
        padded[r..r + w].copy_from_slice(row);
        padded[r + w..].fill(row[w - 1]);
        for (t, &kv) in k.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&padded[t..t + w]) {
                *o += kv * x;
            }
        }
    }
    // Vertical: row i gathers rows i − r … i + r of its plane, clamped to the edges.
    let mut out = vec![0f32; c * h * w];
    for (plane, out_plane) in tmp.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        for (i, o) in out_plane.chunks_exact_mut(w).enumerate() {
            for (t, &kv) in k.iter().enumerate() {
                let src_i = (i + t).saturating_sub(r).min(h - 1);
                for (o, &x) in o.iter_mut().zip(&plane[src_i * w..(src_i + 1) * w]) {
                    *o += kv * x;
                }
            }
        }
    }
    Array3::from_shape_vec((c, h, w), out).expect("c·h·w values")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Meta, Modality};

    fn ramp() -> Image {
        let data = Array3::from_shape_fn((1, 40, 60), |(_, i, j)| (i * 60 + j) as f32 / 2400.0);
        Image {
            data,
            meta: Meta::default(),
        }
    }

    #[test]
    fn same_seed_same_view_different_seed_different_view() {
        let aug = Augment::global(32);
        let a = aug.apply(&ramp(), &mut sample_rng(1, 0, 5));
        let b = aug.apply(&ramp(), &mut sample_rng(1, 0, 5));
        let c = aug.apply(&ramp(), &mut sample_rng(2, 0, 5));
        assert_eq!(a.data, b.data);
        assert_ne!(a.data, c.data);
        assert_eq!(a.data.dim(), (1, 32, 32));
        assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn strong_finetune_views_vary_more_than_mild_ones() {
        // The spread of a ramp's view means over draws: crops and intensity jitter move it.
        let spread = |aug: Augment| {
            let means: Vec<f32> = (0..100)
                .map(|i| {
                    aug.apply(&ramp(), &mut sample_rng(3, 0, i))
                        .data
                        .mean()
                        .unwrap()
                })
                .collect();
            let m = means.iter().sum::<f32>() / 100.0;
            means.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / 100.0
        };
        let (mild, strong) = (
            spread(Augment::finetune(32)),
            spread(Augment::finetune_strong(32)),
        );
        assert!(
            strong > 10.0 * mild,
            "variance {mild} mild, {strong} strong"
        );
    }

    #[test]
    fn crop_box_respects_scale_and_bounds() {
        let mut rng = sample_rng(0, 0, 0);
        for _ in 0..200 {
            let [l, t, w, h] =
                random_resized_crop_box(100, 80, (0.3, 0.6), (0.75, 1.333), &mut rng);
            assert!(l >= 0.0 && t >= 0.0 && l + w <= 80.0 && t + h <= 100.0);
            let frac = w * h / 8000.0;
            assert!(frac > 0.25 && frac < 0.65, "area fraction {frac}");
        }
    }

    #[test]
    fn xray_views_are_never_mirrored() {
        let mut img = ramp();
        img.meta.modality = Modality::CR;
        let aug = Augment {
            hflip: 1.0,
            scale: (1.0, 1.0),
            ratio: (1.5, 1.5),
            jitter_p: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
            size: 60,
            ..Augment::global(60)
        };
        let out = aug.apply(&img, &mut sample_rng(0, 0, 0));
        // Left-to-right ramp stays increasing.
        assert!(out.data[[0, 20, 50]] > out.data[[0, 20, 10]]);
        img.meta.modality = Modality::US;
        let out = aug.apply(&img, &mut sample_rng(0, 0, 0));
        assert!(out.data[[0, 20, 50]] < out.data[[0, 20, 10]]);
    }

    /// The blur equals its per-pixel definition (every output pixel the normalised Gaussian
    /// taps over clamped neighbours), including images narrower than the kernel.
    #[test]
    fn blur_matches_the_per_pixel_definition() {
        let naive = |a: &Array3<f32>, sigma: f32| {
            let r = (3.0 * sigma).ceil().max(1.0) as isize;
            let k: Vec<f32> = (-r..=r)
                .map(|x| (-(x * x) as f32 / (2.0 * sigma * sigma)).exp())
                .collect();
            let sum: f32 = k.iter().sum();
            let (c, h, w) = a.dim();
            let pass = |src: &Array3<f32>, horizontal: bool| {
                Array3::from_shape_fn((c, h, w), |(ch, i, j)| {
                    (-r..=r)
                        .map(|d| {
                            let (ii, jj) = if horizontal {
                                (i, (j as isize + d).clamp(0, w as isize - 1) as usize)
                            } else {
                                ((i as isize + d).clamp(0, h as isize - 1) as usize, j)
                            };
                            k[(d + r) as usize] / sum * src[[ch, ii, jj]]
                        })
                        .sum::<f32>()
                })
            };
            pass(&pass(a, true), false)
        };
        let a = Array3::from_shape_fn((3, 37, 29), |(c, i, j)| {
            ((c * 7 + i * 3 + j * j) % 11) as f32 / 10.0
        });
        // The 5×4 crop is narrower than the radius-6 kernel at σ = 2.
        let narrow = a.slice(s![.., ..5, ..4]).to_owned();
        for (img, sigma) in [(&a, 0.1), (&a, 1.3), (&a, 2.0), (&narrow, 2.0)] {
            let err = gaussian_blur(img, sigma)
                .iter()
                .zip(&naive(img, sigma))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-6, "{:?}, σ {sigma}: max error {err}", img.dim());
        }
    }

    #[test]
    fn blur_preserves_mean_and_rotation_by_zero_is_identity() {
        let img = ramp();
        let b = gaussian_blur(&img.data, 1.5);
        assert!((b.mean().unwrap() - img.data.mean().unwrap()).abs() < 1e-3);
        let r = rotate(&img.data, 0.0);
        assert!(r
            .iter()
            .zip(img.data.iter())
            .all(|(x, y)| (x - y).abs() < 1e-6));
    }

    #[test]
    fn multicrop_counts_and_sizes() {
        let mc = MultiCrop {
            global: Augment::global(32),
            n_global: 2,
            local: Augment::local(16),
            n_local: 3,
        };
        let (g, l) = mc.views(&ramp(), &mut sample_rng(0, 0, 0));
        assert_eq!((g.len(), l.len()), (2, 3));
        assert_eq!(g[0].data.dim(), (1, 32, 32));
        assert_eq!(l[0].data.dim(), (1, 16, 16));
    }
}
