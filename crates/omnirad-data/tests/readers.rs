mod common;
use common::{data, tmpdir};
use ndarray::{Array2, Array3};
use ndarray_npy::{NpzWriter, WriteNpyExt};
use omnirad_data::medmnist::{verify, MedMnistInfo, NpzSplit, Task};
use omnirad_data::nifti::{NiftiVolume, SliceAxis, VolumeIntensity};
use omnirad_data::seg::discover_pairs;
use omnirad_data::{discover, DataError, ReadOptions, Split};

#[test]
fn nifti_shapes_and_canonical_orientation() {
    // Reference values from nibabel 5: as_closest_canonical(img), then sums and voxels.
    let v = NiftiVolume::open(data("nifti-nibabel/anatomical.nii")).unwrap();
    assert_eq!(v.orientation, "LAS");
    assert_eq!(v.shape(), [33, 41, 25, 1]);
    let vol = v.volume(0);
    assert_eq!(vol[[0, 0, 0]], 9595.0);
    assert_eq!(vol.index_axis(ndarray::Axis(0), 0).sum(), 7967483.0);
    assert_eq!(vol.index_axis(ndarray::Axis(1), 40).sum(), 5626136.0);

    let s = NiftiVolume::open(data("nifti-nibabel/standard.nii.gz")).unwrap();
    assert_eq!((s.orientation.as_str(), s.shape()), ("RAS", [4, 5, 7, 1]));
    assert_eq!(s.spacing, [1.0, 3.0, 2.0]);
    assert_eq!(s.volume(0).index_axis(ndarray::Axis(0), 0).sum(), 1530.0);

    let f = NiftiVolume::open(data("nifti-nibabel/example4d.nii.gz")).unwrap();
    assert_eq!(f.shape(), [128, 96, 24, 2]);
}

#[test]
fn nifti2_reads_as_nifti1_does() {
    // nibabel's NIfTI-2 example: int16 (32, 20, 12, 2), zooms (2, 2, 2.2, 2000), written with
    // example4d.nii.gz's affine. Voxel sum, min and max: the int16 block at vox_offset (608)
    // unpacked with Python's struct module.
    let v = NiftiVolume::open(data("nifti-nibabel/example_nifti2.nii.gz")).unwrap();
    let v1 = NiftiVolume::open(data("nifti-nibabel/example4d.nii.gz")).unwrap();
    assert_eq!(v.shape(), [32, 20, 12, 2]);
    assert_eq!(v.orientation, v1.orientation);
    for (got, want) in v.spacing.iter().zip([2.0, 2.0, 2.2]) {
        assert!((got - want).abs() < 1e-5, "spacing {:?}", v.spacing);
    }
    assert_eq!(v.data.sum(), 6_926_802.0);
    let min = v.data.iter().cloned().fold(f32::MAX, f32::min);
    let max = v.data.iter().cloned().fold(f32::MIN, f32::max);
    assert_eq!((min, max), (46.0, 757.0));

    // anatomical.nii (big-endian NIfTI-1) rewritten with a NIfTI-2 header reads the same.
    let n1 = std::fs::read(data("nifti-nibabel/anatomical.nii")).unwrap();
    let dir_guard = tmpdir("nifti2");
    let dir = dir_guard.path();
    let p = dir.join("anatomical2.nii");
    std::fs::write(&p, nifti1_as_nifti2_big_endian(&n1)).unwrap();
    let a = NiftiVolume::open(data("nifti-nibabel/anatomical.nii")).unwrap();
    let b = NiftiVolume::open(&p).unwrap();
    assert_eq!((&b.orientation, b.spacing), (&a.orientation, a.spacing));
    assert_eq!(b.data, a.data);

    // A size NIfTI-1 cannot hold, and a cut file, are errors naming the file.
    let mut big = nifti1_as_nifti2_big_endian(&n1);
    big[24..32].copy_from_slice(&70_000i64.to_be_bytes()); // dim[1]
    std::fs::write(&p, &big).unwrap();
    let e = NiftiVolume::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("anatomical2.nii") && e.contains("dim[1] = 70000"),
        "{e}"
    );
    let whole = nifti1_as_nifti2_big_endian(&n1);
    std::fs::write(&p, &whole[..whole.len() - 100]).unwrap();
    let e = NiftiVolume::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("anatomical2.nii") && e.contains("NIfTI-2"),
        "{e}"
    );
}

