//! DICOM reader on dicom-rs: modality LUT (→ HU for CT), VOI windowing, MONOCHROME1
//! inversion, multi-frame, RGB/YBR, and every transfer syntax the pure-Rust stack decodes.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder, VoiLutOption};
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use ndarray::Array3;
use serde::Serialize;

use crate::error::{catch_decoder_panic, DataError, Result};
use crate::image::{apply_window, percentile_normalize, Image, Meta, Modality};

/// How raw (modality-LUT) values become [0, 1] intensities.
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    /// The file's VOI LUT table, else its VOI window (per frame in Enhanced objects), else the
    /// 1st–99th percentiles (without pixel padding).
    File,
    /// A named preset, see [`Window::preset`].
    Preset(&'static str, f32, f32),
    /// Explicit center / width in modality units (HU for CT).
    Custom { center: f32, width: f32 },
    /// Clip to the given low / high percentiles of each frame, leaving out the pixels the file
    /// marks as padding (these are black).
    Percentile(f32, f32),
}

/// Standard CT windows (center, width) in HU.
pub const CT_WINDOWS: &[(&str, f32, f32)] = &[
    ("lung", -600.0, 1500.0),
    ("mediastinum", 50.0, 350.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
    ("abdomen", 40.0, 400.0),
    ("liver", 60.0, 160.0),
];

impl Window {
    pub fn preset(name: &str) -> Option<Self> {
        CT_WINDOWS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(n, c, w)| Self::Preset(n, c, w))
    }

    /// Parses `file`, a preset name, `C,W` (center,width) or `pct:LO,HI`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s == "file" {
            return Ok(Self::File);
        }
        if let Some(w) = Self::preset(s) {
            return Ok(w);
        }
        let pair = |t: &str| -> Option<(f32, f32)> {
            let (a, b) = t.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        };
        if let Some(rest) = s.strip_prefix("pct:") {
            return match pair(rest) {
                Some((lo, hi)) if 0.0 <= lo && lo < hi && hi <= 100.0 => {
                    Ok(Self::Percentile(lo, hi))
                }
                Some(_) => Err(format!("window '{s}': percentiles need 0 ≤ LO < HI ≤ 100")),
                None => Err(format!("window '{s}': expected pct:LO,HI (numbers)")),
            };
        }
        match pair(s) {
            Some((center, width)) if width > 0.0 && center.is_finite() && width.is_finite() => {
                Ok(Self::Custom { center, width })
            }
            Some(_) => Err(format!(
                "window '{s}': CENTER,WIDTH needs a finite center and a width > 0"
            )),
            None => {
                let names: Vec<_> = CT_WINDOWS.iter().map(|w| w.0).collect();
                Err(format!(
                    "unknown window '{s}': use 'file', one of {}, 'CENTER,WIDTH' or 'pct:LO,HI'",
                    names.join(", ")
                ))
            }
        }
    }
}

/// What `omnirad info` reports for a DICOM file.
#[derive(Debug, Clone, Serialize)]
pub struct DicomInfo {
    pub transfer_syntax_uid: String,
    pub transfer_syntax: String,
    pub modality: String,
    pub body_part: Option<String>,
    pub rows: u32,
    pub columns: u32,
    pub frames: u32,
    pub samples_per_pixel: u16,
    pub photometric_interpretation: String,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    pub window: Option<(f64, f64)>,
    /// The VOI LUT Function the file's window is applied with, when the file names one.
    pub window_function: Option<String>,
    /// The modality LUT table the file has in place of a rescale: its entries and first mapped
    /// value.
    pub modality_lut: Option<(usize, i64)>,
    /// The VOI LUT table `Window::File` applies (before any window): its entries and first
    /// mapped value.
    pub voi_lut: Option<(usize, i64)>,
}

/// The deepest sequence nesting handed to dicom-object, whose reader recurses once per level:
/// deeper (200 000 levels fit in 4 MB) would overflow the stack, which aborts the process instead
/// of failing one file. Real files nest a few levels (structured reports, RT structure sets).
const MAX_SEQUENCE_DEPTH: usize = 128;

/// Walks the file meta group and the data set's tokens without building them, before
/// dicom-object reads the file, and refuses what would take that reader down or hold it up:
/// sequences nested deeper than [`MAX_SEQUENCE_DEPTH`], and declared lengths that run past the
/// end of the file. dicom-object reserves and zero-fills each element's declared length before
/// reading it, so one damaged length field made a 9.7 kB file cost 3.9 GB and 6.8 s
/// (found by fuzzing the shared files). `whole`: walk on past the pixel data (seeking over
/// native pixel data, reading compressed fragments), as dicom-object reads a whole file; else
/// stop where the pixel data starts. Whatever this walk cannot read is left to dicom-object to
/// report.
fn check_structure(path: &Path, whole: bool) -> Result<()> {
    use dicom_encoding::transfer_syntax::Codec;
    use std::io::{BufRead, Seek, SeekFrom};
    let io = |e| DataError::io(path, e);
    let open_at = |at: u64| -> Result<std::io::BufReader<std::fs::File>> {
        let mut f = std::fs::File::open(path).map_err(io)?;
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        Ok(std::io::BufReader::new(f))
    };
    let mut src = open_at(0)?;
    let file_len = src.get_ref().metadata().map_err(io)?.len();
    let overrun = |at: u64, len: u32| {
        DataError::invalid(
            path,
            format!(
                "the DICOM element at byte {at} declares {len} bytes, past the end of the \
                 {file_len}-byte file (damaged or truncated file?)"
            ),
        )
    };
    if src
        .fill_buf()
        .is_ok_and(|b| b.len() >= 132 && &b[128..132] == b"DICM")
    {
        src.consume(128);
    }
    let meta_start = src.stream_position().map_err(io)?;
    if let Some((at, len)) = meta_overrun(&mut src, file_len) {
        return Err(overrun(at, len));
    }
    src.seek(SeekFrom::Start(meta_start)).map_err(io)?;
    let Ok(meta) = dicom_object::FileMetaTable::from_reader(&mut src) else {
        return Ok(());
    };
    let Some(ts) = TransferSyntaxRegistry.get(meta.transfer_syntax()) else {
        return Ok(());
    };
    let mut at = src.stream_position().map_err(io)?;
    let walked = match ts.codec() {
        // A deflated data set may be longer than the file, and has no byte offsets to seek to:
        // its lengths are left unchecked.
        Codec::Dataset(Some(adapter)) => walk_data_set(
            adapter.adapt_reader(Box::new(src)),
            ts,
            at,
            u64::MAX,
            whole,
            false,
        ),
        Codec::Dataset(None) => return Ok(()),
        _ => loop {
            match walk_data_set(src, ts, at, file_len, whole, whole) {
                Walked::PixelData { at: pixels, len } => {
                    at = pixels + u64::from(len);
                    if at > file_len {
                        return Err(overrun(pixels, len));
                    }
                    src = open_at(at)?;
                }
                walked => break walked,
            }
        },
    };
    match walked {
        Walked::Overrun { at, len } => Err(overrun(at, len)),
        Walked::TooDeep => Err(DataError::invalid(
            path,
            format!("DICOM sequences nested more than {MAX_SEQUENCE_DEPTH} deep (damaged file?)"),
        )),
        _ => Ok(()),
    }
}

