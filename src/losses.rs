//! Per-token cross-entropy from next-token logits:
//!
//!   loss[b, i] = logsumexp_v logits[b, i, v] - logits[b, i, tokens[b, i + 1]],  i < n - 1,
//!
//! the loss of predicting token i + 1 from position i. Each row streams once over the vocabulary
//! with an online log-sum-exp ([`crate::logsumexp`]), so no [n, vocab] temporary is ever made.
//! Rows of types with an exact f32 view (f32, f16) take the f32-lane kernel
//! ([`crate::logsumexp::lanes`]) on CPUs with AVX2 and FMA but not AVX-512; other types and CPUs
//! the generic one (f64 lanes through a staging buffer). Both accumulate in f64.
//! Rows run in parallel; each row is summed in a fixed order, so results do not depend on the
//! number of threads.

use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayView3, ArrayViewD, Axis, Ix2, Ix3};
use rayon::prelude::*;

use crate::error::{shape_str, Error, Result};
#[cfg(target_arch = "x86_64")]
use crate::logsumexp::lanes;
use crate::logsumexp::{OnlineLse, CHUNK};
use crate::simd::{self, Level};
use crate::stack::Real;
use crate::threads;

/// Per-token losses, shape `[*lead, n - 1]` (`n = 0` gives `[*lead, 0]`).
///
/// `logits` is `[n, vocab]` or `[batch, n, vocab]` with any strides; `tokens` has the shape of
/// `logits` without its last axis. Errors: other shapes, an empty vocabulary, token ids outside
/// `[0, vocab)`, and a non-finite logit in any row that is read (rows `i < n - 1`).
pub fn token_losses<T: Real>(logits: ArrayViewD<'_, T>, tokens: ArrayViewD<'_, i64>) -> Result<ndarray::ArrayD<f64>> {
    let (logits, tokens, batched) = as_batched(logits, tokens)?;
    let (batch, n, vocab) = logits.dim();
    check_token_range(&tokens, vocab, batched)?;
    let per_row = n.saturating_sub(1);
    let row_loss = row_loss_fn::<T>();
    let results: Vec<Result<f64>> = threads::install(|| {
        (0..batch * per_row)
            .into_par_iter()
            .map(|r| {
                let (b, i) = (r / per_row, r % per_row);
                let target = tokens[[b, i + 1]] as usize;
                row_loss(logits.slice(s![b, i, ..]), target).ok_or_else(|| first_non_finite(&logits, b, i, batched))
            })
            .collect()
    });
    // The first bad row in index order, whatever thread found it, so messages are reproducible.
    let losses = results.into_iter().collect::<Result<Vec<f64>>>()?;
    let out = Array2::from_shape_vec((batch, per_row), losses).expect("one loss per row").into_dyn();
    Ok(if batched { out } else { out.index_axis_move(Axis(0), 0) })
}

/// Views `[batch, n, vocab]` and `[batch, n]` (a batch of one for 2-d logits), after checking
/// the shapes; the flag says whether the input had a batch axis.
fn as_batched<'a, 'b, T>(
    logits: ArrayViewD<'a, T>,
    tokens: ArrayViewD<'b, i64>,
) -> Result<(ArrayView3<'a, T>, ArrayView2<'b, i64>, bool)> {
    let shape = logits.shape().to_vec();
    if !(2..=3).contains(&shape.len()) {
        return Err(Error::invalid(
            "logits",
            "shape (n, vocab) or (batch, n, vocab)",
            format!("shape {}", shape_str(&shape)),
        ));
    }
    if shape[shape.len() - 1] == 0 {
        return Err(Error::invalid(
            "logits",
            "a vocabulary axis of length >= 1",
            format!("shape {}", shape_str(&shape)),
        ));
    }
    let want = &shape[..shape.len() - 1];
    if tokens.shape() != want {
        return Err(Error::invalid(
            "tokens",
            format!("shape {} to match logits of shape {}", shape_str(want), shape_str(&shape)),
            format!("shape {}", shape_str(tokens.shape())),
        ));
    }
    let batched = shape.len() == 3;
    if batched {
        let logits = logits.into_dimensionality::<Ix3>().expect("3-d logits");
        let tokens = tokens.into_dimensionality::<Ix2>().expect("2-d tokens");
        Ok((logits, tokens, true))
    } else {
        let logits = logits.into_dimensionality::<Ix2>().expect("2-d logits").insert_axis(Axis(0));
        let tokens = tokens.into_dimensionality::<ndarray::Ix1>().expect("1-d tokens").insert_axis(Axis(0));
        Ok((logits, tokens, false))
    }
}

/// Every token id (inputs included, not only the targets) must index the vocabulary.
fn check_token_range(tokens: &ArrayView2<'_, i64>, vocab: usize, batched: bool) -> Result<()> {
    for ((b, i), &t) in tokens.indexed_iter() {
        if t < 0 || t as u64 >= vocab as u64 {
            return Err(Error::invalid(
                "tokens",
                format!("token ids in [0, {vocab}) (the vocabulary axis of logits)"),
                format!("{t} at index {}", index_str(b, i, None, batched)),
            ));
        }
    }
    Ok(())
}

