mod common;
use common::{data, tmpdir};
use omnirad_data::dicom::{DicomFile, Window};
use omnirad_data::DataError;

fn frames(name: &str) -> Vec<ndarray::Array3<f32>> {
    DicomFile::open(data(&format!("dicom-pydicom/{name}")))
        .unwrap()
        .modality_frames()
        .unwrap()
}

#[test]
fn ct_values_are_hounsfield_units() {
    // Reference statistics computed with pydicom 3.0 (pixel_array * slope + intercept).
    // (file, min, max, fraction of air in (-1100, -900), fraction of soft tissue in [0, 80])
    for (name, min_ref, max_ref, air_ref, soft_ref) in [
        ("CT_small.dcm", -896.0, 1167.0, 0.0, 0.286499),
        ("693_UNCR.dcm", -3024.0, 1468.0, 0.431450, 0.216045),
    ] {
        let f = frames(name);
        let v = f[0].as_slice().unwrap();
        let min = v.iter().cloned().fold(f32::MAX, f32::min);
        let max = v.iter().cloned().fold(f32::MIN, f32::max);
        let frac = |lo: f32, hi: f32| {
            v.iter().filter(|x| (lo..=hi).contains(*x)).count() as f64 / v.len() as f64
        };
        assert_eq!((min, max), (min_ref, max_ref), "{name}");
        assert!(
            (frac(-1099.5, -900.5) - air_ref).abs() < 1e-5,
            "{name}: air fraction"
        );
        assert!(
            (frac(0.0, 80.0) - soft_ref).abs() < 1e-5,
            "{name}: soft-tissue fraction"
        );
    }
}

#[test]
fn monochrome1_is_inverted_so_dense_is_bright() {
    let file = DicomFile::open(data("dicom-pydicom/RG3_UNCR.dcm")).unwrap();
    assert_eq!(file.info().photometric_interpretation, "MONOCHROME1");
    let raw = &file.modality_frames().unwrap()[0];
    let img = &file.images(&Window::Percentile(0.0, 100.0)).unwrap()[0];
    let (r, o) = (raw.as_slice().unwrap(), img.data.as_slice().unwrap());
    let n = r.len() as f64;
    let (mr, mo) = (
        r.iter().map(|&x| x as f64).sum::<f64>() / n,
        o.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let cov: f64 = r
        .iter()
        .zip(o)
        .map(|(&a, &b)| (a as f64 - mr) * (b as f64 - mo))
        .sum();
    let vr: f64 = r.iter().map(|&a| (a as f64 - mr).powi(2)).sum();
    let vo: f64 = o.iter().map(|&b| (b as f64 - mo).powi(2)).sum();
    let corr = cov / (vr * vo).sqrt();
    assert!(corr < -0.99, "correlation raw vs output {corr}");
}

#[test]
fn lossless_twins_decode_to_identical_pixels() {
    let groups: &[&[&str]] = &[
        &["693_UNCR.dcm", "693_J2KR.dcm"],
        &["RG3_UNCR.dcm", "RG3_J2KR.dcm"],
        &["MR2_UNCR.dcm", "MR2_J2KR.dcm"],
        &[
            "MR_small.dcm",
            "MR_small_RLE.dcm",
            "MR_small_bigendian.dcm",
            "MR_small_implicit.dcm",
            "MR_small_jp2klossless.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
        ],
        &[
            "emri_small.dcm",
            "emri_small_RLE.dcm",
            "emri_small_jpeg_2k_lossless.dcm",
        ],
        &["US1_UNCR.dcm", "US1_J2KR.dcm"],
        // Lossy J2K whose decoded pixels pydicom's references hold equal to the uncompressed file.
        &["JPEG2000_UNC.dcm", "JPEG2000.dcm"],
    ];
    for g in groups {
        let reference = frames(g[0]);
        for other in &g[1..] {
            let f = frames(other);
            assert_eq!(f.len(), reference.len(), "{other}: frame count");
            for (a, b) in f.iter().zip(&reference) {
                assert_eq!(a.dim(), b.dim(), "{other}: shape");
                let max = a
                    .iter()
                    .zip(b.iter())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(max < 1e-3, "{other} differs from {} by up to {max}", g[0]);
            }
        }
    }
    assert_eq!(frames("emri_small.dcm").len(), 10);
}

#[test]
fn lossy_jpeg2000_is_close_to_the_original() {
    for (orig, lossy) in [
        ("RG3_UNCR.dcm", "RG3_J2KI.dcm"),
        ("693_UNCR.dcm", "693_J2KI.dcm"),
    ] {
        let (a, b) = (&frames(orig)[0], &frames(lossy)[0]);
        let range =
            a.iter().cloned().fold(f32::MIN, f32::max) - a.iter().cloned().fold(f32::MAX, f32::min);
        let mad = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / a.len() as f32;
        println!("{lossy}: mean abs diff {mad} of range {range}");
        assert!(
            mad / range < 0.02,
            "{lossy}: mean abs diff {mad} vs range {range}"
        );
    }
}

#[test]
fn colour_and_window_presets() {
    let rgb = DicomFile::open(data("dicom-pydicom/SC_rgb_rle.dcm"))
        .unwrap()
        .images(&Window::File)
        .unwrap();
    let ybr = DicomFile::open(data("dicom-pydicom/SC_rgb_jpeg_dcmtk.dcm"))
        .unwrap()
        .images(&Window::File)
        .unwrap();
    assert_eq!(rgb[0].data.dim(), (3, 100, 100));
    assert_eq!(ybr[0].data.dim(), (3, 100, 100));
    let mad = rgb[0]
        .data
        .iter()
        .zip(ybr[0].data.iter())
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / 30000.0;
    assert!(mad < 0.05, "JPEG YBR and RLE RGB versions differ by {mad}");

    let ct = DicomFile::open(data("dicom-pydicom/693_UNCR.dcm")).unwrap();
    let lung = &ct.images(&Window::parse("lung").unwrap()).unwrap()[0];
    let bone = &ct.images(&Window::parse("400,1800").unwrap()).unwrap()[0];
    assert!(lung.data.iter().all(|v| (0.0..=1.0).contains(v)));
    // Air is black in both; soft tissue is brighter in the lung window than in the bone window.
    assert!(lung.data.mean().unwrap() > bone.data.mean().unwrap());
    for (bad, why) in [
        ("nonsense", "use 'file', one of lung, mediastinum"),
        ("40,-5", "a width > 0"),
        ("40,inf", "a width > 0"),
        ("pct:90,10", "0 ≤ LO < HI ≤ 100"),
        ("pct:1", "expected pct:LO,HI"),
    ] {
        let e = Window::parse(bad).unwrap_err();
        assert!(e.contains(&format!("'{bad}'")) && e.contains(why), "{e}");
    }
    assert_eq!(
        Window::parse("pct:1,99").unwrap(),
        Window::Percentile(1.0, 99.0)
    );
}

/// MR_small_jpeg_ls_lossless.dcm with its one JPEG-LS stream replaced by `stream` and its
/// transfer syntax UID ending in `ts` ("80" lossless, "81" near-lossless).
fn with_jpeg_ls_stream(stream: &[u8], ts: &str) -> Vec<u8> {
    let bytes = std::fs::read(data("dicom-pydicom/MR_small_jpeg_ls_lossless.dcm")).unwrap();
    let uid = b"1.2.840.10008.1.2.4.80";
    let at = bytes.windows(uid.len()).position(|w| w == uid).unwrap();
    let pixel_data = [0xe0, 0x7f, 0x10, 0x00];
    let px = bytes.windows(4).position(|w| w == pixel_data).unwrap();
    let mut f = bytes[..px].to_vec();
    f[at + uid.len() - 2..at + uid.len()].copy_from_slice(ts.as_bytes());
    f.extend_from_slice(&[
        0xe0, 0x7f, 0x10, 0x00, b'O', b'B', 0, 0, 0xff, 0xff, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0, 0, 0, 0]); // empty offset table
    let mut s = stream.to_vec();
    if s.len() % 2 == 1 {
        s.push(0);
    }
    f.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0]);
    f.extend_from_slice(&(s.len() as u32).to_le_bytes());
    f.extend_from_slice(&s);
    f.extend_from_slice(&[0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0]); // sequence delimiter
    f
}

