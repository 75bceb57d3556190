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
    let needs_tokens = kinds.iter().any(|k| k.needs_tokens());
    let (chains, group_of) = match (&tokens, needs_tokens) {
        (Some(t), true) => token_chains(t, &stack)?,
        (None, true) => {
            let kind = kinds.iter().find(|k| k.needs_tokens()).unwrap().name();
            return Err(Error::invalid("tokens", format!("a token array, which kind {kind:?} needs"), "None"));
        }
        // Tokens that no kind reads are still checked, so a mismatch never passes silently.
        (Some(t), false) => (Vec::new(), token_chains(t, &stack)?.1),
        (None, false) => (Vec::new(), vec![0; stack.n_heads()]),
    };

    let blocks = row_blocks(stack.n_heads(), n);
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

    let n_heads = stack.n_heads();
    let mut out = vec![f64::NAN; kinds.len() * n_heads * n];
    for ((h, rows), values) in blocks.iter().zip(&results) {
        for k in 0..kinds.len() {
            let dst = k * n_heads * n + h * n + rows.start;
            out[dst..dst + rows.len()].copy_from_slice(&values[k * rows.len()..(k + 1) * rows.len()]);
        }
    }
    let mut shape = vec![kinds.len()];
    shape.extend_from_slice(stack.lead());
    shape.push(n);
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("output length matches its shape"))
}

/// Mean over the last axis of the eligible (non-NaN) entries; NaN where none is eligible.
pub fn mean_scores(per_query: ArrayViewD<'_, f64>) -> ArrayD<f64> {
    let last = per_query.ndim() - 1;
    per_query.map_axis(ndarray::Axis(last), |row| {
        let (sum, count) = row.iter().filter(|v| !v.is_nan()).fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
        if count == 0 { f64::NAN } else { sum / count as f64 }
    })
}

/// `[*lead, n]` token rows as one chain per row plus the token row of every head.
fn token_chains<T: Real>(tokens: &ArrayViewD<'_, i64>, stack: &MatrixStack<'_, T>) -> Result<(Vec<TokenChain>, Vec<usize>)> {
    let shape = tokens.shape();
    let n = stack.n();
    if !(1..=2).contains(&shape.len()) || shape[shape.len() - 1] != n {
        let expected = match stack.lead().first() {
            Some(b) => format!("shape ({n},) or ({b}, {n}) to match the patterns"),
            None => format!("shape ({n},) to match the patterns"),
        };
        return Err(Error::invalid("tokens", expected, format!("shape {}", shape_str(shape))));
    }
    let group_shape = &shape[..shape.len() - 1];
    let group_of = group_of_heads("tokens", stack.lead(), group_shape)?;
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

/// Every (head, row range) task, in output order.
fn row_blocks(n_heads: usize, n: usize) -> Vec<(usize, Range<usize>)> {
    (0..n_heads)
        .flat_map(|h| (0..n).step_by(BLOCK_ROWS).map(move |s| (h, s..(s + BLOCK_ROWS).min(n))))
        .collect()
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
        // Multiplier of A[i, j>=1] after renormalising without key 0.
        let scale = if options.exclude_bos {
            let rest = 1.0 - read(stack, &a, h, i, 0)?;
            if rest > 0.0 { 1.0 / rest } else { 0.0 }
        } else {
            1.0
        };
        let first_key = usize::from(options.exclude_bos);
        for (k, t) in targets.iter().enumerate() {
            let value = match t {
                Some(t) => target_mass(stack, &a, h, i, t, first_key)?.map(|m| m * scale),
                None => Some(row_entropy(stack, &a, h, i, first_key, scale)?),
            };
            if i >= 1 {
                out[k * len + r] = value.unwrap_or(f64::NAN);
            }
        }
    }
    Ok(out)
}

/// sum_{j in T(i), j >= first_key} w_j A[i, j], or None when no such target exists.
fn target_mass<T: Real>(
    stack: &MatrixStack<'_, T>,
    a: &ArrayView2<'_, T>,
    h: usize,
    i: usize,
    targets: &Targets,
    first_key: usize,
) -> Result<Option<f64>> {
    let (mut sum, mut count, mut bad) = (0.0, 0usize, None);
    targets.for_each(i, |j, w| {
        if j >= first_key && bad.is_none() {
            match read(stack, a, h, i, j) {
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

/// -sum_j p log p over keys j >= first_key of row i, with p = scale * A[i, j] (0 log 0 = 0).
fn row_entropy<T: Real>(
    stack: &MatrixStack<'_, T>,
    a: &ArrayView2<'_, T>,
    h: usize,
    i: usize,
    first_key: usize,
    scale: f64,
) -> Result<f64> {
    let mut entropy = 0.0;
    for (j, v) in a.row(i).iter().enumerate().skip(first_key) {
        let v = v.to_f64();
        if !v.is_finite() {
            return Err(non_finite(stack, h, i, j, v));
        }
        let p = v * scale;
        if p > 0.0 {
            entropy -= p * p.ln();
        }
    }
    Ok(entropy)
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
                (Some(t), _) => token_chains(t, &stack)?,
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

    let blocks = row_blocks(stack.n_heads(), n);
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