/// The error for row (b, i), which holds a non-finite logit (cold path: finds the first one).
fn first_non_finite<T: Real>(logits: &ArrayView3<'_, T>, b: usize, i: usize, batched: bool) -> Error {
    let row = logits.slice(s![b, i, ..]);
    let (v, x) = row.iter().map(|x| x.to_f64()).enumerate().find(|(_, x)| !x.is_finite()).unwrap_or((0, f64::NAN));
    Error::invalid("logits", "finite values", format!("{x} at index {}", index_str(b, i, Some(v), batched)))
}

fn index_str(b: usize, i: usize, v: Option<usize>, batched: bool) -> String {
    let mut ix = if batched { vec![b, i] } else { vec![i] };
    ix.extend(v);
    shape_str(&ix).replace(",)", ")")
}

/// The loss of one row against its target id, or None if a logit is not finite.
type RowLoss<T> = fn(ArrayView1<'_, T>, usize) -> Option<f64>;

/// The fastest row kernel this CPU runs (see `simd::level`).
fn row_loss_fn<T: Real>() -> RowLoss<T> {
    #[cfg(target_arch = "x86_64")]
    match simd::level() {
        // Element types with an exact f32 view (f32, f16): the f32-lane kernel (AVX2). AVX-512
        // CPUs keep the f64-lane kernel below, which there does half the operations per value of
        // the AVX2 f32-lane one (measured 8.7 GB/s on 2 cores); an AVX-512 port of the f32-lane
        // kernel is not written yet (no AVX-512 machine to measure it on).
        Level::Avx2Fma if T::as_f32(&[], &mut []).is_some() => return row_loss_lanes::<T>,
        // SAFETY: `level` checked that the CPU has the features the function is compiled for.
        Level::Avx512 => return |row, target| unsafe { row_loss_avx512(row, target) },
        Level::Avx2Fma => return |row, target| unsafe { row_loss_avx2(row, target) },
        Level::Sse41 | Level::Baseline => {}
    }
    row_loss::<T, false>
}

/// A row of a type with an f32 view through [`lanes::lse_f32`] (f32 lanes, AVX2 and FMA: chosen
/// only on CPUs that have them). A strided row is copied first, so that every layout of the same
/// values gives the same bits.
#[cfg(target_arch = "x86_64")]
fn row_loss_lanes<T: Real>(row: ArrayView1<'_, T>, target: usize) -> Option<f64> {
    let copy;
    let values = match row.as_slice() {
        Some(values) => values,
        None => {
            copy = row.to_vec();
            &copy
        }
    };
    // SAFETY: `row_loss_fn` picks this function only where `level` found AVX2 and FMA.
    match unsafe { lanes::lse_f32(values) } {
        Some((lse, finite)) => finite.then(|| lse - values[target].to_f64()),
        // Not reached: `row_loss_fn` checked that T has an f32 view.
        // SAFETY: as above.
        None => unsafe { row_loss_avx2(row, target) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn row_loss_avx512<T: Real>(row: ArrayView1<'_, T>, target: usize) -> Option<f64> {
    row_loss::<T, true>(row, target)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_loss_avx2<T: Real>(row: ArrayView1<'_, T>, target: usize) -> Option<f64> {
    row_loss::<T, true>(row, target)
}

/// logsumexp(row) - row[target], streaming the row through an f64 buffer chunk by chunk.
/// Inlined into each target-feature wrapper so its loops are compiled for that CPU.
#[inline(always)]
fn row_loss<T: Real, const FMA: bool>(row: ArrayView1<'_, T>, target: usize) -> Option<f64> {
    let mut buf = [0.0f64; CHUNK];
    let mut lse = OnlineLse::default();
    match row.as_slice() {
        Some(values) => {
            for chunk in values.chunks(CHUNK) {
                let buf = &mut buf[..chunk.len()];
                for (d, &x) in buf.iter_mut().zip(chunk) {
                    *d = x.to_f64();
                }
                lse.push::<FMA>(buf);
            }
        }
        None => {
            let len = row.len();
            for start in (0..len).step_by(CHUNK) {
                let end = (start + CHUNK).min(len);
                let buf = &mut buf[..end - start];
                for (d, &x) in buf.iter_mut().zip(row.slice(s![start..end])) {
                    *d = x.to_f64();
                }
                lse.push::<FMA>(buf);
            }
        }
    }
    lse.all_finite().then(|| lse.value() - row[target].to_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Array3, IxDyn};

    /// log-softmax the obvious way, for one row.
    fn naive(row: &[f64], target: usize) -> f64 {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[target]
    }

    fn logits(batch: usize, n: usize, vocab: usize) -> Array3<f64> {
        Array::from_shape_fn((batch, n, vocab), |(b, i, v)| ((b * 131 + i * 17 + v * 7919) % 1013) as f64 * 0.02 - 10.0)
    }

    fn tokens(batch: usize, n: usize, vocab: usize) -> ndarray::Array2<i64> {
        Array::from_shape_fn((batch, n), |(b, i)| ((b * 7 + i * 31) % vocab) as i64)
    }

    #[test]
    fn losses_match_log_softmax_across_chunk_boundaries() {
        for vocab in [1, 5, CHUNK, CHUNK + 3, 2 * CHUNK + 17] {
            let (x, t) = (logits(2, 4, vocab), tokens(2, 4, vocab));
            let out = token_losses(x.view().into_dyn(), t.view().into_dyn()).unwrap();
            assert_eq!(out.shape(), &[2, 3]);
            for b in 0..2 {
                for i in 0..3 {
                    let row = x.slice(s![b, i, ..]).to_vec();
                    let want = naive(&row, t[[b, i + 1]] as usize);
                    assert!((out[[b, i]] - want).abs() < 1e-12 * want.abs().max(1.0), "vocab {vocab}");
                }
            }
            // Every kernel the CPU offers agrees with the portable one.
            let row = x.slice(s![1, 2, ..]);
            let target = t[[1, 3]] as usize;
            let portable = row_loss::<f64, false>(row, target).unwrap();
            let chosen = row_loss_fn::<f64>()(row, target).unwrap();
            assert!((portable - chosen).abs() < 1e-12 * portable.abs().max(1.0));
        }
    }

    #[test]
    fn strided_and_narrow_dtypes() {
        let x = logits(2, 3, 70);
        let t = tokens(2, 3, 70);
        let want = token_losses(x.view().into_dyn(), t.view().into_dyn()).unwrap();
        // Vocabulary axis reversed and the whole array transposed in memory: same losses,
        // provided the tokens are mirrored to match.
        let mut flipped = x.clone();
        flipped.invert_axis(Axis(2));
        let flipped_t = t.mapv(|v| 69 - v);
        let fortran = flipped.t().as_standard_layout().into_owned().reversed_axes();
        for view in [flipped.view(), fortran.view()] {
            let got = token_losses(view.into_dyn(), flipped_t.view().into_dyn()).unwrap();
            for (a, b) in got.iter().zip(want.iter()) {
                assert!((a - b).abs() < 1e-12);
            }
        }
        let x32 = x.mapv(|v| v as f32);
        let got32 = token_losses(x32.view().into_dyn(), t.view().into_dyn()).unwrap();
        let x16 = x.mapv(half::f16::from_f64);
        let got16 = token_losses(x16.view().into_dyn(), t.view().into_dyn()).unwrap();
        for ((a, b), c) in got32.iter().zip(want.iter()).zip(got16.iter()) {
            assert!((a - b).abs() < 1e-4 && (c - b).abs() < 0.1);
        }
    }

    #[test]
    fn unbatched_and_degenerate_shapes() {
        let x = logits(1, 5, 9);
        let t = tokens(1, 5, 9);
        let batched = token_losses(x.view().into_dyn(), t.view().into_dyn()).unwrap();
        let single = token_losses(x.index_axis(Axis(0), 0).into_dyn(), t.index_axis(Axis(0), 0).into_dyn()).unwrap();
        assert_eq!(single.shape(), &[4]);
        assert_eq!(single.as_slice().unwrap(), batched.as_slice().unwrap());
        let one = Array::<f32, _>::zeros(IxDyn(&[3, 1, 4]));
        let t1 = Array::<i64, _>::zeros(IxDyn(&[3, 1]));
        assert_eq!(token_losses(one.view(), t1.view()).unwrap().shape(), &[3, 0]);
    }

    #[test]
    fn bad_input_is_a_named_error() {
        let x = logits(2, 3, 6);
        let t = tokens(2, 3, 6);
        let mut bad = x.clone();
        bad[[1, 1, 4]] = f64::NEG_INFINITY;
        let err = token_losses(bad.view().into_dyn(), t.view().into_dyn()).unwrap_err();
        assert_eq!(err.arg, "logits");
        assert!(err.got.contains("(1, 1, 4)"), "{err}");
        // The last position's logits are not read.
        bad[[1, 1, 4]] = 0.0;
        bad[[1, 2, 0]] = f64::NAN;
        assert!(token_losses(bad.view().into_dyn(), t.view().into_dyn()).is_ok());
        let mut t_bad = t.clone();
        t_bad[[0, 2]] = 6;
        let err = token_losses(x.view().into_dyn(), t_bad.view().into_dyn()).unwrap_err();
        assert!(err.arg == "tokens" && err.got.contains("6 at index (0, 2)"), "{err}");
        t_bad[[0, 2]] = -1;
        assert!(token_losses(x.view().into_dyn(), t_bad.view().into_dyn()).is_err());
        let err = token_losses(x.view().into_dyn(), t.slice(s![.., ..2]).into_dyn()).unwrap_err();
        assert!(err.arg == "tokens" && err.expected.contains("(2, 3)"), "{err}");
        let flat = Array::<f64, _>::zeros(IxDyn(&[6]));
        assert_eq!(token_losses(flat.view(), t.view().into_dyn()).unwrap_err().arg, "logits");
        let empty = Array::<f64, _>::zeros(IxDyn(&[2, 3, 0]));
        assert_eq!(token_losses(empty.view(), t.view().into_dyn()).unwrap_err().arg, "logits");
    }
}