/// A big-endian NIfTI-1 file with the same fields in the NIfTI-2 layout (nifti2.h: 64-bit
/// sizes and floats, 540-byte header, data at 544).
fn nifti1_as_nifti2_big_endian(n1: &[u8]) -> Vec<u8> {
    let i16_at = |at: usize| i16::from_be_bytes([n1[at], n1[at + 1]]);
    let f32_at = |at: usize| f32::from_be_bytes(n1[at..at + 4].try_into().unwrap());
    let mut h = vec![0u8; 544];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(0, &540i32.to_be_bytes());
    put(4, b"n+2\0\r\n\x1a\n");
    put(12, &i16_at(70).to_be_bytes()); // datatype
    put(14, &i16_at(72).to_be_bytes()); // bitpix
    for i in 0..8 {
        put(16 + 8 * i, &(i16_at(40 + 2 * i) as i64).to_be_bytes()); // dim
        put(104 + 8 * i, &(f32_at(76 + 4 * i) as f64).to_be_bytes()); // pixdim
    }
    put(168, &544i64.to_be_bytes()); // vox_offset
    put(176, &(f32_at(112) as f64).to_be_bytes()); // scl_slope
    put(184, &(f32_at(116) as f64).to_be_bytes()); // scl_inter
    put(344, &(i16_at(252) as i32).to_be_bytes()); // qform_code
    put(348, &(i16_at(254) as i32).to_be_bytes()); // sform_code
    for i in 0..6 {
        // quatern_b, c, d, qoffset_x, y, z
        put(352 + 8 * i, &(f32_at(256 + 4 * i) as f64).to_be_bytes());
    }
    for i in 0..12 {
        put(400 + 8 * i, &(f32_at(280 + 4 * i) as f64).to_be_bytes()); // srow_x, y, z
    }
    let offset = f32_at(108) as usize;
    h.extend_from_slice(&n1[offset..]);
    h
}

#[test]
fn nifti_slices_along_each_axis() {
    let v = NiftiVolume::open(data("nifti-nibabel/anatomical.nii")).unwrap();
    let ax = v
        .slices(SliceAxis::Axial, None, VolumeIntensity::default())
        .unwrap();
    assert_eq!(ax.len(), 25);
    assert_eq!(ax[0].data.dim(), (1, 41, 33));
    let cor = v
        .slices(SliceAxis::Coronal, None, VolumeIntensity::default())
        .unwrap();
    assert_eq!((cor.len(), cor[0].data.dim()), (41, (1, 25, 33)));
    let sag = v
        .slices(SliceAxis::Sagittal, Some(0), VolumeIntensity::default())
        .unwrap();
    assert_eq!((sag.len(), sag[0].data.dim()), (33, (1, 25, 41)));
    // Display convention: top row is the most anterior voxel row, first column the rightmost.
    let vol = v.volume(0);
    let (lo, hi) = omnirad_data::image::percentiles(v.data.as_slice().unwrap(), 0.5, 99.5);
    let want = ((vol[[32, 40, 10]] - lo) / (hi - lo)).clamp(0.0, 1.0);
    assert!((ax[10].data[[0, 0, 0]] - want).abs() < 1e-6);
    assert!(ax
        .iter()
        .all(|im| im.data.iter().all(|x| (0.0..=1.0).contains(x))));
    assert!(v
        .slices(SliceAxis::Axial, Some(3), VolumeIntensity::default())
        .is_err());
    let f = NiftiVolume::open(data("nifti-nibabel/functional.nii")).unwrap();
    assert_eq!(
        f.slices(SliceAxis::Axial, None, VolumeIntensity::default())
            .unwrap()
            .len(),
        3 * 20
    );
}

#[test]
fn medmnist_md5_and_split_sizes() {
    for (file, sizes) in [
        ("breastmnist.npz", [546, 78, 156]),
        ("pneumoniamnist.npz", [4708, 524, 624]),
    ] {
        let r = verify(data(&format!("medmnist/{file}"))).unwrap();
        assert!(r.ok && r.md5_ok == Some(true), "{r:?}");
        let found: Vec<usize> = r.splits.iter().map(|s| s.1).collect();
        assert_eq!(found, sizes);
    }
    let s = NpzSplit::load(data("medmnist/breastmnist.npz"), Split::Test).unwrap();
    assert_eq!(s.info.unwrap().task, Task::Binary);
    let counts = (0..s.len()).fold([0; 2], |mut c, i| {
        c[s.labels[[i, 0]] as usize] += 1;
        c
    });
    assert_eq!(counts, [42, 114]);
    let im = s.image(0);
    assert_eq!(im.data.dim(), (1, 28, 28));
    assert_eq!(im.meta.modality, omnirad_data::Modality::US);
    assert_eq!(MedMnistInfo::all().len(), 18);
    assert_eq!(MedMnistInfo::get("chestmnist").unwrap().num_classes(), 14);
}

#[test]
fn npz_rows_read_as_the_split_reads_them() {
    use omnirad_data::medmnist::NpzRows;
    use omnirad_data::ImageSource;
    let file = data("medmnist/breastmnist.npz");
    let s = NpzSplit::load(&file, Split::Val).unwrap();
    let rows = NpzRows::all(NpzSplit::load(&file, Split::Val).unwrap()).unwrap();
    assert_eq!(rows.len(), 78);
    // A selection of a selection picks rows of the split, not positions of the first pick.
    let some = rows.select(&[70, 3, 41, 5]).select(&[2, 0]);
    assert_eq!(some.len(), 2);
    for (k, i) in [(0, 41), (1, 70)] {
        let (a, b) = (some.image(k), s.image(i));
        assert_eq!(a.data, b.data);
        assert_eq!(a.meta.id, b.meta.id);
        assert_eq!(some.labels().row(k), s.labels.row(i));
    }
    assert_eq!(rows.labels(), s.labels);
    // 3D sets have volumes, not rows of 2D images.
    let dir_guard = tmpdir("npz-3d");
    let p = dir_guard.path().join("organmnist3d.npz");
    write_npz(
        &p,
        vec![
            (
                "val_images",
                ndarray::Array4::<u8>::zeros((2, 28, 28, 28)).into_dyn(),
            ),
            ("val_labels", Array2::<u8>::zeros((2, 1)).into_dyn()),
        ],
    );
    let e = NpzRows::all(NpzSplit::load(&p, Split::Val).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("3D MedMNIST volumes"), "{e}");
}

