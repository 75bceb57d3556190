//! Kernels over attention patterns `[*lead, n, n]` (rows are queries, columns keys).
//!
//! * [`per_query_scores`]: for each kind and query i, the attention mass on the targets T(i)
//!   (NaN where i = 0 or T(i) is empty), or the row entropy. It reads only the target entries,
//!   so positional kinds cost O(n) per head and token kinds O(n + |T|).
//! * [`mean_scores`]: the mean over eligible queries, the score of a head.
//! * [`detection_scores`]: TransformerLens `head_detector`'s `mul` and `abs` formulas, which need
//!   every entry (one streaming pass per head).
//!
//! Work is split into blocks of [`BLOCK_ROWS`] rows of one head; each block is summed in row
//! order and blocks are combined in order, so results do not depend on the number of threads.
//!
//! The per-query logic (targets j >= first_key, eligibility, exclude_bos renormalisation,
//! entropy) is `query_values` over a `QueryRow`; `attention::scores_from_qk` implements that
//! trait for rows it never stores, so both kernels score a row the same way.

use std::ops::Range;

use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::error::{shape_str, Error, Result};
use crate::stack::{group_of_heads, MatrixStack, Real};
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
}

/// Per-query scores, shape `[kinds.len(), *lead, n]`.
///
/// `tokens` is `[n]` (shared by every head) or `[lead[0], n]` (one row per batch element); it is
/// needed only by the token kinds. Non-finite pattern entries that a kind reads are errors.
pub fn per_query_scores<T: Real>(
    patterns: ArrayViewD<'_, T>,
    tokens: Option<ArrayViewD<'_, i64>>,
    kinds: &[Kind],
    options: ScoreOptions,
) -> Result<ArrayD<f64>> {
    let stack = MatrixStack::new("patterns", patterns)?;
    let n = stack.n();
    for &kind in kinds {
        kind.check_range(n)?;
    }
    let (chains, group_of) = token_groups(tokens.as_ref(), kinds, stack.lead(), n, "the patterns")?;

    let blocks = row_blocks(stack.n_heads(), n, BLOCK_ROWS);
    let results: Vec<Vec<f64>> = threads::install(|| {
        blocks
            .par_iter()
            .map(|(h, rows)| {
                let chain = chains.get(group_of[*h]);
                let targets: Vec<Option<Targets>> = kinds.iter().map(|&k| Targets::of_kind(k, chain)).collect();
                score_rows(&stack, *h, rows.clone(), &targets, options)
            })
            .collect::<Result<_>>()
    })?;

    Ok(assemble_per_query(&blocks, &results, kinds.len(), stack.lead(), n))
}

/// Mean over the last axis of the eligible (non-NaN) entries; NaN where none is eligible.
pub fn mean_scores(per_query: ArrayViewD<'_, f64>) -> ArrayD<f64> {
    let last = per_query.ndim() - 1;
    per_query.map_axis(ndarray::Axis(last), |row| {
        let (sum, count) = row.iter().filter(|v| !v.is_nan()).fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
        if count == 0 { f64::NAN } else { sum / count as f64 }
    })
}

/// The token chains a set of kinds needs, and the chain of every flat head over `lead`.
///
/// Token kinds without `tokens` are an error; tokens that no kind reads are still checked, so a
/// mismatch never passes silently. Without tokens every head maps to group 0 (no chains).
/// `source` names what `lead` and `n` come from in error messages ("the patterns", "q").
pub(crate) fn token_groups(
    tokens: Option<&ArrayViewD<'_, i64>>,
    kinds: &[Kind],
    lead: &[usize],
    n: usize,
    source: &str,
) -> Result<(Vec<TokenChain>, Vec<usize>)> {
    let needs_tokens = kinds.iter().find(|k| k.needs_tokens());
    match (tokens, needs_tokens) {
        (Some(t), Some(_)) => token_chains(t, lead, n, source),
        (None, Some(kind)) => Err(Error::invalid("tokens", format!("a token array, which kind {:?} needs", kind.name()), "None")),
        (Some(t), None) => Ok((Vec::new(), token_chains(t, lead, n, source)?.1)),
        (None, None) => Ok((Vec::new(), vec![0; lead.iter().product()])),
    }
}

