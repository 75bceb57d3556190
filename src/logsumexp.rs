//! Log-sum-exp over a long row (a vocabulary of logits), in one streaming pass with O(1) state.
//!
//! The row is read in chunks of [`CHUNK`] values widened to f64. Per chunk: its max m_c, then
//! s_c = sum exp(x - m_c) with a branch-free exp the compiler vectorises. Chunks merge into a
//! running (max, sum) by the online rule
//!   (m, s) + (m_c, s_c) = (M, s exp(m - M) + s_c exp(m_c - M)),  M = max(m, m_c),
//! so memory is read once and never written. Accumulation is in f64 and follows a fixed order,
//! so a row's result does not depend on threads; it may differ in the last bits between the
//! FMA and non-FMA code paths (both are well within 1e-13 relative).

use crate::simd::exp_f64;

/// Values per chunk: 8 KB of f64, which stays in L1 between the max and the sum pass.
pub const CHUNK: usize = 1024;

/// Independent accumulators per pass: enough for the compiler to fill AVX-512 registers.
const LANES: usize = 8;

/// The state of an online log-sum-exp: sum exp(x - max) over the values seen so far.
#[derive(Debug, Clone, Copy)]
pub struct OnlineLse {
    max: f64,
    sum: f64,
    /// Sum of x * 0 over every value: 0 while all are finite, NaN after any inf or NaN (a
    /// vectorisable check that costs one add per value).
    probe: f64,
}

impl Default for OnlineLse {
    fn default() -> Self {
        OnlineLse { max: f64::NEG_INFINITY, sum: 0.0, probe: 0.0 }
    }
}

impl OnlineLse {
    /// Adds a chunk of values (any length).
    #[inline(always)]
    pub fn push<const FMA: bool>(&mut self, chunk: &[f64]) {
        if chunk.is_empty() {
            return;
        }
        let m = chunk_max(chunk);
        let (s, probe) = chunk_sum_exp::<FMA>(chunk, m);
        self.probe += probe;
        if m > self.max {
            self.sum = self.sum * (self.max - m).exp() + s;
            self.max = m;
        } else {
            self.sum += s * (m - self.max).exp();
        }
    }

    /// Whether every value pushed was finite.
    pub fn all_finite(&self) -> bool {
        self.probe == 0.0
    }

    /// log(sum exp(x)) over the values pushed; -inf for none.
    pub fn value(&self) -> f64 {
        self.max + self.sum.ln()
    }
}

