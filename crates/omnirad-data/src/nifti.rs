//! NIfTI-1/2 volumes (`.nii`, `.nii.gz`), reoriented to the closest canonical RAS+ voxel order
//! (as nibabel's `as_closest_canonical`), then cut into 2D slices along a chosen axis.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, ArrayView3, Axis, Ix4};
use nifti::{
    Endianness, InMemNiftiObject, InMemNiftiVolume, IntoNdArray, NiftiHeader, NiftiObject,
    ReaderOptions,
};

use crate::error::{catch_decoder_panic, DataError, Result};
use crate::image::{apply_window, percentiles, Image, Meta, Modality};

/// Slicing axis in RAS+ voxel space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceAxis {
    Sagittal = 0,
    Coronal = 1,
    Axial = 2,
}

impl SliceAxis {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sagittal" | "x" | "0" => Ok(Self::Sagittal),
            "coronal" | "y" | "1" => Ok(Self::Coronal),
            "axial" | "z" | "2" => Ok(Self::Axial),
            _ => Err(format!(
                "unknown slice axis '{s}' (axial, coronal, sagittal)"
            )),
        }
    }
    fn name(self) -> &'static str {
        ["sagittal", "coronal", "axial"][self as usize]
    }
}

/// Intensity policy for volumes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VolumeIntensity {
    /// Clip to volume-wide percentiles (so slices of one volume stay comparable).
    Percentile(f32, f32),
    /// Linear window in the file's units (HU for CT volumes).
    Window { center: f32, width: f32 },
}

impl Default for VolumeIntensity {
    fn default() -> Self {
        Self::Percentile(0.5, 99.5)
    }
}

pub struct NiftiVolume {
    pub path: PathBuf,
    /// [X, Y, Z, T] in RAS+ order: index increases toward patient Right, Anterior, Superior.
    pub data: Array4<f32>,
    /// Voxel size along X, Y, Z after reorientation.
    pub spacing: [f32; 3],
    /// Orientation codes of the file's own voxel axes, e.g. "LAS".
    pub orientation: String,
}

impl NiftiVolume {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (header, volume) = if is_nifti2(&path) {
            read_nifti2(&path)?
        } else {
            let obj = catch_decoder_panic(&path, || read_nifti1(&path))?;
            (obj.header().clone(), obj.into_volume())
        };
        let dims = header
            .dim()
            .map_err(|e| DataError::format(&path, "NIfTI", e))?
            .to_vec();
        if !(3..=4).contains(&dims.len()) {
            return Err(DataError::Unsupported {
                path,
                what: "NIfTI dimensionality",
                value: format!("{}D (need 3D or 4D)", dims.len()),
            });
        }
        let raw = catch_decoder_panic(&path, || {
            volume
                .into_ndarray::<f32>()
                .map_err(|e| DataError::format(&path, "NIfTI", e))
        })?;
        let raw = if raw.ndim() == 3 {
            raw.insert_axis(Axis(3))
        } else {
            raw
        };
        let mut data = raw
            .into_dimensionality::<Ix4>()
            .expect("3D or 4D checked above");
        if data.iter().any(|v| !v.is_finite()) {
            return Err(DataError::invalid(&path, "volume contains NaN/Inf voxels"));
        }

