//! The precisions the attention kernels compute in, and how each input dtype maps to one:
//! f16, bf16 and f32 inputs compute in f32 (as TransformerLens and PyTorch do for f32 models),
//! f64 in f64. Per precision: the GEMM of a logit tile, a single dot product that rounds exactly like
//! the GEMM, and the softmax slice routines of [`super::simd`].

use ndarray::{ArrayView2, ArrayViewD};

use super::simd::{self, Lane};
use crate::stack::Real;

/// f32 or f64: everything the kernels do with logits.
pub trait Compute: Lane + Real + std::fmt::Display {
    fn from_f64(v: f64) -> Self;
    fn is_finite(self) -> bool;

    /// C[m, n] = alpha · A[m, k] · B[k, n], strides in elements (any sign).
    ///
    /// # Safety
    /// The pointers and strides must address valid elements for every index in range, and C's
    /// elements must not alias A or B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// `sum_p a[p] · b[p]` accumulated in index order, fused when the CPU has FMA: on such CPUs
    /// this is the very sum matrixmultiply's micro-kernels form for one entry of C (checked by
    /// a test), so a target logit equals the logit that went into the row's log-sum-exp.
    fn dot(a: ndarray::ArrayView1<'_, Self>, b: ndarray::ArrayView1<'_, Self>) -> Self;

    /// The logit soft cap `cap · tanh(self / cap)` (Gemma-2's `attn_logit_softcapping`). NaN
    /// for a non-finite logit, so an overflow in q·k stays an error rather than saturating
    /// silently to `cap`. Bit for bit what [`Compute::soft_cap_slice`] makes of the same logit.
    fn soft_cap(self, cap: Self) -> Self;
    /// [`Compute::soft_cap`] of every logit of a tile: f32 through the vectorised
    /// `crate::simd::tanh_f32` (2 ulp), f64 through `std`'s tanh.
    fn soft_cap_slice(s: &mut [Self], cap: Self);

    fn max(s: &[Self]) -> Self;
    fn exp_sum(s: &[Self], m: Self) -> f64;
    fn exp_weighted_sum(s: &[Self], m: Self) -> f64;
    fn exp_in_place(s: &mut [Self], m: Self) -> f64;
    fn scale(s: &mut [Self], factor: Self);
}

/// Index-order dot product; `fused` selects a.mul_add(b, acc) over acc + a · b.
#[inline(always)]
fn ordered_dot<T: Copy>(
    a: ndarray::ArrayView1<'_, T>,
    b: ndarray::ArrayView1<'_, T>,
    zero: T,
    step: impl Fn(T, T, T) -> T,
) -> T {
    a.iter().zip(b.iter()).fold(zero, |acc, (&x, &y)| step(x, y, acc))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn fused_dot_f32(a: ndarray::ArrayView1<'_, f32>, b: ndarray::ArrayView1<'_, f32>) -> f32 {
    ordered_dot(a, b, 0.0, |x, y, acc| x.mul_add(y, acc))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn fused_dot_f64(a: ndarray::ArrayView1<'_, f64>, b: ndarray::ArrayView1<'_, f64>) -> f64 {
    ordered_dot(a, b, 0.0, |x, y, acc| x.mul_add(y, acc))
}

impl Compute for f32 {
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc)
    }
    fn dot(a: ndarray::ArrayView1<'_, f32>, b: ndarray::ArrayView1<'_, f32>) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd::has_fma() {
            // SAFETY: the CPU has FMA.
            return unsafe { fused_dot_f32(a, b) };
        }
        ordered_dot(a, b, 0.0, |x, y, acc| acc + x * y)
    }
    fn soft_cap(self, cap: f32) -> f32 {
        simd::soft_cap_one_f32(self, cap)
    }
    fn soft_cap_slice(s: &mut [f32], cap: f32) {
        simd::soft_cap_f32(s, cap)
    }
    fn max(s: &[f32]) -> f32 {
        simd::max_f32(s)
    }
    fn exp_sum(s: &[f32], m: f32) -> f64 {
        simd::exp_sum_f32(s, m)
    }
    fn exp_weighted_sum(s: &[f32], m: f32) -> f64 {
        simd::exp_weighted_sum_f32(s, m)
    }
    fn exp_in_place(s: &mut [f32], m: f32) -> f64 {
        simd::exp_in_place_f32(s, m)
    }
    fn scale(s: &mut [f32], factor: f32) {
        simd::scale_f32(s, factor)
    }
}

