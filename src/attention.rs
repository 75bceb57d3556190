//! Causal attention from q and k (DESIGN.md section 5), and head scores fused into it so that
//! no n×n matrix is ever held.
//!
//! * [`attention_patterns`]: `[*lead, n_heads, n, n]` = softmax(scale · q·kᵀ) per head, with the
//!   causal mask, an optional sliding window, an optional logit soft cap and an optional padding
//!   mask on keys.
//! * [`scores_from_qk`]: the per-query scores of `scores::per_query_scores` over those patterns,
//!   computed tile by tile: for each query row, an online log-sum-exp over its keys (and the
//!   entropy), then the logits of its target keys only. Extra memory is one
//!   [`QUERY_TILE`] × [`KEY_TILE`] logit tile per thread plus O(n) per tile of rows.
//! * [`scores_and_lse_from_qk`]: the same, with each row's log-sum-exp taken from the caller
//!   (a flash kernel's, DESIGN.md section 11): then no logit tile is computed at all, only the
//!   target logits, O(n · |T| · d_head) per head; and optionally handing the kernel's own back.
//!
//! Choices (documented for users in python/induct_fast/attention.py):
//! * Precision: f16 and f32 inputs compute in f32 and give f32 patterns; f64 computes in f64.
//!   Logits come from one GEMM per tile with f32 accumulation over d_head (as TransformerLens
//!   does); exponentials are f32 (`simd::exp_f32`, 2 ulp) summed in f32 over at most 16 terms
//!   per lane and in f64 beyond; every per-row merge, log-sum-exp and target probability is f64.
//! * Masks: key j is allowed for query i when j <= i (if causal), i - j < window (if given; it
//!   needs causal), attention_mask[b, j] != 0 and, for the scores with exclude_bos, j >= 1. A
//!   pattern row with no allowed key is all zeros. In the scores, padding positions are neither
//!   queries nor targets (`scores::score_block`), so such rows are never scored.
//! * Soft cap: s_ij = softcap · tanh(scale · q_i·k_j / softcap), before masking, per allowed
//!   entry ([`Compute::soft_cap_slice`]: in f32 a vectorised tanh within 2 ulp, in f64 `std`'s);
//!   the fused kernel's target logits go through the same arithmetic ([`Compute::soft_cap`]),
//!   so they match the log-sum-exp bit for bit. Without a cap nothing changes.
//! * Window: the fused kernel and the patterns compute only the key tiles that reach into some
//!   row's window, O(n · (window + QUERY_TILE)) per head instead of O(n²).
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
//! * A given lse is one more source of the same per-row statistics ([`OnlineRow::from_lse`]:
//!   max = lse, sum = 1), so the scoring code is shared with the online pass. It is read and
//!   checked once, serially, before any work (the first bad value in C order is the one named);
//!   a row's target probability is then e^(s_ij - lse_i) with s_ij from `Logits::logit`. The
//!   cost is latency-bound: each recomputed logit is one index-order FMA chain over d_head
//!   (what keeps it equal to the GEMM's), ~0.1 µs at d_head 64.

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

use crate::error::{shape_str, Error, Result};
use crate::scores::{
    score_block, BlockOut, BlockTargets, QueryPlan, QueryRows, Reduce, ScoreOptions, Spans, TargetMeasure,
};
use crate::stack::{unravel, Real};
use crate::targets::Kind;
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
    /// Logit soft cap (Gemma-2's `attn_logit_softcapping`): s = softcap · tanh(s / softcap).
    pub softcap: Option<f64>,
    /// Sliding window (Hugging Face's `sliding_window`): key j is allowed for query i only when
    /// i - j < window. At least 1; needs `causal`.
    pub window: Option<usize>,
    pub layout: Layout,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions { scale: None, causal: true, softcap: None, window: None, layout: Layout::Bnhd }
    }
}

/// The validated logit rules of one call, in the compute precision.
#[derive(Debug, Clone, Copy)]
struct Logits<C> {
    scale: C,
    causal: bool,
    softcap: Option<C>,
    /// Only when it masks something (window < n): a window >= n is no window at all.
    window: Option<usize>,
}

impl<C: Compute> Logits<C> {
    /// Checks the options: scale finite (default 1 / sqrt(d_head)), softcap finite and > 0 in
    /// the compute precision, window >= 1 and only with causal.
    fn new(options: &AttentionOptions, d_head: usize, n: usize) -> Result<Self> {
        let value = options.scale.unwrap_or(1.0 / (d_head as f64).sqrt());
        let scale = C::from_f64(value);
        if !Compute::is_finite(scale) {
            return Err(Error::invalid("scale", "a finite number (None for 1/sqrt(d_head))", value));
        }
        let softcap = match options.softcap {
            None => None,
            Some(cap) => {
                let narrowed = C::from_f64(cap);
                if !(Compute::is_finite(narrowed) && narrowed.widen() > 0.0) {
                    return Err(Error::invalid(
                        "softcap",
                        "a finite number > 0 (None for no soft cap)",
                        format!("{cap:?}"),
                    ));
                }
                Some(narrowed)
            }
        };
        if let Some(w) = options.window {
            if w == 0 {
                return Err(Error::invalid("window", "an integer >= 1 (None for no window)", w));
            }
            if !options.causal {
                return Err(Error::invalid(
                    "window",
                    "None with causal=False: a sliding window needs causal=True",
                    format!("window={w} with causal=False"),
                ));
            }
        }
        Ok(Logits { scale, causal: options.causal, softcap, window: options.window.filter(|&w| w < n) })
    }

    /// The first key query i may attend to under the window (0 without one).
    #[inline]
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// One past the last key query i may attend to: i + 1 when causal, else n.
    #[inline]
    fn end_key(&self, i: usize, n: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            n
        }
    }

    /// Applies the soft cap (if any) to logits straight from the GEMM, before any masking.
    #[inline]
    fn cap(&self, s: &mut [C]) {
        if let Some(cap) = self.softcap {
            C::soft_cap_slice(s, cap);
        }
    }

    /// One logit s_ij, rounded exactly as the GEMM and [`Logits::cap`] round it.
    #[inline]
    fn logit(&self, q: ArrayView1<'_, C>, k: ArrayView1<'_, C>) -> C {
        let s = C::dot(q, k).mul(self.scale);
        match self.softcap {
            Some(cap) => s.soft_cap(cap),
            None => s,
        }
    }
}

