//! Import of released encoders: Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`
//! (microsoft/rad-dino, facebook/dinov2-*) and timm `VisionTransformer` / original DINOv2
//! state dicts (OmniRad, RadioDino), as safetensors or PyTorch pickles. Tensors are renamed to timm's layout
//! (HF's split q/k/v rows are concatenated into `qkv`), the architecture is read from the HF
//! config or inferred from tensor shapes, and the result loads like a model directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::io::{ModelConfig, ModelError};
use crate::vit::{Ffn, PosInterp, VitConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Hugging Face transformers `Dinov2Model` key names.
    Hf,
    /// timm `VisionTransformer` (OmniRad, RadioDino, timm DINOv2 ports).
    Timm,
    /// The original DINOv2 code's state dict (`register_tokens`, chunked blocks).
    Dinov2,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "hf" => Ok(Self::Hf),
            "timm" => Ok(Self::Timm),
            "dinov2" => Ok(Self::Dinov2),
            _ => Err(format!(
                "unknown checkpoint layout '{s}' (hf, timm, dinov2)"
            )),
        }
    }
}

/// A checkpoint renamed to omnirad's (timm) names, ready to load.
pub struct Imported {
    pub config: ModelConfig,
    /// Safetensors bytes in timm layout.
    pub weights: Vec<u8>,
    pub source: PathBuf,
    /// The checkpoint did not say how many attention heads it has (timm and DINOv2 files do
    /// not), none were given, and 64-dim heads were assumed: worth telling the user.
    pub heads_assumed: bool,
}

/// (shape, values) per tensor name.
pub type Tensor = (Vec<usize>, Vec<f32>);
pub type Tensors = BTreeMap<String, Tensor>;

