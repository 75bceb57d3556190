//! Positional kinds over stored patterns: `offset(d)`, `previous_token` (d = 1) and `self`
//! (d = 0) read one diagonal A[i, i - d], `bos` column 0. Each query reads one key, so a head
//! costs n strided reads, and the general per-query machinery of `scores` (per-block target
//! tables, mass and hit arrays, per-block allocations) costs more than the reads themselves,
//! above all on small heads that sit in cache.
//!
//! [`positional_scores`] gives the general path's results bit for bit: the same blocks of
//! [`BLOCK_ROWS`] rows, each summed in row order from 0.0 as `(0 + 1 · A[i, j]) · scale(i)`,
//! blocks added in order from 0.0, the same eligibility (i >= 1, a target key >= the first key,
//! query and key real tokens), the same exclude_bos scales and the same errors (a non-finite
//! entry named by its index, checked only once a block's sum is not finite). Parallel tasks are
//! whole heads (several per task when heads are small), so results never depend on the number of
//! threads.

use std::ops::Range;

use ndarray::{ArrayD, ArrayView1, IxDyn};
use rayon::prelude::*;

use crate::error::Result;
use crate::scores::{means_of_totals, non_finite, overflow, Reduce, ScoreOptions, Spans, TargetMeasure, BLOCK_ROWS};
use crate::stack::{Matrix, MatrixStack, Real};
use crate::targets::{Kind, LOOKAHEAD_ROWS};
use crate::threads;

/// Whether [`positional_scores`] serves a request of these kinds: every kind reads one fixed key
/// per query (a diagonal or column 0). Requests the fast path does not model must fail this
/// predicate, so that they keep the general path: conditions on later options of the general
/// path (another measure than the target mass, query or key spans, ...) belong here.
pub(crate) fn positional_fast_path(kinds: &[Kind], options: ScoreOptions, spans: &Spans<'_>) -> bool {
    let plain = options.measure == TargetMeasure::Mass && spans.queries.is_none() && spans.keys.is_none();
    plain && !kinds.is_empty() && kinds.iter().all(|&k| key_of(k).is_some())
}

/// The key query i reads: `i * along - back` (a diagonal: along 1; column 0: along 0, back 0).
#[derive(Debug, Clone, Copy)]
struct Key {
    along: usize,
    back: usize,
}

fn key_of(kind: Kind) -> Option<Key> {
    let diagonal = |back| Some(Key { along: 1, back });
    match kind {
        Kind::PreviousToken => diagonal(1),
        Kind::SelfToken => diagonal(0),
        Kind::Offset(d) => diagonal(d),
        Kind::Bos => Some(Key { along: 0, back: 0 }),
        Kind::DuplicateToken | Kind::Induction | Kind::Copy | Kind::Entropy => None,
    }
}

/// Entries a parallel task reads at least (whole heads per task): small heads are grouped so
/// that scheduling costs less than the work.
const TASK_ENTRIES: usize = 32 * 1024;