/// The JPEG-LS stream of MR_small_jpeg_ls_lossless.dcm (SOI to EOI).
fn jpeg_ls_stream() -> Vec<u8> {
    let bytes = std::fs::read(data("dicom-pydicom/MR_small_jpeg_ls_lossless.dcm")).unwrap();
    let soi = bytes
        .windows(4)
        .position(|w| w == [0xff, 0xd8, 0xff, 0xf7])
        .unwrap();
    let eoi = bytes.windows(2).rposition(|w| w == [0xff, 0xd9]).unwrap();
    bytes[soi..eoi + 2].to_vec()
}

#[test]
fn near_lossless_jpeg_ls_stays_within_its_error_bound() {
    // MR_small's signed 16-bit samples, re-encoded with NEAR = 3 (transfer syntax .81).
    let reference = frames("MR_small.dcm");
    let samples: Vec<u16> = reference[0].iter().map(|&v| v as i16 as u16).collect();
    let mut opts = jpegls::EncodeOptions::default();
    opts.near = 3;
    opts.precision = Some(16);
    let mut stream = Vec::new();
    jpegls::encode_with_options(&samples, 64, 64, &opts, &mut stream).unwrap();
    let dir_guard = tmpdir("jpeg-ls-near");
    let dir = dir_guard.path();
    let p = dir.join("near.dcm");
    std::fs::write(&p, with_jpeg_ls_stream(&stream, "81")).unwrap();
    let file = DicomFile::open(&p).unwrap();
    assert!(file.info().transfer_syntax.contains("Near-Lossless"));
    let got = &file.modality_frames().unwrap()[0];
    let err = got
        .iter()
        .zip(reference[0].iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err <= 3.0 && err > 0.0, "max error {err} (NEAR = 3)");
}

#[test]
fn corrupt_jpeg_ls_streams_are_clear_errors() {
    let dir_guard = tmpdir("jpeg-ls-bad");
    let dir = dir_guard.path();
    let stream = jpeg_ls_stream();
    // SOF55 (FF F7): length (2), precision (1), height (2), width (2).
    let sof = stream.windows(2).position(|w| w == [0xff, 0xf7]).unwrap();
    let mut narrow = stream.clone();
    narrow[sof + 7..sof + 9].copy_from_slice(&32u16.to_be_bytes());
    let mut cut = stream[..stream.len() / 2].to_vec();
    cut.extend_from_slice(&[0xff, 0xd9]);
    for (name, bytes, want) in [
        ("narrow.dcm", narrow, "dimension mismatch"),
        ("cut.dcm", cut, "truncated"),
        ("empty.dcm", vec![0xff, 0xd8, 0xff, 0xd9], "unexpected end"),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, with_jpeg_ls_stream(&bytes, "80")).unwrap();
        let err = DicomFile::open(&p)
            .and_then(|f| f.modality_frames())
            .expect_err(name)
            .to_string();
        assert!(
            err.contains(name) && err.contains("JPEG-LS") && err.contains(want),
            "{err}"
        );
    }
    // Random damage to the scan: an error or an image, never a panic or an abort.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in 0..40 {
        let mut bytes = stream.clone();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = 30 + (state as usize) % (bytes.len() - 32);
            bytes[at] = (state >> 32) as u8;
        }
        let p = dir.join(format!("flip{i}.dcm"));
        std::fs::write(&p, with_jpeg_ls_stream(&bytes, "80")).unwrap();
        if let Err(e) = DicomFile::open(&p).and_then(|f| f.modality_frames()) {
            assert!(e.to_string().contains(&format!("flip{i}.dcm")), "{e}");
        }
    }
}

#[test]
fn truncated_and_non_dicom_files_are_clear_errors() {
    let dir_guard = tmpdir("dicom-bad");
    let dir = dir_guard.path();
    let bytes = std::fs::read(data("dicom-pydicom/CT_small.dcm")).unwrap();
    let cut = dir.join("truncated.dcm");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let res = DicomFile::open(&cut).and_then(|f| f.modality_frames());
    let msg = res.expect_err("truncated file must fail").to_string();
    assert!(msg.contains("truncated.dcm"), "{msg}");

    let txt = dir.join("notes.dcm");
    std::fs::write(&txt, b"this is not a DICOM file").unwrap();
    let err = DicomFile::open(&txt).err().unwrap();
    assert!(
        matches!(err, DataError::Format { .. }) && err.to_string().contains("notes.dcm"),
        "{err}"
    );
}

