//! Segmentation data: image + mask pairs from folders (DRIVE, CHASE_DB1, BUSI, generic
//! `images/` + `masks/`) and MedSegBench-style npz files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{s, ArcArray, ArcArray2, Array2, Array3, ArrayD, ArrayView2, Axis, Ix2, Ix3};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::random_resized_crop_box;
use crate::error::{DataError, Result};

use crate::medmnist::{read_int_array, read_npz_array, Split};
use crate::npy::Npz;
use crate::preprocess::resize_chw;
use crate::source::{file_kind, read_raster, FileKind};

/// One image with its class-index mask and, where the dataset has one, a field-of-view mask
/// (DRIVE) outside which pixels are excluded from metrics.
#[derive(Debug, Clone)]
pub struct SegSample {
    pub pixels: Pixels,
    /// The file (or `npz:split[i]`) the image came from.
    pub id: String,
    /// Shared, like `Pixels::U8`: a split's samples are views of the npz's arrays, and copies
    /// of a sample cost nothing.
    pub mask: ArcArray2<u8>,
    pub fov: Option<Array2<bool>>,
}

/// An image [C, H, W] with values in [0, 1], kept as the 8- or 16-bit integers it was read
/// from where that is lossless: whole splits stay in memory while training, and a 10 000-image
/// 512² grey set takes 2.6 GB as u8 but 10.5 GB as f32.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// value = v / 255
    U8(ArcArray<u8, Ix3>),
    /// value = v / 65535
    U16(Array3<u16>),
    F32(Array3<f32>),
}

impl Pixels {
    /// The smallest storage that gives back every value bit for bit (the readers divide 8-bit
    /// samples by 255 and 16-bit ones by 65535, and IEEE division is exact-rounded, so both
    /// round-trip).
    pub fn compact(a: Array3<f32>) -> Self {
        fn exact(a: &Array3<f32>, max: f32) -> bool {
            a.iter().all(|&v| {
                let q = (v * max).round();
                (0.0..=max).contains(&q) && q / max == v
            })
        }
        if exact(&a, 255.0) {
            Pixels::U8(a.mapv(|v| (v * 255.0).round() as u8).into_shared())
        } else if exact(&a, 65535.0) {
            Pixels::U16(a.mapv(|v| (v * 65535.0).round() as u16))
        } else {
            Pixels::F32(a)
        }
    }

    /// (channels, height, width)
    pub fn dim(&self) -> (usize, usize, usize) {
        match self {
            Pixels::U8(a) => a.dim(),
            Pixels::U16(a) => a.dim(),
            Pixels::F32(a) => a.dim(),
        }
    }

    /// Rows `top..top + h`, columns `left..left + w` as values in [0, 1].
    fn region(&self, top: usize, left: usize, h: usize, w: usize) -> Array3<f32> {
        let r = s![.., top..top + h, left..left + w];
        match self {
            Pixels::U8(a) => a.slice(r).mapv(|v| v as f32 / 255.0),
            Pixels::U16(a) => a.slice(r).mapv(|v| v as f32 / 65535.0),
            Pixels::F32(a) => a.slice(r).to_owned(),
        }
    }

    /// The whole image as values in [0, 1].
    pub fn to_f32(&self) -> Array3<f32> {
        let (_, h, w) = self.dim();
        self.region(0, 0, h, w)
    }

    /// Resized to `size × size` (from `crop` (left, top, w, h) if given).
    pub fn resized(&self, crop: Option<[f64; 4]>, size: usize) -> Array3<f32> {
        match self {
            Pixels::F32(a) => resize_chw(a, crop, size, size),
            _ => resize_chw(&self.to_f32(), crop, size, size),
        }
    }

