//! `omnirad info` and `omnirad data verify`.

use std::path::Path;

use anyhow::{bail, Result};
use std::collections::BTreeMap;

use omnirad_data::dicom::{non_image_object, DicomFile};
use omnirad_data::medmnist::{parse_file_name, verify as verify_npz};
use omnirad_data::nifti::NiftiVolume;
use omnirad_data::source::{file_kind, read_raster, walk, FileKind};
use rayon::prelude::*;
use serde_json::{json, Value};

fn stats(v: impl Iterator<Item = f32>) -> Value {
    let (mut n, mut sum, mut sq, mut min, mut max) = (0usize, 0f64, 0f64, f32::MAX, f32::MIN);
    for x in v {
        n += 1;
        sum += x as f64;
        sq += (x as f64).powi(2);
        min = min.min(x);
        max = max.max(x);
    }
    let mean = sum / n.max(1) as f64;
    json!({ "min": min, "max": max, "mean": mean, "std": (sq / n.max(1) as f64 - mean * mean).max(0.0).sqrt() })
}

/// What a folder holds, every file parsed whole (so a cut file shows) but no pixels decoded:
/// the files `embed` would read, by modality, transfer syntax and size; the DICOM objects it
/// would pass over; unreadable files.
fn describe_folder(dir: &Path) -> Result<Value> {
    enum Seen {
        Dicom {
            modality: String,
            syntax: String,
            size: String,
            frames: u32,
        },
        NoImage(&'static str),
        Nifti,
        Raster,
        Other,
        Unreadable(String),
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    let seen: Vec<Seen> = files
        .par_iter()
        .map(|f| match file_kind(f) {
            Some(FileKind::Dicom) => match non_image_object(f) {
                Some(what) => Seen::NoImage(what),
                None => match DicomFile::open(f) {
                    Ok(d) => {
                        let i = d.info();
                        Seen::Dicom {
                            modality: if i.modality.is_empty() {
                                "unknown".into()
                            } else {
                                i.modality
                            },
                            syntax: i.transfer_syntax,
                            size: format!("{}x{}", i.rows, i.columns),
                            frames: i.frames,
                        }
                    }
                    Err(e) => Seen::Unreadable(e.to_string()),
                },
            },
            Some(FileKind::Nifti) => Seen::Nifti,
            Some(FileKind::Raster) => Seen::Raster,
            _ => Seen::Other,
        })
        .collect();
    let mut tally: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut count = |group: &'static str, key: String| {
        *tally.entry(group).or_default().entry(key).or_default() += 1;
    };
    let (mut dicom, mut frames, mut unreadable) = (0, 0, BTreeMap::new());
    for (f, s) in files.iter().zip(seen) {
        match s {
            Seen::Dicom {
                modality,
                syntax,
                size,
                frames: n,
            } => {
                dicom += 1;
                frames += n as usize;
                count("modality", modality);
                count("transfer syntax", syntax);
                count("rows x columns", size);
            }
            Seen::NoImage(what) => count("DICOM objects without an image (skipped)", what.into()),
            Seen::Nifti => count("other inputs", "NIfTI volumes".into()),
            Seen::Raster => count("other inputs", "raster images".into()),
            Seen::Other => count("other inputs", "other files (skipped)".into()),
            Seen::Unreadable(why) => {
                unreadable.insert(f.display().to_string(), why);
            }
        }
    }
    let mut v = json!({ "format": "folder", "files": files.len(),
        "DICOM images": { "files": dicom, "frames": frames } });
    for (group, counts) in tally {
        match group {
            "modality" | "transfer syntax" | "rows x columns" => {
                v["DICOM images"][group] = json!(counts)
            }
            _ => v[group] = json!(counts),
        }
    }
    if !unreadable.is_empty() {
        v["unreadable"] = json!(unreadable);
    }
    Ok(v)
}

pub fn describe(path: &Path) -> Result<Value> {
    if path.is_dir() {
        return describe_folder(path);
    }
    Ok(match file_kind(path) {
        Some(FileKind::Dicom) => {
            let f = DicomFile::open(path)?;
            let mut v = serde_json::to_value(f.info())?;
            v["format"] = "DICOM".into();
            // Decode errors (e.g. an unsupported transfer syntax) are part of the answer.
            match f.modality_frames() {
                Ok(frames) => {
                    v["pixels (modality units)"] =
                        stats(frames.iter().flat_map(|a| a.iter().copied()))
                }
                Err(e) => v["pixels"] = e.to_string().into(),
            }
            v
        }
        Some(FileKind::Nifti) => {
            let vol = NiftiVolume::open(path)?;
            json!({ "format": "NIfTI", "shape [x,y,z,t] (RAS+)": vol.shape(), "file orientation": vol.orientation,
                    "spacing": vol.spacing, "voxels": stats(vol.data.iter().copied()) })
        }
        Some(FileKind::Raster) => {
            let im = read_raster(path)?;
            json!({ "format": "image", "channels": im.channels(), "height": im.height(), "width": im.width(),
                    "pixels [0,1]": stats(im.data.iter().copied()) })
        }
        Some(FileKind::Npz) => {
            let r = verify_npz(path)?;
            let mut v = json!({ "format": "npz (MedMNIST layout)", "splits": r.splits.iter().map(|(s, n, _)| json!({ "split": s, "images": n })).collect::<Vec<_>>() });
            if let Some((info, size)) = parse_file_name(path) {
                v["dataset"] = json!({ "name": info.name, "task": info.task, "classes": info.labels, "channels": info.channels, "size": size });
            }
            v
        }
        Some(FileKind::Csv) => bail!(
            "{}: a CSV manifest; `omnirad embed --input` reads it",
            path.display()
        ),
        None => bail!(
            "{}: unsupported file type (DICOM, NIfTI, PNG/JPEG/TIFF/GIF/BMP, npz)",
            path.display()
        ),
    })
}

fn print(v: &Value, indent: usize) {
    if let Value::Object(m) = v {
        for (k, x) in m {
            match x {
                Value::Object(_) => {
                    println!("{:indent$}{k}:", "");
                    print(x, indent + 2);
                }
                Value::Null => {}
                _ => println!("{:indent$}{k}: {}", "", x.to_string().trim_matches('"')),
            }
        }
    }
}

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let v = describe(path)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", path.display());
        print(&v, 2);
    }
    Ok(())
}

pub fn verify(path: &Path, as_json: bool) -> Result<()> {
    let r = verify_npz(path)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {}",
            path.display(),
            r.dataset
                .as_deref()
                .unwrap_or("unknown dataset (no official table entry)")
        );
        match (&r.md5_expected, r.md5_ok) {
            (Some(e), Some(ok)) => println!(
                "  md5 {} (official {e}): {}",
                r.md5,
                if ok { "OK" } else { "MISMATCH" }
            ),
            _ => println!("  md5 {} (no official value)", r.md5),
        }
        for (s, n, e) in &r.splits {
            let status = match e {
                Some(e) if e == n => "OK".to_string(),
                Some(e) => format!("MISMATCH (official {e})"),
                None => "-".into(),
            };
            println!("  {s}: {n} images {status}");
        }
    }
    if !r.ok {
        bail!(
            "{}: does not match the official MedMNIST release",
            path.display()
        );
    }
    Ok(())
}
