//! Reading medical images and turning them into model-ready batches:
//! read (DICOM, NIfTI, MedMNIST npz, image folders, CSV manifests, segmentation pairs)
//! → preprocess (resize, channels, normalisation) → augment (training views) → batch.

pub mod augment;
pub mod dicom;
pub mod error;
pub mod image;
pub mod loader;
pub mod medmnist;
pub mod nifti;
pub mod npy;
pub mod preprocess;
pub mod seg;
pub mod source;

pub use error::{DataError, Result};
pub use image::{Image, Meta, Modality};
pub use medmnist::Split;
pub use preprocess::{Normalize, Preprocess, ResizeMode};
pub use source::{discover, Item, ReadOptions};