/// `[*lead, n]` token rows as one chain per row plus the token row of every head.
fn token_chains(tokens: &ArrayViewD<'_, i64>, lead: &[usize], n: usize, source: &str) -> Result<(Vec<TokenChain>, Vec<usize>)> {
    let shape = tokens.shape();
    if !(1..=2).contains(&shape.len()) || shape[shape.len() - 1] != n {
        let expected = match lead.first() {
            Some(b) => format!("shape ({n},) or ({b}, {n}) to match {source}"),
            None => format!("shape ({n},) to match {source}"),
        };
        return Err(Error::invalid("tokens", expected, format!("shape {}", shape_str(shape))));
    }
    let group_shape = &shape[..shape.len() - 1];
    let group_of = group_of_heads("tokens", lead, group_shape)?;
    let chains = token_rows(tokens).map(|row| TokenChain::new(&row.to_vec())).collect();
    Ok((chains, group_of))
}

/// The rows of a `[n]` or `[g, n]` token array.
fn token_rows<'a>(tokens: &'a ArrayViewD<'_, i64>) -> Box<dyn Iterator<Item = ArrayView1<'a, i64>> + 'a> {
    if tokens.ndim() == 1 {
        Box::new(std::iter::once(tokens.view().into_dimensionality().expect("1-d tokens")))
    } else {
        Box::new(tokens.outer_iter().map(|r| r.into_dimensionality().expect("2-d tokens")))
    }
}

/// Every (head, row range) task, in output order, `rows` rows per task.
pub(crate) fn row_blocks(n_heads: usize, n: usize, rows: usize) -> Vec<(usize, Range<usize>)> {
    (0..n_heads)
        .flat_map(|h| (0..n).step_by(rows).map(move |s| (h, s..(s + rows).min(n))))
        .collect()
}

/// Per-query values `[n_kinds, *lead, n]` from the `[n_kinds, rows]` values of every block.
pub(crate) fn assemble_per_query(
    blocks: &[(usize, Range<usize>)],
    results: &[Vec<f64>],
    n_kinds: usize,
    lead: &[usize],
    n: usize,
) -> ArrayD<f64> {
    let n_heads: usize = lead.iter().product();
    let mut out = vec![f64::NAN; n_kinds * n_heads * n];
    for ((h, rows), values) in blocks.iter().zip(results) {
        for k in 0..n_kinds {
            let dst = k * n_heads * n + h * n + rows.start;
            out[dst..dst + rows.len()].copy_from_slice(&values[k * rows.len()..(k + 1) * rows.len()]);
        }
    }
    let mut shape = vec![n_kinds];
    shape.extend_from_slice(lead);
    shape.push(n);
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("output length matches its shape")
}

/// Reads A[i, j], rejecting NaN and infinities with the element's full index.
#[inline]
fn read<T: Real>(stack: &MatrixStack<'_, T>, a: &ArrayView2<'_, T>, h: usize, i: usize, j: usize) -> Result<f64> {
    let v = a[[i, j]].to_f64();
    if v.is_finite() {
        Ok(v)
    } else {
        Err(non_finite(stack, h, i, j, v))
    }
}

fn non_finite<T: Real>(stack: &MatrixStack<'_, T>, h: usize, i: usize, j: usize, v: f64) -> Error {
    Error::invalid("patterns", "finite values", format!("{v} at index {}", stack.index_str(h, i, j)))
}

/// Query row i of an attention pattern, as the per-query scores read it. Stored patterns
/// ([`StoredRow`]) and the fused kernel over q and k (`attention::scores_from_qk`, which never
/// stores a row) both implement it, so the kind, eligibility and exclude_bos logic of
/// [`query_values`] exists once.
pub(crate) trait QueryRow {
    /// A[i, j] as the row holds it, before any exclude_bos renormalisation.
    fn entry(&self, j: usize) -> Result<f64>;
    /// The factor that renormalises entries j >= first_key (1 when nothing is renormalised).
    fn renormalisation(&self) -> f64;
    /// -sum p log p over the renormalised row, keys j >= first_key (0 log 0 = 0).
    fn entropy(&self) -> Result<f64>;
}