/// Attention patterns `[*lead, n_heads, n, n]` in the compute precision of `T`.
///
/// A[i, j] = exp(s_ij - m_i) / sum_{j' allowed} exp(s_ij' - m_i) for allowed keys j, else 0,
/// with s_ij = scale · q_i · k_j (then softcap · tanh(s_ij / softcap) with a soft cap) and m_i
/// the row's largest allowed logit; j is allowed when j <= i (causal), i - j < window (if
/// given) and `mask[j]`. q is
/// `[*lead, n, n_heads, d_head]` (`Layout::Bnhd`) or `[*lead, n_heads, n, d_head]`; k likewise
/// with n_kv_heads dividing n_heads; `mask` is `[n]` or `[lead[0], n]` (true = a real key).
pub fn attention_patterns<'a, T: QkElement>(
    q: ArrayViewD<'a, T>,
    k: ArrayViewD<'a, T>,
    mask: Option<ArrayViewD<'a, bool>>,
    options: AttentionOptions,
) -> Result<ArrayD<T::Compute>> {
    let heads = QkHeads::new(q, k, options.layout, mask)?;
    let n = heads.n();
    let logits = Logits::<T::Compute>::new(&options, heads.d_head(), n)?;
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
                    pattern_block(&heads, h, start..(start + QUERY_TILE).min(n), block, &logits)
                })
            })
        })?;
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("output length matches its shape"))
}

/// Scores of the attention of q and k without forming the patterns: per-query values
/// `[kinds.len(), *lead, n_heads, n]` (`Reduce::PerQuery`) or head scores
/// `[kinds.len(), *lead, n_heads]` (`Reduce::Mean`), equal to `scores::per_query_scores` /
/// `scores::head_scores` of `attention_patterns(q, k)`, `spans` included.
///
/// Under `TargetMeasure::Top1` a row's argmax is that of its logits s_ij over its allowed keys
/// (lowest index on ties), found in the same tile pass: no exponential is taken unless a mass,
/// the entropy or the lse is also wanted.
///
/// For query i with allowed keys K(i) (see [`attention_patterns`], minus key 0 when
/// `score.exclude_bos`): lse_i = log sum_{j in K(i)} exp(s_ij) online over key tiles, then
/// A[i, j] = exp(s_ij - lse_i) for the targets j of each kind only, and the entropy
/// lse_i - sum_j A[i, j] s_ij from the same pass. `tokens` is `[n]` or `[lead[0], n]`; `mask`
/// likewise, and padding positions are never attended, never queries and never targets (as
/// `scores::per_query_scores` with the same mask sees the patterns). Only the key tiles that
/// reach into a row's window are computed.
#[allow(clippy::too_many_arguments)]
pub fn scores_from_qk<'a, T: QkElement>(
    q: ArrayViewD<'a, T>,
    k: ArrayViewD<'a, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'a, bool>>,
    spans: Spans<'a>,
    kinds: &[Kind],
    options: AttentionOptions,
    score: ScoreOptions,
    reduce: Reduce,
) -> Result<ArrayD<f64>> {
    let lse = LseOptions::default();
    Ok(scores_and_lse_from_qk(q, k, tokens, mask, spans, kinds, options, score, reduce, lse)?.0)
}

/// A log-sum-exp per query row, `[*lead, n_heads, n]`, of any float dtype and any strides.
#[derive(Debug, Clone)]
pub enum LseArray<'a> {
    F64(ArrayViewD<'a, f64>),
    F32(ArrayViewD<'a, f32>),
    F16(ArrayViewD<'a, half::f16>),
    Bf16(ArrayViewD<'a, half::bf16>),
}

impl LseArray<'_> {
    /// The values as f64, in the array's shape (what `return_lse` hands back for a given lse).
    fn to_f64(&self) -> ArrayD<f64> {
        match self {
            LseArray::F64(a) => a.to_owned(),
            LseArray::F32(a) => a.mapv(f64::from),
            LseArray::F16(a) => a.mapv(half::f16::to_f64),
            LseArray::Bf16(a) => a.mapv(Real::to_f64),
        }
    }

    /// The values of the rows that are scored (see [`read_lse`]), `[heads, n]` flat.
    fn read<C: Compute>(&self, heads: &QkHeads<'_, C>) -> Result<Vec<f64>> {
        match self {
            LseArray::F64(a) => read_lse(a, heads),
            LseArray::F32(a) => read_lse(a, heads),
            LseArray::F16(a) => read_lse(a, heads),
            LseArray::Bf16(a) => read_lse(a, heads),
        }
    }
}

/// Row log-sum-exps into and out of [`scores_and_lse_from_qk`].
#[derive(Debug, Clone, Default)]
pub struct LseOptions<'a> {
    /// lse_i = ln sum_{j allowed} exp(s_ij), `[*lead, n_heads, n]`, natural log, over the
    /// scaled, soft-capped logits and the keys the same rules allow (causal, window, padding).
    pub given: Option<LseArray<'a>>,
    /// Also return a `[*lead, n_heads, n]` f64 log-sum-exp: the kernel's own, or `given`.
    pub return_lse: bool,
}

/// [`scores_from_qk`], with each row's log-sum-exp given and/or returned.
///
/// With `lse.given` and no whole-row kind (entropy), each target's probability is
/// A[i, j] = exp(s_ij - lse_i), s_ij recomputed by the arithmetic of the logit tiles, and no
/// tile is computed: O(n · |T| · d_head) per head instead of O(n² · d_head). With a whole-row
/// kind the rows are computed exactly as without `given` (which is then checked but unused).
/// `given` is read only at rows that are scored, i >= 1 and not padding; there it must be
/// finite. It must come from the same q, k and rules: a wrong one gives wrong masses (possibly
/// above 1), which are not detected. Not with `score.exclude_bos` (lse sums over key 0).
///
/// With `lse.return_lse`, the second value is `[*lead, n_heads, n]`: `given` as f64 where
/// given, else the kernel's own lse_i for every row (padding rows included), -inf for a row
/// with no allowed key.
#[allow(clippy::too_many_arguments)]
pub fn scores_and_lse_from_qk<'a, T: QkElement>(
    q: ArrayViewD<'a, T>,
    k: ArrayViewD<'a, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'a, bool>>,
    spans: Spans<'a>,
    kinds: &[Kind],
    options: AttentionOptions,
    score: ScoreOptions,
    reduce: Reduce,
    lse: LseOptions<'_>,
) -> Result<(ArrayD<f64>, Option<ArrayD<f64>>)> {
    let heads = QkHeads::new(q, k, options.layout, mask.clone())?;
    let n = heads.n();
    let logits = Logits::<T::Compute>::new(&options, heads.d_head(), n)?;
    let plan = QueryPlan::new(kinds, tokens.as_ref(), mask, spans, &heads.heads_lead(), n, "q", score)?;
    if score.exclude_bos {
        refuse_lse_with_exclude_bos(&lse)?;
    }
    let given = lse.given.as_ref().map(|a| a.read(&heads)).transpose()?;
    // Entropy and top-1 need every logit of their rows: they are computed, and then serve
    // every kind (a given lse is then not needed).
    let entropy = kinds.contains(&Kind::Entropy);
    let top1 = score.measure == TargetMeasure::Top1 && kinds.iter().any(|&k| k != Kind::Entropy);
    let whole_rows = entropy || top1;
    // Top-1 alone needs no normaliser: no exponential at all.
    let normalise = entropy || !top1 || (lse.return_lse && lse.given.is_none());
    let score_plan = ScorePlan {
        logits,
        first_key: usize::from(score.exclude_bos),
        entropy,
        top1,
        normalise,
        given: given.filter(|_| !whole_rows),
    };
    let mut shape = heads.heads_lead();
    shape.push(n);
    let mut own = (lse.return_lse && lse.given.is_none()).then(|| vec![f64::NAN; shape.iter().product()]);
    let scores = plan.run(
        QUERY_TILE,
        reduce,
        own.as_deref_mut(),
        || vec![<T::Compute as simd::Lane>::ZERO; QUERY_TILE * KEY_TILE],
        |tile, h, rows, targets, out| score_tile(&heads, h, rows, targets, &score_plan, tile, out),
    )?;
    let returned = match (lse.return_lse, &lse.given, own) {
        (false, _, _) => None,
        (true, Some(given), _) => Some(given.to_f64()),
        (true, None, own) => {
            let own = own.expect("an lse buffer when one is returned");
            Some(ArrayD::from_shape_vec(IxDyn(&shape), own).expect("lse length matches its shape"))
        }
    };
    Ok((scores, returned))
}

