//! Training: the losses, gradient norms and trained weights of a fine-tuning run and of
//! pretraining steps agree with the CPU backend's; training states round-trip through their
//! files.

use std::collections::HashMap;

use super::{Gpu, TRAIN_TOL};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use ndarray::{Array2, Array3};
use omnirad_data::augment::Augment;
use omnirad_data::{Image, Meta, Preprocess};
use omnirad_eval::TaskKind;
use omnirad_model::{Cpu, DinoHeadConfig, Precision, VitConfig};
use omnirad_train::finetune::{finetune, Classifier, FinetuneConfig, LabelledImages};
use omnirad_train::masking::BlockMasking;
use omnirad_train::optim::AdamW;
use omnirad_train::params;
use omnirad_train::pretrain::param_group;
use omnirad_train::ssl::{LossConfig, SslBatch, SslModel, SslTrainer, StepValues};
use omnirad_train::state_file::{StateReader, StateWriter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Parameters by path, as host vectors.
fn weights<B: Backend, M: Module<B>>(m: &M) -> HashMap<String, Vec<f32>> {
    params::collect(m)
        .into_iter()
        .map(|p| {
            (
                p.path,
                p.value.into_data().convert::<f32>().to_vec().unwrap(),
            )
        })
        .collect()
}

/// `m` with every parameter set from `w` (by path).
fn with_weights<B: Backend, M: Module<B>>(m: M, w: &HashMap<String, Vec<f32>>) -> M {
    params::replace(m, |path, t| {
        let v = w[path].clone();
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    })
}

/// Values of its own for every parameter of a model: the backends' random generators differ.
fn fill<B: Backend, M: Module<B>>(m: M) -> M {
    params::replace(m, |path, t| {
        let n = t.dims()[0];
        let mut rng = StdRng::seed_from_u64(
            path.bytes()
                .fold(7u64, |h, c| h.wrapping_mul(31) ^ c as u64),
        );
        let base = if path.ends_with("gamma") { 1.0 } else { 0.0 };
        let v: Vec<f32> = (0..n)
            .map(|_| base + rng.random_range(-0.15..0.15))
            .collect();
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    })
}

/// The weights after `steps` AdamW steps of learning rate `lr` agree with `want`'s: all but a
/// few elements to `tol` of their tensor's largest value, and every element to 2·lr per step.
/// AdamW moves an element by about ±lr whatever the size of its gradient, so where a gradient
/// is zero up to rounding (the key bias's, exactly zero in attention) the two backends' rounding
/// picks the sign and the element may differ by up to 2·lr per step; a wrong update or gradient
/// moves most elements instead.
fn assert_weights_close(
    got: &HashMap<String, Vec<f32>>,
    want: &HashMap<String, Vec<f32>>,
    lr: f32,
    steps: usize,
    tol: f64,
) {
    assert_eq!(got.len(), want.len());
    let (mut off, mut total) = (0, 0);
    for (path, w) in want {
        let g = &got[path];
        let scale = w.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        for (x, y) in w.iter().zip(g) {
            let d = (x - y).abs();
            assert!(d <= 2.0 * lr * steps as f32, "{path}: {y} against {x}");
            off += usize::from(d > tol as f32 * scale);
        }
        total += w.len();
    }
    assert!(
        off * 200 <= total,
        "{off} of {total} weights differ by more than {tol}"
    );
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-9)
}

/// Dark against bright noise images, 32 px, grayscale.
fn images(n: usize, seed: u64) -> (Vec<Image>, Array2<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut y = Array2::zeros((n, 1));
    let imgs = (0..n)
        .map(|i| {
            y[[i, 0]] = (i % 2) as i64;
            let base = if i % 2 == 0 { 0.1 } else { 0.5 };
            Image {
                data: Array3::from_shape_fn((1, 32, 32), |_| base + rng.random_range(0.0f32..0.4)),
                meta: Meta::default(),
            }
        })
        .collect();
    (imgs, y)
}

/// A 3-epoch fine-tuning run in the arithmetic `p`, from the same weights on both backends:
/// losses per epoch and the trained weights agree to `tol`.
fn fine_tuning_agrees(p: Precision, tol: f64) {
    let mut vc = VitConfig::preset("vit_pico").unwrap();
    vc.layer_scale_init = Some(0.5);
    let cpu = fill(Classifier::new(
        vc.init::<Cpu>(&Default::default()),
        2,
        false,
        0.0,
        0,
        &Default::default(),
    ));
    let w = weights(&cpu);
    let gpu = with_weights(
        Classifier::new(
            vc.init::<Gpu>(&Default::default()),
            2,
            false,
            0.0,
            0,
            &Default::default(),
        ),
        &w,
    );
    let ((tr, ytr), (va, yva)) = (images(48, 1), images(16, 2));
    let cfg = FinetuneConfig {
        epochs: 3,
        min_steps: 0,
        batch: 16,
        lr: 3e-3,
        warmup_epochs: 1,
        drop_path: 0.0,
        precision: p,
        ..Default::default()
    };
    let pre = Preprocess {
        size: 32,
        ..Default::default()
    };
    macro_rules! run {
        ($model:expr) => {
            finetune(
                $model,
                LabelledImages {
                    images: &tr,
                    labels: ytr.view(),
                },
                LabelledImages {
                    images: &va,
                    labels: yva.view(),
                },
                TaskKind::Binary,
                &Augment::finetune(32),
                &pre,
                &cfg,
                &Default::default(),
                None,
                |_, _| true,
            )
            .expect("runs to the end")
        };
    }
    let (a, b) = (run!(cpu), run!(gpu));
    assert_eq!(a.history.len(), b.history.len());
    for (x, y) in a.history.iter().zip(&b.history) {
        for (what, c, g) in [
            ("train loss", x.train_loss, y.train_loss),
            ("val loss", x.val_loss, y.val_loss),
        ] {
            assert!(
                close(g, c, tol),
                "{p:?}, epoch {} {what}: cpu {c} gpu {g}",
                x.epoch
            );
        }
    }
    if p == Precision::F32 {
        assert_eq!(a.best_epoch, b.best_epoch, "the same epoch chosen");
    }
    let steps = cfg.epochs * tr.len().div_ceil(cfg.batch);
    assert_weights_close(
        &weights(&b.model),
        &weights(&a.model),
        cfg.lr as f32,
        steps,
        tol,
    );
}

