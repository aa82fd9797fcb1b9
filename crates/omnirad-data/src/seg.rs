//! Segmentation data: image + mask pairs from folders (DRIVE, CHASE_DB1, BUSI, generic
//! `images/` + `masks/`) and MedSegBench-style npz files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, Axis, Ix2, Ix3};

use crate::error::{DataError, Result};
use crate::image::{Image, Meta, Modality};
use crate::medmnist::{open_npz, read_int_array, read_npz_array, Split};
use crate::source::read_raster;

/// One image with its class-index mask and, where the dataset has one, a field-of-view mask
/// (DRIVE) outside which pixels are excluded from metrics.
#[derive(Debug, Clone)]
pub struct SegSample {
    pub image: Image,
    pub mask: Array2<u8>,
    pub fov: Option<Array2<bool>>,
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

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
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
            if mask.is_file() {
                pairs.push(SegPair {
                    image: img,
                    mask,
                    fov: fov.is_file().then_some(fov),
                });
            }
        }
    } else if images.is_dir() && dir.join("masks").is_dir() {
        let masks: BTreeMap<String, PathBuf> = files(&dir.join("masks"))?
            .into_iter()
            .map(|m| (stem(&m), m))
            .collect();
        for img in files(&images)? {
            if let Some(m) = masks.get(&stem(&img)) {
                pairs.push(SegPair {
                    image: img,
                    mask: m.clone(),
                    fov: None,
                });
            }
        }
    } else {
        let all = files(dir)?;
        let by_stem: BTreeMap<String, PathBuf> = all.iter().map(|p| (stem(p), p.clone())).collect();
        for p in &all {
            let s = stem(p);
            if s.ends_with("_mask") || s.ends_with("_1stHO") || s.ends_with("_2ndHO") {
                continue;
            }
            // BUSI: name.png + name_mask.png; CHASE_DB1: Image_01L.jpg + Image_01L_1stHO.png
            for suffix in ["_mask", "_1stHO"] {
                if let Some(m) = by_stem.get(&format!("{s}{suffix}")) {
                    pairs.push(SegPair {
                        image: p.clone(),
                        mask: m.clone(),
                        fov: None,
                    });
                    break;
                }
            }
        }
        // BUSI keeps classes in sub-folders.
        for sub in std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
        {
            if sub.is_dir() {
                pairs.extend(discover_pairs(&sub).unwrap_or_default());
            }
        }
        pairs.sort_by(|a, b| a.image.cmp(&b.image));
    }
    if pairs.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
        });
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
        Ok(SegSample { image, mask, fov })
    }
}

/// MedSegBench-style npz: per split an image array and a mask array. Key spellings differ
/// between releases (`train_images`/`train_label`/`train_masks`/...), so they are discovered.
pub fn load_npz_split(path: &Path, split: Split) -> Result<Vec<SegSample>> {
    let (mut npz, names) = open_npz(path)?;
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
    let images: ArrayD<u8> = read_npz_array(path, &mut npz, &ik)?;
    let masks = read_int_array(path, &mut npz, &mk)?;
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
        let img = images.index_axis(Axis(0), i).mapv(|v| v as f32 / 255.0);
        let data = match img.ndim() {
            2 => img
                .into_dimensionality::<Ix2>()
                .expect("2D")
                .insert_axis(Axis(0)),
            3 => img
                .into_dimensionality::<Ix3>()
                .expect("3D")
                .permuted_axes([2, 0, 1])
                .as_standard_layout()
                .to_owned(),
            d => {
                return Err(DataError::invalid(
                    path,
                    format!("'{ik}' images have {d} dimensions"),
                ))
            }
        };
        let m = masks.index_axis(Axis(0), i).to_owned();
        let m = match m.ndim() {
            2 => m.into_dimensionality::<Ix2>().expect("2D"),
            3 => m
                .index_axis(Axis(2), 0)
                .to_owned()
                .into_dimensionality::<Ix2>()
                .expect("2D"),
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
        if let Some(bad) = m.iter().find(|&&v| !(0..=255).contains(&v)) {
            return Err(DataError::invalid(
                path,
                format!("mask {i} holds class {bad}, outside 0..=255"),
            ));
        }
        let meta = Meta {
            id: format!("{}:{sp}[{i}]", path.display()),
            modality: Modality::Unknown,
            ..Default::default()
        };
        out.push(SegSample {
            image: Image { data, meta },
            mask: m.mapv(|v| v as u8),
            fov: None,
        });
    }
    Ok(out)
}