/// Malignant and benign counts among `idx` of a BreastMNIST split.
fn class_counts(s: &NpzSplit, idx: &[usize]) -> [usize; 2] {
    idx.iter().fold([0; 2], |mut c, &i| {
        c[s.labels[[i, 0]] as usize] += 1;
        c
    })
}

/// `rest` and `held` are ascending and together hold 0..n once each.
fn assert_partition(rest: &[usize], held: &[usize], n: usize) {
    assert!(rest.windows(2).all(|w| w[0] < w[1]) && held.windows(2).all(|w| w[0] < w[1]));
    let mut both: Vec<usize> = rest.iter().chain(held).copied().collect();
    both.sort_unstable();
    assert_eq!(
        both,
        (0..n).collect::<Vec<_>>(),
        "rest and held partition the split"
    );
}

#[test]
fn stratified_holdout_keeps_class_shares_and_follows_the_seed() {
    use omnirad_data::medmnist::stratified_holdout;
    let s = NpzSplit::load(data("medmnist/breastmnist.npz"), Split::Train).unwrap();
    let counts = |idx: &[usize]| class_counts(&s, idx);
    let all: Vec<usize> = (0..s.len()).collect();
    assert_eq!(counts(&all), [147, 399]);
    let (rest, held) = stratified_holdout(s.labels.view(), 78, 0);
    assert_eq!((rest.len(), held.len()), (468, 78));
    // 78 × 147 / 546 = 21.0 and 78 × 399 / 546 = 57.0: the shares of train, exactly.
    assert_eq!(counts(&held), [21, 57]);
    assert_partition(&rest, &held, s.len());
    assert_eq!(stratified_holdout(s.labels.view(), 78, 0).1, held);
    let other = stratified_holdout(s.labels.view(), 78, 1).1;
    assert_ne!(other, held);
    assert_eq!(counts(&other), [21, 57]);
    // Shares that do not divide evenly go to the largest remainders: 10 × 147 / 546 = 2.69,
    // 10 × 399 / 546 = 7.31.
    assert_eq!(
        counts(&stratified_holdout(s.labels.view(), 10, 3).1),
        [3, 7]
    );
}

#[test]
fn stratified_folds_partition_train_with_class_shares() {
    use omnirad_data::medmnist::stratified_folds;
    let s = NpzSplit::load(data("medmnist/breastmnist.npz"), Split::Train).unwrap();
    let counts = |idx: &[usize]| class_counts(&s, idx);
    let held = |seed| -> Vec<Vec<usize>> {
        let pairs = stratified_folds(s.labels.view(), 5, seed);
        for (rest, held) in &pairs {
            assert_partition(rest, held, s.len());
        }
        pairs.into_iter().map(|(_, held)| held).collect()
    };
    let folds = held(0);
    // 147 malignant = 5 × 29 + 2, 399 benign = 5 × 79 + 4: dealt in turn, the benign images
    // continue where the malignant ones stopped (the third fold).
    let per_fold: Vec<[usize; 2]> = folds.iter().map(|f| counts(f)).collect();
    assert_eq!(per_fold, [[30, 80], [30, 79], [29, 80], [29, 80], [29, 80]]);
    let mut all: Vec<usize> = folds.concat();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..s.len()).collect::<Vec<_>>(),
        "the folds partition train"
    );
    assert_eq!(held(0), folds);
    let other = held(1);
    assert_ne!(other, folds);
    assert_eq!(
        other.iter().map(|f| counts(f)).collect::<Vec<_>>(),
        per_fold
    );
}

