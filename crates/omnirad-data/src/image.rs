//! The sample type every reader produces.

use ndarray::Array3;
use serde::{Deserialize, Serialize};

/// Imaging modality, from DICOM (0008,0060) or the source's known content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Modality {
    CT,
    MR,
    CR,
    DX,
    US,
    NM,
    PT,
    MG,
    XA,
    /// Colour fundus photography.
    Fundus,
    /// Histopathology / microscopy.
    Pathology,
    /// Dermatoscopy.
    Dermoscopy,
    /// Optical coherence tomography.
    OCT,
    Other,
    #[default]
    Unknown,
}

impl Modality {
    pub fn from_dicom(code: &str) -> Self {
        match code.trim().to_ascii_uppercase().as_str() {
            "CT" => Self::CT,
            "MR" => Self::MR,
            "CR" => Self::CR,
            "DX" | "RG" | "DR" => Self::DX,
            "US" => Self::US,
            "NM" => Self::NM,
            "PT" => Self::PT,
            "MG" => Self::MG,
            "XA" | "RF" => Self::XA,
            "OP" => Self::Fundus,
            "SM" => Self::Pathology,
            "OCT" | "OPT" => Self::OCT,
            "" => Self::Unknown,
            _ => Self::Other,
        }
    }

    pub fn parse(s: &str) -> Self {
        match s.trim().to_ascii_lowercase().as_str() {
            "fundus" => Self::Fundus,
            "pathology" | "histology" => Self::Pathology,
            "dermoscopy" | "dermatoscopy" => Self::Dermoscopy,
            "oct" => Self::OCT,
            "xray" | "x-ray" => Self::DX,
            "unknown" | "" => Self::Unknown,
            other => Self::from_dicom(other),
        }
    }

    /// X-ray projection modalities, where laterality matters and left-right flips are off.
    pub fn is_projection_xray(self) -> bool {
        matches!(self, Self::CR | Self::DX | Self::MG)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::CT => "CT",
            Self::MR => "MR",
            Self::CR => "CR",
            Self::DX => "DX",
            Self::US => "US",
            Self::NM => "NM",
            Self::PT => "PT",
            Self::MG => "MG",
            Self::XA => "XA",
            Self::Fundus => "fundus",
            Self::Pathology => "pathology",
            Self::Dermoscopy => "dermoscopy",
            Self::OCT => "OCT",
            Self::Other => "other",
            Self::Unknown => "unknown",
        }
    }
}

/// Where a sample came from and what is known about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Stable id: file path, plus `#frame` / `#axis:slice` / `split[index]` where needed.
    pub id: String,
    pub modality: Modality,
    pub anatomy: Option<String>,
    /// Class labels (one for single-label, several 0/1 entries for multi-label).
    pub labels: Vec<i64>,
}

/// Images read by index, as training and scoring loops read them: decoded [`Image`]s in memory,
/// or rows of an npz split kept as their 8-bit pixels ([`crate::medmnist::NpzRows`]: a quarter
/// of the memory, each row made an `Image` when read).
pub trait ImageSource: Sync {
    fn len(&self) -> usize;
    fn image(&self, i: usize) -> std::borrow::Cow<'_, Image>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ImageSource for Vec<Image> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn image(&self, i: usize) -> std::borrow::Cow<'_, Image> {
        std::borrow::Cow::Borrowed(&self[i])
    }
}

/// A 2D image, channels first, intensities mapped to [0, 1] by the reader's intensity policy.
#[derive(Debug, Clone)]
pub struct Image {
    /// [C, H, W] with C = 1 (grey) or 3 (RGB).
    pub data: Array3<f32>,
    pub meta: Meta,
}

impl Image {
    pub fn channels(&self) -> usize {
        self.data.dim().0
    }
    pub fn height(&self) -> usize {
        self.data.dim().1
    }
    pub fn width(&self) -> usize {
        self.data.dim().2
    }
}

/// Maps a slice of raw values to [0, 1] with a linear window (DICOM PS3.3 C.11.2.1.2, "LINEAR").
pub fn apply_window(values: &mut [f32], center: f32, width: f32) {
    let width = width.max(1.0);
    let lo = center - 0.5 - (width - 1.0) / 2.0;
    let span = width - 1.0;
    for v in values {
        *v = if span <= 0.0 {
            (*v > center) as u8 as f32
        } else {
            ((*v - lo) / span).clamp(0.0, 1.0)
        };
    }
}

/// Maps values to [0, 1] between the given low/high percentiles (ignores NaN).
pub fn percentile_normalize(values: &mut [f32], lo_pct: f32, hi_pct: f32) {
    let (lo, hi) = percentiles(values, lo_pct, hi_pct);
    let span = (hi - lo).max(f32::EPSILON);
    for v in values.iter_mut() {
        *v = if v.is_finite() {
            ((*v - lo) / span).clamp(0.0, 1.0)
        } else {
            0.0
        };
    }
}

/// The `lo`-th and `hi`-th percentiles (0–100) of the finite values.
pub fn percentiles(values: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let idx = |p: f32| (((p / 100.0) * (v.len() - 1) as f32).round() as usize).min(v.len() - 1);
    let (i_lo, i_hi) = (idx(lo), idx(hi));
    let lo_v = *v.select_nth_unstable_by(i_lo, f32::total_cmp).1;
    let hi_v = *v.select_nth_unstable_by(i_hi, f32::total_cmp).1;
    (lo_v, hi_v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_matches_dicom_linear_formula() {
        // center 40, width 400: DICOM maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] = [-160, 239] to [0, 1].
        let mut v = vec![-1000.0, -160.0, 40.0, 239.0, 3000.0];
        apply_window(&mut v, 40.0, 400.0);
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 0.0).abs() < 1e-6);
        assert!((v[2] - 200.0 / 399.0).abs() < 1e-6);
        assert!((v[3] - 1.0).abs() < 1e-6);
        assert_eq!(v[4], 1.0);
    }

    #[test]
    fn percentiles_of_a_ramp() {
        let v: Vec<f32> = (0..101).map(|x| x as f32).collect();
        assert_eq!(percentiles(&v, 1.0, 99.0), (1.0, 99.0));
        let mut w = v.clone();
        percentile_normalize(&mut w, 0.0, 100.0);
        assert!((w[50] - 0.5).abs() < 1e-6);
    }
}
