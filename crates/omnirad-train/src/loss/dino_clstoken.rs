//! DINO class-token loss (Caron et al. 2021; DINOv2 `dino_clstoken_loss.py`).
//!
//! For student logits s and teacher targets p_t over K prototypes, student temperature τ_s:
//! ```text
//! H(p_t, s) = −(1/B) Σ_b Σ_k p_t[b,k] · log softmax(s[b] / τ_s)[k]
//! ```
//! Teacher targets come from one of two normalisations of the teacher logits t at temperature τ_t:
//! - centering: p_t = softmax((t − c) / τ_t), then c ← m·c + (1 − m)·mean_b t  (the centre used at
//!   step k has seen batches ≤ k − 1, as DINOv2's deferred update);
//! - Sinkhorn-Knopp (3 iterations): Q = exp(t/τ_t)ᵀ normalised alternately so that every prototype
//!   row sums to 1/K and every sample column to 1/B; the targets are B·Qᵀ (rows sum to 1).
//!
//! The training step sums H over every (student crop, teacher crop) pair of different views and
//! divides by the number of pairs; DINOv2's own normaliser (N_g(N_g−1) + max(N_g·N_l, 1)) gives the
//! global-only (OmniRad) recipe a weight of 2/3 instead of 1, which we do not copy.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::soft_cross_entropy;

/// −mean_b Σ_k p_t·log softmax(s/τ_s): a scalar [1].
pub fn cross_entropy<B: Backend>(
    student_logits: Tensor<B, 2>,
    teacher_probs: Tensor<B, 2>,
    student_temp: f64,
) -> Tensor<B, 1> {
    soft_cross_entropy(student_logits, teacher_probs, student_temp).mean()
}

/// Sinkhorn-Knopp teacher targets [B, K] for teacher logits [B, K].
///
/// The max is subtracted before `exp` (the reference does not): the first normalisation by ΣQ
/// cancels any global factor, so the result is the same and cannot overflow.
pub fn sinkhorn_knopp<B: Backend>(
    teacher_logits: Tensor<B, 2>,
    temp: f64,
    iterations: usize,
) -> Tensor<B, 2> {
    let [b, k] = teacher_logits.dims();
    let max = teacher_logits.clone().max();
    let mut q = ((teacher_logits - max.unsqueeze::<2>()) / temp).exp();
    q = q.clone() / q.sum().unsqueeze::<2>();
    for _ in 0..iterations {
        // Prototype marginals (columns of our [B, K] layout) → 1/K, then sample marginals → 1/B.
        // A prototype whose every entry underflowed keeps zero mass instead of becoming 0/0.
        q = q.clone() / (q.sum_dim(0).clamp_min(1e-30) * k as f64);
        q = q.clone() / (q.sum_dim(1).clamp_min(1e-30) * b as f64);
    }
    q * b as f64
}

/// The EMA centre of the teacher logits, [1, K].
#[derive(Debug, Clone)]
pub struct Center<B: Backend> {
    pub value: Tensor<B, 2>,
    pub momentum: f64,
}

impl<B: Backend> Center<B> {
    pub fn new(k: usize, momentum: f64, device: &B::Device) -> Self {
        Self {
            value: Tensor::zeros([1, k], device),
            momentum,
        }
    }

    /// softmax((t − c)/τ_t) with the current centre, then folds this batch into the centre.
    pub fn softmax_center(&mut self, teacher_logits: Tensor<B, 2>, temp: f64) -> Tensor<B, 2> {
        let (p, batch_mean) = match cpu::softmax_center(&teacher_logits, &self.value, temp) {
            Some(r) => r,
            None => (
                softmax((teacher_logits.clone() - self.value.clone()) / temp, 1),
                teacher_logits.mean_dim(0),
            ),
        };
        self.value = self.value.clone() * self.momentum + batch_mean * (1.0 - self.momentum);
        p
    }
}

