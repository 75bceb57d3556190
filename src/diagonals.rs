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
//!
//! A block walks its diagonal or column as a `stack::Line` (a pointer and a step: no index
//! arithmetic or bounds check per row). Diagonal head scores without padding or exclude_bos, the
//! common request, take `Line::sum_in_order`: a loop of about two instructions per row
//! (hand-written for f32 on x86-64) with one prefetch per 8 rows, `AHEAD_ROWS` ahead. The walk
//! is bound by misses in flight (each row its own cache line and page), and a tight loop lets
//! the out-of-order window reach further ahead. Per-query values, masks, exclude_bos and column
//! 0 take a general loop over the same walk that prefetches every row `LOOKAHEAD_ROWS` ahead.
//! Either way the last rows of a head prefetch the next head's first.

use std::borrow::Cow;
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

impl Key {
    /// The first query with a target: i >= 1 (query 0 never is eligible) and a key >= first_key
    /// (usize::MAX: none, column 0 under exclude_bos).
    fn first_row(self, first_key: usize) -> usize {
        match self.along {
            0 if first_key > 0 => usize::MAX,
            0 => 1,
            _ => (self.back + first_key).max(1),
        }
    }
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

/// How many rows ahead the walk prefetches, one row in every `stack::SUM_GROUP` (8): every
/// row's element sits on its own cache line, 4 KB and more from the last, where hardware
/// prefetchers do not follow, so the walk is bound by how many misses are in flight. Its own
/// constant (the general path prefetches every row `targets::LOOKAHEAD_ROWS` ahead): on Zen 3,
/// 288 heads of 1024, one thread, 96 to 192 rows ran alike (0.90-0.92x numpy's strided sum),
/// 48 at 0.85x, and a prefetch of every row 32 or 48 ahead was slower than one in 8. (A likely
/// cause: at a row stride of 4096 + 4 bytes, 16 consecutive rows share an 8-way L1 set, so
/// lines prefetched for every row evict each other before they are read.)
const AHEAD_ROWS: usize = 128;

/// Entries a parallel task reads at least (whole heads per task): small heads are grouped so
/// that scheduling costs less than the work. Small enough that a stack splits into many tasks
/// (288 heads of 1024: 36), so threads finish together: with 32K, 9 tasks on 2 threads ran 5
/// against 4.
const TASK_ENTRIES: usize = 8 * 1024;

/// A request reading at most this many entries is one task, run on the calling thread (waking
/// the pool costs more than such reads take).
const SERIAL_ENTRIES: usize = 32 * 1024;

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
    let per_head = (n * n_kinds).max(1);
    let heads_per_task =
        if n_heads * per_head <= SERIAL_ENTRIES { n_heads.max(1) } else { (TASK_ENTRIES / per_head).max(1) };
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
        // Each head's matrix is found once (`head` divides by every leading axis): as the next
        // head of the previous one.
        let mut this = (!heads.is_empty()).then(|| stack.head(heads.start));
        for (local, h) in heads.clone().enumerate() {
            let a = this.expect("the task's next head");
            // The last rows of a head prefetch the first ones of the next (usually the next this
            // thread reads; if another thread does, the prefetch only cost an instruction).
            let next = (h + 1 < n_heads).then(|| stack.head(h + 1));
            this = next;
            let mask = valid(h).map(|m| match m.to_slice() {
                Some(flags) => Cow::Borrowed(flags),
                None => Cow::Owned(m.to_vec()),
            });
            for rows in (0..n).step_by(BLOCK_ROWS).map(|s| s..(s + BLOCK_ROWS).min(n)) {
                if options.exclude_bos {
                    bos_scales(&mut scales, stack, &a, h, rows.clone())?;
                }
                for (k, &key) in keys.iter().enumerate() {
                    let o = out.get_mut(k).map(|o| &mut o[local * n..(local + 1) * n]);
                    let scales = options.exclude_bos.then_some(&scales);
                    let block =
                        Block { stack, a: &a, next: next.as_ref(), h, rows: rows.clone(), key, first_key, scales };
                    let (sum, count) = block.sum(mask.as_deref(), o)?;
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
    /// The head after `a` in the stack, if any.
    next: Option<&'b Matrix<'a, T>>,
    h: usize,
    rows: Range<usize>,
    key: Key,
    first_key: usize,
    /// The exclude_bos factors of the block's rows (None without exclude_bos: all 1, and left
    /// out, as mass · 1 is mass).
    scales: Option<&'b [f64; BLOCK_ROWS]>,
}

impl<T: Real> Block<'_, '_, '_, T> {
    /// (sum, count) over the eligible rows, each value written to `out[i]` (the head's [n]
    /// values) when given; `mask` is the head's padding flags (true = a real token).
    #[inline(always)]
    fn sum(&self, mask: Option<&[bool]>, out: Option<&mut [f64]>) -> Result<(f64, usize)> {
        let Key { along, back } = self.key;
        let (start, end, n) = (self.rows.start, self.rows.end, self.a.n());
        let lo = self.key.first_row(self.first_key);
        let eligible = start.max(lo).min(end)..end;
        if eligible.is_empty() {
            return Ok((0.0, 0));
        }
        let e0 = eligible.start;
        let line = self.a.line(along, back, e0);
        // The tight loop for diagonals of head scores; per-query values, masks, exclude_bos and
        // column 0 take the general loop, which prefetches every row as the general path does
        // (measured faster for it: 288 heads of 1024, one thread, the column 0.87x and masks
        // 0.81x of that with the tight loop's one in 8 rows AHEAD_ROWS ahead). A column's rows
        // are exactly a row stride apart, so its lines crowd fewer cache sets than a diagonal's.
        let tight = mask.is_none() && self.scales.is_none() && out.is_none() && along == 1;
        let ahead = if tight { AHEAD_ROWS } else { LOOKAHEAD_ROWS };
        // Rows before `split` prefetch `ahead` rows further down this head; the rest prefetch
        // the next head's first eligible rows, or (no next head) their own element.
        let split = n.saturating_sub(ahead).clamp(e0, end);
        let near = (split > e0).then(|| self.a.line(along, back, e0 + ahead));
        // (split < end: then split >= n - ahead.)
        let far_row = (split < end).then(|| lo + (split + ahead - n)).filter(|&r| r < n);
        let far = self.next.zip(far_row).map(|(next, row)| next.line(along, back, row));
        let tail = line.skip(split - e0);
        let (mut sum, mut count) = (0.0, 0usize);
        match (mask, self.scales, out) {
            (None, None, None) if tight => {
                // The hot loop of head scores. The general path adds `0 + 1 · A[i, j]`; here
                // A[i, j] itself, the same sum bit for bit: 1 · x is x, and 0 + x differs from x
                // only for x = -0, which leaves a sum unchanged unless the sum is -0 — and a sum
                // started at +0 never becomes -0 (round to nearest: -0 only comes of -0 + -0).
                if let Some(near) = &near {
                    sum = line.sum_in_order(0..split - e0, near, sum);
                }
                sum = tail.sum_in_order(0..end - split, far.as_ref().unwrap_or(&tail), sum);
                count = end - e0;
            }
            (mask, scales, mut out) => {
                let mut add = |i: usize, x: T| {
                    if mask.is_none_or(|m| m[i * along - back] && m[i]) {
                        let mass = 0.0 + 1.0 * x.to_f64();
                        let value = scales.map_or(mass, |s| mass * s[i - start]);
                        sum += value;
                        count += 1;
                        if let Some(o) = out.as_deref_mut() {
                            o[i] = value;
                        }
                    }
                };
                if let Some(near) = &near {
                    line.each(0..split - e0, near, |k, x| add(e0 + k, x));
                }
                tail.each(0..end - split, far.as_ref().unwrap_or(&tail), |k, x| add(split + k, x));
            }
        }
        if !sum.is_finite() {
            let valid = |j: usize| mask.is_none_or(|m| m[j]);
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