fn err(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Weights {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_safetensors(path: &Path) -> Result<Tensors, ModelError> {
    f32_tensors(&crate::io::map_file(path)?, path)
}

/// Every tensor of safetensors `bytes` (read from `path`) as f32 (f16, bf16 and f64 converted),
/// by name; NaN/Inf and other dtypes are errors naming the tensor.
pub fn f32_tensors(bytes: &[u8], path: &Path) -> Result<Tensors, ModelError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let mut out = Tensors::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(err(
                    path,
                    format!("tensor '{name}' has unsupported dtype {other:?}"),
                ))
            }
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(err(path, format!("tensor '{name}' contains NaN/Inf")));
        }
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// PyTorch pickles (`pytorch_model.bin`, `.pth`, `.pt`) through burn-store's reader.
fn read_pytorch(path: &Path) -> Result<Tensors, ModelError> {
    let reader = burn_store::pytorch::PytorchReader::new(path)
        .map_err(|e| err(path, format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut out = Tensors::new();
    for (name, snap) in reader.into_tensors() {
        let data = snap
            .to_data()
            .map_err(|e| err(path, format!("tensor '{name}': {e:?}")))?;
        let shape = data.shape.to_vec();
        let values: Vec<f32> = data
            .convert::<f32>()
            .to_vec()
            .map_err(|e| err(path, format!("tensor '{name}': {e:?}")))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(err(path, format!("tensor '{name}' contains NaN/Inf")));
        }
        out.insert(name, (shape, values));
    }
    Ok(out)
}

/// Training checkpoints hold a teacher and a student: the teacher is the one to use (DINOv2
/// releases the teacher). SSL heads are not part of the encoder.
fn select_encoder(t: Tensors) -> Tensors {
    let has_teacher = t.keys().any(|k| k.starts_with("teacher."));
    t.into_iter()
        .filter(|(k, _)| !has_teacher || k.starts_with("teacher."))
        .filter(|(k, _)| {
            !["dino_head.", "ibot_head.", "head."]
                .iter()
                .any(|h| k.contains(h))
        })
        .collect()
}

fn strip_prefixes(t: Tensors) -> Tensors {
    const PREFIXES: &[&str] = &[
        "module.",
        "teacher.backbone.",
        "student.backbone.",
        "backbone.",
        "dinov2.",
        "model.",
    ];
    t.into_iter()
        .map(|(mut k, v)| {
            while let Some(p) = PREFIXES.iter().find(|p| k.starts_with(*p)) {
                k = k[p.len()..].to_string();
            }
            (k, v)
        })
        .collect()
}

fn hf_to_timm(t: Tensors, path: &Path) -> Result<Tensors, ModelError> {
    let mut out = Tensors::new();
    let mut qkv: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (k, v) in t {
        let name = if let Some(rest) = k.strip_prefix("embeddings.") {
            match rest {
                "cls_token" => "cls_token".to_string(),
                "mask_token" => "mask_token".to_string(),
                "position_embeddings" => "pos_embed".to_string(),
                "register_tokens" => "reg_token".to_string(),
                r => match r.strip_prefix("patch_embeddings.projection.") {
                    Some(p) => format!("patch_embed.proj.{p}"),
                    None => k.clone(),
                },
            }
        } else if let Some(rest) = k.strip_prefix("encoder.layer.") {
            let (i, rest) = rest
                .split_once('.')
                .ok_or_else(|| err(path, format!("unexpected key '{k}'")))?;
            if let Some(p) = rest.strip_prefix("attention.attention.") {
                let (which, param) = p
                    .split_once('.')
                    .ok_or_else(|| err(path, format!("unexpected key '{k}'")))?;
                let slot = ["query", "key", "value"]
                    .iter()
                    .position(|w| *w == which)
                    .ok_or_else(|| err(path, format!("unexpected key '{k}'")))?;
                qkv.entry((i.to_string(), param.to_string())).or_default()[slot] = Some(v);
                continue;
            }
            let rest = rest
                .replace("attention.output.dense.", "attn.proj.")
                .replace("mlp.weights_in.", "mlp.fc1.")
                .replace("mlp.weights_out.", "mlp.fc2.")
                .replace("layer_scale1.lambda1", "ls1.gamma")
                .replace("layer_scale2.lambda1", "ls2.gamma");
            format!("blocks.{i}.{rest}")
        } else if let Some(p) = k.strip_prefix("layernorm.") {
            format!("norm.{p}")
        } else {
            k.clone()
        };
        out.insert(name, v);
    }
    for ((i, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(err(
                path,
                format!("layer {i}: query/key/value {param} incomplete"),
            ));
        };
        let mut shape = q.0.clone();
        shape[0] *= 3;
        let data = [q.1, k.1, v.1].concat();
        out.insert(format!("blocks.{i}.attn.qkv.{param}"), (shape, data));
    }
    Ok(out)
}

/// The original DINOv2 code names registers `register_tokens`, may chunk blocks
/// (`blocks.{chunk}.{i}.`) and calls SwiGLU's projections `w12` / `w3`; timm names are
/// `reg_token`, `blocks.{i}.` and `fc1` / `fc2`.
fn dinov2_to_timm(t: Tensors) -> Tensors {
    t.into_iter()
        .map(|(k, v)| {
            let k = if k == "register_tokens" {
                "reg_token".to_string()
            } else {
                k
            };
            let parts: Vec<&str> = k.split('.').collect();
            let k = if parts.len() > 3
                && parts[0] == "blocks"
                && parts[1].parse::<usize>().is_ok()
                && parts[2].parse::<usize>().is_ok()
            {
                format!("blocks.{}.{}", parts[2], parts[3..].join("."))
            } else {
                k
            };
            let k = k
                .replace(".mlp.w12.", ".mlp.fc1.")
                .replace(".mlp.w3.", ".mlp.fc2.");
            (k, v)
        })
        .collect()
}

fn is_square(n: usize) -> Option<usize> {
    let g = (n as f64).sqrt().round() as usize;
    (g > 0 && g * g == n).then_some(g)
}

/// Brings a timm position table to DINOv2's `[cls | grid]` form. timm tables may also cover the
/// registers (`1 + R + g²` rows) or nothing but the grid (`no_embed_class`, `g²` rows). Prefix
/// tokens are constants, so their positions fold exactly into them: register positions are added
/// to `reg_token`, and a missing class position is a zero row. Forms are tried in that order.
fn fold_prefix_positions(t: &mut Tensors, path: &Path) -> Result<(), ModelError> {
    let (shape, pos) = t
        .get("pos_embed")
        .cloned()
        .ok_or_else(|| err(path, "missing tensor 'pos_embed'"))?;
    let [1, n, d] = shape[..] else {
        return Err(err(
            path,
            format!("pos_embed has shape {shape:?}, expected [1, N, D]"),
        ));
    };
    let r = t.get("reg_token").map(|(s, _)| s[1]).unwrap_or(0);
    let folded = if r > 0 && n > 1 + r && is_square(n - 1 - r).is_some() {
        let reg = t.get_mut("reg_token").expect("checked above");
        for (v, p) in reg.1.iter_mut().zip(&pos[d..(1 + r) * d]) {
            *v += p;
        }
        [&pos[..d], &pos[(1 + r) * d..]].concat()
    } else if n > 1 && is_square(n - 1).is_some() {
        return Ok(());
    } else if is_square(n).is_some() {
        [vec![0.0; d], pos].concat()
    } else {
        return Err(err(
            path,
            format!(
                "pos_embed has {n} positions: not a square grid with or without prefix positions"
            ),
        ));
    };
    let rows = folded.len() / d;
    t.insert("pos_embed".into(), (vec![1, rows, d], folded));
    Ok(())
}

fn shape_of<'a>(t: &'a Tensors, k: &str, path: &Path) -> Result<&'a [usize], ModelError> {
    t.get(k)
        .map(|(s, _)| s.as_slice())
        .ok_or_else(|| err(path, format!("missing tensor '{k}'")))
}

