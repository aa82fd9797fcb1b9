//! Matrix products on slices of the CPU backend's f32 tensors, through `gemm` (the library
//! burn-flex itself calls) and, for bf16 products, gemmkit; for omnirad's CPU kernels
//! ([`crate::attention`], [`crate::linear`]). Also [`written`]: outputs allocated without a
//! zero-fill, which the elementwise kernels use too.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
pub use gemm::Parallelism;
use gemmkit::bf16;
use rayon::prelude::*;

pub mod amx;

/// A row-major [rows, cols] matrix in a slice, rows `stride` apart, or its transpose (read
/// through swapped strides, no copy).
pub struct Mat<'a, T = f32> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    stride: usize,
    transposed: bool,
}

impl<T> Clone for Mat<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Mat<'_, T> {}

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Mat: slice length");
        Self::strided(data, rows, cols, cols)
    }

    /// Rows `stride` elements apart from the slice's start (a column block of a wider matrix).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(cols <= stride, "Mat: row stride");
        assert!(
            rows == 0 || data.len() >= (rows - 1) * stride + cols,
            "Mat: slice length"
        );
        Self {
            data,
            rows,
            cols,
            stride,
            transposed: false,
        }
    }

    /// Rows r0..r0 + count (of the matrix as stored, not transposed).
    pub fn row_block(self, r0: usize, count: usize) -> Self {
        assert!(
            !self.transposed && r0 + count <= self.rows,
            "Mat: row block"
        );
        let data = if count == 0 {
            &self.data[..0]
        } else {
            &self.data[r0 * self.stride..]
        };
        Self::strided(data, count, self.cols, self.stride)
    }

    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Logical (rows, cols).
    pub fn shape(&self) -> (usize, usize) {
        self.layout().0
    }

    /// Logical (rows, cols) and (column stride, row stride).
    fn layout(&self) -> ((usize, usize), (isize, isize)) {
        let c = self.stride as isize;
        if self.transposed {
            ((self.cols, self.rows), (c, 1))
        } else {
            ((self.rows, self.cols), (1, c))
        }
    }
}

/// `dst` [m, n] ← β·A·B, or `dst` += β·A·B when `acc`.
pub fn mm(dst: &mut [f32], acc: bool, a: Mat, b: Mat, beta: f32, par: Parallelism) {
    assert_eq!(dst.len(), a.shape().0 * b.shape().1, "mm: shapes");
    // SAFETY: dst holds [m, n] initialised values.
    unsafe { gemm_into(dst.as_mut_ptr(), acc, a, b, beta, par) }
}

/// `dst` [m, n] ← β·A·B into memory not written yet: every element is written (zeros for an
/// empty inner dimension) and none is read, so a buffer needs no zero-filling first.
pub fn mm_uninit(dst: &mut [MaybeUninit<f32>], a: Mat, b: Mat, beta: f32, par: Parallelism) {
    assert_eq!(dst.len(), a.shape().0 * b.shape().1, "mm: shapes");
    // SAFETY: without `acc` gemm gives the destination a zero weight and never reads it.
    unsafe { gemm_into(dst.as_mut_ptr().cast(), false, a, b, beta, par) }
}

/// β·A·B as a new row-major [m, n] vector ([`mm_uninit`]).
pub fn mm_new(a: Mat, b: Mat, beta: f32, par: Parallelism) -> Vec<f32> {
    let len = a.shape().0 * b.shape().1;
    // SAFETY: `mm_uninit` writes every element.
    unsafe { written(len, |dst| mm_uninit(dst, a, b, beta, par)) }
}

/// A vector of `len` values that `write` puts into fresh memory, for kernel outputs that
/// are written whole: `vec![0; len]` would zero-fill them first (3–4 % of a step on two cores).
///
/// # Safety
/// `write` must write every element of the slice it is given.
pub unsafe fn written<T>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    write(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's promise.
    unsafe { v.set_len(len) };
    v
}

/// # Safety
/// `dst` points to [m, n] writable f32s, initialised when `acc`.
unsafe fn gemm_into(dst: *mut f32, acc: bool, a: Mat, b: Mat, beta: f32, par: Parallelism) {
    let ((m, k), (a_cs, a_rs)) = a.layout();
    let ((k2, n), (b_cs, b_rs)) = b.layout();
    assert_eq!(k, k2, "mm: inner dimensions");
    // SAFETY: `Mat::new` ties every shape and stride to its slice's length; the caller, dst's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            acc,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// An element type of the CPU products: f32 through `gemm`, or bf16 through gemmkit (the
/// `gemm` crate has no bf16) with the products summed in f32 (AVX-512 BF16's `vdpbf16ps` where
/// the CPU has it: about twice the f32 rate) and the sum rounded to bf16 once — the arithmetic
/// of a PyTorch autocast matmul.
pub trait Operand: Clone + Send + Sync + 'static {
    /// f32 values as this type: f32 borrowed as they are, bf16 rounded (once, for every
    /// product that reads them).
    fn from_f32s(v: &[f32]) -> Cow<'_, [Self]>;

    /// A·B [m, n] (row-major, f32) with `bias` added to every row.
    fn product(a: Mat<Self>, b: Mat<Self>, bias: Option<&[f32]>) -> Vec<f32>;
}

