//! Matrix products on slices of the CPU backend's f32 tensors, through `gemm` (the library
//! burn-flex itself calls), for omnirad's CPU kernels ([`crate::attention`], [`crate::linear`]).

use burn::backend::flex::FlexTensor;
pub use gemm::Parallelism;

/// A row-major [rows, cols] matrix in a slice, or its transpose (read through swapped strides,
/// no copy).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Mat: slice length");
        Self {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Logical (rows, cols) and (column stride, row stride).
    fn layout(&self) -> ((usize, usize), (isize, isize)) {
        let c = self.cols as isize;
        if self.transposed {
            ((self.cols, self.rows), (c, 1))
        } else {
            ((self.rows, self.cols), (1, c))
        }
    }
}

/// `dst` [m, n] ← β·A·B, or `dst` += β·A·B when `acc`.
pub fn mm(dst: &mut [f32], acc: bool, a: Mat, b: Mat, beta: f32, par: Parallelism) {
    let ((m, k), (a_cs, a_rs)) = a.layout();
    let ((k2, n), (b_cs, b_rs)) = b.layout();
    assert!(k == k2 && dst.len() == m * n, "mm: shapes");
    // SAFETY: `Mat::new` and the assert tie every shape and stride to its slice's length.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
