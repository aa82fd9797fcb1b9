//! `--device cpu|cuda[:N]|wgpu` and model resolution (model directory or preset name).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use omnirad_model::{
    import_checkpoint, load_imported, load_model_dir, ModelConfig, Precision, Vit,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The system's preferred Vulkan, Metal or DirectX 12 adapter.
    Wgpu,
}

pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        "wgpu" => Ok(Device::Wgpu),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(format!("unknown device '{s}' (cpu, cuda, cuda:N, wgpu)")),
        },
    }
}

/// Runs `$body` with `$B` bound to the backend type and `$dev` to its device.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $dev:ident| $body:expr) => {
        match $device {
            $crate::device::Device::Cpu => {
                type $B = omnirad_model::Cpu;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::Device::Cuda(i) => {
                $crate::device::check_cuda(i)?;
                $crate::device::kernel_cache();
                type $B = omnirad_model::Cuda;
                let $dev = burn::backend::cuda::CudaDevice::new(i);
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::Device::Cuda(_) => {
                anyhow::bail!(
                    "this omnirad was built without CUDA support: rebuild with `--features cuda`"
                )
            }
            #[cfg(feature = "wgpu")]
            $crate::device::Device::Wgpu => {
                $crate::device::check_wgpu()?;
                $crate::device::kernel_cache();
                type $B = omnirad_model::Wgpu;
                let $dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
                $body
            }
            #[cfg(not(feature = "wgpu"))]
            $crate::device::Device::Wgpu => {
                anyhow::bail!(
                    "this omnirad was built without wgpu support: rebuild with `--features wgpu`"
                )
            }
        }
    };
}

/// burn's CUDA runtime starts on a worker thread that panics when the driver library is missing
/// or the device does not exist, and the command then dies on a bare `RecvError`; asking the
/// driver first turns both into an error that says what is wrong.
#[cfg(feature = "cuda")]
pub fn check_cuda(index: usize) -> Result<()> {
    static COUNT: std::sync::OnceLock<Result<i32, String>> = std::sync::OnceLock::new();
    let count = COUNT.get_or_init(|| {
        const NAMES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
        // SAFETY: the NVIDIA driver library has no load-time side effects beyond its own
        // initialisation; it stays loaded (leaked) because burn's runtime loads it again.
        let lib = NAMES
            .iter()
            .find_map(|n| unsafe { libloading::Library::new(*n) }.ok())
            .ok_or_else(|| {
                "the NVIDIA driver library (libcuda.so.1) was not found: install the NVIDIA \
                 driver, or run with --device cpu"
                    .to_string()
            })?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Count = unsafe extern "C" fn(*mut i32) -> i32;
        // SAFETY: cuInit and cuDeviceGetCount have these C signatures in every driver version.
        unsafe {
            let missing = |e: libloading::Error| format!("the NVIDIA driver library: {e}");
            let init = lib.get::<Init>(b"cuInit\0").map_err(missing)?;
            let get_count = lib.get::<Count>(b"cuDeviceGetCount\0").map_err(missing)?;
            match init(0) {
                0 => {}
                100 => return Ok(0), // CUDA_ERROR_NO_DEVICE
                rc => {
                    return Err(format!(
                        "the NVIDIA driver failed to start (CUDA error {rc})"
                    ))
                }
            }
            let mut n = 0;
            match get_count(&mut n) {
                0 => Ok(n),
                rc => Err(format!(
                    "the NVIDIA driver could not list devices (CUDA error {rc})"
                )),
            }
        }
    });
    match count {
        Err(e) => bail!("--device cuda: {e}"),
        Ok(n) if index >= *n as usize => bail!(
            "--device cuda:{index}: this machine has {n} CUDA device(s){}",
            if *n == 0 {
                " (is CUDA_VISIBLE_DEVICES empty?); run with --device cpu"
            } else {
                ""
            }
        ),
        Ok(_) => Ok(()),
    }
}

/// burn's wgpu runtime panics on a worker thread when the system has no adapter; asking wgpu
/// first turns that into an error, and names the adapter that will run (once per process).
#[cfg(feature = "wgpu")]
pub fn check_wgpu() -> Result<()> {
    static ADAPTER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let adapter = ADAPTER.get_or_init(|| {
        // The graphics API burn's runtime uses on this system (Vulkan on Linux, Metal on macOS).
        use cubecl::wgpu::GraphicsApi;
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: cubecl::wgpu::AutoGraphicsApi::backend().into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        // What burn's runtime asks for on the default device.
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
        };
        match cubecl::future::block_on(instance.request_adapter(&options)) {
            Ok(a) => {
                let i = a.get_info();
                eprintln!("wgpu: {} ({:?}, {:?})", i.name, i.backend, i.device_type);
                Ok(())
            }
            Err(e) => Err(format!(
                "no {:?} adapter ({e}): install the GPU's driver (on \
                 Linux without a GPU, Mesa's lavapipe, package mesa-vulkan-drivers, runs Vulkan \
                 on the CPU), or run with --device cpu",
                cubecl::wgpu::AutoGraphicsApi::backend()
            )),
        }
    });
    match adapter {
        Ok(_) => Ok(()),
        Err(e) => bail!("--device wgpu: {e}"),
    }
}