/// Architecture from tensor shapes; heads come from the HF config or the caller (default D/64).
fn infer_config(
    t: &Tensors,
    heads: Option<usize>,
    eps: f64,
    path: &Path,
) -> Result<VitConfig, ModelError> {
    let pw = shape_of(t, "patch_embed.proj.weight", path)?;
    if pw.len() != 4 || pw[2] != pw[3] {
        return Err(err(
            path,
            format!("patch_embed.proj.weight has shape {pw:?}, expected [D, C, p, p]"),
        ));
    }
    let (d, c, p) = (pw[0], pw[1], pw[2]);
    let n = shape_of(t, "pos_embed", path)?[1];
    let g = is_square(n.saturating_sub(1)).ok_or_else(|| {
        err(
            path,
            format!("pos_embed has {n} positions, expected a class position and a square grid"),
        )
    })?;
    let depth = t
        .keys()
        .filter_map(|k| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|m| m + 1)
        .unwrap_or(0);
    let fc1 = shape_of(t, "blocks.0.mlp.fc1.weight", path)?[0];
    let hidden = shape_of(t, "blocks.0.mlp.fc2.weight", path)?[1];
    // A packed SwiGLU projects to twice the width its output layer reads.
    let ffn = if fc1 == 2 * hidden {
        Ffn::SwiGlu
    } else if fc1 == hidden {
        Ffn::Mlp
    } else {
        return Err(err(
            path,
            format!("blocks.0.mlp: fc1 gives {fc1} features but fc2 reads {hidden}"),
        ));
    };
    // timm and DINOv2 files do not record the head count; all released ViTs use 64-dim heads.
    let heads = match heads {
        Some(h) => h,
        None if d % 64 == 0 => d / 64,
        None => {
            return Err(err(
                path,
                format!("cannot infer the number of attention heads for width {d}: pass --heads"),
            ))
        }
    };
    let cfg = VitConfig {
        img_size: g * p,
        patch_size: p,
        patch_overlap: 0,
        in_chans: c,
        embed_dim: d,
        depth,
        num_heads: heads,
        mlp_ratio: hidden as f64 / d as f64,
        ffn,
        qkv_bias: t.contains_key("blocks.0.attn.qkv.bias"),
        layer_scale_init: t.contains_key("blocks.0.ls1.gamma").then_some(1e-5),
        num_registers: t.get("reg_token").map(|(s, _)| s[1]).unwrap_or(0),
        drop_path_rate: 0.0,
        drop_path_uniform: false,
        norm_eps: eps,
        pos_interp: PosInterp::Bicubic,
    };
    cfg.validate().map_err(|r| err(path, r))?;
    Ok(cfg)
}

fn serialize(t: &Tensors) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, (s, v))| {
            (
                k.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                    .expect("shape matches data"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialisable")
}

/// Mean/std and input size from HF's `preprocessor_config.json`, or from the `pretrained_cfg`
/// of a timm hub `config.json` (OmniRad, RadioDino releases); ImageNet defaults otherwise.
fn read_preprocessing(dir: &Path, size: usize, channels: usize) -> omnirad_data::Preprocess {
    use omnirad_data::{Normalize, Preprocess};
    let mut pre = Preprocess {
        size,
        channels,
        ..Preprocess::default()
    };
    let timm = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("pretrained_cfg").cloned());
    if let Some(c) = timm {
        let floats = |k: &str| -> Option<Vec<f32>> {
            c.get(k)?
                .as_array()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect()
        };
        if let (Some(mean), Some(std)) = (floats("mean"), floats("std")) {
            pre.normalize = Normalize::Custom { mean, std };
        }
        if let Some(s) = c
            .get("input_size")
            .and_then(|s| s.get(1))
            .and_then(|s| s.as_u64())
        {
            pre.size = s as usize;
        }
        return pre;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("preprocessor_config.json")) else {
        return pre;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return pre;
    };
    let floats = |k: &str| {
        v.get(k).and_then(|x| x.as_array()).map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect::<Vec<_>>()
        })
    };
    if let (Some(mean), Some(std)) = (floats("image_mean"), floats("image_std")) {
        pre.normalize = Normalize::Custom { mean, std };
    }
    if let Some(s) = v
        .get("crop_size")
        .and_then(|c| c.get("height").or(Some(c)))
        .and_then(|x| x.as_u64())
    {
        pre.size = s as usize;
    }
    pre
}

