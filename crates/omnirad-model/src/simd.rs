//! Branch-free f32 kernels that LLVM vectorises, compiled for AVX-512 and AVX2 and picked at run
//! time (the release build targets baseline x86-64): GELU, attention's softmax and the DINO/iBOT
//! loss (omnirad-train) share them.
//!
//! Polynomials are written with `mul_add`: Rust never contracts `a·b + c` into an FMA by itself,
//! and with separate multiplies and adds GELU took 1.2–1.5× the time (`cargo bench -p
//! omnirad-model --bench ops`, BENCHMARKS.md "FMA in the CPU kernels' polynomials"). Both
//! dispatched bodies enable FMA, so `mul_add` is one instruction there (and on aarch64); only the
//! portable body on an x86-64 CPU without FMA (before 2013) pays a libm call for it. For the same
//! reason call these helpers only inside [`dispatch`]ed kernels.

use std::f32::consts::{LN_2, LOG2_E};

/// exp(x) for x ≤ 0 with about 2 ulp error (Cephes `expf`: x = n·ln2 + r, |r| ≤ ln2/2,
/// a degree-6 polynomial for e^r, 2ⁿ from the exponent bits); 0 below −87, where the
/// result would be denormal.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.max(-87.0);
    let k = x.mul_add(LOG2_E, ROUND);
    let n = k - ROUND;
    // ln 2 split in two so that n·ln2_hi is exact.
    let r = (-n).mul_add(LN_2 - 0.693_359_4, (-n).mul_add(0.693_359_4, x));
    let p = 1.987_569_2e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let er = (p * r).mul_add(r, r + 1.0);
    let n = (k.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let e = er * f32::from_bits(((n + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

/// One body per instruction set, chosen at run time (the release build targets baseline
/// x86-64; a dependency for two `target_feature` copies would be more code than this).
#[doc(hidden)]
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $name:ident ($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) { portable($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) { portable($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the feature, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub use crate::simd_dispatch as dispatch;