impl Operand for f32 {
    fn from_f32s(v: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(v)
    }

    fn product(a: Mat, b: Mat, bias: Option<&[f32]>) -> Vec<f32> {
        let Some(bias) = bias else {
            return mm_new(a, b, 1.0, ALL);
        };
        let (m, n) = (a.shape().0, b.shape().1);
        let write_rows = |y: &mut [MaybeUninit<f32>]| {
            if n > 0 {
                y.par_chunks_mut(n).for_each(|row| {
                    row.write_copy_of_slice(bias);
                });
            }
        };
        // SAFETY: the bias rows cover all m·n elements.
        let mut y = unsafe { written(m * n, write_rows) };
        mm(&mut y, true, a, b, 1.0, ALL);
        y
    }
}

impl Operand for bf16 {
    fn from_f32s(v: &[f32]) -> Cow<'_, [bf16]> {
        let write = |out: &mut [MaybeUninit<bf16>]| {
            out.par_chunks_mut(BLOCK)
                .zip(v.par_chunks(BLOCK))
                .for_each(|(o, v)| kernels::narrow(v, o))
        };
        // SAFETY: the blocks cover all `v.len()` elements.
        Cow::Owned(unsafe { written(v.len(), write) })
    }

    /// gemmkit's output is bf16; it is widened here, the bias added in f32.
    fn product(a: Mat<bf16>, b: Mat<bf16>, bias: Option<&[f32]>) -> Vec<f32> {
        let ((m, k), (a_cs, a_rs)) = a.layout();
        let ((k2, n), (b_cs, b_rs)) = b.layout();
        assert!(k == k2, "bf16 product: shapes");
        assert!(
            bias.is_none_or(|b| b.len() == n),
            "bf16 product: bias length"
        );
        if m * n == 0 {
            return Vec::new();
        }
        if k > 0 && amx::available() {
            return amx::product(a, b, bias.unwrap_or(&vec![0.0; n]));
        }
        let product = |c: &mut [MaybeUninit<bf16>]| {
            if k == 0 {
                c.fill(MaybeUninit::new(bf16::ZERO)); // empty sums
                return;
            }
            // SAFETY: the shapes and strides of A and B are tied to their slices by `Mat::new`,
            // C is the [m, n] row-major slice given, and with β = 0 gemmkit writes every
            // element of C without reading it.
            unsafe {
                gemmkit::gemm_unchecked(
                    m,
                    k,
                    n,
                    bf16::ONE,
                    a.data.as_ptr(),
                    a_rs,
                    a_cs,
                    b.data.as_ptr(),
                    b_rs,
                    b_cs,
                    bf16::ZERO,
                    c.as_mut_ptr().cast(),
                    n as isize,
                    1,
                    gemmkit::Parallelism::Rayon(0),
                )
            }
        };
        // SAFETY: both branches write all m·n elements.
        let c = unsafe { written(m * n, product) };
        let rows = BLOCK / n + 1;
        let zeros = vec![0f32; if bias.is_some() { 0 } else { n }];
        let bias = bias.unwrap_or(&zeros);
        let write = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(rows * n)
                .zip(c.par_chunks(rows * n))
                .for_each(|(o, c)| {
                    for (o, c) in o.chunks_mut(n).zip(c.chunks(n)) {
                        kernels::widen_add(c, bias, o);
                    }
                })
        };
        // SAFETY: the blocks cover all m·n elements.
        unsafe { written(m * n, write) }
    }
}

/// f32 values rounded to bf16 on the calling thread ([`Operand::from_f32s`] spreads large
/// slices over rayon tasks), for code inside a rayon task that holds AMX tiles ([`amx::blocks`]).
pub fn bf16s(v: &[f32]) -> Vec<bf16> {
    // SAFETY: `narrow` writes every element.
    unsafe { written(v.len(), |out| kernels::narrow(v, out)) }
}

/// A stored (not transposed) matrix's values rounded to bf16 into a contiguous row-major
/// vector, on the calling thread ([`bf16s`] row by row).
pub fn bf16_matrix(m: Mat) -> Vec<bf16> {
    assert!(!m.transposed, "bf16_matrix: a stored matrix");
    if m.cols == 0 {
        return Vec::new();
    }
    let write = |out: &mut [MaybeUninit<bf16>]| {
        for (r, o) in out.chunks_exact_mut(m.cols).enumerate() {
            kernels::narrow(&m.data[r * m.stride..][..m.cols], o);
        }
    };
    // SAFETY: the rows cover all rows·cols elements.
    unsafe { written(m.rows * m.cols, write) }
}

/// Elements per rayon task of the elementwise conversions.
const BLOCK: usize = 1 << 14;

/// The bf16 conversions, branch-free so that LLVM vectorises them (`half`'s `from_f32` compiles
/// to two elements per step in the baseline x86-64 build: 8 % of a bf16 fine-tuning step).
pub(crate) mod kernels {
    use std::mem::MaybeUninit;

    use gemmkit::bf16;

    use crate::simd::dispatch;

