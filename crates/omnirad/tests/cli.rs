//! The binary as a user runs it, on the real files in ../shared/data.

use std::path::{Path, PathBuf};
use std::process::Command;

fn data(rel: &str) -> PathBuf {
    let root = std::env::var_os("OMNIRAD_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let p = root.join(rel);
    assert!(
        p.exists(),
        "test data {} not found (set OMNIRAD_DATA)",
        p.display()
    );
    p
}

/// A fresh folder under the system temp dir, removed when the returned guard drops (also when
/// the test fails).
fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("omnirad-cli-{name}-"))
        .tempdir()
        .unwrap()
}

fn omnirad(args: &[&str]) -> (bool, String, String) {
    omnirad_in(Path::new("."), args)
}

/// `omnirad predict --model BUNDLE` on the small CT file of the shared data.
fn predict_ct_small(bundle: &Path) -> (bool, String, String) {
    omnirad(&[
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        data("dicom-pydicom/CT_small.dcm").to_str().unwrap(),
    ])
}

fn omnirad_in(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_omnirad"))
        .current_dir(cwd)
        .args(args)
        .env("CI", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn zero_or_absurd_counts_are_usage_errors_naming_the_flag() {
    // Each of these once panicked (a zero-rank LoRA reshape, chunks(0)), ran a job with a
    // silently changed value (--batch 0 trained with batch 1), or ended the process with
    // "memory allocation of … bytes failed" (a rank, width or side of 10^9).
    let npz = data("medmnist/breastmnist.npz");
    let npz = npz.to_str().unwrap();
    fn with<'a>(cmd: &[&'a str], flag: &'a str, value: &'a str) -> Vec<&'a str> {
        [cmd, &[flag, value]].concat()
    }
    let finetune = [
        "finetune", "--data", npz, "--model", "vit_pico", "--out", "x",
    ];
    let bench = |mode| {
        let b = [
            "bench",
            "medmnist",
            "--data",
            "d",
            "--datasets",
            "breastmnist",
        ];
        [&b[..], &["--model", "vit_pico", "--mode", mode]].concat()
    };
    let embed = [
        "embed", "--model", "vit_pico", "--input", npz, "--out", "x.npy",
    ];
    let viz = [
        "viz", "--model", "vit_pico", "--input", npz, "--out", "x.png",
    ];
    let segment = [
        "segment", "train", "--model", "vit_pico", "--data", "d", "--out", "x",
    ];
    let (at_least_one, sizes, sides) = (
        "whole number ≥ 1",
        "whole number from 1 to 1048576",
        "whole number from 1 to 8192",
    );
    let huge = "1000000000";
    for (args, want) in [
        (with(&finetune, "--batch", "0"), sizes),
        (with(&finetune, "--lora-rank", "0"), sizes),
        (with(&bench("knn"), "--k", "0"), at_least_one),
        (with(&bench("linear"), "--seeds", "0"), at_least_one),
        (with(&embed, "--batch", "0"), sizes),
        (with(&viz, "--k", "0"), at_least_one),
        (with(&finetune, "--lora-rank", huge), sizes),
        (with(&bench("mlp"), "--hidden", huge), sizes),
        (with(&segment, "--width", huge), sizes),
        (with(&segment, "--size", huge), sides),
        (with(&["bench", "speed"], "--img", huge), sides),
    ] {
        let (flag, value) = (args[args.len() - 2], args[args.len() - 1]);
        let (ok, _, err) = omnirad(&args);
        assert!(
            !ok && err.contains(&format!("'{value}' for '{flag}")) && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn embed_a_dicom_folder_skips_and_lists_bad_files() {
    let d_guard = tmp("dcm");
    let d = d_guard.path();
    let out = d.join("emb.npy");
    let embed = |input: &std::path::Path, strict: bool| {
        let mut args = vec!["embed", "--model", "vit_pico", "--input"];
        args.push(input.to_str().unwrap());
        args.extend(["--out", out.to_str().unwrap()]);
        if strict {
            args.push("--strict");
        }
        omnirad(&args)
    };
    // Every image file of the shared DICOM set is read; the two SEG objects are skipped, not
    // failed: a folder scan passes over DICOM objects that hold no image.
    let dicoms = data("dicom-pydicom");
    let (ok, _, err) = embed(&dicoms, false);
    assert!(ok, "{err}");
    assert!(err.contains("skipped 2 file(s)"), "{err}");
    assert!(!d.join("emb.failed.txt").exists());
    let emb: ndarray::Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    let meta = std::fs::read_to_string(d.join("emb.meta.csv")).unwrap();
    assert_eq!(meta.lines().count() - 1, emb.nrows());
    assert_eq!(emb.ncols(), 64);
    // Multi-frame files contribute one row per frame.
    assert_eq!(
        meta.lines()
            .filter(|l| l.contains("emri_small.dcm#"))
            .count(),
        10
    );
    for f in std::fs::read_dir(&dicoms).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        assert_eq!(
            meta.contains(&name),
            !name.starts_with("liver"),
            "{name} in the embeddings"
        );
    }

    // A damaged file is listed with its reason; --strict stops on it.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    let ct = std::fs::read(dicoms.join("CT_small.dcm")).unwrap();
    std::fs::write(mixed.join("ct.dcm"), &ct).unwrap();
    std::fs::write(mixed.join("truncated.dcm"), &ct[..ct.len() / 2]).unwrap();
    std::fs::copy(dicoms.join("liver_1frame.dcm"), mixed.join("seg.dcm")).unwrap();
    let (ok, _, err) = embed(&mixed, false);
    assert!(ok, "{err}");
    assert!(
        err.contains("could not be read") && err.contains("skipped 1 file(s)"),
        "{err}"
    );
    let failed = std::fs::read_to_string(d.join("emb.failed.txt")).unwrap();
    assert!(
        failed.contains("truncated.dcm") && !failed.contains("seg.dcm"),
        "{failed}"
    );
    let (ok, _, err) = embed(&mixed, true);
    assert!(
        !ok && err.contains("truncated.dcm"),
        "strict mode must stop on the bad file: {err}"
    );
    // Nothing readable: an error, and no empty matrix left to look like a finished job.
    let bad = d.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("truncated.dcm"), &ct[..ct.len() / 2]).unwrap();
    std::fs::remove_file(&out).unwrap();
    let (ok, _, err) = embed(&bad, false);
    assert!(
        !ok && err.contains("no image could be read") && !out.exists(),
        "{err}"
    );
    let failed = std::fs::read_to_string(d.join("emb.failed.txt")).unwrap();
    assert!(failed.contains("truncated.dcm"), "{failed}");
    // A clean run over the same output removes the earlier run's failures file.
    std::fs::remove_file(bad.join("truncated.dcm")).unwrap();
    std::fs::write(bad.join("ct.dcm"), &ct).unwrap();
    let (ok, _, err) = embed(&bad, false);
    assert!(ok && out.exists(), "{err}");
    assert!(!d.join("emb.failed.txt").exists());
}

