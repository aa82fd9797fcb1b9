//! bf16 products on Intel AMX tiles (`tdpbf16ps`, Sapphire Rapids and later Xeons), for
//! [`super::Operand::product`]: on such CPUs gemmkit's AVX-512 BF16 kernel reaches about half
//! the f32 rate (`vdpbf16ps` issues on one port, f32 FMAs on two), so bf16 was slower than f32
//! there, while one tile product does 16·16·32 multiply-adds. Hand-written because gemmkit and
//! `gemm` have no AMX path and Rust's AMX intrinsics are unstable; tract-linalg's AMX kernel
//! comes inside its own packing framework and C build.
//!
//! ```text
//! C[m, n] = A[m, k] · B[k, n]   in blocks of 32 × 32: four f32 accumulator tiles (tmm0–3),
//!                               two 16-row A tiles (tmm4–5), two 16-column B tiles (tmm6–7),
//!                               32 values of k per step
//! ```
//! A is copied per 32-row block into rows of k (zero-padded to a multiple of 32); B once into
//! the pair layout the instruction reads (tile row p holds B[2p][j], B[2p+1][j] for each
//! column j). The f32 sums are rounded to bf16 once and widened, as gemmkit's bf16 output is.
//!
//! On CPUs with AVX-512 BF16 but no AMX (AMD Zen 4 and later) the same packed operands go
//! through `vdpbf16ps` ([`Kernel::Dot`]): that layout is the one the instruction reads too (a
//! broadcast pair of A against a row of B's pairs), so every caller of [`blocks`] — the linears,
//! the fused MLP, attention — runs there unchanged. On an AMD EPYC (Zen 4) its loop reached
//! 211–226 GFLOP/s on one core against `gemm`'s 85–105 in f32, where gemmkit's bf16 kernel
//! (whose output is bf16, so attention's scores could not use it) gave 161–189 with rounding
//! included (BENCHMARKS.md, "bf16 blocks on AVX-512 BF16").

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use gemmkit::bf16;
use rayon::prelude::*;

use super::{written, Mat};

/// Rows and columns of one block of C (two tiles each way).
pub const BLOCK: usize = 32;
/// Values of k per tile product: 16 bf16 pairs, a 64-byte tile row.
const KSTEP: usize = 32;

/// What multiplies [`blocks`] here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 BF16's `vdpbf16ps` on the same packed operands, on CPUs without AMX (AMD Zen 4
    /// and later): about twice the f32 FMA rate there, where gemmkit's kernel reaches less.
    Dot,
}

/// The kernel of bf16 block products: [`Kernel::Amx`] where the CPU has AMX-TILE and
/// AMX-BF16 and Linux grants this process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
/// required once before any thread executes a tile instruction), else [`Kernel::Dot`] where
/// the CPU has AVX-512 BF16; none when `OMNIRAD_AMX` is `0` (for measuring gemmkit's path).
/// `OMNIRAD_AMX=dot` skips AMX, to measure and test the dot kernel on an AMX CPU.
pub fn kernel() -> Option<Kernel> {
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let choice = std::env::var("OMNIRAD_AMX").unwrap_or_default();
        if choice == "0" {
            None
        } else if choice != "dot" && cpu_has_amx() && request_tiles() {
            Some(Kernel::Amx)
        } else if super::native_bf16() {
            Some(Kernel::Dot)
        } else {
            None
        }
    })
}

/// Whether bf16 products run as blocks of this module ([`kernel`]).
pub fn available() -> bool {
    kernel().is_some()
}

fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID.(7, 0).EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (is_x86_feature_detected's AMX
        // names are unstable).
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn request_tiles() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a permission request with no memory arguments; it fails cleanly (non-zero)
        // on kernels without AMX support.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// A·B [m, n] row-major f32, each sum rounded to bf16 and `bias` (length n) added in f32; an
/// f32 A is rounded to bf16 as its panels are packed. Only call when [`available`].
pub fn product<T: Bf16Source>(a: Mat<T>, b: Mat<bf16>, bias: &[f32]) -> Vec<f32> {
    if a.shape().0 * b.shape().1 == 0 {
        return Vec::new();
    }
    product_packed(a, &Packed::new(b, true), bias)
}

/// [`product`] with B packed already.
pub fn product_packed<T: Bf16Source>(a: Mat<T>, b: &Packed, bias: &[f32]) -> Vec<f32> {
    let (m, n) = (a.shape().0, b.cols());
    assert_eq!(bias.len(), n, "AMX product: bias length");
    if m * n == 0 {
        return Vec::new();
    }
    let write = |out: &mut [MaybeUninit<f32>]| {
        row_tasks(out, n, b).into_par_iter().for_each(|(r0, out)| {
            let panels = Panel::group(a, r0, out.len() / n);
            for cols in column_chunks(b) {
                for (i, panel) in panels.iter().enumerate() {
                    let out = &mut out[i * BLOCK * n..][..panel.rows * n];
                    blocks_in(panel, b, cols.clone(), |c0, c| {
                        let bias = &bias[c0..(c0 + BLOCK).min(n)];
                        kernels::round_add(c, bias, &mut out[c0..], n);
                    });
                }
            }
        });
    };
    // SAFETY: every row block writes all of its rows' n columns.
    unsafe { written(m * n, write) }
}

/// Packed B over this many bytes is met in column chunks by groups of row panels: a B larger
/// than a core's L2 (ViT-B's qkv, fc1 and fc2 weights: 3.5–4.7 MB in bf16) was read from
/// memory again for every panel of 32 rows, and the tile loop ran at half its rate on such
/// products (BENCHMARKS.md, "Linears meeting B in chunks"). ViT-S's (up to 1.2 MB) stay in L2,
/// and chunking them made its bf16 steps slower.
const B_WHOLE: usize = 3 << 19;
/// Bytes of packed B in one chunk: it stays in L2 while a group's panels meet it.
const B_CHUNK: usize = 1 << 19;
/// At most this many panels per group.
const GROUP: usize = 8;

/// A product's output rows ([m, width], row-major) split for rayon tasks: one panel of 32 rows
/// each, or where B is over [`B_WHOLE`], groups of up to [`GROUP`] panels, as even as they
/// go and a multiple of the threads in number. Each piece with its first row.
pub fn row_tasks<'a, T>(out: &'a mut [T], width: usize, b: &Packed) -> Vec<(usize, &'a mut [T])> {
    let m = out.len().checked_div(width).unwrap_or(0);
    let panels = m.div_ceil(BLOCK);
    let tasks = if !chunked(b) {
        panels
    } else {
        let threads = rayon::current_num_threads();
        (threads * panels.div_ceil(GROUP * threads)).min(panels)
    };
    let mut pieces = Vec::with_capacity(tasks);
    let mut rest = out;
    for t in 0..tasks {
        let end = ((t + 1) * panels / tasks * BLOCK).min(m);
        let r0 = m - rest.len() / width.max(1);
        let (piece, tail) = rest.split_at_mut((end - r0) * width);
        pieces.push((r0, piece));
        rest = tail;
    }
    pieces
}

/// Whether packed B is over [`B_WHOLE`] bytes (u32 words).
fn chunked(b: &Packed) -> bool {
    b.data.len() * 4 > B_WHOLE
}

/// B's columns in chunks of at most [`B_CHUNK`] packed bytes (a multiple of 32 wide), or
/// whole where B is at most [`B_WHOLE`]; for [`blocks_in`].
pub fn column_chunks(b: &Packed) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let width = if !chunked(b) {
        b.n.max(1)
    } else {
        (B_CHUNK / (2 * b.kp) / BLOCK).max(1) * BLOCK
    };
    (0..b.n)
        .step_by(width)
        .map(move |c| c..(c + width).min(b.n))
}

/// Up to 32 rows of A [m, k] as 32 rows of kp values (k rounded up to a multiple of 32),
/// zero-padded: the left operand of [`blocks`].
pub struct Panel {
    data: Lines<bf16>,
    kp: usize,
    /// A's rows in it (the rest is padding).
    pub rows: usize,
}

/// The values a [`Panel`] is packed from: bf16 as they are, or f32 rounded on the way (one
/// pass over A where rounding it first would be two, when nothing else needs A rounded).
pub trait Bf16Source: Copy + Send + Sync {
    /// `dst ← bf16(src)`.
    fn put(src: &[Self], dst: &mut [MaybeUninit<bf16>]);
    fn bf16(self) -> bf16;
}

impl Bf16Source for bf16 {
    fn put(src: &[bf16], dst: &mut [MaybeUninit<bf16>]) {
        dst.write_copy_of_slice(src);
    }
    fn bf16(self) -> bf16 {
        self
    }
}

impl Bf16Source for f32 {
    fn put(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        crate::cpu_gemm::kernels::narrow(src, dst);
    }
    fn bf16(self) -> bf16 {
        bf16::from_bits(crate::cpu_gemm::kernels::narrow1(self))
    }
}

