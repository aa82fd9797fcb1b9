//! Model directories: `config.json` (architecture + preprocessing) and `model.safetensors`
//! in timm's layout (PyTorch `[out, in]` linear weights, `weight`/`bias` norm names), so the
//! weights open in timm as they are. Both files are written atomically.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use burn::tensor::{ElementConversion, Tensor};
use burn_store::{
    BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
    TensorSnapshot,
};
use omnirad_data::Preprocess;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::import::Imported;
use crate::vit::{Vit, VitConfig};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid model config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("unknown model '{0}': not a model directory and not a preset ({presets})", presets = crate::vit::PRESETS.join(", "))]
    Unknown(String),
}

/// Everything needed to rebuild a model and feed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub vit: VitConfig,
    pub preprocess: Preprocess,
}

impl ModelConfig {
    pub fn new(vit: VitConfig, preprocess: Preprocess) -> Self {
        Self {
            architecture: "vit".into(),
            vit,
            preprocess,
        }
    }

    /// A preset with the default preprocessing at its native size.
    pub fn preset(name: &str) -> Option<Self> {
        let vit = VitConfig::preset(name)?;
        let preprocess = Preprocess {
            size: vit.img_size,
            channels: vit.in_chans,
            ..Preprocess::default()
        };
        Some(Self::new(vit, preprocess))
    }
}

fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), ModelError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| parts.iter().try_for_each(|p| f.write_all(p)))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| ModelError::Io {
            path: path.into(),
            source,
        })
}

pub fn save_model_dir<B: Backend>(
    model: &Vit<B>,
    config: &ModelConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.into(),
        source,
    })?;
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(TimmLayout(BurnToPyTorchAdapter))
        .skip_enum_variants(true);
    let weights = dir.join(WEIGHTS_FILE);
    model
        .save_into(&mut store)
        .map_err(|e| ModelError::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
    let bytes = store.get_bytes().map_err(|e| ModelError::Weights {
        path: weights.clone(),
        reason: e.to_string(),
    })?;
    write_safetensors(&weights, bytes)?;
    let json = serde_json::to_string_pretty(config).expect("config serialises");
    write_atomic(&dir.join(CONFIG_FILE), &[json.as_bytes()])
}

/// burn-store's PyTorch ↔ burn adapters with the linear weights' transposes done in tasks on
/// rayon's threads: theirs copies value by value, 45 % of what `omnirad embed` spent loading a
/// ViT-B and embedding one image (BENCHMARKS.md, "Loading and saving a ViT-B model directory
/// and training state").
/// Wraps the burn-store adapter of its direction.
#[derive(Clone)]
struct TimmLayout<A>(A);

