//! Reading medical images and turning them into model-ready batches:
//! read (DICOM, NIfTI, MedMNIST npz, image folders, CSV manifests, segmentation pairs)
//! → preprocess (resize, channels, normalisation) → augment (training views) → batch.

pub mod augment;
pub mod dicom;
pub mod error;
pub mod image;
mod jpeg12;
mod jpegls;
pub mod loader;
pub mod medmnist;
pub mod nifti;
pub mod npy;
pub mod preprocess;
pub mod seg;
pub mod source;

pub use error::{DataError, Result};
pub use image::{Image, ImageSource, Meta, Modality};
pub use medmnist::Split;
pub use preprocess::{Normalize, Preprocess, ResizeMode};
pub use source::{discover, Item, ReadOptions};

/// Whether `bytes` could be allocated now: a reservation that is given back at once, so sizes
/// read from a file or a config fail as errors before the allocation that would abort the
/// process. Reserving without touching the pages costs nothing on Linux, macOS or Windows.
pub fn can_allocate(bytes: f64) -> bool {
    bytes <= usize::MAX as f64 && Vec::<u8>::new().try_reserve_exact(bytes as usize).is_ok()
}