impl Panel {
    /// Rows r0..r0 + rows of `a`.
    pub fn new<T: Bf16Source>(a: Mat<T>, r0: usize, rows: usize) -> Self {
        let ((m, k), (cs, rs)) = a.layout();
        assert!(r0 + rows <= m, "AMX panel: shape");
        let (cs, rs) = (cs as usize, rs as usize);
        if cs == 1 {
            // SAFETY: `put` writes the whole row.
            return unsafe {
                Self::with_rows(rows, k, |i, row| T::put(&a.data[(r0 + i) * rs..][..k], row))
            };
        }
        // A transposed: its columns are rows in memory. Read 32 of them at a time into a
        // square in L1 and write that out transposed.
        // SAFETY: the squares cover all k values of every row.
        unsafe {
            Self::written(rows, k, |filled, kp| {
                let mut square = [[bf16::ZERO; BLOCK]; KSTEP];
                for k0 in (0..k).step_by(KSTEP) {
                    let ks = KSTEP.min(k - k0);
                    for (t, sq) in square.iter_mut().take(ks).enumerate() {
                        let col = &a.data[(k0 + t) * cs + r0..][..rows];
                        sq.iter_mut().zip(col).for_each(|(s, &x)| *s = x.bf16());
                    }
                    for (i, row) in filled.chunks_exact_mut(kp).enumerate() {
                        for (x, sq) in row[k0..k0 + ks].iter_mut().zip(&square) {
                            x.write(sq[i]);
                        }
                    }
                }
            })
        }
    }

    /// Rows r0..r0 + rows of `a` as panels of 32 rows (the last one partial).
    pub fn group<T: Bf16Source>(a: Mat<T>, r0: usize, rows: usize) -> Vec<Self> {
        (0..rows)
            .step_by(BLOCK)
            .map(|i| Self::new(a, r0 + i, BLOCK.min(rows - i)))
            .collect()
    }

    /// `rows` rows of k values, row i written by `put(i, row)`: for a producer that computes
    /// A's rows itself (attention's softmax), so that they need no buffer between.
    ///
    /// # Safety
    /// `put` writes every value of the row it is given.
    pub unsafe fn with_rows(
        rows: usize,
        k: usize,
        mut put: impl FnMut(usize, &mut [MaybeUninit<bf16>]),
    ) -> Self {
        // SAFETY: the caller's promise for every row.
        unsafe {
            Self::written(rows, k, |filled, kp| {
                for (i, row) in filled.chunks_exact_mut(kp).enumerate() {
                    put(i, &mut row[..k]);
                }
            })
        }
    }

    /// The panel with its zero padding, the first k values of each of `rows` rows (kp apart)
    /// left to `fill`.
    ///
    /// # Safety
    /// `fill` writes all of those values.
    unsafe fn written(
        rows: usize,
        k: usize,
        fill: impl FnOnce(&mut [MaybeUninit<bf16>], usize),
    ) -> Self {
        assert!(k > 0 && rows <= BLOCK, "AMX panel: shape");
        let kp = k.next_multiple_of(KSTEP);
        let zero = MaybeUninit::new(bf16::ZERO);
        let write = |data: &mut [MaybeUninit<bf16>]| {
            let (filled, padding) = data.split_at_mut(rows * kp);
            padding.fill(zero);
            for row in filled.chunks_exact_mut(kp) {
                row[k..].fill(zero);
            }
            fill(filled, kp);
        };
        // SAFETY: `fill`'s promise, the rows' padding and the padding rows cover all BLOCK·kp
        // values.
        let data = unsafe { Lines::written(BLOCK * kp, write) };
        Self { data, kp, rows }
    }
}

/// B [k, n] in the layout the tile product reads, zero-padded to [kp, n rounded up to 32]:
/// for each block of 16 columns, kp/2 rows of 16 pairs (B[2p][j], B[2p+1][j]), a pair as one
/// 32-bit word (B[2p][j] in its low half, the lower address).
pub struct Packed {
    data: Lines<u32>,
    n: usize,
    kp: usize,
}