fn write_npz(path: &std::path::Path, arrays: Vec<(&str, ndarray::ArrayD<u8>)>) {
    let mut w = NpzWriter::new(std::fs::File::create(path).unwrap());
    for (k, a) in arrays {
        w.add_array(k, &a).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn npz_with_missing_keys_or_wrong_labels_is_a_clear_error() {
    let dir_guard = tmpdir("npz-bad");
    let dir = dir_guard.path();
    let imgs = Array3::<u8>::zeros((5, 28, 28)).into_dyn();
    let p = dir.join("breastmnist.npz");
    write_npz(&p, vec![("test_images", imgs.clone())]);
    let e = NpzSplit::load(&p, Split::Test).unwrap_err().to_string();
    assert!(
        e.contains("breastmnist.npz") && e.contains("test_labels"),
        "{e}"
    );

    write_npz(
        &p,
        vec![
            ("test_images", imgs.clone()),
            ("test_labels", Array2::<u8>::zeros((4, 1)).into_dyn()),
        ],
    );
    let e = NpzSplit::load(&p, Split::Test).unwrap_err().to_string();
    assert!(e.contains("4 rows") && e.contains("5 images"), "{e}");

    write_npz(
        &p,
        vec![
            ("test_images", imgs.clone()),
            ("test_labels", Array2::<u8>::from_elem((5, 1), 7).into_dyn()),
        ],
    );
    let e = NpzSplit::load(&p, Split::Test).unwrap_err().to_string();
    assert!(e.contains("label 7"), "{e}");

    // Float images (a user's own export, say) are named as such, not as a bad descriptor.
    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("test_images", &Array3::<f32>::zeros((5, 28, 28)))
        .unwrap();
    w.add_array("test_labels", &Array2::<u8>::zeros((5, 1)))
        .unwrap();
    w.finish().unwrap();
    let e = NpzSplit::load(&p, Split::Test).unwrap_err().to_string();
    assert!(
        e.contains("breastmnist.npz") && e.contains("'<f4' values, expected u8"),
        "{e}"
    );

    std::fs::write(dir.join("junk.npz"), b"PK not really").unwrap();
    let e = NpzSplit::load(dir.join("junk.npz"), Split::Test).unwrap_err();
    assert!(matches!(e, DataError::Format { .. }), "{e}");
}

/// A `.npy` image of `[5, 28, 28]` u8 zeros whose header declares `shape` instead.
fn npy_claiming(shape: &[usize]) -> Vec<u8> {
    use ndarray_npy::npy::header::Header;
    let mut valid = Vec::new();
    Array3::<u8>::zeros((5, 28, 28))
        .write_npy(&mut valid)
        .unwrap();
    let mut h = Header::from_reader(&mut &valid[..]).unwrap();
    let data = valid.split_off(h.to_bytes().unwrap().len());
    h.shape = shape.to_vec();
    [h.to_bytes().unwrap(), data].concat()
}

#[test]
fn npy_headers_claiming_more_than_the_file_holds_are_errors_not_aborts() {
    // Before the check, a shape of 4·10⁹ × 28 × 28 made ndarray-npy allocate 3 TB up front and
    // the process died with "memory allocation failed" (a hostile or damaged MedMNIST file).
    let dir_guard = tmpdir("npy-claims");
    let dir = dir_guard.path();
    let p = dir.join("breastmnist.npz");
    for (shape, says) in [
        (
            vec![4_000_000_000, 28, 28],
            "(3136000000000 bytes) but 3920 bytes follow",
        ),
        (vec![1 << 62, 1 << 62, 28], "(more than 2^64 bytes)"),
        (vec![6, 28, 28], "(4704 bytes) but 3920 bytes follow"),
    ] {
        for method in [
            zip::CompressionMethod::Stored,
            zip::CompressionMethod::Deflated,
        ] {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
            let opts = zip::write::SimpleFileOptions::default().compression_method(method);
            w.start_file("test_images.npy", opts).unwrap();
            std::io::Write::write_all(&mut w, &npy_claiming(&shape)).unwrap();
            w.start_file("test_labels.npy", opts).unwrap();
            Array2::<u8>::zeros((5, 1)).write_npy(&mut w).unwrap();
            w.finish().unwrap();
            let e = NpzSplit::load(&p, Split::Test).unwrap_err().to_string();
            assert!(
                e.contains("breastmnist.npz") && e.contains("'test_images'") && e.contains(says),
                "{method:?} {shape:?}: {e}"
            );
        }
    }

    // A plain .npy (a feature cache, an index) cut short, and its header damaged.
    use omnirad_data::npy::read_npy;
    let f = dir.join("features.npy");
    let whole = npy_claiming(&[5, 28, 28]);
    let error_of = |bytes: &[u8]| {
        std::fs::write(&f, bytes).unwrap();
        read_npy::<u8, ndarray::Ix3>(&f).unwrap_err().to_string()
    };
    for (bytes, says) in [
        (&whole[..whole.len() - 100], "3820 bytes follow"),
        (&whole[..20], "not a readable npy file"),
    ] {
        let e = error_of(bytes);
        assert!(e.contains("features.npy") && e.contains(says), "{e}");
    }
    std::fs::write(&f, &whole).unwrap();
    assert_eq!(read_npy::<u8, ndarray::Ix3>(&f).unwrap().dim(), (5, 28, 28));
    let e = read_npy::<f32, ndarray::Ix3>(&f).unwrap_err().to_string();
    assert!(e.contains("'|u1' values, expected f32"), "{e}");
}

#[cfg(unix)]
#[test]
fn folders_with_link_loops_are_walked_once() {
    // Before: a link to a parent folder was followed until the path grew too long, and every
    // file under it was listed again at each level (here 40 copies of one DICOM file).
    use std::os::unix::fs::symlink;
    let dir_guard = tmpdir("link-loop");
    let dir = dir_guard.path();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::copy(data("dicom-pydicom/MR_small.dcm"), dir.join("a/x.dcm")).unwrap();
    symlink("..", dir.join("a/up")).unwrap();
    symlink(data("dicom-pydicom/CT_small.dcm"), dir.join("ct.dcm")).unwrap();
    symlink(dir.join("missing.png"), dir.join("dangling.png")).unwrap();
    let (items, skipped) = discover(dir, Split::Test).unwrap();
    let ids: Vec<String> = items.iter().map(|i| i.id()).collect();
    let names: Vec<&str> = ids.iter().map(|i| i.rsplit('/').next().unwrap()).collect();
    assert_eq!(
        (names, skipped),
        (vec!["x.dcm", "ct.dcm", "dangling.png"], 1)
    );
    // The linked file is read through its link; the dangling one fails alone, naming itself.
    assert!(items[1].load(&ReadOptions::default()).is_ok());
    let e = items[2]
        .load(&ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dangling.png"), "{e}");

    // Segmentation pairs (BUSI's class sub-folders) under a loop.
    let seg_guard = tmpdir("link-loop-seg");
    let seg = seg_guard.path();
    std::fs::create_dir_all(seg.join("benign")).unwrap();
    for f in ["benign (1).png", "benign (1)_mask.png"] {
        std::fs::copy(
            data(&format!("busi-256/benign/{f}")),
            seg.join("benign").join(f),
        )
        .unwrap();
    }
    symlink("..", seg.join("benign/up")).unwrap();
    assert_eq!(discover_pairs(seg).unwrap().len(), 1);
}

#[test]
fn folders_manifests_and_empty_inputs() {
    // 29 DICOM files, two of them SEG objects (masks, no image): skipped and counted.
    let (items, skipped) = discover(&data("dicom-pydicom"), Split::Test).unwrap();
    assert_eq!((items.len(), skipped), (27, 2));
    let (items, _) = discover(&data("drive/training"), Split::Test).unwrap();
    assert_eq!(items.len(), 60);
    let img = items[0].load(&ReadOptions::default()).unwrap();
    assert_eq!(img[0].data.dim(), (1, 584, 565)); // 1st_manual GIF, binary

    let dir_guard = tmpdir("manifest");
    let dir = dir_guard.path();
    let csv = dir.join("m.csv");
    let busi = data("busi-256/benign/benign (1).png");
    std::fs::write(
        &csv,
        format!("path,label,modality\n{},1,US\n", busi.display()),
    )
    .unwrap();
    let (items, _) = discover(&csv, Split::Test).unwrap();
    let im = &items[0].load(&ReadOptions::default()).unwrap()[0];
    assert_eq!(
        (im.meta.labels.clone(), im.meta.modality),
        (vec![1], omnirad_data::Modality::US)
    );
    assert_eq!(im.data.dim(), (1, 256, 256));

    std::fs::write(&csv, "path,label\nx.png,abc\n").unwrap();
    let e = discover(&csv, Split::Test).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("abc"), "{e}");

    let empty_guard = tmpdir("empty");
    let empty = empty_guard.path();
    let e = discover(empty, Split::Test).unwrap_err();
    assert!(
        matches!(e, DataError::Empty { .. }) && e.to_string().contains("no images"),
        "{e}"
    );
}

#[test]
fn segmentation_pairs_for_each_layout() {
    let drive = discover_pairs(&data("drive/training")).unwrap();
    assert_eq!(drive.len(), 20);
    let s = drive[0].load().unwrap();
    assert_eq!((s.pixels.dim().0, s.mask.dim()), (3, (584, 565)));
    let fov = s.fov.unwrap();
    let fg = s.mask.iter().filter(|&&v| v == 1).count() as f64 / s.mask.len() as f64;
    assert!(fg > 0.05 && fg < 0.2, "vessel fraction {fg}");
    assert!(fov.iter().filter(|&&v| v).count() < fov.len());
    assert_eq!(discover_pairs(&data("chasedb1")).unwrap().len(), 28);
    let busi = discover_pairs(&data("busi-256")).unwrap();
    assert_eq!(busi.len(), 780);
}

#[test]
fn medsegbench_npz_keys_are_discovered() {
    let dir_guard = tmpdir("msb");
    let dir = dir_guard.path();
    let p = dir.join("busimsbench.npz");
    let imgs_u8 = Array3::<u8>::from_shape_fn((3, 16, 16), |(i, y, x)| (i * 10 + y + x) as u8);
    let masks_u8 = Array3::<u8>::from_shape_fn((3, 16, 16), |(_, y, _)| (y > 8) as u8);
    let (imgs, masks) = (imgs_u8.clone().into_dyn(), masks_u8.clone().into_dyn());
    write_npz(
        &p,
        vec![
            ("train_images", imgs.clone()),
            ("train_label", masks.clone()),
            ("val_images", imgs),
            ("val_label", masks),
        ],
    );
    let s = omnirad_data::seg::load_npz_split(&p, Split::Val).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s[1].mask.iter().filter(|&&v| v == 1).count(), 7 * 16);
    assert!((s[1].pixels.to_f32()[[0, 2, 3]] - 15.0 / 255.0).abs() < 1e-6);
    let e = omnirad_data::seg::load_npz_split(&p, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no test image array"), "{e}");
    // A MedMNIST classification file has labels, not masks.
    let e = omnirad_data::seg::load_npz_split(&data("medmnist/breastmnist.npz"), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("breastmnist.npz") && e.contains("[156, 1]") && e.contains("not a mask"),
        "{e}"
    );
    // Masks stored as int16 read the same; a class beyond u8 is an error naming the mask.
    let wide = |at_300: bool| {
        let q = dir.join(format!("wide{at_300}.npz"));
        let mut m = masks_u8.mapv(|v| v as i16);
        if at_300 {
            m[[2, 5, 5]] = 300;
        }
        let mut w = NpzWriter::new(std::fs::File::create(&q).unwrap());
        w.add_array("val_images", &imgs_u8).unwrap();
        w.add_array("val_masks", &m).unwrap();
        w.finish().unwrap();
        omnirad_data::seg::load_npz_split(&q, Split::Val)
    };
    let w = wide(false).unwrap();
    assert!(w.iter().zip(&s).all(|(a, b)| a.mask == b.mask));
    let e = wide(true).unwrap_err().to_string();
    assert!(
        e.contains("widetrue.npz") && e.contains("mask 2 holds class 300"),
        "{e}"
    );
}

#[test]
fn sixteen_bit_png_keeps_its_precision() {
    let dir_guard = tmpdir("png16");
    let dir = dir_guard.path();
    let p = dir.join("x.png");
    let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(8, 4, |x, y| {
        image::Luma([(x * 8000 + y) as u16])
    });
    img.save(&p).unwrap();
    let im = omnirad_data::source::read_raster(&p).unwrap();
    assert_eq!(im.data.dim(), (1, 4, 8));
    assert!((im.data[[0, 3, 7]] - 56003.0 / 65535.0).abs() < 1e-7);
}

#[test]
fn nifti_with_nan_voxels_is_a_clear_error() {
    let dir_guard = tmpdir("nifti-nan");
    let dir = dir_guard.path();
    let p = dir.join("nan.nii");
    let mut vol = ndarray::Array3::<f32>::zeros((4, 4, 4));
    vol[[1, 2, 3]] = f32::NAN;
    nifti::writer::WriterOptions::new(&p)
        .write_nifti(&vol)
        .unwrap();
    let e = NiftiVolume::open(&p).err().unwrap().to_string();
    assert!(e.contains("nan.nii") && e.contains("NaN/Inf"), "{e}");
}

/// A bit flipped near the end of example4d.nii.gz's deflate stream still inflates to the full
/// volume, with wrong voxels: only the gzip CRC tells. The nifti crate stops at the last voxel,
/// so the reader must check the trailer itself.
#[test]
fn gzip_nifti_with_a_bad_checksum_or_no_trailer_is_an_error() {
    use std::io::Read;
    let good = std::fs::read(data("nifti-nibabel/example4d.nii.gz")).unwrap();
    let inflate = |gz: &[u8]| {
        // No optional fields in this file's header (FLG = 0): deflate data starts at byte 10.
        assert_eq!(gz[3], 0);
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&gz[10..gz.len() - 8])
            .read_to_end(&mut out)
            .map(|_| out)
    };
    let mut flipped = good.clone();
    flipped[346_422] ^= 0x10;
    let (a, b) = (inflate(&good).unwrap(), inflate(&flipped).unwrap());
    assert_eq!(a.len(), b.len());
    assert!(
        a != b,
        "the flip must change voxels for this test to mean anything"
    );

    let dir_guard = tmpdir("nifti-gz-crc");
    let dir = dir_guard.path();
    let p = dir.join("flipped.nii.gz");
    std::fs::write(&p, &flipped).unwrap();
    let e = NiftiVolume::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("flipped.nii.gz") && e.contains("checksum"),
        "{e}"
    );
    // Without its last 4 bytes (the length) the volume is complete, the stream is not.
    let p = dir.join("cut.nii.gz");
    std::fs::write(&p, &good[..good.len() - 4]).unwrap();
    let e = NiftiVolume::open(&p).err().unwrap().to_string();
    assert!(e.contains("cut.nii.gz") && e.contains("gzip stream"), "{e}");
    assert!(NiftiVolume::open(data("nifti-nibabel/example4d.nii.gz")).is_ok());
}

