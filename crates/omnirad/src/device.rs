//! `--device cpu|cuda[:N]` and model resolution (model directory or preset name).

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use omnirad_model::{load_model_dir, ModelConfig, Vit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(format!("unknown device '{s}' (cpu, cuda, cuda:N)")),
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
        }
    };
}

/// A model directory, or a preset name (random init from `seed`, announced on stderr).
pub fn resolve_model<B: Backend>(
    spec: &str,
    device: &B::Device,
    seed: u64,
) -> Result<(Vit<B>, ModelConfig)> {
    let path = Path::new(spec);
    if path.is_dir() {
        return load_model_dir::<B>(path, device)
            .with_context(|| format!("loading model directory {spec}"));
    }
    let Some(cfg) = ModelConfig::preset(spec) else {
        if path.exists() {
            bail!("{spec}: not a model directory (expected config.json + model.safetensors)");
        }
        bail!(omnirad_model::ModelError::Unknown(spec.to_string()));
    };
    eprintln!("note: '{spec}' is a preset: weights are randomly initialised (seed {seed})");
    B::seed(device, seed);
    Ok((cfg.vit.init::<B>(device), cfg))
}