impl Packed {
    /// B's n.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// `par`: pack the column blocks in rayon tasks (for a large B outside other tasks).
    pub fn new(b: Mat<bf16>, par: bool) -> Self {
        let ((k, n), (cs, rs)) = b.layout();
        assert!(k > 0, "AMX operand: empty inner dimension");
        let kp = k.next_multiple_of(KSTEP);
        let (cs, rs) = (cs as usize, rs as usize);
        let word = |lo: bf16, hi: bf16| lo.to_bits() as u32 | (hi.to_bits() as u32) << 16;
        let zero = MaybeUninit::new(0u32);
        let pack = |(block, out): (usize, &mut [MaybeUninit<u32>])| {
            let (j0, cols) = (block * 16, 16.min(n.saturating_sub(block * 16)));
            // `out` is [kp/2, 16] words; past k's pairs and B's columns it holds zeros.
            let pairs = k.div_ceil(2);
            out[pairs * 16..].fill(zero);
            let out = &mut out[..pairs * 16];
            if cols < 16 {
                out.fill(zero);
            }
            if cols == 0 {
                return; // padding columns
            }
            if cs == 1 {
                let row = |kk: usize| &b.data[kk * rs + j0..][..cols];
                for (p, out) in out.chunks_exact_mut(16).enumerate() {
                    let lo = row(2 * p);
                    if 2 * p + 1 < k {
                        for ((o, &l), &h) in out.iter_mut().zip(lo).zip(row(2 * p + 1)) {
                            o.write(word(l, h));
                        }
                    } else {
                        for (o, &l) in out.iter_mut().zip(lo) {
                            o.write(word(l, bf16::ZERO));
                        }
                    }
                }
            } else {
                // B transposed: a column's k values lie side by side, a pair in one read.
                for jj in 0..cols {
                    let col = &b.data[(j0 + jj) * cs..][..k];
                    let pairs = col.chunks_exact(2);
                    let last = pairs.remainder().first().map(|&l| word(l, bf16::ZERO));
                    let words = pairs.map(|p| word(p[0], p[1])).chain(last);
                    for (p, w) in words.enumerate() {
                        out[p * 16 + jj].write(w);
                    }
                }
            }
        };
        let write = |data: &mut [MaybeUninit<u32>]| {
            if par {
                data.par_chunks_mut(8 * kp).enumerate().for_each(pack);
            } else {
                data.chunks_mut(8 * kp).enumerate().for_each(pack);
            }
        };
        // SAFETY: every block of 16 columns writes all of its kp/2·16 words.
        let data = unsafe { Lines::written(kp / 2 * n.next_multiple_of(BLOCK), write) };
        Self { data, n, kp }
    }
}

/// A buffer of 2- or 4-byte values that starts on a cache line. Every tile row is 64
/// bytes, so an operand 16 bytes off a line boundary (where the allocator puts large blocks)
/// makes each row straddle two lines, and the tile loop ran markedly slower on such operands
/// (BENCHMARKS.md: bf16 inference +9–16 % from aligning them). A few lines here rather than a
/// dependency (aligned-vec) for the two element types the tiles read.
struct Lines<T> {
    lines: Vec<Line>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

#[repr(C, align(64))]
struct Line([u8; 64]);

/// Types for which any bytes are a value, 64-byte aligned wherever a [`Line`] is.
trait Plain: Copy {}
impl Plain for u32 {}
impl Plain for bf16 {}

impl<T: Plain> Lines<T> {
    /// `len` values that `write` puts into fresh memory (no zero-fill first: it was 2–3 % of a
    /// bf16 inference step).
    ///
    /// # Safety
    /// `write` must write every element of the slice it is given.
    unsafe fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Self {
        let size = std::mem::size_of::<T>();
        let count = (len * size).div_ceil(64);
        let mut lines = Vec::with_capacity(count);
        let spare = &mut lines.spare_capacity_mut()[..count];
        // The last line's bytes past `len` values are never written: zero them.
        if let Some(last) = spare.last_mut() {
            last.write(Line([0; 64]));
        }
        // SAFETY: the spare lines hold at least len·size bytes, aligned for T.
        write(unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), len) });
        // SAFETY: the caller's promise and the zeroed tail initialise all `count` lines.
        unsafe { lines.set_len(count) };
        Self {
            lines,
            len,
            _values: std::marker::PhantomData,
        }
    }
}

impl<T: Plain> std::ops::Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len·size_of::<T>() initialised bytes, aligned for T
        // (64 ≥ 4), and any bytes are a T (`Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

/// panel · B, one 32 × 32 block of f32 sums at a time: `f(c0, block)` for the block's columns
/// c0..c0 + 32 (row-major, 32 wide; rows past the panel's and columns past B's are padding).
/// The tiles are configured for this call and released after it: a configuration belongs to
/// the thread, which may run other rayon tasks, configuring and releasing their own, between
/// two calls. For the same reason `f` must not run rayon work.
pub fn blocks(panel: &Panel, b: &Packed, f: impl FnMut(usize, &[f32; BLOCK * BLOCK])) {
    blocks_in(panel, b, 0..b.n, f)
}

/// [`blocks`] on B's columns `cols` only (their start a multiple of 32).
pub fn blocks_in(
    panel: &Panel,
    b: &Packed,
    cols: std::ops::Range<usize>,
    mut f: impl FnMut(usize, &[f32; BLOCK * BLOCK]),
) {
    assert_eq!(panel.kp, b.kp, "AMX product: inner dimensions");
    assert!(
        cols.start.is_multiple_of(BLOCK) && cols.end <= b.n,
        "AMX product: column range"
    );
    let kernel = kernel().expect("bf16 block products on a CPU without AMX or AVX-512 BF16");
    let tiles = kernel == Kernel::Amx;
    if tiles {
        // SAFETY: the CPU has AMX and the process holds the permission (`kernel`).
        unsafe { configure_tiles() };
    }
    let mut c = [0f32; BLOCK * BLOCK];
    for c0 in cols.step_by(BLOCK) {
        let b0 = &b.data[c0 * b.kp / 2..][..BLOCK * b.kp / 2];
        // SAFETY: the panel holds 32 rows of kp values, b0 two column blocks of kp/2 pair rows
        // of 16 pairs; kp is a positive multiple of 32. Tiles: configured above on this
        // thread, and `f` runs no other tile code. Dot: the CPU has AVX-512 BF16 (`kernel`).
        unsafe {
            match kernel {
                Kernel::Amx => block_product(&panel.data, b0, &mut c, b.kp),
                Kernel::Dot => dot::block_product(&panel.data, panel.rows, b0, &mut c, b.kp),
            }
        };
        f(c0, &c);
    }
    if tiles {
        // SAFETY: tiles were configured on this thread above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            asm!("tilerelease", options(nostack, nomem))
        };
    }
}