/// Where compiled GPU kernels and autotune results are kept between runs, so only the first
/// run of a shape pays for compilation and autotuning (minutes on a fresh CUDA machine):
/// `$OMNIRAD_KERNEL_CACHE`, else `$XDG_CACHE_HOME/omnirad/cubecl` or `~/.cache/omnirad/cubecl`.
/// A `cubecl.toml` / `burn.toml` in the working directory or above it takes precedence (then
/// `None`). CubeCL itself caches no compiled kernels unless configured to, and on wgpu's WGSL
/// path (the `wgpu` feature) it keeps autotune results only.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn kernel_cache() -> Option<std::path::PathBuf> {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    use std::path::PathBuf;
    static CACHE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| {
            let mut dir = std::env::current_dir().ok()?;
            loop {
                let files = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"];
                if files.iter().any(|f| dir.join(f).is_file()) {
                    return None;
                }
                if !dir.pop() {
                    break;
                }
            }
            let path = std::env::var_os("OMNIRAD_KERNEL_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    let base = std::env::var_os("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .or_else(|| {
                            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                        })?;
                    Some(base.join("omnirad").join("cubecl"))
                })?;
            let mut cfg = CubeClRuntimeConfig::default().override_from_env();
            cfg.compilation.cache = Some(CacheConfig::File(path.clone()));
            cfg.autotune.cache = CacheConfig::File(path.clone());
            CubeClRuntimeConfig::set(cfg);
            Some(path)
        })
        .clone()
}

/// `p` when the backend can run it: burn's wgpu backend has no bf16 (WGSL has none), and asking
/// for it there panics inside burn.
pub fn precision<B: Backend>(dev: &B::Device, p: Precision) -> Result<Precision> {
    if p == Precision::Bf16 && !B::supports_dtype(dev, burn::tensor::DType::BF16) {
        bail!("--dtype bf16: this device has no bf16 arithmetic (wgpu's shader languages have none); use --dtype f32");
    }
    Ok(p)
}

/// `cfg` with its preprocessing resizing to `size` (when given), checked against the patch size.
pub fn with_input_size(mut cfg: ModelConfig, size: Option<usize>) -> Result<ModelConfig> {
    if let Some(s) = size {
        let p = cfg.vit.patch_size;
        if s == 0 || !s.is_multiple_of(p) {
            bail!("--input-size {s} is not a positive multiple of the encoder's patch size {p}");
        }
        cfg.preprocess.size = s;
    }
    Ok(cfg)
}

/// An omnirad model directory, as opposed to a downloaded checkpoint folder: timm hub
/// `config.json` files also have an `architecture` (a timm model name) but no `vit` section.
fn is_model_dir(path: &Path) -> bool {
    let cfg = std::fs::read_to_string(path.join("config.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&cfg)
        .map(|v| v.get("architecture").is_some() && v.get("vit").is_some_and(|s| s.is_object()))
        .unwrap_or(false)
}

/// A model directory, a public checkpoint (HF / timm / DINOv2 safetensors, imported on the
/// fly), or a preset name (random init from `seed`, announced on stderr).
pub fn resolve_model<B: Backend>(
    spec: &str,
    device: &B::Device,
    seed: u64,
) -> Result<(Vit<B>, ModelConfig)> {
    let path = Path::new(spec);
    if path.is_dir() && is_model_dir(path) {
        return load_model_dir::<B>(path, device)
            .with_context(|| format!("loading model directory {spec}"));
    }
    if path.exists() {
        let imp = import_checkpoint(path, None, None)
            .with_context(|| format!("importing checkpoint {spec}"))?;
        note_assumed_heads(&imp);
        let model = load_imported::<B>(&imp, false, device)
            .with_context(|| format!("importing checkpoint {spec}"))?;
        return Ok((model, imp.config));
    }
    let Some(cfg) = ModelConfig::preset(spec) else {
        bail!(omnirad_model::ModelError::Unknown(spec.to_string()));
    };
    eprintln!("note: '{spec}' is a preset: weights are randomly initialised (seed {seed})");
    B::seed(device, seed);
    let model = cfg.vit.init::<B>(device);
    // Draw the lazily initialised weights now, so clones (one per seed) share them.
    omnirad_train::params::materialize(&model);
    Ok((model, cfg))
}

/// A file's size and a 128-bit hash of its bytes (xxh3), for cache and resume keys: a copy of
/// the same file (a new modification time) keeps its finished work, a changed one of the same
/// size does not. A folder's hashes its files' names and stamps. None when it cannot be read.
pub fn stamp(p: &Path) -> Option<String> {
    let m = std::fs::metadata(p).ok()?;
    if m.is_dir() {
        let mut files = Vec::new();
        omnirad_data::source::walk(p, &mut files).ok()?;
        let listing: String = files
            .iter()
            .map(|f| {
                let name = f.strip_prefix(p).unwrap_or(f).display();
                format!("{name}\t{:?}\n", stamp(f))
            })
            .collect();
        let hash = xxhash_rust::xxh3::xxh3_128(listing.as_bytes());
        return Some(format!("{} files:{hash:032x}", files.len()));
    }
    Some(format!("{}:{}", m.len(), content_hash(p, &m)?))
}

/// The xxh3-128 of a file's bytes, computed once per process for each (path, size,
/// modification time): a benchmark asks for its data file's once per run.
fn content_hash(p: &Path, m: &std::fs::Metadata) -> Option<String> {
    use std::collections::HashMap;
    use std::io::Read;
    use std::sync::{Mutex, OnceLock};
    type Seen = HashMap<(PathBuf, u64, Option<std::time::SystemTime>), String>;
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    let id = (p.to_path_buf(), m.len(), m.modified().ok());
    let seen = SEEN.get_or_init(Default::default);
    if let Some(s) = seen.lock().ok()?.get(&id) {
        return Some(s.clone());
    }
    let mut file = std::fs::File::open(p).ok()?;
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).ok()? {
            0 => break,
            n => hash.update(&buf[..n]),
        }
    }
    let s = format!("{:032x}", hash.digest128());
    seen.lock().ok()?.insert(id, s.clone());
    Some(s)
}