/// Finds the weights file and layout of `path` (a safetensors file, or a directory holding
/// `model.safetensors`, optionally with an HF `config.json`).
pub fn import_checkpoint(
    path: &Path,
    layout: Option<Layout>,
    heads: Option<usize>,
) -> Result<Imported, ModelError> {
    let (dir, weights) = if path.is_dir() {
        let w = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| path.join(f))
            .find(|w| w.is_file());
        let w = w.ok_or_else(|| {
            err(
                path,
                "no model.safetensors or pytorch_model.bin in this directory",
            )
        })?;
        (path.to_path_buf(), w)
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    };
    let hf_config: Option<serde_json::Value> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .filter(|v: &serde_json::Value| v.get("model_type").is_some());
    let is_safetensors = weights.extension().is_some_and(|e| e == "safetensors");
    let raw = if is_safetensors {
        read_safetensors(&weights)?
    } else {
        read_pytorch(&weights)?
    };
    let raw = strip_prefixes(select_encoder(raw));
    // Only the original DINOv2 code stores a mask token outside the HF layout.
    let layout = layout.unwrap_or(if raw.keys().any(|k| k.starts_with("embeddings.")) {
        Layout::Hf
    } else if raw.contains_key("mask_token") {
        Layout::Dinov2
    } else {
        Layout::Timm
    });
    let mut t = match layout {
        Layout::Hf => hf_to_timm(raw, &weights)?,
        Layout::Timm | Layout::Dinov2 => dinov2_to_timm(raw),
    };
    if layout == Layout::Timm {
        fold_prefix_positions(&mut t, &weights)?;
    }
    let hf_heads = hf_config
        .as_ref()
        .and_then(|c| c.get("num_attention_heads"))
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    let eps = hf_config
        .as_ref()
        .and_then(|c| c.get("layer_norm_eps"))
        .and_then(|x| x.as_f64())
        .unwrap_or(1e-6);
    let heads = heads.or(hf_heads);
    let mut vit = infer_config(&t, heads, eps, &weights)?;
    // Each reference resamples position tables its own way (see PosInterp).
    let hf_type = hf_config
        .as_ref()
        .and_then(|c| c.get("model_type"))
        .and_then(|x| x.as_str())
        .unwrap_or("");
    vit.pos_interp = match layout {
        Layout::Timm => PosInterp::BicubicAntialias,
        Layout::Dinov2 => PosInterp::BicubicDinov2Offset,
        Layout::Hf if hf_type == "dinov2_with_registers" => PosInterp::BicubicAntialias,
        Layout::Hf => PosInterp::Bicubic,
    };
    if !t.contains_key("mask_token") {
        t.insert(
            "mask_token".into(),
            (vec![1, vit.embed_dim], vec![0.0; vit.embed_dim]),
        );
    }
    let pre = read_preprocessing(&dir, vit.img_size, vit.in_chans);
    Ok(Imported {
        config: ModelConfig::new(vit, pre),
        weights: serialize(&t),
        source: weights,
        heads_assumed: heads.is_none(),
    })
}

/// The file a DINO head is looked for in, beside an encoder (RAD-DINO ships it so SSL can go on).
pub const DINO_HEAD_FILE: &str = "dino_head.safetensors";

