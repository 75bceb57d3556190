//! Kernels over attention patterns `[*lead, n, n]` (rows are queries, columns keys).
//!
//! * [`per_query_scores`]: for each kind and query i, the attention mass on the targets T(i)
//!   (NaN where i = 0 or T(i) is empty), or the row entropy. It reads only the target entries,
//!   so positional kinds cost O(n) per head and token kinds O(n + |T|).
//! * Padding (an optional `mask`, false = padding): padding positions are neither queries (NaN,
//!   left out of every mean, entropy included) nor targets (dropped from every T(i)).
//! * [`TargetMeasure::Top1`]: the value is whether the row's argmax is a target (whole rows are
//!   read, O(n^2) per head); [`Spans`] narrow the scored queries and the target keys, and blocks
//!   of rows with no query to score are never read.
//! * [`head_scores`]: the mean of those over eligible queries, the score of a head, summed
//!   block by block without materialising the per-query values.
//! * [`detection_scores`]: TransformerLens `head_detector`'s `mul` and `abs` formulas, which need
//!   every entry (one streaming pass per head).
//!
//! Work is split into blocks of [`BLOCK_ROWS`] rows of one head; each block is summed in row
//! order and blocks are combined in order, so results do not depend on the number of threads.

use std::ops::Range;

use ndarray::{ArrayD, ArrayView1, ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::diagonals;
use crate::error::{shape_str, Error, Result};
use crate::stack::{group_of_heads, Matrix, MatrixStack, PositionMask, Real};
use crate::targets::{Kind, SparseRows, Targets, TokenChain};
use crate::threads;

/// Rows per parallel task. Fixed (never derived from the thread count) so sums are reproducible.
pub const BLOCK_ROWS: usize = 256;

/// Options shared by the per-query kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreOptions {
    /// Renormalise each row without key 0: A'[i, j] = A[i, j] / (1 - A[i, 0]) for j >= 1.
    /// A row with no mass outside key 0 renormalises to all zeros.
    pub exclude_bos: bool,
    /// What a target kind measures of a row (entropy is always the entropy).
    pub measure: TargetMeasure,
}

/// What the value of a query is for a kind with target set T(i) (DESIGN.md section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetMeasure {
    /// The attention mass on T(i): sum_{j in T(i)} A'[i, j].
    #[default]
    Mass,
    /// 1 where the row's argmax key is in T(i), else 0. The argmax ranges over every key the
    /// query may attend to (keys >= 1 under exclude_bos, no padding; a span on keys does not
    /// narrow it) and ties go to the lowest index. A stored row with no positive entry there
    /// (all of its mass on a dropped BOS) has no argmax: 0.
    Top1,
}

impl std::str::FromStr for TargetMeasure {
    type Err = Error;

    fn from_str(s: &str) -> Result<TargetMeasure> {
        match s {
            "mass" => Ok(TargetMeasure::Mass),
            "top1" => Ok(TargetMeasure::Top1),
            _ => Err(Error::invalid("measure", "\"mass\" or \"top1\"", format!("{s:?}"))),
        }
    }
}

/// Which queries are scored and which keys count as targets (DESIGN.md section 12), each `[n]`
/// or `[lead[0], n]` like tokens (true = inside). Queries outside are not eligible for any kind;
/// keys outside are dropped from every T(i) but the whole-row kinds' (`bos`, `entropy`). Spans
/// only select what is scored: every row's softmax and argmax still range over all its keys.
#[derive(Debug, Clone, Default)]
pub struct Spans<'a> {
    pub queries: Option<ArrayViewD<'a, bool>>,
    pub keys: Option<ArrayViewD<'a, bool>>,
}

/// What the per-query kernels return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Per-query values `[kinds, *lead, n]`, NaN where a query is not eligible.
    PerQuery,
    /// Head scores `[kinds, *lead]`: the mean over eligible queries, NaN where none is.
    Mean,
}

/// Per-query scores, shape `[kinds.len(), *lead, n]`; NaN where a query is not eligible.
///
/// `tokens` is `[n]` (shared by every head) or `[lead[0], n]` (one row per batch element); it is
/// needed only by the token kinds. `mask` (same shapes, false = padding) makes padding
/// positions neither queries nor targets; `spans` narrow the queries and targets further.
/// Non-finite pattern entries that a kind reads are errors.
pub fn per_query_scores<'m, T: Real>(
    patterns: ArrayViewD<'_, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'m, bool>>,
    spans: Spans<'m>,
    kinds: &[Kind],
    options: ScoreOptions,
) -> Result<ArrayD<f64>> {
    stored_scores(patterns, tokens, mask, spans, kinds, options, Reduce::PerQuery)
}

/// Head scores, shape `[kinds.len(), *lead]`: the mean over eligible queries of the per-query
/// scores (NaN where none is eligible), without materialising the per-query values.
pub fn head_scores<'m, T: Real>(
    patterns: ArrayViewD<'_, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'m, bool>>,
    spans: Spans<'m>,
    kinds: &[Kind],
    options: ScoreOptions,
) -> Result<ArrayD<f64>> {
    stored_scores(patterns, tokens, mask, spans, kinds, options, Reduce::Mean)
}

fn stored_scores<'m, T: Real>(
    patterns: ArrayViewD<'_, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    mask: Option<ArrayViewD<'m, bool>>,
    spans: Spans<'m>,
    kinds: &[Kind],
    options: ScoreOptions,
    reduce: Reduce,
) -> Result<ArrayD<f64>> {
    let stack = MatrixStack::new("patterns", patterns)?;
    // Positional kinds of mass without spans only (the predicate says which requests): a strided
    // kernel with the same blocks, sums and errors as the general path below, bit for bit,
    // without its per-block bookkeeping (src/diagonals.rs).
    let fast = diagonals::positional_fast_path(kinds, options, &spans);
    let plan = QueryPlan::new(kinds, tokens.as_ref(), mask, spans, stack.lead(), stack.n(), "the patterns", options)?;
    if fast {
        let valid = |h: usize| plan.mask.as_ref().map(|m| m.row(h));
        return diagonals::positional_scores(&stack, kinds, valid, options, reduce);
    }
    plan.run(
        BLOCK_ROWS,
        reduce,
        None,
        || (),
        |_, h, rows, targets, out| {
            let block = StoredRows::new(&stack, h, rows.clone(), options)?;
            score_block(&block, rows, targets, &mut out.kinds)
        },
    )
}