#[test]
fn a_length_field_past_the_end_of_the_file_is_an_error_before_any_allocation() {
    // dicom-object reserves and zero-fills a value's declared length before reading it: one
    // damaged length field made a 9.7 kB file cost 3.9 GB and 6.8 s, and a folder of
    // such files run in parallel could exhaust a laptop's memory. Each length here is 0xF0000000.
    let dir_guard = tmpdir("dicom-length");
    let dir = dir_guard.path();
    let damaged = |file: &str, marker: &[u8], from: usize, len_at: usize, out: &str| {
        let mut b = std::fs::read(data(&format!("dicom-pydicom/{file}"))).unwrap();
        let i = from
            + b[from..]
                .windows(marker.len())
                .position(|w| w == marker)
                .unwrap();
        b[i + len_at..i + len_at + 4].copy_from_slice(&0xF000_0000u32.to_le_bytes());
        let p = dir.join(out);
        std::fs::write(&p, &b).unwrap();
        (p, i + len_at + 4)
    };
    let cases = [
        // SOP Class UID (0008,0016) in an implicit-VR data set: 4-byte length after the tag.
        damaged(
            "MR_small_implicit.dcm",
            &[8, 0, 0x16, 0],
            132 + 100,
            4,
            "implicit.dcm",
        ),
        // Pixel Data (7FE0,0010) OW: explicit VR, 4-byte length after 2 reserved bytes.
        damaged(
            "CT_small.dcm",
            &[0xe0, 0x7f, 0x10, 0, b'O', b'W'],
            1000,
            8,
            "pixels.dcm",
        ),
        // File Meta Information Version (0002,0001) OB in the file meta group.
        damaged(
            "CT_small.dcm",
            &[2, 0, 1, 0, b'O', b'B'],
            128,
            8,
            "meta.dcm",
        ),
    ];
    for (p, value_at) in cases {
        let len = std::fs::metadata(&p).unwrap().len();
        let err = DicomFile::open(&p).err().expect("must fail").to_string();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains(name)
                && err.contains(&format!(
                    "the DICOM element at byte {value_at} declares 4026531840 bytes, past the \
                     end of the {len}-byte file"
                )),
            "{err}"
        );
    }
    // Reading the header alone (frame counts for batching) stops at the pixel data, and checks
    // what comes before it.
    let count = |name: &str| DicomFile::frame_count(dir.join(name));
    assert!(count("implicit.dcm")
        .unwrap_err()
        .to_string()
        .contains("declares"));
    assert!(count("meta.dcm")
        .unwrap_err()
        .to_string()
        .contains("declares"));
    assert_eq!(count("pixels.dcm").unwrap(), 1);
}

#[test]
fn deeply_nested_sequences_are_an_error_not_a_stack_overflow() {
    // MR_small.dcm's file meta group (explicit VR little endian), then sequences of undefined
    // length each opening an item of undefined length, 200 000 deep: before the check,
    // dicom-object's recursive reader overflowed the stack and the whole process aborted.
    let bytes = std::fs::read(data("dicom-pydicom/MR_small.dcm")).unwrap();
    let meta_len = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let open = |depth: usize| {
        let mut level = Vec::new();
        level.extend_from_slice(&[0x08, 0x00, 0x15, 0x11]); // (0008,1115)
        level.extend_from_slice(b"SQ\0\0");
        level.extend_from_slice(&[0xff; 4]); // undefined length
        level.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]); // item
        let mut f = bytes[..144 + meta_len].to_vec();
        f.extend(level.repeat(depth));
        f
    };
    let dir_guard = tmpdir("dicom-depth");
    let dir = dir_guard.path();
    let deep = dir.join("deep.dcm");
    std::fs::write(&deep, open(200_000)).unwrap();
    let err = DicomFile::open(&deep).err().expect("must fail").to_string();
    assert!(
        err.contains("deep.dcm") && err.contains("nested more than 128 deep"),
        "{err}"
    );
    // Nesting within the limit reaches dicom-object, which reports the unfinished data set.
    std::fs::write(&deep, open(100)).unwrap();
    let err = DicomFile::open(&deep).err().expect("must fail").to_string();
    assert!(
        err.contains("deep.dcm") && !err.contains("nested more than"),
        "{err}"
    );
}

/// `name`'s bytes with the explicit-VR little-endian DS element `tag` (group, element) holding
/// `ds` instead of its value.
fn with_ds(name: &str, tag: [u16; 2], ds: &str) -> Vec<u8> {
    let bytes = std::fs::read(data(&format!("dicom-pydicom/{name}"))).unwrap();
    let [g, e] = [tag[0].to_le_bytes(), tag[1].to_le_bytes()];
    let head = [g[0], g[1], e[0], e[1], b'D', b'S'];
    let at = bytes.windows(6).position(|w| w == head).unwrap();
    let len = u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as usize;
    let mut f = bytes[..at + 6].to_vec();
    f.extend((ds.len() as u16).to_le_bytes());
    f.extend(ds.as_bytes());
    f.extend(&bytes[at + 8 + len..]);
    f
}

#[test]
fn unreadable_or_zero_rescale_slopes_are_errors() {
    // CT_small.dcm with its RescaleSlope (0028,1053, DS "1 ") rewritten. dicom-pixeldata read
    // the first three as absent (slope 1: plausible HU from a broken header), and a slope of 0
    // gave a constant image.
    let dir_guard = tmpdir("dicom-slope");
    let dir = dir_guard.path();
    let with_slope = |ds: &str| {
        let p = dir.join("slope.dcm");
        std::fs::write(&p, with_ds("CT_small.dcm", [0x28, 0x1053], ds)).unwrap();
        DicomFile::open(&p).unwrap().modality_frames()
    };
    for ds in ["abc ", "1e400 ", "NaN ", "0 "] {
        let e = with_slope(ds).expect_err(ds).to_string();
        assert!(
            e.contains("slope.dcm")
                && e.contains(&format!("RescaleSlope (0028,1053) is '{}'", ds.trim())),
            "{ds}: {e}"
        );
    }
    // A readable slope still applies: twice the raw values, the same intercept.
    let one = frames("CT_small.dcm")[0].clone();
    let two = with_slope("2 ").unwrap()[0].clone();
    assert!(two
        .iter()
        .zip(one.iter())
        .all(|(t, o)| *t == 2.0 * (o + 1024.0) - 1024.0));
}

#[test]
fn a_file_window_narrower_than_one_or_unreadable_is_an_error() {
    // MR_small.dcm with its WindowWidth (0028,1051, DS "1600") rewritten: a width of 0 or -5
    // thresholded the image to black and white, "abc" fell back to percentiles unsaid.
    let dir_guard = tmpdir("dicom-window");
    let dir = dir_guard.path();
    let p = dir.join("window.dcm");
    let with_width = |ds: &str, window: &Window| {
        std::fs::write(&p, with_ds("MR_small.dcm", [0x28, 0x1051], ds)).unwrap();
        DicomFile::open(&p).unwrap().images(window)
    };
    for ds in ["0 ", "-5", "abc ", "1e400 "] {
        let e = with_width(ds, &Window::File).expect_err(ds).to_string();
        assert!(
            e.contains("window.dcm")
                && e.contains(&format!("WindowWidth (0028,1051) is '{}'", ds.trim())),
            "{ds}: {e}"
        );
        // A window chosen by the user does not read the file's.
        assert!(with_width(ds, &Window::Percentile(1.0, 99.0)).is_ok());
    }
    assert!(with_width("1600", &Window::File).is_ok());
}