/// How [`walk_data_set`] ended.
enum Walked {
    /// At the end of the data set, at the pixel data when asked to stop there, or at something
    /// it could not read.
    End,
    /// A value of `len` bytes at byte `at` runs past the end of the source.
    Overrun {
        at: u64,
        len: u32,
    },
    TooDeep,
    /// Top-level native pixel data of `len` bytes at byte `at`, not read.
    PixelData {
        at: u64,
        len: u32,
    },
}

/// Reads the data set's tokens from `src` (which starts at byte `start` of the file, at the top
/// level), every length checked by [`LengthGuard`] against `limit`; `skip_pixels`: hand back
/// native pixel data with its offset instead of reading it.
fn walk_data_set(
    src: impl std::io::Read,
    ts: &dicom_encoding::TransferSyntax,
    start: u64,
    limit: u64,
    whole: bool,
    skip_pixels: bool,
) -> Walked {
    use dicom_parser::dataset::{DataSetReader, DataToken};
    let Ok(inner) = dicom_parser::DynStatefulDecoder::new_with_ts(src, ts, start) else {
        return Walked::End;
    };
    let seen = std::rc::Rc::new(std::cell::Cell::new(Seen::default()));
    let guard = LengthGuard {
        inner,
        limit,
        seen: seen.clone(),
    };
    let mut depth = 0usize;
    for token in DataSetReader::new(guard, Default::default()) {
        match token {
            Ok(DataToken::PixelSequenceStart) if depth == 0 && !whole => return Walked::End,
            Ok(DataToken::ElementHeader(h)) if depth == 0 && h.tag == tags::PIXEL_DATA => {
                match h.len.get() {
                    _ if !whole => return Walked::End,
                    Some(len) if skip_pixels => {
                        let at = seen.get().header_end;
                        return Walked::PixelData { at, len };
                    }
                    _ => {}
                }
            }
            // A pixel sequence (an icon's, say) ends with a sequence end as well.
            Ok(DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart) => depth += 1,
            Ok(DataToken::SequenceEnd) => depth = depth.saturating_sub(1),
            Ok(_) => {}
            Err(_) => {
                return match seen.get().refused {
                    Some((at, len)) => Walked::Overrun { at, len },
                    None => Walked::End,
                }
            }
        }
        if depth > MAX_SEQUENCE_DEPTH {
            return Walked::TooDeep;
        }
    }
    Walked::End
}

/// The first file meta element (after the "DICM" magic at `src`'s position) whose declared
/// length runs past the end of the file, as (byte offset of its value, length); walks the group
/// as dicom-object's meta reader does, which allocates each length before reading it.
fn meta_overrun(src: &mut std::io::BufReader<std::fs::File>, file_len: u64) -> Option<(u64, u32)> {
    use dicom_encoding::decode::{file_header_decoder, Decode};
    use std::io::{Read, Seek};
    let decoder = file_header_decoder();
    let mut word = [0u8; 4];
    src.read_exact(&mut word).ok()?;
    if &word != b"DICM" {
        return None;
    }
    let (header, _) = decoder.decode_header(src).ok()?;
    if header.tag != Tag(0x0002, 0x0000) || header.len.get() != Some(4) {
        return None;
    }
    src.read_exact(&mut word).ok()?;
    let group_len = u64::from(u32::from_le_bytes(word));
    let mut read = 0u64;
    while read < group_len {
        let (header, header_len) = decoder.decode_header(src).ok()?;
        let len = header.len.get()?;
        let at = src.stream_position().ok()?;
        if at + u64::from(len) > file_len {
            return Some((at, len));
        }
        src.seek_relative(i64::from(len)).ok()?;
        read += header_len as u64 + u64::from(len);
    }
    None
}

/// dicom-parser's stateful decoder with every value length checked against the end of the
/// source before the decoder allocates it (see [`check_structure`]), and what the walk needs
/// to know of the bytes it has read in `seen`.
struct LengthGuard<S> {
    inner: S,
    /// The byte the source ends at.
    limit: u64,
    seen: std::rc::Rc<std::cell::Cell<Seen>>,
}

#[derive(Clone, Copy, Default)]
struct Seen {
    /// Where the last element header read ends (its value starts).
    header_end: u64,
    /// A refused value: (its byte offset, its length).
    refused: Option<(u64, u32)>,
}

impl<S: dicom_parser::StatefulDecode> LengthGuard<S> {
    fn check(&self, len: Option<u32>) -> dicom_parser::stateful::decode::Result<()> {
        let at = self.inner.position();
        match len {
            Some(len) if at.saturating_add(u64::from(len)) > self.limit => {
                let seen = self.seen.get();
                self.seen.set(Seen {
                    refused: Some((at, len)),
                    ..seen
                });
                Err(dicom_parser::stateful::decode::Error::AllocateValueData { len })
            }
            _ => Ok(()),
        }
    }
}