/// (sum, count) of the eligible per-query values of each kind over one block of rows.
pub(crate) type Partial = Vec<(f64, usize)>;

/// Where one block of rows writes its outputs.
pub(crate) struct BlockOut<'o> {
    /// Per-query values, one slice per kind (the block's rows); empty unless `Reduce::PerQuery`.
    pub(crate) kinds: Vec<&'o mut [f64]>,
    /// One value per row of the block, when the caller of [`QueryPlan::run`] asked for them.
    pub(crate) rows: Option<&'o mut [f64]>,
}

/// A validated per-query request: the kinds, the token chain serving every head and which
/// positions are real tokens. Shared by the scores over stored patterns and the fused scores
/// over q and k (`attention`).
pub(crate) struct QueryPlan<'k, 'm> {
    kinds: &'k [Kind],
    lead: Vec<usize>,
    n: usize,
    group_of: Vec<usize>,
    chains: Vec<TokenChain>,
    mask: Option<PositionMask<'m>>,
    queries: Option<PositionMask<'m>>,
    keys: Option<PositionMask<'m>>,
    first_key: usize,
    top1: bool,
}

/// What one block of rows of one head is scored against: the target set of each kind (None for
/// entropy), the head's padding flags and the first key that counts.
pub(crate) struct BlockTargets<'p> {
    kinds: Vec<Option<Targets<'p>>>,
    /// Which positions are real tokens (None: all). Padding is neither a query nor a target.
    valid: Option<ArrayView1<'p, bool>>,
    /// The query span (None: every query).
    queries: Option<ArrayView1<'p, bool>>,
    /// The key span (None: every key); not applied to `bos`.
    keys: Option<ArrayView1<'p, bool>>,
    /// 1 under exclude_bos (key 0 is no target), else 0.
    first_key: usize,
    /// `TargetMeasure::Top1`: a target kind's value is whether the row's argmax is a target.
    top1: bool,
}

impl<'k, 'm> QueryPlan<'k, 'm> {
    /// Checks offsets against n, tokens and `mask` against `lead` and n (`source` names where
    /// those come from in errors), and that exclude_bos meets no prompt whose position 0 is
    /// padding. Tokens that no kind reads are still checked, so a mismatch never passes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kinds: &'k [Kind],
        tokens: Option<&ArrayViewD<'_, i64>>,
        mask: Option<ArrayViewD<'m, bool>>,
        spans: Spans<'m>,
        lead: &[usize],
        n: usize,
        source: &str,
        options: ScoreOptions,
    ) -> Result<Self> {
        for &kind in kinds {
            kind.check_range(n)?;
        }
        let group_of = match tokens {
            Some(t) => token_groups(t, lead, n, source)?,
            None => vec![0; lead.iter().product()],
        };
        let chains = match (tokens, kinds.iter().find(|k| k.needs_tokens())) {
            (Some(t), Some(_)) => token_rows(t).map(|row| TokenChain::new(&row.to_vec())).collect(),
            (None, Some(kind)) => {
                return Err(Error::invalid(
                    "tokens",
                    format!("a token array, which kind {:?} needs", kind.name()),
                    "None",
                ))
            }
            (_, None) => Vec::new(),
        };
        let mask = mask.map(|m| PositionMask::new(m, lead, n)).transpose()?;
        if let Some(b) = mask.as_ref().filter(|_| options.exclude_bos && n > 0).and_then(|m| m.first_padded_at(0)) {
            return Err(Error::invalid(
                "exclude_bos",
                "attention_mask[b, 0] == 1 in every prompt b (exclude_bos drops position 0, the BOS)",
                format!(
                    "an attention_mask whose position 0 is padding in prompt {b} (left padding: pad on the right instead)"
                ),
            ));
        }
        let queries = spans.queries.map(|m| PositionMask::named("queries", m, lead, n)).transpose()?;
        let keys = spans.keys.map(|m| PositionMask::named("keys", m, lead, n)).transpose()?;
        let first_key = usize::from(options.exclude_bos);
        let top1 = options.measure == TargetMeasure::Top1;
        Ok(QueryPlan { kinds, lead: lead.to_vec(), n, group_of, chains, mask, queries, keys, first_key, top1 })
    }

    /// Scores every block of `block_rows` rows of every head in parallel with
    /// `score(scratch, head, rows, targets, out)` (`scratch` made by `init` once per worker
    /// split; `out.kinds` one slice per kind, empty unless per-query values are wanted;
    /// `out.rows` the block's part of `row_values`, `[*lead, n]` in C order, when given), then
    /// assembles `reduce`'s output. Blocks are combined in a fixed order.
    pub(crate) fn run<S, I, F>(
        &self,
        block_rows: usize,
        reduce: Reduce,
        row_values: Option<&mut [f64]>,
        init: I,
        score: F,
    ) -> Result<ArrayD<f64>>
    where
        I: Fn() -> S + Sync + Send,
        F: Fn(&mut S, usize, Range<usize>, &BlockTargets, &mut BlockOut) -> Result<Partial> + Sync + Send,
    {
        assert!((1..=BLOCK_ROWS).contains(&block_rows), "blocks of 1..={BLOCK_ROWS} rows");
        let (n_kinds, n) = (self.kinds.len(), self.n);
        let n_heads: usize = self.lead.iter().product();
        let blocks = row_blocks(n_heads, n, block_rows);
        let mut values = (reduce == Reduce::PerQuery).then(|| vec![f64::NAN; n_kinds * n_heads * n]);
        let outs = split_outputs(values.as_deref_mut(), blocks.len(), n_heads, n, block_rows);
        if let Some(r) = &row_values {
            assert_eq!(r.len(), n_heads * n, "one row value per row of every head");
        }
        let row_outs = split_outputs(row_values, blocks.len(), n_heads, n, block_rows);
        let partials: Vec<Partial> = threads::install(|| {
            blocks
                .par_iter()
                .zip(outs)
                .zip(row_outs)
                .map_init(init, |scratch, (((h, rows), kinds), mut row_out)| {
                    let chain = self.chains.get(self.group_of[*h]);
                    let targets = BlockTargets {
                        kinds: self.kinds.iter().map(|&k| Targets::of_kind(k, chain)).collect(),
                        valid: self.mask.as_ref().map(|m| m.row(*h)),
                        queries: self.queries.as_ref().map(|m| m.row(*h)),
                        keys: self.keys.as_ref().map(|m| m.row(*h)),
                        first_key: self.first_key,
                        top1: self.top1,
                    };
                    let mut out = BlockOut { kinds, rows: row_out.pop() };
                    // Unless its per-row values are wanted, a block costs nothing without a
                    // query to score (outside the query span, padding), and with a query span
                    // only the rows from its first to its last scored query are computed.
                    if out.rows.is_none() {
                        match targets.scored_rows(rows.clone()) {
                            None => return Ok(vec![(0.0, 0); n_kinds]),
                            Some(scored) if targets.queries.is_some() => {
                                let (a, b) = (scored.start - rows.start, scored.end - rows.start);
                                for slice in out.kinds.iter_mut() {
                                    let whole = std::mem::take(slice);
                                    *slice = &mut whole[a..b];
                                }
                                return score(scratch, *h, scored, &targets, &mut out);
                            }
                            Some(_) => {}
                        }
                    }
                    score(scratch, *h, rows.clone(), &targets, &mut out)
                })
                .collect::<Result<_>>()
        })?;
        let mut shape = vec![n_kinds];
        shape.extend_from_slice(&self.lead);
        let flat = match values {
            Some(values) => {
                shape.push(n);
                values
            }
            None => means(&blocks, &partials, n_kinds, n_heads)?,
        };
        Ok(ArrayD::from_shape_vec(IxDyn(&shape), flat).expect("output length matches its shape"))
    }
}