        let (world, flip, orientation) = canonical_axes(&header);
        let pixdim = header.pixdim;
        let mut spacing = [1.0f32; 3];
        for i in 0..3 {
            if flip[i] {
                data.invert_axis(Axis(i));
            }
            spacing[world[i]] = pixdim[i + 1].abs().max(f32::EPSILON);
        }
        // Move voxel axis i to position world[i].
        let mut perm = [0usize; 4];
        for i in 0..3 {
            perm[world[i]] = i;
        }
        perm[3] = 3;
        let data = data.permuted_axes(perm).as_standard_layout().to_owned();
        Ok(Self {
            path,
            data,
            spacing,
            orientation,
        })
    }

    pub fn shape(&self) -> [usize; 4] {
        let s = self.data.shape();
        [s[0], s[1], s[2], s[3]]
    }

    /// One 3D time point, [X, Y, Z].
    pub fn volume(&self, t: usize) -> ArrayView3<'_, f32> {
        self.data.index_axis(Axis(3), t)
    }

    /// 2D slices in radiological display convention: rows run from anterior/superior at the
    /// top, columns from the patient's right on the image's left.
    /// `time`: which 4D volume (None = all).
    pub fn slices(
        &self,
        axis: SliceAxis,
        time: Option<usize>,
        intensity: VolumeIntensity,
    ) -> Result<Vec<Image>> {
        let [_, _, _, nt] = self.shape();
        let times: Vec<usize> = match time {
            Some(t) if t >= nt => {
                return Err(DataError::invalid(
                    &self.path,
                    format!("time index {t} out of range (volume has {nt})"),
                ))
            }
            Some(t) => vec![t],
            None => (0..nt).collect(),
        };
        let (lo, hi) = match intensity {
            VolumeIntensity::Percentile(a, b) => {
                percentiles(self.data.as_slice().expect("standard layout"), a, b)
            }
            VolumeIntensity::Window { .. } => (0.0, 1.0),
        };
        let path = self.path.display().to_string();
        let mut out = Vec::new();
        for t in times {
            let vol = self.volume(t);
            for k in 0..vol.len_of(Axis(axis as usize)) {
                let s = vol.index_axis(Axis(axis as usize), k);
                // s is [a, b] with the remaining RAS axes in order; display rows = b reversed,
                // columns = a reversed (both "higher coordinate first").
                let (na, nb) = s.dim();
                let mut img = Array3::<f32>::zeros((1, nb, na));
                for r in 0..nb {
                    for c in 0..na {
                        img[[0, r, c]] = s[[na - 1 - c, nb - 1 - r]];
                    }
                }
                let vals = img.as_slice_mut().expect("standard layout");
                match intensity {
                    VolumeIntensity::Percentile(..) => {
                        let span = (hi - lo).max(f32::EPSILON);
                        vals.iter_mut()
                            .for_each(|v| *v = ((*v - lo) / span).clamp(0.0, 1.0));
                    }
                    VolumeIntensity::Window { center, width } => apply_window(vals, center, width),
                }
                let tag = if nt > 1 {
                    format!("#t{t}:{}{k}", axis.name())
                } else {
                    format!("#{}{k}", axis.name())
                };
                out.push(Image {
                    data: img,
                    meta: Meta {
                        id: format!("{path}{tag}"),
                        modality: Modality::Unknown,
                        ..Default::default()
                    },
                });
            }
        }
        Ok(out)
    }
}

/// The closest canonical orientation: voxel axis i runs mostly along world axis `world[i]`
/// (0 R, 1 A, 2 S), against it where `flip[i]`; and its orientation codes, e.g. "LAS".
fn canonical_axes(header: &NiftiHeader) -> ([usize; 3], [bool; 3], String) {
    let affine = header.affine::<f64>();
    let mut world = [0usize; 3];
    let mut flip = [false; 3];
    let mut used = [false; 3];
    let mut orientation = String::new();
    for i in 0..3 {
        let col = [affine[(0, i)], affine[(1, i)], affine[(2, i)]];
        let j = (0..3)
            .filter(|j| !used[*j])
            .max_by(|a, b| col[*a].abs().total_cmp(&col[*b].abs()))
            .expect("three world axes");
        used[j] = true;
        world[i] = j;
        flip[i] = col[j] < 0.0;
        orientation.push(["RL", "AP", "SI"][j].as_bytes()[flip[i] as usize] as char);
    }
    (world, flip, orientation)
}