#[test]
fn segmentation_splits_follow_each_dataset() {
    use omnirad_data::seg::open_splits;
    let d = open_splits(&data("drive"), None, 0, true).unwrap();
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (16, 4, 20));
    assert!(d.protocol.contains("official test set"));
    // Every DRIVE sample carries its field of view, and it excludes the dark border.
    assert!(d.test.iter().all(|s| s.fov.as_ref().is_some_and(|f| f
        .iter()
        .filter(|&&v| v)
        .count()
        < f.len() * 9 / 10)));
    let c = open_splits(&data("chasedb1"), None, 0, true).unwrap();
    assert_eq!((c.train.len() + c.val.len(), c.test.len()), (20, 8));
    assert!(c.test.iter().all(|s| s.id.contains("Image_1")));
    let b = open_splits(&data("busi-256"), None, 0, true).unwrap();
    assert_eq!((b.train.len(), b.val.len(), b.test.len()), (546, 78, 156));
    // Seeded: the same seed gives the same test set, another seed another.
    let ids = |s: &omnirad_data::seg::SegSplits| -> Vec<String> {
        s.test.iter().map(|x| x.id.clone()).collect()
    };
    let b0 = open_splits(&data("busi-256/normal"), None, 0, true).unwrap();
    let b0b = open_splits(&data("busi-256/normal"), None, 0, true).unwrap();
    let b1 = open_splits(&data("busi-256/normal"), None, 1, true).unwrap();
    assert_eq!(ids(&b0), ids(&b0b));
    assert_ne!(ids(&b0), ids(&b1));
}