impl BlockTargets<'_> {
    /// The rows of `rows` from the first to the last query that may be scored (i >= 1, a real
    /// token, inside the query span), None when there is none.
    fn scored_rows(&self, rows: Range<usize>) -> Option<Range<usize>> {
        let scored =
            |i: &usize| self.valid.as_ref().is_none_or(|v| v[*i]) && self.queries.as_ref().is_none_or(|q| q[*i]);
        let first = (rows.start.max(1)..rows.end).find(scored)?;
        let last = (first..rows.end).rev().find(scored).expect("first is scored");
        Some(first..last + 1)
    }
}

/// `[kinds, heads]` means from the partial sums of every block, combined in block order. Only
/// stored patterns of huge finite values can overflow here (fused masses are at most 1).
fn means(blocks: &[(usize, Range<usize>)], partials: &[Partial], n_kinds: usize, n_heads: usize) -> Result<Vec<f64>> {
    let mut totals = vec![(0.0, 0usize); n_kinds * n_heads];
    for ((h, _), partial) in blocks.iter().zip(partials) {
        for (k, (sum, count)) in partial.iter().enumerate() {
            let total = &mut totals[k * n_heads + h];
            total.0 += sum;
            total.1 += count;
        }
    }
    means_of_totals(totals, n_heads)
}

/// The means of `[kinds, heads]` (sum, count) totals, each summed from 0.0 in block order.
pub(crate) fn means_of_totals(totals: Vec<(f64, usize)>, n_heads: usize) -> Result<Vec<f64>> {
    if let Some(k) = totals.iter().position(|(sum, _)| !sum.is_finite()) {
        return Err(overflow("patterns", format!("the sum over the queries of head {} (flat)", k % n_heads.max(1))));
    }
    Ok(totals.into_iter().map(|(sum, count)| if count == 0 { f64::NAN } else { sum / count as f64 }).collect())
}

/// Per block (in `row_blocks` order), one output slice per slab of `n_heads * n` values of `out`
/// (one per kind, or a single one of per-row values); empty lists without `out`.
fn split_outputs(
    out: Option<&mut [f64]>,
    n_blocks: usize,
    n_heads: usize,
    n: usize,
    block_rows: usize,
) -> Vec<Vec<&mut [f64]>> {
    let Some(out) = out.filter(|o| !o.is_empty()) else {
        return (0..n_blocks).map(|_| Vec::new()).collect();
    };
    let mut per_kind: Vec<_> = out
        .chunks_mut(n_heads * n)
        .map(|slab| slab.chunks_mut(n).flat_map(|head| head.chunks_mut(block_rows)).collect::<Vec<_>>().into_iter())
        .collect();
    (0..n_blocks)
        .map(|_| per_kind.iter_mut().map(|blocks| blocks.next().expect("one slice per block")).collect())
        .collect()
}

/// The token row of every head, after checking tokens are `[n]` or `[g, n]` with g broadcasting
/// against the first leading axis.
fn token_groups(tokens: &ArrayViewD<'_, i64>, lead: &[usize], n: usize, source: &str) -> Result<Vec<usize>> {
    let shape = tokens.shape();
    if !(1..=2).contains(&shape.len()) || shape[shape.len() - 1] != n {
        let expected = match lead.first() {
            Some(b) => format!("shape ({n},) or ({b}, {n}) to match {source}"),
            None => format!("shape ({n},) to match {source}"),
        };
        return Err(Error::invalid("tokens", expected, format!("shape {}", shape_str(shape))));
    }
    group_of_heads("tokens", lead, &shape[..shape.len() - 1])
}

/// The rows of a `[n]` or `[g, n]` token array.
fn token_rows<'a>(tokens: &'a ArrayViewD<'_, i64>) -> Box<dyn Iterator<Item = ArrayView1<'a, i64>> + 'a> {
    if tokens.ndim() == 1 {
        Box::new(std::iter::once(tokens.view().into_dimensionality().expect("1-d tokens")))
    } else {
        Box::new(tokens.outer_iter().map(|r| r.into_dimensionality().expect("2-d tokens")))
    }
}

/// Every (head, row range) block, in output order. Fixed-size blocks (never derived from the
/// thread count) keep partial sums, and so results, reproducible.
fn row_blocks(n_heads: usize, n: usize, block_rows: usize) -> Vec<(usize, Range<usize>)> {
    (0..n_heads).flat_map(|h| (0..n).step_by(block_rows).map(move |s| (h, s..(s + block_rows).min(n)))).collect()
}

pub(crate) fn non_finite<T: Real>(stack: &MatrixStack<'_, T>, h: usize, i: usize, j: usize, v: f64) -> Error {
    Error::invalid("patterns", "finite values", format!("{v} at index {}", stack.index_str(h, i, j)))
}

/// The error for the first non-finite entry among `columns` of row i (called once a sum over
/// them came out non-finite, so the hot loops need no per-entry check). When every entry is
/// finite, the sum itself overflowed: say so rather than blame an entry.
fn first_non_finite<T: Real>(
    stack: &MatrixStack<'_, T>,
    a: &Matrix<'_, T>,
    h: usize,
    i: usize,
    columns: impl IntoIterator<Item = usize>,
) -> Error {
    match columns.into_iter().find(|&j| !a.get(i, j).to_f64().is_finite()) {
        Some(j) => non_finite(stack, h, i, j, a.get(i, j).to_f64()),
        None => overflow("patterns", format!("row {i} of head {}", stack.lead_str(h))),
    }
}