#[test]
fn data_slices_writes_the_images_the_readers_give() {
    let d_guard = tmp("slices");
    let d = d_guard.path();
    let input = d.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for f in [
        "dicom-pydicom/emri_small.dcm",        // 10 MR frames
        "dicom-pydicom/CT_small.dcm",          // one CT slice in HU, file window
        "dicom-pydicom/SC_rgb_jpeg_dcmtk.dcm", // colour
        "nifti-nibabel/anatomical.nii",        // 25 axial slices
    ] {
        let from = data(f);
        std::fs::copy(&from, input.join(from.file_name().unwrap())).unwrap();
    }
    let ct = std::fs::read(data("dicom-pydicom/CT_small.dcm")).unwrap();
    std::fs::write(input.join("cut.dcm"), &ct[..ct.len() / 2]).unwrap();
    let slices = |out: &Path, extra: &[&str]| {
        let fixed = [
            "data",
            "slices",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--every",
            "2",
        ];
        omnirad(&[&fixed[..], extra].concat())
    };
    let out = d.join("slices");
    let (ok, _, err) = slices(&out, &[]);
    assert!(ok && err.contains("cut.dcm"), "{err}");
    let failed = std::fs::read_to_string(out.join("manifest.failed.txt")).unwrap();
    assert!(
        failed.contains("cut.dcm") && failed.lines().count() == 1,
        "{failed}"
    );
    let manifest = std::fs::read_to_string(out.join("manifest.csv")).unwrap();
    // Every second frame or slice: 5 + 1 + 1 + 13.
    assert_eq!(manifest.lines().count(), 1 + 20, "{manifest}");
    assert!(
        manifest.contains("\nemri_small_8.png,,MR,head,"),
        "{manifest}"
    );
    assert!(!manifest.contains("emri_small_9.png"), "{manifest}");
    let png = image::open(out.join("CT_small.png")).unwrap();
    assert_eq!(png.color(), image::ColorType::L16);
    assert_eq!(
        image::open(out.join("SC_rgb_jpeg_dcmtk.png"))
            .unwrap()
            .color(),
        image::ColorType::Rgb16
    );
    // Stopped after two items, with rows of a chunk that did not finish left in the partial
    // manifest (as after a kill), then run again: the same manifest as one uninterrupted run.
    let again = d.join("again");
    let (ok, _, err) = slices(&again, &["--stop-after", "2"]);
    assert!(ok && err.contains("stopped after 2 items"), "{err}");
    assert!(!again.join("manifest.csv").exists());
    let mut partial = std::fs::OpenOptions::new()
        .append(true)
        .open(again.join("manifest.partial.csv"))
        .unwrap();
    std::io::Write::write_all(&mut partial, b"anatomical_axial0.png,,unknown,,x\n").unwrap();
    let (ok, _, err) = slices(&again, &[]);
    assert!(ok && err.contains("continuing after 2 of 5 items"), "{err}");
    assert_eq!(
        std::fs::read_to_string(again.join("manifest.csv")).unwrap(),
        manifest
    );
    assert!(!again.join("manifest.partial.csv").exists());
    // Outputs inside the input folder are not read back as inputs when the job is run again.
    let inner = input.join("slices");
    let (ok, _, err) = slices(&inner, &["--stop-after", "3"]);
    assert!(ok && err.contains("stopped after 3 items"), "{err}");
    let (ok, _, err) = slices(&inner, &[]);
    assert!(
        ok && err.contains("continuing after 3 of 5 items") && err.contains("left out"),
        "{err}"
    );
    let inner_manifest = std::fs::read_to_string(inner.join("manifest.csv")).unwrap();
    assert_eq!(inner_manifest.lines().count(), 1 + 20, "{inner_manifest}");
    std::fs::remove_dir_all(&inner).unwrap();
    // The PNGs give the model the inputs the originals give (to 16-bit rounding): the same
    // embeddings, row by row through the manifest's source ids, and the same modalities.
    let embed = |input: &Path, name: &str| {
        let npy = d.join(name);
        let (ok, _, err) = omnirad(&[
            "embed",
            "--model",
            "vit_pico",
            "--input",
            input.to_str().unwrap(),
            "--out",
            npy.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let e: ndarray::Array2<f32> = ndarray_npy::read_npy(&npy).unwrap();
        let meta = std::fs::read_to_string(npy.with_extension("meta.csv")).unwrap();
        let rows: Vec<Vec<String>> = meta
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect();
        (e, rows)
    };
    let (orig, orig_meta) = embed(&input, "orig.npy");
    let (sliced, sliced_meta) = embed(&out.join("manifest.csv"), "sliced.npy");
    assert_eq!(sliced.nrows(), 20);
    for (k, line) in manifest.lines().skip(1).enumerate() {
        let source = line.rsplit(',').next().unwrap();
        let i = orig_meta.iter().position(|r| r[1] == source).unwrap();
        assert_eq!(sliced_meta[k][2], orig_meta[i][2], "modality of {source}");
        let diff = (&sliced.row(k) - &orig.row(i))
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(diff < 1e-3, "{source}: embeddings differ by {diff}");
    }
}

#[test]
fn info_on_a_folder_surveys_what_embed_would_read() {
    let dicoms = data("dicom-pydicom");
    let survey = |dir: &std::path::Path| {
        let (ok, out, err) = omnirad(&["info", dir.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = survey(&dicoms);
    let images = &v["DICOM images"];
    assert_eq!(
        (v["files"].as_u64(), images["files"].as_u64()),
        (Some(29), Some(27))
    );
    // Frames from the headers: as many as `embed` writes rows after decoding them.
    let d_guard = tmp("info-folder");
    let d = d_guard.path();
    let out = d.join("emb.npy");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--input",
        dicoms.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let emb: ndarray::Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    assert_eq!(images["frames"].as_u64(), Some(emb.nrows() as u64));
    for group in ["modality", "transfer syntax", "rows x columns"] {
        let total: u64 = images[group]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(total, 27, "{group}");
    }
    assert_eq!(
        images["transfer syntax"]["JPEG-LS Lossless Image Compression"],
        1
    );
    assert_eq!(
        v["DICOM objects without an image (skipped)"]
            ["a segmentation, registration or raw-data object"],
        2
    );
    assert!(v.get("unreadable").is_none());
    // NIfTI slices from the headers: as many as `embed` writes rows (axial, all time points).
    let out = d.join("nii.npy");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--input",
        data("nifti-nibabel").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let emb: ndarray::Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    let nii = &survey(&data("nifti-nibabel"))["NIfTI volumes"];
    assert_eq!(nii["files"], 5);
    assert_eq!(nii["axial slices"].as_u64(), Some(emb.nrows() as u64));

    // A damaged file is listed with its reason; a text file counts as skipped.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    let ct = std::fs::read(dicoms.join("CT_small.dcm")).unwrap();
    std::fs::write(mixed.join("ct.dcm"), &ct).unwrap();
    std::fs::write(mixed.join("cut.dcm"), &ct[..ct.len() / 2]).unwrap();
    std::fs::write(mixed.join("notes.txt"), "not an image").unwrap();
    let v = survey(&mixed);
    assert_eq!(v["DICOM images"]["modality"]["CT"], 1);
    assert_eq!(v["other inputs"]["other files (skipped)"], 1);
    let bad = v["unreadable"].as_object().unwrap();
    assert!(
        bad.len() == 1 && bad.keys().next().unwrap().ends_with("cut.dcm"),
        "{bad:?}"
    );
}

#[test]
fn embed_stopped_or_interrupted_continues_to_the_same_output() {
    let d_guard = tmp("dcm-parts");
    let d = d_guard.path();
    // The shared DICOM files and two damaged ones among them (sorted between), so the slices
    // below also cross failed items.
    let dicoms = d.join("dicoms");
    std::fs::create_dir_all(&dicoms).unwrap();
    for f in std::fs::read_dir(data("dicom-pydicom")).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, dicoms.join(f.file_name().unwrap())).unwrap();
    }
    let ct = std::fs::read(data("dicom-pydicom/CT_small.dcm")).unwrap();
    for name in ["JPEG-cut.dcm", "MR_cut.dcm"] {
        std::fs::write(dicoms.join(name), &ct[..ct.len() / 2]).unwrap();
    }
    let run = |out: &str, extra: &[&str]| {
        let out = d.join(out);
        let mut args = vec![
            "embed",
            "--model",
            "vit_pico",
            "--input",
            dicoms.to_str().unwrap(),
            "--batch",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    let (ok, _, err) = run("whole.npy", &[]);
    assert!(ok, "{err}");
    // Three slices: mid-batch, across the bad files, then the rest.
    let (ok, _, err) = run("parts.npy", &["--stop-after", "7"]);
    assert!(ok && err.contains("stopped after 7 items"), "{err}");
    assert!(!d.join("parts.npy").exists());
    assert!(d.join("parts.npy.parts").is_dir());
    let (ok, _, err) = run("parts.npy", &["--stop-after", "15"]);
    assert!(ok && err.contains("continuing after 7 of"), "{err}");
    let (ok, _, err) = run("parts.npy", &[]);
    assert!(ok && err.contains("continuing after 15 of"), "{err}");
    assert!(!d.join("parts.npy.parts").exists(), "parts are removed");
    for f in ["npy", "meta.csv", "failed.txt"] {
        let read = |stem: &str| std::fs::read(d.join(format!("{stem}.{f}"))).unwrap();
        assert!(read("whole") == read("parts"), "{f} differs");
    }
    // Parts of another job (other pooling) are not mixed in.
    let (ok, _, err) = run("other.npy", &["--stop-after", "5"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("other.npy", &["--pool", "mean"]);
    assert!(ok && err.contains("parts of another job"), "{err}");
    let rows = |p: &str| {
        let a: ndarray::Array2<f32> = ndarray_npy::read_npy(d.join(p)).unwrap();
        a
    };
    let (other, whole) = (rows("other.npy"), rows("whole.npy"));
    assert_eq!(other.dim(), whole.dim());
    assert!(
        other.row(0) != whole.row(0),
        "mean pooling, not the class token"
    );
}

#[test]
fn embed_an_npz_split_with_labels_and_csv_output() {
    let d_guard = tmp("npz");
    let d = d_guard.path();
    let out = d.join("breast.npy");
    let npz = data("medmnist/breastmnist.npz");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--pool",
        "cls-mean",
        "--input",
        npz.to_str().unwrap(),
        "--split",
        "val",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let emb: ndarray::Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    let labels: ndarray::Array2<i64> = ndarray_npy::read_npy(d.join("breast.labels.npy")).unwrap();
    assert_eq!((emb.nrows(), emb.ncols(), labels.nrows()), (78, 128, 78));
    assert_eq!(labels.iter().filter(|&&l| l == 0).count(), 21); // official val counts [21, 57]

    let csv = d.join("breast.csv");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--input",
        npz.to_str().unwrap(),
        "--split",
        "val",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 79);
    assert_eq!(text.lines().nth(1).unwrap().split(',').count(), 3 + 64);
}

#[test]
fn embeddings_are_deterministic_under_a_seed() {
    let d_guard = tmp("det");
    let d = d_guard.path();
    let input = data("dicom-pydicom/CT_small.dcm");
    let run = |name: &str| {
        let out = d.join(name);
        let (ok, _, err) = omnirad(&[
            "embed",
            "--model",
            "vit_pico",
            "--seed",
            "3",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        ndarray_npy::read_npy::<_, ndarray::Array2<f32>>(out).unwrap()
    };
    assert_eq!(run("a.npy"), run("b.npy"));
}

#[test]
fn clear_errors_for_bad_requests() {
    let d_guard = tmp("bad");
    let d = d_guard.path();
    let out = d.join("x.npy");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_huge_typo",
        "--input",
        data("dicom-pydicom/CT_small.dcm").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("unknown model 'vit_huge_typo'"),
        "{err}"
    );
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--input",
        d.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("no images found"), "{err}");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        "vit_pico",
        "--input",
        data("dicom-pydicom/CT_small.dcm").to_str().unwrap(),
        "--out",
        d.join("x.txt").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains(".npy or .csv"), "{err}");
    let (ok, _, err) = omnirad(&["info", d.join("missing.dcm").to_str().unwrap()]);
    assert!(!ok && err.contains("missing.dcm"), "{err}");
}

#[test]
fn info_reports_dicom_and_nifti_facts() {
    let (ok, out, err) = omnirad(&[
        "info",
        "--json",
        data("dicom-pydicom/RG3_J2KR.dcm").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["photometric_interpretation"], "MONOCHROME1");
    assert_eq!(v["transfer_syntax_uid"], "1.2.840.10008.1.2.4.90");
    assert_eq!(
        (v["rows"].as_u64(), v["columns"].as_u64()),
        (Some(1760), Some(1760))
    );
    let (ok, out, _) = omnirad(&[
        "info",
        data("nifti-nibabel/anatomical.nii").to_str().unwrap(),
    ]);
    assert!(ok && out.contains("LAS"), "{out}");
    let (ok, out, _) = omnirad(&[
        "data",
        "verify",
        data("medmnist/pneumoniamnist.npz").to_str().unwrap(),
    ]);
    assert!(ok && out.contains("OK") && out.contains("4708"), "{out}");
}

#[test]
fn demo_runs_end_to_end_on_phantoms() {
    let d_guard = tmp("demo");
    let d = d_guard.path();
    let (ok, out, err) = omnirad(&["demo", "--out", d.to_str().unwrap(), "--per-modality", "8"]);
    assert!(ok, "{err}");
    assert!(out.contains("embedded 32 image(s)"), "{out}");
    // Even a random-init encoder's patch statistics separate these four modalities.
    let acc: f64 = out
        .lines()
        .find(|l| l.contains("modality accuracy"))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(acc > 0.5, "{out}");
}

/// `omnirad info PATH --json`, which must succeed.
fn info_json(path: &Path) -> serde_json::Value {
    let (ok, out, err) = omnirad(&["info", path.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../omnirad-model/tests/fixtures")
        .join(name)
}

#[test]
fn convert_a_checkpoint_and_embed_with_it_directly_or_converted() {
    let d_guard = tmp("convert");
    let d = d_guard.path();
    let model = d.join("model");
    let (ok, out, err) = omnirad(&[
        "convert",
        fixture("hf_dinov2_reg").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("4 registers") && out.contains("heads 2"),
        "{out}"
    );
    let img = data("busi-256/benign/benign (1).png");
    let embed = |m: &std::path::Path, name: &str| {
        let o = d.join(name);
        let (ok, _, err) = omnirad(&[
            "embed",
            "--model",
            m.to_str().unwrap(),
            "--input",
            img.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        ndarray_npy::read_npy::<_, ndarray::Array2<f32>>(o).unwrap()
    };
    let a = embed(&model, "a.npy");
    let b = embed(&fixture("hf_dinov2_reg"), "b.npy");
    assert_eq!(a.dim(), (1, 32));
    assert_eq!(a, b);
    // `info` tells the HF checkpoint from the model directory made of it, whose weights hold
    // exactly the values its config makes.
    let hf = info_json(&fixture("hf_dinov2_reg"));
    assert!(hf["format"].to_string().contains("another library"), "{hf}");
    assert!(
        hf["convert"].to_string().contains("omnirad convert"),
        "{hf}"
    );
    assert_eq!(hf["hidden_size"], 32);
    let ours = info_json(&model);
    assert_eq!(ours["format"], "omnirad model directory");
    assert_eq!(ours["weights"]["values"], ours["parameters"]);
    assert!(ours["weights"].get("problem").is_none(), "{ours}");

    let (ok, _, err) = omnirad(&[
        "convert",
        fixture("timm_p16").to_str().unwrap(),
        "--out",
        d.join("t").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--heads"), "{err}");
    let (ok, _, err) = omnirad(&[
        "convert",
        fixture("timm_p16").to_str().unwrap(),
        "--heads",
        "2",
        "--out",
        d.join("t").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}

#[test]
fn bench_medmnist_knn_table_and_bad_names() {
    let d_guard = tmp("mm");
    let d = d_guard.path();
    let out = d.join("table");
    let dir = data("medmnist");
    let bench = |args: &[&str]| {
        let fixed = [
            "bench",
            "medmnist",
            "--data",
            dir.to_str().unwrap(),
            "--model",
            "vit_pico",
        ];
        omnirad(&[&fixed[..], args].concat())
    };
    let (ok, stdout, err) = bench(&["--datasets", "breastmnist", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("| breastmnist |") && stdout.contains("ResNet-18 (28) 0.901 / 0.863"),
        "{stdout}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("table.json")).unwrap()).unwrap();
    let m = &j["results"][0]["runs"][0];
    for k in ["acc", "auc", "macro_f1"] {
        let v = m[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // The confusion matrix covers all 156 official test images.
    let total: u64 = m["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 156);
    // --eval-split val scores the 78 val images (21 malignant, 57 benign/normal) instead; the
    // modes that select an epoch select it on a holdout of train, as the log says. With
    // --eval-split train --folds K every one of the 546 train images (147 / 399) is scored
    // once, by a model fitted without its fold, and the epoch is chosen on val.
    for (split, per_class, chosen_by) in [
        (&["val"][..], [21, 57], "by train-holdout macro-F1"),
        (&["train", "--folds", "5"], [147, 399], "by val macro-F1"),
    ] {
        for mode in [
            &["knn"][..],
            &["linear", "--epochs", "5"],
            &["finetune", "--epochs", "1"],
        ] {
            let cv = split[0] == "train";
            // Five one-epoch fine-tunes cost more than they check; two folds suffice.
            let split = if cv && mode[0] == "finetune" {
                &["train", "--folds", "2"][..]
            } else {
                split
            };
            let (ok, stdout, err) = bench(
                &[
                    &["--datasets", "breastmnist", "--eval-split"][..],
                    split,
                    &["--mode"],
                    mode,
                    &["--out", out.to_str().unwrap()],
                ]
                .concat(),
            );
            let caption = if cv {
                "fold cross-validated"
            } else {
                "Val split"
            };
            assert!(ok && stdout.contains(caption), "{err}{stdout}");
            assert_eq!(
                err.contains("chose epoch") && err.contains(chosen_by),
                mode[0] != "knn",
                "{err}"
            );
            assert_eq!(
                err.contains("fold 2/") && err.contains("held-out fold ACC"),
                cv,
                "{err}"
            );
            let j: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("table.json")).unwrap())
                    .unwrap();
            assert_eq!(j["split"], split[0]);
            let per_class_got: Vec<u64> = j["results"][0]["runs"][0]["confusion"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap())
                        .sum()
                })
                .collect();
            assert_eq!(per_class_got, per_class, "{split:?} {mode:?}");
        }
    }
    // A soup of two one-epoch fine-tunes per seed: its members select on the seed's holdout.
    let (ok, stdout, err) = bench(&[
        "--datasets",
        "breastmnist",
        "--eval-split",
        "val",
        "--mode",
        "finetune",
        "--epochs",
        "1",
        "--soup",
        "2",
    ]);
    assert!(
        ok && stdout.contains("a uniform soup of 2 fine-tunes per seed")
            && err.contains("soup member 2/2 (seed 1000): epoch 1")
            && err.contains("breastmnist seed 0: soup of 2 fine-tunes (train-holdout ACC"),
        "{err}{stdout}"
    );
    let (ok, _, err) = bench(&[
        "--datasets",
        "breastmnist",
        "--mode",
        "finetune",
        "--soup",
        "0",
    ]);
    assert!(!ok && err.contains("--soup"), "{err}");
    // Options of the fine-tuning modes are refused by name where features stay frozen.
    for (mode, flag, value) in [
        ("linear", "--soup", "3"),
        ("knn", "--ensemble", "3"),
        ("linear", "--class-weight", "balanced"),
        ("knn", "--augment", "strong"),
    ] {
        let (ok, _, err) = bench(&["--datasets", "breastmnist", "--mode", mode, flag, value]);
        assert!(
            !ok && err.contains(&format!("{flag} applies to --mode finetune or lora")),
            "{err}"
        );
    }
    let (ok, _, err) = bench(&["--datasets", "breastmnist", "--mode", "lora", "--l2sp", "1"]);
    assert!(!ok && err.contains("--l2sp pulls"), "{err}");
    let (ok, _, err) = bench(&["--datasets", "breastmnist", "--eval-split", "train"]);
    assert!(!ok && err.contains("add --folds K"), "{err}");
    let (ok, _, err) = bench(&["--datasets", "breastmnist", "--folds", "5"]);
    assert!(!ok && err.contains("add --eval-split train"), "{err}");
    let (ok, _, err) = bench(&["--datasets", "breastmnst"]);
    assert!(!ok && err.contains("unknown dataset 'breastmnst'"), "{err}");
    let (ok, _, err) = bench(&["--datasets", "bloodmnist"]);
    assert!(!ok && err.contains("bloodmnist.npz: not found"), "{err}");
}

#[test]
fn bench_medmnist_reuses_cached_features() {
    let d_guard = tmp("mmcache");
    let d = d_guard.path();
    let cache = d.join("cache");
    let dir = data("medmnist");
    let args = [
        "bench",
        "medmnist",
        "--data",
        dir.to_str().unwrap(),
        "--datasets",
        "breastmnist",
        "--model",
        "vit_pico",
        "--mode",
        "linear",
        "--epochs",
        "5",
        "--cache",
        cache.to_str().unwrap(),
    ];
    let (ok, first, err) = omnirad(&args);
    assert!(ok, "{err}");
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".labels.npy")).count(),
        3,
        "{files:?}"
    ); // train, val, test
    let (ok, second, err) = omnirad(&args);
    assert!(ok, "{err}");
    assert_eq!(first, second);
    // A different pooling must not hit the same cache entries.
    let (ok, _, _) = omnirad(&[&args[..], &["--pool", "mean"]].concat());
    assert!(ok);
    assert_eq!(
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".labels.npy"))
            .count(),
        6
    );
}

#[test]
fn bench_medmnist_out_keeps_finished_runs_for_a_rerun() {
    let d_guard = tmp("mmresume");
    let d = d_guard.path();
    let out = d.join("sub").join("table");
    let log = d.join("sub").join("table.runs.jsonl");
    // A copy of the data, to give it a new modification time below.
    let dir = d.join("data");
    std::fs::create_dir(&dir).unwrap();
    let npz = dir.join("breastmnist.npz");
    std::fs::copy(data("medmnist/breastmnist.npz"), &npz).unwrap();
    let args = |epochs: &'static str| {
        [
            "bench",
            "medmnist",
            "--data",
            dir.to_str().unwrap(),
            "--datasets",
            "breastmnist",
            "--model",
            "vit_pico",
            "--mode",
            "linear",
            "--epochs",
            epochs,
            "--seeds",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let run = |epochs| {
        let a = args(epochs);
        let (ok, _, err) = omnirad(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        let accs: Vec<f64> = j["results"][0]["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["acc"].as_f64().unwrap())
            .collect();
        (accs, err)
    };
    let (first, _) = run("3");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .map(|l| l["run"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["breastmnist seed 0", "breastmnist seed 1"]
    );
    // An interrupted job: seed 0 never finished, a line was cut short, seed 1 is on record (its
    // ACC marked so a reuse shows).
    let mut seed1 = lines[1].clone();
    seed1["result"]["acc"] = serde_json::json!(0.0123);
    std::fs::write(&log, format!("{seed1}\n{{\"key\": \"ab\n")).unwrap();
    // The same bytes with a new modification time (a copied or restored dataset) are the same
    // data.
    std::fs::File::options()
        .write(true)
        .open(&npz)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    let (again, err) = run("3");
    assert_eq!(again, [first[0], 0.0123], "{err}");
    assert!(
        err.contains("breastmnist seed 1: finished earlier"),
        "{err}"
    );
    assert!(
        err.contains("table.runs.jsonl line 2: not a finished run"),
        "{err}"
    );
    // Other settings are other runs.
    let (other, err) = run("4");
    assert!(
        other[1] != 0.0123 && !err.contains("finished earlier"),
        "{err}"
    );
}

/// A pretraining config small enough for CI: vit_pico at 32 px on the two MedMNIST train splits.
fn tiny_pretrain_config(dir: &std::path::Path, steps: usize, extra: &str) -> PathBuf {
    let cfg = dir.join("pretrain.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"preset = "dinov2"
[model]
arch = "vit_pico"
drop_path_rate = 0.1
[head]
prototypes = 256
hidden_dim = 128
bottleneck_dim = 32
[crops]
global_size = 32
n_local = 2
local_size = 16
[optim]
epochs = 1
epoch_length = {steps}
batch_size = 16
warmup_epochs = 0.2
warmup_teacher_temp_epochs = 0.5
base_lr = 2e-2
[[data.sources]]
path = "{}"
[[data.sources]]
path = "{}"
weight = 2.0
[run]
checkpoint_every = 3
{extra}
"#,
            data("medmnist/pneumoniamnist.npz").display(),
            data("medmnist/breastmnist.npz").display()
        ),
    )
    .unwrap();
    cfg
}

fn metrics(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pretrain_a_few_steps_lowers_the_loss_and_exports_the_teacher() {
    let d_guard = tmp("pretrain");
    let d = d_guard.path();
    let breast = data("medmnist/breastmnist.npz");
    let keep = format!(
        "keep_teacher_every = 10\neval_knn = [{:?}]",
        breast.display()
    );
    let cfg = tiny_pretrain_config(d, 24, &keep);
    let run = d.join("run");
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m = metrics(&run);
    assert_eq!(m.len(), 24);
    let mean = |rows: &[serde_json::Value], k: &str| {
        rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    let (first, last) = (&m[..4], &m[20..]);
    assert!(
        mean(last, "loss") < mean(first, "loss"),
        "loss {} → {}",
        mean(first, "loss"),
        mean(last, "loss")
    );
    for k in [
        "dino",
        "ibot",
        "koleo",
        "lr",
        "teacher_temp",
        "momentum",
        "grad_norm",
        "prototypes_used",
        "embedding_std",
    ] {
        assert!(
            m.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)),
            "{k}"
        );
    }
    // Schedules as configured: lr warms up from 0, the teacher temperature from 0.04.
    assert_eq!(m[0]["lr"].as_f64().unwrap(), 0.0);
    assert!((m[0]["teacher_temp"].as_f64().unwrap() - 0.04).abs() < 1e-12);
    assert!((m[23]["teacher_temp"].as_f64().unwrap() - 0.07).abs() < 1e-12);
    // Teachers kept along the run: steps 10 and 20, each its own weights.
    let weights = |dir: &str| tensors(&run.join(dir).join("model.safetensors"));
    assert!(weights("teacher-step10") != weights("teacher-step20"));
    assert!(run.join("teacher-step20/dino_head.safetensors").is_file());
    assert!(!run.join("teacher-step24").exists());
    // Each kept teacher is scored on BreastMNIST's val split, as `bench medmnist --eval-split
    // val` scores it from its folder, and the better one (ties: the later) is teacher-best.
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        evals
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [10, 20]
    );
    for e in &evals {
        let teacher = run.join(e["teacher"].as_str().unwrap());
        let table = d.join(format!("val-{}", e["step"]));
        let (ok, _, err) = omnirad(&[
            "bench",
            "medmnist",
            "--data",
            data("medmnist").to_str().unwrap(),
            "--datasets",
            "breastmnist",
            "--model",
            teacher.to_str().unwrap(),
            "--eval-split",
            "val",
            "--out",
            table.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(table.with_extension("json")).unwrap())
                .unwrap();
        let bench = &j["results"][0]["runs"][0];
        for k in ["acc", "auc", "macro_f1"] {
            let (a, b) = (
                e["results"][0][k].as_f64().unwrap(),
                bench[k].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-9, "{k}: pretrain {a}, bench {b}");
        }
        assert_eq!(e["score"], e["results"][0]["macro_f1"]);
    }
    let best = if evals[0]["score"].as_f64() > evals[1]["score"].as_f64() {
        "teacher-step10"
    } else {
        "teacher-step20"
    };
    assert!(weights("teacher-best") == weights(best));
    // The resolved config is complete (preset values filled in) and the teacher embeds.
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("koleo_weight = 0.1") && resolved.contains("prototypes = 256"));
    let out = d.join("emb.npy");
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        run.join("teacher").to_str().unwrap(),
        "--input",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let emb: ndarray::Array2<f32> = ndarray_npy::read_npy(&out).unwrap();
    assert_eq!(emb.dim(), (156, 64));
    // Continuing SSL from the exported teacher picks up its DINO head as well.
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--init",
        run.join("teacher").to_str().unwrap(),
        "--out",
        d.join("run2").to_str().unwrap(),
        "--stop-after",
        "1",
    ]);
    assert!(
        ok && err.contains("DINO head from") && err.contains("256 prototypes"),
        "{err}"
    );
    // A finished run refuses to be overwritten.
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--resume"), "{err}");
}

#[test]
fn pretrain_resume_is_bit_identical() {
    let d_guard = tmp("resume");
    let d = d_guard.path();
    let keep = format!(
        "keep_teacher_every = 2\neval_knn = [{:?}]",
        data("medmnist/breastmnist.npz").display()
    );
    let cfg = tiny_pretrain_config(d, 6, &keep);
    // The interrupted run is started the way users do: from a working folder, with the config,
    // its data sources and the run folder all given as relative paths, and resumed from elsewhere.
    std::fs::create_dir_all(d.join("work/configs")).unwrap();
    for f in ["pneumoniamnist.npz", "breastmnist.npz"] {
        std::os::unix::fs::symlink(data(&format!("medmnist/{f}")), d.join("work").join(f)).unwrap();
    }
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(data("medmnist").to_str().unwrap(), "..");
    assert_eq!(text.matches("\"../").count(), 3, "{text}");
    std::fs::write(d.join("work/configs/pretrain.toml"), text).unwrap();
    let (a, b) = (d.join("a"), d.join("work/runs/b"));
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = omnirad_in(
        &d.join("work"),
        &[
            "pretrain",
            "--config",
            "configs/pretrain.toml",
            "--out",
            "runs/b",
            "--stop-after",
            "3",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(metrics(&b).len(), 3);
    // `info` on the stopped run: how far it got, the command that continues it, its teachers.
    let stopped = info_json(&b);
    assert_eq!(stopped["format"], "pretraining run");
    assert_eq!(stopped["progress"], "3 of 6 steps (1 epochs × 6)");
    assert!(
        stopped["resume"].to_string().contains("--resume"),
        "{stopped}"
    );
    assert_eq!(stopped["best val k-NN"]["teacher"], "teacher-step2");
    assert_eq!(
        stopped["teachers"],
        serde_json::json!(["teacher", "teacher-best", "teacher-step2"])
    );
    // A line the killed run wrote after its last checkpoint is dropped, not counted as best.
    let evals = b.join("eval.jsonl");
    let mut text = std::fs::read_to_string(&evals).unwrap();
    text += "{\"step\": 4, \"score\": 2.0}\n";
    std::fs::write(&evals, text).unwrap();
    let (ok, _, err) = omnirad(&["pretrain", "--out", b.to_str().unwrap(), "--resume"]);
    assert!(ok, "{err}");
    let ckpt = |r: &PathBuf| std::fs::read(r.join("checkpoint.safetensors")).unwrap();
    assert!(
        ckpt(&a) == ckpt(&b),
        "resumed checkpoint differs from the uninterrupted run"
    );
    let strip = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("img_per_s");
        v
    };
    let (ma, mb): (Vec<_>, Vec<_>) = (
        metrics(&a).into_iter().map(strip).collect(),
        metrics(&b).into_iter().map(strip).collect(),
    );
    assert_eq!(ma, mb);
    // The kept teachers' scores and the best of them, as in the uninterrupted run (the data
    // file is named by the path each run was given).
    let evals = |r: &PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(r.join("eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["results"][0].as_object_mut().unwrap().remove("file");
                v
            })
            .collect()
    };
    assert_eq!(evals(&a).len(), 3);
    assert_eq!(evals(&a), evals(&b));
    let best = |r: &PathBuf| tensors(&r.join("teacher-best/model.safetensors"));
    assert!(best(&a) == best(&b));
    let finished = info_json(&a);
    assert_eq!(finished["progress"], "6 of 6 steps (1 epochs × 6)");
    assert!(finished.get("resume").is_none(), "{finished}");
}

#[test]
fn pretrain_config_errors_are_clear() {
    let d_guard = tmp("pretrain-bad");
    let d = d_guard.path();
    let cfg = tiny_pretrain_config(d, 2, "bogus_key = 1");
    let out = d.join("run");
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("bogus_key") && err.contains("pretrain.toml"),
        "{err}"
    );
    let cfg = tiny_pretrain_config(d, 2, "");
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "simclr",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("simclr"), "{err}");
    let (ok, _, err) = omnirad(&["pretrain", "--out", out.to_str().unwrap(), "--resume"]);
    assert!(!ok && err.contains("nothing to resume"), "{err}");
    for (extra, why) in [
        (
            "eval_knn = [\"x/breastmnist.npz\"]",
            "set run.keep_teacher_every",
        ),
        (
            "keep_teacher_every = 5\neval_knn = [\"scans.npz\"]",
            "scans.npz is not named like an official 2D MedMNIST file",
        ),
        (
            "keep_teacher_every = 5\neval_knn = [\"nowhere/breastmnist.npz\"]",
            "nowhere/breastmnist.npz not found",
        ),
    ] {
        let cfg = tiny_pretrain_config(d, 2, extra);
        let (ok, _, err) = omnirad(&[
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            d.join("run-eval").to_str().unwrap(),
        ]);
        assert!(!ok && err.contains(why), "{extra}: {err}");
    }
    let cfg = tiny_pretrain_config(d, 2, "");
    // A source that does not exist is named.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("breastmnist.npz", "nosuch.npz");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        d.join("run2").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("nosuch.npz"), "{err}");
}

/// Labels of one split of an official MedMNIST file, as class ids.
fn npz_labels(file: &Path, split: &str) -> Vec<i64> {
    let mut npz = ndarray_npy::NpzReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let y: ndarray::Array2<u8> = npz.by_name(&format!("{split}_labels.npy")).unwrap();
    y.iter().map(|&v| i64::from(v)).collect()
}

/// `predict --split SPLIT` of `bundle` on BreastMNIST: its ACC against the split's labels.
fn predicted_acc(bundle: &Path, split: &str) -> f64 {
    let y = npz_labels(&data("medmnist/breastmnist.npz"), split);
    let rows = predict_breast(bundle, split);
    assert_eq!(rows.len(), y.len());
    let right = rows
        .iter()
        .zip(&y)
        .filter(|(p, &c)| (p[1] > p[0]) == (c == 1))
        .count();
    right as f64 / y.len() as f64
}

/// A bundle's k-NN bank: the shape of its features, its labels row by row.
fn knn_bank(bundle: &Path) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(bundle.join("knn.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels = st
        .tensor("labels")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as i64)
        .collect();
    (st.tensor("features").unwrap().shape().to_vec(), labels)
}

#[test]
fn finetune_knn_mix_bundle_votes_with_its_training_features() {
    let d_guard = tmp("knn-mix");
    let d = d_guard.path();
    let bundle = d.join("bundle");
    let (ok, out, err) = finetune_breast(&bundle, &["--epochs", "2", "--knn-mix"]);
    assert!(ok, "{err}");
    assert!(err.contains("k-NN mix λ"), "{err}");
    let test: serde_json::Value = serde_json::from_str(&out).unwrap();
    let path = bundle.join("bundle.json");
    let mut b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let lambda = b["knn"]["lambda"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&lambda), "{b}");
    assert_eq!(
        (&b["knn"]["k"], &b["finetune"]["knn_mix"]),
        (&20.into(), &true.into())
    );
    // The bank: vit_pico's 64-d class token for each of the 546 training images, their labels.
    let (features, labels) = knn_bank(&bundle);
    assert_eq!((features, labels.len()), (vec![546, 64], 546));
    assert_eq!(
        labels,
        npz_labels(&data("medmnist/breastmnist.npz"), "train")
    );
    let v = info_json(&bundle);
    assert_eq!(
        (&v["knn"], &v["knn bank"]["tensors"]),
        (&b["knn"], &2.into())
    );
    // predict mixes as the run scored test.
    let acc = predicted_acc(&bundle, "test");
    assert!(
        (acc - test["acc"].as_f64().unwrap()).abs() < 1.5 / 156.0,
        "{acc} {test}"
    );
    // The nearest neighbour's vote alone (k = 1, λ = 1) on train: each image is its own
    // nearest neighbour, so it gets its own label back, which a 2-epoch head cannot.
    b["knn"]["lambda"] = 1.0.into();
    b["knn"]["k"] = 1.into();
    std::fs::write(&path, b.to_string()).unwrap();
    let acc = predicted_acc(&bundle, "train");
    assert!(acc > 0.97, "the vote alone on train: ACC {acc}");
    // A mix that cannot vote, or a bank that does not fit, is an error naming the file.
    b["knn"]["temperature"] = 0.0.into();
    std::fs::write(&path, b.to_string()).unwrap();
    let (ok, _, err) = predict_ct_small(&bundle);
    assert!(
        !ok && err.contains("bundle.json: invalid k-NN mix") && err.contains("temperature 0"),
        "{err}"
    );
    b["knn"]["temperature"] = 0.07.into();
    std::fs::write(&path, b.to_string()).unwrap();
    let bank = bundle.join("knn.safetensors");
    std::fs::copy(bundle.join("head.safetensors"), &bank).unwrap();
    let (ok, _, err) = predict_ct_small(&bundle);
    assert!(
        !ok && err.contains("knn.safetensors") && err.contains("no tensor 'features'"),
        "{err}"
    );
}

#[test]
fn finetune_knn_mix_ensemble_votes_with_each_members_bank() {
    let d_guard = tmp("knn-ens");
    let d = d_guard.path();
    let ens = d.join("ens");
    let (ok, out, err) = finetune_breast(&ens, &["--epochs", "1", "--ensemble", "2", "--knn-mix"]);
    assert!(ok, "{err}");
    let test: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Each member's own features of the train split: the same shape, other values.
    let banks: Vec<Vec<u8>> = (1..=2)
        .map(|k| std::fs::read(ens.join(format!("members/{k}/knn.safetensors"))).unwrap())
        .collect();
    let features: Vec<Vec<u8>> = banks
        .iter()
        .map(|b| {
            let st = safetensors::SafeTensors::deserialize(b).unwrap();
            let f = st.tensor("features").unwrap();
            assert_eq!(f.shape(), [546, 64]);
            f.data().to_vec()
        })
        .collect();
    assert!(features[0] != features[1], "one bank for both members");
    // predict mixes the members' mean with their mean vote, as the run scored test.
    let acc = predicted_acc(&ens, "test");
    assert!(
        (acc - test["acc"].as_f64().unwrap()).abs() < 1.5 / 156.0,
        "{acc} {test}"
    );
}

#[test]
fn knn_mix_votes_per_label_in_soups_and_folds() {
    // ChestMNIST's layout (14 labels, multi-label): a soup of two fine-tunes keeps one bank of
    // the train split's 14-label rows, and predict mixes per label as the run scored test.
    let d_guard = tmp("knn-multi");
    let d = d_guard.path();
    let npz = d.join("chestmnist.npz");
    write_medmnist_like(&npz, false, 14, true);
    let bundle = d.join("soup");
    let (ok, out, err) = omnirad(&[
        "finetune",
        "--data",
        npz.to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        bundle.to_str().unwrap(),
        "--epochs",
        "1",
        "--soup",
        "2",
        "--knn-mix",
    ]);
    assert!(ok && err.contains("k-NN mix λ"), "{err}");
    let test: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (features, labels) = knn_bank(&bundle);
    assert_eq!(features, [42, 64]);
    assert_eq!(labels, npz_labels(&npz, "train"));
    let (ok, out, err) = omnirad(&[
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        npz.to_str().unwrap(),
        "--split",
        "test",
    ]);
    assert!(ok, "{err}");
    let rows: Vec<Vec<f64>> = out.lines().skip(1).map(probabilities).collect();
    let y = npz_labels(&npz, "test");
    assert_eq!((rows.len(), y.len()), (14, 14 * 14));
    // MedMNIST's multi-label ACC: per-label accuracy at 0.5, averaged over labels.
    let right = rows
        .iter()
        .flatten()
        .zip(&y)
        .filter(|(&p, &t)| (p > 0.5) == (t == 1))
        .count();
    let acc = right as f64 / y.len() as f64;
    assert!(
        (acc - test["acc"].as_f64().unwrap()).abs() < 1.5 / 196.0,
        "{acc} {test}"
    );
    // Cross-validated, each fold's mix is chosen on val and scored on its held-out fold.
    let (ok, stdout, err) = omnirad(&[
        "bench",
        "medmnist",
        "--data",
        d.to_str().unwrap(),
        "--datasets",
        "chestmnist",
        "--model",
        "vit_pico",
        "--mode",
        "finetune",
        "--epochs",
        "1",
        "--eval-split",
        "train",
        "--folds",
        "2",
        "--knn-mix",
    ]);
    assert!(ok && stdout.contains("| chestmnist |"), "{err}");
    assert_eq!(err.matches("chosen by val macro-F1").count(), 2, "{err}");
    assert_eq!(
        err.matches("the head alone on held-out fold").count(),
        2,
        "{err}"
    );
}

#[test]
fn finetune_writes_a_bundle_that_predicts() {
    let d_guard = tmp("finetune");
    let d = d_guard.path();
    let bundle = d.join("bundle");
    let (ok, out, err) = omnirad(&[
        "finetune",
        "--data",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        bundle.to_str().unwrap(),
        "--epochs",
        "2",
        "--select",
        "auc",
        "--l2sp",
        "5",
    ]);
    assert!(ok && !err.contains("not the official"), "{err}");
    let test: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(test["auc"]
        .as_f64()
        .is_some_and(|a| (0.0..=1.0).contains(&a)));
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("bundle.json")).unwrap())
            .unwrap();
    assert_eq!(b["classes"], 2);
    assert_eq!(
        (&b["finetune"]["select"], &b["finetune"]["l2sp"]),
        (&"auc".into(), &5.0.into())
    );
    // `info` on the bundle: what it was scored, its encoder checked against its config.
    let v = info_json(&bundle);
    assert_eq!(v["format"], "classification bundle");
    assert_eq!(v["test"], b["test"]);
    let enc = &v["encoder"];
    assert_eq!(enc["parameters"], 107_776, "vit_pico, LayerScale included");
    assert_eq!(enc["weights"]["values"], enc["parameters"]);
    assert!(enc["weights"].get("problem").is_none(), "{enc}");
    let head = info_json(&bundle.join("head.safetensors"));
    assert_eq!(
        (&head["format"], &head["tensors"]),
        (&"safetensors".into(), &2.into())
    );
    assert_eq!(head, {
        let mut h = v["head"].clone();
        h["format"] = "safetensors".into();
        h
    });
    // A cut weights file is reported as such, a file that is no safetensors is an error.
    let cut = d.join("cut");
    std::fs::create_dir(&cut).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(bundle.join("encoder").join(f), cut.join(f)).unwrap();
    }
    let w = cut.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 4]).unwrap();
    let problem = info_json(&cut)["weights"]["problem"].to_string();
    assert!(
        problem.contains(&format!("the file has {}", bytes.len() - 4)),
        "{problem}"
    );
    std::fs::write(&w, b"{not safetensors").unwrap();
    let (ok, _, err) = omnirad(&["info", cut.to_str().unwrap()]);
    assert!(
        !ok && err.contains("model.safetensors") && err.contains("header"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("history.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // Predict on the test split: one row per image, probabilities summing to 1.
    let csv = d.join("p.csv");
    let (ok, _, err) = omnirad(&[
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--split",
        "test",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(ok && !err.contains("warning"), "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().next().unwrap(), "id,p_0,p_1,predicted");
    assert_eq!(text.lines().count(), 157);
    for l in text.lines().skip(1) {
        let p = probabilities(l);
        assert!(
            p.len() == 2 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-4,
            "{l}"
        );
        // The more probable class by its MedMNIST name (quoted: it holds a comma).
        let name = if p[0] > p[1] {
            ",malignant"
        } else {
            ",\"normal, benign\""
        };
        assert!(l.ends_with(name), "{l}");
    }
    // A folder with a multi-frame file and a truncated one, stopped after two items and run
    // again, gives what one uninterrupted run gives: a row per frame, the bad file listed.
    let folder = d.join("cases");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"] {
        std::fs::copy(data("dicom-pydicom").join(f), folder.join(f)).unwrap();
    }
    let ct = std::fs::read(data("dicom-pydicom/CT_small.dcm")).unwrap();
    std::fs::write(folder.join("cut.dcm"), &ct[..ct.len() / 2]).unwrap();
    let predict_folder = |out: &Path, extra: &[&str]| {
        let fixed = [
            "predict",
            "--model",
            bundle.to_str().unwrap(),
            "--input",
            folder.to_str().unwrap(),
            "--batch",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        omnirad(&[&fixed[..], extra].concat())
    };
    let whole = d.join("whole.csv");
    let (ok, _, err) = predict_folder(&whole, &[]);
    assert!(ok && err.contains("cut.dcm"), "{err}");
    let whole_text = std::fs::read_to_string(&whole).unwrap();
    assert_eq!(whole_text.lines().count(), 1 + 1 + 1 + 10, "{whole_text}");
    assert!(whole_text.contains("emri_small.dcm#9,"), "{whole_text}");
    let failed = std::fs::read_to_string(d.join("whole.failed.txt")).unwrap();
    assert!(
        failed.starts_with(&format!("{}\t", folder.join("cut.dcm").display())),
        "{failed}"
    );
    let parted = d.join("parted.csv");
    let (ok, _, err) = predict_folder(&parted, &["--stop-after", "2"]);
    assert!(
        ok && err.contains("stopped after 2 items") && !parted.exists(),
        "{err}"
    );
    let (ok, _, err) = predict_folder(&parted, &[]);
    assert!(ok && err.contains("continuing after 2 of 4 items"), "{err}");
    assert_eq!(std::fs::read_to_string(&parted).unwrap(), whole_text);
    assert!(!d.join("parted.csv.parts").exists());
    // The bundle's encoder reads DICOM like any model.
    let (ok, out, err) = predict_ct_small(&bundle);
    assert!(ok && out.lines().count() == 2, "{err}");
    // Another MedMNIST set's file is read (any image is), with a warning.
    let (ok, out, err) = omnirad(&[
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        data("medmnist/pneumoniamnist.npz").to_str().unwrap(),
        "--split",
        "val",
    ]);
    assert!(
        ok && out.lines().count() == 525
            && err.contains("pneumoniamnist.npz holds pneumoniamnist images")
            && err.contains("trained on breastmnist"),
        "{err}"
    );
    // Nothing readable: an error, no CSV, the reasons listed.
    let cut_only = d.join("cut_only");
    std::fs::create_dir_all(&cut_only).unwrap();
    std::fs::copy(folder.join("cut.dcm"), cut_only.join("cut.dcm")).unwrap();
    let none = d.join("none.csv");
    let (ok, _, err) = omnirad(&[
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        cut_only.to_str().unwrap(),
        "--out",
        none.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("no readable images") && !none.exists(),
        "{err}"
    );
    assert!(std::fs::read_to_string(d.join("none.failed.txt"))
        .unwrap()
        .contains("cut.dcm"));
    // bundle.json edited (`from` → `to`, edits accumulating), then predict.
    let predict_edited = |from: &str, to: &str| {
        let json = bundle.join("bundle.json");
        let text = std::fs::read_to_string(&json).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&json, text.replace(from, to)).unwrap();
        predict_ct_small(&bundle)
    };
    // A head that does not match the declared classes is refused by name.
    let (ok, _, err) = predict_edited("\"classes\": 2", "\"classes\": 3");
    assert!(
        !ok && err.contains("head.safetensors") && err.contains("3 classes"),
        "{err}"
    );
    // A task predict does not know (it would otherwise fall back to a softmax).
    let (ok, _, err) = predict_edited("\"task\": \"binary\"", "\"task\": \"multi-label\"");
    assert!(
        !ok && err.contains("bundle.json: unknown task 'multi-label'"),
        "{err}"
    );
    // Not a MedMNIST file name; not a bundle.
    let (ok, _, err) = omnirad(&[
        "finetune",
        "--data",
        data("dicom-pydicom/CT_small.dcm").to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not a MedMNIST file name"), "{err}");
    // Fine-tuning BreastMNIST with one bad option.
    let out = d.join("x");
    let finetune_with = |extra: &[&str]| finetune_breast(&out, extra);
    // An EMA decay outside (0, 1).
    let (ok, _, err) = finetune_with(&["--ema", "1.5"]);
    assert!(
        !ok && err.contains("EMA decay must be a number in (0, 1)"),
        "{err}"
    );
    // A negative mixup α.
    let (ok, _, err) = finetune_with(&["--mixup=-1"]);
    assert!(
        !ok && err.contains("mixup's α must be a number ≥ 0"),
        "{err}"
    );
    // NaN or out-of-range training settings are refused before any work.
    for (flag, value, want) in [
        ("--lr", "nan", "must be a number > 0"),
        ("--label-smoothing", "1", "must be a number in [0, 1)"),
        ("--layer-decay", "0", "must be a number in (0, 1]"),
        ("--weight-decay", "inf", "must be a number ≥ 0"),
        ("--sam", "0", "must be a number > 0"),
    ] {
        let (ok, _, err) = finetune_with(&[flag, value]);
        assert!(!ok && err.contains(flag) && err.contains(want), "{err}");
    }
    // A run that diverges stops with the reason instead of writing a bundle of NaN weights.
    let (ok, _, err) = finetune_with(&["--epochs", "1", "--lr", "1e4", "--clip", "0"]);
    assert!(
        !ok && err.contains("training diverged in epoch 1") && err.contains("--clip 1"),
        "{err}"
    );
    assert!(!out.join("bundle.json").exists());
    let (ok, _, err) = omnirad(&[
        "predict",
        "--model",
        d.to_str().unwrap(),
        "--input",
        csv.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not a bundle"), "{err}");
}

#[test]
fn probe_trains_the_head_and_leaves_the_encoder_as_it_was() {
    let d_guard = tmp("probe");
    let d = d_guard.path();
    let model = d.join("m");
    let (ok, _, err) = omnirad(&[
        "convert",
        fixture("hf_dinov2").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let src = model.join("model.safetensors");
    let bundle = d.join("b");
    let (ok, _, err) = omnirad(&[
        "probe",
        "--data",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
        "--epochs",
        "2",
        "--lr",
        "1e-2",
    ]);
    assert!(ok, "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("bundle.json")).unwrap())
            .unwrap();
    assert_eq!(b["finetune"]["frozen"], true);
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let (orig, enc) = (read(&src), read(&bundle.join("encoder/model.safetensors")));
    let (orig, enc) = (
        safetensors::SafeTensors::deserialize(&orig).unwrap(),
        safetensors::SafeTensors::deserialize(&enc).unwrap(),
    );
    for (name, t) in orig.tensors() {
        assert_eq!(
            enc.tensor(&name).unwrap().data(),
            t.data(),
            "{name} changed"
        );
    }
    let (ok, _, err) = omnirad(&[
        "probe",
        "--data",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        d.join("c").to_str().unwrap(),
        "--lora-rank",
        "4",
    ]);
    assert!(!ok && err.contains("frozen"), "{err}");
    // L2-SP acts on the encoder's weights, which neither a probe nor LoRA trains.
    let (npz, out) = (data("medmnist/breastmnist.npz"), d.join("l2sp"));
    for (cmd, extra) in [("probe", &[][..]), ("finetune", &["--lora-rank", "4"])] {
        let fixed = [
            cmd,
            "--data",
            npz.to_str().unwrap(),
            "--model",
            "vit_pico",
            "--out",
            out.to_str().unwrap(),
            "--l2sp",
            "1",
        ];
        let (ok, _, err) = omnirad(&[&fixed[..], extra].concat());
        assert!(
            !ok && err.contains("--l2sp pulls") && err.contains("keeps the encoder frozen"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn pretrain_resume_from_a_corrupt_checkpoint_names_the_file() {
    let d_guard = tmp("resume-bad");
    let d = d_guard.path();
    let cfg = tiny_pretrain_config(d, 4, "");
    let run = d.join("run");
    let (ok, _, err) = omnirad(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--stop-after",
        "1",
    ]);
    assert!(ok, "{err}");
    let ckpt = run.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = omnirad(&["pretrain", "--out", run.to_str().unwrap(), "--resume"]);
    assert!(!ok && err.contains("checkpoint.safetensors"), "{err}");
}

#[test]
fn segment_train_eval_predict_on_busi() {
    let d_guard = tmp("seg");
    let d = d_guard.path();
    let bundle = d.join("bundle");
    let busi = data("busi-256/malignant");
    let (ok, out, err) = omnirad(&[
        "segment",
        "train",
        "--data",
        busi.to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        bundle.to_str().unwrap(),
        "--size",
        "32",
        "--epochs",
        "3",
        "--overlays",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("test: Dice"), "{out}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("segment.json")).unwrap())
            .unwrap();
    assert_eq!(b["head"]["classes"], 2);
    let (ok, out, err) = omnirad(&["info", bundle.to_str().unwrap()]);
    assert!(
        ok && out.contains("format: segmentation bundle"),
        "{out}{err}"
    );
    assert!(
        out.contains("encoder: ViT dim 64 depth 2 heads 2 patch 4,"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(bundle.join("overlays")).unwrap().count(),
        2
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("history.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // eval reloads the bundle and reproduces the test score written at training time.
    let (ok, out, err) = omnirad(&[
        "segment",
        "eval",
        "--model",
        bundle.to_str().unwrap(),
        "--data",
        busi.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (a, t) = (
        s["dice"].as_f64().unwrap(),
        b["test"]["dice"].as_f64().unwrap(),
    );
    assert!(
        (a - t).abs() < 1e-9,
        "eval Dice {a} vs training-time test Dice {t}"
    );
    assert_eq!(s["images"], b["test"]["images"]);
    // predict: a folder with a PNG, a DICOM and a corrupt file → two masks and overlays, one skip.
    let input = d.join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(busi.join("malignant (1).png"), input.join("case.png")).unwrap();
    std::fs::write(input.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    // DICOM in, masks out, at the slice's own size.
    std::fs::copy(data("dicom-pydicom/CT_small.dcm"), input.join("ct.dcm")).unwrap();
    // The same file name in a subfolder gets its own mask, in the same subfolder of the output.
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::copy(busi.join("malignant (2).png"), input.join("sub/case.png")).unwrap();
    let masks = d.join("masks");
    let predict = |extra: &[&str]| {
        let mut args = vec![
            "segment",
            "predict",
            "--model",
            bundle.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            masks.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    let (ok, _, err) = predict(&[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("could not be read") && err.contains("broken.png"),
        "{err}"
    );
    let failed = std::fs::read_to_string(masks.join("masks.failed.txt")).unwrap();
    assert!(
        failed.contains("broken.png") && failed.lines().count() == 1,
        "{failed}"
    );
    let m = image::open(masks.join("case_mask.png")).unwrap().to_luma8();
    let src = image::open(busi.join("malignant (1).png")).unwrap();
    assert_eq!((m.width(), m.height()), (src.width(), src.height()));
    assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    assert!(masks.join("case_overlay.png").is_file());
    let overlay = |p: &str| image::open(masks.join(p)).unwrap().to_rgb8().into_raw();
    assert!(
        masks.join("sub/case_mask.png").is_file()
            && overlay("sub/case_overlay.png") != overlay("case_overlay.png"),
        "one image's outputs written for both"
    );
    let ct = image::open(masks.join("ct_mask.png")).unwrap();
    assert_eq!((ct.width(), ct.height()), (128, 128));
    let index = std::fs::read_to_string(masks.join("masks.csv")).unwrap();
    assert_eq!(index.lines().count(), 4, "{index}");
    assert!(
        index.contains(&format!(
            "{},sub/case_mask.png,sub/case_overlay.png",
            input.join("sub/case.png").display()
        )),
        "{index}"
    );
    // --strict stops at the corrupt file.
    let (ok, _, err) = predict(&["--strict"]);
    assert!(!ok && err.contains("broken.png"), "{err}");
    // Every row of an npz split gets its own files (they share the file's name).
    let rows = d.join("rows");
    let (ok, _, err) = omnirad(&[
        "segment",
        "predict",
        "--model",
        bundle.to_str().unwrap(),
        "--input",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--split",
        "val",
        "--out",
        rows.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let written = std::fs::read_dir(&rows).unwrap().count();
    assert_eq!(
        written,
        2 * 78 + 1,
        "masks and overlays of 78 rows, and masks.csv"
    );
    assert!(rows.join("breastmnist_val_77_mask.png").is_file());
    // Stopped after 30 rows and run again, the job continues and ends as the uninterrupted one.
    let (resumed, breast) = (d.join("resumed"), data("medmnist/breastmnist.npz"));
    let split_job = |extra: &[&str]| {
        let mut args = vec![
            "segment",
            "predict",
            "--model",
            bundle.to_str().unwrap(),
            "--input",
            breast.to_str().unwrap(),
            "--split",
            "val",
            "--out",
            resumed.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    let (ok, _, err) = split_job(&["--stop-after", "30"]);
    assert!(ok && err.contains("stopped after 30 items"), "{err}");
    assert!(!resumed.join("masks.csv").exists());
    let (ok, _, err) = split_job(&[]);
    assert!(ok && err.contains("continuing after 30 of 78"), "{err}");
    let index = |dir: &std::path::Path| std::fs::read_to_string(dir.join("masks.csv")).unwrap();
    assert_eq!(index(&resumed), index(&rows));
    assert_eq!(std::fs::read_dir(&resumed).unwrap().count(), written);
    assert_eq!(
        std::fs::read(resumed.join("breastmnist_val_77_mask.png")).unwrap(),
        std::fs::read(rows.join("breastmnist_val_77_mask.png")).unwrap()
    );
    // A damaged head file is named.
    let head = bundle.join("head.safetensors");
    let bytes = std::fs::read(&head).unwrap();
    std::fs::write(&head, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = omnirad(&[
        "segment",
        "eval",
        "--model",
        bundle.to_str().unwrap(),
        "--data",
        busi.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("head.safetensors"), "{err}");
    // segment.json's sizes are checked before any tensor is made (they panicked or aborted).
    std::fs::write(&head, &bytes).unwrap();
    let json = bundle.join("segment.json");
    let good = std::fs::read_to_string(&json).unwrap();
    for (edit, want) in [
        (
            ("train", "size", serde_json::json!(3)),
            "train.size 3 is not a multiple of the encoder's patch size 4 up to 8192",
        ),
        (
            ("head", "layers", serde_json::json!([1, 1])),
            "must be ascending, distinct and below the depth 2",
        ),
    ] {
        let ((section, key, value), mut b) = (
            edit,
            serde_json::from_str::<serde_json::Value>(&good).unwrap(),
        );
        b[section][key] = value;
        std::fs::write(&json, b.to_string()).unwrap();
        let (ok, _, err) = predict(&[]);
        assert!(
            !ok && err.contains("segment.json") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn segment_drive_in_sliding_windows_at_native_resolution() {
    let d_guard = tmp("seg-drive");
    let d = d_guard.path();
    let (ok, out, err) = omnirad(&[
        "segment",
        "train",
        "--data",
        data("drive").to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        d.join("b").to_str().unwrap(),
        "--size",
        "64",
        "--window",
        "sliding",
        "--overlap",
        "8",
        "--epochs",
        "1",
        "--views-per-image",
        "2",
        "--head",
        "linear",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("16 train / 4 val / 20 test"), "{err}");
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("b/segment.json")).unwrap()).unwrap();
    assert_eq!(b["train"]["window"]["kind"], "sliding");
    // Overlays are written at DRIVE's native 565×584.
    let first = std::fs::read_dir(d.join("b/overlays"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let o = image::open(first).unwrap();
    assert_eq!((o.width(), o.height()), (565, 584));
    assert!(out.contains("over 20 images"), "{out}");
}

#[test]
fn segment_errors_are_clear() {
    let d_guard = tmp("seg-bad");
    let d = d_guard.path();
    let busi = data("busi-256/malignant");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "segment",
            "train",
            "--data",
            busi.to_str().unwrap(),
            "--model",
            "vit_pico",
            "--out",
            d.to_str().unwrap(),
        ];
        // Every call below fails before training starts.
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    let (ok, _, err) = run(&["--size", "30"]);
    assert!(
        !ok && err.contains("not a multiple of the encoder's patch size 4"),
        "{err}"
    );
    let (ok, _, err) = run(&["--window", "sliding", "--size", "32", "--overlap", "32"]);
    assert!(!ok && err.contains("--overlap 32 must be smaller"), "{err}");
    let (ok, _, err) = run(&["--epochs", "0"]);
    assert!(
        !ok && err.contains("'0' for '--epochs") && err.contains("whole number ≥ 1"),
        "{err}"
    );
    let (ok, _, err) = run(&["--layers", "5"]);
    assert!(!ok && err.contains("below the depth 2"), "{err}");
    let (ok, _, err) = run(&["--layers", "1,1"]);
    assert!(!ok && err.contains("ascending, distinct"), "{err}");
    let (ok, _, err) = omnirad(&[
        "bench",
        "medsegbench",
        "--data",
        data("").to_str().unwrap(),
        "--datasets",
        "nosuch",
        "--model",
        "vit_pico",
    ]);
    assert!(!ok && err.contains("dataset 'nosuch' not found"), "{err}");
    let (ok, _, err) = omnirad(&[
        "segment",
        "eval",
        "--model",
        d.to_str().unwrap(),
        "--data",
        busi.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not a segmentation bundle"), "{err}");
}

#[test]
fn bench_medsegbench_out_keeps_trained_heads_for_a_rerun() {
    let d_guard = tmp("msb-resume");
    let d = d_guard.path();
    let out = d.join("table");
    let run = |heads: &str| {
        omnirad(&[
            "bench",
            "medsegbench",
            "--data",
            data("").to_str().unwrap(),
            "--datasets",
            "busi",
            "--model",
            "vit_pico",
            "--heads",
            heads,
            "--size",
            "32",
            "--epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (ok, first, err) = run("linear");
    assert!(
        ok && first.contains("| busi | linear head, frozen encoder |"),
        "{err}"
    );
    // Rerun: the row comes from the log, not from training again.
    let (ok, again, err) = run("linear");
    assert!(
        ok && err.contains("busi: the Linear head: finished earlier"),
        "{err}"
    );
    assert!(!err.contains("training"), "{err}");
    assert_eq!(first, again);
    // A second head: the first is reused, the new one trained.
    let (ok, both, err) = run("linear,adapter");
    assert!(
        ok && err.contains("busi: the Adapter head: training"),
        "{err}"
    );
    let row = |t: &str, m: &str| t.lines().find(|l| l.contains(m)).map(String::from);
    assert_eq!(row(&both, "linear head"), row(&first, "linear head"));
    assert!(row(&both, "adapter head").is_some(), "{both}");
}

#[test]
fn index_retrieve_and_bench_retrieval() {
    let d_guard = tmp("index");
    let d = d_guard.path();
    let breast = data("medmnist/breastmnist.npz");
    let idx = d.join("idx");
    let (ok, _, err) = omnirad(&[
        "index",
        "build",
        "--model",
        "vit_pico",
        "--input",
        breast.to_str().unwrap(),
        "--split",
        "test",
        "--out",
        idx.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // The same index built in two slices (as after a stop or a kill) is the same index.
    let build = |extra: &[&str]| {
        let mut args = vec![
            "index",
            "build",
            "--model",
            "vit_pico",
            "--input",
            breast.to_str().unwrap(),
            "--split",
            "test",
            "--batch",
            "16",
            "--out",
        ];
        let out = d.join("idx2");
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    let (ok, _, err) = build(&["--stop-after", "40"]);
    assert!(ok && err.contains("stopped after 40 items"), "{err}");
    assert!(!d.join("idx2/index.json").exists());
    let (ok, _, err) = build(&[]);
    assert!(
        ok && err.contains("continuing after 40 of 156 items"),
        "{err}"
    );
    assert!(!d.join("idx2/parts").exists());
    for f in ["index.json", "embeddings.npy"] {
        let a = std::fs::read(idx.join(f)).unwrap();
        assert!(
            a == std::fs::read(d.join("idx2").join(f)).unwrap(),
            "{f} differs"
        );
    }
    // Unreadable files are left out of an index and listed beside it.
    let mixed = d.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    let ct = std::fs::read(data("dicom-pydicom/CT_small.dcm")).unwrap();
    std::fs::write(mixed.join("ct.dcm"), &ct).unwrap();
    std::fs::write(mixed.join("cut.dcm"), &ct[..ct.len() / 2]).unwrap();
    let idx3 = d.join("idx3");
    let (ok, _, err) = omnirad(&[
        "index",
        "build",
        "--model",
        "vit_pico",
        "--input",
        mixed.to_str().unwrap(),
        "--out",
        idx3.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("index of 1 images"), "{err}");
    let failed = std::fs::read_to_string(idx3.join("index.failed.txt")).unwrap();
    assert!(
        failed.starts_with(&format!("{}\t", mixed.join("cut.dcm").display())),
        "{failed}"
    );
    // Every test image, queried against an index of the test split, finds itself first.
    let (ok, out, err) = omnirad(&[
        "retrieve",
        "--index",
        idx.to_str().unwrap(),
        "--query",
        breast.to_str().unwrap(),
        "--split",
        "test",
        "--k",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(r.len(), 156);
    for q in &r {
        let top = &q["results"][0];
        assert_eq!(top["id"], q["query"]);
        assert!((top["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(q["results"].as_array().unwrap().len(), 3);
    }
    let (ok, _, err) = omnirad(&[
        "retrieve",
        "--index",
        d.to_str().unwrap(),
        "--query",
        breast.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not an index"), "{err}");

    // An index of a model directory whose weights then change (a continued pretraining run
    // rewrites its teacher in place) is refused; the same bytes again are accepted.
    let model = d.join("model");
    let (ok, _, err) = omnirad(&[
        "convert",
        fixture("hf_dinov2_reg").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let idx4 = d.join("idx4");
    let ct = data("dicom-pydicom/CT_small.dcm");
    let (ok, _, err) = omnirad(&[
        "index",
        "build",
        "--model",
        model.to_str().unwrap(),
        "--input",
        ct.to_str().unwrap(),
        "--out",
        idx4.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let retrieve4 = || {
        omnirad(&[
            "retrieve",
            "--index",
            idx4.to_str().unwrap(),
            "--query",
            ct.to_str().unwrap(),
        ])
    };
    assert!(retrieve4().0);
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut changed = original.clone();
    let at = changed.len() - 4; // the lowest mantissa bit of the last f32: still finite
    changed[at] ^= 0x01;
    std::fs::write(&weights, &changed).unwrap();
    let (ok, _, err) = retrieve4();
    assert!(
        !ok && err.contains("index.json: the encoder") && err.contains("has changed"),
        "{err}"
    );
    let v = info_json(&idx4);
    assert_eq!(v["format"], "retrieval index");
    assert!(v["encoder files"].as_str().unwrap().contains("has changed"));
    std::fs::write(&weights, &original).unwrap();
    assert!(retrieve4().0);
    let v = info_json(&idx4);
    assert_eq!(v["encoder files"], "unchanged since the build");
    assert_eq!(
        (v["items"].as_u64(), v["modalities"]["CT"].as_u64()),
        (Some(1), Some(1))
    );

    let table = d.join("ret");
    let (ok, out, err) = omnirad(&[
        "bench",
        "retrieval",
        "--model",
        "vit_pico",
        "--gallery",
        breast.to_str().unwrap(),
        "--k",
        "1,5",
        "--out",
        table.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("156 queries") && out.contains("546 gallery"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(table.with_extension("json")).unwrap())
            .unwrap();
    let s = &j["scores"];
    // At k = 1, precision and recall are the same number; recall can only grow with k.
    assert_eq!(s[0]["recall"], s[0]["precision"]);
    assert!(s[1]["recall"].as_f64().unwrap() >= s[0]["recall"].as_f64().unwrap());
    let (ok, _, err) = omnirad(&[
        "bench",
        "retrieval",
        "--model",
        "vit_pico",
        "--gallery",
        data("dicom-pydicom").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("without a label"), "{err}");
}

#[test]
fn viz_two_models_side_by_side_with_metrics() {
    let d_guard = tmp("viz");
    let d = d_guard.path();
    let (ok, out, err) = omnirad(&[
        "viz",
        "--model",
        "vit_pico,vit_pico",
        "--input",
        data("medmnist/pneumoniamnist.npz").to_str().unwrap(),
        "--input",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--input",
        &format!("{}=fundus", data("drive/training/images").display()),
        "--max-per-input",
        "40",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("| vit_pico | modality | 3 |"), "{out}");
    for p in ["pca", "tsne", "umap"] {
        let png = image::open(d.join(format!("{p}.png"))).unwrap();
        assert_eq!(
            (png.width(), png.height()),
            (1440, 640),
            "{p}: two panels side by side"
        );
        let svg = std::fs::read_to_string(d.join(format!("{p}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("fundus (20)") && svg.contains("US (40)"),
            "{p}: legend"
        );
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.join("metrics.json")).unwrap()).unwrap();
    // DRIVE has no labels, so the grouping by label is left out: modality and dataset for each
    // of the two models; the same model gives the same numbers.
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["grouping"], "modality");
    assert_eq!(rows[0]["silhouette"], rows[2]["silhouette"]);
    assert_eq!(rows[1]["nmi"], rows[3]["nmi"]);
    let (ok, _, err) = omnirad(&[
        "viz",
        "--model",
        "a,b,c",
        "--input",
        "x",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("one model or two"), "{err}");
}

#[test]
fn segment_train_resumes_to_the_same_bundle() {
    let d_guard = tmp("seg-resume");
    let d = d_guard.path();
    let busi = data("busi-256/malignant");
    let run = |out: &str, extra: &[&str]| {
        let out = d.join(out);
        let mut args = vec![
            "segment",
            "train",
            "--data",
            busi.to_str().unwrap(),
            "--model",
            "vit_pico",
            "--out",
            out.to_str().unwrap(),
            "--size",
            "32",
            "--epochs",
            "3",
            "--overlays",
            "0",
        ];
        args.extend_from_slice(extra);
        omnirad(&args)
    };
    resumes_like_an_uninterrupted_run(d, run, 1, "segment.json");
}

/// `omnirad finetune` of a random-init `vit_pico` on BreastMNIST into `out`, with `args`.
fn finetune_breast(out: &Path, args: &[&str]) -> (bool, String, String) {
    let npz = data("medmnist/breastmnist.npz");
    let fixed = [
        "finetune",
        "--data",
        npz.to_str().unwrap(),
        "--model",
        "vit_pico",
        "--out",
        out.to_str().unwrap(),
    ];
    omnirad(&[&fixed[..], args].concat())
}

/// `omnirad predict` of a bundle on BreastMNIST's test split: one row of class probabilities
/// per image.
fn predict_breast_test(model: &Path) -> Vec<Vec<f64>> {
    predict_breast(model, "test")
}

/// `omnirad predict` of a bundle on one BreastMNIST split.
fn predict_breast(model: &Path, split: &str) -> Vec<Vec<f64>> {
    let (ok, out, err) = omnirad(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--input",
        data("medmnist/breastmnist.npz").to_str().unwrap(),
        "--split",
        split,
    ]);
    assert!(ok, "{err}");
    out.lines().skip(1).map(probabilities).collect()
}

/// The class probabilities of a `predict` CSV row (the numbers after its id).
fn probabilities(line: &str) -> Vec<f64> {
    line.split(',')
        .skip(1)
        .map_while(|v| v.parse().ok())
        .collect()
}

#[test]
fn finetune_resumes_to_the_same_bundle() {
    let d_guard = tmp("ft-resume");
    let d = d_guard.path();
    let run = |out: &str, extra: &[&str]| {
        let fixed = ["--epochs", "3", "--head-epochs", "1"];
        finetune_breast(&d.join(out), &[&fixed[..], extra].concat())
    };
    // Stopped inside the full fine-tuning phase (epoch 1 is the head-only one).
    resumes_like_an_uninterrupted_run(d, run, 2, "bundle.json");
    let history = std::fs::read_to_string(d.join("full/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 4);
    // Nothing to resume in a fresh directory; a cut-short checkpoint is named.
    let (ok, _, err) = run("none", &["--resume"]);
    assert!(!ok && err.contains("no run in"), "{err}");
    let (ok, _, err) = run("cut", &["--stop-after", "1"]);
    assert!(ok && err.contains("stopped after epoch 1;"), "{err}");
    // Resumed past its --stop-after, a run makes one more epoch and says which.
    let (ok, _, err) = run("cut", &["--resume", "--stop-after", "1"]);
    assert!(ok && err.contains("stopped after epoch 2;"), "{err}");
    let ckpt = d.join("cut/checkpoint.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = run("cut", &["--resume"]);
    assert!(!ok && err.contains("cut/checkpoint.safetensors"), "{err}");
}

#[test]
fn finetune_soup_resumes_member_by_member_to_the_same_bundle() {
    let d_guard = tmp("ft-soup");
    let d = d_guard.path();
    let run = |out: &str, extra: &[&str]| {
        finetune_breast(&d.join(out), &[&["--epochs", "2"][..], extra].concat())
    };
    let (ok, _, err) = run("full", &["--soup", "2"]);
    assert!(ok, "{err}");
    let bundle = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(run).join("bundle.json")).unwrap())
            .unwrap()
    };
    let full = bundle("full");
    let seeds: Vec<_> = full["soup"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seed"].clone())
        .collect();
    assert_eq!(seeds, [0, 1000]);
    // The members' histories stay; their weights, kept for a resume, do not.
    let history = std::fs::read_to_string(d.join("full/members/2/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 2);
    assert!(!d.join("full/members/1/selected.safetensors").exists());
    // Member 1 is the plain fine-tune of the seed.
    let (ok, _, err) = run("plain", &[]);
    assert!(ok, "{err}");
    assert_eq!(full["soup"][0]["val"], bundle("plain")["val"]);
    // Stopped at member 0's last epoch, then inside member 1, then finished: the same soup.
    let (ok, _, err) = run("parts", &["--soup", "2", "--stop-after", "2"]);
    assert!(ok && err.contains("stopped after epoch 2"), "{err}");
    let (ok, _, err) = run("parts", &["--soup", "2", "--resume", "--stop-after", "1"]);
    assert!(ok && err.contains("stopped after epoch 1"), "{err}");
    assert!(d.join("parts/members/1/selected.safetensors").is_file());
    assert!(d.join("parts/members/2/checkpoint.safetensors").is_file());
    let (ok, _, err) = run("parts", &["--resume"]);
    assert!(!ok && err.contains("settings differ"), "{err}");
    let (ok, _, err) = run("parts", &["--soup", "2", "--resume"]);
    assert!(ok && err.contains("member 1: done before"), "{err}");
    assert_eq!(bundle("parts")["soup"], full["soup"]);
    let head = |run: &str| tensors(&d.join(run).join("head.safetensors"));
    assert!(head("full") == head("parts"), "resumed soup differs");
    assert!(
        head("full") != head("plain"),
        "the soup is its first member"
    );
}

#[test]
fn finetune_class_weight_balanced_predicts_the_rare_class_more() {
    // BreastMNIST's train split is 27 % malignant (class 0): weighting the loss so both classes
    // count the same must move the predicted malignant probability toward one half.
    let d_guard = tmp("ft-class-weight");
    let d = d_guard.path();
    let mean_malignant = |name: &str, extra: &[&str]| -> f64 {
        let out = d.join(name);
        let (ok, _, err) = finetune_breast(&out, &[&["--epochs", "2"][..], extra].concat());
        assert!(ok, "{err}");
        let p: Vec<f64> = predict_breast_test(&out).iter().map(|row| row[0]).collect();
        assert_eq!(p.len(), 156);
        p.iter().sum::<f64>() / p.len() as f64
    };
    let plain = mean_malignant("plain", &[]);
    let balanced = mean_malignant("balanced", &["--class-weight", "balanced"]);
    assert!(
        balanced > plain + 0.05 && balanced < 0.75,
        "mean p(malignant): {plain:.3} plain, {balanced:.3} balanced"
    );
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("balanced/bundle.json")).unwrap())
            .unwrap();
    assert_eq!(bundle["finetune"]["class_weight"], "balanced");
    let (ok, _, err) = finetune_breast(&d.join("bad"), &["--class-weight", "inverse"]);
    assert!(
        !ok && err.contains("unknown class weighting 'inverse'"),
        "{err}"
    );
    let (ok, _, err) = finetune_breast(&d.join("bad"), &["--augment", "wild"]);
    assert!(!ok && err.contains("unknown augmentation 'wild'"), "{err}");
}

#[test]
fn finetune_ensemble_predicts_the_mean_of_its_members() {
    let d_guard = tmp("ft-ensemble");
    let d = d_guard.path();
    let ens = d.join("ens");
    let (ok, _, err) = finetune_breast(&ens, &["--epochs", "2", "--ensemble", "2"]);
    assert!(
        ok && err.contains("ensemble member 2/2 (seed 1000)")
            && err.contains("breastmnist: an ensemble of 2 fine-tunes; test ACC"),
        "{err}"
    );
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ens.join("bundle.json")).unwrap()).unwrap();
    let seeds: Vec<_> = bundle["ensemble"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [0, 1000]);
    assert!(bundle.get("soup").is_none() && !ens.join("encoder").exists());
    // Each member as a bundle of its own: the ensemble's probabilities are their mean.
    let members: Vec<_> = (1..=2)
        .map(|k| {
            let (from, to) = (ens.join(format!("members/{k}")), d.join(format!("m{k}")));
            std::fs::create_dir_all(to.join("encoder")).unwrap();
            for f in std::fs::read_dir(from.join("encoder")).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join("encoder").join(f.file_name().unwrap())).unwrap();
            }
            std::fs::copy(from.join("head.safetensors"), to.join("head.safetensors")).unwrap();
            let mut one = bundle.clone();
            one.as_object_mut().unwrap().remove("ensemble");
            std::fs::write(to.join("bundle.json"), one.to_string()).unwrap();
            predict_breast_test(&to)
        })
        .collect();
    let mean = predict_breast_test(&ens);
    assert_eq!(mean.len(), 156);
    assert!(members[0] != members[1], "the members are one model");
    for (i, row) in mean.iter().enumerate() {
        for (c, p) in row.iter().enumerate() {
            let want = (members[0][i][c] + members[1][i][c]) / 2.0;
            assert!(
                (p - want).abs() <= 2e-6,
                "image {i} class {c}: {p} against {want}"
            );
        }
    }
    // Members that would need different inputs are refused by name.
    let config = ens.join("members/2/encoder/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"stretch\"", "\"pad\"")).unwrap();
    let (ok, _, err) = predict_ct_small(&ens);
    assert!(
        !ok && err.contains("ensemble member 2 preprocesses"),
        "{err}"
    );
    let (ok, _, err) = finetune_breast(&d.join("both"), &["--soup", "2", "--ensemble", "2"]);
    assert!(
        !ok && err.contains("--ensemble") && err.contains("--soup"),
        "{err}"
    );
}

/// A safetensors file's tensors by name, to compare weights: burn writes the header's metadata in
/// any order, so equal weights need not be equal bytes.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

/// `run(out, extra args)` trains into `d/out`. A run stopped after epoch `stop` and resumed ends
/// with the uninterrupted run's head and history, writes `finished` only at the end, refuses to
/// continue under other settings, and removes its checkpoint when done.
fn resumes_like_an_uninterrupted_run(
    d: &Path,
    run: impl Fn(&str, &[&str]) -> (bool, String, String),
    stop: usize,
    finished: &str,
) {
    let (ok, _, err) = run("full", &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("parts", &["--stop-after", &stop.to_string()]);
    assert!(
        ok && err.contains(&format!("stopped after epoch {stop}")),
        "{err}"
    );
    assert!(!d.join("parts").join(finished).exists());
    assert!(d.join("parts/checkpoint.safetensors").is_file());
    let (ok, _, err) = run("parts", &["--resume", "--lr", "0.01"]);
    assert!(!ok && err.contains("settings differ"), "{err}");
    let (ok, _, err) = run("parts", &["--resume"]);
    assert!(
        ok && err.contains(&format!("resuming after epoch {stop}")),
        "{err}"
    );
    assert!(d.join("parts").join(finished).is_file());
    assert!(!d.join("parts/checkpoint.safetensors").exists());
    let head = |run: &str| tensors(&d.join(run).join("head.safetensors"));
    let (a, b) = (head("full"), head("parts"));
    assert!(
        !a.is_empty() && a == b,
        "resumed head differs from the uninterrupted run's"
    );
    let history = |run: &str| std::fs::read_to_string(d.join(run).join("history.jsonl")).unwrap();
    assert!(history("full") == history("parts"), "histories differ");
}

/// An npz in the official MedMNIST layout (uint8 images, uint8 labels [N, L]) with images whose
/// brightness follows the first label, so every split has every class.
fn write_medmnist_like(path: &std::path::Path, rgb: bool, classes: usize, multi_label: bool) {
    use ndarray::{Array2, ArrayD, IxDyn};
    let f = std::fs::File::create(path).unwrap();
    let mut w = ndarray_npy::NpzWriter::new(f);
    for (split, n) in [("train", 42usize), ("val", 14), ("test", 14)] {
        let cols = if multi_label { classes } else { 1 };
        let labels = Array2::<u8>::from_shape_fn((n, cols), |(i, j)| {
            if multi_label {
                ((i + j) % 3 == 0) as u8
            } else {
                (i % classes) as u8
            }
        });
        let shape: Vec<usize> = if rgb {
            vec![n, 28, 28, 3]
        } else {
            vec![n, 28, 28]
        };
        let images = ArrayD::<u8>::from_shape_fn(IxDyn(&shape), |ix| {
            let c = labels[[ix[0], 0]] as usize;
            (40 + 150 * c / classes.max(2) + (ix[1] * 7 + ix[2] * 3) % 50) as u8
        });
        w.add_array(format!("{split}_images"), &images).unwrap();
        w.add_array(format!("{split}_labels"), &labels).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn bench_medmnist_handles_rgb_multiclass_and_multilabel_files() {
    // DermaMNIST (RGB, 7 classes) and ChestMNIST (grey, 14 labels, multi-label) in the official
    // layout: the names pick the task, channels and class count.
    let d_guard = tmp("mm-formats");
    let d = d_guard.path();
    std::fs::create_dir_all(d).unwrap();
    write_medmnist_like(&d.join("dermamnist.npz"), true, 7, false);
    write_medmnist_like(&d.join("chestmnist.npz"), false, 14, true);
    for mode in ["knn", "finetune"] {
        let out = d.join(format!("t-{mode}"));
        let (ok, stdout, err) = omnirad(&[
            "bench",
            "medmnist",
            "--data",
            d.to_str().unwrap(),
            "--datasets",
            "dermamnist,chestmnist",
            "--model",
            "vit_pico",
            "--mode",
            mode,
            "--epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{mode}: {err}");
        assert!(
            stdout.contains("| dermamnist |") && stdout.contains("| chestmnist |"),
            "{stdout}"
        );
        // Files under official names that are not the official release are flagged.
        for name in ["dermamnist", "chestmnist"] {
            assert!(
                err.contains(&format!("is not the official {name} release")),
                "{err}"
            );
        }
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        for (r, classes) in j["results"].as_array().unwrap().iter().zip([7, 14]) {
            let m = &r["runs"][0];
            for k in ["acc", "auc", "macro_f1"] {
                let v = m[k].as_f64().unwrap();
                assert!(
                    (0.0..=1.0).contains(&v),
                    "{mode} {}: {k} = {v}",
                    r["dataset"]
                );
            }
            assert_eq!(m["recall"].as_array().unwrap().len(), classes, "{m}");
            // MedMNIST's multi-label AUC averages over all 14 labels.
            assert_eq!(m["auc_classes"].as_u64().unwrap() as usize, classes, "{m}");
        }
    }
    // Another input size: the table says which; sizes off the patch grid are refused.
    for (size, ok_expected) in [("36", true), ("30", false)] {
        let (ok, stdout, err) = omnirad(&[
            "bench",
            "medmnist",
            "--data",
            d.to_str().unwrap(),
            "--datasets",
            "dermamnist",
            "--model",
            "vit_pico",
            "--input-size",
            size,
        ]);
        assert_eq!(ok, ok_expected, "{err}");
        if ok {
            assert!(stdout.contains("28px files resized to 36px"), "{stdout}");
        } else {
            assert!(
                err.contains("--input-size 30 is not a positive multiple"),
                "{err}"
            );
        }
    }
}

#[test]
fn bench_speed_modes_report_timings_and_warmup_runs() {
    let modes = [
        ("infer", "bf16", false),
        ("finetune", "f32", false),
        ("finetune", "f32", true),
        ("pretrain", "f32", true),
    ];
    for (mode, dtype, ckpt) in modes {
        let mut args = vec![
            "bench",
            "speed",
            "--model",
            "vit_pico",
            "--img",
            "32",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--mode",
            mode,
            "--dtype",
            dtype,
            "--prototypes",
            "64",
        ];
        if ckpt {
            args.push("--grad-checkpoint");
        }
        let (ok, stdout, err) = omnirad(&args);
        assert!(ok, "{mode}: {err}");
        let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(
            (j["mode"].as_str(), j["dtype"].as_str()),
            (Some(mode), Some(dtype))
        );
        assert_eq!(
            j["grad_checkpoint"].as_bool(),
            (mode != "infer").then_some(ckpt)
        );
        // bf16 on the CPU names its product kernel, one the CPU has (AMX needs the kernel's
        // permission too, so a CPU with it may still report avx512-bf16). Elsewhere than on
        // x86-64 it is always widened; /proc/cpuinfo may then be an emulator's x86 host's.
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has = |f: &str| cfg!(target_arch = "x86_64") && flags.contains(&format!(" {f}"));
        match (dtype, j["cpu_bf16"].as_str()) {
            ("bf16", Some("amx")) => assert!(has("amx_bf16")),
            ("bf16", Some("avx512-bf16" | "avx512-bf16-gemmkit")) => assert!(has("avx512_bf16")),
            ("bf16", Some("widened")) => assert!(!has("avx512_bf16")),
            ("f32", None) => {}
            other => panic!("{other:?}"),
        }
        let ms = j["ms_per_step"].as_f64().unwrap();
        assert!(
            ms > 0.0 && (j["img_per_s"].as_f64().unwrap() - 4e3 / ms).abs() < 1e-6,
            "{j}"
        );
        assert!(j["time_to_first_step_s"].as_f64().unwrap() > 0.0, "{j}");
        assert!(j["peak_rss_bytes"].as_u64().unwrap() > 0, "{j}");
    }
    let (ok, _, err) = omnirad(&["bench", "speed", "--model", "vit_pico", "--dtype", "fp8"]);
    assert!(!ok && err.contains("unknown precision 'fp8'"), "{err}");
    let (ok, _, err) = omnirad(&["bench", "speed", "--model", "vit_pico", "--img", "30"]);
    assert!(
        !ok && err.contains("--img 30 is not a positive multiple"),
        "{err}"
    );
    let (ok, _, err) = omnirad(&[
        "warmup",
        "--model",
        "vit_pico",
        "--img",
        "32",
        "--batch",
        "2",
        "--modes",
        "infer,finetune",
        "--device",
        "cpu",
    ]);
    assert!(
        ok && err.contains("warmup Finetune: first step after"),
        "{err}"
    );
}

#[test]
fn timm_hub_folder_is_imported_with_its_preprocessing() {
    // A timm hub download (OmniRad, RadioDino): model.safetensors + a config.json whose
    // `architecture` is a timm model name and whose `pretrained_cfg` holds mean/std/input size.
    let d_guard = tmp("timm-hub");
    let d = d_guard.path();
    let hub = d.join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::copy(
        fixture("timm_p16/model.safetensors"),
        hub.join("model.safetensors"),
    )
    .unwrap();
    let cfg = r#"{"architecture": "vit_small_patch16_224", "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 48, 48], "interpolation": "bicubic",
                           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}"#;
    std::fs::write(hub.join("config.json"), cfg).unwrap();
    let out = d.join("model");
    let (ok, _, err) = omnirad(&[
        "convert",
        hub.to_str().unwrap(),
        "--heads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["preprocess"]["size"], 48, "{c}");
    assert_eq!(c["preprocess"]["normalize"]["mean"][0], 0.5, "{c}");
    assert_eq!(c["preprocess"]["normalize"]["std"][2], 0.25, "{c}");
    // Used directly, the folder is imported (width 32 needs --heads), not read as a model dir.
    let (ok, _, err) = omnirad(&[
        "embed",
        "--model",
        hub.to_str().unwrap(),
        "--input",
        data("busi-256/benign/benign (1).png").to_str().unwrap(),
        "--out",
        d.join("e.npy").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("pass --heads") && !err.contains("architecture"),
        "{err}"
    );
}
