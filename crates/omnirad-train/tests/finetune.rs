//! Fine-tuning modes on a tiny ViT and synthetic images: what moves and what stays.

use burn::tensor::backend::Backend;
use ndarray::{Array2, Array3};
use omnirad_data::augment::Augment;
use omnirad_data::{Image, Meta, Preprocess};
use omnirad_eval::TaskKind;
use omnirad_model::{Cpu, VitConfig};
use omnirad_train::finetune::{
    finetune, load_state, predict, save_state, Classifier, EpochLog, FinetuneConfig,
    FinetuneResult, FinetuneState, LabelledImages, LoraConfig,
};
use omnirad_train::params;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = Cpu;

/// burn-flex's random generator is one per process: tests that draw from it (initialisation,
/// dropout, stochastic depth) take turns, so a test's draws do not depend on the others.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Dark vs bright noise images, 32 px: easy, so the tests are about what moves.
fn images(n: usize, seed: u64) -> (Vec<Image>, Array2<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut imgs = Vec::new();
    let mut y = Array2::zeros((n, 1));
    for i in 0..n {
        let c = i % 2;
        y[[i, 0]] = c as i64;
        let base = if c == 0 { 0.1 } else { 0.5 };
        let a = Array3::from_shape_fn((1, 32, 32), |_| base + rng.random_range(0.0f32..0.4));
        imgs.push(Image {
            data: a,
            meta: Meta::default(),
        });
    }
    (imgs, y)
}

/// Encoder parameters by path.
type Snapshot = Vec<(String, Vec<f32>)>;

fn snapshot(m: &Classifier<B>) -> Snapshot {
    params::collect(&m.backbone)
        .into_iter()
        .map(|p| (p.path, p.value.into_data().to_vec::<f32>().unwrap()))
        .collect()
}

/// A binary `vit_pico` classifier (no LayerScale) drawn from `seed`, materialised so that its
/// clones hold the same weights.
fn pico(seed: u64, dropout: f64) -> Classifier<B> {
    let dev = Default::default();
    B::seed(&dev, seed);
    let mut vc = VitConfig::preset("vit_pico").unwrap();
    vc.layer_scale_init = None;
    let model = Classifier::new(vc.init::<B>(&dev), 2, false, dropout, 0, &dev);
    params::materialize(&model);
    model
}

/// The tests' small fine-tuning settings (4 epochs, batch 16, lr 3e-3, no warm-up or drop-path).
fn small_cfg() -> FinetuneConfig {
    FinetuneConfig {
        epochs: 4,
        min_steps: 0,
        batch: 16,
        lr: 3e-3,
        warmup_epochs: 0,
        drop_path: 0.0,
        ..Default::default()
    }
}

/// Fine-tunes `model` on 64 training and 32 validation images drawn from `seeds`.
fn train(model: Classifier<B>, cfg: &FinetuneConfig, seeds: (u64, u64)) -> FinetuneResult<B> {
    train_from(model, cfg, seeds, None, |_, _| true).expect("runs to the end")
}

/// [`train`] from a saved state, with a say after every epoch.
fn train_from(
    model: Classifier<B>,
    cfg: &FinetuneConfig,
    seeds: (u64, u64),
    resume: Option<FinetuneState<B>>,
    on_epoch: impl FnMut(&EpochLog, &FinetuneState<B>) -> bool,
) -> Option<FinetuneResult<B>> {
    let (tr, ytr) = images(64, seeds.0);
    let (va, yva) = images(32, seeds.1);
    let pre = Preprocess {
        size: 32,
        ..Default::default()
    };
    finetune(
        model,
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
        cfg,
        &Default::default(),
        resume,
        on_epoch,
    )
}

fn run(lora: Option<LoraConfig>, frozen: bool) -> (Snapshot, Snapshot, f64) {
    let model = pico(7, 0.0);
    let before = snapshot(&model);
    let cfg = FinetuneConfig {
        lora,
        frozen,
        ..small_cfg()
    };
    let r = train(model, &cfg, (1, 2));
    (before, snapshot(&r.model), r.val.acc)
}

#[test]
fn full_finetuning_moves_the_encoder_and_learns() {
    let _rng = rng_lock();
    let (before, after, acc) = run(None, false);
    assert!(acc > 0.9, "val acc {acc}");
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.1 != a.1)
        .count();
    assert!(
        moved > before.len() / 2,
        "{moved} of {} tensors changed",
        before.len()
    );
}

