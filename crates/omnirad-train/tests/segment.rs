//! Segmentation: the loss against hand values, window tiling, and a frozen-encoder adapter that
//! learns BUSI lesions from a few real images.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use omnirad_data::seg::{open_splits, window_starts, SegWindow};
use omnirad_data::Preprocess;
use omnirad_model::{Cpu, SegHeadConfig, SegHeadKind, VitConfig};
use omnirad_train::loss::ce_dice_loss;
use omnirad_train::segment::{
    build, evaluate, load_state, predict_probs, save_state, train, SegTrainConfig,
};

fn t4(v: Vec<f32>, s: [usize; 4]) -> Tensor<Cpu, 4> {
    Tensor::from_data(TensorData::new(v, s), &Default::default())
}

#[test]
fn ce_dice_by_hand() {
    let l3 = 3f32.ln();
    // Two pixels, two classes: p(fg) = 0.75 and 0.25; both pixels are foreground.
    let z = t4(vec![0.0, l3, l3, 0.0], [1, 2, 1, 2]);
    let y = t4(vec![0.0, 0.0, 1.0, 1.0], [1, 2, 1, 2]);
    let (ce, dice) = ce_dice_loss(z.clone(), y.clone(), t4(vec![1.0, 1.0], [1, 1, 1, 2]));
    let ce = ce.into_scalar() as f64;
    let want = -(0.75f64.ln() + 0.25f64.ln()) / 2.0;
    assert!((ce - want).abs() < 1e-6, "{ce} vs {want}");
    // inter 1, Σp 1, Σy 2 → 1 − (2 + 1)/(3 + 1)
    assert!((dice.into_scalar() as f64 - 0.25).abs() < 1e-6);
    // The second pixel outside the valid region.
    let (ce, dice) = ce_dice_loss(z, y, t4(vec![1.0, 0.0], [1, 1, 1, 2]));
    assert!((ce.into_scalar() as f64 + 0.75f64.ln()).abs() < 1e-6);
    let want = 1.0 - 2.5 / 2.75;
    assert!((dice.into_scalar() as f64 - want).abs() < 1e-6);
}

#[test]
fn windows_cover_with_overlap() {
    assert_eq!(window_starts(100, 128, 32), vec![0]);
    let s = window_starts(565, 128, 32);
    assert_eq!(*s.first().unwrap(), 0);
    assert_eq!(s.last().unwrap() + 128, 565);
    assert!(s.windows(2).all(|w| w[0] + 128 >= w[1] + 32), "{s:?}");
}

fn data() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
}

fn pico() -> (omnirad_model::Vit<Cpu>, Preprocess) {
    let cfg = VitConfig::preset("vit_pico").unwrap();
    let pre = Preprocess {
        size: 32,
        channels: 3,
        ..Preprocess::default()
    };
    <Cpu as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
    (cfg.init::<Cpu>(&Default::default()), pre)
}

#[test]
fn sliding_window_probabilities_cover_the_image() {
    let (vit, pre) = pico();
    let head = SegHeadConfig::new(SegHeadKind::Adapter, 2, 2);
    let m = build(vit, &head, 3, 0, &Default::default());
    let img = ndarray::Array3::from_shape_fn((1, 45, 70), |(_, y, x)| ((x + y) % 7) as f32 / 7.0);
    let p = predict_probs(
        &m,
        &omnirad_data::seg::Pixels::F32(img),
        32,
        SegWindow::Sliding { overlap: 8 },
        &pre,
        4,
        &Default::default(),
    );
    assert_eq!(p.dim(), (2, 45, 70));
    let sums = p.sum_axis(ndarray::Axis(0));
    assert!(
        sums.iter().all(|s| (s - 1.0).abs() < 1e-4),
        "probabilities sum to 1 everywhere"
    );
}

#[test]
fn adapter_learns_busi_lesions() {
    let busi = data().join("busi-256/malignant");
    let mut s = open_splits(&busi, None, 0, true).unwrap();
    assert!(s.failed.is_empty());
    s.train.truncate(24);
    s.val.truncate(6);
    let (vit, pre) = pico();
    let dev = Default::default();
    let head = SegHeadConfig::new(SegHeadKind::Adapter, 2, 2);
    let model = build(vit, &head, 3, 0, &dev);
    let encoder_before = model.backbone.blocks[0].mlp.fc1.weight.val();
    let cfg = SegTrainConfig {
        epochs: 12,
        batch: 8,
        lr: 3e-3,
        size: 32,
        warmup_epochs: 1,
        ..SegTrainConfig::default()
    };
    let before = evaluate(
        &model,
        &s.train,
        2,
        32,
        SegWindow::Resize,
        &pre,
        8,
        &dev,
        |_, _| {},
    );
    let r = train(
        model,
        &s.train,
        &s.val,
        2,
        &pre,
        &cfg,
        &dev,
        None,
        |_, _| true,
    );
    let first = r.history.first().unwrap().train_loss;
    let last = r.history.last().unwrap().train_loss;
    assert!(last < 0.8 * first, "loss {first} → {last}");
    let after = evaluate(
        &r.model,
        &s.train,
        2,
        32,
        SegWindow::Resize,
        &pre,
        8,
        &dev,
        |_, _| {},
    );
    eprintln!(
        "loss {first} → {last}; train Dice {} → {}",
        before.dice, after.dice
    );
    let encoder_after = r.model.backbone.blocks[0].mlp.fc1.weight.val();
    assert!(
        encoder_before.equal(encoder_after).all().into_scalar(),
        "frozen encoder moved"
    );
    assert!(
        after.dice > before.dice + 0.1,
        "train Dice {} → {}",
        before.dice,
        after.dice
    );
    assert!(after.dice > 0.4, "train Dice {}", after.dice);
}