/// [`block_product`] with AVX-512 BF16 instead of tiles ([`Kernel::Dot`]).
mod dot {
    use super::{bf16, BLOCK};

    /// Rows of the panel per pass: 8 rows × 32 columns of sums in 16 zmm registers, beside the
    /// two B vectors and a broadcast (passes of 12 rows, 24 registers, ran no faster).
    #[cfg(target_arch = "x86_64")]
    const ROWS: usize = 8;

    /// c [32, 32] ← panel [32, kp] · B for two 16-column blocks `b` ([kp/2, 16] words each,
    /// one after the other): for each pair p, the panel row's pair (A[i][2p], A[i][2p+1])
    /// broadcast against B's packed row of pairs, the two products summed into each column's
    /// f32 lane. Only the passes that hold the panel's first `rows` rows run (tiles cannot
    /// skip its zero rows; a ViT-S/16 image's 197 tokens leave 27 of 224 rows as padding): the
    /// rows past them keep what `c` held, zeros if it starts so.
    ///
    /// # Safety
    /// The CPU has AVX-512 BF16; slice lengths as [`super::block_product`]'s.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block_product(
        panel: &[bf16],
        rows: usize,
        b: &[u32],
        c: &mut [f32; BLOCK * BLOCK],
        kp: usize,
    ) {
        use std::arch::x86_64::*;
        let pairs = kp / 2;
        assert!(panel.len() == BLOCK * kp && b.len() == BLOCK * pairs);
        let a = panel.as_ptr().cast::<i32>();
        let (b0, b1) = (b.as_ptr(), b[16 * pairs..].as_ptr());
        for r0 in (0..rows.min(BLOCK)).step_by(ROWS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for p in 0..pairs {
                // SAFETY: p < kp/2 pair rows of 16 words in each block; rows r0.. of the
                // panel hold kp/2 pairs each (the assert above).
                unsafe {
                    let x0: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(b0.add(16 * p).cast()));
                    let x1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(b1.add(16 * p).cast()));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_epi32(a.add((r0 + i) * pairs + p).read_unaligned());
                        let w: __m512bh = std::mem::transmute(w);
                        acc[0] = _mm512_dpbf16_ps(acc[0], w, x0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], w, x1);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let row = &mut c[(r0 + i) * BLOCK..][..BLOCK];
                // SAFETY: 32 floats in the row.
                unsafe {
                    _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                    _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn block_product(
        _: &[bf16],
        _: usize,
        _: &[u32],
        _: &mut [f32; BLOCK * BLOCK],
        _: usize,
    ) {
        unreachable!("AVX-512 BF16 on {}", std::env::consts::ARCH)
    }
}

/// Palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// # Safety
/// The CPU has AMX and the process holds the tile permission.
unsafe fn configure_tiles() {
    let mut cfg = TileConfig([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        cfg.0[48 + t] = 16;
    }
    // SAFETY: the caller's contract; `cfg` is a valid 64-byte configuration.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly))
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AMX on {}", std::env::consts::ARCH);
}

/// c [32, 32] ← panel [32, kp] · B for two 16-column blocks `b` ([kp/2, 32] each, one after the
/// other).
///
/// # Safety
/// Tiles configured by [`configure_tiles`] on this thread; slice lengths as stated, kp a
/// positive multiple of 32.
unsafe fn block_product(panel: &[bf16], b: &[u32], c: &mut [f32; BLOCK * BLOCK], kp: usize) {
    debug_assert!(
        kp > 0
            && kp.is_multiple_of(KSTEP)
            && panel.len() == BLOCK * kp
            && b.len() == BLOCK * kp / 2
    );
    let (a0, b0) = (panel.as_ptr(), b.as_ptr());
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AMX on {}: {a0:?} {b0:?} {c:?}", std::env::consts::ARCH);
    // SAFETY: each step reads 16 rows of 64 bytes from each A tile (stride kp·2 bytes) and 16
    // rows of 64 bytes from each B block, all inside the slices; stores write the 32 × 32 c.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a0.add(16 * kp) => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b0.add(8 * kp) => _,
            steps = inout(reg) kp / KSTEP => _,
            sa = in(reg) kp * 2,
            sb = in(reg) 64usize,
            c0 = in(reg) c.as_mut_ptr(),
            c1 = in(reg) c.as_mut_ptr().add(16),
            c2 = in(reg) c.as_mut_ptr().add(16 * BLOCK),
            c3 = in(reg) c.as_mut_ptr().add(16 * BLOCK + 16),
            sc = in(reg) BLOCK * 4,
            options(nostack),
        );
    }
}