impl<A: ModuleAdapter + Clone + 'static> ModuleAdapter for TimmLayout<A> {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        // burn-store's rule for what it transposes, kept here so that nothing else changes.
        let linear_weight = snapshot.module_type().as_deref() == Some("Struct:Linear")
            && snapshot
                .path_stack
                .as_ref()
                .and_then(|p| p.last())
                .is_some_and(|n| n == "weight")
            && snapshot.shape.len() == 2
            && matches!(snapshot.dtype.size(), 2 | 4 | 8);
        if !linear_weight {
            return self.0.adapt(snapshot);
        }
        let data = snapshot.clone_data_fn();
        let [rows, cols] = [snapshot.shape[0], snapshot.shape[1]];
        TensorSnapshot::from_closure(
            std::rc::Rc::new(move || {
                let d = data()?;
                let bytes = match d.dtype.size() {
                    2 => transpose::<2>(d.as_bytes(), rows, cols),
                    4 => transpose::<4>(d.as_bytes(), rows, cols),
                    _ => transpose::<8>(d.as_bytes(), rows, cols),
                };
                Ok(TensorData::from_bytes_vec(bytes, [cols, rows], d.dtype))
            }),
            snapshot.dtype,
            [cols, rows].into(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        self.0
            .get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// `[rows, cols]` values of `N` bytes each → `[cols, rows]`. A task writes 32 whole output
/// rows, reading the input row by row, so that reads and writes both stay within cache lines.
fn transpose<const N: usize>(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    const ROWS_OUT: usize = 32;
    let src = src.as_chunks::<N>().0;
    let mut dst = vec![[0u8; N]; rows * cols];
    if rows > 0 {
        dst.par_chunks_mut(ROWS_OUT * rows)
            .enumerate()
            .for_each(|(t, out)| {
                let (j0, width) = (t * ROWS_OUT, out.len() / rows);
                for i in 0..rows {
                    for (j, v) in src[i * cols + j0..][..width].iter().enumerate() {
                        out[j * rows + i] = *v;
                    }
                }
            });
    }
    dst.into_flattened()
}

/// Writes any module's parameters under burn's own names (the segmentation heads). Atomic.
pub fn save_module<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: &Path,
) -> Result<(), ModelError> {
    let mut store = SafetensorsStore::from_bytes(None).skip_enum_variants(true);
    let err = |e: String| ModelError::Weights {
        path: path.into(),
        reason: e,
    };
    module
        .save_into(&mut store)
        .map_err(|e| err(e.to_string()))?;
    let bytes = store.get_bytes().map_err(|e| err(e.to_string()))?;
    write_safetensors(path, bytes)
}

/// The files burn-store serialises (model directories, heads): header sorted, written atomically.
fn write_safetensors(path: &Path, bytes: Vec<u8>) -> Result<(), ModelError> {
    match sorted_header(&bytes) {
        Some((header, data)) => write_atomic(path, &[&header, &bytes[data..]]),
        None => write_atomic(path, &[&bytes]),
    }
}

/// The header of safetensors `bytes` (its length prefix included) with its keys sorted, and
/// where the tensor data starts. burn-store and the safetensors crate take the header metadata
/// from a `HashMap`, whose order changes with every save; sorted, the same weights give the
/// same bytes, so checksums of model files compare across runs.
fn sorted_header(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let data = 8usize.checked_add(n)?;
    // serde_json's map is a BTreeMap (no `preserve_order`): parsing sorts the keys.
    let header = serde_json::from_slice::<serde_json::Value>(bytes.get(8..data)?).ok()?;
    let mut h = serde_json::to_vec(&header).expect("a parsed JSON value serialises");
    // The format pads the header with spaces so the tensor data starts 8-byte aligned.
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    Some((out, data))
}

/// Loads what [`save_module`] wrote into `module`; a missing, extra or misshapen tensor is an
/// error naming it.
pub fn load_module<B: Backend, M: ModuleSnapshot<B>>(
    mut module: M,
    path: &Path,
) -> Result<M, ModelError> {
    if !path.is_file() {
        return Err(ModelError::Weights {
            path: path.into(),
            reason: "file not found".into(),
        });
    }
    let mut store = SafetensorsStore::from_file(path)
        .skip_enum_variants(true)
        .allow_partial(true);
    let res = module
        .load_from(&mut store)
        .map_err(|e| ModelError::Weights {
            path: path.into(),
            reason: e.to_string(),
        })?;
    let mut problems: Vec<String> = res.errors.iter().map(|e| e.to_string()).collect();
    problems.extend(
        res.missing
            .iter()
            .map(|(p, _)| format!("missing tensor '{p}'")),
    );
    problems.extend(
        res.unused
            .iter()
            .map(|p| format!("unexpected tensor '{p}'")),
    );
    problems.extend(non_finite(&module));
    if !problems.is_empty() {
        return Err(ModelError::Weights {
            path: path.into(),
            reason: problems.join("; "),
        });
    }
    Ok(module)
}

/// "tensor 'P' has NaN/Inf values" for each such float parameter: a diverged run's checkpoint
/// must not load and turn every later output into NaN far from its cause.
fn non_finite<B: Backend, M: Module<B>>(module: &M) -> Vec<String> {
    struct V {
        path: Vec<String>,
        bad: Vec<String>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            // 0 · x sums to NaN exactly when some x is NaN or ±Inf; one scalar per tensor.
            let probe = (param.val() * 0.0).sum().into_scalar().elem::<f32>();
            if !probe.is_finite() {
                self.bad.push(format!(
                    "tensor '{}' has NaN/Inf values",
                    self.path.join(".")
                ));
            }
        }
    }
    let mut v = V {
        path: Vec::new(),
        bad: Vec::new(),
    };
    module.visit(&mut v);
    v.bad
}

pub fn read_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if cfg.architecture != "vit" {
        return Err(ModelError::Config {
            path,
            reason: format!(
                "architecture '{}' is not supported (only 'vit')",
                cfg.architecture
            ),
        });
    }
    let check = || {
        cfg.vit.validate()?;
        cfg.preprocess.validate()?;
        if cfg.preprocess.size < cfg.vit.patch_size {
            return Err(format!(
                "preprocess.size {} is smaller than one patch ({} px)",
                cfg.preprocess.size, cfg.vit.patch_size
            ));
        }
        if cfg.preprocess.channels != cfg.vit.in_chans {
            return Err(format!(
                "preprocess.channels {} differs from vit.in_chans {}",
                cfg.preprocess.channels, cfg.vit.in_chans
            ));
        }
        Ok(())
    };
    check().map_err(|reason| ModelError::Config { path, reason })?;
    Ok(cfg)
}

/// Loads a model directory; every tensor must be present with the right shape.
pub fn load_model_dir<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Vit<B>, ModelConfig), ModelError> {
    let cfg = read_config(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(ModelError::Weights {
            path: weights,
            reason: "file not found".into(),
        });
    }
    let store = SafetensorsStore::from_file(&weights);
    let model = apply_weights::<B>(&cfg, store, &weights, false, device)?;
    Ok((model, cfg))
}

