//! JPEG-LS pixel data (transfer syntaxes 1.2.840.10008.1.2.4.80 lossless and .81
//! near-lossless) for dicom-pixeldata, decoded by the pure-Rust `pure_jpegls`.
//!
//! dicom-rs decodes JPEG-LS only through CharLS (C++, built with CMake); without it the
//! registry lists the two syntaxes as stubs. Submitting a decoder through the registry's
//! inventory replaces a stub, so `decode_pixel_data` handles these files like any other and
//! the modality LUT, windowing and frame handling stay dicom-pixeldata's.
//!
//! `pure_jpegls` decodes single-component streams (grey images: CT, MR, CR, DX, most US);
//! a colour JPEG-LS image is an error naming the samples per pixel.

use dicom_encoding::adapters::{
    decode_error, DecodeError, DecodeResult, NeverPixelAdapter, PixelDataObject, PixelDataReader,
};
use dicom_encoding::snafu::OptionExt;
use dicom_encoding::submit_transfer_syntax;
use dicom_encoding::transfer_syntax::{Codec, NeverAdapter, TransferSyntax};

#[derive(Debug, Clone, Copy)]
pub(crate) struct JpegLsReader;

fn fail<T>(message: String) -> DecodeResult<T> {
    Err(DecodeError::Custom {
        message: format!("JPEG-LS {message}"),
        source: None,
    })
}

impl PixelDataReader for JpegLsReader {
    fn decode_frame(
        &self,
        src: &dyn PixelDataObject,
        frame: u32,
        dst: &mut Vec<u8>,
    ) -> DecodeResult<()> {
        let rows = src
            .rows()
            .context(decode_error::MissingAttributeSnafu { name: "Rows" })?;
        let cols = src
            .cols()
            .context(decode_error::MissingAttributeSnafu { name: "Columns" })?;
        let bits = src
            .bits_allocated()
            .context(decode_error::MissingAttributeSnafu {
                name: "BitsAllocated",
            })?;
        let spp = src
            .samples_per_pixel()
            .context(decode_error::MissingAttributeSnafu {
                name: "SamplesPerPixel",
            })?;
        if spp != 1 {
            return fail(format!(
                "{spp} samples per pixel: only single-component (grey) images are decoded"
            ));
        }
        if bits != 8 && bits != 16 {
            return fail(format!("BitsAllocated {bits} (8 or 16 expected)"));
        }
        let data = src
            .frame_pixel_data(frame)
            .context(decode_error::FrameRangeOutOfBoundsSnafu)?;
        let (pixels, w, h) = match jpegls::decode(&data, cols as u32, rows as u32) {
            Ok(d) => d,
            Err(e) => return fail(format!("frame {frame}: {e}")),
        };
        if (w, h) != (cols as u32, rows as u32) || pixels.len() != rows as usize * cols as usize {
            return fail(format!(
                "frame {frame} is {w}x{h}, the file says {cols}x{rows}"
            ));
        }
        // Samples keep their stored bit patterns (two's complement for signed data): the
        // pixel representation is applied afterwards, as for native pixel data.
        if bits == 8 {
            if let Some(v) = pixels.iter().find(|&&v| v > 0xff) {
                return fail(format!("frame {frame}: sample {v} in 8-bit pixel data"));
            }
            dst.extend(pixels.iter().map(|&v| v as u8));
        } else {
            dst.extend(pixels.iter().flat_map(|v| v.to_le_bytes()));
        }
        Ok(())
    }
}

submit_transfer_syntax!(TransferSyntax::<
    NeverAdapter,
    JpegLsReader,
    NeverPixelAdapter,
>::new_ele(
    "1.2.840.10008.1.2.4.80",
    "JPEG-LS Lossless Image Compression",
    Codec::EncapsulatedPixelData(Some(JpegLsReader), None),
));

submit_transfer_syntax!(TransferSyntax::<
    NeverAdapter,
    JpegLsReader,
    NeverPixelAdapter,
>::new_ele(
    "1.2.840.10008.1.2.4.81",
    "JPEG-LS Lossy (Near-Lossless) Image Compression",
    Codec::EncapsulatedPixelData(Some(JpegLsReader), None),
));