impl<S: dicom_parser::StatefulDecode> dicom_parser::StatefulDecode for LengthGuard<S> {
    type Reader = S::Reader;

    fn decode_header(
        &mut self,
    ) -> dicom_parser::stateful::decode::Result<dicom_core::DataElementHeader> {
        let header = self.inner.decode_header()?;
        let seen = self.seen.get();
        self.seen.set(Seen {
            header_end: self.inner.position(),
            ..seen
        });
        Ok(header)
    }

    fn decode_item_header(
        &mut self,
    ) -> dicom_parser::stateful::decode::Result<dicom_core::header::SequenceItemHeader> {
        self.inner.decode_item_header()
    }

    fn read_value(
        &mut self,
        header: &dicom_core::DataElementHeader,
    ) -> dicom_parser::stateful::decode::Result<PrimitiveValue> {
        self.check(header.len.get())?;
        self.inner.read_value(header)
    }

    fn read_value_preserved(
        &mut self,
        header: &dicom_core::DataElementHeader,
    ) -> dicom_parser::stateful::decode::Result<PrimitiveValue> {
        self.check(header.len.get())?;
        self.inner.read_value_preserved(header)
    }

    fn read_value_bytes(
        &mut self,
        header: &dicom_core::DataElementHeader,
    ) -> dicom_parser::stateful::decode::Result<PrimitiveValue> {
        self.check(header.len.get())?;
        self.inner.read_value_bytes(header)
    }

    fn read_to_vec(
        &mut self,
        length: u32,
        vec: &mut Vec<u8>,
    ) -> dicom_parser::stateful::decode::Result<()> {
        self.check(Some(length))?;
        self.inner.read_to_vec(length, vec)
    }

    fn read_u32_to_vec(
        &mut self,
        length: u32,
        vec: &mut Vec<u32>,
    ) -> dicom_parser::stateful::decode::Result<()> {
        self.check(Some(length))?;
        self.inner.read_u32_to_vec(length, vec)
    }

    fn read_to<W: std::io::Write>(
        &mut self,
        length: u32,
        out: W,
    ) -> dicom_parser::stateful::decode::Result<()> {
        self.check(Some(length))?;
        self.inner.read_to(length, out)
    }

    fn skip_bytes(&mut self, length: u32) -> dicom_parser::stateful::decode::Result<()> {
        self.inner.skip_bytes(length)
    }

    fn seek(&mut self, position: u64) -> dicom_parser::stateful::decode::Result<()>
    where
        Self::Reader: std::io::Seek,
    {
        self.inner.seek(position)
    }

    fn position(&self) -> u64 {
        self.inner.position()
    }
}