/// Says so when an imported checkpoint's attention heads were assumed (64-dim heads, as all
/// released ViTs have): a wrong count would give another model without an error.
pub fn note_assumed_heads(imp: &omnirad_model::Imported) {
    if imp.heads_assumed {
        eprintln!(
            "note: {} does not record its attention heads: assumed {} (64 dims each, as in the \
             released ViTs); `omnirad convert --heads N` sets them",
            imp.source.display(),
            imp.config.vit.num_heads
        );
    }
}

/// [`stamp`]s of the files a `--model` argument reads (none for a preset name).
pub fn model_stamps(model: &str) -> Vec<Option<String>> {
    let model = Path::new(model);
    if model.is_dir() {
        ["config.json", "model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| stamp(&model.join(f)))
            .collect()
    } else {
        vec![stamp(model)]
    }
}

#[cfg(test)]
mod tests {
    use super::stamp;

    /// The same bytes under a new modification time keep their stamp; other bytes of the same
    /// size, or another file in a folder, change it.
    #[test]
    fn stamps_follow_content_not_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        std::fs::write(&a, b"0123456789").unwrap();
        std::fs::write(dir.path().join("b.bin"), b"xy").unwrap();
        let (file, folder) = (stamp(&a).unwrap(), stamp(dir.path()).unwrap());
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        let touch = |t| {
            let f = std::fs::File::options().write(true).open(&a).unwrap();
            f.set_modified(t).unwrap();
        };
        touch(later);
        assert_eq!(stamp(&a).unwrap(), file);
        assert_eq!(stamp(dir.path()).unwrap(), folder);
        std::fs::write(&a, b"0123456780").unwrap();
        touch(later + std::time::Duration::from_secs(1));
        assert_ne!(stamp(&a).unwrap(), file);
        let changed = stamp(dir.path()).unwrap();
        assert_ne!(changed, folder);
        std::fs::write(dir.path().join("c.bin"), b"").unwrap();
        assert_ne!(stamp(dir.path()).unwrap(), changed);
        assert!(stamp(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn device_names_parse_and_a_backend_not_built_is_an_error() {
        use super::{parse_device, Device};
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda:1"), Ok(Device::Cuda(1)));
        assert_eq!(parse_device("wgpu"), Ok(Device::Wgpu));
        let e = parse_device("gpu").unwrap_err();
        assert!(e.contains("wgpu") && e.contains("cuda:N"), "{e}");
        #[cfg(not(feature = "wgpu"))]
        {
            let run = || -> anyhow::Result<usize> {
                crate::with_backend!(Device::Wgpu, |B, dev| {
                    Ok(<B as burn::tensor::backend::Backend>::name(&dev).len())
                })
            };
            let e = run().unwrap_err().to_string();
            assert!(e.contains("--features wgpu"), "{e}");
        }
    }

    /// Holds on any machine: without a driver, and with one (no machine has 2^20 devices).
    #[cfg(feature = "cuda")]
    #[test]
    fn a_missing_cuda_device_is_an_error_naming_the_flag() {
        let e = super::check_cuda(1 << 20).unwrap_err().to_string();
        assert!(e.starts_with("--device cuda"), "{e}");
    }
}