/// Per-query scores `[kinds, *lead, n]` or head scores `[kinds, *lead]` of positional kinds
/// (see [`positional_fast_path`]); `valid(h)` is head h's padding mask (None: no padding).
/// Offsets, the mask and exclude_bos were checked by the caller (`QueryPlan::new`).
pub(crate) fn positional_scores<'m, T: Real>(
    stack: &MatrixStack<'_, T>,
    kinds: &[Kind],
    valid: impl Fn(usize) -> Option<ArrayView1<'m, bool>> + Sync,
    options: ScoreOptions,
    reduce: Reduce,
) -> Result<ArrayD<f64>> {
    let keys: Vec<Key> = kinds.iter().filter_map(|&k| key_of(k)).collect();
    debug_assert_eq!(keys.len(), kinds.len(), "positional kinds only");
    let (n, n_heads, n_kinds) = (stack.n(), stack.n_heads(), keys.len());
    let per_query = reduce == Reduce::PerQuery;
    let heads_per_task = (TASK_ENTRIES / (n * n_kinds).max(1)).max(1);
    let n_tasks = n_heads.div_ceil(heads_per_task);
    let mut values = if per_query { vec![f64::NAN; n_kinds * n_heads * n] } else { Vec::new() };
    // Per task, one slice per kind: that kind's values of the task's heads.
    let mut outs: Vec<Vec<&mut [f64]>> = (0..n_tasks).map(|_| Vec::with_capacity(n_kinds)).collect();
    if per_query && n > 0 && n_heads > 0 {
        for slab in values.chunks_mut(n_heads * n) {
            for (out, part) in outs.iter_mut().zip(slab.chunks_mut(heads_per_task * n)) {
                out.push(part);
            }
        }
    }
    let first_key = usize::from(options.exclude_bos);
    let task = |(t, mut out): (usize, Vec<&mut [f64]>)| -> Result<Vec<(f64, usize)>> {
        let heads = t * heads_per_task..((t + 1) * heads_per_task).min(n_heads);
        // [kinds, heads of the task]
        let mut totals = vec![(0.0, 0usize); n_kinds * heads.len()];
        let mut scales = [1.0; BLOCK_ROWS];
        for (local, h) in heads.clone().enumerate() {
            let a = stack.head(h);
            let mask = valid(h);
            for rows in (0..n).step_by(BLOCK_ROWS).map(|s| s..(s + BLOCK_ROWS).min(n)) {
                if options.exclude_bos {
                    bos_scales(&mut scales, stack, &a, h, rows.clone())?;
                }
                for (k, &key) in keys.iter().enumerate() {
                    let o = out.get_mut(k).map(|o| &mut o[local * n..(local + 1) * n]);
                    let block = Block { stack, a: &a, h, rows: rows.clone(), key, first_key, scales: &scales };
                    let (sum, count) = match &mask {
                        None => block.sum(|_| true, o)?,
                        Some(m) => block.sum(|j| m[j], o)?,
                    };
                    let total = &mut totals[k * heads.len() + local];
                    total.0 += sum;
                    total.1 += count;
                }
            }
        }
        Ok(totals)
    };
    // One task's work is done on the calling thread: handing it to the pool (waking a worker)
    // would cost more than the reads.
    let task_totals: Vec<Vec<(f64, usize)>> = if n_tasks <= 1 {
        outs.into_iter().enumerate().map(task).collect::<Result<_>>()?
    } else {
        threads::install(|| outs.into_par_iter().enumerate().map(task).collect::<Result<_>>())?
    };
    let mut shape = vec![n_kinds];
    shape.extend_from_slice(stack.lead());
    let flat = if per_query {
        shape.push(n);
        values
    } else {
        let mut totals = vec![(0.0, 0usize); n_kinds * n_heads];
        for (t, part) in task_totals.iter().enumerate() {
            let first = t * heads_per_task;
            let len = part.len() / n_kinds.max(1);
            for k in 0..n_kinds {
                totals[k * n_heads + first..k * n_heads + first + len].copy_from_slice(&part[k * len..(k + 1) * len]);
            }
        }
        means_of_totals(totals, n_heads)?
    };
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), flat).expect("output length matches its shape"))
}

/// Per row of a block, the exclude_bos factor 1 / (1 - A[i, 0]) (0 for a row with all its mass
/// on key 0), into `scales` (which stays all 1 without exclude_bos). A non-finite A[i, 0] is an
/// error, in row order.
fn bos_scales<T: Real>(
    scales: &mut [f64; BLOCK_ROWS],
    stack: &MatrixStack<'_, T>,
    a: &Matrix<'_, T>,
    h: usize,
    rows: Range<usize>,
) -> Result<()> {
    for (scale, i) in scales.iter_mut().zip(rows) {
        let bos = a.get(i, 0).to_f64();
        if !bos.is_finite() {
            return Err(non_finite(stack, h, i, 0, bos));
        }
        *scale = if bos < 1.0 { 1.0 / (1.0 - bos) } else { 0.0 };
    }
    Ok(())
}

/// One block of rows of one head, scored for one positional kind.
struct Block<'b, 's, 'a, T> {
    stack: &'b MatrixStack<'s, T>,
    a: &'b Matrix<'a, T>,
    h: usize,
    rows: Range<usize>,
    key: Key,
    first_key: usize,
    scales: &'b [f64; BLOCK_ROWS],
}