/// Calls `write(k, value)` with the value of every kind k for query i: the renormalised mass on
/// the targets j >= first_key of T(i) (`targets[k]` Some), or the row entropy (None).
/// Queries i = 0 and queries without such a target are not eligible and are not written.
pub(crate) fn query_values(
    i: usize,
    row: &impl QueryRow,
    targets: &[Option<Targets>],
    first_key: usize,
    mut write: impl FnMut(usize, f64),
) -> Result<()> {
    for (k, t) in targets.iter().enumerate() {
        let value = match t {
            Some(t) => target_mass(row, i, t, first_key)?.map(|m| m * row.renormalisation()),
            None => Some(row.entropy()?),
        };
        if let (true, Some(v)) = (i >= 1, value) {
            write(k, v);
        }
    }
    Ok(())
}

/// sum_{j in T(i), j >= first_key} w_j A[i, j], or None when no such target exists.
fn target_mass(row: &impl QueryRow, i: usize, targets: &Targets, first_key: usize) -> Result<Option<f64>> {
    let (mut sum, mut count, mut bad) = (0.0, 0usize, None);
    targets.for_each(i, |j, w| {
        if j >= first_key && bad.is_none() {
            match row.entry(j) {
                Ok(v) => sum += w * v,
                Err(e) => bad = Some(e),
            }
            count += 1;
        }
    });
    match bad {
        Some(e) => Err(e),
        None => Ok((count > 0).then_some(sum)),
    }
}

/// Row i of head h of a stored pattern stack.
struct StoredRow<'s, 'a, T> {
    stack: &'s MatrixStack<'a, T>,
    a: ArrayView2<'s, T>,
    h: usize,
    i: usize,
    first_key: usize,
    scale: f64,
}

impl<'s, 'a, T: Real> StoredRow<'s, 'a, T> {
    /// With exclude_bos, A'[i, j] = A[i, j] / (1 - A[i, 0]); a row with no mass outside key 0
    /// renormalises to all zeros.
    fn new(stack: &'s MatrixStack<'a, T>, a: ArrayView2<'s, T>, h: usize, i: usize, options: ScoreOptions) -> Result<Self> {
        let mut row = StoredRow { stack, a, h, i, first_key: usize::from(options.exclude_bos), scale: 1.0 };
        if options.exclude_bos {
            let rest = 1.0 - row.entry(0)?;
            row.scale = if rest > 0.0 { 1.0 / rest } else { 0.0 };
        }
        Ok(row)
    }
}

impl<T: Real> QueryRow for StoredRow<'_, '_, T> {
    fn entry(&self, j: usize) -> Result<f64> {
        read(self.stack, &self.a, self.h, self.i, j)
    }

    fn renormalisation(&self) -> f64 {
        self.scale
    }