#[test]
fn an_rle_header_with_too_many_segments_is_an_error_not_an_abort() {
    // dicom-rs's RLE decoder allocates one offset per declared segment before checking the
    // count: 0xFFFF0002 segments ask for 17 GB. Where that allocation failed (a laptop, a memory
    // limit: `ulimit -v 16000000` here) the process aborted; where it succeeded, the decoder
    // panicked on the slice after it.
    let dir_guard = tmpdir("dicom-rle-header");
    let mut rle = std::fs::read(data("dicom-pydicom/MR_small_RLE.dcm")).unwrap();
    let item = rle
        .windows(4)
        .rposition(|w| w == [0xfe, 0xff, 0x00, 0xe0])
        .unwrap();
    rle[item + 8..item + 12].copy_from_slice(&0xFFFF_0002u32.to_le_bytes());
    let p = dir_guard.path().join("segments.dcm");
    std::fs::write(&p, &rle).unwrap();
    let err = DicomFile::open(&p)
        .and_then(|f| f.modality_frames())
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("segments.dcm") && err.contains("RLE frame 0: a damaged header"),
        "{err}"
    );
}

#[test]
fn a_truncated_rle_file_fails_alone_in_a_folder() {
    // dicom-rs's RLE decoder panics on a truncated segment; before the decoder was guarded,
    // that panic killed the loader thread and the folder silently ended after the first batch.
    let dir_guard = tmpdir("dicom-rle-cut");
    let dir = dir_guard.path();
    let mut rle = std::fs::read(data("dicom-pydicom/MR_small_RLE.dcm")).unwrap();
    // Cut inside the RLE fragment, whose item length is shortened to match: the data set reads,
    // the segment is short (a length left past the end is refused before decoding).
    rle.truncate(4000);
    let item = rle
        .windows(4)
        .rposition(|w| w == [0xfe, 0xff, 0x00, 0xe0])
        .unwrap();
    let left = (rle.len() - item - 8) as u32;
    rle[item + 4..item + 8].copy_from_slice(&left.to_le_bytes());
    std::fs::write(dir.join("b_cut.dcm"), &rle).unwrap();
    for (name, src) in [("a.dcm", "CT_small.dcm"), ("c.dcm", "MR_small.dcm")] {
        std::fs::copy(data(&format!("dicom-pydicom/{src}")), dir.join(name)).unwrap();
    }

    let err = DicomFile::open(dir.join("b_cut.dcm"))
        .and_then(|f| f.modality_frames())
        .expect_err("the decoder must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("b_cut.dcm") && msg.contains("corrupt or truncated"),
        "{msg}"
    );

    let (items, skipped) = omnirad_data::discover(dir, omnirad_data::Split::Test).unwrap();
    assert_eq!((items.len(), skipped), (3, 0));
    let batches = all_batches(items, 1);
    assert_eq!(batches.len(), 3, "one batch per item, none lost");
    let loaded: Vec<_> = batches
        .iter()
        .flat_map(|b| b.metas.iter().map(|m| m.id.clone()))
        .collect();
    let failed: Vec<_> = batches.iter().flat_map(|b| b.failed.clone()).collect();
    assert!(
        loaded[0].ends_with("a.dcm") && loaded[1].ends_with("c.dcm"),
        "{loaded:?}"
    );
    assert_eq!(failed.len(), 1);
    assert!(failed[0].0.ends_with("b_cut.dcm") && failed[0].1.contains("corrupt or truncated"));
}

/// Every batch the loader makes of `items` (32 px inputs).
fn all_batches(items: Vec<omnirad_data::Item>, batch: usize) -> Vec<omnirad_data::loader::Batch> {
    let pre = omnirad_data::Preprocess {
        size: 32,
        ..Default::default()
    };
    let read = omnirad_data::ReadOptions::default();
    omnirad_data::loader::batches(std::sync::Arc::new(items), batch, read, pre, 2)
        .iter()
        .collect()
}

/// Multi-frame items (cine loops, volumes) end a batch early: it holds as many items as there
/// are decoding threads, not `batch_items` of them, and nothing is lost or reordered.
#[test]
fn batches_of_multi_frame_items_stay_small() {
    let dir_guard = tmpdir("batches-frames");
    let dir = dir_guard.path();
    for k in 0..5 {
        std::fs::copy(
            data("dicom-pydicom/emri_small.dcm"),
            dir.join(format!("cine{k}.dcm")),
        )
        .unwrap();
    }
    for k in 5..9 {
        std::fs::copy(
            data("dicom-pydicom/MR_small.dcm"),
            dir.join(format!("mr{k}.dcm")),
        )
        .unwrap();
    }
    let (items, _) = omnirad_data::discover(dir, omnirad_data::Split::Test).unwrap();
    let batches = all_batches(items, 8);
    let threads = rayon::current_num_threads();
    for b in &batches {
        if b.metas.iter().any(|m| m.id.contains("cine")) {
            assert!(b.items <= threads.min(8), "{} cine items at once", b.items);
        }
        assert_eq!(b.shape[0], b.metas.len());
    }
    let ids: Vec<String> = batches
        .iter()
        .flat_map(|b| b.metas.iter().map(|m| m.id.clone()))
        .collect();
    assert_eq!(ids.len(), 5 * 10 + 4);
    assert_eq!(batches.iter().map(|b| b.items).sum::<usize>(), 9);
    // Item order kept: the files appear in discovery (name) order, each once, frames together.
    let mut files: Vec<String> = ids
        .iter()
        .map(|id| id.split('#').next().unwrap().to_string())
        .collect();
    files.dedup();
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!((files.len(), &files), (9, &sorted));
    assert!(batches.len() >= 5usize.div_ceil(threads));
}

