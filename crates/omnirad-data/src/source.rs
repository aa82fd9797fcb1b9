//! Turns any input path (file, folder, CSV manifest, npz split) into a list of cheap item
//! references, and loads one item into its 2D images (a multi-frame DICOM or a NIfTI volume
//! yields several).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::dicom::{looks_like_dicom, non_image_object, DicomFile, Window};
use crate::error::{catch_decoder_panic, DataError, Result};
use crate::image::{Image, Meta, Modality};
use crate::medmnist::{NpzSplit, Split};
use crate::nifti::{is_nifti, slice_count, NiftiVolume, SliceAxis, VolumeIntensity};

/// Reader settings shared by every format.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub window: Window,
    pub slice_axis: SliceAxis,
    pub volume_intensity: VolumeIntensity,
    /// Which 4D volume to slice (None = all).
    pub time: Option<usize>,
    /// npz split to read when the input is an npz file.
    pub split: Split,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            window: Window::File,
            slice_axis: SliceAxis::Axial,
            volume_intensity: VolumeIntensity::default(),
            time: None,
            split: Split::Test,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dicom,
    Nifti,
    Raster,
    Npz,
    Csv,
}

const RASTER: &[&str] = &["png", "jpg", "jpeg", "tif", "tiff", "gif", "bmp"];

pub fn file_kind(path: &Path) -> Option<FileKind> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "dcm" | "dicom" => Some(FileKind::Dicom),
        "npz" => Some(FileKind::Npz),
        "csv" => Some(FileKind::Csv),
        e if RASTER.contains(&e) => Some(FileKind::Raster),
        _ if is_nifti(path) => Some(FileKind::Nifti),
        // DICOM files often have no extension at all.
        _ if looks_like_dicom(path) => Some(FileKind::Dicom),
        _ => None,
    }
}

/// A reference to something that loads into one or more images.
#[derive(Debug, Clone)]
pub enum Item {
    File {
        path: PathBuf,
        labels: Vec<i64>,
        modality: Option<Modality>,
        anatomy: Option<String>,
    },
    Npz {
        split: Arc<NpzSplit>,
        index: usize,
    },
}

impl Item {
    pub fn id(&self) -> String {
        match self {
            Item::File { path, .. } => path.display().to_string(),
            Item::Npz { split, index } => split.meta(*index).id,
        }
    }

    /// How many images [`Item::load`] gives, read from headers only (DICOM frames, NIfTI
    /// slices along `opts.slice_axis`); 1 for single images.
    pub fn count(&self, opts: &ReadOptions) -> Result<usize> {
        match self {
            Item::File { path, .. } => match file_kind(path) {
                Some(FileKind::Dicom) => DicomFile::frame_count(path),
                Some(FileKind::Nifti) => slice_count(path, opts.slice_axis, opts.time),
                _ => Ok(1),
            },
            Item::Npz { .. } => Ok(1),
        }
    }

    pub fn load(&self, opts: &ReadOptions) -> Result<Vec<Image>> {
        match self {
            Item::Npz { split, index } => Ok(vec![split.image(*index)]),
            Item::File {
                path,
                labels,
                modality,
                anatomy,
            } => {
                let mut images = match file_kind(path) {
                    Some(FileKind::Dicom) => DicomFile::open(path)?.images(&opts.window)?,
                    Some(FileKind::Nifti) => NiftiVolume::open(path)?.slices(
                        opts.slice_axis,
                        opts.time,
                        opts.volume_intensity,
                    )?,
                    Some(FileKind::Raster) => vec![read_raster(path)?],
                    _ => {
                        return Err(DataError::Unsupported {
                            path: path.clone(),
                            what: "file type",
                            value: "not DICOM, NIfTI, PNG/JPEG/TIFF/GIF/BMP".into(),
                        })
                    }
                };
                for im in &mut images {
                    if !labels.is_empty() {
                        im.meta.labels = labels.clone();
                    }
                    if let Some(m) = modality {
                        im.meta.modality = *m;
                    }
                    if anatomy.is_some() {
                        im.meta.anatomy = anatomy.clone();
                    }
                }
                Ok(images)
            }
        }
    }
}

