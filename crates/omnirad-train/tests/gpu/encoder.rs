//! The encoder: the same weights (through a model directory) give the same outputs and the same
//! gradients on both backends.

#[cfg(feature = "cuda")]
use super::BF16_TOL;
use super::{Gpu, F32_TOL};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use omnirad_model::{
    load_model_dir, save_model_dir, Cpu, ModelConfig, Precision, Train, Vit, VitConfig,
};

/// vit_pico (width 64, depth 2, 32 px) with a register and LayerScale, so every part runs.
fn config() -> ModelConfig {
    let vit = VitConfig {
        num_registers: 1,
        layer_scale_init: Some(0.5),
        ..VitConfig::preset("vit_pico").unwrap()
    };
    ModelConfig::new(vit, Default::default())
}

/// Deterministic values in [-2, 2] (burn's RNG differs between backends).
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| 2.0 * (i as f32 * 0.618 + seed).sin())
        .collect()
}

fn tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    dev: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), dev)
}

/// The CPU model and the same weights loaded on the GPU backend, in the arithmetic `p`.
fn both<A: Backend, G: Backend>(dir: &std::path::Path, p: Precision) -> (Vit<A>, Vit<G>) {
    let cfg = config();
    // Seeded under a lock: the CPU backend's generator is one per process, shared by the tests.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let vit = {
        let _lock = RNG.lock().unwrap_or_else(|e| e.into_inner());
        Cpu::seed(&Default::default(), 17);
        cfg.vit.init::<Cpu>(&Default::default())
    };
    save_model_dir(&vit, &cfg, dir).unwrap();
    let (a, _) = load_model_dir::<A>(dir, &Default::default()).unwrap();
    let (g, _) = load_model_dir::<G>(dir, &Default::default()).unwrap();
    (a.with_precision(p), g.with_precision(p))
}

/// `got` equals `want` to `tol` relative to the largest |want|.
fn assert_close(got: Vec<f32>, want: Vec<f32>, tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 1e-6, "{what}: degenerate reference");
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale;
    assert!(
        err < tol,
        "{what}: max error {err} relative to max |ref| {scale}"
    );
}

fn vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// The final tokens [B, N, D]: class token, register, patches (inference mode: no drop path).
fn tokens<B: Backend>(vit: &Vit<B>, x: Tensor<B, 4>) -> Tensor<B, 3> {
    let out = vit.forward_features(x, None, &[], false);
    let [b, d] = out.cls.dims();
    let mut parts = vec![out.cls.reshape([b, 1, d])];
    parts.extend(out.registers);
    parts.push(out.patches);
    Tensor::cat(parts, 1)
}

/// The encoder's tokens in the arithmetic `p` agree with the CPU's to `tol`.
fn outputs_agree(p: Precision, tol: f64) {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, gpu) = both::<Cpu, Gpu>(dir.path(), p);
    // 40 px: 100 patch tokens and interpolated position embeddings.
    for size in [32, 40] {
        let x = values(2 * 3 * size * size, 0.3);
        let shape = [2, 3, size, size];
        let want = vec(tokens(
            &cpu,
            tensor::<Cpu, 4>(x.clone(), shape, &Default::default()),
        ));
        let got = vec(tokens(
            &gpu,
            tensor::<Gpu, 4>(x, shape, &Default::default()),
        ));
        assert_close(got, want, tol as f32, &format!("{p:?}, {size} px tokens"));
    }
}

/// Input gradients and the gradients of one weight of each kind, under Σ tanh(out) ⊙ W, in the
/// arithmetic `p`, agree with the CPU's to `tol`.
fn gradients_agree(p: Precision, tol: f64) {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, gpu) = both::<Train<Cpu>, Train<Gpu>>(dir.path(), p);
    let (x, w) = (values(2 * 3 * 32 * 32, 0.7), values(2 * 66 * 64, 1.9));
    fn grads<B: burn::tensor::backend::AutodiffBackend>(
        vit: &Vit<B>,
        x: &[f32],
        w: &[f32],
    ) -> Vec<(&'static str, Vec<f32>)> {
        let dev = Default::default();
        let x = tensor::<B, 4>(x.to_vec(), [2, 3, 32, 32], &dev).require_grad();
        let out = tokens(vit, x.clone());
        let loss = (out.tanh() * tensor::<B, 3>(w.to_vec(), [2, 66, 64], &dev)).sum();
        let g = loss.backward();
        let p2 = |p: &Param<Tensor<B, 2>>| vec(p.grad(&g).unwrap());
        let b = &vit.blocks;
        vec![
            ("image", vec(x.grad(&g).unwrap())),
            (
                "patch embedding",
                vec(vit.patch_embed.proj.weight.grad(&g).unwrap()),
            ),
            ("class token", vec(vit.cls_token.grad(&g).unwrap())),
            ("block 0 qkv", p2(&b[0].attn.qkv.weight)),
            ("block 0 proj", p2(&b[0].attn.proj.weight)),
            ("block 1 norm1", vec(b[1].norm1.gamma.grad(&g).unwrap())),
            ("block 1 fc1", p2(&b[1].mlp.fc1.weight)),
            (
                "block 1 fc2 bias",
                vec(b[1].mlp.fc2.bias.as_ref().unwrap().grad(&g).unwrap()),
            ),
            (
                "final norm",
                vec(vit.norm.beta.as_ref().unwrap().grad(&g).unwrap()),
            ),
        ]
    }
    for ((what, want), (_, got)) in grads(&cpu, &x, &w).into_iter().zip(grads(&gpu, &x, &w)) {
        assert_close(got, want, tol as f32, &format!("{p:?}, {what}"));
    }
}

#[test]
fn the_encoder_gives_the_cpu_outputs() {
    outputs_agree(Precision::F32, F32_TOL);
}

#[test]
fn training_gradients_are_the_cpu_gradients() {
    gradients_agree(Precision::F32, F32_TOL);
}

#[cfg(feature = "cuda")]
#[test]
fn in_bf16_the_encoder_gives_the_cpu_outputs() {
    outputs_agree(Precision::Bf16, BF16_TOL);
}

#[cfg(feature = "cuda")]
#[test]
fn in_bf16_training_gradients_are_the_cpu_gradients() {
    gradients_agree(Precision::Bf16, BF16_TOL);
}