    /// A `size × size` window with top-left (top, left), zero beyond the image.
    pub fn window(&self, top: usize, left: usize, size: usize) -> Array3<f32> {
        let (c, h, w) = self.dim();
        let (bh, bw) = (
            size.min(h.saturating_sub(top)),
            size.min(w.saturating_sub(left)),
        );
        let mut out = Array3::zeros((c, size, size));
        out.slice_mut(s![.., ..bh, ..bw])
            .assign(&self.region(top, left, bh, bw));
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegPair {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub fov: Option<PathBuf>,
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("")
        .to_string()
}

/// The PNG/JPEG/TIFF/GIF/BMP files in `dir` (notes, CSVs and the like are not pairs' halves).
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && file_kind(p) == Some(FileKind::Raster))
        .collect();
    v.sort();
    Ok(v)
}

/// Finds image/mask pairs under `dir`, recognising the DRIVE, CHASE_DB1, BUSI and
/// `images/`+`masks/` layouts.
pub fn discover_pairs(dir: &Path) -> Result<Vec<SegPair>> {
    let mut pairs = Vec::new();
    let images = dir.join("images");
    if images.is_dir() && dir.join("1st_manual").is_dir() {
        // DRIVE: 21_training.tif -> 1st_manual/21_manual1.gif, mask/21_training_mask.gif
        for img in files(&images)? {
            let s = stem(&img);
            let id = s.split('_').next().unwrap_or("");
            let mask = dir.join("1st_manual").join(format!("{id}_manual1.gif"));
            let fov = dir.join("mask").join(format!("{s}_mask.gif"));
            pairs.push(SegPair {
                image: img,
                mask,
                fov: fov.is_file().then_some(fov),
            });
        }
    } else if images.is_dir() && dir.join("masks").is_dir() {
        let masks: BTreeMap<String, PathBuf> = files(&dir.join("masks"))?
            .into_iter()
            .map(|m| (stem(&m), m))
            .collect();
        for img in files(&images)? {
            let s = stem(&img);
            let mask = masks
                .get(&s)
                .cloned()
                .unwrap_or_else(|| dir.join("masks").join(format!("{s}.*")));
            pairs.push(SegPair {
                image: img,
                mask,
                fov: None,
            });
        }
    } else {
        let all = files(dir)?;
        let by_stem: BTreeMap<String, PathBuf> = all.iter().map(|p| (stem(p), p.clone())).collect();
        for p in &all {
            let s = stem(p);
            let is_mask = ["_mask", "_1stHO", "_2ndHO"].iter().any(|m| s.ends_with(m))
                // BUSI's second and third lesion masks: name_mask_1.png, name_mask_2.png
                || s.rsplit_once("_mask_").is_some_and(|(_, n)| n.parse::<u32>().is_ok());
            if is_mask {
                continue;
            }
            // BUSI: name.png + name_mask.png; CHASE_DB1: Image_01L.jpg + Image_01L_1stHO.png
            let mask = ["_mask", "_1stHO"]
                .iter()
                .find_map(|suffix| by_stem.get(&format!("{s}{suffix}")).cloned())
                .unwrap_or_else(|| dir.join(format!("{s}_mask.*")));
            pairs.push(SegPair {
                image: p.clone(),
                mask,
                fov: None,
            });
        }
        // BUSI keeps classes in sub-folders. A link back to this folder or above it is a loop.
        let here = dir.canonicalize().map_err(|e| DataError::io(dir, e))?;
        let is_loop = |sub: &Path| sub.canonicalize().is_ok_and(|s| here.starts_with(s));
        for sub in std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
        {
            if sub.is_dir() && !is_loop(&sub) {
                pairs.extend(discover_pairs(&sub).unwrap_or_default());
            }
        }
        pairs.sort_by(|a, b| a.image.cmp(&b.image));
    }
    // Images without their mask stay in the list and fail when loaded, so that jobs report them
    // (or stop, with --strict) rather than train on fewer pairs without a word; a folder with
    // no mask at all is not a segmentation dataset.
    if !pairs.iter().any(|p| p.mask.is_file()) {
        return Err(DataError::invalid(
            dir,
            "no image/mask pairs found (layouts: DRIVE, CHASE_DB1, BUSI, images/ + masks/)",
        ));
    }
    Ok(pairs)
}