/// A DINO projection head in DINOv2's layout: RAD-DINO's `dino_head.safetensors`, the
/// `dino_head.*` tensors of a DINOv2 training checkpoint (the teacher's when both are there), or
/// the head omnirad writes beside a pretrained encoder. `path` may be a directory holding
/// `dino_head.safetensors`. Sizes come from the tensor shapes.
pub fn import_dino_head<B: burn::tensor::backend::Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(crate::DinoHead<B>, crate::DinoHeadConfig), ModelError> {
    use burn::module::Param;
    use burn::tensor::{Tensor as BTensor, TensorData};

    let file = if path.is_dir() {
        path.join(DINO_HEAD_FILE)
    } else {
        path.to_path_buf()
    };
    let raw = if file.extension().is_some_and(|e| e == "safetensors") {
        read_safetensors(&file)?
    } else {
        read_pytorch(&file)?
    };
    let has_teacher = raw.keys().any(|k| k.starts_with("teacher."));
    let mut t = Tensors::new();
    for (k, v) in raw {
        if has_teacher && !k.starts_with("teacher.") {
            continue;
        }
        let name = match k.find("dino_head.") {
            Some(i) => k[i + "dino_head.".len()..].to_string(),
            None if k.starts_with("mlp.") || k.starts_with("last_layer.") => k,
            None => continue,
        };
        // torch.nn.utils.parametrizations.weight_norm names g and v original0 / original1;
        // a one-layer head's MLP is a bare Linear (`mlp.weight`).
        let name = name
            .replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v")
            .replace("mlp.weight", "mlp.0.weight")
            .replace("mlp.bias", "mlp.0.bias");
        t.insert(name, v);
    }
    let get = |k: &str| {
        t.get(k)
            .ok_or_else(|| err(&file, format!("no DINO head tensor '{k}'")))
    };
    // PyTorch numbers the Sequential's GELUs too: linears sit at even indices.
    let mut idx: Vec<usize> = t
        .keys()
        .filter_map(|k| {
            k.strip_prefix("mlp.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    idx.sort_unstable();
    if idx.is_empty() {
        return Err(err(&file, "no DINO head tensors (mlp.*.weight) found"));
    }
    let (gs, g) = get("last_layer.weight_g")?;
    let (vs, v) = get("last_layer.weight_v")?;
    let first = &get(&format!("mlp.{}.weight", idx[0]))?.0;
    let last = &get(&format!("mlp.{}.weight", idx[idx.len() - 1]))?.0;
    let cfg = crate::DinoHeadConfig {
        in_dim: first[1],
        out_dim: vs[0],
        hidden_dim: if idx.len() > 1 { first[0] } else { 0 },
        bottleneck_dim: last[0],
        nlayers: idx.len(),
    };
    if vs.len() != 2 || vs[1] != cfg.bottleneck_dim || gs.iter().product::<usize>() != cfg.out_dim {
        return Err(err(
            &file,
            format!(
                "last_layer shapes {vs:?} / {gs:?} do not fit a bottleneck of {}",
                cfg.bottleneck_dim
            ),
        ));
    }
    let mut mlp = Vec::new();
    let mut prev = cfg.in_dim;
    for i in &idx {
        let (ws, w) = get(&format!("mlp.{i}.weight"))?;
        if ws.len() != 2 || ws[1] != prev {
            return Err(err(
                &file,
                format!("mlp.{i}.weight has shape {ws:?}, expected [_, {prev}]"),
            ));
        }
        let (o, n) = (ws[0], ws[1]);
        // [out, in] → burn's [in, out].
        let wt: Vec<f32> = (0..n)
            .flat_map(|c| (0..o).map(move |r| (r, c)))
            .map(|(r, c)| w[r * n + c])
            .collect();
        let bias = match t.get(&format!("mlp.{i}.bias")) {
            Some((bs, b)) if bs == &vec![o] => Some(Param::from_tensor(BTensor::from_data(
                TensorData::new(b.clone(), [o]),
                device,
            ))),
            Some((bs, _)) => {
                return Err(err(
                    &file,
                    format!("mlp.{i}.bias has shape {bs:?}, expected [{o}]"),
                ))
            }
            None => None,
        };
        mlp.push(burn::nn::Linear {
            weight: Param::from_tensor(BTensor::from_data(TensorData::new(wt, [n, o]), device)),
            bias,
        });
        prev = o;
    }
    let head = crate::DinoHead {
        mlp,
        last_layer: crate::dino_head::WeightNormLinear {
            weight_g: Param::from_tensor(BTensor::from_data(
                TensorData::new(g.clone(), [cfg.out_dim, 1]),
                device,
            )),
            weight_v: Param::from_tensor(BTensor::from_data(
                TensorData::new(v.clone(), [cfg.out_dim, cfg.bottleneck_dim]),
                device,
            )),
        },
        precision: Default::default(),
    };
    Ok((head, cfg))
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn half_precision_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }
}