/// exclude_bos leaves key 0 out of every softmax; an lse sums over it.
fn refuse_lse_with_exclude_bos(lse: &LseOptions<'_>) -> Result<()> {
    if lse.given.is_some() {
        return Err(Error::invalid(
            "lse",
            "None with exclude_bos=True (an lse sums over key 0, which exclude_bos leaves out of every softmax)",
            "an lse array with exclude_bos=True",
        ));
    }
    if lse.return_lse {
        return Err(Error::invalid(
            "return_lse",
            "False with exclude_bos=True (the lse returned is over all allowed keys, as lse= takes it; \
             exclude_bos scores rows without key 0)",
            "return_lse=True with exclude_bos=True",
        ));
    }
    Ok(())
}

/// A given lse `[*lead, n_heads, n]` as `[heads, n]` flat f64: its value at every row that is
/// scored (query i >= 1, not padding), which must be finite, and -inf (not read) elsewhere:
/// flash kernels leave -inf or NaN in fully masked rows.
fn read_lse<L: Real, C: Compute>(lse: &ArrayViewD<'_, L>, heads: &QkHeads<'_, C>) -> Result<Vec<f64>> {
    let n = heads.n();
    let mut shape = heads.heads_lead();
    shape.push(n);
    if lse.shape() != shape.as_slice() {
        return Err(Error::invalid(
            "lse",
            format!("shape {} (the [*lead, n_heads, n] of q: one value per query row of each head)", shape_str(&shape)),
            format!("shape {}", shape_str(lse.shape())),
        ));
    }
    let mut values = Vec::with_capacity(lse.len());
    let mut valid = None;
    for (flat, v) in lse.iter().enumerate() {
        let (h, i) = (flat / n, flat % n);
        if i == 0 {
            valid = heads.key_mask(h);
        }
        if i == 0 || valid.as_ref().is_some_and(|m| !m[i]) {
            values.push(f64::NEG_INFINITY);
            continue;
        }
        let v = v.to_f64();
        if !v.is_finite() {
            return Err(Error::invalid(
                "lse",
                "finite values at every query that is scored (i >= 1, not padding)",
                format!("{v} at index {}", shape_str(&unravel(flat, &shape)).replace(",)", ")")),
            ));
        }
        values.push(v);
    }
    Ok(values)
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
    let flags = mask.slice(ndarray::s![first..first + s.len()]);
    let pad = |v: &mut C, keep: bool| {
        if !keep {
            *v = C::NEG_INFINITY;
        }
    };
    match flags.as_slice() {
        Some(flags) => s.iter_mut().zip(flags).for_each(|(v, &keep)| pad(v, keep)),
        None => s.iter_mut().zip(flags.iter()).for_each(|(v, &keep)| pad(v, keep)),
    }
}

/// The mask if some key in `keys` is padding, else None (nothing to mask there).
fn padded_in<'m>(mask: Option<&'m ArrayView1<'m, bool>>, keys: Range<usize>) -> Option<&'m ArrayView1<'m, bool>> {
    mask.filter(|m| m.slice(ndarray::s![keys]).iter().any(|&keep| !keep))
}

/// Rows `rows` of head h's pattern, written into `out` (rows.len() × n, zero-filled).
fn pattern_block<C: Compute>(
    heads: &QkHeads<'_, C>,
    h: usize,
    rows: Range<usize>,
    out: &mut [C],
    logits: &Logits<C>,
) -> Result<()> {
    let n = heads.n();
    let (q, k, mask) = (heads.query(h), heads.key(h), heads.key_mask(h));
    let (q, k) = (q.view(), k.view());
    // Keys key_start..key_end cover every row's allowed keys.
    let (key_start, key_end) = (logits.first_key(rows.start), logits.end_key(rows.end - 1, n));
    let mask = padded_in(mask.as_ref(), key_start..key_end);
    compute::logits_tile(&q, &k, rows.clone(), key_start..key_end, logits.scale, &mut out[key_start..], n);
    for (r, i) in rows.enumerate() {
        let row = &mut out[r * n..(r + 1) * n];
        let (lo, end) = (logits.first_key(i), logits.end_key(i, n));
        // The GEMM also filled keys outside lo..end: zero them. Keys outside key_start..key_end
        // are still the allocation's zeros; leaving them untouched keeps those pages unmapped,
        // so the upper triangle of a causal pattern costs no resident memory.
        row[key_start..lo].fill(C::ZERO);
        row[end..key_end].fill(C::ZERO);
        let allowed = &mut row[lo..end];
        logits.cap(allowed);
        if let Some(m) = mask {
            mask_keys(allowed, m, lo);
        }
        if !softmax_in_place(allowed) {
            return Err(overflow(heads, h, i));
        }
    }
    Ok(())
}

/// What every block of the fused scores needs besides its head and rows.
struct ScorePlan<C> {
    logits: Logits<C>,
    /// 1 with exclude_bos: key 0 leaves the softmax, which renormalises the rest exactly.
    first_key: usize,
    entropy: bool,
    /// Find each row's argmax logit (`TargetMeasure::Top1`).
    top1: bool,
    /// Accumulate each row's softmax statistics online (false: top-1 only, no exponential).
    normalise: bool,
    /// Each row's given log-sum-exp, `[heads, n]` flat (-inf where not read), when it is used:
    /// then the rows' normalisers come from it instead of the online pass.
    given: Option<Vec<f64>>,
}