#[test]
fn truncated_or_damaged_files_are_errors_or_images_never_panics() {
    // Every shared DICOM and NIfTI file and two PNGs, cut short and with bytes overwritten; each
    // must load or fail with an error naming it (dicom-rs's RLE decoder panics on some of them).
    // OMNIRAD_DAMAGE_ROUNDS=N makes N times the random copies; at 25 (5544 loads, `--release`)
    // this took 484 s and 4.3 GB at peak before DICOM lengths were checked, 77 s and 68 MB after.
    let rounds: usize = std::env::var("OMNIRAD_DAMAGE_ROUNDS")
        .map(|r| r.parse().expect("OMNIRAD_DAMAGE_ROUNDS: a count"))
        .unwrap_or(1);
    let mut files: Vec<_> = ["dicom-pydicom", "nifti-nibabel"]
        .iter()
        .flat_map(|d| std::fs::read_dir(data(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    files.extend(
        [
            "busi-256/benign/benign (1).png",
            "chasedb1/Image_01L_1stHO.png",
        ]
        .map(data),
    );
    files.sort();
    let dir_guard = tmpdir("damaged");
    let dir = dir_guard.path();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) as usize % n
    };
    let mut failures = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        // Per round: four copies with 8 random bytes overwritten, then two with a header word
        // (a length, a dimension) set to an extreme; made one at a time.
        for k in 0..4 + 6 * rounds {
            let v = match k {
                0..4 => {
                    let q = [0.3, 0.6, 0.95, 0.999][k];
                    bytes[..(bytes.len() as f64 * q) as usize].to_vec()
                }
                _ if (k - 4) % 6 < 4 => {
                    let mut b = bytes.clone();
                    for _ in 0..8 {
                        let i = next(b.len());
                        b[i] = next(256) as u8;
                    }
                    b
                }
                _ => {
                    let mut b = bytes.clone();
                    let i = next(b.len().min(4096) - 4);
                    b[i..i + 4].fill([0x00, 0xff][(k - 4) % 6 - 4]);
                    b
                }
            };
            let p = dir.join(format!("v{k}_{name}"));
            std::fs::write(&p, &v).unwrap();
            let item = omnirad_data::Item::File {
                path: p.clone(),
                labels: vec![],
                modality: None,
                anatomy: None,
            };
            let r = std::panic::catch_unwind(|| item.load(&omnirad_data::ReadOptions::default()));
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    failures += 1;
                    assert!(e.to_string().contains(&format!("v{k}_{name}")), "{e}");
                }
                Err(_) => panic!("{}: the reader panicked", p.display()),
            }
        }
    }
    // Most damage is detected; a flipped byte in pixel data can leave a readable image.
    assert!(failures > files.len() * 3, "{failures} errors");
}

#[test]
fn twelve_bit_jpeg_extended_decodes() {
    // pydicom's reference values for JPGExtended.dcm (its pixels_reference, decoded by libjpeg
    // builds; our inverse DCT is libjpeg's islow): 1024×256 NM, 12 bits stored.
    let f = frames("JPGExtended.dcm");
    let a = &f[0];
    assert_eq!(a.dim(), (1, 1024, 256));
    assert_eq!((a[[0, 420, 140]], a[[0, 230, 120]]), (244.0, 95.0));
    // JPEG-LL.dcm holds the same scan, losslessly coded: a decoding with blocks, coefficients
    // or their order wrong would not follow it.
    let other = frames("JPEG-LL.dcm");
    let corr = correlation(a.as_slice().unwrap(), other[0].as_slice().unwrap());
    assert!(corr > 0.98, "correlation with JPEG-LL.dcm {corr}");
}

fn correlation(p: &[f32], q: &[f32]) -> f64 {
    let n = p.len() as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mp, mq) = (mean(p), mean(q));
    let (mut cov, mut vp, mut vq) = (0.0, 0.0, 0.0);
    for (&a, &b) in p.iter().zip(q) {
        let (da, db) = (a as f64 - mp, b as f64 - mq);
        cov += da * db;
        vp += da * da;
        vq += db * db;
    }
    cov / (vp * vq).sqrt()
}

#[test]
fn stored_values_match_pydicom() {
    // pydicom's pixel reference values (its pixels_reference test table; decoders there:
    // numpy, pylibjpeg, GDCM), taken through the modality LUT as `modality_frames` applies it.
    // (file, frame, row, first column, values)
    let cases: &[(&str, usize, usize, usize, &[f32])] = &[
        // CT_small: RescaleIntercept -1024 on the stored [520, 802, 930, 1008].
        ("CT_small.dcm", 0, 24, 36, &[-504.0, -222.0, -94.0, -16.0]),
        ("MR_small.dcm", 0, 0, 31, &[422.0, 319.0, 361.0]),
        ("MR_small.dcm", 0, 63, 61, &[1369.0, 1129.0, 862.0]),
        (
            "MR_small_jpeg_ls_lossless.dcm",
            0,
            31,
            0,
            &[366.0, 363.0, 322.0],
        ),
        ("MR_small_RLE.dcm", 0, 63, 61, &[1369.0, 1129.0, 862.0]),
        ("emri_small.dcm", 0, 0, 31, &[206.0, 197.0, 159.0]),
        ("emri_small_RLE.dcm", 4, 31, 0, &[37.0, 41.0, 17.0]),
        (
            "emri_small_jpeg_2k_lossless.dcm",
            9,
            63,
            61,
            &[227.0, 300.0, 147.0],
        ),
        (
            "JPEG-LL.dcm",
            0,
            400,
            124,
            &[60.0, 58.0, 61.0, 68.0, 59.0, 65.0, 64.0, 67.0],
        ),
        (
            "JPEG-LL.dcm",
            0,
            600,
            124,
            &[3.0, 1.0, 2.0, 0.0, 2.0, 1.0, 2.0, 0.0],
        ),
    ];
    for &(name, frame, row, col, want) in cases {
        let f = frames(name);
        let got: Vec<f32> = (0..want.len())
            .map(|i| f[frame][[0, row, col + i]])
            .collect();
        assert_eq!(got, want, "{name} frame {frame} row {row}");
    }
    // RGB samples: SC_rgb_rle.dcm's colour bars, rows 5, 15, …, 95 at column 50.
    let rgb = &frames("SC_rgb_rle.dcm")[0];
    let bars = [
        [255, 0, 0],
        [255, 128, 128],
        [0, 255, 0],
        [128, 255, 128],
        [0, 0, 255],
        [128, 128, 255],
        [0, 0, 0],
        [64, 64, 64],
        [192, 192, 192],
        [255, 255, 255],
    ];
    for (i, want) in bars.iter().enumerate() {
        let got: Vec<f32> = (0..3).map(|c| rgb[[c, 5 + 10 * i, 50]]).collect();
        assert_eq!(
            got,
            want.map(|v| v as f32),
            "SC_rgb_rle.dcm row {}",
            5 + 10 * i
        );
    }
}