#[test]
fn lora_trains_only_attention_adapters_and_merges_them() {
    let _rng = rng_lock();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
    };
    let (before, after, acc) = run(Some(lora), false);
    assert!(acc > 0.9, "val acc {acc}");
    // Same names as a plain ViT (adapters merged); only qkv/proj weights differ.
    assert_eq!(
        before.iter().map(|p| &p.0).collect::<Vec<_>>(),
        after.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        let adapted = (name.ends_with("attn.qkv.weight") || name.ends_with("attn.proj.weight"))
            && name.starts_with("blocks.");
        assert_eq!(b != a, adapted, "{name}");
    }
}

#[test]
fn frozen_probe_trains_the_head_only() {
    let _rng = rng_lock();
    let (before, after, acc) = run(None, true);
    assert!(acc > 0.9, "val acc {acc}");
    assert_eq!(before, after);
}

/// Per-epoch training losses of a full fine-tune of `model` in `precision`, and the encoder's
/// weights after.
fn curve(
    model: Classifier<B>,
    precision: omnirad_model::Precision,
) -> (Vec<f64>, Vec<burn::tensor::DType>, Snapshot) {
    let cfg = FinetuneConfig {
        precision,
        ..small_cfg()
    };
    let r = train(model, &cfg, (3, 4));
    let dtypes = params::collect(&r.model.backbone)
        .into_iter()
        .map(|p| p.value.dtype())
        .collect();
    let losses = r.history.iter().map(|h| h.train_loss).collect();
    (losses, dtypes, snapshot(&r.model))
}

#[test]
fn bf16_mixed_precision_follows_the_f32_loss_curve_on_f32_weights() {
    let _rng = rng_lock();
    use omnirad_model::Precision;
    // One seeded initial model for both runs (unseeded, it depended on which tests took the
    // backend RNG before this one, and one draw in ten left the 5 % band).
    let model = pico(5, 0.0);
    let (f32_loss, _, f32_w) = curve(model.clone(), Precision::F32);
    let (bf16_loss, dtypes, bf16_w) = curve(model, Precision::Bf16);
    assert!(
        dtypes.iter().all(|d| *d == burn::tensor::DType::F32),
        "{dtypes:?}"
    );
    for (e, (a, b)) in f32_loss.iter().zip(&bf16_loss).enumerate() {
        assert!(
            (a - b).abs() / a < 0.05,
            "epoch {}: f32 loss {a}, bf16 loss {b}",
            e + 1
        );
    }
    // bf16 really ran: the trained weights differ from the f32 run's.
    assert!(f32_w.iter().zip(&bf16_w).any(|(a, b)| a.1 != b.1));
    println!("f32 {f32_loss:?}\nbf16 {bf16_loss:?}");
}

#[test]
fn gradient_checkpointing_gives_the_same_fine_tuning() {
    let _rng = rng_lock();
    let model = pico(21, 0.2);
    // Dropout and stochastic depth draw random masks: recomputed activations must reuse them.
    let cfg = FinetuneConfig {
        epochs: 2,
        drop_path: 0.2,
        dropout: 0.2,
        ..small_cfg()
    };
    let keep = train(model.clone(), &cfg, (3, 4));
    let recompute = train(
        model,
        &FinetuneConfig {
            grad_checkpoint: true,
            ..cfg
        },
        (3, 4),
    );
    for (a, b) in keep.history.iter().zip(&recompute.history) {
        let rel = (a.train_loss - b.train_loss).abs() / a.train_loss;
        assert!(
            rel < 1e-5,
            "epoch {}: {} vs {}",
            a.epoch,
            a.train_loss,
            b.train_loss
        );
    }
    assert_close(&keep.model, &recompute.model, 1e-5);
}

/// Every encoder parameter of `a` and `b` agrees within `rel` of the tensor's largest value.
fn assert_close(a: &Classifier<B>, b: &Classifier<B>, rel: f32) {
    assert_snapshots_close(&snapshot(a), &snapshot(b), rel);
}

fn assert_snapshots_close(a: &Snapshot, b: &Snapshot, rel: f32) {
    for ((path, a), (_, b)) in a.iter().zip(b) {
        let scale = a.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= rel * scale, "{path}: differs by {diff}");
    }
}

