//! Per-op CPU timings of one ViT-S/16 block at batch 8 (`cargo bench -p omnirad-model --bench ops`):
//! tells where CPU inference time goes, and the GEMM rate of the block's linears (see
//! BENCHMARKS.md); also ViT-B/16's large linears and attention at ViT-B/14's 1370 tokens (518 px).
use burn::nn::{conv::Conv2dConfig, LayerNormConfig, LinearConfig};
use burn::tensor::{
    activation::gelu, module::attention, ops::AttentionModuleOptions, Distribution, Tensor,
};
use omnirad_model::linear::{linear, linear_bf16};
use omnirad_model::{Cpu, Train};
use std::time::Instant;
type Ad = Train<Cpu>;
/// Median-free quick timing: one warm-up call, then the mean of 3.
fn t<F: FnMut() -> Tensor<Cpu, 4>>(name: &str, mut f: F) {
    let _ = f().into_data();
    let s = Instant::now();
    for _ in 0..3 {
        let _ = f().into_data();
    }
    println!("{name}: {:.1} ms", s.elapsed().as_secs_f64() * 1e3 / 3.0);
}
/// The linear op (one GEMM into bias rows) at the [B·N, D] shapes of ViT-S/16 at batch 8, best
/// of 5 calls, in f32 and with bf16 products: the GEMM rates the training step's products can
/// reach on this machine (bf16 includes rounding the operands and widening the result), then
/// forward + backward (dX and dW) as `bench/torch_linear.py` times PyTorch's.
fn linear_rates() {
    let d = Default::default();
    let m = 8 * 197;
    for (name, k, n) in [
        ("qkv", 384, 1152),
        ("proj", 384, 384),
        ("fc1", 384, 1536),
        ("fc2", 1536, 384),
        // ViT-B/16's: weights over L2 in bf16, which the products meet in chunks.
        ("ViT-B qkv", 768, 2304),
        ("ViT-B fc1", 768, 3072),
        ("ViT-B fc2", 3072, 768),
    ] {
        let x = Tensor::<Cpu, 2>::random([m, k], Distribution::Normal(0., 1.), &d);
        let w = Tensor::<Cpu, 2>::random([k, n], Distribution::Normal(0., 1.), &d);
        let b = Tensor::<Cpu, 1>::zeros([n], &d);
        // (ms, GFLOP/s) of the best of 5 calls after one warm-up, for `flop` products.
        let best = |flop: usize, run: &dyn Fn()| {
            run();
            let best = (0..5)
                .map(|_| {
                    let s = Instant::now();
                    run();
                    s.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            (best * 1e3, (2 * flop * m * k * n) as f64 / best / 1e9)
        };
        let rate = |op: fn(Tensor<Cpu, 2>, Tensor<Cpu, 2>, Tensor<Cpu, 1>) -> Tensor<Cpu, 2>| {
            best(1, &|| {
                let _ = op(x.clone(), w.clone(), b.clone()).into_data();
            })
        };
        let (f32_ms, f32_rate) = rate(linear);
        let (bf16_ms, bf16_rate) = rate(linear_bf16);
        // Forward + backward through autodiff (dY = ones from the sum; its fill is a small
        // part). The gradients are not read back: into_data copies them (ms at these sizes).
        let train = |op: fn(Tensor<Ad, 2>, Tensor<Ad, 2>, Tensor<Ad, 1>) -> Tensor<Ad, 2>| {
            let grad = |t: &Tensor<Cpu, 2>| Tensor::<Ad, 2>::from_inner(t.clone()).require_grad();
            best(3, &|| {
                let (x, w) = (grad(&x), grad(&w));
                let b = Tensor::<Ad, 1>::from_inner(b.clone()).require_grad();
                let g = op(x.clone(), w.clone(), b).sum().backward();
                assert!(x.grad(&g).is_some() && w.grad(&g).is_some());
            })
        };
        let (f32_train_ms, f32_train_rate) = train(linear);
        let (bf16_train_ms, bf16_train_rate) = train(linear_bf16);
        println!(
            "linear {name} [{m}, {k}]·[{k}, {n}]: f32 {f32_ms:.2} ms, {f32_rate:.0} GFLOP/s; \
             bf16 products {bf16_ms:.2} ms, {bf16_rate:.0} GFLOP/s; forward + backward: \
             f32 {f32_train_ms:.2} ms ({f32_train_rate:.0} GFLOP/s), \
             bf16 {bf16_train_ms:.2} ms ({bf16_train_rate:.0} GFLOP/s)"
        );
    }
}

/// The bf16 tile loop alone (AMX, or AVX-512 BF16's blocks), one thread, best of 25 passes,
/// every panel meeting all of B (no column chunks): the block's forward products (ViT-S/16's,
/// and ViT-B/16's qkv and proj), the weight gradient dW = Xᵀ·dY of fc1 (k = the batch's 1576
/// tokens) and attention's Q·Kᵀ and P·V for one (image, head) pair.
fn tile_loop_rates() {
    for (name, m, k, n) in [
        ("qkv", 1576, 384, 1152),
        ("proj", 1576, 384, 384),
        ("fc1", 1576, 384, 1536),
        ("fc2", 1576, 1536, 384),
        ("ViT-B qkv", 1576, 768, 2304),
        ("ViT-B proj", 1576, 768, 768),
        ("fc1 dW", 384, 1576, 1536),
        ("Q·Kᵀ", 197, 64, 197),
        ("P·V", 197, 197, 64),
    ] {
        match omnirad_model::tile_loop_rate(m, k, n, 25) {
            Some(r) => println!(
                "{} tile loop {name} [{m}, {k}]·[{k}, {n}], one thread: {r:.0} GFLOP/s",
                if omnirad_model::bf16_kernel() == "amx" {
                    "AMX"
                } else {
                    "AVX-512 BF16"
                }
            ),
            None => return println!("tile loop: no AMX or AVX-512 BF16 here"),
        }
    }
}

fn main() {
    linear_rates();
    tile_loop_rates();
    let d = Default::default();
    let x = Tensor::<Cpu, 3>::random([8, 197, 384], Distribution::Normal(0., 1.), &d);
    let lin = LinearConfig::new(384, 1152).init::<Cpu>(&d);
    let ln = LayerNormConfig::new(384).init::<Cpu>(&d);
    let q = Tensor::<Cpu, 4>::random([8, 6, 197, 64], Distribution::Normal(0., 1.), &d);
    let img = Tensor::<Cpu, 4>::random([8, 3, 224, 224], Distribution::Normal(0., 1.), &d);
    let conv = Conv2dConfig::new([3, 384], [16, 16])
        .with_stride([16, 16])
        .init::<Cpu>(&d);
    let h = Tensor::<Cpu, 3>::random([8, 197, 1536], Distribution::Normal(0., 1.), &d);
    t("linear 384->1152", || lin.forward(x.clone()).unsqueeze());
    t("layernorm", || ln.forward(x.clone()).unsqueeze());
    let ln_ad = LayerNormConfig::new(384).init::<Ad>(&d);
    t("layernorm forward + backward (omnirad, autodiff)", || {
        let x = Tensor::<Ad, 3>::from_inner(x.clone()).require_grad();
        let y = omnirad_model::layer_norm::layer_norm(x.clone(), &ln_ad, 1e-6);
        let g = (y * x.clone().detach()).sum().backward();
        x.grad(&g).expect("dx").unsqueeze()
    });
    t("attention", || {
        attention(
            q.clone(),
            q.clone(),
            q.clone(),
            None,
            None,
            AttentionModuleOptions::default(),
        )
    });
    let qkv = Tensor::<Cpu, 3>::random([8, 197, 3 * 384], Distribution::Normal(0., 1.), &d);
    t("attention (omnirad, f32)", || {
        omnirad_model::attention::attention(qkv.clone(), 6, false).unsqueeze()
    });
    t("attention (omnirad, bf16 products)", || {
        omnirad_model::attention::attention(qkv.clone(), 6, true).unsqueeze()
    });
    // ViT-B/14 at 518 px (RAD-DINO's shape): 1370 tokens, 12 heads, batch 2.
    let long = Tensor::<Cpu, 3>::random([2, 1370, 3 * 768], Distribution::Normal(0., 1.), &d);
    for (name, bf16) in [("f32", false), ("bf16 products", true)] {
        t(&format!("attention, 1370 tokens (omnirad, {name})"), || {
            omnirad_model::attention::attention(long.clone(), 12, bf16).unsqueeze()
        });
        t(
            &format!("attention forward + backward, 1370 tokens (omnirad, {name})"),
            || {
                let x = Tensor::<Ad, 3>::from_inner(long.clone()).require_grad();
                let y = omnirad_model::attention::attention(x.clone(), 12, bf16);
                let g = y.sum().backward();
                x.grad(&g).expect("dqkv").unsqueeze()
            },
        );
    }
    t("gelu 1536 (burn-flex)", || gelu(h.clone()).unsqueeze());
    t("gelu 1536 (omnirad)", || {
        omnirad_model::gelu(h.clone()).unsqueeze()
    });
    t("conv patch", || conv.forward(img.clone()));
    t("permute+reshape", || {
        x.clone()
            .reshape([8, 197, 6, 64])
            .permute([0, 2, 1, 3])
            .reshape([8, 6, 197, 64])
            * 1.0
    });
}