/// How many slices [`NiftiVolume::slices`] cuts from `path` along `axis` (all time points, or
/// the one of `time`), read from the header alone.
pub fn slice_count(path: &Path, axis: SliceAxis, time: Option<usize>) -> Result<usize> {
    let head = read_head(path, 544)?;
    let header = if nifti2_magic(&head) {
        nifti2_header(path, &head)?
    } else {
        catch_decoder_panic(path, || {
            NiftiHeader::from_reader(head.as_slice())
                .map_err(|e| DataError::format(path, "NIfTI", e))
        })?
    };
    let dims = header
        .dim()
        .map_err(|e| DataError::format(path, "NIfTI", e))?;
    if !(3..=4).contains(&dims.len()) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            what: "NIfTI dimensionality",
            value: format!("{}D (need 3D or 4D)", dims.len()),
        });
    }
    // Deflate packs at most 1032 bytes into one, so a header whose voxels cannot fit in the
    // file is corrupt (it would otherwise take most of the draws of a pretraining source).
    let bytes = dims
        .iter()
        .fold(u64::from(header.bitpix.max(8) as u16 / 8), |b, &d| {
            b.saturating_mul(u64::from(d))
        });
    let len = std::fs::metadata(path)
        .map_err(|e| DataError::io(path, e))?
        .len();
    let gz = path.to_string_lossy().to_ascii_lowercase().ends_with(".gz");
    if bytes > len.saturating_mul(if gz { 1032 } else { 1 }) {
        return Err(DataError::invalid(
            path,
            format!(
                "the header's {dims:?} voxels of {} bits need {bytes} bytes; the file has {len}",
                header.bitpix
            ),
        ));
    }
    let (world, _, _) = canonical_axes(&header);
    let along = (0..3)
        .find(|&i| world[i] == axis as usize)
        .expect("each world axis once");
    let times = match time {
        Some(_) => 1,
        None => dims.get(3).map_or(1, |&t| usize::from(t)),
    };
    Ok(usize::from(dims[along]) * times)
}

/// A single-file NIfTI-1 volume. The nifti crate stops reading a `.nii.gz` at its last voxel,
/// before the gzip trailer, so the CRC is never checked and a corrupt deflate stream that still
/// inflates gives wrong voxels without an error; reading the stream to its end makes flate2
/// check the CRC and length.
fn read_nifti1(path: &Path) -> Result<InMemNiftiObject> {
    // The crate's I/O errors print as debug structs; their own message reads better.
    let bad = |e: nifti::NiftiError| match e {
        nifti::NiftiError::Io(e) => DataError::format(path, "NIfTI", e),
        e => DataError::format(path, "NIfTI", e),
    };
    if !path.to_string_lossy().to_ascii_lowercase().ends_with(".gz") {
        return ReaderOptions::new().read_file(path).map_err(bad);
    }
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut stream = flate2::bufread::GzDecoder::new(std::io::BufReader::new(file));
    let obj = InMemNiftiObject::from_reader(&mut stream).map_err(bad)?;
    std::io::copy(&mut stream, &mut std::io::sink())
        .map_err(|e| DataError::format(path, "NIfTI", format!("gzip stream: {e}")))?;
    Ok(obj)
}