#[test]
fn weight_ema_scores_an_average_and_leaves_training_alone() {
    let _rng = rng_lock();
    let model = pico(9, 0.0);
    let with = |ema| FinetuneConfig { ema, ..small_cfg() };
    let plain = train(model.clone(), &with(None), (1, 2));
    let averaged = train(model.clone(), &with(Some(0.9)), (1, 2));
    // A vanishing decay makes the average the current weights: plain fine-tuning again.
    let current = train(model, &with(Some(1e-9)), (1, 2));
    assert_close(&plain.model, &current.model, 1e-5);
    assert_eq!(plain.best_epoch, current.best_epoch);
    for ((p, a), c) in plain
        .history
        .iter()
        .zip(&averaged.history)
        .zip(&current.history)
    {
        // The average is only scored: the optimised weights, hence the training losses, are
        // the same in all three runs.
        // (Within 1e-6, not bit for bit: rayon's reductions may split differently per run.)
        for other in [a, c] {
            let rel = (p.train_loss - other.train_loss).abs() / p.train_loss;
            assert!(
                rel < 1e-6,
                "epoch {}: {} vs {}",
                p.epoch,
                p.train_loss,
                other.train_loss
            );
        }
        assert!((p.val_loss - c.val_loss).abs() < 1e-5, "epoch {}", p.epoch);
    }
    // ... but what is scored and returned with decay 0.9 is another model, which still learnt.
    let moved = plain
        .history
        .iter()
        .zip(&averaged.history)
        .any(|(p, a)| (p.val_loss - a.val_loss).abs() > 1e-4);
    assert!(
        moved,
        "the EMA run scored the same models as plain fine-tuning"
    );
    assert_ne!(snapshot(&plain.model), snapshot(&averaged.model));
    assert!(averaged.val.acc > 0.9, "val acc {}", averaged.val.acc);
}

#[test]
fn head_epochs_probe_first_then_fine_tune_everything() {
    let _rng = rng_lock();
    let model = pico(5, 0.0);
    let before = snapshot(&model);
    let probe = train(
        model.clone(),
        &FinetuneConfig {
            epochs: 2,
            frozen: true,
            ..small_cfg()
        },
        (1, 2),
    );
    let lp_ft = train(
        model,
        &FinetuneConfig {
            epochs: 2,
            head_epochs: 2,
            ..small_cfg()
        },
        (1, 2),
    );
    // The first two epochs are exactly the head-only probe; numbering continues after them.
    let epochs: Vec<_> = lp_ft.history.iter().map(|h| h.epoch).collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
    for (a, b) in probe.history.iter().zip(&lp_ft.history[..2]) {
        assert_eq!(a.train_loss, b.train_loss, "epoch {}", a.epoch);
    }
    // The model comes from the full fine-tuning epochs, which moved the encoder.
    assert!(lp_ft.best_epoch > 2, "best epoch {}", lp_ft.best_epoch);
    assert_ne!(snapshot(&lp_ft.model), before);
    assert!(lp_ft.val.acc > 0.9, "val acc {}", lp_ft.val.acc);
}

#[test]
fn min_steps_lengthens_training_on_small_sets() {
    let _rng = rng_lock();
    let model = pico(3, 0.0);
    // 64 images in batches of 16 are 4 steps an epoch: 10 steps take 3 epochs, and the
    // learning-rate schedule spans all three (it is mid-way down the cosine after the second).
    let cfg = FinetuneConfig {
        epochs: 1,
        min_steps: 10,
        ..small_cfg()
    };
    let r = train(model.clone(), &cfg, (1, 2));
    assert_eq!(r.history.len(), 3);
    assert!(r.history[1].lr > 0.1 * cfg.lr, "lr {}", r.history[1].lr);
    // Enough steps already: the epochs stay; LP-FT's head-only phase is not stretched.
    let r = train(
        model,
        &FinetuneConfig {
            epochs: 2,
            min_steps: 8,
            head_epochs: 1,
            ..small_cfg()
        },
        (1, 2),
    );
    assert_eq!(r.history.len(), 3);
}