impl<T: Real> Block<'_, '_, '_, T> {
    /// (sum, count) over the eligible rows, each value written to `out[i]` (the head's [n]
    /// values) when given.
    #[inline(always)]
    fn sum(&self, valid: impl Fn(usize) -> bool, mut out: Option<&mut [f64]>) -> Result<(f64, usize)> {
        let Key { along, back } = self.key;
        let (start, end) = (self.rows.start, self.rows.end);
        // Queries with a target: i >= 1 (query 0 never is eligible) and a key >= first_key.
        let lowest = if along == 0 {
            if self.first_key > 0 {
                end
            } else {
                1
            }
        } else {
            back + self.first_key
        };
        let eligible = start.max(1).max(lowest).min(end)..end;
        let (mut sum, mut count) = (0.0, 0usize);
        for i in eligible.clone() {
            let j = i * along - back;
            // Scattered reads (a row per page): start those of later rows now.
            self.a.prefetch(i + LOOKAHEAD_ROWS, (i + LOOKAHEAD_ROWS) * along - back);
            if valid(j) && valid(i) {
                // The general path's mass accumulator: 0 + weight 1 · A[i, j], then scaled.
                let mass = 0.0 + 1.0 * self.a.get(i, j).to_f64();
                let value = mass * self.scales[i - start];
                sum += value;
                count += 1;
                if let Some(o) = out.as_deref_mut() {
                    o[i] = value;
                }
            }
        }
        if !sum.is_finite() {
            let bad = eligible.clone().find(|&i| {
                let j = i * along - back;
                valid(j) && valid(i) && !self.a.get(i, j).to_f64().is_finite()
            });
            return Err(match bad {
                Some(i) => {
                    let j = i * along - back;
                    non_finite(self.stack, self.h, i, j, self.a.get(i, j).to_f64())
                }
                // Every entry finite: the sum over the rows overflowed.
                None => overflow("patterns", format!("row {} of head {}", start.max(1), self.stack.lead_str(self.h))),
            });
        }
        Ok((sum, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::{head_scores, per_query_scores};
    use ndarray::{Array, IxDyn};

    #[test]
    fn same_bits_as_the_general_path() {
        // Several blocks per head, a padding mask, exclude_bos, values with rounding to show.
        let n = 600;
        let a = Array::from_shape_fn(IxDyn(&[2, 2, n, n]), |ix| {
            let (h, i, j) = (ix[0] * 2 + ix[1], ix[2], ix[3]);
            if j <= i {
                (((h * 31 + i * 7 + j * 13) % 17) as f32 + 0.5) / (i as f32 + 9.0)
            } else {
                0.0
            }
        });
        let mask = Array::from_shape_fn(IxDyn(&[2, n]), |ix| (ix[0] + ix[1]) % 7 != 3);
        let kinds = [Kind::PreviousToken, Kind::Offset(300), Kind::Bos, Kind::SelfToken];
        // Entropy sends the request down the general path; each kind is scored on its own there.
        let general_kinds = [kinds.as_slice(), &[Kind::Entropy]].concat();
        for exclude_bos in [false, true] {
            for m in [None, Some(mask.view())] {
                let options = ScoreOptions { exclude_bos, ..Default::default() };
                let fast = head_scores(a.view(), None, m.clone(), Spans::default(), &kinds, options).unwrap();
                let general =
                    head_scores(a.view(), None, m.clone(), Spans::default(), &general_kinds, options).unwrap();
                let bits = |x: ndarray::ArrayViewD<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(fast.view()), bits(general.slice(ndarray::s![..4, .., ..]).into_dyn()));
                let fast = per_query_scores(a.view(), None, m.clone(), Spans::default(), &kinds, options).unwrap();
                let general = per_query_scores(a.view(), None, m, Spans::default(), &general_kinds, options).unwrap();
                assert_eq!(bits(fast.view()), bits(general.slice(ndarray::s![..4, .., .., ..]).into_dyn()));
            }
        }
    }

    #[test]
    fn only_positional_kinds_take_the_fast_path() {
        let (plain, none) = (ScoreOptions::default(), Spans::default());
        assert!(positional_fast_path(
            &[Kind::Offset(3), Kind::Bos, Kind::SelfToken, Kind::PreviousToken],
            plain,
            &none
        ));
        assert!(!positional_fast_path(&[Kind::Offset(3), Kind::Entropy], plain, &none));
        assert!(!positional_fast_path(&[Kind::Induction], plain, &none));
        assert!(!positional_fast_path(&[], plain, &none));
        // Top-1 and spans are the general path's.
        let top1 = ScoreOptions { measure: TargetMeasure::Top1, ..plain };
        assert!(!positional_fast_path(&[Kind::Offset(3)], top1, &none));
        let flags = ndarray::arr1(&[true, false, true]).into_dyn();
        let spanned = Spans { queries: Some(flags.view()), keys: None };
        assert!(!positional_fast_path(&[Kind::Offset(1)], plain, &spanned));
    }
}