/// Builds the model of an imported checkpoint. `allow_partial` keeps the initial values of
/// tensors the checkpoint lacks and ignores ones the model has no place for.
pub fn load_imported<B: Backend>(
    imp: &Imported,
    allow_partial: bool,
    device: &B::Device,
) -> Result<Vit<B>, ModelError> {
    let store = SafetensorsStore::from_bytes(Some(imp.weights.clone()));
    apply_weights::<B>(&imp.config, store, &imp.source, allow_partial, device)
}

fn apply_weights<B: Backend>(
    cfg: &ModelConfig,
    store: SafetensorsStore,
    path: &Path,
    allow_partial: bool,
    device: &B::Device,
) -> Result<Vit<B>, ModelError> {
    let mut model = cfg.vit.init::<B>(device);
    let mut store = store
        .with_from_adapter(TimmLayout(PyTorchToBurnAdapter))
        .skip_enum_variants(true)
        .allow_partial(true);
    let res = model
        .load_from(&mut store)
        .map_err(|e| ModelError::Weights {
            path: path.into(),
            reason: e.to_string(),
        })?;
    let mut problems: Vec<String> = res.errors.iter().map(|e| e.to_string()).collect();
    // burn lists norm weights matched through their PyTorch names (weight/bias for gamma/beta)
    // as unused even though they were applied.
    let consumed = |p: &str| {
        let alt = p
            .strip_suffix(".weight")
            .map(|s| format!("{s}.gamma"))
            .or_else(|| p.strip_suffix(".bias").map(|s| format!("{s}.beta")));
        alt.is_some_and(|a| res.applied.contains(&a))
    };
    problems.extend(non_finite(&model));
    if !allow_partial {
        problems.extend(
            res.missing
                .iter()
                .map(|(p, _)| format!("missing tensor '{p}'")),
        );
        problems.extend(
            res.unused
                .iter()
                .filter(|p| !consumed(p))
                .map(|p| format!("unexpected tensor '{p}'")),
        );
    }
    if !problems.is_empty() {
        return Err(ModelError::Weights {
            path: path.into(),
            reason: problems.join("; "),
        });
    }
    Ok(model)
}

/// Writes a DINO head in DINOv2's layout (`mlp.{0,2,4}.weight` as PyTorch `[out, in]`,
/// `last_layer.weight_g/weight_v`), readable by [`crate::import::import_dino_head`] and by
/// PyTorch's `DINOHead.load_state_dict`. Atomic.
pub fn save_dino_head<B: Backend>(
    head: &crate::DinoHead<B>,
    path: &Path,
) -> Result<(), ModelError> {
    let host = |t: burn::tensor::Tensor<B, 2>| -> (Vec<usize>, Vec<f32>) {
        let shape = t.dims().to_vec();
        (shape, t.into_data().convert::<f32>().to_vec().expect("f32"))
    };
    let mut tensors = Vec::new();
    for (i, l) in head.mlp.iter().enumerate() {
        let (s, w) = host(l.weight.val().transpose());
        tensors.push(F32Tensor::new(format!("mlp.{}.weight", 2 * i), s, w));
        if let Some(b) = &l.bias {
            let b = b.val();
            let n = b.dims()[0];
            tensors.push(F32Tensor::new(
                format!("mlp.{}.bias", 2 * i),
                vec![n],
                b.into_data().convert::<f32>().to_vec().expect("f32"),
            ));
        }
    }
    let (s, g) = host(head.last_layer.weight_g.val());
    tensors.push(F32Tensor::new("last_layer.weight_g", s, g));
    let (s, v) = host(head.last_layer.weight_v.val());
    tensors.push(F32Tensor::new("last_layer.weight_v", s, v));
    write_f32_safetensors(path, &tensors, None)
}

/// A tensor for [`write_f32_safetensors`]: its name, shape and f32 values, held or fetched only
/// when the file reaches it, so that a training state (a ViT-B fine-tune's is 1.7 GB) is never
/// in memory twice.
pub struct F32Tensor<'a> {
    name: String,
    shape: Vec<usize>,
    values: Values<'a>,
}

enum Values<'a> {
    Held(Vec<f32>),
    Fetched(Box<dyn Fn() -> Vec<f32> + 'a>),
}

