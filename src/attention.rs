//! Causal attention from q and k (DESIGN.md section 5), and head scores fused into it so that
//! no n×n matrix is ever held.
//!
//! * [`attention_patterns`]: `[*lead, n_heads, n, n]` = softmax(scale · q·kᵀ) per head, with the
//!   causal mask and an optional padding mask on keys.
//! * [`scores_from_qk`]: the per-query scores of `scores::per_query_scores` over those patterns,
//!   computed tile by tile: for each query row, an online log-sum-exp over its keys (and the
//!   entropy), then the logits of its target keys only. Extra memory is one
//!   [`QUERY_TILE`] × [`KEY_TILE`] logit tile per thread plus O(n) per tile of rows.
//!
//! Choices (documented for users in python/induct_fast/attention.py):
//! * Precision: f16 and f32 inputs compute in f32 and give f32 patterns; f64 computes in f64.
//!   Logits come from one GEMM per tile with f32 accumulation over d_head (as TransformerLens
//!   does); exponentials are f32 (`simd::exp_f32`, 2 ulp) summed in f32 over at most 16 terms
//!   per lane and in f64 beyond; every per-row merge, log-sum-exp and target probability is f64.
//! * Masks: key j is allowed for query i when j <= i (if causal), attention_mask[b, j] != 0 and,
//!   for the scores with exclude_bos, j >= 1. A row with no allowed key is all zeros (its
//!   target masses are 0, its entropy 0): no NaN is made up for padding queries.
//! * GEMM: matrixmultiply (already a dependency of ndarray; AVX-512/AVX2/FMA kernels chosen at
//!   run time). On our tile shapes (m × n × k = 64..256 × 64..512 × 16..128, strided A) it ran at
//!   61-91 GFLOP/s on one AVX-512 core against 59-92 for the `gemm` crate (0.19, x86-v4), which
//!   was slower at k = 128 (39) and would add 17 crates to the build. Its micro-kernels sum each
//!   entry in index order with FMA, so a single target logit recomputed by
//!   `Compute::dot` is bit-identical (checked by a test). Packing strided operands
//!   costs ~12% of the fused kernel; contiguous transposed copies of q and k would save about
//!   half of that (81 -> 91 GFLOP/s on 128 × 256 × 64) at the price of copying the inputs.
//! * Determinism: work is split into fixed (head, QUERY_TILE rows) blocks; every row is computed
//!   by one task in a fixed key order, so results do not depend on the number of threads.

mod compute;
mod heads;
mod simd;
mod softmax;

use std::ops::Range;

use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayViewD, IxDyn};
use rayon::prelude::*;

pub use compute::{Compute, QkElement};
pub use heads::Layout;
use heads::QkHeads;
use softmax::{softmax_in_place, OnlineRow};

use crate::error::{Error, Result};
use crate::scores::{score_block, QueryPlan, QueryRows, Reduce, ScoreOptions};
use crate::targets::{Kind, Targets};
use crate::threads;

/// Query rows per task. Fixed, so results do not depend on the number of threads.
pub const QUERY_TILE: usize = 128;
/// Keys per logit tile of the fused scores: a QUERY_TILE × KEY_TILE f32 tile is 128 KiB.
pub const KEY_TILE: usize = 256;

/// How logits are formed from q and k.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    /// Multiplier of q·k; None means 1 / sqrt(d_head).
    pub scale: Option<f64>,
    /// Mask keys j > i.
    pub causal: bool,
    pub layout: Layout,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions { scale: None, causal: true, layout: Layout::Bnhd }
    }
}

