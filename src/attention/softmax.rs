//! Softmax of one query row, either in place over the stored row (for `attention_patterns`) or
//! online over key tiles that are never kept (for `scores_from_qk`).
//!
//! Online, a row keeps m (the largest logit seen), l = sum_j e^(s_j - m) and, for the entropy,
//! w = sum_j e^(s_j - m) (s_j - m). A tile with its own (m_t, l_t, w_t) merges as
//!
//! ```text
//! m' = max(m, m_t),  a = e^(m - m'),  b = e^(m_t - m')
//! l' = a l + b l_t
//! w' = a (w + (m - m') l) + b (w_t + (m_t - m') l_t)
//! ```
//!
//! so that at the end log-sum-exp = m + ln l and the entropy -sum p ln p = ln l - w / l. The
//! merge is in f64, one per row and tile; the per-element work is in the compute precision.
//!
//! A row whose log-sum-exp is given (by the attention kernel that ran the model) is the same
//! statistics with nothing left to add: m = lse, l = 1 ([`OnlineRow::from_lse`]), so a target's
//! probability is e^(s - lse) through the very code that serves the online rows.

use super::compute::Compute;

/// Running softmax statistics of one query row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineRow {
    max: f64,
    sum: f64,
    weighted: f64,
}

impl OnlineRow {
    /// No key seen yet (or every key masked): log-sum-exp -inf, entropy 0.
    pub const EMPTY: OnlineRow = OnlineRow { max: f64::NEG_INFINITY, sum: 0.0, weighted: 0.0 };

    /// A row whose log-sum-exp is known: m = lse, l = 1 (w unused: no entropy from it). -inf is
    /// a row with no allowed key ([`OnlineRow::EMPTY`]).
    pub fn from_lse(lse: f64) -> OnlineRow {
        if lse == f64::NEG_INFINITY {
            OnlineRow::EMPTY
        } else {
            OnlineRow { max: lse, sum: 1.0, weighted: 0.0 }
        }
    }

    /// Adds a tile of logits; masked keys are -inf. `entropy` also accumulates w.
    pub fn add<C: Compute>(&mut self, s: &[C], entropy: bool) {
        let m = C::max(s);
        if m == C::NEG_INFINITY {
            if s.iter().any(|v| v.widen().is_nan()) {
                self.sum = f64::NAN; // only overflowing logits are NaN: poison the row
            }
            return;
        }
        let sum = C::exp_sum(s, m);
        let weighted = if entropy { C::exp_weighted_sum(s, m) } else { 0.0 };
        self.merge(OnlineRow { max: m.widen(), sum, weighted });
    }

    fn merge(&mut self, tile: OnlineRow) {
        if self.sum == 0.0 && self.max == f64::NEG_INFINITY {
            *self = tile;
            return;
        }
        let max = self.max.max(tile.max);
        let (a, b) = ((self.max - max).exp(), (tile.max - max).exp());
        self.weighted =
            a * (self.weighted + (self.max - max) * self.sum) + b * (tile.weighted + (tile.max - max) * tile.sum);
        self.sum = a * self.sum + b * tile.sum;
        self.max = max;
    }

    /// False when a logit overflowed (+inf or NaN) somewhere in the row.
    pub fn is_valid(&self) -> bool {
        self.is_empty() || (self.max.is_finite() && self.sum.is_finite() && self.weighted.is_finite())
    }

    /// True when every key of the row is masked.
    pub fn is_empty(&self) -> bool {
        self.max == f64::NEG_INFINITY && self.sum == 0.0
    }

    /// ln sum_j e^(s_j); -inf for an empty row.
    pub fn log_sum_exp(&self) -> f64 {
        if self.is_empty() {
            f64::NEG_INFINITY
        } else {
            self.max + self.sum.ln()
        }
    }

    /// The softmax probability of a key with this logit, e^((s - max) - ln sum): subtracting the
    /// max first keeps it exact for huge logits, where max + ln(sum) would lose ln(sum) to
    /// rounding. 0 for an empty row.
    pub fn probability(&self, logit: f64) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            ((logit - self.max) - self.sum.ln()).exp()
        }
    }

    /// -sum_j p_j ln p_j of the row's softmax; 0 for an empty row (an all-zero pattern row).
    pub fn entropy(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.sum.ln() - self.weighted / self.sum
        }
    }
}

