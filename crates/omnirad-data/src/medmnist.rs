//! MedMNIST v2 / MedMNIST+ `.npz` files: `{name}.npz` (28 px) and `{name}_{64,128,224}.npz`,
//! keys `{train,val,test}_{images,labels}`; 2D grey/RGB and 3D volumes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use md5::{Digest, Md5};
use ndarray::{Array2, Array3, ArrayD, ArrayView2, Axis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::image::{Image, ImageSource, Meta, Modality};
use crate::npy::{ArrayError, Npz};

#[path = "medmnist_table.rs"]
mod table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Task {
    Binary,
    MultiClass,
    /// Several independent 0/1 labels per image (ChestMNIST).
    MultiLabel,
    /// Ordered classes; MedMNIST evaluates it as multi-class.
    Ordinal,
}

/// One row of the official dataset table.
#[derive(Debug, Clone, Serialize)]
pub struct MedMnistInfo {
    pub name: &'static str,
    pub task: Task,
    pub channels: usize,
    pub is_3d: bool,
    /// Official train / val / test sizes.
    pub splits: [usize; 3],
    pub labels: &'static [&'static str],
    /// (image size, md5 of the official file).
    pub md5: &'static [(usize, &'static str)],
    pub modality: Modality,
}

impl MedMnistInfo {
    pub fn all() -> &'static [MedMnistInfo] {
        table::DATASETS
    }
    pub fn get(name: &str) -> Option<&'static MedMnistInfo> {
        table::DATASETS.iter().find(|d| d.name == name)
    }
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }
    pub fn split_size(&self, split: Split) -> usize {
        self.splits[split as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Split {
    Train = 0,
    Val = 1,
    Test = 2,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];
    pub fn name(self) -> &'static str {
        ["train", "val", "test"][self as usize]
    }
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Self::Train),
            "val" | "valid" | "validation" => Ok(Self::Val),
            "test" => Ok(Self::Test),
            _ => Err(format!("unknown split '{s}' (train, val, test)")),
        }
    }
}

/// Dataset name and image size from a file name such as `pneumoniamnist_224.npz`.
pub fn parse_file_name(path: &Path) -> Option<(&'static MedMnistInfo, usize)> {
    let stem = path.file_stem()?.to_str()?.to_ascii_lowercase();
    let (name, size) = match stem.rsplit_once('_') {
        Some((n, s)) if s.parse::<usize>().is_ok() => (n.to_string(), s.parse().ok()?),
        _ => (stem, 28),
    };
    MedMnistInfo::get(&name).map(|i| (i, size))
}

/// Item indices per distinct label row, in label order.
fn by_label_row(labels: ArrayView2<i64>) -> BTreeMap<Vec<i64>, Vec<usize>> {
    let mut groups: BTreeMap<Vec<i64>, Vec<usize>> = BTreeMap::new();
    for (i, row) in labels.rows().into_iter().enumerate() {
        groups.entry(row.to_vec()).or_default().push(i);
    }
    groups
}

/// A seeded, stratified holdout of `n` of the items whose label rows are `labels`: each
/// distinct label row gives its share of `n` (largest remainders, ties to the smaller label),
/// drawn at random. Returns (rest, held), each ascending.
///
/// `bench medmnist --eval-split val` selects epochs on such a holdout of train, so that the
/// official val split stays unseen until it is scored and can choose between encoders or
/// settings without reading test.
pub fn stratified_holdout(
    labels: ArrayView2<i64>,
    n: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let total = labels.nrows();
    let n = n.min(total);
    let groups = by_label_row(labels);
    let exact: Vec<f64> = groups
        .values()
        .map(|g| (n * g.len()) as f64 / total as f64)
        .collect();
    let mut quota: Vec<usize> = exact.iter().map(|q| q.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..quota.len()).collect();
    by_remainder
        .sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = n - quota.iter().sum::<usize>();
    for &g in &by_remainder[..short] {
        quota[g] += 1;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut rest, mut held) = (Vec::new(), Vec::new());
    for (mut g, q) in groups.into_values().zip(quota) {
        g.shuffle(&mut rng);
        held.extend_from_slice(&g[..q]);
        rest.extend_from_slice(&g[q..]);
    }
    rest.sort_unstable();
    held.sort_unstable();
    (rest, held)
}

/// Seeded, stratified k-fold partition of the items whose label rows are `labels`: each
/// distinct label row's items are shuffled and dealt in turn to the folds, continuing from one
/// label to the next, so fold sizes and each label's count per fold differ by at most one.
/// Returns the `k` folds as (rest, held) pairs, like [`stratified_holdout`], each ascending.
///
/// `bench medmnist --eval-split train --folds K` scores every train image by a model fitted
/// without its fold: K times more held-out images than a holdout the size of val.
pub fn stratified_folds(
    labels: ArrayView2<i64>,
    k: usize,
    seed: u64,
) -> Vec<(Vec<usize>, Vec<usize>)> {
    let k = k.max(1);
    let groups = by_label_row(labels);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut folds = vec![Vec::new(); k];
    let mut at = 0;
    for mut g in groups.into_values() {
        g.shuffle(&mut rng);
        for i in g {
            folds[at % k].push(i);
            at += 1;
        }
    }
    let mut fold_of = vec![0; labels.nrows()];
    for (f, held) in folds.iter_mut().enumerate() {
        held.sort_unstable();
        held.iter().for_each(|&i| fold_of[i] = f);
    }
    folds
        .into_iter()
        .enumerate()
        .map(|(f, held)| {
            (
                (0..fold_of.len()).filter(|&i| fold_of[i] != f).collect(),
                held,
            )
        })
        .collect()
}