#[test]
fn folder_scans_skip_dicom_objects_without_images() {
    use dicom_dictionary_std::tags;
    let dir_guard = tmpdir("dicom-non-image");
    let dir = dir_guard.path();
    let with_class = |name: &str, class: &str, keep_pixels: bool| {
        let mut obj = dicom_object::open_file(data("dicom-pydicom/MR_small.dcm")).unwrap();
        obj.update_meta(|m| m.media_storage_sop_class_uid = class.to_string());
        if !keep_pixels {
            obj.remove_element(tags::PIXEL_DATA);
        }
        obj.write_to_file(dir.join(name)).unwrap();
    };
    with_class("image.dcm", "1.2.840.10008.5.1.4.1.1.4", true); // MR Image Storage
    with_class("report.dcm", "1.2.840.10008.5.1.4.1.1.88.11", false); // Basic Text SR
    with_class("DICOMDIR", "1.2.840.10008.1.3.10", false);
    with_class("rtimage.dcm", "1.2.840.10008.5.1.4.1.1.481.1", true); // RT Image: an image
    std::fs::copy(data("dicom-pydicom/liver_1frame.dcm"), dir.join("seg.dcm")).unwrap();
    let (items, skipped) = omnirad_data::discover(dir, omnirad_data::Split::Test).unwrap();
    let ids: Vec<String> = items.iter().map(|i| i.id()).collect();
    assert_eq!(skipped, 3, "{ids:?}");
    assert!(ids.len() == 2 && ids[0].ends_with("image.dcm") && ids[1].ends_with("rtimage.dcm"));
    // Named on its own, such a file is an error that says what it is.
    let err = DicomFile::open(dir.join("report.dcm"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("report.dcm")
            && err.contains("no pixel data")
            && err.contains("structured report"),
        "{err}"
    );
}

#[test]
fn palette_colour_indices_are_looked_up() {
    // No palette file is in the shared data: MR_small rewritten as an 8-bit PALETTE COLOR image
    // (its values scaled to indices) with 16-bit tables of 200 entries from index 10: red =
    // index, green = 255 - index, blue = 64 (on the 8-bit scale), clamped outside 10..=209.
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let mr = &frames("MR_small.dcm")[0];
    let max = mr.iter().cloned().fold(0.0, f32::max);
    let idx: Vec<u8> = mr
        .iter()
        .map(|&v| (v.max(0.0) / max * 255.0) as u8)
        .collect();
    let dir_guard = tmpdir("dicom-palette");
    let dir = dir_guard.path();
    let write = |name: &str, entries: usize| {
        let mut obj = dicom_object::open_file(data("dicom-pydicom/MR_small.dcm")).unwrap();
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("PALETTE COLOR"),
        ));
        obj.put(us(tags::BITS_ALLOCATED, 8));
        obj.put(us(tags::BITS_STORED, 8));
        obj.put(us(tags::HIGH_BIT, 7));
        obj.put(us(tags::PIXEL_REPRESENTATION, 0));
        for t in [
            tags::WINDOW_CENTER,
            tags::WINDOW_WIDTH,
            tags::RESCALE_SLOPE,
            tags::RESCALE_INTERCEPT,
        ] {
            obj.remove_element(t);
        }
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::U8(idx.clone().into()),
        ));
        let table = |f: fn(u16) -> u16| -> Vec<u16> { (10..210).map(|i| f(i) * 257).collect() };
        for (descriptor, data, lut) in [
            (
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                table(|i| i),
            ),
            (
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                table(|i| 255 - i),
            ),
            (
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                table(|_| 64),
            ),
        ] {
            obj.put(DataElement::new(
                descriptor,
                VR::US,
                PrimitiveValue::U16(vec![entries as u16, 10, 16].into()),
            ));
            obj.put(DataElement::new(
                data,
                VR::OW,
                PrimitiveValue::U16(lut.into()),
            ));
        }
        let p = dir.join(name);
        obj.write_to_file(&p).unwrap();
        p
    };
    let file = DicomFile::open(write("palette.dcm", 200)).unwrap();
    let rgb = &file.modality_frames().unwrap()[0];
    assert_eq!(rgb.dim(), (3, 64, 64));
    for (k, &i) in idx.iter().enumerate() {
        let (y, x) = (k / 64, k % 64);
        let r = (i as f32).clamp(10.0, 209.0);
        assert_eq!(
            [rgb[[0, y, x]], rgb[[1, y, x]], rgb[[2, y, x]]],
            [r, 255.0 - r, 64.0],
            "index {i}"
        );
    }
    let img = &file.images(&Window::File).unwrap()[0];
    assert_eq!(img.data[[2, 0, 0]], 64.0 / 255.0);
    // A table shorter than its descriptor says is an error naming the file.
    let err = DicomFile::open(write("short.dcm", 300))
        .unwrap()
        .modality_frames()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("short.dcm") && err.contains("PALETTE COLOR"),
        "{err}"
    );
}