#[test]
fn segmentation_views_keep_image_and_mask_aligned() {
    use omnirad_data::augment::sample_rng;
    use omnirad_data::seg::{Pixels, SegSample, SegWindow};
    // A mask that is exactly "image > 0.5": every view must keep that relation.
    let img = Array3::from_shape_fn((1, 40, 60), |(_, y, x)| {
        if (x / 7 + y / 5) % 2 == 0 {
            0.9
        } else {
            0.1
        }
    });
    let mask = img
        .index_axis(ndarray::Axis(0), 0)
        .mapv(|v| (v > 0.5) as u8);
    let s = SegSample {
        pixels: Pixels::F32(img),
        id: "checkerboard".into(),
        mask: mask.into_shared(),
        fov: None,
    };
    for k in 0..20 {
        let mut rng = sample_rng(0, 0, k);
        let v = s.train_view(SegWindow::Sliding { overlap: 0 }, 32, &mut rng);
        let agree = v
            .mask
            .iter()
            .zip(v.image.iter())
            .all(|(&m, &p)| (p > 0.5) == (m == 1));
        assert!(agree, "window view {k} misaligned");
        assert!(v.valid.iter().all(|&ok| ok));
    }
    // Windows past the edge are padded and marked invalid.
    let w = s.window(30, 50, 32);
    assert_eq!(w.valid.iter().filter(|&&ok| ok).count(), 10 * 10);
}