impl Compute for f64 {
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc)
    }
    fn dot(a: ndarray::ArrayView1<'_, f64>, b: ndarray::ArrayView1<'_, f64>) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if simd::has_fma() {
            // SAFETY: the CPU has FMA.
            return unsafe { fused_dot_f64(a, b) };
        }
        ordered_dot(a, b, 0.0, |x, y, acc| acc + x * y)
    }
    fn soft_cap(self, cap: f64) -> f64 {
        if self.is_finite() {
            cap * (self / cap).tanh()
        } else {
            f64::NAN
        }
    }
    fn soft_cap_slice(s: &mut [f64], cap: f64) {
        for v in s {
            *v = v.soft_cap(cap);
        }
    }
    fn max(s: &[f64]) -> f64 {
        simd::max_f64(s)
    }
    fn exp_sum(s: &[f64], m: f64) -> f64 {
        simd::exp_sum_f64(s, m)
    }
    fn exp_weighted_sum(s: &[f64], m: f64) -> f64 {
        simd::exp_weighted_sum_f64(s, m)
    }
    fn exp_in_place(s: &mut [f64], m: f64) -> f64 {
        simd::exp_in_place_f64(s, m)
    }
    fn scale(s: &mut [f64], factor: f64) {
        simd::scale_f64(s, factor)
    }
}

/// `out[r · ld + c] = scale · q[rows.start + r] · k[cols.start + c]` for the given query rows
/// and key columns of one head (q: [n, d], k: [n, d], any strides), by one GEMM call.
pub fn logits_tile<C: Compute>(
    q: &ArrayView2<'_, C>,
    k: &ArrayView2<'_, C>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    scale: C,
    out: &mut [C],
    ld: usize,
) {
    let (m, n, d) = (rows.len(), cols.len(), q.ncols());
    if m == 0 || n == 0 {
        return;
    }
    assert!(rows.end <= q.nrows() && cols.end <= k.nrows() && k.ncols() == d && n <= ld, "logits tile out of range");
    assert!(out.len() >= (m - 1) * ld + n, "logits tile larger than its buffer");
    let (qs, ks) = (q.strides(), k.strides());
    // SAFETY: rows and cols are inside q and k (asserted), and their offsets stay inside the
    // views; C = Q K^T reads K^T with swapped strides; `out` holds m rows of stride ld >= n.
    unsafe {
        let a = q.as_ptr().offset(rows.start as isize * qs[0]);
        let b = k.as_ptr().offset(cols.start as isize * ks[0]);
        C::gemm(m, d, n, scale, a, qs[0], qs[1], b, ks[1], ks[0], out.as_mut_ptr(), ld as isize, 1);
    }
}

