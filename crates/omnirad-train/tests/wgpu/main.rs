//! The GPU-side code on burn's wgpu backend against the CPU backend, from the same weights: the
//! encoder's outputs and gradients, a fine-tuning run and pretraining steps agree. wgpu runs the
//! CubeCL kernels, fusion and autotuning of the CUDA backend and omnirad's non-CPU branches
//! (attention's backward through burn's ops, linears as plain matmuls, LayerNorm and the patch
//! embedding as burn's ops, AdamW and the losses as tensor ops), so this checks the GPU side on
//! any machine with a Vulkan, Metal or DirectX 12 adapter; CI gives it Mesa's lavapipe, a Vulkan
//! driver on the CPU.
//!
//! One test binary for the encoder's tests and the training tests: each binary compiles burn's
//! generic backend code for wgpu again (five minutes of the CI machine's two cores for each).
//!
//! `cargo test -p omnirad-train --features wgpu --test wgpu`
#![cfg(feature = "wgpu")]

mod encoder;
mod training;