/// Segmentation splits stay in memory while training, so 8- and 16-bit images are kept as
/// integers; every view must be bit for bit what the f32 image gives.
#[test]
fn segmentation_images_are_stored_compactly_and_losslessly() {
    use omnirad_data::augment::sample_rng;
    use omnirad_data::seg::{Pixels, SegSample, SegWindow};
    let pair = &discover_pairs(&data("drive/training")).unwrap()[0];
    let s = pair.load().unwrap();
    let full = omnirad_data::source::read_raster(&pair.image).unwrap().data;
    assert!(
        matches!(s.pixels, Pixels::U8(_)),
        "8-bit RGB PNG kept as u8"
    );
    assert_eq!(s.pixels.to_f32(), full);
    let as_f32 = SegSample {
        pixels: Pixels::F32(full.clone()),
        ..s.clone()
    };
    for window in [SegWindow::Resize, SegWindow::Sliding { overlap: 8 }] {
        for k in 0..4 {
            let a = s.train_view(window, 48, &mut sample_rng(0, 0, k));
            let b = as_f32.train_view(window, 48, &mut sample_rng(0, 0, k));
            assert_eq!((a.image, a.mask, a.valid), (b.image, b.mask, b.valid));
        }
    }
    assert_eq!(
        s.window(560, 540, 32).image,
        as_f32.window(560, 540, 32).image
    );
    // 16-bit values, and values no integer type holds.
    let dir_guard = tmpdir("pixels16");
    let p = dir_guard.path().join("x.png");
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(9, 5, |x, y| {
        image::Luma([(x * 7001 + y * 13) as u16])
    })
    .save(&p)
    .unwrap();
    let data = omnirad_data::source::read_raster(&p).unwrap().data;
    let px = Pixels::compact(data.clone());
    assert!(matches!(px, Pixels::U16(_)));
    assert_eq!(px.to_f32(), data);
    let odd = data.mapv(|v| v * 0.3);
    assert!(matches!(Pixels::compact(odd.clone()), Pixels::F32(a) if a == odd));
}

#[test]
fn segmentation_images_without_a_mask_are_reported_not_dropped() {
    let busi = data("busi-256/malignant");
    let (a, b) = ("malignant (1)", "malignant (2)");
    // images/ + masks/ with b's mask missing, and a note that is no image.
    let dir_guard = tmpdir("seg-unpaired");
    let dir = dir_guard.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for n in [a, b] {
        std::fs::copy(
            busi.join(format!("{n}.png")),
            dir.join(format!("images/{n}.png")),
        )
        .unwrap();
    }
    std::fs::copy(
        busi.join(format!("{a}_mask.png")),
        dir.join(format!("masks/{a}.png")),
    )
    .unwrap();
    std::fs::write(dir.join("images/notes.txt"), "not an image").unwrap();
    // The flat BUSI layout, the same gap.
    let flat_guard = tmpdir("seg-unpaired-flat");
    let flat = flat_guard.path();
    for f in [
        format!("{a}.png"),
        format!("{a}_mask.png"),
        format!("{b}.png"),
    ] {
        std::fs::copy(busi.join(&f), flat.join(&f)).unwrap();
    }

    for d in [&dir, &flat] {
        let pairs = discover_pairs(d).unwrap();
        assert_eq!(pairs.len(), 2, "{}", d.display());
        let (ok, failed) = omnirad_data::seg::load_pairs(&pairs, false).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].0.ends_with(&format!("{b}.png")) && failed[0].1.contains("no mask found"),
            "{failed:?}"
        );
        let e = omnirad_data::seg::load_pairs(&pairs, true).err().unwrap();
        assert!(e.to_string().contains("no mask found"), "{e}");
    }

    // Images with no mask at all: not a segmentation dataset.
    std::fs::remove_file(dir.join(format!("masks/{a}.png"))).unwrap();
    let e = discover_pairs(dir).unwrap_err().to_string();
    assert!(e.contains("no image/mask pairs found"), "{e}");
}