/// Finite values whose sum (or product) overflowed to infinity.
pub(crate) fn overflow(arg: &'static str, place: String) -> Error {
    Error::invalid(
        arg,
        "values small enough that their sums and products stay finite",
        format!("an overflow in {place}"),
    )
}

/// The rows of one block of one head's pattern, as the per-query kernel reads them. Stored
/// patterns ([`StoredRows`]) and the fused q·k kernel (`attention`, which computes an entry
/// only when it is read) both implement it, so the kind and eligibility logic of
/// [`score_block`] exists once.
pub(crate) trait QueryRows {
    /// A[i, j] before any renormalisation.
    fn entry(&self, i: usize, j: usize) -> f64;
    /// Hint that A[i, j] is read soon.
    fn prefetch(&self, _i: usize, _j: usize) {}
    /// The factor applied to row i's target mass (the exclude_bos renormalisation).
    fn scale(&self, i: usize) -> f64;
    /// -sum p log p over the renormalised row i, keys j >= first_key (0 log 0 = 0).
    fn entropy(&self, i: usize, first_key: usize) -> Result<f64>;
    /// The lowest-index key j >= first_key with `real(j)` holding row i's largest entry, None
    /// where the row has no positive entry there (see [`TargetMeasure::Top1`]).
    fn argmax(&self, i: usize, first_key: usize, real: impl Fn(usize) -> bool) -> Result<Option<usize>>;
    /// The error for row i whose mass over target `columns` came out NaN or infinite (no columns:
    /// a sum over rows from i overflowed).
    fn non_finite(&self, i: usize, columns: &[usize]) -> Error;
}

/// Scores rows `rows` (at most BLOCK_ROWS): writes per-query values into `out` (one slice per
/// kind, when given) and returns each kind's (sum, count) over eligible rows: i >= 1, i a real
/// token inside the query span, and a target j in T(i) with j >= first_key, j a real token and
/// (but for `bos`) inside the key span (entropy: every real row i >= 1 in the query span).
pub(crate) fn score_block(
    block: &impl QueryRows,
    rows: Range<usize>,
    targets: &BlockTargets,
    out: &mut [&mut [f64]],
) -> Result<Partial> {
    // One monomorphised copy per case, so unpadded, unspanned input pays nothing for the checks.
    match (&targets.valid, &targets.queries, &targets.keys) {
        (None, None, None) => score_rows(block, rows, targets, |_| true, |_| true, |_| true, out),
        (valid, queries, keys) => {
            let real = |j: usize| valid.as_ref().is_none_or(|v| v[j]);
            let query = |i: usize| real(i) && queries.as_ref().is_none_or(|q| q[i]);
            let key = |j: usize| real(j) && keys.as_ref().is_none_or(|k| k[j]);
            score_rows(block, rows, targets, real, query, key, out)
        }
    }
}

/// No argmax (a row not scored, or with no positive entry).
const NO_KEY: usize = usize::MAX;

#[allow(clippy::too_many_arguments)]
fn score_rows(
    block: &impl QueryRows,
    rows: Range<usize>,
    targets: &BlockTargets,
    real: impl Fn(usize) -> bool + Copy,
    query: impl Fn(usize) -> bool + Copy,
    key: impl Fn(usize) -> bool + Copy,
    out: &mut [&mut [f64]],
) -> Result<Partial> {
    let (start, len, first_key) = (rows.start, rows.len(), targets.first_key);
    let eligible = rows.start.max(1)..rows.end; // query 0 is never eligible
    let mut partial = Vec::with_capacity(targets.kinds.len());
    // Per-row target mass (or top-1 hit) and target count of the current kind.
    let mut mass = [0.0f64; BLOCK_ROWS];
    let mut hits = [0u32; BLOCK_ROWS];
    // Top-1: each scored row's argmax, computed once for every kind.
    let mut best = [NO_KEY; BLOCK_ROWS];
    if targets.top1 && targets.kinds.iter().any(Option::is_some) {
        for i in eligible.clone().filter(|&i| query(i)) {
            best[i - start] = block.argmax(i, first_key, real)?.unwrap_or(NO_KEY);
        }
    }
    for (k, t) in targets.kinds.iter().enumerate() {
        let mut out_k = out.get_mut(k).map(|o| &mut **o);
        let (mut sum, mut count) = (0.0, 0usize);
        let Some(t) = t else {
            for i in eligible.clone().filter(|&i| query(i)) {
                let value = block.entropy(i, first_key)?;
                sum += value;
                count += 1;
                if let Some(o) = out_k.as_deref_mut() {
                    o[i - start] = value;
                }
            }
            partial.push((sum, count));
            continue;
        };
        mass[..len].fill(0.0);
        hits[..len].fill(0);
        // The key span narrows target sets, not the whole-row bos.
        let target = |j: usize| j >= first_key && if matches!(t, Targets::Bos) { real(j) } else { key(j) };
        if targets.top1 {
            t.for_each_in_rows(
                rows.clone(),
                |_, _| {},
                |i, j, _| {
                    if target(j) {
                        mass[i - start] = if j == best[i - start] { 1.0 } else { mass[i - start] };
                        hits[i - start] += 1;
                    }
                },
            );
        } else {
            t.for_each_in_rows(
                rows.clone(),
                |i, j| block.prefetch(i, j),
                |i, j, w| {
                    if target(j) {
                        mass[i - start] += w * block.entry(i, j);
                        hits[i - start] += 1;
                    }
                },
            );
        }
        let scaled = !targets.top1;
        (sum, count) = collect_masses(block, eligible.clone(), start, &mass, &hits, query, scaled, out_k);
        // A non-finite entry makes its row's mass, and so the sum, non-finite: look for it
        // only then, so the loops above need no per-entry check.
        if !sum.is_finite() {
            // A row whose own mass is not finite, else the sum over rows overflowed (no columns).
            let (i, columns) = match eligible.clone().find(|&i| query(i) && !mass[i - start].is_finite()) {
                Some(i) => {
                    let mut columns = Vec::new();
                    t.for_each(i, |j, _| columns.push(j));
                    (i, columns)
                }
                None => (eligible.start, Vec::new()),
            };
            return Err(block.non_finite(i, &columns));
        }
        partial.push((sum, count));
    }
    Ok(partial)
}