impl<'a> F32Tensor<'a> {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) -> Self {
        let values = Values::Held(values);
        Self {
            name: name.into(),
            shape,
            values,
        }
    }

    /// Values that `fetch` returns when they are written (a device tensor read back then);
    /// they must be as many as `shape` says.
    pub fn fetched(
        name: impl Into<String>,
        shape: Vec<usize>,
        fetch: impl Fn() -> Vec<f32> + 'a,
    ) -> Self {
        let values = Values::Fetched(Box::new(fetch));
        Self {
            name: name.into(),
            shape,
            values,
        }
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

impl safetensors::View for &F32Tensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.values {
            Values::Held(v) => le_bytes(v),
            Values::Fetched(fetch) => {
                let v = fetch();
                // The caller's contract (shape and values come from the same tensor); a
                // mismatch here would write a file whose offsets lie.
                assert_eq!(v.len(), self.len(), "values of '{}'", self.name);
                std::borrow::Cow::Owned(le_bytes(&v).into_owned())
            }
        }
    }

    fn data_len(&self) -> usize {
        self.len() * 4
    }
}

/// f32 tensors as a safetensors file, written to a temporary file and renamed so readers never
/// see half a file. Values go to the file from where they are, not through a copy of the whole
/// file in memory; with at most one `metadata` key (a `HashMap` orders several differently on
/// each run), the same tensors give the same bytes.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[F32Tensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), ModelError> {
    let err = |reason: String| ModelError::Weights {
        path: path.into(),
        reason,
    };
    for t in tensors {
        if let Values::Held(v) = &t.values {
            if v.len() != t.len() {
                let (n, shape) = (v.len(), &t.shape);
                return Err(err(format!(
                    "tensor '{}': {n} values for shape {shape:?}",
                    t.name
                )));
            }
        }
    }
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.as_str(), t)), metadata, &tmp)
        .map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })
}

/// A file's bytes, mapped instead of read: the pages stay the page cache's, so reading a
/// 1 GB state or checkpoint does not take 1 GB of process memory beside the tensors made from
/// it (BENCHMARKS.md, "Loading and saving a ViT-B model directory and training state").
pub fn map_file(path: &Path) -> Result<memmap2::Mmap, ModelError> {
    let io = |source| ModelError::Io {
        path: path.into(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is only read. omnirad replaces its files by renaming a new one over
    // them, which leaves a mapped file whole; a file truncated by another program while it is
    // read would fault, as it would under burn-store, which maps every model it loads.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

/// The little-endian bytes of `v` (safetensors' order): the values' own memory where the
/// machine is little-endian.
fn le_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{transpose, write_f32_safetensors, F32Tensor};

    /// What is written reads back (values, shapes, metadata), the same tensors give the same
    /// bytes, and no temporary file stays behind.
    #[test]
    fn f32_tensors_write_as_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        let values = [
            ("b", vec![2, 3], vec![1.5, -2.0, 0.0, 1e-30, 3.25, f32::MAX]),
            ("a", vec![1], vec![-0.125]),
            ("c", vec![3], vec![7.0, 8.0, 9.0]),
        ];
        // Held, and fetched when written.
        let tensors = [
            F32Tensor::new("b", values[0].1.clone(), values[0].2.clone()),
            F32Tensor::fetched("a", values[1].1.clone(), || values[1].2.clone()),
            F32Tensor::fetched("c", values[2].1.clone(), || values[2].2.clone()),
        ];
        let meta = || Some([("omnirad".to_string(), "{}".to_string())].into());
        write_f32_safetensors(&path, &tensors, meta()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["omnirad"], "{}");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, shape, values) in &values {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.shape(), shape.as_slice());
            let back: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(&back, values);
        }
        write_f32_safetensors(&path, &tensors, meta()).unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1);

        // Held values that do not fill their shape are an error naming the tensor.
        let short = [F32Tensor::new("w", vec![2, 2], vec![1.0; 3])];
        let e = write_f32_safetensors(&path, &short, None).unwrap_err();
        assert!(
            e.to_string().contains("'w': 3 values for shape [2, 2]"),
            "{e}"
        );
    }

    /// Against the definition, for shapes that are and are not whole tasks of 32 output rows,
    /// with the same bytes read as 4- and as 2-byte values.
    #[test]
    fn transpose_swaps_rows_and_columns() {
        let definition = |bytes: &[u8], rows: usize, cols: usize, n: usize| -> Vec<u8> {
            (0..cols)
                .flat_map(|j| (0..rows).map(move |i| i * cols + j))
                .flat_map(|k| bytes[k * n..(k + 1) * n].to_vec())
                .collect()
        };
        for (rows, cols) in [(1, 1), (3, 70), (64, 33), (37, 96), (0, 5)] {
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|v| (v as u32).wrapping_mul(2654435761).to_le_bytes())
                .collect();
            let want = definition(&bytes, rows, cols, 4);
            assert_eq!(transpose::<4>(&bytes, rows, cols), want, "{rows}×{cols}");
            let want = definition(&bytes, rows, 2 * cols, 2);
            assert_eq!(
                transpose::<2>(&bytes, rows, 2 * cols),
                want,
                "{rows}×{cols}, 2 bytes"
            );
        }
    }
}