    /// f32 bits → bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN. The same
    /// values as `bf16::from_f32`.
    #[inline(always)]
    pub(crate) fn narrow1(x: f32) -> u16 {
        let b = x.to_bits();
        let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
        let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
        (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
    }

    dispatch! {
        /// `out ← bf16(x)`.
        narrow(x: &[f32], out: &mut [MaybeUninit<bf16>]) {
            assert_eq!(x.len(), out.len());
            for (o, &x) in out.iter_mut().zip(x) {
                o.write(bf16::from_bits(narrow1(x)));
            }
        }
    }

    dispatch! {
        /// `out ← f32(c) + bias`.
        widen_add(c: &[bf16], bias: &[f32], out: &mut [MaybeUninit<f32>]) {
            assert!(c.len() == out.len() && bias.len() == out.len());
            for ((o, c), b) in out.iter_mut().zip(c).zip(bias) {
                o.write(f32::from_bits((c.to_bits() as u32) << 16) + b);
            }
        }
    }
}

/// Whether the CPU multiplies bf16 natively (AVX-512 BF16), which makes bf16 [`Operand::product`]s faster
/// than f32 products; without it gemmkit widens to f32 in its kernel.
pub fn native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel of bf16 `Operand::product`s on this CPU: `amx` tiles, `avx512-bf16` (the same
/// blocks with `vdpbf16ps`), `avx512-bf16-gemmkit` (`OMNIRAD_AMX=0`), or `widened` to f32
/// inside gemmkit's kernel.
pub fn bf16_kernel() -> &'static str {
    match amx::kernel() {
        Some(amx::Kernel::Amx) => "amx",
        Some(amx::Kernel::Dot) => "avx512-bf16",
        None if native_bf16() => "avx512-bf16-gemmkit",
        None => "widened",
    }
}

/// All threads (0 = rayon's pool), as burn-flex for products of this size.
pub const ALL: Parallelism = Parallelism::Rayon(0);

/// A 2-D f32 tensor as a contiguous tensor (itself or a copy) and its [rows, cols].
pub fn matrix(t: &FlexTensor) -> (FlexTensor, usize, usize) {
    assert_eq!(t.dtype(), burn::tensor::DType::F32, "f32 tensor expected");
    let [r, c] = burn::tensor::TensorMetadata::shape(t).dims::<2>();
    (contiguous(t.clone()), r, c)
}

/// The values of a contiguous f32 tensor.
pub fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// `t` itself when contiguous (also at an offset), else a contiguous copy.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rounding gives `half`'s values (round to nearest even, NaN kept) on a
    /// sweep through all f32 bit patterns and on every rounding tie's neighbourhood.
    #[test]
    fn narrowing_matches_half_bit_for_bit() {
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(9_973).collect();
        for hi in [
            0x3F80_u32, 0x3F81, 0x7F7F, 0x7F80, 0x0000, 0x8001, 0xFF80, 0x7FC0,
        ] {
            for lo in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                bits.push(hi << 16 | lo);
            }
        }
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let ours = bf16::from_f32s(&x);
        for (i, (&x, o)) in x.iter().zip(ours.iter()).enumerate() {
            assert_eq!(
                o.to_bits(),
                bf16::from_f32(x).to_bits(),
                "{:#010x}",
                bits[i]
            );
        }
    }

    /// Products into fresh memory: every element written, zeros for an empty inner dimension
    /// (on memory that held other values, so unwritten elements would show).
    #[test]
    fn products_into_fresh_memory_write_every_element() {
        for _ in 0..3 {
            std::hint::black_box(vec![f32::NAN; 12]);
            let (a, b) = (
                [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                [1.0, 0.0, -1.0, 2.0, 0.5, 0.0],
            );
            let y = mm_new(Mat::new(&a, 3, 2), Mat::new(&b, 2, 3), 2.0, ALL);
            assert_eq!(y, [10.0, 2.0, -2.0, 22.0, 4.0, -6.0, 34.0, 6.0, -10.0]);
            let y = mm_new(Mat::new(&[], 4, 0), Mat::new(&[], 0, 3), 1.0, ALL);
            assert_eq!(y, [0.0; 12]);
            let y = f32::product(
                Mat::new(&a, 3, 2),
                Mat::new(&b, 2, 3),
                Some(&[1.0, 1.0, 1.0]),
            );
            assert_eq!(y, [6.0, 2.0, 0.0, 12.0, 3.0, -2.0, 18.0, 4.0, -4.0]);
        }
    }

    /// A bf16 product's result is widened exactly and gets the bias once.
    #[test]
    fn widening_adds_the_bias_once() {
        let a = [bf16::from_f32(-1.0), bf16::from_f32(2.0)];
        let b = [bf16::from_f32(0.25), bf16::from_f32(0.5)];
        let (a, b) = (Mat::new(&a, 2, 1), Mat::new(&b, 1, 2));
        assert_eq!(bf16::product(a, b, None), [-0.25, -0.5, 0.5, 1.0]);
        assert_eq!(
            bf16::product(a, b, Some(&[1.0, 3.0])),
            [0.75, 2.5, 1.5, 4.0]
        );
    }
}