/// Scores rows `rows` of head h (see `scores::score_block`) through one reused logit tile.
fn score_tile<C: Compute>(
    heads: &QkHeads<'_, C>,
    h: usize,
    rows: Range<usize>,
    targets: &BlockTargets,
    plan: &ScorePlan<C>,
    tile: &mut [C],
    out: &mut BlockOut,
) -> Result<crate::scores::Partial> {
    let (q, k, mask) = (heads.query(h), heads.key(h), heads.key_mask(h));
    let (q, k) = (q.view(), k.view());
    // One normaliser per row, from the given lse or from the online pass over key tiles.
    let (online, argmax) = match &plan.given {
        Some(lse) => {
            let n = heads.n();
            (lse[h * n + rows.start..h * n + rows.end].iter().map(|&v| OnlineRow::from_lse(v)).collect(), Vec::new())
        }
        None => {
            let (online, argmax) = online_rows(&q, &k, mask.as_ref(), rows.clone(), plan, tile);
            let bad = |r: usize| !online[r].is_valid() || argmax.get(r).is_some_and(|a| !a.is_valid());
            if let Some(r) = (0..rows.len()).find(|&r| bad(r)) {
                return Err(overflow(heads, h, rows.start + r));
            }
            (online, argmax)
        }
    };
    if let Some(lse) = out.rows.as_deref_mut() {
        lse.iter_mut().zip(&online).for_each(|(v, row)| *v = row.log_sum_exp());
    }
    let block = FusedRows {
        heads,
        h,
        query: &q,
        keys: &k,
        mask: mask.as_ref(),
        logits: plan.logits,
        start: rows.start,
        online,
        argmax,
        given: plan.given.is_some(),
    };
    score_block(&block, rows, targets, &mut out.kinds)
}

/// The online softmax statistics (when `plan.normalise`) and the argmax logit (when
/// `plan.top1`, else an empty list) of each row in `rows`, over its allowed keys, tile by tile;
/// tiles start at the first key any row of the block may attend to.
fn online_rows<C: Compute>(
    q: &ArrayView2<'_, C>,
    k: &ArrayView2<'_, C>,
    mask: Option<&ArrayView1<'_, bool>>,
    rows: Range<usize>,
    plan: &ScorePlan<C>,
    tile: &mut [C],
) -> (Vec<OnlineRow>, Vec<ArgMax>) {
    let mut online = vec![OnlineRow::EMPTY; rows.len()];
    let mut argmax = if plan.top1 { vec![ArgMax::EMPTY; rows.len()] } else { Vec::new() };
    let logits = &plan.logits;
    let n = k.nrows();
    let key_start = logits.first_key(rows.start).max(plan.first_key);
    let key_end = logits.end_key(rows.end - 1, n);
    for j0 in (key_start..key_end).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(key_end);
        compute::logits_tile(q, k, rows.clone(), j0..j1, logits.scale, tile, KEY_TILE);
        let mask = padded_in(mask, j0..j1);
        for (r, i) in rows.clone().enumerate() {
            let lo = j0.max(logits.first_key(i)).max(plan.first_key);
            let hi = j1.min(logits.end_key(i, n));
            if lo >= hi {
                continue;
            }
            let s = &mut tile[r * KEY_TILE + lo - j0..r * KEY_TILE + hi - j0];
            logits.cap(s);
            if let Some(m) = mask {
                mask_keys(s, m, lo);
            }
            if plan.normalise {
                online[r].add(s, plan.entropy);
            }
            if let Some(best) = argmax.get_mut(r) {
                best.add(s, lo);
            }
        }
    }
    (online, argmax)
}

/// The running argmax of one row's logits over key tiles, ties to the lowest index.
#[derive(Debug, Clone, Copy)]
struct ArgMax {
    logit: f64,
    key: Option<usize>,
    /// A logit was NaN or +inf (an overflow in q·k).
    overflowed: bool,
}

impl ArgMax {
    const EMPTY: ArgMax = ArgMax { logit: f64::NEG_INFINITY, key: None, overflowed: false };

    /// Adds the logits `s` of keys `first..` (masked keys are -inf and never win).
    fn add<C: Compute>(&mut self, s: &[C], first: usize) {
        let m = C::max(s); // ignores NaN: checked below
        self.overflowed |= s.iter().fold(false, |nan, v| nan | v.widen().is_nan()) || m.widen() == f64::INFINITY;
        // Strictly greater than the earlier tiles' best: ties go to the lowest index.
        if m.widen() > self.logit {
            let at = s.iter().position(|&v| v == m).expect("the max is an element");
            (self.logit, self.key) = (m.widen(), Some(first + at));
        }
    }

    fn is_valid(&self) -> bool {
        !self.overflowed
    }
}

/// A block of rows of the never-stored pattern: A[i, j] = exp(s_ij - lse_i) for allowed keys.
struct FusedRows<'v, 'h, C: Compute> {
    heads: &'v QkHeads<'h, C>,
    h: usize,
    query: &'v ArrayView2<'v, C>,
    keys: &'v ArrayView2<'v, C>,
    mask: Option<&'v ArrayView1<'v, bool>>,
    logits: Logits<C>,
    start: usize,
    /// Softmax statistics of rows start.. (all valid): online, or from the given lse; EMPTY
    /// when not needed (top-1 alone).
    online: Vec<OnlineRow>,
    /// The argmax of rows start.. under top-1, else empty.
    argmax: Vec<ArgMax>,
    /// The statistics come from a given lse.
    given: bool,
}

impl<C: Compute> QueryRows for FusedRows<'_, '_, C> {
    fn entry(&self, i: usize, j: usize) -> f64 {
        let row = &self.online[i - self.start];
        let n = self.keys.nrows();
        let allowed = (self.logits.first_key(i)..self.logits.end_key(i, n)).contains(&j);
        if !allowed || self.mask.is_some_and(|m| !m[j]) || row.is_empty() {
            return 0.0;
        }
        // Rounded like the GEMM's entry (alpha · sum) and capped by the same function, so it
        // matches the logit in the lse.
        row.probability(self.logits.logit(self.query.row(i), self.keys.row(j)).widen())
    }

    /// The online softmax already leaves key 0 out under exclude_bos: nothing to rescale.
    fn scale(&self, _i: usize) -> f64 {
        1.0
    }

    fn entropy(&self, i: usize, _first_key: usize) -> Result<f64> {
        Ok(self.online[i - self.start].entropy())
    }

    /// Found by the tile pass, over the allowed keys (exclude_bos, window and padding applied).
    fn argmax(&self, i: usize, _first_key: usize, _real: impl Fn(usize) -> bool) -> Result<Option<usize>> {
        Ok(self.argmax[i - self.start].key)
    }