fn read_binary(path: &Path) -> Result<Array2<u8>> {
    let im = read_raster(path)?;
    let grey = im.data.mean_axis(Axis(0)).expect("channels");
    Ok(grey.mapv(|v| (v > 0.5) as u8))
}

impl SegPair {
    /// Loads the pair; mask pixels > 50% become class 1. Sizes must agree.
    pub fn load(&self) -> Result<SegSample> {
        if !self.mask.is_file() {
            return Err(DataError::invalid(
                &self.image,
                format!("no mask found (looked for {})", self.mask.display()),
            ));
        }
        let image = read_raster(&self.image)?;
        let mask = read_binary(&self.mask)?;
        let (h, w) = (image.height(), image.width());
        if mask.dim() != (h, w) {
            return Err(DataError::invalid(
                &self.mask,
                format!(
                    "mask is {:?} but image {} is {h}x{w}",
                    mask.dim(),
                    self.image.display()
                ),
            ));
        }
        let fov = match &self.fov {
            Some(f) => {
                let m = read_binary(f)?;
                if m.dim() != (h, w) {
                    return Err(DataError::invalid(
                        f,
                        "field-of-view mask size differs from the image",
                    ));
                }
                Some(m.mapv(|v| v > 0))
            }
            None => None,
        };
        Ok(SegSample {
            pixels: Pixels::compact(image.data),
            id: image.meta.id,
            mask: mask.into_shared(),
            fov,
        })
    }
}

