//! Writing and reading ViT-B/16's files on the CPU (`cargo bench -p omnirad-model --bench files`):
//! a fine-tuning state's worth of f32 tensors (weights and AdamW's two moments, 3 × 86.6 M
//! values, what `StateWriter` writes) written and read back, then a model directory saved and
//! loaded. Wall times of three rounds, and the process's peak resident memory (BENCHMARKS.md,
//! "Loading and saving a ViT-B model directory and training state").
use std::time::Instant;

use burn::tensor::{Distribution, Tensor, TensorData};
use omnirad_model::{
    f32_tensors, load_model_dir, map_file, save_model_dir, write_f32_safetensors, Cpu, F32Tensor,
    ModelConfig,
};

/// A field of /proc/self/status in MB: VmHWM (peak resident), RssAnon (process memory),
/// RssFile (mapped file pages, which the kernel can drop and read again).
fn status_mb(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
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
    let d = Default::default();
    let state: Vec<Tensor<Cpu, 1>> = (0..3)
        .map(|_| {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            Tensor::from_data(TensorData::new(v, [n]), &d)
        })
        .collect();
    println!("tensors in memory: {:.0} MB of RSS", status_mb("VmHWM"));
    // As `StateWriter` hands them over: ViT-B-sized pieces (its fc1 weight has 2.36 M values),
    // each read back from its tensor when the file reaches it.
    const PIECE: usize = 768 * 3072;
    rounds("write a fine-tuning state (1.04 GB)", || {
        let mut entries = Vec::new();
        for (k, t) in ["weights", "moment1", "moment2"].into_iter().zip(&state) {
            for (i, a) in (0..n).step_by(PIECE).enumerate() {
                let b = (a + PIECE).min(n);
                let fetch = move || t.clone().slice(a..b).into_data().to_vec().unwrap();
                entries.push(F32Tensor::fetched(format!("{k}.{i}"), vec![b - a], fetch));
            }
        }
        write_f32_safetensors(&dir.path().join("state.safetensors"), &entries, None).unwrap()
    });
    println!(
        "peak RSS after the state writes: {:.0} MB",
        status_mb("VmHWM")
    );
    drop(state);
    // Read back as `StateReader` does, with the file's bytes and the tensors both alive.
    let path = dir.path().join("state.safetensors");
    rounds("read it back", || {
        let bytes = map_file(&path).unwrap();
        let tensors = f32_tensors(&bytes, &path).unwrap();
        print!(
            "[process {:.0} MB, mapped file {:.0} MB] ",
            status_mb("RssAnon"),
            status_mb("RssFile")
        );
        drop(tensors);
    });

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