/// The tile loop alone on the calling thread: GFLOP/s of the best of `reps` passes of
/// `blocks` over an [m, k]·[k, n] product whose operands were packed beforehand (sums
/// discarded); `None` where bf16 products do not run as these blocks. For the ops bench: it
/// shows the loop's rate per shape apart from packing, rounding and writing the result.
pub fn tile_loop_rate(m: usize, k: usize, n: usize, reps: usize) -> Option<f64> {
    if !available() || m * k * n == 0 {
        return None;
    }
    let a: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32((i % 7) as f32)).collect();
    let b: Vec<bf16> = (0..k * n).map(|i| bf16::from_f32((i % 5) as f32)).collect();
    let panels: Vec<Panel> = (0..m)
        .step_by(BLOCK)
        .map(|r0| Panel::new(Mat::new(&a, m, k), r0, BLOCK.min(m - r0)))
        .collect();
    let b = Packed::new(Mat::new(&b, k, n), false);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = std::time::Instant::now();
        for p in &panels {
            blocks(p, &b, |_, c| {
                std::hint::black_box(c);
            });
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(2.0 * (m * k * n) as f64 / best * 1e-9)
}

pub mod kernels {
    use std::mem::MaybeUninit;

    use super::BLOCK;
    use crate::cpu_gemm::kernels::narrow1;
    use crate::simd::dispatch;

    // Both take a whole block of [`super::blocks`]' sums: called once per 32-wide row, the call
    // and the loop set-up cost as much as the work (the vectorised loop ran in 8-wide steps), and
    // rounding the linears' outputs took 40 % of the time of their tile products.

