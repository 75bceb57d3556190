//! What every vectorised kernel shares: the CPU level chosen once per process, a macro that
//! compiles a function for each level and dispatches at run time (so wheels need no
//! `target-cpu=native`), and exponentials written as plain arithmetic so loops over them
//! vectorise (`std`'s exp is a libm call that does not).
//!
//! Results may differ in the last bit between CPUs with and without FMA, never between threads
//! or runs on one machine.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Baseline,
    Sse41,
    Avx2Fma,
    Avx512,
}

pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq");
            if avx2 && avx512 {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2Fma;
            }
            if is_x86_feature_detected!("sse4.1") {
                return Level::Sse41;
            }
        }
        Level::Baseline
    })
}

/// True when the CPU fuses multiply-adds (then GEMM kernels use FMA, and so does `dot`).
pub(crate) fn has_fma() -> bool {
    matches!(level(), Level::Avx2Fma | Level::Avx512)
}

/// Defines `pub fn $name` that runs an `#[inline(always)]` body compiled for the best
/// instruction set the CPU has: `$fused` (FMA allowed) on AVX-512 and AVX2+FMA CPUs, `$plain`
/// elsewhere. Results can differ in the last bit between those two groups of CPUs, never
/// between threads or runs on one machine.
macro_rules! dispatched {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $fused:expr, $plain:expr) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $fused($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $fused($($arg),*)
                }
                #[target_feature(enable = "sse4.1")]
                unsafe fn sse41($($arg: $ty),*) -> $ret {
                    $plain($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level` checked that the CPU has these features.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Level::Avx2Fma => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Sse41 => return unsafe { sse41($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            $plain($($arg),*)
        }
    };
}
pub(crate) use dispatched;

/// Below this, e^x is under f32's smallest normal number; [`exp_f32`] returns 0 there.
const EXP_F32_MIN_ARG: f32 = -87.336_54;

/// e^x for x <= 0 (positive x is treated as 0), within 2 ulp; NaN stays NaN, -inf gives 0.
///
/// e^x = 2^n · e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its Taylor polynomial of
/// degree 7 (truncation error r^8 / 8! < 6e-9 relative). Written without branches or calls so
/// that loops over it vectorise. `FMA` fuses the Horner steps (only where the CPU has FMA:
/// elsewhere `mul_add` is a slow libm call).
#[inline(always)]
pub fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer (ties to even) and leaves that integer in the
    // low mantissa bits, so n is read from the bits without a float-to-int conversion.
    const ROUNDER: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| <= 2^8 (Cody and Waite): 0.693359375.
    const LN2_HI: f32 = f32::from_bits(0x3f31_8000);
    const LN2_LO: f32 = -2.121_944_4e-4;
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let clamped = x.clamp(EXP_F32_MIN_ARG, 0.0); // NaN stays NaN
    let shifted = madd(clamped, LOG2_E, ROUNDER);
    let n = shifted - ROUNDER;
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let r = madd(n, -LN2_LO, madd(n, -LN2_HI, clamped));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd(p, r, c);
    }
    let two_n = f32::from_bits(((n_bits + 127) << 23) as u32);
    let value = p * two_n;
    // Comparisons with NaN are false, so NaN input reaches `value` (NaN) and is kept.
    if x < EXP_F32_MIN_ARG {
        0.0
    } else {
        value
    }
}

/// |x| below which [`tanh_f32`] sums its series, at and above which it takes the closed form.
const TANH_SERIES_END: f32 = 0.4;

/// Taylor coefficients of tanh x / x - 1 in powers of z = x², highest first:
/// tanh x = x - x³/3 + 2x⁵/15 - 17x⁷/315 + 62x⁹/2835 - 1382x¹¹/155925 + 21844x¹³/6081075 - ...
const TANH_SERIES: [f32; 6] =
    [21844.0 / 6081075.0, -1382.0 / 155925.0, 62.0 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0];

/// tanh x within 2 ulp (1.33 measured), written without branches or calls so that loops over it vectorise
/// (`std`'s tanh is a libm call that does not); NaN stays NaN, ±inf gives ±1.
///
/// |x| < 0.4: x + x·z·q(z), the series above to x¹³ (truncation below 5e-9 relative).
/// |x| >= 0.4: (1 - e) / (1 + e) with e = e^(-2|x|) <= e^-0.8 by [`exp_f32`], so 1 - e does not
/// cancel. The sign is copied from x.
#[inline(always)]
pub fn tanh_f32<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let a = x.abs();
    let z = a * a;
    let mut q = TANH_SERIES[0];
    for c in &TANH_SERIES[1..] {
        q = madd(q, z, *c);
    }
    let series = madd(a * z, q, a);
    let e = exp_f32::<FMA>(-2.0 * a);
    let closed = (1.0 - e) / (1.0 + e);
    // NaN fails the comparison and takes the closed form, which is NaN.
    let t = if a < TANH_SERIES_END { series } else { closed };
    t.copysign(x)
}

/// Below this [`exp_f64`] returns e^MIN_ARG (~3e-308), keeping 2^k a normal number;
/// [`exp_f64_or_zero`] returns 0.
const MIN_ARG: f64 = -708.0;
/// 1.5 * 2^52: adding it rounds a float to an integer held in the low mantissa bits.
const SHIFT: f64 = 6_755_399_441_055_744.0;
/// ln 2 split so that k * LN2_HI is exact for |k| < 2^11 (Cody-Waite range reduction):
/// LN2_HI = 0.6931471803691238 has 21 trailing zero bits, LN2_LO = ln 2 - LN2_HI.
const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);

/// Taylor coefficients 1/k!, k = 12 down to 0. On |r| <= ln2 / 2 the truncation error is
/// below 2e-16 relative.
const EXP_POLY: [f64; 13] = [
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// a * b + c, fused only where the caller's target has FMA (a software fma is very slow).
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// e^d for d <= 0 within ~4e-16 relative (e^-708 below -708, -inf included), branch-free so
/// that loops over it vectorise; NaN stays NaN. Taylor polynomial of degree 12 after Cody-Waite
/// reduction.
#[inline(always)]
pub fn exp_f64<const FMA: bool>(d: f64) -> f64 {
    // `if` rather than f64::max, which would turn NaN into MIN_ARG and hide it.
    let d = if d < MIN_ARG { MIN_ARG } else { d };
    let t = madd::<FMA>(d, std::f64::consts::LOG2_E, SHIFT);
    let k = t - SHIFT;
    let r = madd::<FMA>(-k, LN2_HI, d);
    let r = madd::<FMA>(-k, LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = madd::<FMA>(p, r, c);
    }
    // t's bits are SHIFT's plus k (same exponent), so 2^k is built with integer ops only.
    let k_int = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i64;
    let two_k = f64::from_bits(((k_int + 1023) as u64) << 52);
    p * two_k
}

/// [`exp_f64`] that gives exactly 0 below -708, so masked logits (-inf) weigh nothing. A
/// separate function: the select costs the log-sum-exp loops their vectorisation, and sums
/// that always contain e^0 = 1 do not need it.
#[inline(always)]
pub fn exp_f64_or_zero<const FMA: bool>(x: f64) -> f64 {
    if x < MIN_ARG {
        0.0
    } else {
        exp_f64::<FMA>(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between a and the f64 value b (at b's f32 magnitude).
    fn ulps(a: f32, b: f64) -> f64 {
        let ulp = f32::EPSILON as f64 * f64::from(b.abs().max(f32::MIN_POSITIVE as f64) as f32).abs();
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn tanh_f32_is_within_two_ulp() {
        let mut worst = (0.0f64, 0.0f32);
        // Dense over the interesting range, both sides of the switch at 0.4, and tiny values.
        let samples = (0..400_000)
            .map(|i| -20.0 + 40.0 * i as f32 / 400_000.0)
            .chain((0..20_000).map(|i| 0.39 + 0.02 * i as f32 / 20_000.0))
            .chain((0..200).map(|i| 1e-30 * 1.5f32.powi(i)));
        for x in samples {
            let exact = (x as f64).tanh();
            for t in [tanh_f32::<false>(x), tanh_f32::<true>(x)] {
                let u = ulps(t, exact);
                assert!(u <= 2.0, "tanh({x:e}) = {t:e}, want {exact:e}: {u:.1} ulp");
                assert!(t.abs() <= 1.0);
                if u > worst.0 {
                    worst = (u, x);
                }
            }
            assert_eq!(tanh_f32::<true>(-x).to_bits(), (-tanh_f32::<true>(x)).to_bits(), "odd at {x}");
        }
        assert!(worst.0 <= 2.0, "worst {worst:?}");
        for (x, want) in [(0.0f32, 0.0f32), (9.5, 1.0), (1e30, 1.0), (f32::INFINITY, 1.0), (f32::NEG_INFINITY, -1.0)] {
            assert_eq!(tanh_f32::<false>(x), want);
            assert_eq!(tanh_f32::<true>(x), want);
        }
        assert!(tanh_f32::<true>(f32::NAN).is_nan() && tanh_f32::<false>(f32::NAN).is_nan());
        assert_eq!(tanh_f32::<true>(-0.0).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn exp_f64_matches_std_on_its_domain() {
        let mut d = -700.0;
        while d <= 0.0 {
            let exact = f64::exp(d);
            for e in [exp_f64::<false>(d), exp_f64::<true>(d)] {
                assert!(((e - exact) / exact).abs() < 5e-16, "exp({d}) = {e}, want {exact}");
            }
            d += 0.137;
        }
        assert_eq!(exp_f64::<false>(0.0), 1.0);
        assert!(exp_f64::<false>(-1e300) < 1e-307);
        assert_eq!(exp_f64_or_zero::<false>(-1e300), 0.0);
        assert_eq!(exp_f64_or_zero::<true>(f64::NEG_INFINITY), 0.0);
        assert!(exp_f64_or_zero::<true>(f64::NAN).is_nan());
        assert!(exp_f64::<false>(f64::NAN).is_nan());
    }
}