    /// Online rows were checked valid, so only a given lse gets here: a target logit that
    /// overflowed (the online pass would have seen it), else an lse far below the logits.
    fn non_finite(&self, i: usize, columns: &[usize]) -> Error {
        let logit = |j: usize| self.logits.logit(self.query.row(i), self.keys.row(j));
        if !self.given || columns.iter().any(|&j| !Compute::is_finite(logit(j))) {
            return overflow(self.heads, self.h, i);
        }
        Error::invalid(
            "lse",
            "the log-sum-exp of the same q, k and rules (exp(s_ij - lse_i) <= 1)",
            format!(
                "{} at query {i} of head {}, which makes its attention mass overflow",
                self.online[i - self.start].log_sum_exp(),
                self.heads.index_str(self.h)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::{head_scores, per_query_scores};
    use ndarray::{Array, ArrayD};

    const KINDS: [Kind; 7] = [
        Kind::PreviousToken,
        Kind::DuplicateToken,
        Kind::Induction,
        Kind::Bos,
        Kind::SelfToken,
        Kind::Offset(5),
        Kind::Entropy,
    ];

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(shape: &[usize], seed: u64) -> ArrayD<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        Array::from_shape_simple_fn(IxDyn(shape), || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
    }

    /// `scores_from_qk` of f32 q and k (q as keys too when `k` is None).
    #[allow(clippy::too_many_arguments)]
    fn fused(
        q: &ArrayD<f32>,
        k: Option<&ArrayD<f32>>,
        tokens: Option<&ArrayD<i64>>,
        mask: Option<&ArrayD<bool>>,
        kinds: &[Kind],
        opts: AttentionOptions,
        score: ScoreOptions,
        reduce: Reduce,
    ) -> Result<ArrayD<f64>> {
        let k = k.unwrap_or(q);
        scores_from_qk(
            q.view(),
            k.view(),
            tokens.map(|t| t.view()),
            mask.map(|m| m.view()),
            Spans::default(),
            kinds,
            opts,
            score,
            reduce,
        )
    }

    /// Same NaNs, and within `tol` elsewhere.
    fn assert_close(got: &ArrayD<f64>, want: &ArrayD<f64>, tol: f64, context: &str) {
        assert_eq!(got.shape(), want.shape(), "{context}");
        for ((ix, g), w) in got.indexed_iter().zip(want.iter()) {
            assert!(g.is_nan() == w.is_nan() && (g.is_nan() || (g - w).abs() < tol), "{context}: {g} vs {w} at {ix:?}");
        }
    }

    /// The obvious O(n²) softmax in f64, one head at a time, with the soft cap
    /// s = cap · tanh(s / cap) and the window i - j < w of `opts`.
    fn reference(
        q: &ArrayView2<f32>,
        k: &ArrayView2<f32>,
        opts: &AttentionOptions,
        mask: Option<&[bool]>,
    ) -> Vec<Vec<f64>> {
        let n = q.nrows();
        let scale = opts.scale.unwrap_or(1.0 / (q.ncols() as f64).sqrt());
        let cap = |s: f64| opts.softcap.map_or(s, |c| c * (s / c).tanh());
        (0..n)
            .map(|i| {
                let in_window = |j: usize| opts.window.is_none_or(|w| j + w > i);
                let allowed = |j: usize| (!opts.causal || j <= i) && in_window(j) && mask.is_none_or(|m| m[j]);
                let s: Vec<f64> = (0..n)
                    .map(
                        |j| cap(q.row(i).iter().zip(k.row(j)).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale),
                    )
                    .collect();
                let m = (0..n).filter(|&j| allowed(j)).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..n).filter(|&j| allowed(j)).map(|j| (s[j] - m).exp()).sum();
                (0..n).map(|j| if allowed(j) { (s[j] - m).exp() / z } else { 0.0 }).collect()
            })
            .collect()
    }

    /// Patterns of q [B, n, H, d], k [B, n, KV, d] under `opts` and a [B, n] mask against the
    /// reference, for the picked (batch, head)s.
    fn assert_patterns_match_reference(
        q: &ArrayD<f32>,
        k: &ArrayD<f32>,
        mask: &ArrayD<bool>,
        opts: AttentionOptions,
        picks: &[(usize, usize)],
        tol: f64,
    ) -> ArrayD<f32> {
        let a = attention_patterns(q.view(), k.view(), Some(mask.view()), opts).unwrap();
        let (n, group) = (q.shape()[1], q.shape()[2] / k.shape()[2]);
        assert_eq!(a.shape(), &[q.shape()[0], q.shape()[2], n, n]);
        for &(b, head) in picks {
            let qh = q.slice(ndarray::s![b, .., head, ..]);
            let kh = k.slice(ndarray::s![b, .., head / group, ..]);
            let m: Vec<bool> = mask.slice(ndarray::s![b, ..]).to_vec();
            let want = reference(&qh, &kh, &opts, Some(&m));
            for i in 0..n {
                for j in 0..n {
                    let got = a[[b, head, i, j]] as f64;
                    assert!(
                        (got - want[i][j]).abs() < tol,
                        "{opts:?} ({b}, {head}, {i}, {j}): {got} vs {}",
                        want[i][j]
                    );
                }
            }
        }
        a
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
        let picks = [(0, 0), (1, 3), (1, 2)];
        let a = assert_patterns_match_reference(&q, &k, &mask, AttentionOptions::default(), &picks, 1e-6);
        // Rows whose keys are all padding are zero.
        assert!(a.slice(ndarray::s![1, .., 0..2, ..]).iter().all(|&v| v == 0.0));
    }

    /// Patterns with a soft cap and windows against the f64 reference, across key tiles.
    #[test]
    fn soft_cap_and_window_patterns_match_the_reference() {
        let (n, d) = (330, 8);
        let q = noise(&[2, n, 2, d], 11) * 6.0;
        let k = noise(&[2, n, 1, d], 12) * 6.0;
        let mut mask = Array::from_elem(IxDyn(&[2, n]), true);
        for j in [0, 1, 7, 200] {
            mask[[1, j]] = false;
        }
        for (softcap, window) in [(Some(5.0), None), (None, Some(1)), (None, Some(37)), (Some(2.5), Some(260))] {
            let opts = AttentionOptions { softcap, window, ..Default::default() };
            assert_patterns_match_reference(&q, &k, &mask, opts, &[(0, 1), (1, 0)], 2e-6);
        }
        // window >= n is no window at all, bit for bit; window 1 attends to itself only.
        let plain = attention_patterns(q.view(), k.view(), None, AttentionOptions::default()).unwrap();
        let wide = AttentionOptions { window: Some(n), ..Default::default() };
        assert_eq!(attention_patterns(q.view(), k.view(), None, wide).unwrap(), plain);
        let one = AttentionOptions { window: Some(1), ..Default::default() };
        let a = attention_patterns(q.view(), k.view(), None, one).unwrap();
        assert!(a.indexed_iter().all(|(ix, &v)| v == if ix[2] == ix[3] { 1.0 } else { 0.0 }));
    }

    /// Fused per-query values and means against `per_query_scores` / `head_scores` of f64
    /// patterns under the same options and mask (and of f32 patterns when `also_f32`).
    #[allow(clippy::too_many_arguments)]
    fn assert_fused_equals_stored(
        q: &ArrayD<f32>,
        k: &ArrayD<f32>,
        tokens: &ArrayD<i64>,
        mask: Option<&ArrayD<bool>>,
        opts: AttentionOptions,
        score: ScoreOptions,
        also_f32: bool,
    ) {
        let context = format!("{opts:?} {score:?} mask {}", mask.is_some());
        let run = |reduce| fused(q, Some(k), Some(tokens), mask, &KINDS, opts, score, reduce).unwrap();
        let m = mask.map(|m| m.view());
        let p64 = attention_patterns(q.mapv(f64::from).view(), k.mapv(f64::from).view(), m.clone(), opts).unwrap();
        let mut stored = vec![p64.into_dyn()];
        if also_f32 {
            stored.push(attention_patterns(q.view(), k.view(), m.clone(), opts).unwrap().mapv(f64::from));
        }
        let (got, means) = (run(Reduce::PerQuery), run(Reduce::Mean));
        for p in &stored {
            let want =
                per_query_scores(p.view(), Some(tokens.view()), m.clone(), Spans::default(), &KINDS, score).unwrap();
            assert_close(&got, &want, 1e-5, &context);
        }
        let want =
            head_scores(stored[0].view(), Some(tokens.view()), m.clone(), Spans::default(), &KINDS, score).unwrap();
        assert_close(&means, &want, 1e-5, &context);
        // Padding queries are never scored.
        if let Some(m) = mask {
            assert!(got.indexed_iter().all(|(ix, g)| m[[ix[1], ix[3]]] || g.is_nan()), "{context}");
        }
    }

    #[test]
    fn fused_scores_equal_scores_of_the_patterns() {
        let (n, d) = (600, 16);
        let q = noise(&[2, n, 2, d], 3) * 4.0;
        let k = noise(&[2, n, 1, d], 4) * 4.0;
        let tokens = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ((ix[1] * 7 + ix[0]) % 23) as i64);
        for (causal, exclude_bos) in [(true, false), (true, true), (false, false)] {
            let opts = AttentionOptions { causal, ..Default::default() };
            // Against f64 patterns (the truth) and f32 ones (what a user would compare with),
            // except under exclude_bos: 1 - A[i, 0] in f32 loses all digits when A[i, 0] ~ 1,
            // while the fused kernel renormalises exactly by leaving key 0 out of the softmax.
            assert_fused_equals_stored(
                &q,
                &k,
                &tokens,
                None,
                opts,
                ScoreOptions { exclude_bos, ..Default::default() },
                !exclude_bos,
            );
        }
    }

    /// Fused scores with soft cap, window, padding (left and right) and GQA equal the scores of
    /// the stored patterns under the same mask.
    #[test]
    fn fused_scores_with_new_options_equal_scores_of_the_patterns() {
        let (n, d) = (620, 16);
        let q = noise(&[2, n, 4, d], 13) * 4.0;
        let k = noise(&[2, n, 2, d], 14) * 4.0;
        let tokens = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ((ix[1] * 5 + ix[0]) % 19) as i64);
        let right = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ix[1] < n - 3 * ix[0] - 40);
        let left = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ix[1] >= 5 * ix[0] && ix[1] != 300);
        let cases = [
            (Some(3.0), None, Some(&right), false),
            (None, Some(50), Some(&left), false),
            (Some(1.5), Some(300), Some(&right), true),
            (Some(20.0), Some(1), None, true),
            (None, Some(257), Some(&left), false),
        ];
        for (softcap, window, mask, exclude_bos) in cases {
            let opts = AttentionOptions { softcap, window, ..Default::default() };
            assert_fused_equals_stored(
                &q,
                &k,
                &tokens,
                mask,
                opts,
                ScoreOptions { exclude_bos, ..Default::default() },
                false,
            );
        }
        // A wide window is no window, bit for bit.
        let s = |window| {
            let opts = AttentionOptions { window, ..Default::default() };
            fused(&q, Some(&k), Some(&tokens), None, &KINDS, opts, ScoreOptions::default(), Reduce::Mean).unwrap()
        };
        assert_eq!(s(Some(n + 5)), s(None));
    }

    /// Any number of threads gives the same bits, and pooled patterns equal one thread walking
    /// the same blocks in order.
    #[test]
    fn results_do_not_depend_on_scheduling() {
        let (n, d) = (700, 32);
        let q = noise(&[1, n, 2, d], 5);
        let k = noise(&[1, n, 2, d], 6);
        let kinds = [Kind::PreviousToken, Kind::Entropy];
        let capped = AttentionOptions { softcap: Some(2.0), window: Some(300), ..Default::default() };
        let run = |reduce| {
            [AttentionOptions::default(), capped]
                .map(|opts| fused(&q, Some(&k), None, None, &kinds, opts, ScoreOptions::default(), reduce).unwrap())
        };
        let bits = |a: [ArrayD<f64>; 2]| a.iter().flat_map(|a| a.iter().map(|v| v.to_bits())).collect::<Vec<_>>();
        let _guard = threads::RESIZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        threads::set_num_threads(1).unwrap();
        let one = (bits(run(Reduce::PerQuery)), bits(run(Reduce::Mean)));
        threads::set_num_threads(3).unwrap();
        let three = (bits(run(Reduce::PerQuery)), bits(run(Reduce::Mean)));
        assert_eq!(one, three);

        let heads = QkHeads::new(q.view(), k.view(), Layout::Bnhd, None).unwrap();
        for opts in [AttentionOptions::default(), capped] {
            let patterns = attention_patterns(q.view(), k.view(), None, opts).unwrap();
            let logits = Logits::<f32>::new(&opts, d, n).unwrap();
            let mut rows = vec![0.0f32; n * n];
            for h in 0..heads.heads_lead().iter().product::<usize>() {
                for start in (0..n).step_by(QUERY_TILE) {
                    let end = (start + QUERY_TILE).min(n);
                    let block = &mut rows[start * n..end * n];
                    block.fill(0.0);
                    pattern_block(&heads, h, start..end, block, &logits).unwrap();
                }
                let pooled_head = patterns.slice(ndarray::s![0, h, .., ..]);
                assert!(pooled_head.iter().zip(&rows).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
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
        // Every position padding: zero pattern rows; no query is eligible, so every score is NaN.
        let mask = Array::from_elem(IxDyn(&[40]), false);
        let a = attention_patterns(q.view(), k.view(), Some(mask.view()), opts).unwrap();
        assert!(a.iter().all(|&v| v == 0.0));
        let kinds = [Kind::PreviousToken, Kind::Entropy];
        let s = fused(&q, Some(&k), None, Some(&mask), &kinds, opts, ScoreOptions::default(), Reduce::PerQuery);
        assert!(s.unwrap().iter().all(|v| v.is_nan()));
    }

    /// The GEMM's capped logits and `Logits::logit` round identically: with a soft cap, the
    /// probability of the argmax key of a peaked row is the same whether read as a target
    /// (recomputed) or from the stored pattern.
    #[test]
    fn capped_target_logits_match_the_log_sum_exp() {
        let (n, d) = (300, 32);
        let q = noise(&[n, 1, d], 15) * 3.0;
        let opts = AttentionOptions { softcap: Some(30.0), scale: Some(1.0), ..Default::default() };
        let selfs = |k: Option<&ArrayD<f32>>, opts| {
            fused(&q, k, None, None, &[Kind::SelfToken], opts, ScoreOptions::default(), Reduce::PerQuery).unwrap()
        };
        // Keys equal to queries: the self logit dominates, so A[i, i] ~ 1.
        let s = selfs(None, opts);
        let p = attention_patterns(q.mapv(f64::from).view(), q.mapv(f64::from).view(), None, opts).unwrap();
        for i in 1..n {
            assert!((s[[0, 0, i]] - p[[0, i, i]]).abs() < 1e-6, "row {i}: {} vs {}", s[[0, 0, i]], p[[0, i, i]]);
            assert!(s[[0, 0, i]] <= 1.0);
        }
        // With window 1 each row's only key is its own: the recomputed target logit must equal
        // the row's max bit for bit for its probability to come out exactly 1 (FMA CPUs, where
        // the dot product rounds like the GEMM; see compute.rs).
        if simd::has_fma() {
            let k = noise(&[n, 1, d], 18) * 3.0;
            let s = selfs(Some(&k), AttentionOptions { window: Some(1), ..opts });
            assert!(s.iter().skip(1).all(|&v| v == 1.0), "{s}");
        }
    }

    #[test]
    fn errors_name_their_argument() {
        let q = noise(&[5, 2, 4], 9);
        let patterns_err =
            |q: &ArrayD<f32>, opts| attention_patterns(q.view(), q.view(), None, opts).unwrap_err().to_string();
        let fused_err = |q: &ArrayD<f32>, tokens: Option<&ArrayD<i64>>, mask, kinds: &[Kind], opts, score| {
            fused(q, None, tokens, mask, kinds, opts, score, Reduce::PerQuery).unwrap_err().to_string()
        };
        let (plain, no_bos) = (ScoreOptions::default(), ScoreOptions { exclude_bos: true, ..Default::default() });
        let e = patterns_err(&q, AttentionOptions { scale: Some(f64::NAN), ..Default::default() });
        assert!(e.starts_with("scale:"), "{e}");
        assert!(patterns_err(&q, AttentionOptions { scale: Some(1e300), ..Default::default() }).starts_with("scale:"));
        let big = &q * 1e20;
        let e = fused_err(&big, None, None, &[Kind::PreviousToken], AttentionOptions::default(), plain);
        assert!(e.starts_with("q:") && e.contains("overflow"), "{e}");
        assert!(patterns_err(&big, AttentionOptions::default()).contains("overflow"));
        let tokens = Array::from_elem(IxDyn(&[4]), 1i64);
        let e = fused_err(&q, Some(&tokens), None, &[Kind::Induction], AttentionOptions::default(), plain);
        assert!(e.starts_with("tokens:") && e.contains("(5,)"), "{e}");
        let e = fused_err(&q, None, None, &[Kind::Offset(5)], AttentionOptions::default(), plain);
        assert!(e.starts_with("offset:"), "{e}");

        for cap in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let e = patterns_err(&q, AttentionOptions { softcap: Some(cap), ..Default::default() });
            assert!(e.starts_with("softcap: expected a finite number > 0"), "{e}");
        }
        let e = patterns_err(&q, AttentionOptions { window: Some(0), ..Default::default() });
        assert!(e.starts_with("window: expected an integer >= 1"), "{e}");
        let e = patterns_err(&q, AttentionOptions { window: Some(3), causal: false, ..Default::default() });
        assert!(e.starts_with("window: ") && e.contains("needs causal=True"), "{e}");
        // A soft cap turns no overflow into a silent cap: the overflow is still an error.
        let capped = AttentionOptions { softcap: Some(50.0), ..Default::default() };
        assert!(patterns_err(&big, capped).contains("overflow"));
        assert!(fused_err(&big, None, None, &[Kind::PreviousToken], capped, plain).contains("overflow"));
        // exclude_bos with left padding: position 0 would be padding, not a BOS.
        let q = noise(&[2, 5, 1, 4], 17);
        let mut mask = Array::from_elem(IxDyn(&[2, 5]), true);
        mask[[1, 0]] = false;
        let e = fused_err(&q, None, Some(&mask), &[Kind::PreviousToken], AttentionOptions::default(), no_bos);
        assert!(e.starts_with("exclude_bos:") && e.contains("attention_mask") && e.contains("prompt 1"), "{e}");
    }

    /// Per-query `scores_and_lse_from_qk` of f32 q, k with an lse request.
    fn with_lse(
        q: &ArrayD<f32>,
        k: &ArrayD<f32>,
        tokens: &ArrayD<i64>,
        mask: Option<&ArrayD<bool>>,
        kinds: &[Kind],
        opts: AttentionOptions,
        lse: LseOptions<'_>,
    ) -> Result<(ArrayD<f64>, Option<ArrayD<f64>>)> {
        let (m, t) = (mask.map(|m| m.view()), Some(tokens.view()));
        scores_and_lse_from_qk(
            q.view(),
            k.view(),
            t,
            m,
            Spans::default(),
            kinds,
            opts,
            ScoreOptions::default(),
            Reduce::PerQuery,
            lse,
        )
    }

    fn bits(a: &ArrayD<f64>) -> Vec<u64> {
        a.iter().map(|v| v.to_bits()).collect()
    }

    fn given(lse: &ArrayD<f64>) -> LseOptions<'_> {
        LseOptions { given: Some(LseArray::F64(lse.view())), return_lse: false }
    }

    /// The kernel's own lse equals the reference log-sum-exp of every row (padding rows too,
    /// -inf without an allowed key), and given back it reproduces the scores; a row's normaliser
    /// really is the given one (lse + ln 2 halves every mass), and entropy ignores it.
    #[test]
    fn given_lse_reproduces_the_scores_and_is_what_normalises() {
        let (n, d) = (530, 16);
        let q = noise(&[2, n, 4, d], 21) * 4.0;
        let k = noise(&[2, n, 2, d], 22) * 4.0;
        let tokens = Array::from_shape_fn(IxDyn(&[2, n]), |ix| ((ix[1] * 3 + ix[0]) % 17) as i64);
        let mask = Array::from_shape_fn(IxDyn(&[2, n]), |ix| if ix[0] == 0 { ix[1] >= 7 } else { ix[1] < n - 30 });
        let kinds = [Kind::PreviousToken, Kind::DuplicateToken, Kind::Induction, Kind::Bos, Kind::Offset(300)];
        for opts in [
            AttentionOptions::default(),
            AttentionOptions { softcap: Some(2.5), window: Some(260), ..Default::default() },
            AttentionOptions { causal: false, ..Default::default() },
        ] {
            let ask = LseOptions { given: None, return_lse: true };
            let (plain, lse) = with_lse(&q, &k, &tokens, Some(&mask), &kinds, opts, ask).unwrap();
            let lse = lse.unwrap();
            assert_eq!(lse.shape(), &[2, 4, n]);
            // Against the f64 reference softmax's normaliser, row by row.
            for (b, head) in [(0, 1), (1, 3)] {
                let (qh, kh) = (q.slice(ndarray::s![b, .., head, ..]), k.slice(ndarray::s![b, .., head / 2, ..]));
                let m: Vec<bool> = mask.slice(ndarray::s![b, ..]).to_vec();
                // The f32 logits as the kernel rounds them, then an f64 log-sum-exp.
                let logits = Logits::<f32>::new(&opts, d, n).unwrap();
                for i in 0..n {
                    let allowed = |j: usize| (!opts.causal || j <= i) && opts.window.is_none_or(|w| j + w > i) && m[j];
                    let logits: Vec<f64> =
                        (0..n).filter(|&j| allowed(j)).map(|j| logits.logit(qh.row(i), kh.row(j)) as f64).collect();
                    let want = match logits.iter().cloned().reduce(f64::max) {
                        None => f64::NEG_INFINITY,
                        Some(top) => top + logits.iter().map(|s| (s - top).exp()).sum::<f64>().ln(),
                    };
                    let got = lse[[b, head, i]];
                    assert!(got == want || (got - want).abs() < 1e-6, "{opts:?} ({b}, {head}, {i}): {got} vs {want}");
                }
            }
            let (again, echoed) = with_lse(&q, &k, &tokens, Some(&mask), &kinds, opts, given(&lse)).unwrap();
            assert_close(&again, &plain, 1e-12, &format!("{opts:?}"));
            assert!(echoed.is_none());
            let shifted = &lse + 2f64.ln();
            let halved = with_lse(&q, &k, &tokens, Some(&mask), &kinds, opts, given(&shifted)).unwrap().0;
            for (h, p) in halved.iter().zip(plain.iter()) {
                assert!(h.is_nan() == p.is_nan() && (h.is_nan() || (h - p / 2.0).abs() <= 1e-12 * p), "{h} vs {p}");
            }
            // With entropy every row is computed, the given lse unused: the same bits.
            let mut all = kinds.to_vec();
            all.push(Kind::Entropy);
            let none = LseOptions::default();
            let whole = with_lse(&q, &k, &tokens, Some(&mask), &all, opts, none).unwrap().0;
            let ignored = with_lse(&q, &k, &tokens, Some(&mask), &all, opts, given(&shifted)).unwrap().0;
            assert_eq!(bits(&whole), bits(&ignored));
            // return_lse with a given lse hands it back as f64, whatever its dtype.
            let narrow = lse.mapv(|v| v as f32);
            let ask = LseOptions { given: Some(LseArray::F32(narrow.view())), return_lse: true };
            let echoed = with_lse(&q, &k, &tokens, Some(&mask), &kinds, opts, ask).unwrap().1.unwrap();
            assert_eq!(echoed, narrow.mapv(f64::from));
        }
    }

    #[test]
    fn given_lse_is_checked() {
        let (n, d) = (40, 8);
        let q = noise(&[2, n, 2, d], 23);
        let k = noise(&[2, n, 1, d], 24);
        let tokens = Array::from_shape_fn(IxDyn(&[n]), |ix| (ix[0] % 5) as i64);
        let mut mask = Array::from_elem(IxDyn(&[2, n]), true);
        mask[[1, 0]] = false;
        mask[[1, 9]] = false;
        let kinds = [Kind::PreviousToken, Kind::Induction];
        let ask = LseOptions { given: None, return_lse: true };
        let lse = with_lse(&q, &k, &tokens, Some(&mask), &kinds, AttentionOptions::default(), ask).unwrap().1.unwrap();
        let err = |lse: ArrayD<f64>, kinds: &[Kind]| {
            let opts = AttentionOptions::default();
            with_lse(&q, &k, &tokens, Some(&mask), kinds, opts, given(&lse)).map(|r| r.0).map_err(|e| e.to_string())
        };
        let e = err(lse.slice(ndarray::s![.., .., 1..]).to_owned().into_dyn(), &kinds).unwrap_err();
        assert_eq!(e, "lse: expected shape (2, 2, 40) (the [*lead, n_heads, n] of q: one value per query row of each head), got shape (2, 2, 39)");
        let e = err(lse.slice(ndarray::s![0, .., ..]).to_owned().into_dyn(), &kinds).unwrap_err();
        assert!(e.contains("got shape (2, 40)"), "{e}");
        // Rows never scored (query 0, padding queries) are not read: anything goes there.
        let mut junk = lse.clone();
        junk.slice_mut(ndarray::s![.., .., 0]).fill(f64::NAN);
        junk[[1, 0, 9]] = f64::NEG_INFINITY;
        junk[[1, 1, 9]] = f64::INFINITY;
        assert_eq!(bits(&err(junk.clone(), &kinds).unwrap()), bits(&err(lse.clone(), &kinds).unwrap()));
        for (index, v) in [([0, 1, 5], f64::NAN), ([1, 0, 10], f64::NEG_INFINITY), ([1, 1, 39], f64::INFINITY)] {
            let mut bad = junk.clone();
            bad[index] = v;
            for kinds in [&kinds[..], &[Kind::PreviousToken, Kind::Entropy]] {
                let e = err(bad.clone(), kinds).unwrap_err();
                let want = format!("{v} at index ({}, {}, {})", index[0], index[1], index[2]);
                assert!(
                    e.starts_with("lse: expected finite values at every query that is scored") && e.ends_with(&want),
                    "{e}"
                );
            }
        }
        // An lse far below the logits overflows a mass: an error naming lse, never inf.
        let e = err(&lse - 800.0, &kinds).unwrap_err();
        assert!(e.starts_with("lse: ") && e.contains("overflow"), "{e}");
        // exclude_bos leaves key 0 out; an lse includes it: refused, given or returned.
        let no_bos = ScoreOptions { exclude_bos: true, ..Default::default() };
        let opts = AttentionOptions::default();
        for (lse, arg) in [(given(&lse), "lse"), (LseOptions { given: None, return_lse: true }, "return_lse")] {
            let e = scores_and_lse_from_qk(
                q.view(),
                k.view(),
                None,
                None,
                Spans::default(),
                &kinds[..1],
                opts,
                no_bos,
                Reduce::Mean,
                lse,
            )
            .unwrap_err();
            assert!(e.arg == arg && e.to_string().contains("exclude_bos=True"), "{e}");
        }
        // f16 lse is read too.
        let half_lse = lse.mapv(half::f16::from_f64);
        let given = LseOptions { given: Some(LseArray::F16(half_lse.view())), return_lse: false };
        let r = with_lse(&q, &k, &tokens, Some(&mask), &kinds, AttentionOptions::default(), given).unwrap().0;
        assert_close(&r, &err(lse.clone(), &kinds).unwrap(), 2e-2, "f16 lse");
    }

    /// Given or computed, the lse path gives the same bits for any number of threads.
    #[test]
    fn lse_results_do_not_depend_on_scheduling() {
        let (n, d) = (700, 16);
        let q = noise(&[1, n, 2, d], 25);
        let k = noise(&[1, n, 2, d], 26);
        let tokens = Array::from_shape_fn(IxDyn(&[n]), |ix| (ix[0] % 11) as i64);
        let kinds = [Kind::PreviousToken, Kind::DuplicateToken];
        let run = || {
            let ask = LseOptions { given: None, return_lse: true };
            let (a, lse) = with_lse(&q, &k, &tokens, None, &kinds, AttentionOptions::default(), ask).unwrap();
            let lse = lse.unwrap();
            let b = with_lse(&q, &k, &tokens, None, &kinds, AttentionOptions::default(), given(&lse)).unwrap();
            [a, lse, b.0].iter().flat_map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let _guard = threads::RESIZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        threads::set_num_threads(1).unwrap();
        let one = run();
        threads::set_num_threads(3).unwrap();
        assert_eq!(one, run());
    }
}