    /// f32(bf16(x)).
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f32::from_bits((narrow1(x) as u32) << 16)
    }

    /// Row by row, `f(row of out, row of c)` on the first `cols` values of each (a fixed 32 when
    /// the block is whole, so that LLVM emits two full vectors without a loop).
    #[inline(always)]
    fn rows<T>(
        c: &[f32],
        out: &mut [T],
        width: usize,
        cols: usize,
        mut f: impl FnMut(&mut [T], &[f32]),
    ) {
        for (o, c) in out.chunks_mut(width).zip(c.chunks_exact(BLOCK)) {
            if cols == BLOCK {
                let (o, c): (&mut [T; BLOCK], &[f32; BLOCK]) =
                    ((&mut o[..BLOCK]).try_into().unwrap(), c.try_into().unwrap());
                f(o, c);
            } else {
                f(&mut o[..cols], &c[..cols]);
            }
        }
    }

    dispatch! {
        /// The first `cols` columns of `out`'s rows (`width` apart) ← s·c, or f32(bf16(c)) when
        /// `s` is `None`, from a [32, 32] block `c`, for as many rows as both hold.
        scale_or_round(c: &[f32], s: Option<f32>, out: &mut [f32], width: usize, cols: usize) {
            match s {
                Some(s) => rows(c, out, width, cols, |o, c| {
                    o.iter_mut().zip(c).for_each(|(o, &c)| *o = s * c)
                }),
                None => rows(c, out, width, cols, |o, c| {
                    o.iter_mut().zip(c).for_each(|(o, &c)| *o = round(c))
                }),
            }
        }
    }

    dispatch! {
        /// The first `bias.len()` columns of `out`'s rows (`width` apart) ← f32(bf16(c)) + bias,
        /// from a [32, 32] block `c`, for as many rows as both hold.
        round_add(c: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>], width: usize) {
            rows(c, out, width, bias.len(), |o, c| {
                for ((o, &c), &b) in o.iter_mut().zip(c).zip(bias) {
                    o.write(round(c) + b);
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate's deterministic test values, rounded to bf16.
    fn values(len: usize, seed: u64) -> Vec<bf16> {
        let v = crate::test_values::<crate::Cpu, 1>([len], seed).into_data();
        v.to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// Tile products equal the definition: bf16 values multiplied exactly, summed (here in f64,
    /// there in f32), the sum rounded to bf16, the bias added; over shapes that leave partial
    /// blocks on every side and through transposed views of A and B.
    #[test]
    fn tile_products_match_the_definition() {
        if !available() {
            // No AMX, a kernel that refuses the tile state, or OMNIRAD_AMX=0.
            eprintln!("AMX tiles unavailable here: the tile path is not exercised");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (17, 31, 15),
            (33, 33, 47),
            (64, 96, 32),
            (50, 384, 70),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            // a as [m, k] or as the transpose of a [k, m] matrix; b likewise.
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let am = if ta {
                    Mat::new(&a, k, m).t()
                } else {
                    Mat::new(&a, m, k)
                };
                let bm = if tb {
                    Mat::new(&b, n, k).t()
                } else {
                    Mat::new(&b, k, n)
                };
                let at = |i: usize, kk: usize| a[if ta { kk * m + i } else { i * k + kk }].to_f64();
                let bt = |kk: usize, j: usize| b[if tb { j * k + kk } else { kk * n + j }].to_f64();
                let got = product(am, bm, &bias);
                assert_eq!(got.len(), m * n);
                for i in 0..m {
                    for j in 0..n {
                        let (sum, size) = (0..k).fold((0.0, 0.0), |(s, z), kk| {
                            let p = at(i, kk) * bt(kk, j);
                            (s + p, z + p.abs())
                        });
                        let want = bf16::from_f64(sum).to_f64() + bias[j] as f64;
                        // One bf16 step where f32 summation lands beside a rounding boundary.
                        let tol = sum.abs() / 128.0 + size * 1e-6 + 1e-6;
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= tol,
                            "[{m}, {k}]·[{k}, {n}] ta {ta} tb {tb} at ({i}, {j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A B over `B_WHOLE`, met in four column chunks (the last partial) by tasks of several
    /// row panels (on a few threads; the last panel partial): the sums at the chunks' edges
    /// are the product's.
    #[test]
    fn panels_in_groups_meet_b_in_chunks() {
        if !available() {
            return;
        }
        let (m, k, n) = (300, 512, 1600);
        let (a, b) = (values(m * k, 3), values(k * n, 4));
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.5).collect();
        let packed = Packed::new(Mat::new(&b, k, n), false);
        assert_eq!(column_chunks(&packed).count(), 4);
        let got = product_packed(Mat::new(&a, m, k), &packed, &bias);
        for i in 0..m {
            for j in [0, 31, 511, 512, 1023, 1024, 1535, 1536, 1599] {
                let sum: f64 = (0..k)
                    .map(|kk| a[i * k + kk].to_f64() * b[kk * n + j].to_f64())
                    .sum();
                let g = (got[i * n + j] - bias[j]) as f64;
                let close = (g - sum).abs() <= sum.abs() / 128.0 + 1e-5;
                assert!(close, "({i}, {j}): {g} vs {sum}");
            }
        }
    }

    /// The AVX-512 BF16 block, called directly (also where [`blocks`] picks AMX), equals the
    /// definition: bf16 products exact, summed in f32; rows and columns past A's and B's zero.
    #[test]
    fn dot_blocks_match_the_definition() {
        if !crate::cpu_gemm::native_bf16() {
            eprintln!("no AVX-512 BF16 here: the dot kernel is not exercised");
            return;
        }
        for (m, k, n) in [(32, 32, 32), (5, 70, 20), (32, 1, 9)] {
            let (a, b) = (values(m * k, 8), values(k * n, 9));
            let panel = Panel::new(Mat::new(&a, m, k), 0, m);
            let packed = Packed::new(Mat::new(&b, k, n), false);
            // As `blocks` starts it: rows past the panel's passes keep these zeros.
            let mut c = [0.0; BLOCK * BLOCK];
            // SAFETY: the CPU has AVX-512 BF16 (checked above); the panel holds 32 rows of kp
            // values, the packed B (32 columns at most) two blocks of kp/2 pair rows.
            unsafe { dot::block_product(&panel.data, m, &packed.data, &mut c, packed.kp) };
            for i in 0..BLOCK {
                for j in 0..BLOCK {
                    let (want, size) = if i < m && j < n {
                        (0..k).fold((0.0, 0.0), |(s, z), kk| {
                            let p = a[i * k + kk].to_f64() * b[kk * n + j].to_f64();
                            (s + p, z + p.abs())
                        })
                    } else {
                        (0.0, 0.0)
                    };
                    let g = c[i * BLOCK + j] as f64;
                    // f32 summation of exact products.
                    assert!(
                        (g - want).abs() <= size * 1e-6,
                        "[{m}, {k}]·[{k}, {n}] at ({i}, {j}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// Operands given transposed pack to the same bits as their row-major copies (the
    /// transposed paths go through a square in L1 or column by column; the row-major ones copy
    /// rows): over shapes with partial panels, partial 16-column blocks and odd k, f32 A too.
    #[test]
    fn transposed_operands_pack_as_their_copies() {
        let bits = |p: &Panel| p.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (m, k) in [(1, 1), (5, 31), (17, 33), (32, 64), (20, 197), (32, 100)] {
            let a = values(m * k, 10);
            // at [k, m] holds a [m, k] transposed.
            let at: Vec<bf16> = (0..k * m).map(|x| a[x % m * k + x / m]).collect();
            let [a32, at32] = [&a, &at].map(|v| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
            for r0 in [0, m / 2] {
                let rows = BLOCK.min(m - r0);
                let want = Panel::new(Mat::new(&a, m, k), r0, rows);
                for got in [
                    Panel::new(Mat::new(&at, k, m).t(), r0, rows),
                    Panel::new(Mat::new(&at32, k, m).t(), r0, rows),
                    Panel::new(Mat::new(&a32, m, k), r0, rows),
                ] {
                    assert_eq!(got.rows, want.rows);
                    assert_eq!(bits(&got), bits(&want), "panel of [{m}, {k}] from row {r0}");
                }
            }
            // As B [m, k]: 16-column blocks with partial ones, odd k.
            let want = Packed::new(Mat::new(&a, m, k), false);
            let got = Packed::new(Mat::new(&at, k, m).t(), true);
            assert_eq!(&got.data[..], &want.data[..], "packed [{m}, {k}]");
        }
    }

    /// Operands start on a cache line, whatever the allocator returns for other buffers.
    #[test]
    fn packed_operands_start_on_cache_lines() {
        for len in [1, 31, 4000] {
            let a = values(len * 40, 5);
            let panel = Panel::new(Mat::new(&a, len, 40), 0, len.min(BLOCK));
            let packed = Packed::new(Mat::new(&a, 40, len), false);
            assert_eq!(panel.data.as_ptr() as usize % 64, 0);
            assert_eq!(packed.data.as_ptr() as usize % 64, 0);
        }
    }

    /// The padding of packed operands is zero, also in memory that held other values: the
    /// buffers are not zero-filled first, and a NaN in padding would reach the sums (0·NaN).
    /// Each buffer is built right after freeing one of its size full of NaNs, which the
    /// allocator hands back.
    #[test]
    fn padding_is_zero_in_reused_memory() {
        let nan = bf16::NAN.to_bits().to_le_bytes();
        let dirty = |bytes: usize| {
            let line = Line([nan[0], nan[1]].repeat(32).try_into().unwrap());
            drop(
                (0..bytes.div_ceil(64))
                    .map(|_| Line(line.0))
                    .collect::<Vec<_>>(),
            );
        };
        for (rows, k, n) in [(5usize, 33usize, 17usize), (32, 40, 50), (1, 1, 1)] {
            let kp = k.next_multiple_of(KSTEP);
            let a = values(rows * k, 6);
            for at in [Mat::new(&a, rows, k), Mat::new(&a, k, rows).t()] {
                dirty(BLOCK * kp * 2);
                let panel = Panel::new(at, 0, rows);
                for (i, row) in panel.data.chunks(kp).enumerate() {
                    let pad = if i < rows { &row[k..] } else { row };
                    assert!(pad.iter().all(|x| x.to_bits() == 0), "panel row {i}");
                }
            }
            let b = values(k * n, 7);
            for bt in [Mat::new(&b, k, n), Mat::new(&b, n, k).t()] {
                dirty(kp / 2 * n.next_multiple_of(BLOCK) * 4);
                let packed = Packed::new(bt, false);
                // Block of 16 columns, then [kp/2, 16] words.
                for (w, &word) in packed.data.iter().enumerate() {
                    let (block, p, jj) = (w / (8 * kp), w % (8 * kp) / 16, w % 16);
                    let real = block * 16 + jj < n && p < k.div_ceil(2);
                    let high_pad = real && k % 2 == 1 && p == k / 2;
                    if !real {
                        assert_eq!(word, 0, "packed word {w}");
                    } else if high_pad {
                        assert_eq!(word >> 16, 0, "packed word {w}, the pair past k");
                    }
                }
            }
        }
    }

    /// Non-finite values propagate as in any product: an ∞ in A makes its row ±∞ or NaN.
    #[test]
    fn infinities_and_nans_reach_their_rows() {
        if !available() {
            return;
        }
        let (m, k, n) = (3, 40, 5);
        let mut a = values(m * k, 3);
        a[k + 7] = bf16::NAN;
        let b = values(k * n, 4);
        let got = product(Mat::new(&a, m, k), Mat::new(&b, k, n), &[0.0; 5]);
        for (i, row) in got.chunks(n).enumerate() {
            assert!(
                row.iter().all(|x| x.is_nan() == (i == 1)),
                "row {i}: {row:?}"
            );
        }
    }
}