/// An attribute of one data set as text, trimmed; None when absent or empty.
fn text_in(ds: &InMemDicomObject, tag: Tag) -> Option<String> {
    let text = ds.element(tag).ok()?.to_str().ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// A numeric attribute of one data set: None when absent or empty, else its text and its first
/// value when that is a finite number.
fn number_in(ds: &InMemDicomObject, tag: Tag) -> Option<(String, Option<f64>)> {
    let text = text_in(ds, tag)?;
    let v = ds.element(tag).ok()?.to_multi_float64().ok();
    Some((
        text,
        v.and_then(|v| v.first().copied()).filter(|v| v.is_finite()),
    ))
}

/// The item of functional group macro `group` (a one-item sequence) in a functional groups item.
fn macro_in(item: &InMemDicomObject, group: Tag) -> Option<&InMemDicomObject> {
    item.element(group).ok()?.items()?.first()
}

pub struct DicomFile {
    path: PathBuf,
    obj: DefaultDicomObject,
}

impl DicomFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        check_structure(&path, true)?;
        let obj = OpenFileOptions::new()
            .open_file(&path)
            .map_err(|e| DataError::format(&path, "DICOM", e))?;
        let me = Self { path, obj };
        if me.obj.element(tags::PIXEL_DATA).is_err() {
            let what = non_image_object(&me.path)
                .map(|w| format!(": it is {w}"))
                .unwrap_or_default();
            return Err(DataError::invalid(
                &me.path,
                format!("DICOM file has no pixel data (7FE0,0010){what}"),
            ));
        }
        Ok(me)
    }

    /// How many frames (images) the file at `path` holds, from its header alone: Number of
    /// Frames (0028,0008), 1 where it is absent.
    pub fn frame_count(path: impl AsRef<Path>) -> Result<usize> {
        let path = path.as_ref();
        check_structure(path, false)?;
        let obj = OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .map_err(|e| DataError::format(path, "DICOM", e))?;
        let frames = match obj.element(tags::NUMBER_OF_FRAMES) {
            Ok(e) => e.to_int::<i64>().map_err(|e| {
                DataError::invalid(path, format!("Number of Frames (0028,0008): {e}"))
            })?,
            Err(_) => 1,
        };
        // A header that claims more frames than the file has bytes is corrupt.
        let len = std::fs::metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .len();
        if frames > 0 && frames as u64 > len {
            return Err(DataError::invalid(
                path,
                format!("Number of Frames (0028,0008) is {frames} in a file of {len} bytes"),
            ));
        }
        Ok(usize::try_from(frames).unwrap_or(0).max(1))
    }

    fn str_tag(&self, tag: Tag) -> Option<String> {
        text_in(&self.obj, tag)
    }

    fn int_tag(&self, tag: Tag) -> Option<i64> {
        self.obj.element(tag).ok()?.to_int::<i64>().ok()
    }

    pub fn transfer_syntax(&self) -> (String, String) {
        let uid = self
            .obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let name = TransferSyntaxRegistry
            .get(&uid)
            .map(|ts| ts.name().to_string())
            .unwrap_or_else(|| "unknown".into());
        (uid, name)
    }

    pub fn modality(&self) -> Modality {
        Modality::from_dicom(&self.str_tag(tags::MODALITY).unwrap_or_default())
    }

    /// The first frame's slope and intercept, for objects whose values vary per frame; a bad
    /// value is left to the pixel read to report.
    fn first_rescale(&self) -> (f64, f64) {
        let pvt = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
        let get = |tag, default| match self.frame_numbers(pvt, tag, "", |_| true, "") {
            Ok(Some(v)) => v[0],
            _ => default,
        };
        (
            get(tags::RESCALE_SLOPE, 1.0),
            get(tags::RESCALE_INTERCEPT, 0.0),
        )
    }

    pub fn info(&self) -> DicomInfo {
        let (uid, name) = self.transfer_syntax();
        let (rescale_slope, rescale_intercept) = self.first_rescale();
        DicomInfo {
            transfer_syntax_uid: uid,
            transfer_syntax: name,
            modality: self.str_tag(tags::MODALITY).unwrap_or_default(),
            body_part: self.str_tag(tags::BODY_PART_EXAMINED),
            rows: self.int_tag(tags::ROWS).unwrap_or(0) as u32,
            columns: self.int_tag(tags::COLUMNS).unwrap_or(0) as u32,
            frames: self.int_tag(tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32,
            samples_per_pixel: self.int_tag(tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16,
            photometric_interpretation: self
                .str_tag(tags::PHOTOMETRIC_INTERPRETATION)
                .unwrap_or_default(),
            bits_allocated: self.int_tag(tags::BITS_ALLOCATED).unwrap_or(0) as u16,
            bits_stored: self.int_tag(tags::BITS_STORED).unwrap_or(0) as u16,
            signed: self.int_tag(tags::PIXEL_REPRESENTATION) == Some(1),
            rescale_slope,
            rescale_intercept,
            window: self.file_windows().ok().flatten().map(|w| w[0]),
            window_function: (self.voi_function().ok())
                .filter(|f| *f != VoiFunction::Linear)
                .map(|f| f.name().to_string()),
            modality_lut: (self.modality_lut().ok().flatten()).map(|l| (l.entries.len(), l.first)),
            voi_lut: (self.voi_lut().ok().flatten()).map(|l| (l.entries.len(), l.first)),
        }
    }

    /// All frames with the modality LUT applied (HU for CT), [F, C, H, W] as F arrays of
    /// [C, H, W]; no VOI window and no MONOCHROME1 inversion. YBR is converted to RGB.
    pub fn modality_frames(&self) -> Result<Vec<Array3<f32>>> {
        let (uid, ts_name) = self.transfer_syntax();
        let decodable = TransferSyntaxRegistry
            .get(&uid)
            .map(|ts| ts.can_decode_all())
            .unwrap_or(false);
        if !decodable {
            return Err(DataError::Unsupported {
                path: self.path.clone(),
                what: "transfer syntax (no pure-Rust decoder)",
                value: format!("{ts_name} ({uid})"),
            });
        }
        if self.int_tag(tags::BITS_ALLOCATED) == Some(1) {
            // dicom-pixeldata converts 1-bit data only to "must be 1, 8 or 16".
            return Err(DataError::Unsupported {
                path: self.path.clone(),
                what: "pixel data",
                value: format!(
                    "1 bit per pixel (modality {}): a binary mask such as a DICOM SEG, not an image",
                    self.str_tag(tags::MODALITY).unwrap_or_else(|| "unknown".into())
                ),
            });
        }
        if uid == "1.2.840.10008.1.2.5" {
            self.check_rle_headers()?;
        }
        let jpeg12;
        let obj = if self.needs_jpeg12(&uid) {
            jpeg12 = self.with_native_jpeg12()?;
            &jpeg12
        } else {
            &self.obj
        };
        let pixels = catch_decoder_panic(&self.path, || {
            obj.decode_pixel_data().map_err(|e| {
                let bits = self.int_tag(tags::BITS_STORED).unwrap_or(0);
                DataError::invalid(
                    &self.path,
                    format!(
                        "cannot decode {bits}-bit pixel data ({ts_name}): {}",
                        with_causes(&e)
                    ),
                )
            })
        })?;
        let (rows, cols) = (pixels.rows() as usize, pixels.columns() as usize);
        let spp = pixels.samples_per_pixel() as usize;
        let pi = pixels.photometric_interpretation().to_string();
        // Palette indices are looked up, not rescaled: dicom-pixeldata would return the indices.
        let palette = if spp == 1 && pi == "PALETTE COLOR" {
            Some(self.palette()?)
        } else {
            None
        };
        let modality_lut = if spp == 1 && palette.is_none() {
            self.modality_lut()?
        } else {
            None
        };
        let rescale = spp == 1 && palette.is_none() && modality_lut.is_none();
        if rescale {
            self.check_rescale()?;
        }
        let frames = pixels.number_of_frames().max(1);
        let opts = ConvertOptions::new()
            .with_modality_lut(if rescale {
                ModalityLutOption::Default
            } else {
                ModalityLutOption::None
            })
            .with_voi_lut(VoiLutOption::Identity);
        (0..frames)
            .map(|f| {
                let v: Vec<f32> = catch_decoder_panic(&self.path, || {
                    pixels
                        .to_vec_frame_with_options(f, &opts)
                        .map_err(|e| DataError::invalid(&self.path, format!("frame {f}: {e}")))
                })?;
                if v.len() != rows * cols * spp {
                    return Err(DataError::invalid(
                        &self.path,
                        format!("frame {f}: {} values for {rows}x{cols}x{spp}", v.len()),
                    ));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(DataError::invalid(
                        &self.path,
                        format!("frame {f}: NaN/Inf pixel values"),
                    ));
                }
                // Interleaved [H, W, C] -> [C, H, W].
                let mut a = Array3::from_shape_vec((rows, cols, spp), v)
                    .expect("length checked above")
                    .permuted_axes([2, 0, 1])
                    .as_standard_layout()
                    .to_owned();
                if spp == 3 && pi.starts_with("YBR_FULL") {
                    ybr_full_to_rgb(&mut a);
                }
                Ok(match (&palette, &modality_lut) {
                    (Some(p), _) => p.apply(&a),
                    (None, Some(lut)) => a.mapv(|v| lut.get(v)),
                    (None, None) => a,
                })
            })
            .collect()
    }

    /// The red, green and blue palette colour lookup tables (PS3.3 C.7.6.3.1.5–6).
    fn palette(&self) -> Result<Palette> {
        let bad = |what: String| DataError::invalid(&self.path, format!("PALETTE COLOR: {what}"));
        if self
            .obj
            .element(tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA)
            .is_ok()
        {
            return Err(DataError::Unsupported {
                path: self.path.clone(),
                what: "palette",
                value: "segmented palette colour lookup tables".into(),
            });
        }
        let mut tables = Vec::with_capacity(3);
        for (colour, descriptor, data) in [
            (
                "red",
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                "green",
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                "blue",
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
        ] {
            let (first, bits, words) =
                read_lut(&self.obj, descriptor, data).map_err(|e| bad(format!("{colour} {e}")))?;
            let entries = match bits {
                16 => words.iter().map(|&v| v as f32 / 257.0).collect(),
                8 => words.iter().map(|&v| v as f32).collect(),
                _ => return Err(bad(format!("{colour} table of {bits}-bit entries"))),
            };
            tables.push(Lut { first, entries });
        }
        Ok(Palette { tables })
    }

    /// dicom-rs's RLE decoder allocates as many offsets as a fragment's header declares segments
    /// (up to 2³²: a 17 GB allocation, whose failure aborts the process) before checking that
    /// number; RLE allows 1 to 15 segments in a 64-byte header (PS3.5 G.3.1), checked here first.
    fn check_rle_headers(&self) -> Result<()> {
        for i in 0..self.obj.number_of_fragments().unwrap_or(0) as usize {
            let Some(fragment) = self.obj.fragment(i) else {
                continue;
            };
            let segments = fragment
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            if !(fragment.len() >= 64 && matches!(segments, Some(1..=15))) {
                return Err(DataError::invalid(
                    &self.path,
                    format!(
                        "RLE frame {i}: a damaged header ({} bytes, {} segments; RLE has 1 to \
                         15 segments in a 64-byte header)",
                        fragment.len(),
                        segments.map_or("no count of".into(), |n| n.to_string())
                    ),
                ));
            }
        }
        Ok(())
    }

    /// JPEG baseline/extended grey pixel data of more than 8 bits: jpeg-decoder reads 8 only.
    fn needs_jpeg12(&self, uid: &str) -> bool {
        matches!(uid, "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51")
            && self.int_tag(tags::BITS_STORED).unwrap_or(0) > 8
            && self.int_tag(tags::SAMPLES_PER_PIXEL).unwrap_or(1) == 1
    }

    /// A copy of the object whose 12-bit JPEG frames are decoded by [`jpeg12`] into native
    /// 16-bit pixel data, so the modality LUT and the rest stay dicom-pixeldata's.
    fn with_native_jpeg12(&self) -> Result<DefaultDicomObject> {
        let info = self.info();
        if info.bits_allocated != 16 {
            return Err(DataError::invalid(
                &self.path,
                format!(
                    "12-bit JPEG with BitsAllocated {} (16 expected)",
                    info.bits_allocated
                ),
            ));
        }
        let (rows, cols) = (info.rows as usize, info.columns as usize);
        let mut samples = Vec::new();
        for f in 0..info.frames {
            let bad = |what: String| {
                DataError::invalid(&self.path, format!("frame {f} (12-bit JPEG): {what}"))
            };
            let data = self
                .obj
                .frame_pixel_data(f)
                .ok_or_else(|| bad("no pixel data for it".into()))?;
            samples.extend(catch_decoder_panic(&self.path, || {
                crate::jpeg12::decode(&data, cols, rows).map_err(bad)
            })?);
        }
        let mut obj = self.obj.clone();
        obj.update_meta(|m| m.set_transfer_syntax(&EXPLICIT_VR_LITTLE_ENDIAN));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(samples.into()),
        ));
        Ok(obj)
    }

    /// A number that Enhanced (multi-frame) objects keep in the functional group macro `group`:
    /// the top-level element, else one value per frame in the Per-frame Functional Groups, else
    /// the Shared Functional Groups (PS3.3 C.7.6.16; the order dicom-pixeldata reads them in).
    /// Every value present must be a finite number that `ok` accepts, and a per-frame value must
    /// be there for every frame: dicom-pixeldata reads an unreadable value as absent, and uses the
    /// first frame's value for all when some are missing, which gives images in the wrong units
    /// or window without a word.
    fn frame_numbers(
        &self,
        group: Tag,
        tag: Tag,
        name: &str,
        ok: fn(f64) -> bool,
        want: &str,
    ) -> Result<Option<Vec<f64>>> {
        let check = |ds: &InMemDicomObject, place: &str| -> Result<Option<f64>> {
            match number_in(ds, tag) {
                None => Ok(None),
                Some((_, Some(v))) if ok(v) => Ok(Some(v)),
                Some((text, _)) => Err(DataError::invalid(
                    &self.path,
                    format!("{name} {tag}{place} is '{text}', not {want}"),
                )),
            }
        };
        if let Some(v) = check(&self.obj, "")? {
            return Ok(Some(vec![v]));
        }
        let items = |seq: Tag| {
            self.obj
                .element(seq)
                .ok()
                .and_then(|e| e.items())
                .unwrap_or_default()
        };
        let per_frame = items(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
            .iter()
            .enumerate()
            .map(|(i, item)| match macro_in(item, group) {
                Some(m) => check(m, &format!(" in frame {}'s functional groups", i + 1)),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let given = per_frame.iter().flatten().count();
        if given > 0 {
            let frames = self.int_tag(tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
            if given != frames || per_frame.len() != frames {
                return Err(DataError::invalid(
                    &self.path,
                    format!(
                        "{name} {tag} is given for {given} of {frames} frames in the \
                         per-frame functional groups (5200,9230)"
                    ),
                ));
            }
            return Ok(Some(per_frame.into_iter().flatten().collect()));
        }
        // Some writers put the attribute flat in the shared item; dicom-pixeldata reads it there.
        let Some(shared) = items(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).first() else {
            return Ok(None);
        };
        let place = " in the shared functional groups";
        if let Some(v) = macro_in(shared, group)
            .map(|m| check(m, place))
            .transpose()?
            .flatten()
        {
            return Ok(Some(vec![v]));
        }
        Ok(check(shared, place)?.map(|v| vec![v]))
    }

    /// The modality LUT's slope and intercept; a zero slope maps every pixel to the intercept.
    fn check_rescale(&self) -> Result<()> {
        let pvt = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
        let nonzero = "a non-zero number";
        self.frame_numbers(
            pvt,
            tags::RESCALE_SLOPE,
            "RescaleSlope",
            |v| v != 0.0,
            nonzero,
        )?;
        let any = |_| true;
        self.frame_numbers(
            pvt,
            tags::RESCALE_INTERCEPT,
            "RescaleIntercept",
            any,
            "a number",
        )?;
        Ok(())
    }

    /// The first table of a LUT sequence (modality or VOI LUT, PS3.3 C.11.1, C.11.2): its first
    /// mapped value and one value per entry.
    fn table(&self, seq: Tag, name: &str) -> Result<Option<(i64, Vec<u16>)>> {
        let Some(item) = (self.obj.element(seq).ok())
            .and_then(|e| e.items())
            .and_then(|items| items.first())
        else {
            return Ok(None);
        };
        let bad = |what: String| DataError::invalid(&self.path, format!("{name} {seq}: {what}"));
        let (first, bits, values) =
            read_lut(item, tags::LUT_DESCRIPTOR, tags::LUT_DATA).map_err(bad)?;
        if !(8..=16).contains(&bits) {
            return Err(bad(format!("{bits}-bit entries (8 to 16 expected)")));
        }
        Ok(Some((first, values)))
    }

    /// The file's modality LUT table, in place of RescaleSlope/Intercept (as pydicom's
    /// apply_modality_lut); dicom-pixeldata ignores it and returned the stored values.
    fn modality_lut(&self) -> Result<Option<Lut>> {
        let table = self.table(tags::MODALITY_LUT_SEQUENCE, "Modality LUT sequence")?;
        Ok(table.map(|(first, values)| Lut {
            first,
            entries: values.iter().map(|&v| v as f32).collect(),
        }))
    }

    /// The file's VOI LUT table, its entries scaled to [0, 1] by their own range: a VOI LUT maps
    /// onto the display's whole range, and the bits per entry its descriptor declares are often
    /// wrong in real files (16 for 12-bit data).
    fn voi_lut(&self) -> Result<Option<Lut>> {
        let Some((first, values)) = self.table(tags::VOILUT_SEQUENCE, "VOI LUT sequence")? else {
            return Ok(None);
        };
        let lo = *values.iter().min().expect("a table has entries");
        let hi = *values.iter().max().expect("a table has entries");
        if lo == hi {
            return Err(DataError::invalid(
                &self.path,
                format!("VOI LUT sequence (0028,3010): every entry is {lo}: the image would be one grey"),
            ));
        }
        let scale = (hi - lo) as f32;
        let entries = values.iter().map(|&v| (v - lo) as f32 / scale).collect();
        Ok(Some(Lut { first, entries }))
    }

    /// The file's VOI windows (center, width): one for every frame, or one per frame. A width
    /// below 1 (DICOM's minimum, PS3.3 C.11.2.1.2) would threshold the image to black and white.
    fn file_windows(&self) -> Result<Option<Vec<(f64, f64)>>> {
        const WANT: &str = "a number ≥ 1 (choose a window instead of the file's)";
        let voi = tags::FRAME_VOILUT_SEQUENCE;
        let any = |_| true;
        let centers =
            self.frame_numbers(voi, tags::WINDOW_CENTER, "WindowCenter", any, "a number")?;
        let widths =
            self.frame_numbers(voi, tags::WINDOW_WIDTH, "WindowWidth", |v| v >= 1.0, WANT)?;
        Ok(centers.zip(widths).map(|(c, w)| {
            (0..c.len().max(w.len()))
                .map(|f| (c[f.min(c.len() - 1)], w[f.min(w.len() - 1)]))
                .collect()
        }))
    }

    /// Pixel Padding Value (0028,0120), up to the Pixel Padding Range Limit (0028,0121) when
    /// given: stored values that mark pixels outside the image (CT's corners outside the field
    /// of view, 21 % of 693_UNCR.dcm), as a range of modality values (through the modality LUT
    /// table, else the first frame's rescale).
    fn padding(&self) -> Result<Option<(f32, f32)>> {
        let Some(pad) = self.int_tag(tags::PIXEL_PADDING_VALUE) else {
            return Ok(None);
        };
        let limit = self.int_tag(tags::PIXEL_PADDING_RANGE_LIMIT).unwrap_or(pad);
        let (a, b) = match self.modality_lut()? {
            Some(lut) => (lut.get(pad as f32), lut.get(limit as f32)),
            None => {
                let (m, c) = self.first_rescale();
                ((pad as f64 * m + c) as f32, (limit as f64 * m + c) as f32)
            }
        };
        Ok(Some((a.min(b), a.max(b))))
    }

    /// How the file's window maps values (VOI LUT Function, top level or in the functional
    /// groups' Frame VOI LUT macro).
    fn voi_function(&self) -> Result<VoiFunction> {
        let in_groups = |seq: Tag| {
            let item = self.obj.element(seq).ok()?.items()?.first()?;
            text_in(
                macro_in(item, tags::FRAME_VOILUT_SEQUENCE)?,
                tags::VOILUT_FUNCTION,
            )
        };
        let text = (self.str_tag(tags::VOILUT_FUNCTION))
            .or_else(|| in_groups(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE))
            .or_else(|| in_groups(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE))
            .unwrap_or_default();
        if text.is_empty() {
            return Ok(VoiFunction::Linear);
        }
        match VoiFunction::ALL.into_iter().find(|f| f.name() == text) {
            Some(f) => Ok(f),
            None => Err(DataError::Unsupported {
                path: self.path.clone(),
                what: "VOI LUT Function (0028,1056)",
                value: format!("'{text}' (LINEAR, LINEAR_EXACT or SIGMOID expected)"),
            }),
        }
    }

    /// Every frame as a [0, 1] image: window, then MONOCHROME1 inverted so that bright = dense.
    pub fn images(&self, window: &Window) -> Result<Vec<Image>> {
        // Not `info()`: that also parses every lookup table, which this reads once below.
        let photometric = self.str_tag(tags::PHOTOMETRIC_INTERPRETATION);
        let grey_file = self.int_tag(tags::SAMPLES_PER_PIXEL).unwrap_or(1) == 1;
        let bits_stored = self.int_tag(tags::BITS_STORED).unwrap_or(0) as u32;
        let anatomy = self
            .str_tag(tags::BODY_PART_EXAMINED)
            .map(|s| s.to_lowercase());
        let palette = photometric.as_deref() == Some("PALETTE COLOR");
        let file_voi = *window == Window::File && grey_file && !palette;
        let voi_lut = if file_voi { self.voi_lut()? } else { None };
        let file_windows = if file_voi && voi_lut.is_none() {
            self.file_windows()?
        } else {
            None
        };
        let function = if file_windows.is_some() {
            self.voi_function()?
        } else {
            VoiFunction::Linear
        };
        let percentiles = match window {
            Window::Percentile(..) => true,
            Window::File => file_voi && voi_lut.is_none() && file_windows.is_none(),
            _ => false,
        };
        let padding = if percentiles && grey_file && !palette {
            self.padding()?
        } else {
            None
        };
        let frames = self.modality_frames()?;
        let n = frames.len();
        let modality = self.modality();
        let mono1 = photometric.as_deref() == Some("MONOCHROME1");
        let path = self.path.display().to_string();
        Ok(frames
            .into_iter()
            .enumerate()
            .map(|(f, mut a)| {
                let grey = a.dim().0 == 1;
                let vals = a.as_slice_mut().expect("standard layout");
                if grey {
                    // Padding is left out of the percentiles (NaN) and black in the image.
                    let pad: Vec<usize> = match padding {
                        Some((lo, hi)) => (vals.iter().enumerate())
                            .filter(|(_, v)| (lo..=hi).contains(*v))
                            .map(|(i, _)| i)
                            .collect(),
                        None => vec![],
                    };
                    pad.iter().for_each(|&i| vals[i] = f32::NAN);
                    match window {
                        Window::File => match (&voi_lut, &file_windows) {
                            (Some(lut), _) => vals.iter_mut().for_each(|v| *v = lut.get(*v)),
                            (None, Some(w)) => {
                                let (c, w) = w[f.min(w.len() - 1)];
                                function.apply(vals, c as f32, w as f32)
                            }
                            (None, None) => percentile_normalize(vals, 1.0, 99.0),
                        },
                        Window::Preset(_, c, w) => apply_window(vals, *c, *w),
                        Window::Custom { center, width } => apply_window(vals, *center, *width),
                        Window::Percentile(lo, hi) => percentile_normalize(vals, *lo, *hi),
                    }
                    if mono1 {
                        vals.iter_mut().for_each(|v| *v = 1.0 - *v);
                    }
                    pad.iter().for_each(|&i| vals[i] = 0.0);
                } else {
                    // Palette colours come on the 0–255 scale, whatever the index depth.
                    let max = if bits_stored > 8 && !palette {
                        ((1u32 << bits_stored) - 1) as f32
                    } else {
                        255.0
                    };
                    vals.iter_mut()
                        .for_each(|v| *v = (*v / max).clamp(0.0, 1.0));
                }
                let id = if n > 1 {
                    format!("{path}#{f}")
                } else {
                    path.clone()
                };
                Image {
                    data: a,
                    meta: Meta {
                        id,
                        modality,
                        anatomy: anatomy.clone(),
                        labels: vec![],
                    },
                }
            })
            .collect())
    }
}

/// How a VOI window maps values to [0, 1] (VOI LUT Function, PS3.3 C.11.2.1.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

impl VoiFunction {
    const ALL: [Self; 3] = [Self::Linear, Self::LinearExact, Self::Sigmoid];

    fn name(self) -> &'static str {
        match self {
            Self::Linear => "LINEAR",
            Self::LinearExact => "LINEAR_EXACT",
            Self::Sigmoid => "SIGMOID",
        }
    }

    fn apply(self, vals: &mut [f32], center: f32, width: f32) {
        let (c, w) = (center, width);
        match self {
            Self::Linear => apply_window(vals, c, w),
            Self::LinearExact => {
                let lo = c - w / 2.0;
                vals.iter_mut()
                    .for_each(|v| *v = ((*v - lo) / w).clamp(0.0, 1.0));
            }
            Self::Sigmoid => vals
                .iter_mut()
                .for_each(|v| *v = 1.0 / (1.0 + (-4.0 * (*v - c) / w).exp())),
        }
    }
}

/// A lookup table as DICOM stores palettes and VOI LUTs: input values from `first` on index
/// `entries`; values below take the first entry, above the last (PS3.3 C.7.6.3.1.5, C.11.2.1.1).
struct Lut {
    first: i64,
    entries: Vec<f32>,
}

impl Lut {
    fn get(&self, v: f32) -> f32 {
        let last = self.entries.len() as i64 - 1;
        self.entries[(v.floor() as i64 - self.first).clamp(0, last) as usize]
    }
}

/// A lookup table's descriptor (entries, 0 meaning 65 536; first mapped value; bits per entry)
/// and its data, as (first mapped value, bits, one value per entry). The parser reads the
/// descriptor as SS when the pixel data are signed (the first mapped value may then be
/// negative), so the entry count is taken modulo 2^16. 8-bit entries come one per 16-bit word,
/// or two per word, low byte first.
fn read_lut(
    ds: &InMemDicomObject,
    descriptor: Tag,
    data: Tag,
) -> std::result::Result<(i64, i64, Vec<u16>), String> {
    let d: Vec<i64> = ds
        .element(descriptor)
        .ok()
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .filter(|d| d.len() == 3)
        .ok_or("lookup table descriptor missing or unreadable")?;
    let entries = if d[0] == 0 {
        65536
    } else {
        d[0] as usize & 0xffff
    };
    let (first, bits) = (d[1], d[2]);
    // OW data arrives as 16-bit words; a file whose VR was not known gives bytes.
    let words: Vec<u16> = match ds.element(data).ok().map(|e| e.value()) {
        Some(dicom_core::DicomValue::Primitive(PrimitiveValue::U16(w))) => w.to_vec(),
        Some(dicom_core::DicomValue::Primitive(PrimitiveValue::U8(b))) if bits == 8 => {
            b.iter().map(|&v| v as u16).collect()
        }
        Some(dicom_core::DicomValue::Primitive(PrimitiveValue::U8(b))) => b
            .chunks_exact(2)
            .map(|w| u16::from_le_bytes([w[0], w[1]]))
            .collect(),
        _ => return Err("lookup table data missing".into()),
    };
    let values = if words.len() == entries {
        words
            .iter()
            .map(|&v| if bits == 8 { v & 0xff } else { v })
            .collect()
    } else if bits == 8 && words.len() == entries.div_ceil(2) {
        let bytes = words.iter().flat_map(|w| w.to_le_bytes());
        bytes.take(entries).map(u16::from).collect()
    } else {
        return Err(format!(
            "table of {entries} entries holds {} values",
            words.len()
        ));
    };
    Ok((first, bits, values))
}

/// Palette colour lookup tables for red, green and blue, entries on the 0–255 scale.
struct Palette {
    tables: Vec<Lut>,
}

impl Palette {
    /// [1, H, W] indices to [3, H, W] RGB on the 0–255 scale; indices below the first mapped
    /// value take the first entry, above the last the last (PS3.3 C.7.6.3.1.5).
    fn apply(&self, idx: &Array3<f32>) -> Array3<f32> {
        let (_, h, w) = idx.dim();
        let mut out = Array3::zeros((3, h, w));
        for (c, lut) in self.tables.iter().enumerate() {
            for (o, &i) in out
                .index_axis_mut(ndarray::Axis(0), c)
                .iter_mut()
                .zip(idx.iter())
            {
                *o = lut.get(i);
            }
        }
        out
    }
}

/// `e` and its causes, "a: b: c": dicom-pixeldata's top-level message ("Could not decode pixel
/// data") leaves out what the codec said.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

/// YBR_FULL (ITU-R BT.601 full range) to RGB, in place on [3, H, W] 8-bit-range values.
fn ybr_full_to_rgb(a: &mut Array3<f32>) {
    let (_, h, w) = a.dim();
    for i in 0..h {
        for j in 0..w {
            let (y, cb, cr) = (a[[0, i, j]], a[[1, i, j]] - 128.0, a[[2, i, j]] - 128.0);
            a[[0, i, j]] = (y + 1.402 * cr).clamp(0.0, 255.0);
            a[[1, i, j]] = (y - 0.344136 * cb - 0.714136 * cr).clamp(0.0, 255.0);
            a[[2, i, j]] = (y + 1.772 * cb).clamp(0.0, 255.0);
        }
    }
}

/// SOP classes whose objects hold no radiological image: (UID or UID prefix, what they are).
/// RT Image (…481.1) is an image; the other RT objects, dose grids included, are not.
const NON_IMAGE_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.3.10", "a DICOMDIR"),
    (
        "1.2.840.10008.5.1.4.1.1.88",
        "a structured report or key object selection",
    ),
    ("1.2.840.10008.5.1.4.1.1.11", "a presentation state"),
    (
        "1.2.840.10008.5.1.4.1.1.66",
        "a segmentation, registration or raw-data object",
    ),
    ("1.2.840.10008.5.1.4.1.1.67", "a real-world value mapping"),
    ("1.2.840.10008.5.1.4.1.1.104", "an encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9", "a waveform"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "an RT dose grid"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "an RT structure set"),
    ("1.2.840.10008.5.1.4.1.1.481.4", "an RT treatment record"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "an RT plan"),
    ("1.2.840.10008.5.1.4.1.1.481.6", "an RT treatment record"),
    ("1.2.840.10008.5.1.4.1.1.481.7", "an RT treatment summary"),
    ("1.2.840.10008.5.1.4.1.1.481.8", "an RT plan"),
    ("1.2.840.10008.5.1.4.1.1.481.9", "an RT treatment record"),
];

/// What the DICOM file at `path` is when its file meta names a SOP class that holds no image
/// (a DICOMDIR, report, presentation state, segmentation, RT plan, …): folder scans skip these
/// instead of failing on them. Reads only the preamble and the meta group; `None` for image
/// objects and for files whose meta cannot be read (the reader then says why).
pub fn non_image_object(path: &Path) -> Option<&'static str> {
    use std::io::{Read, Seek, SeekFrom};
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut f = std::io::BufReader::new(file);
    f.seek(SeekFrom::Start(128)).ok()?;
    if meta_overrun(&mut f, len).is_some() {
        return None;
    }
    f.seek(SeekFrom::Start(128)).ok()?;
    let meta = dicom_object::meta::FileMetaTable::from_reader(f.by_ref()).ok()?;
    let uid = meta.media_storage_sop_class_uid();
    NON_IMAGE_SOP_CLASSES
        .iter()
        .find(|(class, _)| {
            uid.strip_prefix(class)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .map(|(_, what)| *what)
}

/// Cheap check used when scanning folders: the "DICM" magic at byte 128.
pub fn looks_like_dicom(path: &Path) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|_| &buf[128..] == b"DICM")
        .unwrap_or(false)
}