/// Attention patterns `[*lead, n_heads, n, n]` in the compute precision of `T`.
///
/// A[i, j] = exp(s_ij - m_i) / sum_{j' allowed} exp(s_ij' - m_i) for allowed keys j, else 0,
/// with s_ij = scale · q_i · k_j and m_i the row's largest allowed logit. q is
/// `[*lead, n, n_heads, d_head]` (`Layout::Bnhd`) or `[*lead, n_heads, n, d_head]`; k likewise
/// with n_kv_heads dividing n_heads; `mask` is `[n]` or `[lead[0], n]` (true = a real key).
pub fn attention_patterns<'a, T: QkElement>(
    q: ArrayViewD<'a, T>,
    k: ArrayViewD<'a, T>,
    mask: Option<ArrayViewD<'a, bool>>,
    options: AttentionOptions,
) -> Result<ArrayD<T::Compute>> {
    let heads = QkHeads::new(q, k, options.layout, mask)?;
    let scale = resolve_scale::<T::Compute>(options.scale, heads.d_head())?;
    let n = heads.n();
    let mut shape = heads.heads_lead();
    shape.extend([n, n]);
    let len = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let mut out = len.and_then(zeroed::<T::Compute>).ok_or_else(|| {
        Error::invalid(
            "q",
            "an output [*lead, n_heads, n, n] that fits in memory",
            format!("shape {}", crate::error::shape_str(&shape)),
        )
    })?;
    if n > 0 {
        threads::install(|| {
            out.par_chunks_mut(n * n).enumerate().try_for_each(|(h, head)| {
                head.par_chunks_mut(QUERY_TILE * n).enumerate().try_for_each(|(t, block)| {
                    let start = t * QUERY_TILE;
                    pattern_block(&heads, h, start..(start + QUERY_TILE).min(n), block, scale, options.causal)
                })
            })
        })?;
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("output length matches its shape"))
}

/// Scores of the attention of q and k without forming the patterns: per-query values
/// `[kinds.len(), *lead, n_heads, n]` (`Reduce::PerQuery`) or head scores
/// `[kinds.len(), *lead, n_heads]` (`Reduce::Mean`), equal to `scores::per_query_scores` /
/// `scores::head_scores` of `attention_patterns(q, k)`.
///
/// For query i with allowed keys K(i) (see [`attention_patterns`], minus key 0 when
/// `score.exclude_bos`): lse_i = log sum_{j in K(i)} exp(s_ij) online over key tiles, then
/// A[i, j] = exp(s_ij - lse_i) for the targets j of each kind only, and the entropy
/// lse_i - sum_j A[i, j] s_ij from the same pass. `tokens` is `[n]` or `[lead[0], n]`.
#[allow(clippy::too_many_arguments)]
pub fn scores_from_qk<'a, T: QkElement>(
    q: ArrayViewD<'a, T>,
    k: ArrayViewD<'a, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'a, bool>>,
    kinds: &[Kind],
    options: AttentionOptions,
    score: ScoreOptions,
    reduce: Reduce,
) -> Result<ArrayD<f64>> {
    let heads = QkHeads::new(q, k, options.layout, mask)?;
    let scale = resolve_scale::<T::Compute>(options.scale, heads.d_head())?;
    let n = heads.n();
    let plan = QueryPlan::new(kinds, tokens.as_ref(), &heads.heads_lead(), n, "q")?;
    let score_plan = ScorePlan {
        scale,
        causal: options.causal,
        first_key: usize::from(score.exclude_bos),
        entropy: kinds.contains(&Kind::Entropy),
    };
    plan.run(
        QUERY_TILE,
        reduce,
        || vec![<T::Compute as simd::Lane>::ZERO; QUERY_TILE * KEY_TILE],
        |tile, h, rows, targets, out| score_tile(&heads, h, rows, targets, &score_plan, tile, out),
    )
}

/// The scale in the compute precision: 1 / sqrt(d_head) by default; NaN and inf are errors.
fn resolve_scale<C: Compute>(scale: Option<f64>, d_head: usize) -> Result<C> {
    let value = scale.unwrap_or(1.0 / (d_head as f64).sqrt());
    let narrowed = C::from_f64(value);
    if !Compute::is_finite(narrowed) {
        return Err(Error::invalid("scale", "a finite number (None for 1/sqrt(d_head))", value));
    }
    Ok(narrowed)
}

/// A zero-filled vector, or None when the allocator refuses (never an abort).
fn zeroed<C: Compute>(len: usize) -> Option<Vec<C>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<C>(len).ok()?;
    // SAFETY: the layout is non-zero-sized; all-zero bits are 0.0 for f32 and f64; the vector
    // takes ownership of exactly this allocation (same layout, length = capacity = len).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut C;
        (!ptr.is_null()).then(|| Vec::from_raw_parts(ptr, len, len))
    }
}