/// One split of an npz file, checked for consistency.
#[derive(Debug, Clone)]
pub struct NpzSplit {
    pub path: PathBuf,
    pub split: Split,
    pub info: Option<&'static MedMnistInfo>,
    /// [N, H, W], [N, H, W, 3] or, for 3D sets, [N, D, H, W] (uint8).
    pub images: ArrayD<u8>,
    /// [N, L]: one column for single-label tasks, L 0/1 columns for multi-label.
    pub labels: Array2<i64>,
}

pub(crate) fn read_npz_array<T: ndarray_npy::ReadableElement>(
    path: &Path,
    npz: &mut Npz,
    key: &str,
) -> Result<ArrayD<T>> {
    npz.read::<T>(key).map_err(|e| {
        let hint = match e {
            ArrayError::WrongType(_) => " (MedMNIST-style files hold uint8 images)",
            ArrayError::Bad(_) => "",
        };
        DataError::invalid(path, format!("array '{key}': {}{hint}", e.describe::<T>()))
    })
}

/// Integer labels in whichever integer dtype the file uses.
pub(crate) fn read_int_array(path: &Path, npz: &mut Npz, key: &str) -> Result<ArrayD<i64>> {
    let bad =
        |e: ArrayError| DataError::invalid(path, format!("array '{key}': {}", e.describe::<i64>()));
    macro_rules! try_dtype {
        ($($t:ty),*) => {$(
            match npz.read::<$t>(key) {
                Ok(a) => return Ok(a.mapv(|v| v as i64)),
                Err(ArrayError::WrongType(_)) => {}
                Err(e) => return Err(bad(e)),
            }
        )*};
    }
    try_dtype!(u8, i64, i32, u16, i16, u32, i8);
    match npz.read::<f32>(key) {
        Ok(a) if a.iter().all(|v| v.fract() == 0.0 && v.is_finite()) => Ok(a.mapv(|v| v as i64)),
        Ok(_) | Err(ArrayError::WrongType(_)) => Err(DataError::invalid(
            path,
            format!("array '{key}' is not an integer array"),
        )),
        Err(e) => Err(bad(e)),
    }
}