    fn entropy(&self) -> Result<f64> {
        let mut entropy = 0.0;
        for (j, v) in self.a.row(self.i).iter().enumerate().skip(self.first_key) {
            let v = v.to_f64();
            if !v.is_finite() {
                return Err(non_finite(self.stack, self.h, self.i, j, v));
            }
            let p = v * self.scale;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
        Ok(entropy)
    }
}

/// Per-query values `[kinds, rows]` for one block of one head.
fn score_rows<T: Real>(
    stack: &MatrixStack<'_, T>,
    h: usize,
    rows: Range<usize>,
    targets: &[Option<Targets>],
    options: ScoreOptions,
) -> Result<Vec<f64>> {
    let a = stack.head(h);
    let len = rows.len();
    let mut out = vec![f64::NAN; targets.len() * len];
    for (r, i) in rows.enumerate() {
        let row = StoredRow::new(stack, a.view(), h, i, options)?;
        query_values(i, &row, targets, row.first_key, |k, v| out[k * len + r] = v)?;
    }
    Ok(out)
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
    let stack = MatrixStack::new("patterns", patterns)?;
    let n = stack.n();
    // One target table per group of heads: a token row, or one explicit matrix.
    let (kind, chains, sparse, group_of) = match detection {
        Detection::Kind(Kind::Entropy) => {
            return Err(Error::invalid("detection", "a target kind or a 0/1 array", "\"entropy\""))
        }
        Detection::Kind(kind) => {
            kind.check_range(n)?;
            let (chains, group_of) = match (&tokens, kind.needs_tokens()) {
                (Some(t), _) => token_chains(t, stack.lead(), n, "the patterns")?,
                (None, true) => {
                    return Err(Error::invalid("tokens", format!("a token array, which kind {:?} needs", kind.name()), "None"))
                }
                (None, false) => (Vec::new(), vec![0; stack.n_heads()]),
            };
            (Some(kind), chains, Vec::new(), group_of)
        }
        Detection::Matrices(d) => {
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
            (None, Vec::new(), sparse, group_of)
        }
    };
    let targets_of = |h: usize| match kind {
        Some(kind) => Targets::of_kind(kind, chains.get(group_of[h])).expect("not entropy"),
        None => Targets::Sparse(&sparse[group_of[h]]),
    };

    let blocks = row_blocks(stack.n_heads(), n, BLOCK_ROWS);
    let partials: Vec<(f64, f64)> = threads::install(|| {
        blocks
            .par_iter()
            .map(|(h, rows)| detection_rows(&stack, *h, rows.clone(), &targets_of(*h), measure, options))
            .collect::<Result<_>>()
    })?;

    let mut totals = vec![(0.0, 0.0); stack.n_heads()];
    for ((h, _), (x, y)) in blocks.iter().zip(partials) {
        totals[*h].0 += x;
        totals[*h].1 += y;
    }
    let scores = totals
        .into_iter()
        .map(|(x, y)| match measure {
            Measure::Mul => x / y,
            Measure::Abs => 1.0 - x / n as f64,
        })
        .collect();
    Ok(ArrayD::from_shape_vec(IxDyn(stack.lead()), scores).expect("one score per head"))
}

/// For rows of one head: (sum(A' * D), sum(A')) for `mul`, (sum |A - D| zeroed, 0) for `abs`.
fn detection_rows<T: Real>(
    stack: &MatrixStack<'_, T>,
    h: usize,
    rows: Range<usize>,
    targets: &Targets,
    measure: Measure,
    options: DetectionOptions,
) -> Result<(f64, f64)> {
    let a = stack.head(h);
    let zeroed = |i: usize, j: usize| (options.exclude_bos && j == 0) || (options.exclude_current_token && j == i);
    let (mut matched_total, mut row_total) = (0.0, 0.0);
    let abs = measure == Measure::Abs;
    for i in rows {
        let full = row_sum(a.row(i), abs);
        if !full.is_finite() {
            let j = a.row(i).iter().position(|v| !v.to_f64().is_finite()).unwrap_or(0);
            return Err(non_finite(stack, h, i, j, a[[i, j]].to_f64()));
        }
        // Remove the zeroed columns (the diagonal only once when it is column 0).
        let entry = |j: usize| if abs { a[[i, j]].to_f64().abs() } else { a[[i, j]].to_f64() };
        let mut kept = full;
        if zeroed(i, 0) {
            kept -= entry(0);
        }
        if i != 0 && zeroed(i, i) {
            kept -= entry(i);
        }
        let mut matched = 0.0;
        let mut bad = None;
        targets.for_each(i, |j, w| {
            if !zeroed(i, j) && bad.is_none() {
                match read(stack, &a, h, i, j) {
                    Ok(v) if abs => matched += (v - w).abs() - v.abs(),
                    Ok(v) => matched += v * w,
                    Err(e) => bad = Some(e),
                }
            }
        });
        if let Some(e) = bad {
            return Err(e);
        }
        match measure {
            Measure::Mul => {
                matched_total += matched;
                row_total += kept;
            }
            Measure::Abs => matched_total += kept + matched,
        }
    }
    Ok((matched_total, row_total))
}

/// Sum (or sum of absolute values) of a row in f64, eight independent lanes for contiguous rows
/// so the loop vectorises; the lane order is fixed, so the result is too.
fn row_sum<T: Real>(row: ArrayView1<'_, T>, abs: bool) -> f64 {
    let f = |v: T| if abs { v.to_f64().abs() } else { v.to_f64() };
    match row.as_slice() {
        Some(s) => {
            let mut lanes = [0.0f64; 8];
            let chunks = s.chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
            for c in chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    *l += f(v);
                }
            }
            lanes.iter().sum::<f64>() + tail
        }
        None => row.iter().map(|&v| f(v)).sum(),
    }
}