/// Replaces logits (masked keys -inf) by their softmax, p_j = e^(s_j - m) / sum_k e^(s_k - m);
/// a row with every key masked becomes all zeros. False if a logit is +inf or NaN.
pub fn softmax_in_place<C: Compute>(s: &mut [C]) -> bool {
    let m = C::max(s);
    if m == C::NEG_INFINITY {
        if s.iter().any(|v| v.widen().is_nan()) {
            return false;
        }
        s.fill(C::ZERO);
        return true;
    }
    if !Compute::is_finite(m) {
        return false;
    }
    let sum = C::exp_in_place(s, m);
    if !sum.is_finite() {
        return false;
    }
    C::scale(s, C::from_f64(1.0 / sum));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_stats(s: &[f64]) -> (f64, f64) {
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let entropy = -s.iter().map(|v| (v - lse).exp() * (v - lse)).filter(|x| !x.is_nan()).sum::<f64>();
        (lse, entropy)
    }

    #[test]
    fn tiles_in_any_order_give_the_whole_row() {
        let s: Vec<f64> = (0..700).map(|i| ((i * 7919 % 613) as f64 - 300.0) / 4.0).collect();
        let (lse, entropy) = exact_stats(&s);
        for tile in [1, 37, 256, 700] {
            let mut row = OnlineRow::EMPTY;
            for chunk in s.chunks(tile) {
                row.add(chunk, true);
            }
            assert!((row.log_sum_exp() - lse).abs() < 1e-12, "tile {tile}");
            assert!((row.entropy() - entropy).abs() < 1e-12, "tile {tile}");
            // Same in f32 (the logits are exact in f32), to f32 accuracy.
            let s32: Vec<f32> = s.iter().map(|&v| v as f32).collect();
            let mut row32 = OnlineRow::EMPTY;
            for chunk in s32.chunks(tile) {
                row32.add(chunk, true);
            }
            assert!((row32.log_sum_exp() - lse).abs() < 1e-6);
            assert!((row32.entropy() - entropy).abs() < 1e-5);
        }
    }

    #[test]
    fn a_given_log_sum_exp_serves_like_the_online_row() {
        let s: Vec<f64> = (0..300).map(|i| ((i * 37 % 101) as f64 - 50.0) / 3.0).collect();
        let mut online = OnlineRow::EMPTY;
        online.add(&s, false);
        let given = OnlineRow::from_lse(online.log_sum_exp());
        assert_eq!(given.log_sum_exp(), online.log_sum_exp());
        for &v in &s {
            let (p, q) = (given.probability(v), online.probability(v));
            assert!((p - q).abs() <= 1e-14 * q, "{v}: {p} vs {q}");
        }
        let empty = OnlineRow::from_lse(f64::NEG_INFINITY);
        assert!(empty.is_empty() && empty.probability(1.0) == 0.0);
    }

    #[test]
    fn masked_rows_and_overflow() {
        let mut row = OnlineRow::EMPTY;
        row.add(&[f32::NEG_INFINITY; 4], true);
        assert!(row.is_empty() && row.is_valid());
        assert_eq!(row.log_sum_exp(), f64::NEG_INFINITY);
        assert_eq!(row.entropy(), 0.0);
        row.add(&[f32::NEG_INFINITY, 2.0], true);
        assert!((row.log_sum_exp() - 2.0).abs() < 1e-12);
        assert_eq!(row.entropy(), 0.0);
        let mut bad = OnlineRow::EMPTY;
        bad.add(&[1.0f32, f32::INFINITY], false);
        assert!(!bad.is_valid());
        let mut nan = OnlineRow::EMPTY;
        nan.add(&[f32::NAN, f32::NEG_INFINITY], false);
        assert!(!nan.is_valid());
    }

    #[test]
    fn softmax_in_place_normalises() {
        let mut s = [0.0f32, 1.0, f32::NEG_INFINITY, 2.0];
        assert!(softmax_in_place(&mut s));
        let z = 1.0 + 1f64.exp() + 2f64.exp();
        for (got, want) in s.iter().zip([1.0 / z, 1f64.exp() / z, 0.0, 2f64.exp() / z]) {
            assert!((*got as f64 - want).abs() < 1e-7);
        }
        let mut masked = [f64::NEG_INFINITY; 3];
        assert!(softmax_in_place(&mut masked));
        assert_eq!(masked, [0.0; 3]);
        assert!(!softmax_in_place(&mut [0.0f32, f32::INFINITY]));
    }
}
