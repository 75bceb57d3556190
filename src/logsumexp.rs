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

/// f32 values per chunk of [`lanes::lse_f32`]: ~16 KB, which stays in L1 (32 KB on Zen 3) between
/// the chunk's max pass and its exp pass; a multiple of the exp loop's block of 24 values, so that
/// only a row's last chunk has a tail. (Measured: 4-5% faster than 8 KB chunks, which switch
/// between the two passes twice as often.)
pub const F32_CHUNK: usize = 4080;

/// The log-sum-exp of rows read as f32 lanes, with AVX2 and FMA (x86-64 only; callers check the
/// CPU). Same online rule as [`OnlineLse`] and the same f64 accumulation, but faster:
///
/// * values are read as f32 (8 per vector) for the max pass and widened to f64 only in registers
///   (no f64 staging buffer), 4 lanes at a time, for the exp pass;
/// * the reference of the exp pass is the running max M (not the chunk's), so a chunk costs no
///   scalar exp unless it raises M;
/// * e^d (d = x - M <= 0, in f64) is 2^k · e^r with k = round(d / ln 2), r = d - k ln 2 (two-FMA
///   Cody-Waite: r is exact up to one rounding), |r| <= ln2/2; 2^k is added to the exponent bits
///   of e^r (no table, no multiply), and e^r is a degree-10 polynomial fitted for least maximum
///   relative error on |r| <= ln2/2 with p(0) = 1 exactly (`lanes::POLY`), by Horner's scheme.
///   Its error is below 2.3e-16 relative; with the rounding of r (< 3e-17) and of the Horner
///   steps (< 1.6e-16) each e^d is within 4.5e-16 of e^d (4.0e-16 measured against libm; the
///   test holds it to 1.3e-15), so the sum is, up to the rounding of its own f64 additions, and
///   the log-sum-exp as close in absolute terms. d is clamped at -700 first (e^-700 < 1e-304: a
///   vocabulary of any size moves a sum >= 1 by nothing measurable), which keeps 2^k a normal
///   number.
///
/// The exp pass runs as inline assembly (`lanes::sum_exp`), 6 vectors (24 values) per step with
/// every register placed by hand: per 4 values it issues 13 FMAs (the bound: Zen 3 has two FMA
/// pipes, so 1.6 cycles per value; measured ~1.9 from L1) and ~8 other vector operations, with
/// each constant loaded once per step for all 6 vectors. The same arithmetic written with
/// intrinsics (`lanes::exp4`, used for the tails and tested against libm) compiles to ~1.5x the
/// instructions (LLVM re-broadcasts constants from memory and spills) and runs ~1.5x slower.
/// Both give the same bits for every finite d (the same operations in the same order; tested).
///
/// Not used, measured on Zen 3: the previous kernel's 4-entry table of 2^(j/4) (degree 7 would
/// do, but its `vpermd` takes two FMA-pipe slots, so 13 FMA-pipe operations again, plus 6
/// integer ones); more vectors per step (7: no gain; 8: the registers run out and r must be
/// read from memory, 25% slower); the next chunk's max taken inside this loop (no gain).
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
        // Room to convert narrower types into; short rows need less than a chunk, and zeroing
        // 16 KB would cost them more than their exps. f32 rows are read in place (`as_f32`
        // ignores the buffer): they get none.
        let (mut short, mut long);
        let buf: &mut [f32] = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            &mut []
        } else if row.len() <= 64 {
            short = [0.0f32; 64];
            &mut short
        } else {
            long = [0.0f32; F32_CHUNK];
            &mut long
        };
        let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0f64);
        for chunk in row.chunks(F32_CHUNK) {
            let x = T::as_f32(chunk, buf)?;
            let (m, low) = max_and_min(x);
            // ±inf shows in the max or the min; a NaN (which they skip) turns the sum into NaN.
            if !(m.is_finite() && low.is_finite()) {
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
        Some((max + sum.ln(), !sum.is_nan()))
    }

    /// (max, min) of a chunk, 8 f32 lanes times 4 accumulators; NaN values are skipped (the exp
    /// pass reports them), and an all-NaN chunk gives (-inf, inf). Two operations per 8 values:
    /// the exp pass costs ~50 times more.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max_and_min(x: &[f32]) -> (f32, f32) {
        let (n, p) = (x.len(), x.as_ptr());
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut low = [_mm256_set1_ps(f32::INFINITY); 4];
        let mut i = 0;
        while i + 32 <= n {
            for u in 0..4 {
                // SAFETY: i + 8u + 8 <= n, inside the slice.
                let v = _mm256_loadu_ps(p.add(i + 8 * u));
                // max and min return their second operand when either is NaN: with v second a
                // NaN lane would replace the accumulator (and lose the max so far); with the
                // accumulator second it is skipped.
                m[u] = _mm256_max_ps(v, m[u]);
                low[u] = _mm256_min_ps(v, low[u]);
            }
            i += 32;
        }
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let low = _mm256_min_ps(_mm256_min_ps(low[0], low[1]), _mm256_min_ps(low[2], low[3]));
        let (mut ms, mut ls) = ([0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(ms.as_mut_ptr(), m);
        _mm256_storeu_ps(ls.as_mut_ptr(), low);
        let mut max = ms.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        let mut min = ls.iter().fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
        for &v in &x[i..] {
            max = if v > max { v } else { max };
            min = if v < min { v } else { min };
        }
        (max, min)
    }

    /// Values per step of the assembly loop in [`sum_exp`]: 6 vectors of 4 lanes.
    pub(crate) const BLOCK: usize = 24;

    /// sum exp(x - m) over a chunk of values <= m (NaN allowed: it makes the sum NaN), in f64.
    /// Without `CLAMP` every x - m must be >= MIN_D. Blocks of [`BLOCK`] values go through the
    /// assembly loop (6 vectors, each summed into one of two accumulators: vectors 0, 2, 4 and
    /// 1, 3, 5), the rest 4 at a time through [`exp4`] and then one at a time through
    /// [`crate::simd::exp_f64`]; the order is fixed by the length alone.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sum_exp<const CLAMP: bool>(x: &[f32], m: f64) -> f64 {
        let blocks = x.len() / BLOCK;
        let mut acc = [_mm256_setzero_pd(); 2];
        if blocks > 0 {
            // SAFETY: AVX2 and FMA (the caller's contract); the loop reads blocks * BLOCK values
            // of x and writes only `scratch`.
            unsafe { exp_blocks::<CLAMP>(x.as_ptr(), blocks, m, &mut acc) };
        }
        let mut total = _mm256_add_pd(acc[0], acc[1]);
        let mut i = blocks * BLOCK;
        let mv = _mm256_set1_pd(m);
        while i + 4 <= x.len() {
            // SAFETY: i + 4 <= len, inside the slice.
            let d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i))), mv);
            total = _mm256_add_pd(total, exp4::<1, CLAMP>([d])[0]);
            i += 4;
        }
        let mut lanes = [0.0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), total);
        let mut sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        for &v in &x[i..] {
            sum += crate::simd::exp_f64::<true>(f64::from(v) - m);
        }
        sum
    }

    /// Below this e^d is taken as e^-700 (see the module notes).
    const MIN_D: f64 = -700.0;
    /// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    /// ln 2 in two parts, the Cody-Waite split of `crate::simd`: LN2_HI has 21 trailing zero
    /// bits, so k · LN2_HI and d - k · LN2_HI are exact for |k| < 2^11 (|d| <= 700 gives
    /// |k| <= 1010).
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    /// p(r) = 1 + c1 r + ... + c10 r^10 ≈ e^r on |r| <= ln2/2, coefficients c10 down to c0 = 1.
    /// Computed for this kernel by `tools/exp_minimax.py` (which prints these lines): the Remez
    /// exchange algorithm on the relative error |p(r) e^-r - 1| with c0 fixed at 1 (so e^0 is
    /// exactly 1), in 60-digit arithmetic (mpmath), then rounded to f64. The equioscillation
    /// level is 2.20e-16, 2.29e-16 with the rounded coefficients (on 20001 points); degree 9
    /// would give 1.5e-14. Taylor's 1/k! would need degree 12 for the same error.
    const POLY: [f64; 11] = [
        f64::from_bits(0x3E92_7315_E248_7DFE), // c10 ≈ 2.7491976e-7  (1/10! = 2.7557319e-7)
        f64::from_bits(0x3EC7_2F78_5958_C47B), // c9  ≈ 2.7639187e-6  (1/9!  = 2.7557319e-6)
        f64::from_bits(0x3EFA_01B5_9C72_618F), // c8  ≈ 2.4801900e-5
        f64::from_bits(0x3F2A_0197_CA69_1721), // c7  ≈ 1.9841173e-4
        f64::from_bits(0x3F56_C16C_0CDD_3220), // c6  ≈ 1.3888889e-3
        f64::from_bits(0x3F81_1111_12C5_6A3A), // c5  ≈ 8.3333334e-3
        f64::from_bits(0x3FA5_5555_5558_B62D), // c4  ≈ 4.1666667e-2
        f64::from_bits(0x3FC5_5555_5554_C5BF), // c3  ≈ 0.16666667
        f64::from_bits(0x3FDF_FFFF_FFFF_FE94), // c2  ≈ 0.5 - 2.0e-14
        f64::from_bits(0x3FF0_0000_0000_0019), // c1  ≈ 1 + 5.6e-15
        1.0,                                   // c0
    ];

    /// e^d for `U` vectors of 4 lanes of d <= 0 (see the module notes), each step applied
    /// to every vector before the next; NaN stays NaN. Without `CLAMP` every d must be >= MIN_D.
    /// The arithmetic of [`exp_blocks`], operation for operation.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp4<const U: usize, const CLAMP: bool>(d: [__m256d; U]) -> [__m256d; U] {
        let each = |f: &dyn Fn(usize) -> __m256d| -> [__m256d; U] { std::array::from_fn(f) };
        // max returns its second operand when either is NaN: a NaN d is kept.
        let d = if CLAMP { each(&|u| _mm256_max_pd(_mm256_set1_pd(MIN_D), d[u])) } else { d };
        let t = each(&|u| _mm256_fmadd_pd(d[u], _mm256_set1_pd(std::f64::consts::LOG2_E), _mm256_set1_pd(SHIFT)));
        let k = each(&|u| _mm256_sub_pd(t[u], _mm256_set1_pd(SHIFT)));
        let r = each(&|u| _mm256_fnmadd_pd(k[u], _mm256_set1_pd(LN2_HI), d[u]));
        let r = each(&|u| _mm256_fnmadd_pd(k[u], _mm256_set1_pd(LN2_LO), r[u]));
        let mut p = each(&|_| _mm256_set1_pd(POLY[0]));
        for &c in &POLY[1..] {
            p = each(&|u| _mm256_fmadd_pd(p[u], r[u], _mm256_set1_pd(c)));
        }
        each(&|u| {
            // t's low mantissa bits hold k (two's complement): k << 52 added to p's bits is the
            // product p · 2^k, exact while it stays normal (p >= 0.7 and k >= -1010).
            let e = _mm256_add_epi64(_mm256_castpd_si256(p[u]), _mm256_slli_epi64::<52>(_mm256_castpd_si256(t[u])));
            // A NaN d whose low mantissa bits are set (never one widened from f32, whose low 29
            // bits are 0) would shift them into e's exponent: return such d as it is.
            _mm256_blendv_pd(_mm256_castsi256_pd(e), d[u], _mm256_cmp_pd::<_CMP_UNORD_Q>(d[u], d[u]))
        })
    }

    /// Every constant of the assembly loop as a full vector (32-byte aligned), read with
    /// `vmovapd` into ymm12 once per step and shared by the step's 6 vectors.
    #[repr(C, align(32))]
    struct Consts {
        min_d: [f64; 4],
        log2e: [f64; 4],
        shift: [f64; 4],
        ln2_hi: [f64; 4],
        ln2_lo: [f64; 4],
        poly: [[f64; 4]; 11],
    }

    const fn splat_poly() -> [[f64; 4]; 11] {
        let mut out = [[0.0; 4]; 11];
        let mut i = 0;
        while i < 11 {
            out[i] = [POLY[i]; 4];
            i += 1;
        }
        out
    }

    static CONSTS: Consts = Consts {
        min_d: [MIN_D; 4],
        log2e: [std::f64::consts::LOG2_E; 4],
        shift: [SHIFT; 4],
        ln2_hi: [LN2_HI; 4],
        ln2_lo: [LN2_LO; 4],
        poly: splat_poly(),
    };

    /// `$step` for each of the 6 vectors of a step: its d/r register, its t/k/p register, the
    /// byte offset of its 4 f32 in the block, the byte offset of its slot in `scratch`.
    macro_rules! each_vector {
        ($step:ident) => {
            concat!(
                $step!("ymm0", "ymm1", "0", "0"),
                $step!("ymm2", "ymm3", "16", "32"),
                $step!("ymm4", "ymm5", "32", "64"),
                $step!("ymm6", "ymm7", "48", "96"),
                $step!("ymm8", "ymm9", "64", "128"),
                $step!("ymm10", "ymm11", "80", "160"),
            )
        };
    }
    /// ymm12 = a constant of [`Consts`], by the name of its byte-offset operand.
    macro_rules! constant {
        ($off:literal) => {
            concat!("vmovapd ymm12, ymmword ptr [{c} + {", $off, "}]\n")
        };
    }
    // d = x - M (M in ymm13).
    macro_rules! load {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vcvtps2pd ", $d, ", xmmword ptr [{x} + ", $x, "]\n", "vsubpd ", $d, ", ", $d, ", ymm13\n")
        };
    }
    // d = max(MIN_D, d): NaN d kept (the second operand is returned when either is NaN).
    macro_rules! clamp {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vmaxpd ", $d, ", ymm12, ", $d, "\n")
        };
    }
    // p = ymm12 (a register copy: renamed away, no execution port).
    macro_rules! copy {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vmovapd ", $p, ", ymm12\n")
        };
    }
    // p = d · p + ymm12: t = d log2(e) + SHIFT, then each Horner step p = p r + c.
    macro_rules! fma {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vfmadd213pd ", $p, ", ", $d, ", ymm12\n")
        };
    }
    // scratch = t << 52, the exponent bits of 2^k (ymm12 is free here and reloaded after).
    macro_rules! exponent {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vpsllq ymm12, ", $p, ", 52\n", "vmovdqa ymmword ptr [{scratch} + ", $s, "], ymm12\n")
        };
    }
    // k = t - SHIFT.
    macro_rules! sub {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vsubpd ", $p, ", ", $p, ", ymm12\n")
        };
    }
    // r = r - k · ymm12 (Cody-Waite, the high then the low part of ln 2).
    macro_rules! reduce {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vfnmadd231pd ", $d, ", ", $p, ", ymm12\n")
        };
    }
    // e = p · 2^k: the exponent bits added to p's.
    macro_rules! scale {
        ($d:literal, $p:literal, $x:literal, $s:literal) => {
            concat!("vpaddq ", $p, ", ", $p, ", ymmword ptr [{scratch} + ", $s, "]\n")
        };
    }
    /// The loop over blocks: each step does one operation for all 6 vectors before the next,
    /// so 6 independent chains are in flight, and sums them into ymm14 (vectors 0, 2, 4) and
    /// ymm15 (1, 3, 5). Registers: vector v holds d, then r, in ymm(2v) and t, k, then p in
    /// ymm(2v + 1); ymm12 the current constant, ymm13 the max M.
    #[rustfmt::skip]
    macro_rules! exp_loop {
        ($clamp:expr) => {
            concat!(
                "2:\n",
                each_vector!(load),
                $clamp,
                constant!("log2e"), each_vector!(copy),
                constant!("shift"), each_vector!(fma), each_vector!(exponent),
                constant!("shift"), each_vector!(sub),
                constant!("ln2_hi"), each_vector!(reduce),
                constant!("ln2_lo"), each_vector!(reduce),
                constant!("c10"), each_vector!(copy),
                constant!("c9"), each_vector!(fma),
                constant!("c8"), each_vector!(fma),
                constant!("c7"), each_vector!(fma),
                constant!("c6"), each_vector!(fma),
                constant!("c5"), each_vector!(fma),
                constant!("c4"), each_vector!(fma),
                constant!("c3"), each_vector!(fma),
                constant!("c2"), each_vector!(fma),
                constant!("c1"), each_vector!(fma),
                constant!("c0"), each_vector!(fma),
                each_vector!(scale),
                "vaddpd ymm14, ymm14, ymm1\n",
                "vaddpd ymm15, ymm15, ymm3\n",
                "vaddpd ymm14, ymm14, ymm5\n",
                "vaddpd ymm15, ymm15, ymm7\n",
                "vaddpd ymm14, ymm14, ymm9\n",
                "vaddpd ymm15, ymm15, ymm11\n",
                // The next chunk (or row), so its max pass finds it in L1 rather than waiting on
                // memory: the two cache lines one chunk ahead of this block's 96 bytes. A
                // prefetch never faults, even past the end of the row.
                "prefetcht0 byte ptr [{x} + {ahead}]\n",
                "prefetcht0 byte ptr [{x} + {ahead} + 64]\n",
                "add {x}, 96\n",
                "cmp {x}, {end}\n",
                "jne 2b\n",
            )
        };
    }

    /// acc[0] += the e^(x - m) of vectors 0, 2, 4 of each block, acc[1] += those of 1, 3, 5,
    /// over `blocks` (>= 1) blocks of [`BLOCK`] values from `x` (see [`exp_loop`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` must be valid for reading blocks * BLOCK f32 values;
    /// without `CLAMP` every x - m must be >= MIN_D.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_blocks<const CLAMP: bool>(x: *const f32, blocks: usize, m: f64, acc: &mut [__m256d; 2]) {
        const _: () = assert!(BLOCK == 24 && F32_CHUNK % BLOCK == 0);
        use std::mem::offset_of;
        const POLY_AT: usize = offset_of!(Consts, poly);
        // The exponent bits of the step's 6 vectors, stored between the rounding and the end.
        #[repr(C, align(32))]
        struct Scratch([u64; 24]);
        let mut scratch = Scratch([0; 24]);
        let mv = _mm256_set1_pd(m);
        let [mut a0, mut a1] = *acc;
        // SAFETY: the caller's contract; the loop reads [x, x + blocks * BLOCK) and the constants,
        // and writes only `scratch`; every vector register it uses is declared.
        unsafe {
            macro_rules! run {
                ($clamp:expr) => {
                    std::arch::asm!(
                        exp_loop!($clamp),
                        x = inout(reg) x => _,
                        end = in(reg) x.add(blocks * BLOCK),
                        c = in(reg) &CONSTS,
                        scratch = in(reg) scratch.0.as_mut_ptr(),
                        ahead = const F32_CHUNK * 4,
                        min_d = const offset_of!(Consts, min_d),
                        log2e = const offset_of!(Consts, log2e),
                        shift = const offset_of!(Consts, shift),
                        ln2_hi = const offset_of!(Consts, ln2_hi),
                        ln2_lo = const offset_of!(Consts, ln2_lo),
                        c10 = const POLY_AT,
                        c9 = const POLY_AT + 32,
                        c8 = const POLY_AT + 64,
                        c7 = const POLY_AT + 96,
                        c6 = const POLY_AT + 128,
                        c5 = const POLY_AT + 160,
                        c4 = const POLY_AT + 192,
                        c3 = const POLY_AT + 224,
                        c2 = const POLY_AT + 256,
                        c1 = const POLY_AT + 288,
                        c0 = const POLY_AT + 320,
                        in("ymm13") mv,
                        inout("ymm14") a0,
                        inout("ymm15") a1,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _,
                        options(nostack),
                    )
                };
            }
            if CLAMP {
                run!(concat!(constant!("min_d"), each_vector!(clamp)));
            } else {
                // (The operand must appear in the template.)
                run!("/* no clamp: {min_d} */\n");
            }
        }
        *acc = [a0, a1];
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

    /// sum_exp's assembly loop against the same sum built from [`lanes::exp4`] (the function
    /// the accuracy test checks), in the same order: the same bits, clamped or not, at every
    /// length around the block size.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn assembly_exp_loop_matches_exp4_bit_for_bit() {
        use std::arch::x86_64::*;
        if !avx2() {
            return;
        }
        // SAFETY (both): avx2 and fma checked above; loads stay inside `x`.
        unsafe fn reference<const CLAMP: bool>(x: &[f32], m: f64) -> f64 {
            let mv = _mm256_set1_pd(m);
            let exp = |i: usize| unsafe {
                let d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i))), mv);
                lanes::exp4::<1, CLAMP>([d])[0]
            };
            let blocks = x.len() / lanes::BLOCK;
            let mut acc = [_mm256_setzero_pd(); 2];
            for b in 0..blocks {
                for v in 0..6 {
                    acc[v % 2] = _mm256_add_pd(acc[v % 2], exp(b * lanes::BLOCK + 4 * v));
                }
            }
            let mut total = _mm256_add_pd(acc[0], acc[1]);
            let mut i = blocks * lanes::BLOCK;
            while i + 4 <= x.len() {
                total = _mm256_add_pd(total, exp(i));
                i += 4;
            }
            let mut l = [0.0f64; 4];
            _mm256_storeu_pd(l.as_mut_ptr(), total);
            let mut sum = (l[0] + l[1]) + (l[2] + l[3]);
            for &v in &x[i..] {
                sum += crate::simd::exp_f64::<true>(f64::from(v) - m);
            }
            sum
        }
        for len in [1, 3, 4, 23, 24, 25, 47, 48, 100, F32_CHUNK - 1, F32_CHUNK] {
            for (scale, low) in [(0.5f32, 0.0f32), (40.0, 0.0), (3.0, -2000.0)] {
                let x: Vec<f32> = (0..len)
                    .map(|i| ((i * 7919 % 1009) as f32 - 1008.0) / 1008.0 * scale + if i % 7 == 3 { low } else { 0.0 })
                    .collect();
                let m = f64::from(x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))) + 0.25;
                // SAFETY: as above.
                let (got, want) = unsafe { (lanes::sum_exp::<true>(&x, m), reference::<true>(&x, m)) };
                assert_eq!(got.to_bits(), want.to_bits(), "clamped, len {len} scale {scale} low {low}");
                if low == 0.0 {
                    // SAFETY: as above; every x - m >= -81 > MIN_D.
                    let (got, want) = unsafe { (lanes::sum_exp::<false>(&x, m), reference::<false>(&x, m)) };
                    assert_eq!(got.to_bits(), want.to_bits(), "len {len} scale {scale}");
                }
            }
            let mut x = vec![0.0f32; len];
            x[len / 2] = f32::NAN;
            // SAFETY: as above.
            assert!(unsafe { lanes::sum_exp::<false>(&x, 0.0) }.is_nan(), "NaN at {} of {len}", len / 2);
        }
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