/// How q or k reaches the kernels' precision (see [`QkElement::source`]).
pub enum Source<'a, T, C> {
    /// The input is already in the compute precision (f32, f64): read in place.
    Native(ArrayViewD<'a, C>),
    /// A narrower input (f16, bf16), kept as given and converted one head at a time by
    /// `super::heads::QkHeads`, so no converted copy of the whole array is ever made.
    Narrow(ArrayViewD<'a, T>),
}

/// Input element types and the precision each computes in.
pub trait QkElement: Real {
    type Compute: Compute;
    /// The array as the kernels read it: in place, or narrow (converted per head).
    fn source(view: ArrayViewD<'_, Self>) -> Source<'_, Self, Self::Compute>;
    /// One element in the compute precision; exact (every f16 and bf16 value is an f32).
    fn to_compute(self) -> Self::Compute;
}

impl QkElement for f32 {
    type Compute = f32;
    fn source(view: ArrayViewD<'_, f32>) -> Source<'_, f32, f32> {
        Source::Native(view)
    }
    #[inline(always)]
    fn to_compute(self) -> f32 {
        self
    }
}

impl QkElement for f64 {
    type Compute = f64;
    fn source(view: ArrayViewD<'_, f64>) -> Source<'_, f64, f64> {
        Source::Native(view)
    }
    #[inline(always)]
    fn to_compute(self) -> f64 {
        self
    }
}

/// f16 and bf16 compute in f32 (converted per head, see [`Source::Narrow`]): half-precision
/// GEMMs are not faster on CPUs without native half arithmetic, and f32 keeps the logits
/// accurate (PyTorch's CPU attention does the same for bf16 models).
macro_rules! narrow_element {
    ($t:ty, $to_f32:path) => {
        impl QkElement for $t {
            type Compute = f32;
            fn source(view: ArrayViewD<'_, $t>) -> Source<'_, $t, f32> {
                Source::Narrow(view)
            }
            #[inline(always)]
            fn to_compute(self) -> f32 {
                $to_f32(self)
            }
        }
    };
}

narrow_element!(half::f16, half::f16::to_f32);
narrow_element!(half::bf16, crate::stack::bf16_to_f32);

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    fn pseudo_random(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            (((i * 131 + j * 71 + seed * 17) * 2654435761usize) % 10007) as f32 / 5003.5 - 1.0
        })
    }

    #[test]
    fn tile_matches_dot_bit_for_bit_and_honours_strides() {
        // q as a strided view (every other row, reversed columns), like a head inside [n, H, d].
        let big_q = pseudo_random(200, 64, 1);
        let q = big_q.slice(s![..;2, ..;-1]);
        let k = pseudo_random(100, 64, 2);
        let k = k.view();
        let (rows, cols, ld) = (3..70, 5..100, 128);
        let mut out = vec![0.0f32; rows.len() * ld];
        logits_tile(&q, &k, rows.clone(), cols.clone(), 0.125, &mut out, ld);
        let mut mismatches = 0;
        for (r, i) in rows.enumerate() {
            for (c, j) in cols.clone().enumerate() {
                let expected = f32::dot(q.row(i), k.row(j)) * 0.125;
                let got = out[r * ld + c];
                assert!((got - expected).abs() <= 1e-6 * (1.0 + expected.abs()), "({i}, {j}): {got} vs {expected}");
                mismatches += usize::from(got != expected);
            }
        }
        // Exact agreement is what lets target logits match the log-sum-exp; it holds for
        // matrixmultiply's FMA kernels (report, do not fail, elsewhere).
        if simd::has_fma() {
            assert_eq!(mismatches, 0, "target logits no longer round like the GEMM");
        }
    }

    /// The tile's soft cap and a single recomputed logit's agree to the bit (what lets capped
    /// target logits match the log-sum-exp), and both are within a few ulp of f64's.
    #[test]
    fn soft_cap_of_a_tile_equals_soft_cap_of_each_logit() {
        let tile = pseudo_random(37, 91, 3);
        for cap in [0.3f32, 5.0, 50.0] {
            let mut logits: Vec<f32> = tile.iter().map(|v| v * 3.0 * cap).collect();
            logits.extend([f32::INFINITY, f32::NAN, 0.0, -0.0, 1e30]);
            let mut capped = logits.clone();
            f32::soft_cap_slice(&mut capped, cap);
            for (x, c) in logits.iter().zip(&capped) {
                assert_eq!(c.to_bits(), x.soft_cap(cap).to_bits(), "cap {cap}, logit {x}");
                if x.is_finite() {
                    let exact = cap as f64 * (*x as f64 / cap as f64).tanh();
                    assert!((*c as f64 - exact).abs() <= 4.0 * f32::EPSILON as f64 * cap as f64, "{x}: {c} vs {exact}");
                } else {
                    assert!(c.is_nan(), "a non-finite logit stays an overflow");
                }
            }
            let mut wide: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
            f64::soft_cap_slice(&mut wide, cap as f64);
            assert!(wide.iter().zip(&logits).all(|(w, x)| w.to_bits() == (*x as f64).soft_cap(cap as f64).to_bits()));
        }
    }

    #[test]
    fn narrow_types_are_converted_exactly_and_wide_ones_borrowed() {
        let a = ndarray::arr1(&[half::f16::from_f32(0.5), half::f16::from_f32(-2.0)]).into_dyn();
        assert!(matches!(half::f16::source(a.view()), Source::Narrow(_)));
        assert_eq!(a.mapv(half::f16::to_compute).as_slice().unwrap(), &[0.5f32, -2.0]);
        let b = ndarray::arr1(&[half::bf16::from_f32(0.5), half::bf16::from_f32(-3.0e38)]).into_dyn();
        assert!(matches!(half::bf16::source(b.view()), Source::Narrow(_)));
        assert_eq!(
            b.mapv(half::bf16::to_compute).as_slice().unwrap(),
            &[0.5f32, half::bf16::from_f32(-3.0e38).to_f32()]
        );
        let c = ndarray::arr1(&[1.0f32]).into_dyn();
        assert!(matches!(f32::source(c.view()), Source::Native(v) if v.as_ptr() == c.as_ptr()));
    }
}