/// The centred softmax and the batch mean in one rayon pass over rows each on the CPU backend in
/// f32: as tensor ops they are seven single-threaded burn-flex passes over the teacher's patch
/// logits ([masked tokens, 65 536] in DINOv2's head).
mod cpu {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorData, TensorMetadata, TensorPrimitive};
    use omnirad_model::{cast_same, is_same};
    use rayon::prelude::*;

    /// Rows per rayon task for the column sums, fixed so they add up in the same order on every
    /// run (resumed runs stay bit-identical).
    const ROWS: usize = 16;

    /// (softmax((t − c)/τ) [N, K], mean of t over rows [1, K]); `None` off the CPU backend or f32.
    pub(super) fn softmax_center<B: Backend>(
        t: &Tensor<B, 2>,
        c: &Tensor<B, 2>,
        temp: f64,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        if !is_same::<B::FloatTensorPrimitive, FlexTensor>()
            || t.dtype() != DType::F32
            || c.dtype() != DType::F32
        {
            return None;
        }
        let flex = |t: &Tensor<B, 2>| -> FlexTensor {
            let t: FlexTensor = cast_same(t.clone().into_primitive().tensor());
            if t.is_contiguous() {
                t
            } else {
                t.to_contiguous()
            }
        };
        let (t, c) = (flex(t), flex(c));
        let [n, k] = t.shape().dims::<2>();
        let (t, c) = (t.as_slice::<f32>()?, c.as_slice::<f32>()?);
        assert_eq!(
            c.len(),
            k,
            "softmax_center: centre of {} for {k} prototypes",
            c.len()
        );
        let inv_t = (1.0 / temp) as f32;
        let mut p = vec![0f32; n * k];
        let mut partials = vec![vec![0f32; k]; n.div_ceil(ROWS)];
        if k > 0 {
            p.par_chunks_mut(ROWS * k)
                .zip(t.par_chunks(ROWS * k))
                .zip(partials.par_iter_mut())
                .for_each(|((p, t), sum)| {
                    for (p, t) in p.chunks_exact_mut(k).zip(t.chunks_exact(k)) {
                        kernels::centred_softmax(p, t, c, inv_t);
                        sum.iter_mut().zip(t).for_each(|(s, &x)| *s += x);
                    }
                });
        }
        let mut mean = vec![0f32; k];
        for part in &partials {
            mean.iter_mut().zip(part).for_each(|(m, &x)| *m += x);
        }
        mean.iter_mut().for_each(|m| *m /= n as f32);
        let back = |v: Vec<f32>, shape: [usize; 2]| {
            let t = FlexTensor::from_data(TensorData::new(v, shape));
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(cast_same(t)))
        };
        Some((back(p, [n, k]), back(mean, [1, k])))
    }

    mod kernels {
        use omnirad_model::simd::{dispatch, exp_neg};

        dispatch! {
            /// p ← softmax((t − c)·inv_t) for one row; NaN or ±∞ in the row make it NaN, as
            /// burn's softmax does.
            centred_softmax(p: &mut [f32], t: &[f32], c: &[f32], inv_t: f32) {
                for ((p, &t), &c) in p.iter_mut().zip(t).zip(c) {
                    *p = (t - c) * inv_t;
                }
                // Lane-wise max and sum (and a NaN detector: x·0 is NaN only for NaN and ±∞), so
                // the reductions vectorise.
                const L: usize = 16;
                let (mut max, mut bad) = ([f32::NEG_INFINITY; L], [0f32; L]);
                let mut chunks = p.chunks_exact(L);
                for ch in &mut chunks {
                    for i in 0..L {
                        max[i] = if ch[i] > max[i] { ch[i] } else { max[i] };
                        bad[i] += ch[i] * 0.0;
                    }
                }
                for (i, &x) in chunks.remainder().iter().enumerate() {
                    max[i] = if x > max[i] { x } else { max[i] };
                    bad[i] += x * 0.0;
                }
                if bad.iter().sum::<f32>().is_nan() {
                    p.fill(f32::NAN);
                    return;
                }
                let m = max.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                let mut sum = [0f32; L];
                let mut chunks = p.chunks_exact_mut(L);
                for ch in &mut chunks {
                    for i in 0..L {
                        ch[i] = exp_neg(ch[i] - m);
                        sum[i] += ch[i];
                    }
                }
                for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
                    *x = exp_neg(*x - m);
                    sum[i] += *x;
                }
                let inv = 1.0 / sum.iter().sum::<f32>();
                p.iter_mut().for_each(|p| *p *= inv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{TensorData, Tolerance};
    use omnirad_model::Cpu;

    fn logits(n: usize, k: usize, seed: u64) -> Tensor<Cpu, 2> {
        let mut x = seed;
        let v: Vec<f32> = (0..n * k)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_data(TensorData::new(v, [n, k]), &Default::default())
    }

    /// The CPU pass against the tensor formula over two calls (the second with a non-zero
    /// centre), on rows longer than a vector lane block and a batch that is no multiple of the
    /// row blocks.
    #[test]
    fn cpu_pass_matches_the_tensor_formula() {
        let (n, k, temp) = (37, 1000, 0.04);
        let mut c = Center::<Cpu>::new(k, 0.9, &Default::default());
        let mut value = c.value.clone();
        for seed in [1, 2] {
            let t = logits(n, k, seed);
            let p = c.softmax_center(t.clone(), temp);
            let want = softmax((t.clone() - value.clone()) / temp, 1);
            value = value * 0.9 + t.mean_dim(0) * 0.1;
            let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-7);
            p.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), tol);
            c.value
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&value.clone().into_data(), tol);
        }
    }

    #[test]
    fn a_non_finite_logit_makes_its_row_nan() {
        let mut v = logits(2, 20, 3).into_data().to_vec::<f32>().unwrap();
        v[25] = f32::NAN;
        let t = Tensor::<Cpu, 2>::from_data(TensorData::new(v, [2, 20]), &Default::default());
        let mut c = Center::<Cpu>::new(20, 0.9, &Default::default());
        let p = c
            .softmax_center(t, 0.1)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!(p[..20].iter().all(|x| x.is_finite()) && p[20..].iter().all(|x| x.is_nan()));
    }
}