#[test]
fn mixup_trains_on_blended_batches_and_still_learns() {
    let _rng = rng_lock();
    let model = pico(11, 0.0);
    let with = |mixup| FinetuneConfig {
        mixup,
        ..small_cfg()
    };
    let plain = train(model.clone(), &with(0.0), (1, 2));
    let mixed = train(model.clone(), &with(0.4), (1, 2));
    let again = train(model, &with(0.4), (1, 2));
    for ((p, m), a) in plain.history.iter().zip(&mixed.history).zip(&again.history) {
        // Blended targets cannot be fitted as tightly as one-hot ones.
        assert!(
            m.train_loss > p.train_loss,
            "epoch {}: mixup {} vs plain {}",
            p.epoch,
            m.train_loss,
            p.train_loss
        );
        // λ comes from the seed: a rerun blends the same way.
        assert!((m.train_loss - a.train_loss).abs() <= 1e-6 * m.train_loss);
    }
    assert!(mixed.val.acc > 0.9, "val acc {}", mixed.val.acc);
}

#[test]
fn sam_takes_the_gradient_on_the_same_batch_and_masks_and_still_learns() {
    let _rng = rng_lock();
    let model = pico(13, 0.2);
    // Stochastic depth and dropout on: the second pass must draw the first pass's masks.
    let with = |sam| FinetuneConfig {
        sam,
        drop_path: 0.2,
        dropout: 0.2,
        ..small_cfg()
    };
    let plain = train(model.clone(), &with(None), (1, 2));
    // As ρ → 0 the gradient at θ + ε is the gradient at θ: a SAM step is a plain step.
    let tiny = train(model.clone(), &with(Some(1e-7)), (1, 2));
    // Except the key bias: adding it shifts a query's scores by one constant, which the softmax
    // removes, so its gradient is rounding noise that AdamW scales up to steps of either sign
    // (here 1e-3 of the tensor's largest value when the rest agree within 3e-4).
    let without_key_bias = |m: &Classifier<B>| -> Snapshot {
        let mut s = snapshot(m);
        for (path, v) in s.iter_mut().filter(|(p, _)| p.ends_with("attn.qkv.bias")) {
            assert_eq!(v.len() % 3, 0, "{path}");
            let third = v.len() / 3;
            v.drain(third..2 * third);
        }
        s
    };
    assert_snapshots_close(
        &without_key_bias(&plain.model),
        &without_key_bias(&tiny.model),
        1e-3,
    );
    let sharp = train(model, &with(Some(0.05)), (1, 2));
    let moved = snapshot(&plain.model)
        .iter()
        .zip(&snapshot(&sharp.model))
        .any(|((_, a), (_, b))| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3));
    assert!(moved, "ρ 0.05 trained the same weights as plain steps");
    assert!(sharp.val.acc > 0.9, "val acc {}", sharp.val.acc);
}

#[test]
fn mirror_tta_averages_the_image_and_its_left_right_mirror() {
    let _rng = rng_lock();
    let model = pico(12, 0.0);
    let (imgs, _) = images(6, 3);
    // A ramp across the columns makes each image and its mirror differ.
    let imgs: Vec<Image> = imgs
        .into_iter()
        .map(|mut im| {
            im.data
                .indexed_iter_mut()
                .for_each(|((_, _, x), v)| *v += x as f32 / 64.0);
            im
        })
        .collect();
    let mirrored: Vec<Image> = imgs
        .iter()
        .map(|im| Image {
            data: Array3::from_shape_fn((1, 32, 32), |(c, y, x)| im.data[[c, y, 31 - x]]),
            meta: Meta::default(),
        })
        .collect();
    let pre = Preprocess {
        size: 32,
        ..Default::default()
    };
    let dev = Default::default();
    let p =
        |im: &Vec<Image>, tta| predict(std::slice::from_ref(&model), im, &pre, false, 4, tta, &dev);
    let (plain, flipped, tta) = (p(&imgs, false), p(&mirrored, false), p(&imgs, true));
    assert!((&plain - &flipped).iter().any(|d| d.abs() > 1e-4));
    for ((a, b), t) in plain.iter().zip(&flipped).zip(&tta) {
        assert!((0.5 * (a + b) - t).abs() < 1e-6, "{a} {b} {t}");
    }
    // The mean of an image and its mirror is the same from either side.
    let tta_of_mirrored = p(&mirrored, true);
    for (t, m) in tta.iter().zip(&tta_of_mirrored) {
        assert!((t - m).abs() < 1e-6);
    }
}