/// MedSegBench-style npz: per split an image array and a mask array. Key spellings differ
/// between releases (`train_images`/`train_label`/`train_masks`/...), so they are discovered.
pub fn load_npz_split(path: &Path, split: Split) -> Result<Vec<SegSample>> {
    let mut npz = Npz::open(path)?;
    let names = npz.names().to_vec();
    let sp = split.name();
    let find = |words: &[&str]| {
        names.iter().find(|n| {
            let n = n.to_ascii_lowercase();
            (n.starts_with(sp) || (split == Split::Val && n.starts_with("valid")))
                && words.iter().any(|w| n.contains(w))
        })
    };
    let ik = find(&["image", "img"])
        .ok_or_else(|| DataError::invalid(path, format!("no {sp} image array (keys: {names:?})")))?
        .clone();
    let mk = find(&["mask", "label", "seg", "gt"])
        .ok_or_else(|| DataError::invalid(path, format!("no {sp} mask array (keys: {names:?})")))?
        .clone();
    // Samples are views of these two arrays (no copies: a 224² split is hundreds of MB).
    let images = read_npz_array::<u8>(path, &mut npz, &ik)?.into_shared();
    let masks = read_mask_array(path, &mut npz, &mk)?.into_shared();
    let n = images.shape()[0];
    if masks.shape()[0] != n {
        return Err(DataError::invalid(
            path,
            format!(
                "'{mk}' has {} masks but '{ik}' has {n} images",
                masks.shape()[0]
            ),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let img = images.clone().index_axis_move(Axis(0), i);
        let data = match img.ndim() {
            2 => img
                .into_dimensionality::<Ix2>()
                .expect("2D")
                .insert_axis(Axis(0)),
            3 => img
                .into_dimensionality::<Ix3>()
                .expect("3D")
                .permuted_axes([2, 0, 1]),
            d => {
                return Err(DataError::invalid(
                    path,
                    format!("'{ik}' images have {d} dimensions"),
                ))
            }
        };
        let m = masks.clone().index_axis_move(Axis(0), i);
        let m = match m.ndim() {
            2 => m.into_dimensionality::<Ix2>().expect("2D"),
            3 => m
                .index_axis_move(Axis(2), 0)
                .into_dimensionality::<Ix2>()
                .expect("2D"),
            0 | 1 => {
                return Err(DataError::invalid(
                    path,
                    format!(
                        "'{mk}' has shape {:?}: a label per image, not a mask (a classification \
                         file? segmentation reads MedSegBench-style npz files)",
                        masks.shape()
                    ),
                ))
            }
            d => {
                return Err(DataError::invalid(
                    path,
                    format!("'{mk}' masks have {d} dimensions"),
                ))
            }
        };
        if m.dim() != (data.dim().1, data.dim().2) {
            return Err(DataError::invalid(
                path,
                format!("mask {i} is {:?}, image is {:?}", m.dim(), data.dim()),
            ));
        }
        out.push(SegSample {
            pixels: Pixels::U8(data),
            id: format!("{}:{sp}[{i}]", path.display()),
            mask: m,
            fov: None,
        });
    }
    Ok(out)
}

/// Class-index masks as u8. uint8 files are read as they are: through i64 a 224² split of
/// 5 000 masks would take 2 GB.
fn read_mask_array(path: &Path, npz: &mut Npz, key: &str) -> Result<ArrayD<u8>> {
    if let Ok(a) = npz.read::<u8>(key) {
        return Ok(a);
    }
    let wide = read_int_array(path, npz, key)?;
    if let Some((at, bad)) = wide.indexed_iter().find(|(_, v)| !(0..=255).contains(*v)) {
        return Err(DataError::invalid(
            path,
            format!("'{key}': mask {} holds class {bad}, outside 0..=255", at[0]),
        ));
    }
    Ok(wide.mapv(|v| v as u8))
}

/// Items that could not be read: (file, reason).
pub type Failures = Vec<(String, String)>;

/// Train / val / test samples and how they were split.
pub struct SegSplits {
    pub train: Vec<SegSample>,
    pub val: Vec<SegSample>,
    pub test: Vec<SegSample>,
    /// One line for reports, e.g. "official npz splits" or "seeded 70/10/20 split of 780 pairs".
    pub protocol: String,
    pub failed: Failures,
}

/// Reads pairs in parallel; unreadable ones are returned as failures, or the first is an error
/// when `strict`.
pub fn load_pairs(pairs: &[SegPair], strict: bool) -> Result<(Vec<SegSample>, Failures)> {
    let loaded: Vec<_> = pairs.par_iter().map(|p| (p, p.load())).collect();
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (p, r) in loaded {
        match r {
            Ok(s) => ok.push(s),
            Err(e) if strict => return Err(e),
            Err(e) => failed.push((p.image.display().to_string(), e.to_string())),
        }
    }
    Ok((ok, failed))
}

fn take<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i].clone()).collect()
}

/// Seeded shuffle of 0..n cut into (train, val, test) by fractions.
fn split_indices(n: usize, val: f64, test: f64, seed: u64) -> [Vec<usize>; 3] {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let nt = ((n as f64 * test).round() as usize).min(n);
    let nv = ((n as f64 * val).round() as usize).min(n - nt);
    let mut test_idx = idx.split_off(n - nt);
    let mut val_idx = idx.split_off(n - nt - nv);
    idx.sort();
    val_idx.sort();
    test_idx.sort();
    [idx, val_idx, test_idx]
}

