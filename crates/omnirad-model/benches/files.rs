//! Writing and reading ViT-B/16's files on the CPU (`cargo bench -p omnirad-model --bench files`):
//! a fine-tuning state's worth of f32 tensors (weights and AdamW's two moments, 3 × 86.6 M
//! values, what `StateWriter` writes), then a model directory saved and loaded. Wall times of
//! three rounds, and the process's peak resident memory after the state writes (BENCHMARKS.md,
//! "Loading and saving a ViT-B model directory").
use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use omnirad_model::{load_model_dir, save_model_dir, write_f32_safetensors, Cpu, ModelConfig};

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn rounds(name: &str, mut f: impl FnMut()) {
    let ms: Vec<String> = (0..3)
        .map(|_| {
            let s = Instant::now();
            f();
            format!("{:.0}", s.elapsed().as_secs_f64() * 1e3)
        })
        .collect();
    println!("{name}: {} ms", ms.join(", "));
}

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = ModelConfig::preset("vit_b16").expect("a preset");
    let n = cfg.vit.num_params() as usize;
    let state: Vec<(String, Vec<usize>, Vec<f32>)> = ["weights", "moment1", "moment2"]
        .iter()
        .map(|k| (k.to_string(), vec![n], (0..n).map(|i| i as f32).collect()))
        .collect();
    println!("tensors in memory: {:.0} MB of RSS", peak_rss_mb());
    rounds("write a fine-tuning state (1.04 GB)", || {
        write_f32_safetensors(&dir.path().join("state.safetensors"), &state, None).unwrap()
    });
    println!("peak RSS after the state writes: {:.0} MB", peak_rss_mb());
    drop(state);

    let d = Default::default();
    let vit = cfg.vit.init::<Cpu>(&d);
    // Materialises the lazily initialised parameters, which the first save would time.
    let _ = vit.forward(Tensor::random([1, 3, 224, 224], Distribution::Default, &d));
    let model = dir.path().join("vitb");
    rounds("save a model directory (346 MB)", || {
        save_model_dir(&vit, &cfg, &model).unwrap()
    });
    rounds("load it", || {
        load_model_dir::<Cpu>(&model, &d).unwrap();
    });
}