/// Sum and count of the masses (scaled by the exclude_bos factor when `scaled`) of the scored
/// rows with a target, written to `out` when given. A function of its own so the running sum
/// stays in a register.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn collect_masses(
    block: &impl QueryRows,
    eligible: Range<usize>,
    start: usize,
    mass: &[f64; BLOCK_ROWS],
    hits: &[u32; BLOCK_ROWS],
    query: impl Fn(usize) -> bool,
    scaled: bool,
    mut out: Option<&mut [f64]>,
) -> (f64, usize) {
    let (mut sum, mut count) = (0.0, 0usize);
    for i in eligible {
        let r = i - start;
        if hits[r] > 0 && query(i) {
            let value = if scaled { mass[r] * block.scale(i) } else { mass[r] };
            sum += value;
            count += 1;
            if let Some(o) = out.as_deref_mut() {
                o[r] = value;
            }
        }
    }
    (sum, count)
}

/// A block of rows of one head of a stored pattern stack.
struct StoredRows<'s, 'a, T> {
    stack: &'s MatrixStack<'a, T>,
    a: Matrix<'s, T>,
    h: usize,
    start: usize,
    /// With exclude_bos, per row 1 / (1 - A[i, 0]) (0 for a row with no mass outside key 0,
    /// which renormalises to all zeros); empty without it (every scale is 1).
    scales: Vec<f64>,
}

impl<'s, 'a, T: Real> StoredRows<'s, 'a, T> {
    fn new(stack: &'s MatrixStack<'a, T>, h: usize, rows: Range<usize>, options: ScoreOptions) -> Result<Self> {
        let a = stack.head(h);
        let mut scales = Vec::new();
        if options.exclude_bos {
            for i in rows.clone() {
                let bos = a.get(i, 0).to_f64();
                if !bos.is_finite() {
                    return Err(non_finite(stack, h, i, 0, bos));
                }
                scales.push(if bos < 1.0 { 1.0 / (1.0 - bos) } else { 0.0 });
            }
        }
        Ok(StoredRows { stack, a, h, start: rows.start, scales })
    }
}

impl<T: Real> QueryRows for StoredRows<'_, '_, T> {
    #[inline(always)]
    fn entry(&self, i: usize, j: usize) -> f64 {
        self.a.get(i, j).to_f64()
    }

    #[inline(always)]
    fn prefetch(&self, i: usize, j: usize) {
        self.a.prefetch(i, j)
    }

    #[inline(always)]
    fn scale(&self, i: usize) -> f64 {
        if self.scales.is_empty() {
            1.0
        } else {
            self.scales[i - self.start]
        }
    }

    fn entropy(&self, i: usize, first_key: usize) -> Result<f64> {
        let scale = self.scale(i);
        let mut entropy = 0.0;
        for (j, v) in self.a.row(i).enumerate().skip(first_key) {
            let v = v.to_f64();
            if !v.is_finite() {
                return Err(non_finite(self.stack, self.h, i, j, v));
            }
            let p = v * scale;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        if !entropy.is_finite() {
            return Err(overflow(
                "patterns",
                format!("the entropy of row {i} of head {}", self.stack.lead_str(self.h)),
            ));
        }
        Ok(entropy)
    }

    fn argmax(&self, i: usize, first_key: usize, real: impl Fn(usize) -> bool) -> Result<Option<usize>> {
        let (mut best, mut at) = (0.0f64, None);
        for (j, v) in self.a.row(i).enumerate().skip(first_key) {
            let v = v.to_f64();
            if !v.is_finite() {
                return Err(non_finite(self.stack, self.h, i, j, v));
            }
            // Strictly greater: ties go to the lowest index; zeros never win.
            if v > best && real(j) {
                (best, at) = (v, Some(j));
            }
        }
        Ok(at)
    }

    fn non_finite(&self, i: usize, columns: &[usize]) -> Error {
        first_non_finite(self.stack, &self.a, self.h, i, columns.iter().copied())
    }
}

/// How `detection_scores` compares a pattern with its detection matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// sum(A * D) / sum(A).
    Mul,
    /// 1 - sum(|A - D|) / n (TransformerLens rounds this to 3 decimals; we do not).
    Abs,
}

impl std::str::FromStr for Measure {
    type Err = Error;
    fn from_str(s: &str) -> Result<Measure> {
        match s {
            "mul" => Ok(Measure::Mul),
            "abs" => Ok(Measure::Abs),
            _ => Err(Error::invalid("measure", "\"mul\" or \"abs\"", format!("{s:?}"))),
        }
    }
}

/// What a head's pattern is compared with in `detection_scores`.
pub enum Detection<'a> {
    /// The 0/1 matrix of a target kind (not `Entropy`).
    Kind(Kind),
    /// Explicit matrices `[*dlead, n, n]`, `dlead` broadcasting against the patterns' lead axes
    /// (aligned from the left, each axis 1 or equal).
    Matrices(ArrayViewD<'a, f64>),
}

/// Which columns TransformerLens zeroes before comparing.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetectionOptions {
    pub exclude_bos: bool,
    pub exclude_current_token: bool,
}

/// TransformerLens `head_detector` scores, shape `[*lead]`.
///
/// With A' = A with column 0 (exclude_bos) and the diagonal (exclude_current_token) zeroed:
/// `mul` = sum(A' * D) / sum(A'); `abs` = 1 - sum(|A - D| zeroed the same way) / n.
pub fn detection_scores<T: Real>(
    patterns: ArrayViewD<'_, T>,
    detection: Detection<'_>,
    tokens: Option<ArrayViewD<'_, i64>>,
    measure: Measure,
    options: DetectionOptions,
) -> Result<ArrayD<f64>> {
    let d = match detection {
        Detection::Kind(kind) => {
            let all = detection_scores_of_kinds(patterns, &[kind], tokens, measure, options)?;
            return Ok(all.index_axis_move(ndarray::Axis(0), 0));
        }
        Detection::Matrices(d) => d,
    };
    let stack = MatrixStack::new("patterns", patterns)?;
    let n = stack.n();
    let matrices = MatrixStack::new("detection", d)?;
    if matrices.n() != n {
        return Err(Error::invalid(
            "detection",
            format!("matrices of shape ({n}, {n}) like the patterns"),
            format!("({0}, {0})", matrices.n()),
        ));
    }
    let group_of = group_of_heads("detection", stack.lead(), matrices.lead())?;
    let sparse = (0..matrices.n_heads())
        .map(|g| SparseRows::from_dense("detection", matrices.head(g)))
        .collect::<Result<Vec<_>>>()?;
    // Products with explicit weights can overflow: the detection matrices are to blame.
    let scores =
        detection_pass(&stack, 1, |h| vec![Targets::Sparse(&sparse[group_of[h]])], measure, options, "detection")?;
    Ok(ArrayD::from_shape_vec(IxDyn(stack.lead()), scores).expect("one score per head"))
}

