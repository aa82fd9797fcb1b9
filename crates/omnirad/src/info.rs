//! `omnirad info` and `omnirad data verify`.

use std::path::Path;

use anyhow::{bail, Result};
use std::collections::BTreeMap;

use omnirad_data::dicom::{non_image_object, DicomFile};
use omnirad_data::medmnist::{parse_file_name, verify as verify_npz};
use omnirad_data::nifti::{slice_count, NiftiVolume, SliceAxis};
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
        /// Axial slices (all time points), from the header.
        Nifti(usize),
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
            Some(FileKind::Nifti) => match slice_count(f, SliceAxis::Axial, None) {
                Ok(n) => Seen::Nifti(n),
                Err(e) => Seen::Unreadable(e.to_string()),
            },
            Some(FileKind::Raster) => Seen::Raster,
            _ => Seen::Other,
        })
        .collect();
    let mut tally: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut count = |group: &'static str, key: String| {
        *tally.entry(group).or_default().entry(key).or_default() += 1;
    };
    let (mut dicom, mut frames, mut unreadable) = (0, 0, BTreeMap::new());
    let (mut volumes, mut slices) = (0, 0);
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
            Seen::Nifti(n) => {
                volumes += 1;
                slices += n;
            }
            Seen::Raster => count("other inputs", "raster images".into()),
            Seen::Other => count("other inputs", "other files (skipped)".into()),
            Seen::Unreadable(why) => {
                unreadable.insert(f.display().to_string(), why);
            }
        }
    }
    let mut v = json!({ "format": "folder", "files": files.len(),
        "DICOM images": { "files": dicom, "frames": frames } });
    if volumes > 0 {
        v["NIfTI volumes"] = json!({ "files": volumes, "axial slices": slices });
    }
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