#[test]
fn item_counts_from_headers_match_the_images_loaded() {
    // Pretraining weights its draws by these counts: each must be what loading gives, for
    // multi-frame DICOM (10-frame MR in three encodings), 3D and 4D NIfTI-1/2 along every axis.
    // anatomical.nii (big-endian) with its voxel axes permuted: i runs along S, k along R, so
    // its axial slices are cut along the file's first axis.
    let d = tmpdir("count");
    let permuted = d.path().join("permuted.nii");
    let mut bytes = std::fs::read(data("nifti-nibabel/anatomical.nii")).unwrap();
    bytes[252..254].copy_from_slice(&0i16.to_be_bytes()); // qform_code
    bytes[254..256].copy_from_slice(&1i16.to_be_bytes()); // sform_code
    for (row, at) in [
        ([0.0f32, 0.0, 2.0, 0.0], 280),
        ([0.0, 2.0, 0.0, 0.0], 296),
        ([2.0, 0.0, 0.0, 0.0], 312),
    ] {
        for (i, v) in row.iter().enumerate() {
            bytes[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_be_bytes());
        }
    }
    std::fs::write(&permuted, &bytes).unwrap();
    let v = NiftiVolume::open(&permuted).unwrap();
    assert_eq!(
        (v.orientation.as_str(), v.shape()),
        ("SAR", [25, 41, 33, 1])
    );
    let mut checked = 0;
    for dir in [
        data("dicom-pydicom"),
        data("nifti-nibabel"),
        d.path().to_path_buf(),
    ] {
        let (items, _) = discover(&dir, Split::Train).unwrap();
        for item in &items {
            for axis in [SliceAxis::Axial, SliceAxis::Coronal, SliceAxis::Sagittal] {
                for time in [None, Some(0)] {
                    let opts = ReadOptions {
                        slice_axis: axis,
                        time,
                        ..Default::default()
                    };
                    let Ok(images) = item.load(&opts) else {
                        continue; // files the reader refuses are covered elsewhere
                    };
                    assert_eq!(
                        item.count(&opts).unwrap(),
                        images.len(),
                        "{} {axis:?} {time:?}",
                        item.id()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "{checked} items × options checked");
    // A truncated header is an error naming the file.
    let p = d.path().join("cut.dcm");
    let bytes = std::fs::read(data("dicom-pydicom/emri_small.dcm")).unwrap();
    std::fs::write(&p, &bytes[..200]).unwrap();
    let item = omnirad_data::Item::File {
        path: p.clone(),
        labels: vec![],
        modality: None,
        anatomy: None,
    };
    let e = item.count(&ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("cut.dcm"), "{e}");
    // So is a DICOM header whose Number of Frames the file cannot hold, or that is no number
    // (the 10-frame MR rewritten; the same file with 10 counts 10).
    for (frames, want) in [
        ("10", Ok(10)),
        (
            "1000000",
            Err("Number of Frames (0028,0008) is 1000000 in a file of"),
        ),
        ("ten", Err("Number of Frames (0028,0008):")),
    ] {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let mut obj = dicom_object::open_file(data("dicom-pydicom/emri_small.dcm")).unwrap();
        obj.put(DataElement::new(
            dicom_dictionary_std::tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(frames),
        ));
        let p = d.path().join(format!("frames-{frames}.dcm"));
        obj.write_to_file(&p).unwrap();
        let item = omnirad_data::Item::File {
            path: p.clone(),
            labels: vec![],
            modality: None,
            anatomy: None,
        };
        match (item.count(&ReadOptions::default()), want) {
            (Ok(n), Ok(w)) => assert_eq!(n, w),
            (Err(e), Err(w)) => {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("frames-{frames}.dcm")) && e.contains(w),
                    "{e}"
                );
            }
            (got, _) => panic!("Number of Frames {frames}: {got:?}"),
        }
    }
    // So is a header that claims more slices than the file holds (anatomical.nii, 33 × 41 × 25
    // int16, with 30 000 slices).
    let lying = d.path().join("lying.nii");
    let mut nii = std::fs::read(data("nifti-nibabel/anatomical.nii")).unwrap();
    nii[46..48].copy_from_slice(&30_000i16.to_be_bytes()); // dim[3]
    std::fs::write(&lying, &nii).unwrap();
    let e = omnirad_data::nifti::slice_count(&lying, SliceAxis::Sagittal, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lying.nii") && e.contains("need 81180000 bytes"),
        "{e}"
    );
}