fn overflow<C: Compute>(heads: &QkHeads<'_, C>, h: usize, i: usize) -> Error {
    Error::invalid(
        "q",
        "finite logits scale·q·k (values small enough for the precision)",
        format!("an overflow to inf or NaN at query {i} of head {}", heads.index_str(h)),
    )
}

/// Sets the logits of padding keys (mask false) to -inf; `s` starts at key `first`.
fn mask_keys<C: Compute>(s: &mut [C], mask: &ArrayView1<'_, bool>, first: usize) {
    for (v, &keep) in s.iter_mut().zip(mask.iter().skip(first)) {
        if !keep {
            *v = C::NEG_INFINITY;
        }
    }
}

/// Rows `rows` of head h's pattern, written into `out` (rows.len() × n, zero-filled).
fn pattern_block<C: Compute>(
    heads: &QkHeads<'_, C>,
    h: usize,
    rows: Range<usize>,
    out: &mut [C],
    scale: C,
    causal: bool,
) -> Result<()> {
    let n = heads.n();
    let (q, k, mask) = (heads.query(h), heads.key(h), heads.key_mask(h));
    let key_end = if causal { rows.end } else { n };
    compute::logits_tile(&q, &k, rows.clone(), 0..key_end, scale, out, n);
    for (r, i) in rows.enumerate() {
        let row = &mut out[r * n..(r + 1) * n];
        let end = if causal { i + 1 } else { n };
        let (allowed, future) = row.split_at_mut(end);
        // The GEMM also filled keys i < j < key_end: zero them. Keys from key_end on are still
        // the allocation's zeros; leaving them untouched keeps those pages unmapped, so the
        // upper triangle of a causal pattern costs no resident memory.
        future[..key_end - end].fill(C::ZERO);
        if let Some(m) = &mask {
            mask_keys(allowed, m, 0);
        }
        if !softmax_in_place(allowed) {
            return Err(overflow(heads, h, i));
        }
    }
    Ok(())
}

/// What every block of the fused scores needs besides its head and rows.
struct ScorePlan<C> {
    scale: C,
    causal: bool,
    /// 1 with exclude_bos: key 0 leaves the softmax, which renormalises the rest exactly.
    first_key: usize,
    entropy: bool,
}

/// Scores rows `rows` of head h (see `scores::score_block`) through one reused logit tile.
fn score_tile<C: Compute>(
    heads: &QkHeads<'_, C>,
    h: usize,
    rows: Range<usize>,
    targets: &[Option<Targets>],
    plan: &ScorePlan<C>,
    tile: &mut [C],
    out: &mut [&mut [f64]],
) -> Result<crate::scores::Partial> {
    let (q, k, mask) = (heads.query(h), heads.key(h), heads.key_mask(h));
    let online = online_rows(&q, &k, mask.as_ref(), rows.clone(), plan, tile);
    if let Some(r) = online.iter().position(|row| !row.is_valid()) {
        return Err(overflow(heads, h, rows.start + r));
    }
    let block = FusedRows {
        query: &q,
        keys: &k,
        mask: mask.as_ref(),
        scale: plan.scale,
        causal: plan.causal,
        start: rows.start,
        online,
    };
    score_block(&block, rows, targets, plan.first_key, out)
}

