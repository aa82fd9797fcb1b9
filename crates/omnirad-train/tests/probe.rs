use ndarray::Array2;
use omnirad_eval::{evaluate, TaskKind};
use omnirad_model::{Cpu, Train};
use omnirad_train::{linear_probe, ProbeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Three Gaussian blobs in 8-D whose means differ along the first three axes, with a large
/// offset and scale on other axes (the probe must standardise to cope).
fn blobs(n: usize, seed: u64) -> (Array2<f32>, Array2<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Array2::zeros((n, 8));
    let mut y = Array2::zeros((n, 1));
    for i in 0..n {
        let c = i % 3;
        y[[i, 0]] = c as i64;
        for d in 0..8 {
            let noise: f32 = (0..6).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 0.6;
            x[[i, d]] = if d == c {
                2.0 + noise
            } else if d >= 3 {
                100.0 + 50.0 * noise
            } else {
                noise
            };
        }
    }
    (x, y)
}

#[test]
fn linear_probe_separates_blobs_and_selects_on_val() {
    let (xtr, ytr) = blobs(300, 1);
    let (xva, yva) = blobs(90, 2);
    let (xte, yte) = blobs(90, 3);
    let cfg = ProbeConfig {
        epochs: 30,
        lr: 1e-2,
        batch: 64,
        ..Default::default()
    };
    let r = linear_probe::<Train<Cpu>>(
        (xtr.view(), ytr.view()),
        (xva.view(), yva.view()),
        xte.view(),
        3,
        TaskKind::MultiClass,
        &cfg,
        &Default::default(),
    );
    let test = evaluate(TaskKind::MultiClass, yte.view(), r.test_scores.view());
    assert!(test.acc > 0.9 && test.macro_f1 > 0.9, "{test:?}"); // chance is 1/3
    assert!((1..=30).contains(&r.best_epoch));
    assert!(r
        .test_scores
        .rows()
        .into_iter()
        .all(|row| (row.sum() - 1.0).abs() < 1e-5));
    // Deterministic under the seed.
    let again = linear_probe::<Train<Cpu>>(
        (xtr.view(), ytr.view()),
        (xva.view(), yva.view()),
        xte.view(),
        3,
        TaskKind::MultiClass,
        &cfg,
        &Default::default(),
    );
    assert_eq!(again.best_epoch, r.best_epoch);
    assert_eq!(again.test_scores, r.test_scores);
}

#[test]
fn multilabel_probe_learns_independent_flags() {
    let (x, y) = blobs(300, 4);
    // Flags: "class is 0" and "class is not 2".
    let flags = |y: &Array2<i64>| {
        Array2::from_shape_fn((y.nrows(), 2), |(i, f)| {
            if f == 0 {
                (y[[i, 0]] == 0) as i64
            } else {
                (y[[i, 0]] != 2) as i64
            }
        })
    };
    let (xv, yv) = blobs(90, 5);
    let cfg = ProbeConfig {
        epochs: 30,
        lr: 1e-2,
        batch: 64,
        ..Default::default()
    };
    let r = linear_probe::<Train<Cpu>>(
        (x.view(), flags(&y).view()),
        (xv.view(), flags(&yv).view()),
        xv.view(),
        2,
        TaskKind::MultiLabel,
        &cfg,
        &Default::default(),
    );
    let m = evaluate(
        TaskKind::MultiLabel,
        flags(&yv).view(),
        r.test_scores.view(),
    );
    assert!(m.auc > 0.97 && m.acc > 0.9, "{m:?}");
}

/// On real data: a linear probe on raw PneumoniaMNIST pixels (a classic baseline) must
/// clearly beat chance on the official test split.
#[test]
fn linear_probe_on_raw_pneumonia_pixels() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/medmnist/pneumoniamnist.npz");
    let load = |split| {
        let s = omnirad_data::medmnist::NpzSplit::load(&path, split).unwrap();
        let n = s.len();
        let x = Array2::from_shape_vec(
            (n, 784),
            s.images.iter().map(|&v| v as f32 / 255.0).collect(),
        )
        .unwrap();
        (x, s.labels.clone())
    };
    use omnirad_data::Split;
    let ((xtr, ytr), (xva, yva), (xte, yte)) =
        (load(Split::Train), load(Split::Val), load(Split::Test));
    let cfg = ProbeConfig {
        epochs: 10,
        ..Default::default()
    };
    let r = linear_probe::<Train<Cpu>>(
        (xtr.view(), ytr.view()),
        (xva.view(), yva.view()),
        xte.view(),
        2,
        TaskKind::Binary,
        &cfg,
        &Default::default(),
    );
    let m = evaluate(TaskKind::Binary, yte.view(), r.test_scores.view());
    assert!(m.auc > 0.85 && m.acc > 0.75, "{m:?}");
}

/// XOR of the signs of two coordinates: no linear probe can do better than chance.
fn xor(n: usize, seed: u64) -> (Array2<f32>, Array2<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Array2::from_shape_fn((n, 2), |_| rng.random_range(-1.0f32..1.0));
    let y = Array2::from_shape_fn((n, 1), |(i, _)| {
        ((x[[i, 0]] > 0.0) == (x[[i, 1]] > 0.0)) as i64
    });
    (x, y)
}

#[test]
fn mlp_probe_learns_what_a_linear_one_cannot() {
    let (xtr, ytr) = xor(600, 4);
    let (xva, yva) = xor(200, 5);
    let (xte, yte) = xor(200, 6);
    let run = |hidden| {
        let cfg = ProbeConfig {
            hidden,
            epochs: 80,
            lr: 1e-2,
            batch: 64,
            ..Default::default()
        };
        let r = linear_probe::<Train<Cpu>>(
            (xtr.view(), ytr.view()),
            (xva.view(), yva.view()),
            xte.view(),
            2,
            TaskKind::Binary,
            &cfg,
            &Default::default(),
        );
        evaluate(TaskKind::Binary, yte.view(), r.test_scores.view()).acc
    };
    let (linear, mlp) = (run(0), run(32));
    assert!(linear < 0.7, "linear {linear}");
    assert!(mlp > 0.9, "mlp {mlp}");
}