/// [`detection_scores`] of several kinds at once, shape `[kinds.len(), *lead]`, in one pass over
/// the patterns: the row sums (the whole cost) are shared, each kind only adds its targets.
/// Each kind's value is bit for bit the one a call with that kind alone gives.
pub fn detection_scores_of_kinds<T: Real>(
    patterns: ArrayViewD<'_, T>,
    kinds: &[Kind],
    tokens: Option<ArrayViewD<'_, i64>>,
    measure: Measure,
    options: DetectionOptions,
) -> Result<ArrayD<f64>> {
    let stack = MatrixStack::new("patterns", patterns)?;
    if kinds.contains(&Kind::Entropy) {
        return Err(Error::invalid("detection", "a target kind or a 0/1 array", "\"entropy\""));
    }
    // One target table per group of heads (a token row); tokens are checked even when unused.
    let plan = QueryPlan::new(
        kinds,
        tokens.as_ref(),
        None,
        Spans::default(),
        stack.lead(),
        stack.n(),
        "the patterns",
        ScoreOptions::default(),
    )?;
    let targets_of = |h: usize| {
        let chain = plan.chains.get(plan.group_of[h]);
        kinds.iter().map(|&k| Targets::of_kind(k, chain).expect("not entropy")).collect()
    };
    // With 0/1 kinds only the patterns can overflow a product.
    let scores = detection_pass(&stack, kinds.len(), targets_of, measure, options, "patterns")?;
    let mut shape = vec![kinds.len()];
    shape.extend_from_slice(stack.lead());
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), scores).expect("one score per kind and head"))
}

/// Scores `[n_targets, heads]` (flat) of every head against the `n_targets` target tables
/// `targets_of(h)` gives for it, blocks of [`BLOCK_ROWS`] rows in parallel, combined in order.
fn detection_pass<'t, T: Real>(
    stack: &MatrixStack<'_, T>,
    n_targets: usize,
    targets_of: impl Fn(usize) -> Vec<Targets<'t>> + Sync,
    measure: Measure,
    options: DetectionOptions,
    weights_arg: &'static str,
) -> Result<Vec<f64>> {
    let (n, n_heads) = (stack.n(), stack.n_heads());
    let blocks = row_blocks(n_heads, n, BLOCK_ROWS);
    let partials: Vec<Vec<(f64, f64)>> = threads::install(|| {
        blocks
            .par_iter()
            .map(|(h, rows)| detection_rows(stack, *h, rows.clone(), &targets_of(*h), measure, options, weights_arg))
            .collect::<Result<_>>()
    })?;
    let mut totals = vec![(0.0, 0.0); n_targets * n_heads];
    for ((h, _), partial) in blocks.iter().zip(partials) {
        for (k, (x, y)) in partial.into_iter().enumerate() {
            totals[k * n_heads + h].0 += x;
            totals[k * n_heads + h].1 += y;
        }
    }
    if let Some(at) = totals.iter().position(|(x, y)| !(x.is_finite() && y.is_finite())) {
        let h = at % n_heads;
        return Err(overflow(weights_arg, format!("the sums over the rows of head {}", stack.lead_str(h))));
    }
    Ok(totals
        .into_iter()
        .map(|(x, y)| match measure {
            Measure::Mul => x / y,
            Measure::Abs => 1.0 - x / n as f64,
        })
        .collect())
}

/// For rows of one head, per target table: (sum(A' * D), sum(A')) for `mul`, (sum |A - D|
/// zeroed, 0) for `abs`. The kept row sum, the only O(n) work per row, is computed once for all
/// tables; each table's sums follow the same order as when it is alone.
fn detection_rows<T: Real>(
    stack: &MatrixStack<'_, T>,
    h: usize,
    rows: Range<usize>,
    targets: &[Targets],
    measure: Measure,
    options: DetectionOptions,
    weights_arg: &'static str,
) -> Result<Vec<(f64, f64)>> {
    let a = stack.head(h);
    let n = stack.n();
    let first = usize::from(options.exclude_bos);
    let zeroed = |i: usize, j: usize| j < first || (options.exclude_current_token && j == i);
    let mut totals = vec![(0.0, 0.0); targets.len()];
    let abs = measure == Measure::Abs;
    for i in rows {
        // Sum only the kept entries: subtracting the zeroed ones from a full sum would cancel
        // catastrophically when they hold nearly all the mass.
        let kept = if options.exclude_current_token && i >= first {
            range_sum(&a, i, first..i, abs) + range_sum(&a, i, i + 1..n, abs)
        } else {
            range_sum(&a, i, first..n, abs)
        };
        if !kept.is_finite() {
            return Err(first_non_finite(stack, &a, h, i, (0..n).filter(|&j| !zeroed(i, j))));
        }
        for (t, total) in targets.iter().zip(totals.iter_mut()) {
            // Entries read here are finite: the kept sum was.
            let mut matched = 0.0;
            t.for_each(i, |j, w| {
                if !zeroed(i, j) {
                    let v = a.get(i, j).to_f64();
                    matched += if abs { (v - w).abs() - v.abs() } else { v * w };
                }
            });
            if !matched.is_finite() {
                return Err(overflow(
                    weights_arg,
                    format!("comparing row {i} of head {} with the detection pattern", stack.lead_str(h)),
                ));
            }
            match measure {
                Measure::Mul => {
                    total.0 += matched;
                    total.1 += kept;
                }
                Measure::Abs => total.0 += kept + matched,
            }
        }
    }
    Ok(totals)
}