/// Opens a segmentation dataset with its splits:
/// - a MedSegBench npz: its official train/val/test arrays;
/// - a folder with `train/ val/ test/` sub-folders (MedSegBench PNG export): those;
/// - DRIVE (`training/` + `testing/`): the official test set; val = a seeded 20% of training;
/// - CHASE_DB1 (`Image_NN{L,R}`): the usual split, children 1–10 train (20% of them val),
///   11–14 test;
/// - any other pair folder (BUSI, `images/`+`masks/`): `test` if given (train/val seeded 80/20
///   from `data`), otherwise a seeded 70/10/20 split.
pub fn open_splits(data: &Path, test: Option<&Path>, seed: u64, strict: bool) -> Result<SegSplits> {
    let mut failed = Vec::new();
    let mut load_dir = |d: &Path| -> Result<Vec<SegSample>> {
        let (s, f) = load_pairs(&discover_pairs(d)?, strict)?;
        failed.extend(f);
        Ok(s)
    };
    if data.extension().is_some_and(|e| e == "npz") {
        return Ok(SegSplits {
            train: load_npz_split(data, Split::Train)?,
            val: load_npz_split(data, Split::Val)?,
            test: load_npz_split(data, Split::Test)?,
            protocol: "official npz splits".into(),
            failed,
        });
    }
    if ["train", "val", "test"]
        .iter()
        .all(|d| data.join(d).is_dir())
    {
        let train = load_dir(&data.join("train"))?;
        let val = load_dir(&data.join("val"))?;
        let test = load_dir(&data.join("test"))?;
        return Ok(SegSplits {
            train,
            val,
            test,
            protocol: "official train/val/test folders".into(),
            failed,
        });
    }
    let (trainval, test, protocol) =
        if data.join("training").is_dir() && data.join("testing").is_dir() {
            let tv = load_dir(&data.join("training"))?;
            let te = load_dir(&data.join("testing"))?;
            let p = format!(
                "official test set ({} images); val = seeded 20% of the {} training images",
                te.len(),
                tv.len()
            );
            (tv, te, p)
        } else if let Some(t) = test {
            let tv = load_dir(data)?;
            let te = load_dir(t)?;
            let p = format!(
                "test = {}; val = seeded 20% of {}",
                t.display(),
                data.display()
            );
            (tv, te, p)
        } else {
            let all = load_dir(data)?;
            let child = |s: &SegSample| {
                let name = Path::new(&s.id).file_stem()?.to_str()?.to_string();
                name.strip_prefix("Image_")?.get(..2)?.parse::<u32>().ok()
            };
            if all.iter().all(|s| child(s).is_some()) {
                let (tv, te): (Vec<_>, Vec<_>) =
                    all.into_iter().partition(|s| child(s).unwrap_or(0) <= 10);
                let p = format!(
                    "CHASE_DB1 split: children 1–10 train/val ({}), 11–14 test ({})",
                    tv.len(),
                    te.len()
                );
                (tv, te, p)
            } else {
                let [tr, va, te] = split_indices(all.len(), 0.1, 0.2, seed);
                return Ok(SegSplits {
                    train: take(&all, &tr),
                    val: take(&all, &va),
                    test: take(&all, &te),
                    protocol: format!("seeded 70/10/20 split (seed {seed}) of {} pairs", all.len()),
                    failed,
                });
            }
        };
    let [tr, va, _] = split_indices(trainval.len(), 0.2, 0.0, seed);
    Ok(SegSplits {
        train: take(&trainval, &tr),
        val: take(&trainval, &va),
        test,
        protocol,
        failed,
    })
}

/// How an image of any size meets a network that takes `size × size`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum SegWindow {
    /// Resize the whole image (aspect ignored, as MedSegBench); predictions are resized back.
    Resize,
    /// Native resolution: train on random `size` crops, predict with overlapping windows whose
    /// softmax outputs are averaged.
    Sliding { overlap: usize },
}

/// One network input with its target: image [C, S, S] in [0, 1], mask [S, S], and which pixels
/// count (inside the field of view and the image).
#[derive(Debug, Clone)]
pub struct SegView {
    pub image: Array3<f32>,
    pub mask: Array2<u8>,
    pub valid: Array2<bool>,
}