/// Three classes (background, bright squares, dark squares): every class is learned. Synthetic,
/// because ../shared/data holds no multi-class masks.
#[test]
fn adapter_learns_several_classes() {
    use omnirad_data::seg::{Pixels, SegSample};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let samples: Vec<SegSample> = (0..32)
        .map(|_| {
            let mut img = ndarray::Array3::from_elem((1, 32, 32), 0.5f32);
            let mut mask = ndarray::Array2::<u8>::zeros((32, 32));
            for class in [1u8, 2] {
                let (y, x) = (rng.random_range(0..22), rng.random_range(0..22));
                for yy in y..y + 10 {
                    for xx in x..x + 10 {
                        mask[[yy, xx]] = class;
                        img[[0, yy, xx]] = if class == 1 { 0.9 } else { 0.1 };
                    }
                }
            }
            img.mapv_inplace(|v| (v + rng.random_range(-0.05..0.05)).clamp(0.0, 1.0));
            SegSample {
                pixels: Pixels::compact(img),
                id: String::new(),
                mask: mask.into_shared(),
                fov: None,
            }
        })
        .collect();
    let (vit, pre) = pico();
    let dev = Default::default();
    let model = build(
        vit,
        &SegHeadConfig::new(SegHeadKind::Adapter, 3, 2),
        3,
        0,
        &dev,
    );
    let cfg = SegTrainConfig {
        epochs: 10,
        lr: 3e-3,
        size: 32,
        warmup_epochs: 1,
        ..SegTrainConfig::default()
    };
    let r = train(
        model,
        &samples[..24],
        &samples[24..],
        3,
        &pre,
        &cfg,
        &dev,
        None,
        |_, _| true,
    );
    let s = evaluate(
        &r.model,
        &samples[24..],
        3,
        32,
        SegWindow::Resize,
        &pre,
        8,
        &dev,
        |_, _| {},
    );
    eprintln!("per-class Dice {:?}", s.dice_per_class);
    assert!(
        s.dice_per_class[1] > 0.7 && s.dice_per_class[2] > 0.7,
        "{:?}",
        s.dice_per_class
    );
}

/// Stopping after an epoch, saving the state and resuming gives the same model as one run.
#[test]
fn resume_continues_exactly() {
    let busi = data().join("busi-256/malignant");
    let mut s = open_splits(&busi, None, 0, true).unwrap();
    s.train.truncate(16);
    s.val.truncate(4);
    let (vit, pre) = pico();
    let dev = Default::default();
    let model = build(
        vit,
        &SegHeadConfig::new(SegHeadKind::Adapter, 2, 2),
        3,
        0,
        &dev,
    );
    let cfg = SegTrainConfig {
        epochs: 3,
        size: 32,
        warmup_epochs: 1,
        ..SegTrainConfig::default()
    };
    let full = train(
        model.clone(),
        &s.train,
        &s.val,
        2,
        &pre,
        &cfg,
        &dev,
        None,
        |_, _| true,
    );
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path();
    let ckpt = dir.join("state.safetensors");
    train(
        model.clone(),
        &s.train,
        &s.val,
        2,
        &pre,
        &cfg,
        &dev,
        None,
        |log, st| {
            save_state(&ckpt, st).unwrap();
            log.epoch < 1
        },
    );
    let state = load_state(&ckpt, &model, &dev).unwrap();
    assert_eq!((state.epoch, state.history.len()), (1, 1));
    let resumed = train(
        model.clone(),
        &s.train,
        &s.val,
        2,
        &pre,
        &cfg,
        &dev,
        Some(state),
        |_, _| true,
    );
    assert_eq!(resumed.history.len(), 3);
    for (a, b) in full.history.iter().zip(&resumed.history) {
        assert_eq!(a.train_loss, b.train_loss, "epoch {}", a.epoch);
    }
    let w = |m: &omnirad_model::Segmenter<Cpu>| {
        m.head
            .fuse
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(w(&full.model), w(&resumed.model));
    // A file of another kind is refused with its name.
    std::fs::write(&ckpt, b"junk").unwrap();
    let e = load_state(&ckpt, &model, &dev).err().unwrap().to_string();
    assert!(e.contains("state.safetensors"), "{e}");
}