/// The online softmax statistics of each row in `rows`, over its allowed keys, tile by tile.
fn online_rows<C: Compute>(
    q: &ArrayView2<'_, C>,
    k: &ArrayView2<'_, C>,
    mask: Option<&ArrayView1<'_, bool>>,
    rows: Range<usize>,
    plan: &ScorePlan<C>,
    tile: &mut [C],
) -> Vec<OnlineRow> {
    let mut online = vec![OnlineRow::EMPTY; rows.len()];
    let key_end = if plan.causal { rows.end } else { k.nrows() };
    for j0 in (0..key_end).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(key_end);
        if j1 <= plan.first_key {
            continue;
        }
        compute::logits_tile(q, k, rows.clone(), j0..j1, plan.scale, tile, KEY_TILE);
        for (r, i) in rows.clone().enumerate() {
            let lo = j0.max(plan.first_key);
            let hi = if plan.causal { j1.min(i + 1) } else { j1 };
            if lo >= hi {
                continue;
            }
            let s = &mut tile[r * KEY_TILE + lo - j0..r * KEY_TILE + hi - j0];
            if let Some(m) = mask {
                mask_keys(s, m, lo);
            }
            online[r].add(s, plan.entropy);
        }
    }
    online
}

/// A block of rows of the never-stored pattern: A[i, j] = exp(s_ij - lse_i) for allowed keys.
struct FusedRows<'v, C> {
    query: &'v ArrayView2<'v, C>,
    keys: &'v ArrayView2<'v, C>,
    mask: Option<&'v ArrayView1<'v, bool>>,
    scale: C,
    causal: bool,
    start: usize,
    /// Online softmax statistics of rows start.. (all valid).
    online: Vec<OnlineRow>,
}