#[test]
fn enhanced_objects_take_rescale_and_window_from_their_functional_groups() {
    // Enhanced CT/MR/PET objects keep RescaleSlope/Intercept and the VOI window in functional
    // group macros, shared by all frames or one per frame (PS3.3 C.7.6.16); no such file is in
    // the shared data, so CT_small.dcm (HU = raw - 1024, no window) is rewritten as one. The
    // window used to be read from the top level only (percentiles instead, unsaid), and a bad
    // or missing per-frame value made dicom-pixeldata use a default or the first frame's.
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    let dir_guard = tmpdir("dicom-enhanced");
    let dir = dir_guard.path();
    let ct = data("dicom-pydicom/CT_small.dcm");
    let seq = |tag: Tag, items: Vec<InMemDicomObject>| {
        DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
    };
    let ds = |tag: Tag, v: &str| DataElement::new(tag, VR::DS, PrimitiveValue::from(v));
    // One functional groups item: (slope, intercept) and (center, width), each when given.
    let groups = |rescale: Option<(&str, &str)>, window: Option<(&str, &str)>| {
        let mut item = InMemDicomObject::new_empty();
        if let Some((s, i)) = rescale {
            let pvt = InMemDicomObject::from_element_iter([
                ds(tags::RESCALE_SLOPE, s),
                ds(tags::RESCALE_INTERCEPT, i),
            ]);
            item.put(seq(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, vec![pvt]));
        }
        if let Some((c, w)) = window {
            let voi = InMemDicomObject::from_element_iter([
                ds(tags::WINDOW_CENTER, c),
                ds(tags::WINDOW_WIDTH, w),
            ]);
            item.put(seq(tags::FRAME_VOILUT_SEQUENCE, vec![voi]));
        }
        item
    };
    // CT_small with its top-level rescale moved into the functional groups, `frames` copies
    // of its pixels, and `per_frame` items (or one shared item when there is one).
    let write = |name: &str, items: Vec<InMemDicomObject>, frames: usize| {
        let mut obj = dicom_object::open_file(&ct).unwrap();
        obj.remove_element(tags::RESCALE_SLOPE);
        obj.remove_element(tags::RESCALE_INTERCEPT);
        let raw = obj
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .repeat(frames);
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(raw),
        ));
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(frames.to_string()),
        ));
        obj.put(if items.len() == 1 {
            seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, items)
        } else {
            seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, items)
        });
        let p = dir.join(name);
        obj.write_to_file(&p).unwrap();
        DicomFile::open(p).unwrap()
    };
    let original = DicomFile::open(&ct).unwrap();
    let hu = original.modality_frames().unwrap().remove(0);
    let windowed = |c: f32, w: f32| {
        let window = Window::Custom {
            center: c,
            width: w,
        };
        original.images(&window).unwrap().remove(0).data
    };

    // Shared by all frames: the same HU, the file's window applied, both reported by `info`.
    let shared = write(
        "shared.dcm",
        vec![groups(Some(("1", "-1024")), Some(("40", "400")))],
        1,
    );
    assert_eq!(shared.modality_frames().unwrap()[0], hu);
    assert_eq!(
        shared.images(&Window::File).unwrap()[0].data,
        windowed(40.0, 400.0)
    );
    let info = shared.info();
    assert_eq!(
        (info.rescale_slope, info.rescale_intercept, info.window),
        (1.0, -1024.0, Some((40.0, 400.0)))
    );

    // One per frame: each frame in its own units and window.
    let per_frame = [
        ("-1024", "40", "400"),
        ("-1000", "-600", "1500"),
        ("0", "1000", "2000"),
    ];
    let items = per_frame
        .iter()
        .map(|&(i, c, w)| groups(Some(("1", i)), Some((c, w))))
        .collect();
    let file = write("per-frame.dcm", items, 3);
    let hus = file.modality_frames().unwrap();
    let images = file.images(&Window::File).unwrap();
    for (f, &(i, c, w)) in per_frame.iter().enumerate() {
        let shift = i.parse::<f32>().unwrap() + 1024.0;
        assert_eq!(hus[f], hu.mapv(|v| v + shift), "frame {f}");
        // The window in the frame's own units is the original's window shifted back.
        let expect = windowed(c.parse::<f32>().unwrap() - shift, w.parse().unwrap());
        let diff = (&images[f].data - &expect).mapv(f32::abs);
        assert!(diff.iter().all(|&d| d < 1e-6), "frame {f}");
    }

    // A frame without its values, or a bad value anywhere: errors naming the file and the place.
    let two_of_three = vec![
        groups(Some(("1", "-1024")), None),
        groups(None, None),
        groups(Some(("1", "-1024")), None),
    ];
    let err = write("missing.dcm", two_of_three, 3)
        .modality_frames()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.dcm") && err.contains("given for 2 of 3 frames"),
        "{err}"
    );
    let bad = write("slope.dcm", vec![groups(Some(("abc", "-1024")), None)], 1);
    let err = bad.modality_frames().unwrap_err().to_string();
    assert!(
        err.contains("slope.dcm")
            && err.contains("RescaleSlope (0028,1053) in the shared functional groups is 'abc'"),
        "{err}"
    );
    let narrow = vec![
        groups(Some(("1", "-1024")), Some(("40", "400"))),
        groups(Some(("1", "-1024")), Some(("40", "0"))),
    ];
    let err = write("width.dcm", narrow, 2)
        .images(&Window::File)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("width.dcm")
            && err.contains("WindowWidth (0028,1051) in frame 2's functional groups is '0'"),
        "{err}"
    );
}

#[test]
fn voi_lut_tables_come_before_the_window() {
    // Radiographs often carry their display curve as a VOI LUT table (0028,3010) rather than
    // a window; pydicom's apply_voi_lut applies it, and omnirad fell back to the window or to
    // percentiles. No such file is in the shared data: MR_small.dcm (signed, values 127–2145,
    // window 600/1600) gets a square-root table, declared 16-bit but holding 12-bit values as
    // real files often do, so it is scaled by its own range.
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    let dir_guard = tmpdir("dicom-voi-lut");
    let dir = dir_guard.path();
    let mr = data("dicom-pydicom/MR_small.dcm");
    let hu = frames("MR_small.dcm").remove(0);
    let sqrt_table = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|i| (4095.0 * (i as f64 / (n - 1) as f64).sqrt()).round() as u16)
            .collect()
    };
    // `first` as stored with VR US: a negative value as its two's complement, which the
    // parser reads back as SS because the pixel data are signed (PS3.5 6.2's US-or-SS rule).
    let write = |name: &str, entries: usize, first: u16, bits: u16, table: Vec<u16>| {
        let mut obj = dicom_object::open_file(&mr).unwrap();
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(vec![entries as u16, first, bits].into()),
            ),
            DataElement::new(tags::LUT_DATA, VR::OW, PrimitiveValue::U16(table.into())),
        ]);
        obj.put(DataElement::new(
            tags::VOILUT_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        ));
        let p = dir.join(name);
        obj.write_to_file(&p).unwrap();
        DicomFile::open(p).unwrap()
    };
    for (first, stored) in [(200i64, 200u16), (-100, (-100i16) as u16)] {
        let (n, table) = (1500, sqrt_table(1500));
        let file = write("lut.dcm", n, stored, 16, table.clone());
        assert_eq!(file.info().voi_lut, Some((n, first)));
        let img = file.images(&Window::File).unwrap().remove(0).data;
        let mut clamped = 0;
        for (got, v) in img.iter().zip(hu.iter()) {
            let i = (*v as i64 - first).clamp(0, n as i64 - 1) as usize;
            clamped += usize::from(i == 0 || i == n - 1);
            assert_eq!(*got, table[i] as f32 / 4095.0, "value {v}, first {first}");
        }
        if first > 0 {
            assert!(clamped > 0, "the table's ends are exercised");
        }
        // A window the user names still applies to the modality values, not to the table.
        let custom = Window::Custom {
            center: 600.0,
            width: 1600.0,
        };
        let original = DicomFile::open(&mr).unwrap().images(&custom).unwrap();
        assert_eq!(file.images(&custom).unwrap()[0].data, original[0].data);
    }
    // A table shorter than its descriptor, or a constant one: errors naming the file.
    let short = write("short.dcm", 1500, 200, 16, sqrt_table(1499));
    let err = short.images(&Window::File).unwrap_err().to_string();
    assert!(
        err.contains("short.dcm") && err.contains("VOI LUT") && err.contains("1500 entries"),
        "{err}"
    );
    let flat = write("flat.dcm", 10, 200, 12, vec![7; 10]);
    let err = flat.images(&Window::File).unwrap_err().to_string();
    assert!(
        err.contains("flat.dcm") && err.contains("every entry is 7"),
        "{err}"
    );
}