#[test]
fn fine_tuning_follows_the_cpu_run() {
    fine_tuning_agrees(Precision::F32, TRAIN_TOL);
}

/// bf16 products on both backends (wgpu has none): their roundings differ in detail (CUDA also
/// adds the linears' biases in bf16), so losses and weights agree more loosely and the selected
/// epoch may differ where two epochs' val scores are close.
#[cfg(feature = "cuda")]
#[test]
fn in_bf16_fine_tuning_follows_the_cpu_run() {
    fine_tuning_agrees(Precision::Bf16, super::BF16_TOL);
}

#[test]
fn pretraining_steps_follow_the_cpu_steps() {
    let vit = VitConfig::preset("vit_pico").unwrap();
    let head = DinoHeadConfig {
        in_dim: 64,
        out_dim: 32,
        hidden_dim: 32,
        bottleneck_dim: 16,
        nlayers: 2,
    };
    let cpu = fill(SslModel::<Cpu>::init(
        &vit,
        &head,
        false,
        &Default::default(),
    ));
    let w = weights(&cpu);
    let gpu = with_weights(
        SslModel::<Gpu>::init(&vit, &head, false, &Default::default()),
        &w,
    );
    // Two global crops of four images, half of them block-masked (the iBOT loss runs).
    let mut rng = StdRng::seed_from_u64(3);
    let globals: Vec<f32> = (0..8 * 3 * 32 * 32)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let batch = SslBatch {
        batch: 4,
        n_global: 2,
        n_local: 0,
        globals,
        global_shape: [8, 3, 32, 32],
        locals: Vec::new(),
        local_shape: [0, 3, 16, 16],
        masks: BlockMasking::new(8, 8).batch(8, 0.5, (0.1, 0.5), &mut rng),
    };
    let v = StepValues {
        lr: 1e-3,
        weight_decay: 0.04,
        momentum: 0.99,
        teacher_temp: 0.04,
        freeze_last_layer: false,
    };
    let group = |p: &str| param_group(p, 2, 1.0, 1.0);
    let mut t_cpu = SslTrainer::new(cpu, LossConfig::default(), Some(3.0), &Default::default());
    let mut t_gpu = SslTrainer::new(gpu, LossConfig::default(), Some(3.0), &Default::default());
    for i in 0..3 {
        let a = t_cpu.step(std::slice::from_ref(&batch), &v, &group, i);
        let b = t_gpu.step(std::slice::from_ref(&batch), &v, &group, i);
        for (what, x, y) in [
            ("loss", a.loss, b.loss),
            ("dino", a.dino, b.dino),
            ("ibot", a.ibot, b.ibot),
            ("koleo", a.koleo, b.koleo),
            ("grad norm", a.grad_norm, b.grad_norm),
        ] {
            assert!(close(y, x, TRAIN_TOL), "step {i} {what}: cpu {x} gpu {y}");
        }
    }
    let (s_gpu, s_cpu) = (
        weights(&t_gpu.student().valid()),
        weights(&t_cpu.student().valid()),
    );
    assert_weights_close(&s_gpu, &s_cpu, v.lr as f32, 3, TRAIN_TOL);
    assert_weights_close(
        &weights(&t_gpu.teacher),
        &weights(&t_cpu.teacher),
        v.lr as f32,
        3,
        TRAIN_TOL,
    );
}

/// A training state written from the device (each tensor read back as the file reaches it)
/// reads back onto the device bit for bit: parameters, AdamW moments and step, metadata.
#[test]
fn a_training_state_round_trips_through_its_file() {
    let dev = Default::default();
    let vc = VitConfig::preset("vit_pico").unwrap();
    let model = fill(vc.init::<Gpu>(&dev));
    let mut opt = AdamW::<Gpu>::new(0.9, 0.999, 1e-8);
    opt.step = 7;
    for p in params::collect(&model) {
        let v = p.value.clone().powi_scalar(2);
        opt.state.insert(p.path, (p.value * 0.5, v));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    let mut w = StateWriter::default();
    w.module("model.", &model);
    w.adam(&opt);
    w.write(&path, "test-1", &opt, serde_json::json!({ "epoch": 3 }))
        .unwrap();

    let mut r = StateReader::<Gpu>::open(&path, "test-1", "test", &dev).unwrap();
    assert_eq!(r.num("epoch").unwrap(), 3);
    let back = r.module("model.", vc.init::<Gpu>(&dev));
    let mut opt_back = AdamW::<Gpu>::new(0.9, 0.999, 1e-8);
    r.finish(&mut opt_back, "another model").unwrap();
    assert_eq!(weights(&back), weights(&model));
    assert_eq!(opt_back.step, 7);
    let host = |t: &Tensor<Gpu, 1>| t.to_data().convert::<f32>().to_vec::<f32>().unwrap();
    assert_eq!(opt_back.state.len(), opt.state.len());
    for (p, (m, v)) in &opt.state {
        let (mb, vb) = &opt_back.state[p];
        assert!(host(m) == host(mb) && host(v) == host(vb), "moments of {p}");
    }
}
