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

    #[test]
    fn extreme_magnitudes_do_not_overflow() {
        let x = [1e300, -1e300, 0.0, 1e300];
        let mut lse = OnlineLse::default();
        lse.push::<false>(&x);
        assert!((lse.value() - (1e300 + 2f64.ln())).abs() <= 1e285);
        assert!(lse.all_finite());
    }
}