impl<C: Compute> QueryRows for FusedRows<'_, C> {
    fn entry(&self, i: usize, j: usize) -> f64 {
        let row = &self.online[i - self.start];
        let masked = (self.causal && j > i) || self.mask.is_some_and(|m| !m[j]);
        if masked || row.is_empty() {
            return 0.0;
        }
        // Rounded like the GEMM's entry (alpha · sum), so it matches the logit in the lse.
        let logit = C::dot(self.query.row(i), self.keys.row(j)).mul(self.scale);
        row.probability(logit.widen())
    }

    /// The online softmax already leaves key 0 out under exclude_bos: nothing to rescale.
    fn scale(&self, _i: usize) -> f64 {
        1.0
    }

    fn entropy(&self, i: usize, _first_key: usize) -> Result<f64> {
        Ok(self.online[i - self.start].entropy())
    }

    /// Unreachable in practice: rows were checked valid, so every probability is finite.
    fn non_finite(&self, i: usize, _columns: &[usize]) -> Error {
        Error::invalid("q", "finite logits scale·q·k", format!("a non-finite probability at query {i}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::{head_scores, per_query_scores};
    use ndarray::{Array, ArrayD};

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(shape: &[usize], seed: u64) -> ArrayD<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        Array::from_shape_simple_fn(IxDyn(shape), || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
    }

    /// The obvious O(n²) softmax in f64, one head at a time.
    fn reference(
        q: &ArrayView2<f32>,
        k: &ArrayView2<f32>,
        scale: f64,
        causal: bool,
        mask: Option<&[bool]>,
    ) -> Vec<Vec<f64>> {
        let n = q.nrows();
        (0..n)
            .map(|i| {
                let allowed = |j: usize| (!causal || j <= i) && mask.is_none_or(|m| m[j]);
                let s: Vec<f64> = (0..n)
                    .map(|j| q.row(i).iter().zip(k.row(j)).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale)
                    .collect();
                let m = (0..n).filter(|&j| allowed(j)).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..n).filter(|&j| allowed(j)).map(|j| (s[j] - m).exp()).sum();
                (0..n).map(|j| if allowed(j) { (s[j] - m).exp() / z } else { 0.0 }).collect()
            })
            .collect()
    }

    #[test]
    fn patterns_match_the_reference_with_gqa_and_padding() {
        // q [2, n=300, H=4, d=8], k with 2 kv heads; batch 1 has two padding keys at the front.
        let (n, d) = (300, 8);
        let q = noise(&[2, n, 4, d], 1) * 3.0;
        let k = noise(&[2, n, 2, d], 2) * 3.0;
        let mut mask = Array::from_elem(IxDyn(&[2, n]), true);
        mask[[1, 0]] = false;
        mask[[1, 1]] = false;
        let a = attention_patterns(q.view(), k.view(), Some(mask.view()), AttentionOptions::default()).unwrap();
        assert_eq!(a.shape(), &[2, 4, n, n]);
        for (b, head) in [(0, 0), (1, 3), (1, 2)] {
            let qh = q.slice(ndarray::s![b, .., head, ..]);
            let kh = k.slice(ndarray::s![b, .., head / 2, ..]);
            let m: Vec<bool> = mask.slice(ndarray::s![b, ..]).to_vec();
            let want = reference(&qh, &kh, 1.0 / (d as f64).sqrt(), true, Some(&m));
            for i in 0..n {
                for j in 0..n {
                    let got = a[[b, head, i, j]] as f64;
                    assert!((got - want[i][j]).abs() < 1e-6, "({b}, {head}, {i}, {j}): {got} vs {}", want[i][j]);
                }
            }
        }
        // Rows whose keys are all padding are zero.
        assert!(a.slice(ndarray::s![1, .., 0..2, ..]).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn fused_scores_equal_scores_of_the_patterns() {
        let (n, d) = (600, 16);
        let q = noise(&[2, n, 2, d], 3) * 4.0;
        let k = noise(&[2, n, 1, d], 4) * 4.0;
        let tokens = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ((ix[1] * 7 + ix[0]) % 23) as i64);
        let kinds = [
            Kind::PreviousToken,
            Kind::DuplicateToken,
            Kind::Induction,
            Kind::Bos,
            Kind::SelfToken,
            Kind::Offset(5),
            Kind::Entropy,
        ];
        for (causal, exclude_bos) in [(true, false), (true, true), (false, false)] {
            let opts = AttentionOptions { causal, ..Default::default() };
            let score = ScoreOptions { exclude_bos };
            let got =
                scores_from_qk(q.view(), k.view(), Some(tokens.view()), None, &kinds, opts, score, Reduce::PerQuery)
                    .unwrap();
            // Against f64 patterns (the truth) and f32 ones (what a user would compare with),
            // except under exclude_bos: 1 - A[i, 0] in f32 loses all digits when A[i, 0] ~ 1,
            // while the fused kernel renormalises exactly by leaving key 0 out of the softmax.
            let p64 = attention_patterns(q.mapv(f64::from).view(), k.mapv(f64::from).view(), None, opts).unwrap();
            let mut wants = vec![per_query_scores(p64.view(), Some(tokens.view()), &kinds, score).unwrap()];
            if !exclude_bos {
                let p32 = attention_patterns(q.view(), k.view(), None, opts).unwrap();
                wants.push(per_query_scores(p32.view(), Some(tokens.view()), &kinds, score).unwrap());
            }
            for want in wants {
                assert_eq!(got.shape(), want.shape());
                for ((ix, g), w) in got.indexed_iter().zip(want.iter()) {
                    assert!(
                        g.is_nan() == w.is_nan() && (g.is_nan() || (g - w).abs() < 1e-5),
                        "causal {causal} exclude_bos {exclude_bos}: {g} vs {w} at {:?}",
                        ix
                    );
                }
            }
            let means =
                scores_from_qk(q.view(), k.view(), Some(tokens.view()), None, &kinds, opts, score, Reduce::Mean)
                    .unwrap();
            let want = head_scores(p64.view(), Some(tokens.view()), &kinds, score).unwrap();
            assert_eq!(means.shape(), &[kinds.len(), 2, 2]);
            assert!(
                means.iter().zip(want.iter()).all(|(g, w)| (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-5),
                "{means} vs {want}"
            );
        }
    }

    /// Any number of threads gives the same bits, and pooled patterns equal one thread walking
    /// the same blocks in order.
    #[test]
    fn results_do_not_depend_on_scheduling() {
        let (n, d) = (700, 32);
        let q = noise(&[1, n, 2, d], 5);
        let k = noise(&[1, n, 2, d], 6);
        let kinds = [Kind::PreviousToken, Kind::Entropy];
        let opts = AttentionOptions::default();
        let run = |reduce| {
            scores_from_qk(q.view(), k.view(), None, None, &kinds, opts, ScoreOptions::default(), reduce).unwrap()
        };
        let bits = |a: ArrayD<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let _guard = threads::RESIZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        threads::set_num_threads(1).unwrap();
        let one = (bits(run(Reduce::PerQuery)), bits(run(Reduce::Mean)));
        threads::set_num_threads(3).unwrap();
        let three = (bits(run(Reduce::PerQuery)), bits(run(Reduce::Mean)));
        assert_eq!(one, three);

        let patterns = attention_patterns(q.view(), k.view(), None, opts).unwrap();
        let heads = QkHeads::new(q.view(), k.view(), Layout::Bnhd, None).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let mut rows = vec![0.0f32; n * n];
        for h in 0..heads.heads_lead().iter().product::<usize>() {
            for start in (0..n).step_by(QUERY_TILE) {
                let end = (start + QUERY_TILE).min(n);
                let block = &mut rows[start * n..end * n];
                block.fill(0.0);
                pattern_block(&heads, h, start..end, block, scale, true).unwrap();
            }
            let pooled_head = patterns.slice(ndarray::s![0, h, .., ..]);
            assert!(pooled_head.iter().zip(&rows).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn large_logits_and_empty_rows() {
        // Logits up to ±80 in f32: no overflow, same as f64.
        let q = noise(&[40, 1, 4], 7) * 9.0;
        let k = noise(&[40, 1, 4], 8) * 9.0;
        let opts = AttentionOptions { scale: Some(2.0), ..Default::default() };
        let a32 = attention_patterns(q.view(), k.view(), None, opts).unwrap();
        let a64 = attention_patterns(q.mapv(f64::from).view(), k.mapv(f64::from).view(), None, opts).unwrap();
        assert!(a32.iter().zip(a64.iter()).all(|(x, y)| (*x as f64 - y).abs() < 1e-5));
        // Every key masked: zero rows, scores 0 where eligible, entropy 0.
        let mask = Array::from_elem(IxDyn(&[40]), false);
        let a = attention_patterns(q.view(), k.view(), Some(mask.view()), opts).unwrap();
        assert!(a.iter().all(|&v| v == 0.0));
        let s = scores_from_qk(
            q.view(),
            k.view(),
            None,
            Some(mask.view()),
            &[Kind::PreviousToken, Kind::Entropy],
            opts,
            ScoreOptions::default(),
            Reduce::PerQuery,
        )
        .unwrap();
        assert!(s.slice(ndarray::s![.., 0, 1..]).iter().all(|&v| v == 0.0) && s[[0, 0, 0]].is_nan());
    }

    #[test]
    fn errors_name_their_argument() {
        let q = noise(&[5, 2, 4], 9);
        let bad_scale = AttentionOptions { scale: Some(f64::NAN), ..Default::default() };
        let e = attention_patterns(q.view(), q.view(), None, bad_scale).unwrap_err().to_string();
        assert!(e.starts_with("scale:"), "{e}");
        let huge = AttentionOptions { scale: Some(1e300), ..Default::default() };
        assert!(attention_patterns(q.view(), q.view(), None, huge).unwrap_err().to_string().starts_with("scale:"));
        let big = &q * 1e20;
        let e = scores_from_qk(
            big.view(),
            big.view(),
            None,
            None,
            &[Kind::PreviousToken],
            AttentionOptions::default(),
            ScoreOptions::default(),
            Reduce::PerQuery,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("q:") && e.contains("overflow"), "{e}");
        assert!(attention_patterns(big.view(), big.view(), None, AttentionOptions::default())
            .unwrap_err()
            .to_string()
            .contains("overflow"));
        let tokens = Array::from_elem(IxDyn(&[4]), 1i64);
        let e = scores_from_qk(
            q.view(),
            q.view(),
            Some(tokens.view()),
            None,
            &[Kind::Induction],
            AttentionOptions::default(),
            ScoreOptions::default(),
            Reduce::PerQuery,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tokens:") && e.contains("(5,)"), "{e}");
        let e = scores_from_qk(
            q.view(),
            q.view(),
            None,
            None,
            &[Kind::Offset(5)],
            AttentionOptions::default(),
            ScoreOptions::default(),
            Reduce::PerQuery,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("offset:"), "{e}");
    }
}
