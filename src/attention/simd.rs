//! Vectorisable slice arithmetic for the softmax over logit tiles: max, exp, sums.
//!
//! Rust never reassociates or contracts floating-point arithmetic, so a plain loop summing into
//! one accumulator cannot vectorise. Every reduction here keeps [`LANES`] independent partial
//! results, which LLVM maps onto SIMD registers, and combines them in a fixed order; the result
//! is therefore the same for every instruction set and thread count. `std`'s exp is a libm call
//! that does not vectorise, so the exponentials are `crate::simd`'s polynomials.
//!
//! Each slice routine is compiled per CPU level and picked at run time (`crate::simd`).

pub(crate) use crate::simd::has_fma;
use crate::simd::{dispatched, exp_f32, exp_f64_or_zero, tanh_f32};

/// Partial results per reduction. 16 f32 fill one AVX-512 register or two AVX2 registers.
pub const LANES: usize = 16;

/// Elements summed in the working precision before a partial sum is widened to f64: at most
/// `BLOCK / LANES` = 16 terms per lane, so the f32 rounding error stays below ~1e-6 relative.
pub const BLOCK: usize = 256;

/// The element types of the softmax, each with its vectorisable exp.
pub trait Lane: Copy + PartialOrd + Send + Sync + 'static {
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn widen(self) -> f64;
    fn narrow(v: f64) -> Self;
    fn sub(self, other: Self) -> Self;
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// e^x for x <= 0; `FMA` only where the CPU has it.
    fn exp_nonpositive<const FMA: bool>(self) -> Self;
}