/// True for `.nii` and `.nii.gz` paths.
pub fn is_nifti(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// The NIfTI-2 header at the start of `bytes` (the file's first 544 bytes or more), as the
/// NIfTI-1 header the nifti crate reads: that crate knows only NIfTI-1, whose header NIfTI-2
/// widens to 64-bit fields (same meaning, other offsets: nifti2.h). Sizes above NIfTI-1's
/// 32 767 per axis are errors.
fn nifti2_header(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    let bad = |what: String| DataError::format(path, "NIfTI-2", what);
    if bytes.len() < 544 {
        return Err(bad(format!(
            "{} bytes, less than its 540-byte header",
            bytes.len()
        )));
    }
    let endianness = if i32::from_le_bytes(bytes[..4].try_into().unwrap()) == 540 {
        Endianness::Little
    } else {
        Endianness::Big
    };
    let b = |at: usize, n: usize| -> [u8; 8] {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&bytes[at..at + n]);
        if endianness == Endianness::Big {
            v[..n].reverse();
        }
        v
    };
    let i16_at = |at| i16::from_le_bytes(b(at, 2)[..2].try_into().unwrap());
    let i32_at = |at| i32::from_le_bytes(b(at, 4)[..4].try_into().unwrap());
    let i64_at = |at| i64::from_le_bytes(b(at, 8));
    let f64_at = |at| f64::from_le_bytes(b(at, 8));
    let f64s = |at: usize, out: &mut [f32]| {
        for (i, v) in out.iter_mut().enumerate() {
            *v = f64_at(at + 8 * i) as f32;
        }
    };
    if &bytes[4..8] != b"n+2\0" {
        return Err(bad(format!(
            "magic {:?}: only single-file NIfTI-2 (n+2) is read",
            String::from_utf8_lossy(&bytes[4..7])
        )));
    }
    let mut h = NiftiHeader {
        datatype: i16_at(12),
        bitpix: i16_at(14),
        scl_slope: f64_at(176) as f32,
        scl_inter: f64_at(184) as f32,
        qform_code: i32_at(344) as i16,
        sform_code: i32_at(348) as i16,
        quatern_b: f64_at(352) as f32,
        quatern_c: f64_at(360) as f32,
        quatern_d: f64_at(368) as f32,
        quatern_x: f64_at(376) as f32,
        quatern_y: f64_at(384) as f32,
        quatern_z: f64_at(392) as f32,
        endianness,
        ..NiftiHeader::default()
    };
    let rank = i64_at(16);
    if !(1..=7).contains(&rank) {
        return Err(bad(format!("dim[0] = {rank} (1 to 7 dimensions)")));
    }
    for i in 0..=rank as usize {
        let d = i64_at(16 + 8 * i);
        h.dim[i] = u16::try_from(d)
            .ok()
            .filter(|&d| d <= i16::MAX as u16)
            .ok_or_else(|| bad(format!("dim[{i}] = {d}")))?;
    }
    f64s(104, &mut h.pixdim);
    f64s(400, &mut h.srow_x);
    f64s(432, &mut h.srow_y);
    f64s(464, &mut h.srow_z);
    Ok(h)
}

/// Up to the first `n` bytes of `path`, decompressed if it ends in `.gz`.
fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut bytes = Vec::new();
    let read = if path.to_string_lossy().to_ascii_lowercase().ends_with(".gz") {
        flate2::read::GzDecoder::new(file)
            .take(n as u64)
            .read_to_end(&mut bytes)
    } else {
        std::io::BufReader::new(file)
            .take(n as u64)
            .read_to_end(&mut bytes)
    };
    read.map_err(|e| DataError::format(path, "NIfTI", e.to_string()))?;
    Ok(bytes)
}

/// A single-file NIfTI-2 volume (`n+2` magic) as the NIfTI-1 header and volume the nifti
/// crate reads.
fn read_nifti2(path: &Path) -> Result<(NiftiHeader, InMemNiftiVolume)> {
    let bytes = read_head(path, usize::MAX)?;
    let h = nifti2_header(path, &bytes)?;
    let bad = |what: String| DataError::format(path, "NIfTI-2", what);
    let i64_at = |at: usize| {
        let mut v: [u8; 8] = bytes[at..at + 8].try_into().expect("8 bytes");
        if h.endianness == Endianness::Big {
            v.reverse();
        }
        i64::from_le_bytes(v)
    };
    let offset = i64_at(168);
    let data = usize::try_from(offset)
        .ok()
        .filter(|&o| o >= 544)
        .and_then(|o| bytes.get(o..))
        .ok_or_else(|| bad(format!("vox_offset {offset} outside the file")))?;
    let volume = catch_decoder_panic(path, || {
        InMemNiftiVolume::from_reader(data, &h).map_err(|e| bad(e.to_string()))
    })?;
    Ok((h, volume))
}

/// NIfTI-2 files start with sizeof_hdr = 540 (either byte order).
fn is_nifti2(path: &Path) -> bool {
    read_head(path, 4).is_ok_and(|h| nifti2_magic(&h))
}

/// Whether a file's first bytes `head` are a NIfTI-2 sizeof_hdr.
fn nifti2_magic(head: &[u8]) -> bool {
    head.get(..4)
        .and_then(|h| <[u8; 4]>::try_from(h).ok())
        .is_some_and(|h| i32::from_le_bytes(h) == 540 || i32::from_be_bytes(h) == 540)
}