/// Nearest-neighbour resampling of a label map from the crop box (left, top, w, h) to
/// `dw × dh`, sampling at pixel centres (labels must not be blended).
fn resize_labels<T: Copy>(m: ArrayView2<T>, crop: [f64; 4], dw: usize, dh: usize) -> Array2<T> {
    let (h, w) = m.dim();
    let [l, t, cw, ch] = crop;
    Array2::from_shape_fn((dh, dw), |(y, x)| {
        let sy = (t + (y as f64 + 0.5) * ch / dh as f64)
            .floor()
            .clamp(0.0, h as f64 - 1.0) as usize;
        let sx = (l + (x as f64 + 0.5) * cw / dw as f64)
            .floor()
            .clamp(0.0, w as f64 - 1.0) as usize;
        m[[sy, sx]]
    })
}

impl SegSample {
    fn valid(&self) -> Array2<bool> {
        self.fov
            .clone()
            .unwrap_or_else(|| Array2::from_elem(self.mask.dim(), true))
    }

    /// The whole image resized to `size × size` (from `crop` if given).
    pub fn resized(&self, crop: Option<[f64; 4]>, size: usize) -> SegView {
        let (h, w) = self.mask.dim();
        let crop_box = crop.unwrap_or([0.0, 0.0, w as f64, h as f64]);
        SegView {
            image: self.pixels.resized(crop, size),
            mask: resize_labels(self.mask.view(), crop_box, size, size),
            valid: resize_labels(self.valid().view(), crop_box, size, size),
        }
    }

    /// A `size × size` window at native resolution with top-left (top, left); beyond the image
    /// it is zero-padded and not valid.
    pub fn window(&self, top: usize, left: usize, size: usize) -> SegView {
        let (h, w) = self.mask.dim();
        let mut v = SegView {
            image: self.pixels.window(top, left, size),
            mask: Array2::zeros((size, size)),
            valid: Array2::from_elem((size, size), false),
        };
        let (bh, bw) = (
            size.min(h.saturating_sub(top)),
            size.min(w.saturating_sub(left)),
        );
        v.mask
            .slice_mut(s![..bh, ..bw])
            .assign(&self.mask.slice(s![top..top + bh, left..left + bw]));
        v.valid
            .slice_mut(s![..bh, ..bw])
            .assign(&self.valid().slice(s![top..top + bh, left..left + bw]));
        v
    }

    /// A random training view: a random window (sliding) or a random resized crop of scale
    /// 0.5–1 (resize), then horizontal and vertical flips with p = 0.5, applied to image, mask
    /// and valid pixels alike.
    pub fn train_view(&self, window: SegWindow, size: usize, rng: &mut StdRng) -> SegView {
        let (h, w) = self.mask.dim();
        let mut v = match window {
            SegWindow::Resize => {
                let crop = random_resized_crop_box(h, w, (0.5, 1.0), (3.0 / 4.0, 4.0 / 3.0), rng);
                self.resized(Some(crop), size)
            }
            SegWindow::Sliding { .. } => {
                let top = rng.random_range(0..=h.saturating_sub(size));
                let left = rng.random_range(0..=w.saturating_sub(size));
                self.window(top, left, size)
            }
        };
        for axis in [1usize, 0] {
            if rng.random_bool(0.5) {
                v.image.invert_axis(Axis(axis + 1));
                v.mask.invert_axis(Axis(axis));
                v.valid.invert_axis(Axis(axis));
            }
        }
        v.image = v.image.as_standard_layout().to_owned();
        v.mask = v.mask.as_standard_layout().to_owned();
        v.valid = v.valid.as_standard_layout().to_owned();
        v
    }
}

/// Top-left corners of `size` windows with at least `overlap` pixels shared by neighbours,
/// covering 0..n (the last window ends at n when n ≥ size).
pub fn window_starts(n: usize, size: usize, overlap: usize) -> Vec<usize> {
    if n <= size {
        return vec![0];
    }
    let stride = size.saturating_sub(overlap).max(1);
    let count = (n - size).div_ceil(stride) + 1;
    // Spread evenly so the overlap is the same everywhere.
    (0..count)
        .map(|i| ((i * (n - size)) as f64 / (count - 1) as f64).round() as usize)
        .collect()
}