impl Lane for f32 {
    const ZERO: f32 = 0.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn narrow(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn sub(self, other: f32) -> f32 {
        self - other
    }
    #[inline(always)]
    fn add(self, other: f32) -> f32 {
        self + other
    }
    #[inline(always)]
    fn mul(self, other: f32) -> f32 {
        self * other
    }
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> f32 {
        exp_f32::<FMA>(self)
    }
}

impl Lane for f64 {
    const ZERO: f64 = 0.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn sub(self, other: f64) -> f64 {
        self - other
    }
    #[inline(always)]
    fn add(self, other: f64) -> f64 {
        self + other
    }
    #[inline(always)]
    fn mul(self, other: f64) -> f64 {
        self * other
    }
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> f64 {
        exp_f64_or_zero::<FMA>(self)
    }
}

/// Largest element (-inf for an empty slice); NaN elements are skipped (the exp pass sees them).
#[inline(always)]
fn max_impl<T: Lane>(s: &[T]) -> T {
    let bigger = |a: T, b: T| if b > a { b } else { a };
    let mut lanes = [T::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[T; LANES] = c.try_into().expect("chunks_exact yields LANES elements");
        for l in 0..LANES {
            lanes[l] = bigger(lanes[l], c[l]);
        }
    }
    let tail = chunks.remainder().iter().fold(T::NEG_INFINITY, |m, &v| bigger(m, v));
    lanes.iter().fold(tail, |m, &v| bigger(m, v))
}

/// Sum over `s` of f(v) with per-lane partial sums, widened to f64 every [`BLOCK`] elements.
/// The tail of a block (< LANES elements) has its own scalar partial sum: keeping it out of the
/// lane array lets the lanes live in registers.
#[inline(always)]
fn lane_sum<T: Lane>(s: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0.0;
    for block in s.chunks(BLOCK) {
        let mut lanes = [T::ZERO; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            let c: &[T; LANES] = c.try_into().expect("chunks_exact yields LANES elements");
            for l in 0..LANES {
                lanes[l] = lanes[l].add(f(c[l]));
            }
        }
        let tail = chunks.remainder().iter().fold(T::ZERO, |acc, &v| acc.add(f(v)));
        total += lanes.iter().map(|l| l.widen()).sum::<f64>() + tail.widen();
    }
    total
}

/// sum_j e^(s_j - m); masked logits (-inf) contribute 0.
#[inline(always)]
fn exp_sum_impl<T: Lane, const FMA: bool>(s: &[T], m: T) -> f64 {
    lane_sum(s, |v| v.sub(m).exp_nonpositive::<FMA>())
}

/// sum_j e^(x_j) x_j with x_j = s_j - m, the entropy term; masked logits contribute 0 (not
/// 0 · -inf).
#[inline(always)]
fn exp_weighted_sum_impl<T: Lane, const FMA: bool>(s: &[T], m: T) -> f64 {
    lane_sum(s, |v| {
        let x = v.sub(m);
        let e = x.exp_nonpositive::<FMA>();
        if e > T::ZERO {
            e.mul(x)
        } else {
            T::ZERO
        }
    })
}

/// Replaces s_j by e^(s_j - m) and returns their sum (widened as in [`lane_sum`]).
#[inline(always)]
fn exp_in_place_impl<T: Lane, const FMA: bool>(s: &mut [T], m: T) -> f64 {
    for v in s.iter_mut() {
        *v = v.sub(m).exp_nonpositive::<FMA>();
    }
    lane_sum(s, |v| v)
}

/// s_j *= factor.
#[inline(always)]
fn scale_impl<T: Lane>(s: &mut [T], factor: T) {
    for v in s.iter_mut() {
        *v = v.mul(factor);
    }
}

/// cap · tanh(x / cap), NaN for a non-finite x (see `Compute::soft_cap`).
#[inline(always)]
fn soft_cap_one<const FMA: bool>(x: f32, cap: f32) -> f32 {
    let capped = cap * tanh_f32::<FMA>(x / cap);
    if x.is_finite() {
        capped
    } else {
        f32::NAN
    }
}

#[inline(always)]
fn soft_cap_impl<const FMA: bool>(s: &mut [f32], cap: f32) {
    for v in s.iter_mut() {
        *v = soft_cap_one::<FMA>(*v, cap);
    }
}

dispatched!(
    /// s_j <- cap · tanh(s_j / cap) for f32 logits (NaN where s_j is not finite).
    soft_cap_f32(s: &mut [f32], cap: f32) -> () = soft_cap_impl::<true>, soft_cap_impl::<false>
);
dispatched!(
    /// [`soft_cap_f32`] of one logit, bit for bit: the same arithmetic with the same FMA choice.
    soft_cap_one_f32(x: f32, cap: f32) -> f32 = soft_cap_one::<true>, soft_cap_one::<false>
);

dispatched!(
    /// Largest element of f32 logits (-inf if empty; NaN skipped).
    max_f32(s: &[f32]) -> f32 = max_impl::<f32>, max_impl::<f32>
);
dispatched!(
    /// sum_j e^(s_j - m) over f32 logits, m >= every s_j.
    exp_sum_f32(s: &[f32], m: f32) -> f64 = exp_sum_impl::<f32, true>, exp_sum_impl::<f32, false>
);
dispatched!(
    /// sum_j e^(s_j - m) (s_j - m) over f32 logits, m >= every s_j.
    exp_weighted_sum_f32(s: &[f32], m: f32) -> f64 = exp_weighted_sum_impl::<f32, true>, exp_weighted_sum_impl::<f32, false>
);
dispatched!(
    /// s_j <- e^(s_j - m) for f32 logits; returns the sum.
    exp_in_place_f32(s: &mut [f32], m: f32) -> f64 = exp_in_place_impl::<f32, true>, exp_in_place_impl::<f32, false>
);
dispatched!(
    /// s_j <- factor · s_j.
    scale_f32(s: &mut [f32], factor: f32) -> () = scale_impl::<f32>, scale_impl::<f32>
);

dispatched!(
    /// Largest element of f64 logits (-inf if empty; NaN skipped).
    max_f64(s: &[f64]) -> f64 = max_impl::<f64>, max_impl::<f64>
);
dispatched!(
    /// sum_j e^(s_j - m) over f64 logits, m >= every s_j.
    exp_sum_f64(s: &[f64], m: f64) -> f64 = exp_sum_impl::<f64, true>, exp_sum_impl::<f64, false>
);
dispatched!(
    /// sum_j e^(s_j - m) (s_j - m) over f64 logits, m >= every s_j.
    exp_weighted_sum_f64(s: &[f64], m: f64) -> f64 = exp_weighted_sum_impl::<f64, true>, exp_weighted_sum_impl::<f64, false>
);
dispatched!(
    /// s_j <- e^(s_j - m) for f64 logits; returns the sum.
    exp_in_place_f64(s: &mut [f64], m: f64) -> f64 = exp_in_place_impl::<f64, true>, exp_in_place_impl::<f64, false>
);
dispatched!(
    /// s_j <- factor · s_j.
    scale_f64(s: &mut [f64], factor: f64) -> () = scale_impl::<f64>, scale_impl::<f64>
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x <= 0.0 {
            let exact = (x as f64).exp();
            let got = exp_f32::<false>(x) as f64;
            let fused = if has_fma() { exp_f32_fused(x) as f64 } else { got };
            worst = worst.max(((fused - exact) / exact).abs());
            worst = worst.max(((got - exact) / exact).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.4e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_f32_edges() {
        for exp in [exp_f32::<false>, exp_f32_fused] {
            assert_eq!(exp(0.0), 1.0);
            assert_eq!(exp(f32::NEG_INFINITY), 0.0);
            assert_eq!(exp(-1000.0), 0.0);
            assert!(exp(f32::NAN).is_nan());
            assert_eq!(exp(5.0), 1.0, "positive arguments are treated as 0");
        }
    }

    /// The FMA form, compiled with FMA so that `mul_add` is an instruction (tests only).
    fn exp_f32_fused(x: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            #[target_feature(enable = "fma")]
            unsafe fn fused(x: f32) -> f32 {
                exp_f32::<true>(x)
            }
            // SAFETY: the CPU has FMA.
            return unsafe { fused(x) };
        }
        exp_f32::<true>(x)
    }

    #[test]
    fn reductions_match_scalar_sums() {
        let s: Vec<f32> = (0..1000).map(|i| -((i * 37 % 101) as f32) / 7.0).collect();
        let m = max_f32(&s);
        assert_eq!(m, 0.0);
        let exact: f64 = s.iter().map(|&v| ((v - m) as f64).exp()).sum();
        assert!((exp_sum_f32(&s, m) - exact).abs() < 1e-6 * exact);
        let weighted: f64 = s.iter().map(|&v| ((v - m) as f64).exp() * (v - m) as f64).sum();
        assert!((exp_weighted_sum_f32(&s, m) - weighted).abs() < 1e-6 * weighted.abs());
        let mut t = s.clone();
        let sum = exp_in_place_f32(&mut t, m);
        assert!((sum - exact).abs() < 1e-6 * exact);
        assert!((t[1] as f64 - ((s[1] - m) as f64).exp()).abs() < 1e-7);
        // Masked entries contribute nothing, not NaN.
        let masked = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        assert_eq!(exp_sum_f32(&masked, 0.0), 1.0);
        assert_eq!(exp_weighted_sum_f32(&masked, 0.0), 0.0);
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn f64_reductions() {
        let s = [0.0, -1.0, f64::NEG_INFINITY, -2.0];
        assert_eq!(max_f64(&s), 0.0);
        let exact = 1.0 + (-1.0f64).exp() + (-2.0f64).exp();
        assert!((exp_sum_f64(&s, 0.0) - exact).abs() < 1e-15);
        assert!((exp_weighted_sum_f64(&s, 0.0) + (-1.0f64).exp() + 2.0 * (-2.0f64).exp()).abs() < 1e-15);
    }
}