#[test]
fn the_file_window_follows_its_voi_lut_function() {
    // VOI LUT Function (0028,1056): SIGMOID (used by mammography and radiography vendors) and
    // LINEAR_EXACT map the window differently from LINEAR (PS3.3 C.11.2.1.3); omnirad applied
    // LINEAR to all. MR_small.dcm (window 600/1600) with the function set.
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let dir_guard = tmpdir("dicom-voi-function");
    let dir = dir_guard.path();
    let mr = data("dicom-pydicom/MR_small.dcm");
    let hu = frames("MR_small.dcm").remove(0);
    let with_function = |name: &str| {
        let mut obj = dicom_object::open_file(&mr).unwrap();
        obj.put(DataElement::new(
            tags::VOILUT_FUNCTION,
            VR::CS,
            PrimitiveValue::from(name),
        ));
        let p = dir.join(format!("{name}.dcm"));
        obj.write_to_file(&p).unwrap();
        DicomFile::open(p).unwrap()
    };
    let (c, w) = (600.0f32, 1600.0f32);
    type Curve = fn(f32, f32, f32) -> f32;
    let curves: [(&str, Curve); 2] = [
        ("SIGMOID", |v, c, w| {
            1.0 / (1.0 + (-4.0 * (v - c) / w).exp())
        }),
        ("LINEAR_EXACT", |v, c, w| {
            ((v - (c - w / 2.0)) / w).clamp(0.0, 1.0)
        }),
    ];
    for (name, curve) in curves {
        let file = with_function(name);
        assert_eq!(file.info().window_function.as_deref(), Some(name));
        let img = file.images(&Window::File).unwrap().remove(0).data;
        for (got, v) in img.iter().zip(hu.iter()) {
            assert!((got - curve(*v, c, w)).abs() < 1e-6, "{name}: {v} -> {got}");
        }
    }
    // LINEAR names the default; a value DICOM does not define is an error naming it.
    let linear = with_function("LINEAR").images(&Window::File).unwrap();
    let default = DicomFile::open(&mr).unwrap().images(&Window::File).unwrap();
    assert_eq!(linear[0].data, default[0].data);
    let err = with_function("GAMMA")
        .images(&Window::File)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GAMMA.dcm") && err.contains("'GAMMA'"),
        "{err}"
    );
}

#[test]
fn modality_lut_tables_give_the_modality_values() {
    // A Modality LUT Sequence (0028,3000) stands in place of RescaleSlope/Intercept (PS3.3
    // C.11.1; XA, XRF and some CR/DX); dicom-pixeldata ignores it, so omnirad returned stored
    // values in the wrong units without a word. MR_small.dcm (stored values 127–2145, rescale
    // 1/0) gets the table out = 3 × index + 7 over 1500 entries from 200.
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    let dir_guard = tmpdir("dicom-modality-lut");
    let dir = dir_guard.path();
    let stored = frames("MR_small.dcm").remove(0);
    let write = |name: &str, entries: u16, table: Vec<u16>| {
        let mut obj = dicom_object::open_file(data("dicom-pydicom/MR_small.dcm")).unwrap();
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(vec![entries, 200, 16].into()),
            ),
            DataElement::new(tags::MODALITY_LUT_TYPE, VR::LO, PrimitiveValue::from("OD")),
            DataElement::new(tags::LUT_DATA, VR::OW, PrimitiveValue::U16(table.into())),
        ]);
        obj.put(DataElement::new(
            tags::MODALITY_LUT_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![item]),
        ));
        let p = dir.join(name);
        obj.write_to_file(&p).unwrap();
        DicomFile::open(p).unwrap()
    };
    let table: Vec<u16> = (0..1500).map(|i| 3 * i + 7).collect();
    let file = write("lut.dcm", 1500, table.clone());
    assert_eq!(file.info().modality_lut, Some((1500, 200)));
    let values = file.modality_frames().unwrap().remove(0);
    let mut ends = 0;
    for (got, v) in values.iter().zip(stored.iter()) {
        let i = (*v as i64 - 200).clamp(0, 1499) as usize;
        ends += usize::from(i == 0 || i == 1499);
        assert_eq!(*got, table[i] as f32, "stored {v}");
    }
    assert!(ends > 0, "the table's ends are exercised");
    // The file's window (600/1600) applies to the table's output, as a named window does.
    let custom = Window::Custom {
        center: 600.0,
        width: 1600.0,
    };
    let windowed = file.images(&Window::File).unwrap().remove(0).data;
    assert_eq!(windowed, file.images(&custom).unwrap().remove(0).data);
    let err = write("short.dcm", 1500, table[..1000].to_vec())
        .modality_frames()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("short.dcm") && err.contains("Modality LUT sequence (0028,3000)"),
        "{err}"
    );
}

#[test]
fn padding_is_left_out_of_percentile_windows() {
    // 693_UNCR.dcm marks the corners outside the CT's field of view with Pixel Padding Value
    // -2000 (HU -3024): 55 772 of its 262 144 pixels. Percentile windows counted them, so its
    // 1st percentile was the padding and real air came out mid-grey.
    let file = DicomFile::open(data("dicom-pydicom/693_UNCR.dcm")).unwrap();
    let hu = frames("693_UNCR.dcm").remove(0);
    let is_pad = |v: f32| v == -3024.0;
    assert_eq!(hu.iter().filter(|v| is_pad(**v)).count(), 55_772);
    let mut real: Vec<f32> = hu.iter().copied().filter(|v| !is_pad(*v)).collect();
    real.sort_by(f32::total_cmp);
    let at = |p: f32| real[((p / 100.0) * (real.len() - 1) as f32).round() as usize];
    let (lo, hi) = (at(1.0), at(99.0));
    assert!(lo > -1100.0, "the 1st percentile is air, not padding: {lo}");
    let img = file
        .images(&Window::Percentile(1.0, 99.0))
        .unwrap()
        .remove(0)
        .data;
    for (got, v) in img.iter().zip(hu.iter()) {
        let want = if is_pad(*v) {
            0.0
        } else {
            ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
        };
        assert!((got - want).abs() < 1e-6, "{v}: {got} vs {want}");
    }
    // The file's own window is unchanged by the padding.
    let own = file.images(&Window::File).unwrap().remove(0).data;
    assert_eq!(file.info().window, Some((40.0, 100.0)));
    let custom = Window::Custom {
        center: 40.0,
        width: 100.0,
    };
    assert_eq!(own, file.images(&custom).unwrap().remove(0).data);
}
