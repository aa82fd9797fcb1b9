//! The GPU-side code against the CPU backend, from the same weights: the encoder's outputs and
//! gradients, a fine-tuning run and pretraining steps agree. Built with `wgpu` it runs on burn's
//! wgpu backend, which has the CubeCL kernels, fusion and autotuning of the CUDA backend and
//! omnirad's non-CPU branches (attention's backward through burn's ops, linears as plain
//! matmuls, LayerNorm and the patch embedding as burn's ops, AdamW and the losses as tensor
//! ops), so it checks the GPU side on any machine with a Vulkan, Metal or DirectX 12 adapter; CI
//! gives it Mesa's lavapipe, a Vulkan driver on the CPU. Built with `cuda` (and run on the GPU
//! machine, `bench/gpu_session.sh tests`) it checks the same on CUDA, bf16 included.
//!
//! One test binary for the encoder's tests and the training tests: each binary compiles burn's
//! generic backend code again (3.5 minutes of two cores at opt-level 1, 42 s at the opt-level 0
//! `.ci/run` builds it with).
//!
//! `cargo test -p omnirad-train --features wgpu --test gpu` (or `--features cuda`)
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod encoder;
mod training;

/// The backend under test.
#[cfg(feature = "cuda")]
type Gpu = omnirad_model::Cuda;
#[cfg(not(feature = "cuda"))]
type Gpu = omnirad_model::Wgpu;

/// Relative tolerance of f32 results against the CPU's. wgpu computes in f32 throughout; on CUDA
/// burn's autotuner may run f32 products on TF32 tensor cores (10-bit mantissas, about 1e-3
/// relative per product), which burn 0.21 cannot turn off.
#[cfg(feature = "cuda")]
const F32_TOL: f64 = 1e-2;
#[cfg(not(feature = "cuda"))]
const F32_TOL: f64 = 1e-4;

/// Relative tolerance of training losses, gradient norms and trained weights: the backends sum
/// in different orders, and AdamW's steps carry the differences forward.
#[cfg(feature = "cuda")]
const TRAIN_TOL: f64 = 2e-2;
#[cfg(not(feature = "cuda"))]
const TRAIN_TOL: f64 = 1e-3;

/// Relative tolerance of bf16 results (CUDA only: wgpu has no bf16). Both backends round every
/// product's operands to bf16 (8-bit mantissas, 4e-3 relative) and sum in f32, in different
/// orders.
#[cfg(feature = "cuda")]
const BF16_TOL: f64 = 5e-2;