/// The header of a safetensors file: tensor count, dtypes and values, and whether the file is
/// as long as its header says. Read by hand rather than with `SafeTensors::read_metadata`, which
/// wants the whole file in memory: `info` on a ViT-g's 4.5 GB should take no time.
fn weights(path: &Path) -> Result<Value> {
    use std::io::Read;
    let bad = |why: String| anyhow::anyhow!("{}: {why}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let bytes = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    // safetensors' own bound on a header (100 MB): a corrupt length must not become a
    // multi-GB allocation.
    if n > bytes.saturating_sub(8) || n > 100_000_000 {
        bail!(bad(format!("header of {n} bytes in a file of {bytes}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    let (mut tensors, mut values, mut end) = (0usize, 0u64, 0u64);
    let mut dtypes = BTreeMap::<String, usize>::new();
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let field = |key: &str| {
            t.get(key)
                .ok_or_else(|| bad(format!("tensor '{name}' has no {key}")))
        };
        let shape: Vec<u64> = serde_json::from_value(field("shape")?.clone())?;
        let [_, stop]: [u64; 2] = serde_json::from_value(field("data_offsets")?.clone())?;
        tensors += 1;
        values += shape.iter().product::<u64>();
        end = end.max(stop);
        *dtypes
            .entry(field("dtype")?.as_str().unwrap_or("?").into())
            .or_default() += 1;
    }
    let mut v = json!({ "bytes": bytes, "tensors": tensors, "values": values, "dtypes": dtypes });
    if 8 + n + end != bytes {
        v["problem"] = format!(
            "the header needs {} bytes, the file has {bytes}",
            8 + n + end
        )
        .into();
    }
    Ok(v)
}

fn encoder_line(v: &omnirad_model::VitConfig) -> String {
    let ffn = match v.ffn {
        omnirad_model::Ffn::Mlp => "MLP",
        omnirad_model::Ffn::SwiGlu => "SwiGLU",
    };
    let overlap = match v.patch_overlap {
        0 => String::new(),
        o => format!(" (overlap {o})"),
    };
    format!(
        "ViT dim {} depth {} heads {} patch {}{overlap}, {ffn} blocks, {} registers",
        v.embed_dim, v.depth, v.num_heads, v.patch_size, v.num_registers
    )
}

/// A pretraining run (`pretrain --out DIR`): its recipe, how far it got by its metrics log,
/// the teachers it kept, the best val k-NN score of `run.eval_knn`, and the items it could not
/// read.
fn describe_run(dir: &Path) -> Result<Value> {
    let cfg = omnirad_train::pretrain::PretrainConfig::load(&dir.join("config.toml"), None)?;
    let vit = cfg
        .model
        .vit()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let epochs = cfg.optim.epochs;
    let mut v = json!({
        "format": "pretraining run",
        "recipe": format!("{}, {epochs} epochs, batch {}", cfg.preset, cfg.optim.batch_size),
        "encoder": encoder_line(&vit),
    });
    // The lines that parse: a run killed mid-write leaves a partial last one.
    let lines = |file: &str| -> Vec<Value> {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let mut done = false;
    if let Some(last) = lines("metrics.jsonl").last() {
        v["last logged"] = json!({ "step": last["step"], "epoch": last["epoch"], "loss": last["loss"], "lr": last["lr"] });
        // Each line's epoch is its step over the steps per epoch, which gives the run's length.
        let (step, epoch) = (last["step"].as_f64(), last["epoch"].as_f64());
        if let (Some(step), Some(epoch)) = (step, epoch.filter(|&e| e > 0.0)) {
            let per_epoch = (step / epoch).round();
            let total = per_epoch * epochs as f64;
            done = step + 1.0 >= total;
            v["progress"] = format!(
                "{} of {total} steps ({epochs} epochs × {per_epoch})",
                step + 1.0
            )
            .into();
        }
    }
    if !done {
        v["resume"] = format!("omnirad pretrain --out {} --resume", dir.display()).into();
    }
    let best = lines("eval.jsonl").into_iter().max_by(|a, b| {
        let score = |x: &Value| x["score"].as_f64().unwrap_or(f64::NEG_INFINITY);
        score(a).total_cmp(&score(b))
    });
    if let Some(b) = best {
        v["best val k-NN"] = json!({ "teacher": b["teacher"], "score": b["score"] });
    }
    let mut teachers: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("teacher") && dir.join(n).join("config.json").is_file())
        .collect();
    teachers.sort_by_key(|n| (n.len(), n.clone()));
    v["teachers"] = teachers.into();
    let failed = std::fs::read_to_string(dir.join("failed.txt")).unwrap_or_default();
    v["unreadable items"] = failed.lines().count().into();
    Ok(v)
}

/// A model directory (`config.json` + `model.safetensors`): the encoder it builds, its
/// preprocessing, and its weights file checked against the config, without loading weights.
fn describe_model(dir: &Path) -> Result<Value> {
    let cfg = omnirad_model::io::read_config(dir)?;
    let v = &cfg.vit;
    let mut out = json!({
        "format": "omnirad model directory",
        "encoder": encoder_line(v),
        "parameters": v.num_params() as u64,
        "native size": v.img_size,
        "preprocess": serde_json::to_value(&cfg.preprocess)?,
    });
    let mut w = weights(&dir.join(omnirad_model::io::WEIGHTS_FILE))?;
    if w["values"].as_u64() != Some(v.num_params() as u64) && w.get("problem").is_none() {
        w["problem"] = format!(
            "holds {} values, the config makes {}",
            w["values"],
            v.num_params()
        )
        .into();
    }
    out["weights"] = w;
    let head = dir.join(omnirad_model::DINO_HEAD_FILE);
    if head.is_file() {
        out["DINO head"] = weights(&head)?;
    }
    Ok(out)
}

/// A directory with a `config.json`: an omnirad model directory if the config names its
/// `architecture`, otherwise a checkpoint of another library (Hugging Face writes the same two
/// file names), which `convert` reads.
fn describe_model_or_checkpoint(dir: &Path) -> Result<Value> {
    let path = dir.join(omnirad_model::io::CONFIG_FILE);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    if cfg.get("architecture").is_some() {
        return describe_model(dir);
    }
    let mut v = json!({
        "format": "a checkpoint of another library (its config.json names no 'architecture')",
        "convert": format!("omnirad convert {} --out MODEL_DIR", dir.display()),
    });
    let keys = [
        "architectures",
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "patch_size",
    ];
    for key in keys {
        if let Some(x) = cfg.get(key) {
            v[key] = x.clone();
        }
    }
    let weights_file = dir.join(omnirad_model::io::WEIGHTS_FILE);
    if weights_file.is_file() {
        v["weights"] = weights(&weights_file)?;
    }
    Ok(v)
}

/// A classification (`bundle.json`) or segmentation (`segment.json`) bundle: what it was
/// trained for and scored, its encoder and its head.
fn describe_bundle(dir: &Path, file: &str, what: &str, keys: &[&str]) -> Result<Value> {
    let path = dir.join(file);
    let b: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    let mut out = json!({ "format": what });
    for k in keys {
        if let Some(x) = b.get(*k) {
            out[*k] = x.clone();
        }
    }
    if dir.join("encoder").is_dir() {
        out["encoder"] = describe_model(&dir.join("encoder"))?;
        out["head"] = weights(&dir.join("head.safetensors"))?;
        let bank = dir.join("knn.safetensors");
        if bank.is_file() {
            out["knn bank"] = weights(&bank)?;
        }
    } else if let Some(m) = b["ensemble"].as_array() {
        out["ensemble"] = format!("{} members in members/", m.len()).into();
    }
    Ok(out)
}

pub fn describe(path: &Path) -> Result<Value> {
    if path.is_dir() {
        return if path.join("bundle.json").is_file() {
            let keys = [
                "kind",
                "dataset",
                "task",
                "classes",
                "cls_mean",
                "best_epoch",
                "val",
                "test",
                "knn",
            ];
            describe_bundle(path, "bundle.json", "classification bundle", &keys)
        } else if path.join("segment.json").is_file() {
            let keys = ["kind", "data", "protocol", "best_epoch", "val", "test"];
            describe_bundle(path, "segment.json", "segmentation bundle", &keys)
        } else if path.join("index.json").is_file() && path.join("embeddings.npy").is_file() {
            crate::retrieve::describe_index(path)
        } else if path.join("config.toml").is_file() && path.join("metrics.jsonl").is_file() {
            describe_run(path)
        } else if path.join(omnirad_model::io::CONFIG_FILE).is_file() {
            describe_model_or_checkpoint(path)
        } else {
            describe_folder(path)
        };
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        let mut v = weights(path)?;
        v["format"] = "safetensors".into();
        return Ok(v);
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
            "{}: unsupported file type (DICOM, NIfTI, PNG/JPEG/TIFF/GIF/BMP, npz, safetensors, \
             a model directory or bundle)",
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