/// Lists the items under `path`. Folders are walked recursively in sorted order; files of
/// unknown type inside folders, and DICOM objects that hold no image (DICOMDIR, reports,
/// presentation states, segmentations, …), are skipped and counted in the returned number.
pub fn discover(path: &Path, split: Split) -> Result<(Vec<Item>, usize)> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        let mut skipped = walk(path, &mut files)?;
        // In parallel: telling a DICOM file without an extension, or one that holds no image,
        // reads its first bytes, and an archive has many files.
        let images: Vec<bool> = files
            .par_iter()
            .map(|f| match file_kind(f) {
                Some(FileKind::Dicom) => non_image_object(f).is_none(),
                Some(FileKind::Nifti | FileKind::Raster) => true,
                _ => false,
            })
            .collect();
        let mut items = Vec::new();
        for (f, image) in files.into_iter().zip(images) {
            if image {
                items.push(Item::File {
                    path: f,
                    labels: vec![],
                    modality: None,
                    anatomy: None,
                });
            } else {
                skipped += 1;
            }
        }
        if items.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        return Ok((items, skipped));
    }
    let items = match file_kind(path) {
        Some(FileKind::Npz) => {
            let s = Arc::new(NpzSplit::load(path, split)?);
            (0..s.len())
                .map(|index| Item::Npz {
                    split: s.clone(),
                    index,
                })
                .collect()
        }
        Some(FileKind::Csv) => read_manifest(path)?,
        Some(_) => vec![Item::File {
            path: path.to_path_buf(),
            labels: vec![],
            modality: None,
            anatomy: None,
        }],
        None => {
            return Err(DataError::Unsupported {
                path: path.to_path_buf(),
                what: "input",
                value: "expected a folder, DICOM, NIfTI, image, .npz or .csv manifest".into(),
            })
        }
    };
    if items.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok((items, 0))
}

/// The files under `dir`, in sorted order, following symbolic links; a link back to a folder
/// already being walked is skipped (and counted), not followed until the path grows too long.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<usize> {
    let mut loops = 0;
    for e in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        match e {
            Ok(e) if !e.file_type().is_dir() => out.push(e.into_path()),
            Ok(_) => {}
            Err(e) if e.loop_ancestor().is_some() => loops += 1,
            // A dangling link is an item that fails when read, and is reported then.
            Err(e)
                if e.io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                out.extend(e.path().map(Path::to_path_buf))
            }
            Err(e) => {
                return Err(DataError::io(
                    e.path().unwrap_or(dir).to_path_buf(),
                    e.into(),
                ))
            }
        }
    }
    Ok(loops)
}

/// CSV manifest with a header: `path,label[,modality,anatomy]`; paths relative to the CSV.
/// `label` may be empty, an integer, or `;`-separated 0/1 flags for multi-label data.
pub fn read_manifest(path: &Path) -> Result<Vec<Item>> {
    let mut rdr = csv::Reader::from_path(path).map_err(|e| DataError::format(path, "CSV", e))?;
    let headers = rdr
        .headers()
        .map_err(|e| DataError::format(path, "CSV", e))?
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let p_col =
        col("path").ok_or_else(|| DataError::invalid(path, "manifest has no 'path' column"))?;
    let (l_col, m_col, a_col) = (col("label"), col("modality"), col("anatomy"));
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| DataError::invalid(path, format!("line {line}: {e}")))?;
        let field = |c: Option<usize>| {
            c.and_then(|c| rec.get(c))
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let rel = field(Some(p_col))
            .ok_or_else(|| DataError::invalid(path, format!("line {line}: empty path")))?;
        let labels = match field(l_col) {
            None => vec![],
            Some(l) => l
                .split(';')
                .map(|v| v.trim().parse::<i64>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| {
                    DataError::invalid(
                        path,
                        format!(
                            "line {line}: label '{l}' is not an integer (or ;-separated integers)"
                        ),
                    )
                })?,
        };
        items.push(Item::File {
            path: base.join(rel),
            labels,
            modality: field(m_col).map(Modality::parse),
            anatomy: field(a_col).map(str::to_string),
        });
    }
    Ok(items)
}

/// PNG/JPEG/TIFF/GIF/BMP, 8 or 16 bit, grey or colour, to [0, 1]. Alpha is dropped.
pub fn read_raster(path: &Path) -> Result<Image> {
    let img = catch_decoder_panic(path, || {
        image::ImageReader::open(path)
            .map_err(|e| DataError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?
            .decode()
            .map_err(|e| DataError::format(path, "image", e))
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    use image::ColorType as C;
    let data = match img.color() {
        C::L8 | C::La8 | C::L16 | C::La16 => {
            let v = img.into_luma16().into_raw();
            ndarray::Array3::from_shape_vec(
                (1, h, w),
                v.into_iter().map(|x| x as f32 / 65535.0).collect(),
            )
        }
        _ => {
            let v = img.into_rgb32f().into_raw();
            // Grey images saved as RGB (or palette GIFs) stay single-channel.
            if v.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]) {
                ndarray::Array3::from_shape_vec((1, h, w), v.into_iter().step_by(3).collect())
            } else {
                ndarray::Array3::from_shape_vec((h, w, 3), v)
                    .map(|a| a.permuted_axes([2, 0, 1]).as_standard_layout().to_owned())
            }
        }
    }
    .expect("decoder returns w*h pixels");
    Ok(Image {
        data,
        meta: Meta {
            id: path.display().to_string(),
            ..Default::default()
        },
    })
}