/// Sum (or sum of absolute values) of A[i, cols] in f64 (see [`Real::sum_widened`]).
fn range_sum<T: Real>(a: &Matrix<'_, T>, i: usize, cols: Range<usize>, abs: bool) -> f64 {
    match a.row_slice(i) {
        Some(row) => T::sum_widened(&row[cols], abs),
        None => cols.map(|j| a.get(i, j).to_f64()).map(|v| if abs { v.abs() } else { v }).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, Array, ArrayD};

    /// Uniform causal attention: A[i, j] = 1 / (i + 1) for j <= i.
    fn uniform(n: usize) -> ArrayD<f64> {
        Array::from_shape_fn((n, n), |(i, j)| if j <= i { 1.0 / (i + 1) as f64 } else { 0.0 }).into_dyn()
    }

    #[test]
    fn per_query_values_follow_the_target_table() {
        let a = uniform(4);
        let tokens = arr1(&[7i64, 5, 7, 5]).into_dyn();
        let kinds = [Kind::PreviousToken, Kind::DuplicateToken, Kind::Induction];
        let q =
            per_query_scores(a.view(), Some(tokens.view()), None, Spans::default(), &kinds, ScoreOptions::default())
                .unwrap();
        assert_eq!(q.shape(), &[3, 4]);
        let row = |k: usize| q.index_axis(ndarray::Axis(0), k).iter().copied().collect::<Vec<f64>>();
        let nan = f64::NAN;
        let same = |x: Vec<f64>, y: [f64; 4]| x.iter().zip(y).all(|(a, b)| a == &b || (a.is_nan() && b.is_nan()));
        assert!(same(row(0), [nan, 0.5, 1.0 / 3.0, 0.25]));
        assert!(same(row(1), [nan, nan, 1.0 / 3.0, 0.25]));
        assert!(same(row(2), [nan, nan, 1.0 / 3.0, 0.25]));
        let means = head_scores(a.view(), Some(tokens.view()), None, Spans::default(), &kinds, ScoreOptions::default())
            .unwrap();
        assert!((means[[0]] - (0.5 + 1.0 / 3.0 + 0.25) / 3.0).abs() < 1e-15);
        assert!((means[[1]] - (1.0 / 3.0 + 0.25) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn exclude_bos_renormalises_rows_and_drops_key_zero() {
        let a = arr2(&[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]]).into_dyn();
        let options = ScoreOptions { exclude_bos: true, ..Default::default() };
        let s = head_scores(
            a.view(),
            None,
            None,
            Spans::default(),
            &[Kind::PreviousToken, Kind::Bos, Kind::SelfToken],
            options,
        )
        .unwrap();
        // previous_token: row 1's target is key 0 (dropped); row 2: 0.25 / 0.5.
        assert_eq!(s[[0]], 0.5);
        assert!(s[[1]].is_nan());
        assert_eq!(s[[2]], (1.0 + 0.5) / 2.0);
    }

    #[test]
    fn missing_tokens_and_bad_offsets_are_named_errors() {
        let a = uniform(3);
        let err = head_scores(a.view(), None, None, Spans::default(), &[Kind::Induction], ScoreOptions::default())
            .unwrap_err();
        assert_eq!(err.arg, "tokens");
        let err = head_scores(a.view(), None, None, Spans::default(), &[Kind::Offset(3)], ScoreOptions::default())
            .unwrap_err();
        assert_eq!(err.arg, "offset");
        let short = arr1(&[1i64, 2]).into_dyn();
        let err =
            head_scores(a.view(), Some(short.view()), None, Spans::default(), &[Kind::Bos], ScoreOptions::default())
                .unwrap_err();
        assert_eq!(err.arg, "tokens");
        let mut bad = uniform(3);
        bad[[2, 1]] = f64::NAN;
        let err =
            head_scores(bad.view(), None, None, Spans::default(), &[Kind::PreviousToken], ScoreOptions::default())
                .unwrap_err();
        assert!(err.got.contains("(2, 1)"), "{err}");
    }

    #[test]
    fn detection_matches_the_transformer_lens_formulas() {
        let a = uniform(3);
        let mul = detection_scores(
            a.view(),
            Detection::Kind(Kind::PreviousToken),
            None,
            Measure::Mul,
            DetectionOptions::default(),
        )
        .unwrap();
        // sum(A * D) / sum(A) = (1/2 + 1/3) / 3.
        assert!((mul[[]] - (0.5 + 1.0 / 3.0) / 3.0).abs() < 1e-15);
        let abs = detection_scores(
            a.view(),
            Detection::Kind(Kind::PreviousToken),
            None,
            Measure::Abs,
            DetectionOptions::default(),
        )
        .unwrap();
        // |A - D| row sums: 1, 1, 4/3 -> 1 - (10/3) / 3.
        assert!((abs[[]] - (1.0 - (10.0 / 3.0) / 3.0)).abs() < 1e-15);
        let d = arr2(&[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).into_dyn();
        let explicit =
            detection_scores(a.view(), Detection::Matrices(d.view()), None, Measure::Mul, DetectionOptions::default())
                .unwrap();
        assert_eq!(explicit, mul);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let n = 600; // several row blocks per head
        let a =
            Array::from_shape_fn(
                (3, n, n),
                |(h, i, j)| if j <= i { ((h * 31 + i * 7 + j * 13) % 17) as f32 + 0.5 } else { 0.0 },
            )
            .into_dyn();
        let tokens = Array::from_shape_fn(n, |i| (i % 37) as i64).into_dyn();
        let kinds = [Kind::PreviousToken, Kind::Induction, Kind::Entropy];
        let run = || {
            let s = head_scores(
                a.view(),
                Some(tokens.view()),
                None,
                Spans::default(),
                &kinds,
                ScoreOptions { exclude_bos: true, ..Default::default() },
            )
            .unwrap();
            let d = detection_scores(
                a.view(),
                Detection::Kind(Kind::Induction),
                Some(tokens.view()),
                Measure::Abs,
                DetectionOptions::default(),
            )
            .unwrap();
            (s, d)
        };
        let _guard = threads::RESIZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        threads::set_num_threads(1).unwrap();
        let one = run();
        threads::set_num_threads(2).unwrap();
        let two = run();
        assert_eq!(
            one.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            two.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(one.1, two.1);
    }

    #[test]
    fn top1_copy_and_spans_follow_the_definitions() {
        // Row i puts 0.6 on key argmax[i] (rows 1.. only), the rest spread over j <= i.
        let argmax = [0usize, 0, 0, 1, 2, 5];
        let a = ndarray::Array2::from_shape_fn((6, 6), |(i, j)| {
            let spread = if j <= i { 0.4 / (i + 1) as f64 } else { 0.0 };
            spread + if j == argmax[i] { 0.6 } else { 0.0 }
        })
        .into_dyn();
        let tokens = arr1(&[5i64, 1, 2, 5, 1, 2]).into_dyn();
        let top1 = ScoreOptions { measure: TargetMeasure::Top1, ..Default::default() };
        let run = |spans: Spans<'_>, kinds: &[Kind]| {
            per_query_scores(a.view(), Some(tokens.view()), None, spans, kinds, top1).unwrap()
        };
        let q = run(Spans::default(), &[Kind::Copy, Kind::PreviousToken]);
        let nan = f64::NAN;
        let same = |got: Vec<f64>, want: [f64; 6]| {
            assert!(got.iter().zip(want).all(|(g, w)| g == &w || (g.is_nan() && w.is_nan())), "{got:?} vs {want:?}");
        };
        // copy: T(2) = {0}, T(3) = {1}, T(4) = {2}; T(1) is empty, query 5 has no next token.
        same(q.slice(ndarray::s![0, ..]).to_vec(), [nan, nan, 1.0, 1.0, 1.0, nan]);
        // previous_token: a hit only where the argmax is i - 1 (row 1).
        same(q.slice(ndarray::s![1, ..]).to_vec(), [nan, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // Spans: queries 3.. only; key 1 outside (drops T(3) of copy, and row 2's previous token).
        let queries = arr1(&[false, false, false, true, true, true]).into_dyn();
        let keys = arr1(&[true, false, true, true, true, true]).into_dyn();
        let spans = Spans { queries: Some(queries.view()), keys: Some(keys.view()) };
        let q = run(spans, &[Kind::Copy, Kind::Bos]);
        same(q.slice(ndarray::s![0, ..]).to_vec(), [nan, nan, nan, nan, 1.0, nan]);
        // bos keeps key 0 whatever the key span says; the argmax of row 5 is key 5.
        same(q.slice(ndarray::s![1, ..]).to_vec(), [nan, nan, nan, 0.0, 0.0, 0.0]);
        assert!("top2".parse::<TargetMeasure>().unwrap_err().to_string().starts_with("measure:"));
    }

    #[test]
    fn padding_is_neither_query_nor_target() {
        // Two prompts over one uniform pattern: prompt 1 pads positions 3 and 4 on the right,
        // prompt 0 has a padding position 1 in the middle.
        let a = uniform(5);
        let a = ndarray::stack(ndarray::Axis(0), &[a.view(), a.view()]).unwrap();
        let tokens = arr1(&[4i64, 4, 4, 4, 4]).into_dyn();
        let mask = arr2(&[[true, false, true, true, true], [true, true, true, false, false]]).into_dyn();
        let kinds = [Kind::PreviousToken, Kind::DuplicateToken, Kind::Bos, Kind::Entropy];
        let q = per_query_scores(
            a.view(),
            Some(tokens.view()),
            Some(mask.view()),
            Spans::default(),
            &kinds,
            ScoreOptions::default(),
        )
        .unwrap();
        let nan = f64::NAN;
        let same = |k: usize, b: usize, want: [f64; 5]| {
            let got = q.slice(ndarray::s![k, b, ..]).to_vec();
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-15 || (g.is_nan() && w.is_nan())),
                "{k} {b}: {got:?}"
            );
        };
        // previous_token: query 1 is padding; query 2's target (key 1) is padding.
        same(0, 0, [nan, nan, nan, 0.25, 0.2]);
        same(0, 1, [nan, 0.5, 1.0 / 3.0, nan, nan]);
        // duplicate_token: every earlier real key.
        same(1, 0, [nan, nan, 1.0 / 3.0, 0.5, 0.6]);
        same(1, 1, [nan, 0.5, 2.0 / 3.0, nan, nan]);
        same(2, 1, [nan, 0.5, 1.0 / 3.0, nan, nan]);
        // entropy: real queries only.
        let h = |i: usize| ((i + 1) as f64).ln();
        same(3, 0, [nan, nan, h(2), h(3), h(4)]);
        same(3, 1, [nan, h(1), h(2), nan, nan]);
        let means = head_scores(
            a.view(),
            Some(tokens.view()),
            Some(mask.view()),
            Spans::default(),
            &kinds,
            ScoreOptions::default(),
        )
        .unwrap();
        assert!((means[[0, 1]] - (0.5 + 1.0 / 3.0) / 2.0).abs() < 1e-15);
        assert!((means[[3, 0]] - (h(2) + h(3) + h(4)) / 3.0).abs() < 1e-15);
        // A [n] mask is shared by every head; NaN in padding rows is never read.
        let mut bad = a.clone();
        bad[[0, 1, 0]] = f64::NAN;
        let shared = arr1(&[true, false, true, true, true]).into_dyn();
        let s = head_scores(
            bad.view(),
            None,
            Some(shared.view()),
            Spans::default(),
            &[Kind::PreviousToken],
            ScoreOptions::default(),
        )
        .unwrap();
        assert!((s[[0, 0]] - (0.25 + 0.2) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn padding_masks_are_checked() {
        let a = ndarray::stack(ndarray::Axis(0), &[uniform(3).view(), uniform(3).view()]).unwrap();
        let opts = ScoreOptions::default();
        let wrong = Array::from_elem(IxDyn(&[2, 4]), true);
        let e = head_scores(a.view(), None, Some(wrong.view()), Spans::default(), &[Kind::Bos], opts)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("attention_mask:") && e.contains("(2, 3)") && e.contains("got shape (2, 4)"), "{e}");
        let batch = Array::from_elem(IxDyn(&[3, 3]), true);
        assert_eq!(
            head_scores(a.view(), None, Some(batch.view()), Spans::default(), &[Kind::Bos], opts).unwrap_err().arg,
            "attention_mask"
        );
        let mut left = Array::from_elem(IxDyn(&[2, 3]), true);
        left[[1, 0]] = false;
        let bos = ScoreOptions { exclude_bos: true, ..Default::default() };
        let e = head_scores(a.view(), None, Some(left.view()), Spans::default(), &[Kind::Bos], bos)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("exclude_bos:") && e.contains("attention_mask") && e.contains("prompt 1"), "{e}");
        // Right padding is fine with exclude_bos.
        let mut right = Array::from_elem(IxDyn(&[2, 3]), true);
        right[[1, 2]] = false;
        assert!(head_scores(a.view(), None, Some(right.view()), Spans::default(), &[Kind::Bos], bos).is_ok());
    }
}