/// Stops a run after epoch `stop`, saves its state to a file, loads it and continues: the
/// result is the uninterrupted run's — history, selected epoch, encoder and head, bit for bit.
fn resumes_exactly(name: &str, cfg: &FinetuneConfig, dropout: f64, stop: usize) {
    let whole = train(pico(3, dropout), cfg, (1, 2));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("resume-{name}.safetensors"));
    let stopped = train_from(pico(3, dropout), cfg, (1, 2), None, |log, state| {
        if log.epoch < stop {
            return true;
        }
        save_state(&path, state).unwrap();
        false
    });
    assert!(stopped.is_none(), "{name}: stopping returns no result");
    let state = load_state(&path, &pico(3, dropout), cfg, &Default::default()).unwrap();
    assert_eq!(state.history.len(), stop, "{name}");
    let resumed = train_from(pico(3, dropout), cfg, (1, 2), Some(state), |_, _| true).unwrap();
    let losses = |r: &FinetuneResult<B>| -> Vec<(usize, f64, f64)> {
        r.history
            .iter()
            .map(|h| (h.epoch, h.train_loss, h.val_loss))
            .collect()
    };
    assert_eq!(losses(&resumed), losses(&whole), "{name}");
    assert_eq!(resumed.best_epoch, whole.best_epoch, "{name}");
    assert!(
        snapshot(&resumed.model) == snapshot(&whole.model),
        "{name}: encoder differs"
    );
    let head = |m: &Classifier<B>| m.head.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(
        head(&resumed.model),
        head(&whole.model),
        "{name}: head differs"
    );
}

#[test]
fn a_stopped_run_resumes_to_the_same_model() {
    let _rng = rng_lock();
    // Dropout and stochastic depth draw from the backend's generator: resumed steps must draw
    // what the uninterrupted run drew.
    let plain = FinetuneConfig {
        drop_path: 0.1,
        ..small_cfg()
    };
    resumes_exactly("plain", &plain, 0.2, 2);
    // LP-FT stopped inside the head-only phase, and inside the full phase.
    let lp_ft = FinetuneConfig {
        epochs: 2,
        head_epochs: 2,
        ..small_cfg()
    };
    resumes_exactly("lp-ft-head", &lp_ft, 0.0, 1);
    resumes_exactly("lp-ft-full", &lp_ft, 0.0, 3);
    // LoRA adapters, the weight average and mixup's draws all come back.
    let lora = FinetuneConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
        }),
        ema: Some(0.9),
        mixup: 0.4,
        ..small_cfg()
    };
    resumes_exactly("lora-ema-mixup", &lora, 0.0, 2);
    // L2-SP's anchor is the model the run started from, also after a restart.
    let l2sp = FinetuneConfig {
        l2sp: Some(5.0),
        ..small_cfg()
    };
    resumes_exactly("l2sp", &l2sp, 0.0, 2);
}

#[test]
fn l2sp_keeps_the_encoder_near_its_pretrained_weights() {
    let _rng = rng_lock();
    let before = snapshot(&pico(7, 0.0));
    let drift = |l2sp| {
        let cfg = FinetuneConfig {
            l2sp,
            ..small_cfg()
        };
        let r = train(pico(7, 0.0), &cfg, (1, 2));
        let d: f64 = before
            .iter()
            .zip(snapshot(&r.model))
            .flat_map(|(b, a)| b.1.iter().zip(a.1).map(|(x, y)| f64::from(x - y).powi(2)))
            .sum();
        (d.sqrt(), r.val.acc)
    };
    let (free, _) = drift(None);
    // Adam moves a weight about lr a step, the anchor pulls lr·λ of its drift back: drift
    // levels off near 1/λ = 0.01 (16 steps at up to 3e-3 reach about 0.03 without it).
    let (anchored, acc) = drift(Some(100.0));
    assert!(
        anchored < 0.5 * free,
        "‖θ − θ₀‖ {anchored} vs {free} without L2-SP"
    );
    assert!(acc > 0.9, "val acc {acc}");
}

#[test]
fn a_checkpoint_of_another_model_is_refused() {
    let _rng = rng_lock();
    let cfg = FinetuneConfig {
        epochs: 1,
        ..small_cfg()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    train_from(pico(3, 0.0), &cfg, (1, 2), None, |_, state| {
        save_state(&path, state).unwrap();
        true
    });
    // The same run with LoRA adapters expects tensors the file does not have.
    let lora = FinetuneConfig {
        lora: Some(LoraConfig::default()),
        ..cfg
    };
    let err = load_state(&path, &pico(3, 0.0), &lora, &Default::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("parameters missing or of another shape") && err.contains("_lora."),
        "{err}"
    );
}
