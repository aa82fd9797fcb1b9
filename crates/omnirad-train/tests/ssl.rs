//! Losses, schedules, masking, AdamW and the SSL step against hand-computed values.

use burn::module::AutodiffModule;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use omnirad_model::{Cpu, DinoHeadConfig, Train, VitConfig};
use omnirad_train::loss::{cross_entropy, ibot_patch_loss, koleo_loss, sinkhorn_knopp, Center};
use omnirad_train::masking::BlockMasking;
use omnirad_train::optim::{AdamW, ParamGroup, StepSettings};
use omnirad_train::params;
use omnirad_train::pretrain::{param_group, PretrainConfig};
use omnirad_train::schedule::Cosine;
use omnirad_train::ssl::{Centering, LossConfig, SslBatch, SslModel, SslTrainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = Cpu;

fn t2(v: &[f64], shape: [usize; 2]) -> Tensor<B, 2> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn host(t: Tensor<B, 2>) -> Vec<f64> {
    t.into_data()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn dino_cross_entropy_matches_hand_value() {
    // softmax([0, ln 2]) = [1/3, 2/3]; H = −(¼ ln ⅓ + ¾ ln ⅔).
    let s = t2(&[0.0, 2f64.ln()], [1, 2]);
    let t = t2(&[0.25, 0.75], [1, 2]);
    let want = -(0.25 * (1.0f64 / 3.0).ln() + 0.75 * (2.0f64 / 3.0).ln());
    assert!(close(
        scalar(cross_entropy(s.clone(), t.clone(), 1.0)),
        want,
        1e-5
    ));
    // The student temperature divides the logits: τ = 0.5 doubles them.
    let s2 = t2(&[0.0, 2.0 * 2f64.ln()], [1, 2]);
    assert!(close(
        scalar(cross_entropy(s, t.clone(), 0.5)),
        scalar(cross_entropy(s2, t, 1.0)),
        1e-5
    ));
}

/// The reference algorithm, naively in f64 (no max subtraction).
fn sinkhorn_reference(logits: &[f64], b: usize, k: usize, temp: f64, iters: usize) -> Vec<f64> {
    let mut q: Vec<f64> = logits.iter().map(|x| (x / temp).exp()).collect(); // [b, k]
    let total: f64 = q.iter().sum();
    q.iter_mut().for_each(|x| *x /= total);
    for _ in 0..iters {
        for j in 0..k {
            let col: f64 = (0..b).map(|i| q[i * k + j]).sum();
            (0..b).for_each(|i| q[i * k + j] /= col * k as f64);
        }
        for i in 0..b {
            let row: f64 = q[i * k..(i + 1) * k].iter().sum();
            q[i * k..(i + 1) * k]
                .iter_mut()
                .for_each(|x| *x /= row * b as f64);
        }
    }
    q.iter().map(|x| x * b as f64).collect()
}

#[test]
fn sinkhorn_knopp_matches_reference_and_marginals() {
    let (b, k) = (6, 10);
    let mut rng = StdRng::seed_from_u64(3);
    let logits: Vec<f64> = (0..b * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let got = host(sinkhorn_knopp(t2(&logits, [b, k]), 0.1, 3));
    let want = sinkhorn_reference(&logits, b, k, 0.1, 3);
    for (g, w) in got.iter().zip(&want) {
        assert!(close(*g, *w, 1e-4), "{g} vs {w}");
    }
    // Each sample's targets sum to 1 exactly (last step); prototypes are used about equally,
    // much more evenly than the plain softmax of the same logits.
    for i in 0..b {
        let row: f64 = got[i * k..(i + 1) * k].iter().sum();
        assert!(close(row, 1.0, 1e-5));
    }
    let col_spread = |p: &[f64]| {
        let cols: Vec<f64> = (0..k).map(|j| (0..b).map(|i| p[i * k + j]).sum()).collect();
        cols.iter().cloned().fold(f64::MIN, f64::max)
            - cols.iter().cloned().fold(f64::MAX, f64::min)
    };
    let softmax = host(burn::tensor::activation::softmax(
        t2(&logits, [b, k]) / 0.1,
        1,
    ));
    let (sk, sm) = (col_spread(&got), col_spread(&softmax));
    assert!(
        sm > 3.0 * sk,
        "prototype usage spread {sk} (Sinkhorn) vs {sm} (softmax)"
    );
    // Huge logits: the max subtraction keeps it finite.
    let big: Vec<f64> = logits.iter().map(|x| x * 1000.0).collect();
    assert!(host(sinkhorn_knopp(t2(&big, [b, k]), 0.04, 3))
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn center_is_an_ema_applied_after_use() {
    let mut c = Center::<B>::new(2, 0.9, &Default::default());
    let t = t2(&[1.0, 3.0, 3.0, 5.0], [2, 2]);
    // First call: centre 0, so plain softmax(t / τ).
    let p = host(c.softmax_center(t.clone(), 1.0));
    let e = (2f64).exp();
    assert!(close(p[0], 1.0 / (1.0 + e), 1e-5));
    // Centre ← 0.9·0 + 0.1·mean = [0.2, 0.4].
    let v = host(c.value.clone());
    assert!(close(v[0], 0.2, 1e-5) && close(v[1], 0.4, 1e-5));
    // Second call uses it: logits [1 − 0.2, 3 − 0.4].
    let p = host(c.softmax_center(t, 1.0));
    assert!(close(p[0], 1.0 / (1.0 + (2.6f64 - 0.8).exp()), 1e-5));
}

#[test]
fn koleo_on_known_points() {
    // Unit vectors at 0°, 30°, 180° (any length: KoLeo normalises). Neighbours: 0↔30 (distance
    // 2 sin 15°), 180 → 30 (2 sin 75°).
    let p = |deg: f64, r: f64| [r * deg.to_radians().cos(), r * deg.to_radians().sin()];
    let pts: Vec<f64> = [p(0.0, 1.0), p(30.0, 3.0), p(180.0, 0.5)].concat();
    let d1 = 2.0 * 15f64.to_radians().sin();
    let d2 = 2.0 * 75f64.to_radians().sin();
    let want = -(2.0 * d1.ln() + d2.ln()) / 3.0;
    let got = scalar(koleo_loss(t2(&pts, [3, 2])));
    assert!(close(got, want, 1e-4), "{got} vs {want}");
    // Spreading the points lowers it.
    let spread: Vec<f64> = [p(0.0, 1.0), p(120.0, 1.0), p(240.0, 1.0)].concat();
    assert!(scalar(koleo_loss(t2(&spread, [3, 2]))) < got);
}

#[test]
fn ibot_weights_each_image_by_its_masked_count() {
    // Image 0 has 1 masked token, image 1 has 2, image 2 none (it still counts in N_img = 3).
    let s = t2(&[0.0, 0.0, 1.0, 0.0, 0.0, 2.0], [3, 2]);
    let t = t2(&[1.0, 0.0, 0.5, 0.5, 0.0, 1.0], [3, 2]);
    let w = Tensor::<B, 1>::from_data(
        TensorData::new(vec![1.0f32, 0.5, 0.5], [3]),
        &Default::default(),
    );
    let ce = |s: [f64; 2], t: [f64; 2]| {
        let z = (s[0].exp() + s[1].exp()).ln();
        -(t[0] * (s[0] - z) + t[1] * (s[1] - z))
    };
    let want = (ce([0.0, 0.0], [1.0, 0.0])
        + 0.5 * ce([1.0, 0.0], [0.5, 0.5])
        + 0.5 * ce([0.0, 2.0], [0.0, 1.0]))
        / 3.0;
    let got = scalar(ibot_patch_loss(s, t, w, 3, 1.0));
    assert!(close(got, want, 1e-5), "{got} vs {want}");
}

#[test]
fn cosine_schedule_values() {
    let s = Cosine::new(1.0, 0.1, 100).with_warmup(11, 0.0);
    assert_eq!(s.at(0), 0.0);
    assert!(close(s.at(5), 0.5, 1e-12));
    assert!(close(s.at(10), 1.0, 1e-12));
    assert!(close(s.at(11), 1.0, 1e-12)); // cosine starts at base
                                          // Halfway through the 89 cosine steps: (base + final) / 2.
    let mid = 11 + 89 / 2;
    assert!(close(
        s.at(mid),
        0.1 + 0.45 * (1.0 + (std::f64::consts::PI * 44.0 / 89.0).cos()),
        1e-12
    ));
    assert_eq!(s.at(100), 0.1);
    assert_eq!(s.at(10_000), 0.1);
    // Teacher temperature: linear warm-up, then constant.
    let cfg = PretrainConfig::preset("dinov2").unwrap();
    let sch = omnirad_train::pretrain::Schedules::new(&cfg, 10);
    assert!(close(sch.at(0).teacher_temp, 0.04, 1e-12));
    assert!(close(sch.at(299).teacher_temp, 0.07, 1e-12));
    assert!(close(sch.at(5000).teacher_temp, 0.07, 1e-12));
    assert!(sch.at(9).freeze_last_layer && !sch.at(10).freeze_last_layer);
    assert!(close(sch.at(0).momentum, 0.992, 1e-12) && sch.at(999).momentum > 0.9999);
    // Peak lr after warm-up (100 steps): 4e-3 · √(64/1024) = 1e-3.
    assert!(close(sch.at(99).lr, 1e-3, 1e-9));
}

#[test]
fn param_groups_follow_dinov2_and_spare_embeddings_from_decay() {
    let g = |p| param_group(p, 12, 0.9, 0.2);
    let d = |e: i32| 0.9f64.powi(e);
    assert!(close(
        g("backbone.patch_embed.proj.weight").lr_mult,
        d(13) * 0.2,
        1e-12
    ));
    assert!(close(g("backbone.pos_embed").lr_mult, d(13), 1e-12));
    assert!(close(
        g("backbone.blocks.0.attn.qkv.weight").lr_mult,
        d(12),
        1e-12
    ));
    assert!(close(
        g("backbone.blocks.11.mlp.fc1.weight").lr_mult,
        d(1),
        1e-12
    ));
    assert_eq!(g("backbone.norm.gamma").lr_mult, 1.0);
    assert_eq!(g("dino_head.mlp.0.weight").lr_mult, 1.0);
    for p in [
        "backbone.blocks.3.attn.qkv.bias",
        "backbone.blocks.3.norm1.gamma",
        "backbone.blocks.3.ls1.gamma",
        "backbone.norm.beta",
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.mask_token",
    ] {
        assert_eq!(g(p).wd_mult, 0.0, "{p}");
    }
    for p in [
        "backbone.patch_embed.proj.weight",
        "dino_head.last_layer.weight_g",
        "backbone.blocks.3.attn.qkv.weight",
    ] {
        assert_eq!(g(p).wd_mult, 1.0, "{p}");
    }
}

#[test]
fn block_masks_are_stratified_and_bounded() {
    let m = BlockMasking::new(16, 16);
    let mut rng = StdRng::seed_from_u64(0);
    let masks = m.batch(100, 0.5, (0.1, 0.5), &mut rng);
    assert_eq!(masks.len(), 100);
    let counts: Vec<usize> = masks
        .iter()
        .map(|m| m.iter().filter(|&&x| x).count())
        .collect();
    let masked: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
    assert_eq!(masked.len(), 50, "⌊100 · 0.5⌋ images masked");
    assert!(
        counts.iter().all(|&c| c <= 128),
        "never above the 0.5 ratio bound"
    );
    let mean = masked.iter().sum::<usize>() as f64 / (50.0 * 256.0);
    assert!((0.2..=0.31).contains(&mean), "mean masked ratio {mean}");
    // A mask is never larger than its target.
    let mut rng = StdRng::seed_from_u64(1);
    for target in [0, 5, 40, 100] {
        let c = m.generate(target, &mut rng).iter().filter(|&&x| x).count();
        assert!(
            c <= target && (target == 0 || c > 0),
            "target {target} got {c}"
        );
    }
}

fn tiny_model(seed: u64) -> SslModel<B> {
    use burn::tensor::backend::Backend;
    B::seed(&Default::default(), seed);
    let vit = VitConfig::preset("vit_pico").unwrap();
    let head = DinoHeadConfig {
        in_dim: 64,
        out_dim: 32,
        hidden_dim: 32,
        bottleneck_dim: 16,
        nlayers: 2,
    };
    let m = SslModel::init(&vit, &head, false, &Default::default());
    params::materialize(&m);
    m
}

#[test]
fn ema_update_mixes_teacher_and_student() {
    let mut t = SslTrainer::new(
        tiny_model(1),
        LossConfig::default(),
        None,
        &Default::default(),
    );
    // Make the student differ: replace every student parameter by 1.
    let student = params::replace(t.student().valid(), |_, v| v.zeros_like() + 1.0);
    t.student = Some(SslModel::from_inner(student));
    let before: Vec<Vec<f64>> = params::collect(&t.teacher)
        .into_iter()
        .map(|p| host(p.value.unsqueeze()))
        .collect();
    t.update_teacher(0.9);
    let after = params::collect(&t.teacher);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(after) {
        for (x, y) in b.iter().zip(host(a.value.unsqueeze())) {
            assert!(
                (y - (0.9 * x + 0.1)).abs() < 1e-6,
                "{}: {y} vs {}",
                a.path,
                0.9 * x + 0.1
            );
        }
    }
}

#[test]
fn adamw_first_step_and_global_clip() {
    // One step from zero moments: m̂ = g, v̂ = g², so θ ← θ(1 − ηλ) − η·g/(|g| + ε).
    let t = SslTrainer::new(
        tiny_model(2),
        LossConfig::default(),
        None,
        &Default::default(),
    );
    let x = Tensor::<Train<B>, 4>::random(
        [2, 3, 32, 32],
        burn::tensor::Distribution::Default,
        &Default::default(),
    );
    let w = Tensor::<Train<B>, 2>::random(
        [2, 64],
        burn::tensor::Distribution::Default,
        &Default::default(),
    );
    // Every parameter trains, including those created outside the autodiff backend.
    // (The mask token is unused without a mask.)
    let n_params = params::collect(&t.student().valid().backbone).len() - 1;
    let loss = (t.student().backbone.forward(x) * w).sum();
    let grads = burn::optim::GradientsParams::from_grads(loss.backward(), t.student());
    assert_eq!(grads.len(), n_params);
    let w0 = host(
        t.student()
            .backbone
            .cls_token
            .val()
            .inner()
            .reshape([1, 64]),
    );
    let g = host(
        grads
            .get::<B, 3>(t.student().backbone.cls_token.id)
            .unwrap()
            .reshape([1, 64]),
    );
    let group = |p: &str| ParamGroup {
        lr_mult: if p.contains("cls_token") { 2.0 } else { 1.0 },
        wd_mult: 1.0,
    };
    let mut opt = AdamW::<B>::new(0.9, 0.999, 1e-8);
    let settings = StepSettings {
        lr: 1e-2,
        weight_decay: 0.5,
        clip: Some(1e-3),
        group: &group,
    };
    let (m, norm) = opt.step(t.student().clone(), grads, &settings);
    assert!(norm > 1e-3, "the test needs clipping to be active ({norm})");
    // Clipping scales g uniformly; Adam's first step is invariant to that scale (up to ε).
    let w1 = host(m.backbone.cls_token.val().inner().reshape([1, 64]));
    for i in 0..64 {
        let want = w0[i] * (1.0 - 2e-2 * 0.5)
            - 2e-2 * g[i].signum() * (g[i].abs() / (g[i].abs() + 1e-8 * norm / 1e-3));
        assert!((w1[i] - want).abs() < 1e-6, "{i}: {} vs {want}", w1[i]);
    }
    assert_eq!(opt.step, 1);
    assert!(opt.state.contains_key("backbone.cls_token"));
}

/// lr 1e-3, weight decay 0.04, momentum 0.99, teacher temperature 0.04.
fn step_values() -> omnirad_train::ssl::StepValues {
    omnirad_train::ssl::StepValues {
        lr: 1e-3,
        weight_decay: 0.04,
        momentum: 0.99,
        teacher_temp: 0.04,
        freeze_last_layer: false,
    }
}

fn random_batch(seed: u64, n: usize, ng: usize, swap: bool) -> SslBatch {
    let mut rng = StdRng::seed_from_u64(seed);
    let per = 3 * 32 * 32;
    let mut crops: Vec<Vec<f32>> = (0..ng)
        .map(|_| (0..n * per).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    if swap {
        crops.reverse();
    }
    SslBatch {
        batch: n,
        n_global: ng,
        n_local: 0,
        globals: crops.concat(),
        global_shape: [n * ng, 3, 32, 32],
        locals: Vec::new(),
        local_shape: [0, 3, 16, 16],
        masks: vec![vec![false; 64]; n * ng],
    }
}

#[test]
fn dino_loss_is_symmetric_in_the_crop_order() {
    // Swapping the two global crops swaps which view teaches which: the loss is unchanged.
    let cfg = LossConfig {
        ibot_weight: 0.0,
        koleo_weight: 0.0,
        centering: Centering::SinkhornKnopp,
        ..Default::default()
    };
    let mut t = SslTrainer::new(tiny_model(3), cfg, None, &Default::default());
    // Spread the teacher's outputs so the targets are not uniform.
    t.teacher = params::replace(t.teacher.clone(), |p, v| {
        if p.contains("gamma") && p.contains("ls") {
            v.zeros_like() + 0.5
        } else {
            v
        }
    });
    let a = t.losses(&random_batch(4, 4, 2, false), 0.04);
    let b = t.losses(&random_batch(4, 4, 2, true), 0.04);
    assert!(
        a.dino > 0.0 && close(a.dino, b.dino, 1e-5),
        "{} vs {}",
        a.dino,
        b.dino
    );
}

#[test]
fn ibot_ignores_unmasked_tokens_and_training_lowers_the_loss() {
    let mut t = SslTrainer::new(
        tiny_model(5),
        LossConfig::default(),
        Some(3.0),
        &Default::default(),
    );
    let mut b = random_batch(6, 4, 2, false);
    // No masks at all: the patch term is exactly zero.
    assert_eq!(t.losses(&b, 0.04).ibot, 0.0);
    let mut rng = StdRng::seed_from_u64(9);
    b.masks = BlockMasking::new(8, 8).batch(8, 0.5, (0.1, 0.5), &mut rng);
    assert!(t.losses(&b, 0.04).ibot > 0.0);
    // A few steps on one batch reduce the total loss.
    let v = step_values();
    let group = |p: &str| param_group(p, 2, 0.9, 0.2);
    let first = t.step(std::slice::from_ref(&b), &v, &group, 0).loss;
    let mut last = first;
    for i in 1..15 {
        last = t.step(std::slice::from_ref(&b), &v, &group, i).loss;
    }
    assert!(last < first, "loss {first} → {last}");
}

#[test]
fn finetune_loss_with_label_smoothing_by_hand() {
    use omnirad_train::finetune::classification_loss;
    // softmax([0, ln 2]) = [1/3, 2/3]; target class 1 smoothed by 0.1 over 2 classes: [0.05, 0.95].
    let z = t2(&[0.0, 2f64.ln()], [1, 2]);
    let y = t2(&[0.0, 1.0], [1, 2]);
    let want = -(0.05 * (1.0f64 / 3.0).ln() + 0.95 * (2.0f64 / 3.0).ln());
    assert!(close(
        scalar(classification_loss(z.clone(), y.clone(), false, 0.1, None)),
        want,
        1e-5
    ));
    // Multi-label: mean over entries of softplus(z) − y·z.
    let sp = |x: f64| (1.0 + x.exp()).ln();
    let want = (sp(0.0) + sp(2f64.ln()) - 2f64.ln()) / 2.0;
    assert!(close(
        scalar(classification_loss(z, y, true, 0.0, None)),
        want,
        1e-5
    ));
}

#[test]
fn class_weighted_finetune_loss_by_hand() {
    use omnirad_train::finetune::{class_weights, classification_loss};
    let w = |v: &[f64]| Some(t2(v, [1, v.len()]).squeeze_dim::<1>(0));
    // Row 1: softmax([0, ln 2]) = [1/3, 2/3], class 1; row 2: softmax([0, 0]), class 0.
    let z = t2(&[0.0, 2f64.ln(), 0.0, 0.0], [2, 2]);
    let y = t2(&[0.0, 1.0, 1.0, 0.0], [2, 2]);
    let (ce1, ce2) = (-(2.0f64 / 3.0).ln(), 2f64.ln());
    // Weights [3, 1]: the class-0 row counts three times, normalised by the weights' sum.
    let want = (ce1 + 3.0 * ce2) / 4.0;
    let got = scalar(classification_loss(
        z.clone(),
        y.clone(),
        false,
        0.0,
        w(&[3.0, 1.0]),
    ));
    assert!(close(got, want, 1e-5), "{got} vs {want}");
    // Smoothing stays uniform over classes; only the row weights change.
    let ce1 = -(0.05 * (1.0f64 / 3.0).ln() + 0.95 * (2.0f64 / 3.0).ln());
    let want = (ce1 + 3.0 * ce2) / 4.0;
    let got = scalar(classification_loss(
        z.clone(),
        y,
        false,
        0.1,
        w(&[3.0, 1.0]),
    ));
    assert!(close(got, want, 1e-5), "{got} vs {want}");
    // A mixed target [0.25, 0.75] weighs 0.25·3 + 0.75·1 = 1.5.
    let soft = t2(&[0.25, 0.75, 1.0, 0.0], [2, 2]);
    let ce1 = -(0.25 * (1.0f64 / 3.0).ln() + 0.75 * (2.0f64 / 3.0).ln());
    let want = (1.5 * ce1 + 3.0 * ce2) / 4.5;
    let got = scalar(classification_loss(
        z.clone(),
        soft,
        false,
        0.0,
        w(&[3.0, 1.0]),
    ));
    assert!(close(got, want, 1e-5), "{got} vs {want}");
    // Multi-label with positive weights [2, 4]: p·y·softplus(−z) + (1 − y)·softplus(z), mean.
    let sp = |x: f64| (1.0 + x.exp()).ln();
    let flags = t2(&[0.0, 1.0, 1.0, 0.0], [2, 2]);
    let want = (sp(0.0) + 4.0 * sp(-(2f64.ln())) + 2.0 * sp(0.0) + sp(0.0)) / 4.0;
    let got = scalar(classification_loss(z, flags, true, 0.0, w(&[2.0, 4.0])));
    assert!(close(got, want, 1e-5), "{got} vs {want}");

    // scikit-learn's "balanced": N / (C·n_c); an absent class gets 1.
    let ids = ndarray::array![[0i64], [1], [1], [1]];
    assert_eq!(class_weights(ids.view(), 2, false), vec![2.0, 2.0 / 3.0]);
    assert_eq!(
        class_weights(ids.view(), 3, false),
        vec![4.0 / 3.0, 4.0 / 9.0, 1.0]
    );
    // Multi-label: n_neg / n_pos per label; a label never (or always) set gets 1.
    let flags = ndarray::array![[1i64, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]];
    assert_eq!(
        class_weights(flags.view(), 3, true),
        vec![1.0 / 3.0, 3.0, 1.0]
    );
}

#[test]
fn probability_loss_by_hand() {
    use ndarray::array;
    use omnirad_train::finetune::probability_loss;
    let p = array![[0.25, 0.75], [0.9, 0.1]];
    let y = array![[1i64], [0]];
    let want = -(0.75f64.ln() + 0.9f64.ln()) / 2.0;
    assert!(close(
        probability_loss(p.view(), y.view(), false),
        want,
        1e-12
    ));
    // Multi-label: BCE per flag, averaged over labels and rows.
    let y = array![[0i64, 1], [1, 1]];
    let want = -((0.75f64).ln() + 0.75f64.ln() + 0.9f64.ln() + 0.1f64.ln()) / 4.0;
    assert!(close(
        probability_loss(p.view(), y.view(), true),
        want,
        1e-12
    ));
}

/// Batch of the given images' two global crops (crop-major, as the data pipeline lays it out).
fn batch_of(crops: &[[Vec<f32>; 2]]) -> SslBatch {
    let n = crops.len();
    let globals: Vec<f32> = (0..2)
        .flat_map(|c| crops.iter().flat_map(move |im| im[c].clone()))
        .collect();
    SslBatch {
        batch: n,
        n_global: 2,
        n_local: 0,
        globals,
        global_shape: [2 * n, 3, 32, 32],
        locals: Vec::new(),
        local_shape: [0, 3, 16, 16],
        masks: vec![vec![false; 64]; 2 * n],
    }
}

#[test]
fn gradient_accumulation_equals_the_large_batch() {
    // With batch-independent targets (centre frozen at 0) and no KoLeo/iBOT, two micro-batches
    // of 3 must give the same update as one batch of 6.
    let cfg = LossConfig {
        ibot_weight: 0.0,
        koleo_weight: 0.0,
        center_momentum: 1.0,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(11);
    let crops: Vec<[Vec<f32>; 2]> = (0..6)
        .map(|_| {
            [0, 1].map(|_| {
                (0..3 * 32 * 32)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            })
        })
        .collect();
    let v = omnirad_train::ssl::StepValues {
        lr: 1e-3,
        weight_decay: 0.04,
        momentum: 0.9,
        teacher_temp: 0.04,
        freeze_last_layer: false,
    };
    let group = |p: &str| param_group(p, 2, 0.9, 0.2);
    // One initial model for every run (materialised: see `params::materialize`).
    let base = tiny_model(21);
    let run = |micro: Vec<SslBatch>| {
        let mut t = SslTrainer::new(base.clone(), cfg.clone(), Some(3.0), &Default::default());
        t.step(&micro, &v, &group, 0);
        params::collect(&t.teacher)
            .into_iter()
            .flat_map(|p| host(p.value.unsqueeze()))
            .collect::<Vec<f64>>()
    };
    let whole = run(vec![batch_of(&crops)]);
    let split = run(vec![batch_of(&crops[..3]), batch_of(&crops[3..])]);
    let worst = whole
        .iter()
        .zip(&split)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "largest parameter difference {worst}");
    // …and differs from a step on half the data.
    let half = run(vec![batch_of(&crops[..3])]);
    assert!(whole.iter().zip(&half).any(|(a, b)| (a - b).abs() > 1e-5));
}

#[test]
fn teacher_starts_as_an_exact_copy_of_the_student() {
    use burn::tensor::backend::Backend;
    B::seed(&Default::default(), 4);
    let vit = VitConfig::preset("vit_pico").unwrap();
    let head = DinoHeadConfig {
        in_dim: 64,
        out_dim: 32,
        hidden_dim: 32,
        bottleneck_dim: 16,
        nlayers: 2,
    };
    // A fresh model, never touched: burn initialises Linear weights lazily.
    let fresh = SslModel::<B>::init(&vit, &head, false, &Default::default());
    let t = SslTrainer::new(fresh, LossConfig::default(), None, &Default::default());
    let s = params::collect(&t.student().valid());
    let te = params::collect(&t.teacher);
    for (a, b) in s.into_iter().zip(te) {
        assert_eq!(
            host(a.value.unsqueeze()),
            host(b.value.unsqueeze()),
            "{}",
            a.path
        );
    }
}

/// The optimiser updates the student's parameters where they are from the second step on (the
/// first copies them, as the teacher starts on the same buffers), and the EMA the teacher's from
/// the first: a handle left on either during its update would copy the whole model every step.
#[test]
fn student_and_teacher_are_updated_in_place() {
    let mut t = SslTrainer::new(
        tiny_model(7),
        LossConfig::default(),
        None,
        &Default::default(),
    );
    let addresses = |m: &SslModel<B>| -> Vec<usize> {
        params::collect(m)
            .into_iter()
            .map(|p| {
                let v: burn::backend::flex::FlexTensor = p.value.into_primitive().tensor();
                v.as_slice::<f32>().unwrap().as_ptr() as usize
            })
            .collect()
    };
    let (b, v) = (random_batch(8, 4, 2, false), step_values());
    let group = |p: &str| param_group(p, 2, 0.9, 0.2);
    let teacher = addresses(&t.teacher);
    t.step(std::slice::from_ref(&b), &v, &group, 0);
    let student = addresses(&t.student().valid());
    t.step(std::slice::from_ref(&b), &v, &group, 1);
    assert_eq!(addresses(&t.student().valid()), student);
    assert_eq!(addresses(&t.teacher), teacher);
}

/// Four images × 2 global crops with DINOv2 block masks (probability 0.5, ratio 0.1–0.5).
fn masked_batch(seed: u64, mask_seed: u64) -> SslBatch {
    let mut b = random_batch(seed, 4, 2, false);
    let mut rng = StdRng::seed_from_u64(mask_seed);
    b.masks = BlockMasking::new(8, 8).batch(8, 0.5, (0.1, 0.5), &mut rng);
    b
}

#[test]
fn bf16_pretraining_steps_track_f32_and_keep_their_precision() {
    use omnirad_model::Precision;
    // Values of its own for every parameter: tiny_model's init draws from burn's process-wide
    // generator, which tests running beside this one also seed, and the tolerance below holds
    // for this model, not for every draw (one draw put bf16's third loss 3 % off f32's).
    let m = params::replace(tiny_model(7), |path, t| {
        let n = t.dims()[0];
        let mut rng = StdRng::seed_from_u64(
            path.bytes()
                .fold(7u64, |h, c| h.wrapping_mul(31) ^ c as u64),
        );
        let base = if path.ends_with("gamma") { 1.0 } else { 0.0 };
        let v: Vec<f32> = (0..n).map(|_| base + rng.random_range(-0.1..0.1)).collect();
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    });
    let b = masked_batch(8, 10);
    let v = step_values();
    let group = |p: &str| param_group(p, 2, 1.0, 1.0);
    let run = |p: Precision| {
        let model = m.clone().with_precision(p);
        let mut t = SslTrainer::new(model, LossConfig::default(), Some(3.0), &Default::default());
        let losses: Vec<f64> = (0..3)
            .map(|i| t.step(std::slice::from_ref(&b), &v, &group, i).loss)
            .collect();
        // The precision survives the optimiser step and the EMA update.
        assert_eq!(t.student().valid().backbone.blocks[0].mlp.precision, p);
        assert_eq!(t.teacher.backbone.blocks[1].attn.precision, p);
        assert_eq!(t.teacher.dino_head.precision, p);
        assert_eq!(t.student().valid().dino_head.precision, p);
        losses
    };
    let (full, half) = (run(Precision::F32), run(Precision::Bf16));
    for (a, h) in full.iter().zip(&half) {
        assert!(close(*h, *a, 0.02), "f32 {full:?} vs bf16 {half:?}");
    }
    assert_ne!(full, half, "bf16 made no difference");
}

#[test]
fn gradient_checkpointing_gives_the_same_pretraining_steps() {
    use omnirad_model::BalancedCheckpointing;
    // No stochastic depth: other tests draw from the same process-wide generator in parallel
    // (random masks under recomputation are covered by the fine-tuning test).
    let m = tiny_model(12);
    let b = masked_batch(13, 14);
    let v = step_values();
    let group = |p: &str| param_group(p, 2, 1.0, 1.0);
    let dev = Default::default();
    let mut keep = SslTrainer::new(m.clone(), LossConfig::default(), Some(3.0), &dev);
    let mut recompute = SslTrainer::<B, BalancedCheckpointing>::with_strategy(
        m,
        LossConfig::default(),
        Some(3.0),
        &dev,
    );
    for i in 0..3 {
        let (a, c) = (
            keep.step(std::slice::from_ref(&b), &v, &group, i),
            recompute.step(std::slice::from_ref(&b), &v, &group, i),
        );
        for (x, y) in [
            (a.loss, c.loss),
            (a.grad_norm, c.grad_norm),
            (a.ibot, c.ibot),
        ] {
            assert!(close(x, y, 1e-5), "step {i}: {a:?} vs {c:?}");
        }
    }
    let (s1, s2) = (
        params::collect(&keep.student().valid()),
        params::collect(&recompute.student().valid()),
    );
    for (p, q) in s1.into_iter().zip(s2) {
        let diff = (p.value.clone() - q.value)
            .abs()
            .max()
            .into_scalar()
            .elem::<f64>();
        let scale = p.value.abs().max().into_scalar().elem::<f64>().max(1e-3);
        assert!(diff <= 1e-5 * scale, "{}: differs by {diff}", p.path);
    }
}

#[test]
fn shipped_pretraining_configs_load_and_find_their_data() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut dims = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = PretrainConfig::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
            for s in &cfg.data.sources {
                assert!(
                    s.path.is_file(),
                    "{}: {} missing",
                    path.display(),
                    s.path.display()
                );
            }
            let v = cfg.model.vit().unwrap();
            dims.push((v.embed_dim, v.depth));
        }
    }
    dims.sort();
    assert_eq!(
        dims,
        [(64, 2), (64, 2), (96, 4)],
        "configs/ holds the pico recipe, its BreastMNIST continuation and the small recipe"
    );
}

#[test]
fn out_of_range_settings_are_config_errors() {
    let tmp_guard = tempfile::tempdir().unwrap();
    let tmp = tmp_guard.path();
    // Every preset's own values are in range.
    for name in ["dinov2", "omnirad", "xr0"] {
        let path = tmp.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!("preset = \"{name}\"\n[[data.sources]]\npath = \"any.npz\"\n"),
        )
        .unwrap();
        PretrainConfig::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let pico = std::fs::read_to_string(dir.join("medmnist-pico.toml")).unwrap();
    for (from, to, want) in [
        (
            "base_lr = 2e-3",
            "base_lr = nan",
            "optim.base_lr = NaN must be > 0",
        ),
        (
            "base_lr = 2e-3",
            "base_lr = -1e-3",
            "optim.base_lr = -0.001 must be > 0",
        ),
        (
            "momentum_teacher = 0.99",
            "momentum_teacher = 1.5",
            "optim.momentum_teacher = 1.5 must be in [0, 1]",
        ),
        (
            "teacher_temp = 0.04",
            "teacher_temp = inf",
            "optim.teacher_temp = inf must be > 0",
        ),
        (
            "preset = \"omnirad\"",
            "preset = \"dinov3\"",
            "unknown preset \"dinov3\" (known: dinov2, omnirad, xr0)",
        ),
        // Each of these used to pass and then panic in a data thread or a burn op.
        (
            "drop_path_rate = 0.1",
            "drop_path_rate = 1.5",
            "model.drop_path_rate = 1.5 must be in [0, 1)",
        ),
        (
            "global_scale = [0.4, 1.0]",
            "global_scale = [1.5, 0.2]",
            "crops.global_scale[0] = 1.5 must be in (0, 1]",
        ),
        (
            "global_scale = [0.4, 1.0]",
            "global_scale = [0.9, 0.2]",
            "are [min, max] ranges",
        ),
        (
            "jitter = 0.2",
            "jitter = -1",
            "crops.jitter = -1 must be in [0, 1]",
        ),
        (
            "prototypes = 1024",
            "prototypes = 0",
            "head.prototypes, hidden_dim, bottleneck_dim and nlayers must be positive",
        ),
        (
            "global_size = 32",
            "global_size = 0",
            "crops.global_size and crops.local_size must be positive",
        ),
        (
            "global_size = 32",
            "global_size = 30",
            "crops.global_size = 30 must be a multiple of the model's patch size 4",
        ),
        (
            "arch = \"vit_pico\"",
            "arch = \"vit_pico\"\nembed_dim = 0",
            "embed_dim 0 is not a positive multiple of num_heads 2",
        ),
        (
            "arch = \"vit_pico\"",
            "arch = \"vit_pico\"\npatch_overlap = 9",
            "patch_overlap 9 is more than patch_size 4",
        ),
        // Sizes that used to end the process with "memory allocation of … bytes failed".
        (
            "prototypes = 1024",
            "prototypes = 1000000000000",
            "more than this machine can allocate",
        ),
        (
            "global_size = 32",
            "global_size = 1000000000",
            "more than this machine can allocate",
        ),
        (
            "[run]",
            "[data.normalize]\nkind = \"custom\"\nmean = []\nstd = [0.2]\n[run]",
            "data.normalize: 0 means and 1 stds for 3 channels",
        ),
    ] {
        assert!(pico.contains(from));
        let path = tmp.join("bad.toml");
        std::fs::write(&path, pico.replace(from, to)).unwrap();
        let e = PretrainConfig::load(&path, None).err().unwrap().to_string();
        assert!(e.contains("bad.toml") && e.contains(want), "{to}: {e}");
    }
}