impl NpzSplit {
    pub fn load(path: impl AsRef<Path>, split: Split) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let info = parse_file_name(&path).map(|(i, _)| i);
        let mut npz = Npz::open(&path)?;
        let names = npz.names().to_vec();
        let (ik, lk) = (
            format!("{}_images", split.name()),
            format!("{}_labels", split.name()),
        );
        for k in [&ik, &lk] {
            if !names.contains(k) {
                return Err(DataError::invalid(
                    &path,
                    format!("missing key '{k}' (keys present: {names:?})"),
                ));
            }
        }
        let images: ArrayD<u8> = read_npz_array(&path, &mut npz, &ik)?;
        let raw_labels = read_int_array(&path, &mut npz, &lk)?;
        let n = images.shape()[0];
        let labels = match raw_labels.ndim() {
            1 => raw_labels.insert_axis(Axis(1)),
            2 => raw_labels,
            d => {
                return Err(DataError::invalid(
                    &path,
                    format!("'{lk}' has {d} dimensions, expected [N] or [N, L]"),
                ))
            }
        }
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2 axes");
        if labels.nrows() != n {
            return Err(DataError::invalid(
                &path,
                format!(
                    "'{lk}' has {} rows but '{ik}' has {n} images",
                    labels.nrows()
                ),
            ));
        }
        let nd = images.ndim();
        let is_3d = info.map(|i| i.is_3d).unwrap_or(false);
        let ok_shape = if is_3d {
            nd == 4
        } else {
            nd == 3 || (nd == 4 && images.shape()[3] == 3)
        };
        if !ok_shape {
            return Err(DataError::invalid(
                &path,
                format!(
                    "'{ik}' has shape {:?}, expected [N,H,W], [N,H,W,3] or (3D) [N,D,H,W]",
                    images.shape()
                ),
            ));
        }
        if let Some(info) = info {
            let want_cols = if info.task == Task::MultiLabel {
                info.num_classes()
            } else {
                1
            };
            if labels.ncols() != want_cols {
                return Err(DataError::invalid(
                    &path,
                    format!(
                        "'{lk}' has {} columns, {} needs {want_cols}",
                        labels.ncols(),
                        info.name
                    ),
                ));
            }
            let max = if info.task == Task::MultiLabel {
                1
            } else {
                info.num_classes() as i64 - 1
            };
            if let Some(bad) = labels.iter().find(|&&v| v < 0 || v > max) {
                return Err(DataError::invalid(
                    &path,
                    format!(
                        "'{lk}' holds label {bad}, outside 0..={max} for {}",
                        info.name
                    ),
                ));
            }
            let ch = if nd == 4 && !is_3d { 3 } else { 1 };
            if ch != info.channels {
                return Err(DataError::invalid(
                    &path,
                    format!(
                        "{} has {} channel(s) but '{ik}' has {ch}",
                        info.name, info.channels
                    ),
                ));
            }
        }
        Ok(Self {
            path,
            split,
            info,
            images,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.images.shape()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as a [0, 1] 2D sample (2D sets only).
    pub fn image(&self, i: usize) -> Image {
        let img = self.images.index_axis(Axis(0), i);
        let data: Array3<f32> = match img.ndim() {
            2 => img
                .mapv(|v| v as f32 / 255.0)
                .into_dimensionality::<ndarray::Ix2>()
                .expect("2D")
                .insert_axis(Axis(0)),
            _ => img
                .mapv(|v| v as f32 / 255.0)
                .into_dimensionality::<ndarray::Ix3>()
                .expect("HWC")
                .permuted_axes([2, 0, 1])
                .as_standard_layout()
                .to_owned(),
        };
        Image {
            data,
            meta: self.meta(i),
        }
    }

    /// Volume `i` of a 3D set as [D, H, W] in [0, 1].
    pub fn volume(&self, i: usize) -> Array3<f32> {
        self.images
            .index_axis(Axis(0), i)
            .mapv(|v| v as f32 / 255.0)
            .into_dimensionality()
            .expect("3D volume")
    }

    pub fn meta(&self, i: usize) -> Meta {
        Meta {
            id: format!("{}:{}[{i}]", self.path.display(), self.split.name()),
            modality: self.info.map(|d| d.modality).unwrap_or_default(),
            anatomy: None,
            labels: self.labels.row(i).to_vec(),
        }
    }
}

/// Rows of a 2D npz split, kept as the file's 8-bit pixels until read: a fine-tune of
/// PathMNIST at 224 px holds its 90 000 training images in 13.5 GB this way, not the 54 GB
/// they take as f32 [`Image`]s.
#[derive(Clone)]
pub struct NpzRows {
    split: Arc<NpzSplit>,
    rows: Vec<usize>,
}

impl NpzRows {
    /// Every row of `split`; an error for 3D sets.
    pub fn all(split: NpzSplit) -> Result<Self> {
        if split.info.map(|i| i.is_3d).unwrap_or(false) {
            return Err(DataError::invalid(
                &split.path,
                "3D MedMNIST volumes: use volume(i), not 2D images",
            ));
        }
        let rows = (0..split.len()).collect();
        Ok(Self {
            split: Arc::new(split),
            rows,
        })
    }

    /// The rows at positions `idx` of these.
    pub fn select(&self, idx: &[usize]) -> Self {
        Self {
            split: self.split.clone(),
            rows: idx.iter().map(|&i| self.rows[i]).collect(),
        }
    }

    /// Labels of these rows, [N, L].
    pub fn labels(&self) -> Array2<i64> {
        self.split.labels.select(Axis(0), &self.rows)
    }
}

impl ImageSource for NpzRows {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn image(&self, i: usize) -> std::borrow::Cow<'_, Image> {
        std::borrow::Cow::Owned(self.split.image(self.rows[i]))
    }
}

/// Result of `omnirad data verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dataset: Option<String>,
    pub size: usize,
    pub md5: String,
    pub md5_expected: Option<String>,
    pub md5_ok: Option<bool>,
    /// (split, found, expected).
    pub splits: Vec<(String, usize, Option<usize>)>,
    pub ok: bool,
}

pub fn file_md5(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Checks a file against the official table: md5 and split sizes (and loads every split).
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport> {
    let path = path.as_ref();
    let known = parse_file_name(path);
    let md5 = file_md5(path)?;
    let md5_expected = known.and_then(|(info, size)| {
        info.md5
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, h)| h.to_string())
    });
    let md5_ok = md5_expected.as_ref().map(|e| *e == md5);
    let mut splits = Vec::new();
    for s in Split::ALL {
        let sp = NpzSplit::load(path, s)?;
        splits.push((
            s.name().to_string(),
            sp.len(),
            known.map(|(i, _)| i.split_size(s)),
        ));
    }
    let ok = md5_ok.unwrap_or(true)
        && splits
            .iter()
            .all(|(_, n, e)| e.map(|e| e == *n).unwrap_or(true));
    Ok(VerifyReport {
        dataset: known.map(|(i, _)| i.name.to_string()),
        size: known.map(|k| k.1).unwrap_or(0),
        md5,
        md5_expected,
        md5_ok,
        splits,
        ok,
    })
}