/// Max of a non-empty slice; NaN values are skipped (the probe reports them).
#[inline(always)]
fn chunk_max(x: &[f64]) -> f64 {
    let mut acc = [f64::NEG_INFINITY; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = f64::NEG_INFINITY;
    for &v in acc.iter().chain(blocks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// (sum exp(x - m), sum x * 0) over a slice, summed lane by lane in a fixed order.
#[inline(always)]
fn chunk_sum_exp<const FMA: bool>(x: &[f64], m: f64) -> (f64, f64) {
    let mut sums = [0.0; LANES];
    let mut probes = [0.0; LANES];
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for k in 0..LANES {
            sums[k] += exp_f64::<FMA>(block[k] - m);
            probes[k] += block[k] * 0.0;
        }
    }
    for (k, &v) in blocks.remainder().iter().enumerate() {
        sums[k] += exp_f64::<FMA>(v - m);
        probes[k] += v * 0.0;
    }
    (sums.iter().sum(), probes.iter().sum())
}

/// f32 values per chunk of [`lanes::lse_f32`]: 8 KB, which stays in L1 between the chunk's max
/// pass and its exp pass.
pub const F32_CHUNK: usize = 2048;

/// The log-sum-exp of rows read as f32 lanes, with AVX2 and FMA (x86-64 only; callers check the
/// CPU). Same online rule as [`OnlineLse`] and the same f64 accumulation, but faster:
///
/// * values are read as f32 (8 per vector) for the max pass and widened to f64 only in registers
///   (no f64 staging buffer), 4 lanes at a time, for the exp pass;
/// * the reference of the exp pass is the running max M (not the chunk's), so a chunk costs no
///   scalar exp unless it raises M;
/// * e^d (d = x - M <= 0, in f64) is 2^(k/4) · e^r with k = round(4 d / ln 2), r = d - k ln2/4,
///   |r| <= ln2/8: 2^(j/4) (j = k mod 4) from a 4-entry table (one in-register permute), 2^(k>>2)
///   added to its exponent bits, e^r by its Taylor polynomial of degree 8, whose truncation error
///   r^9/9! is below 7.7e-16 relative; with the rounding of the table and the Horner steps each
///   e^d is within 1.3e-15 relative of e^d (tested), so the sum is, and the log-sum-exp within
///   1.3e-15 absolute. d is clamped at -700 first (e^-700 < 1e-304: a vocabulary of any size
///   moves a sum >= 1 by nothing measurable), which keeps 2^k a normal number.
#[cfg(target_arch = "x86_64")]
pub(crate) mod lanes {
    use std::arch::x86_64::*;

    use super::F32_CHUNK;
    use crate::stack::Real;

    /// log(sum exp(x)) over `row` and whether every value was finite (the value is meaningless
    /// when not), or None when `T` has no f32 view ([`Real::as_f32`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn lse_f32<T: Real>(row: &[T]) -> Option<(f64, bool)> {
        // Room to convert narrower types into (f32 rows are read in place); short rows need
        // less than a chunk, and zeroing 8 KB would cost them more than their exps.
        let (mut short, mut long);
        let buf: &mut [f32] = if row.len() <= 64 {
            short = [0.0f32; 64];
            &mut short
        } else {
            long = [0.0f32; F32_CHUNK];
            &mut long
        };
        let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0f64);
        for chunk in row.chunks(F32_CHUNK) {
            let x = T::as_f32(chunk, buf)?;
            let (m, low, finite) = max_and_check(x);
            if !finite {
                return Some((f64::NAN, false));
            }
            let m = f64::from(m);
            if m > max {
                sum *= (max - m).exp(); // 0 * e^-inf = 0 on the first chunk
                max = m;
            }
            // The clamp at MIN_D changes nothing when no value lies that far below the max: skip
            // it then (the same bits, one operation less per 4 values).
            sum += if f64::from(low) - max >= MIN_D { sum_exp::<false>(x, max) } else { sum_exp::<true>(x, max) };
        }
        Some((max + sum.ln(), true))
    }

    /// (max, min, every value finite) of a chunk, 8 f32 lanes times 4 accumulators. A NaN may
    /// be skipped by the max and min; the check (sums of x * 0, NaN after any inf or NaN)
    /// reports it.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max_and_check(x: &[f32]) -> (f32, f32, bool) {
        let (n, p) = (x.len(), x.as_ptr());
        let zero = _mm256_setzero_ps();
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut low = [_mm256_set1_ps(f32::INFINITY); 4];
        let mut probe = [zero; 4];
        let mut i = 0;
        while i + 32 <= n {
            for u in 0..4 {
                // SAFETY: i + 8u + 8 <= n, inside the slice.
                let v = _mm256_loadu_ps(p.add(i + 8 * u));
                m[u] = _mm256_max_ps(m[u], v);
                low[u] = _mm256_min_ps(low[u], v);
                probe[u] = _mm256_fmadd_ps(v, zero, probe[u]);
            }
            i += 32;
        }
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let low = _mm256_min_ps(_mm256_min_ps(low[0], low[1]), _mm256_min_ps(low[2], low[3]));
        let probe = _mm256_add_ps(_mm256_add_ps(probe[0], probe[1]), _mm256_add_ps(probe[2], probe[3]));
        let (mut ms, mut ls, mut ps) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(ms.as_mut_ptr(), m);
        _mm256_storeu_ps(ls.as_mut_ptr(), low);
        _mm256_storeu_ps(ps.as_mut_ptr(), probe);
        let mut max = ms.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        let mut min = ls.iter().fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
        let mut check: f32 = ps.iter().sum();
        for &v in &x[i..] {
            max = if v > max { v } else { max };
            min = if v < min { v } else { min };
            check += v * 0.0;
        }
        (max, min, check == 0.0 && max.is_finite())
    }

    /// sum exp(x - m) over a chunk of finite values <= m, in f64: [`UNROLL`] accumulators of 4
    /// lanes, combined in a fixed order; the tail (< 4 UNROLL values) through
    /// [`crate::simd::exp_f64`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_exp<const CLAMP: bool>(x: &[f32], m: f64) -> f64 {
        let (n, p) = (x.len(), x.as_ptr());
        let mv = _mm256_set1_pd(m);
        let mut acc = [_mm256_setzero_pd(); UNROLL];
        let mut i = 0;
        while i + 4 * UNROLL <= n {
            // The next chunk (or row), one cache line per step (4 UNROLL = 16 values = 64
            // bytes), so its max pass finds it in L1 rather than waiting on memory. A prefetch
            // never faults, even past the end of the row.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + F32_CHUNK) as *const i8);
            let mut d = [_mm256_setzero_pd(); UNROLL];
            for (u, du) in d.iter_mut().enumerate() {
                // SAFETY: i + 4u + 4 <= n, inside the slice.
                *du = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p.add(i + 4 * u))), mv);
            }
            for (a, e) in acc.iter_mut().zip(exp4::<UNROLL, CLAMP>(d)) {
                *a = _mm256_add_pd(*a, e);
            }
            i += 4 * UNROLL;
        }
        let mut total = acc[0];
        for a in &acc[1..] {
            total = _mm256_add_pd(total, *a);
        }
        let mut lanes = [0.0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), total);
        let mut sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        for &v in &x[i..] {
            sum += crate::simd::exp_f64::<true>(f64::from(v) - m);
        }
        sum
    }

    /// Vectors of 4 lanes that [`exp4`] computes side by side: independent chains for the
    /// out-of-order core to overlap (one e^d is a chain of ~15 dependent operations).
    const UNROLL: usize = 4;

    /// Below this e^d is taken as e^-700 (see the module notes).
    const MIN_D: f64 = -700.0;
    /// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    /// ln 2 / 4 in two parts (the Cody-Waite split of `crate::simd`, divided by 4: exact).
    const LN2_4_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000) / 4.0;
    const LN2_4_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76) / 4.0;
    /// 2^(j/4), j = 0..3.
    const TABLE: [f64; 4] = [1.0, 1.189_207_115_002_721, std::f64::consts::SQRT_2, 1.681_792_830_507_429];
    /// 1/k!, k = 8 down to 0.
    const TAYLOR: [f64; 9] =
        [1.0 / 40_320.0, 1.0 / 5_040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

    /// e^d for [`UNROLL`] vectors of 4 lanes of d <= 0 (see the module notes), each step applied
    /// to every vector before the next; NaN stays NaN. Without `CLAMP` every d must be >= MIN_D.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp4<const U: usize, const CLAMP: bool>(d: [__m256d; U]) -> [__m256d; U] {
        let each = |f: &dyn Fn(usize) -> __m256d| -> [__m256d; U] { std::array::from_fn(f) };
        // max returns its second operand when either is NaN: a NaN d is kept.
        let d = if CLAMP { each(&|u| _mm256_max_pd(_mm256_set1_pd(MIN_D), d[u])) } else { d };
        let t = each(&|u| _mm256_fmadd_pd(d[u], _mm256_set1_pd(4.0 * std::f64::consts::LOG2_E), _mm256_set1_pd(SHIFT)));
        let k = each(&|u| _mm256_sub_pd(t[u], _mm256_set1_pd(SHIFT)));
        let r = each(&|u| _mm256_fnmadd_pd(k[u], _mm256_set1_pd(LN2_4_HI), d[u]));
        let r = each(&|u| _mm256_fnmadd_pd(k[u], _mm256_set1_pd(LN2_4_LO), r[u]));
        // Estrin's scheme (fewer dependent steps than Horner's: the core overlaps more):
        // p = (c0 + c1 r + (c2 + c3 r) r²) + r⁴ ((c4 + c5 r + (c6 + c7 r) r²) + c8 r⁴).
        let c = |i: usize| _mm256_set1_pd(TAYLOR[8 - i]);
        let r2 = each(&|u| _mm256_mul_pd(r[u], r[u]));
        let r4 = each(&|u| _mm256_mul_pd(r2[u], r2[u]));
        let low = each(&|u| {
            let a = _mm256_fmadd_pd(c(1), r[u], c(0));
            let b = _mm256_fmadd_pd(c(3), r[u], c(2));
            _mm256_fmadd_pd(b, r2[u], a)
        });
        let high = each(&|u| {
            let a = _mm256_fmadd_pd(c(5), r[u], c(4));
            let b = _mm256_fmadd_pd(c(7), r[u], c(6));
            _mm256_fmadd_pd(c(8), r4[u], _mm256_fmadd_pd(b, r2[u], a))
        });
        let poly = each(&|u| _mm256_fmadd_pd(high[u], r4[u], low[u]));
        // t's low mantissa bits hold k (two's complement). Table entry j = k mod 4: as f32 pairs
        // (2j, 2j + 1) of the table seen as 8 floats.
        let table = _mm256_loadu_ps(TABLE.as_ptr() as *const f32);
        each(&|u| {
            let bits = _mm256_castpd_si256(t[u]);
            let pairs = _mm256_shuffle_epi32::<0b10_10_00_00>(_mm256_slli_epi64::<1>(bits));
            let index = _mm256_or_si256(pairs, _mm256_set_epi32(1, 0, 1, 0, 1, 0, 1, 0));
            let entry = _mm256_castps_si256(_mm256_permutevar8x32_ps(table, index));
            // (k >> 2) << 52 (bits 2.. of k into the exponent field, modulo 2^64), added to 2^(j/4).
            let exponent =
                _mm256_and_si256(_mm256_slli_epi64::<50>(bits), _mm256_set1_epi64x(0xFFF0_0000_0000_0000u64 as i64));
            _mm256_mul_pd(poly[u], _mm256_castsi256_pd(_mm256_add_epi64(entry, exponent)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_lse(x: &[f64]) -> f64 {
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn chunked_online_lse_matches_two_passes() {
        for len in [1, 7, 8, 9, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            // Values whose max sits in different chunks, with a wide dynamic range.
            let x: Vec<f64> = (0..len)
                .map(|i| ((i * 7919 % 1009) as f64 - 500.0) * 0.1 + if i == len / 2 { 30.0 } else { 0.0 })
                .collect();
            let mut lse = OnlineLse::default();
            for chunk in x.chunks(CHUNK) {
                lse.push::<false>(chunk);
            }
            assert!(lse.all_finite());
            let want = naive_lse(&x);
            assert!((lse.value() - want).abs() <= 1e-13 * want.abs().max(1.0), "len {len}: {} vs {want}", lse.value());
        }
    }

    #[test]
    fn non_finite_values_are_reported() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut x = vec![0.5; 100];
            x[37] = bad;
            let mut lse = OnlineLse::default();
            lse.push::<false>(&x);
            assert!(!lse.all_finite(), "{bad}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp4_is_within_1_3e_15_of_exp() {
        use std::arch::x86_64::*;
        if !avx2() {
            return;
        }
        let mut worst = 0.0f64;
        let mut d = -700.0f64;
        while d <= 0.0 {
            let x = [d, d * 0.5, d * 1e-3, -d.abs().sqrt()];
            let mut got = [0.0f64; 4];
            // SAFETY: avx2 and fma checked above.
            unsafe { _mm256_storeu_pd(got.as_mut_ptr(), lanes::exp4::<1, true>([_mm256_loadu_pd(x.as_ptr())])[0]) };
            for (g, v) in got.iter().zip(x) {
                worst = worst.max(((g - v.exp()) / v.exp()).abs());
            }
            d += 0.000_731;
        }
        assert!(worst < 1.3e-15, "worst relative error {worst:e}");
        let special = [0.0, -1e300, f64::NEG_INFINITY, f64::NAN];
        let mut got = [0.0f64; 4];
        // SAFETY: as above.
        unsafe { _mm256_storeu_pd(got.as_mut_ptr(), lanes::exp4::<1, true>([_mm256_loadu_pd(special.as_ptr())])[0]) };
        assert_eq!(got[0], 1.0);
        assert!(got[1] > 0.0 && got[1] < 1e-303 && got[2] == got[1] && got[3].is_nan(), "{got:?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f32_lanes_match_the_f64_online_lse() {
        if !avx2() {
            return;
        }
        for len in [1, 5, 15, 16, 17, 31, 33, F32_CHUNK - 1, F32_CHUNK, F32_CHUNK + 1, 3 * F32_CHUNK + 37] {
            for (scale, peak) in [(0.1f32, 30.0f32), (3.0, 0.0), (1e4, 0.0), (3e37, 3e38)] {
                let x: Vec<f32> = (0..len)
                    .map(|i| {
                        ((i * 7919 % 1009) as f32 - 500.0) / 500.0 * scale + if i == len * 2 / 3 { peak } else { 0.0 }
                    })
                    .collect();
                let wide: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                let want = naive_lse(&wide);
                // SAFETY: avx2 and fma checked above.
                let (got, finite) = unsafe { lanes::lse_f32(&x) }.unwrap();
                assert!(finite);
                assert!((got - want).abs() <= 2e-15 * want.abs().max(1.0), "len {len} scale {scale}: {got} vs {want}");
                let halves: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
                if halves.iter().all(|h| h.is_finite()) {
                    let back: Vec<f64> = halves.iter().map(|h| h.to_f64()).collect();
                    // SAFETY: as above.
                    let (got, _) = unsafe { lanes::lse_f32(&halves) }.unwrap();
                    let want = naive_lse(&back);
                    assert!((got - want).abs() <= 2e-15 * want.abs().max(1.0), "f16 len {len}");
                }
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = vec![0.25f32; len];
                x[len / 2] = bad;
                // SAFETY: as above.
                assert!(!unsafe { lanes::lse_f32(&x) }.unwrap().1, "{bad} at {} of {len}", len / 2);
            }
        }
        // SAFETY: as above. f64 has no f32 view.
        assert!(unsafe { lanes::lse_f32(&[0.5f64]) }.is_none());
    }

    #[test]
    fn extreme_magnitudes_do_not_overflow() {
        let x = [1e300, -1e300, 0.0, 1e300];
        let mut lse = OnlineLse::default();
        lse.push::<false>(&x);
        assert!((lse.value() - (1e300 + 2f64.ln())).abs() <= 1e285);
        assert!(lse.all_finite());
    }
}
