//! Encoders, heads and weight I/O, generic over burn's `Backend`.

pub mod attention;
mod cpu_gemm;
#[doc(hidden)]
pub use cpu_gemm::amx::tile_loop_rate;
pub use cpu_gemm::bf16_kernel;
pub mod dino_head;
pub mod gelu;
pub mod import;
pub mod io;
pub mod layer_norm;
pub mod linear;
pub mod mlp;
pub mod permute;
pub mod residual;
pub mod seg;
pub mod simd;
pub mod vit;
pub mod weight_norm;

pub use dino_head::{DinoHead, DinoHeadConfig};
pub use gelu::gelu;
pub use import::{
    f32_tensors, import_checkpoint, import_dino_head, Imported, Layout, DINO_HEAD_FILE,
};
pub use io::{
    load_imported, load_model_dir, load_module, map_file, save_dino_head, save_model_dir,
    save_module, write_f32_safetensors, F32Tensor, ModelConfig, ModelError,
};
pub use seg::{SegHead, SegHeadConfig, SegHeadKind, Segmenter};
pub use vit::{Ffn, PosInterp, Precision, Vit, VitConfig, VitOutput};

/// The CPU backend (pure Rust, SIMD + threads).
pub type Cpu = burn::backend::Flex<f32, i32>;
/// The NVIDIA backend (CubeCL, kernels JIT-compiled through NVRTC; fusion + autotune).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
/// The portable GPU backend (wgpu: Vulkan, Metal, DirectX 12; the same CubeCL kernels, fusion
/// and autotuning as `Cuda`, compiled to the graphics API's shader language).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu<f32, i32>;
/// A backend with gradients, for training. `C` decides which activations the backward pass
/// keeps: all of them ([`NoCheckpointing`]), or only the outputs of compute-bound ops, recomputing
/// norms, activations and elementwise ops from them ([`BalancedCheckpointing`]: less memory for
/// a few % more time, so larger batches fit).
pub type Train<B, C = NoCheckpointing> = burn::backend::Autodiff<B, C>;
pub use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};

/// Whether two type names are the same type: how the custom ops (here and in omnirad-train's
/// optimizer) recognise the backends they have kernels for (burn has no extension point for them).
pub fn is_same<T: 'static, U: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>()
}

/// A move between two names of one type (callers check [`is_same`] first).
pub fn cast_same<T: 'static, U: 'static>(t: T) -> U {
    *(Box::new(t) as Box<dyn std::any::Any>)
        .downcast::<U>()
        .expect("cast_same: types checked equal")
}

/// Deterministic test values in [−3, 3], varied enough for gradient checks, drawn without burn's
/// process-wide RNG (other tests in the process draw from it and expect their own sequence).
#[cfg(test)]
fn test_values<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
) -> burn::tensor::Tensor<B, D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            (1.7 * (i as f32 * 0.618 + seed as f32 * 2.3).sin())
                .tan()
                .clamp(-3.0, 3.0)
        })
        .collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, shape), &Default::default())
}

/// Whether the bf16 block paths (AMX or AVX-512 BF16) can run here; says that `what` goes
/// unexercised when not.
#[cfg(test)]
fn amx_here(what: &str) -> bool {
    let ok = cpu_gemm::amx::available();
    if !ok {
        eprintln!("no AMX or AVX-512 BF16 here, not exercised: {what}");
    }
    ok
}

/// `a` equals `b` to 1e-5 relative to the largest |b|.
#[cfg(test)]
fn assert_close<const D: usize>(
    a: burn::tensor::Tensor<Cpu, D>,
    b: burn::tensor::Tensor<Cpu, D>,
    what: &str,
) {
    let scale = b.clone().abs().max().into_scalar();
    let err = (a - b).abs().max().into_scalar() / scale;
    assert!(
        err < 1e-5,
        "{what}: max error {err} relative to max |ref| {scale}"
    );
}
