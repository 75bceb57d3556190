//! Batched float64 GEMM for the circuits module (composition scores, python/induct_fast/circuits.py):
//! many small products, one per head, spread over the pool. numpy's batched matmul calls a
//! multi-threaded BLAS once per head instead, which stalls on every call when the cores are
//! shared. Each product here runs on one thread with matrixmultiply's kernels, so a result never
//! depends on the thread count.

use ndarray::{s, Array2, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};
use rayon::prelude::*;

use crate::error::{shape_str, Error, Result};
use crate::threads;

/// Raw pointer that may cross threads: every task writes a disjoint output matrix.
#[derive(Clone, Copy)]
struct SendPtr(*mut f64);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out[h] = a[h / (n / n_a)] @ b[h / (n / n_b)]` (plus `out[h]` when `accumulate`) for every
/// `h < n`, with `a [n_a, m, k]`, `b [n_b, k, p]`, `out [n, m, p]` of any strides, `n_a` and
/// `n_b` dividing `n` (consecutive outputs share an operand: grouped heads).
pub fn batched_matmul(
    a: ArrayView3<'_, f64>,
    b: ArrayView3<'_, f64>,
    mut out: ArrayViewMut3<'_, f64>,
    accumulate: bool,
) -> Result<()> {
    let (n_a, m, k) = a.dim();
    let (n_b, k2, p) = b.dim();
    let (n, m2, p2) = out.dim();
    if k2 != k || n_b == 0 || n % n_b != 0 {
        return Err(Error::invalid("b", format!("shape (n_b, {k}, p) with n_b dividing {n}"), shape_str(b.shape())));
    }
    if m2 != m || p2 != p || n_a == 0 || n % n_a != 0 {
        return Err(Error::invalid(
            "out",
            format!("shape (n, {m}, {p}) with n a multiple of {n_a}"),
            shape_str(out.shape()),
        ));
    }
    if n == 0 || m == 0 || p == 0 {
        return Ok(());
    }
    let (ra, rb) = (n / n_a, n / n_b);
    let [sa0, sa1, sa2]: [isize; 3] = a.strides().try_into().expect("3 axes");
    let [sb0, sb1, sb2]: [isize; 3] = b.strides().try_into().expect("3 axes");
    let [so0, so1, so2]: [isize; 3] = out.strides().try_into().expect("3 axes");
    let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
    let po = SendPtr(out.as_mut_ptr());
    let beta = if accumulate { 1.0 } else { 0.0 };
    threads::install(|| {
        (0..n).into_par_iter().for_each(|h| {
            let po = po;
            // SAFETY: the views cover these offsets (ndarray checked them); output matrices of
            // different h are disjoint, and the inputs are only read.
            unsafe {
                let x = (pa as *const f64).offset((h / ra) as isize * sa0);
                let y = (pb as *const f64).offset((h / rb) as isize * sb0);
                let z = po.0.offset(h as isize * so0);
                if k == 0 {
                    for i in 0..m as isize {
                        for j in 0..p as isize {
                            let e = z.offset(i * so1 + j * so2);
                            *e *= beta;
                        }
                    }
                } else {
                    matrixmultiply::dgemm(m, k, p, 1.0, x, sa1, sa2, y, sb1, sb2, beta, z, so1, so2);
                }
            }
        })
    });
    Ok(())
}

/// Columns of the contraction per task: the depth is cut into fixed chunks whatever the threads.
const CHUNK: usize = 2048;

/// `out += g @ k^T` for `g [m, depth]`, `k [n, depth]`, `out [m, n]` of any strides: the depth is
/// cut into fixed chunks of `CHUNK`, each chunk's product formed on one thread, and the chunks
/// summed into `out` in order, so the result never depends on the thread count.
pub fn contract(g: ArrayView2<'_, f64>, k: ArrayView2<'_, f64>, mut out: ArrayViewMut2<'_, f64>) -> Result<()> {
    let (m, depth) = g.dim();
    let (n, depth2) = k.dim();
    if depth2 != depth {
        return Err(Error::invalid("k", format!("shape (n, {depth})"), shape_str(k.shape())));
    }
    if out.dim() != (m, n) {
        return Err(Error::invalid("out", format!("shape ({m}, {n})"), shape_str(out.shape())));
    }
    if m == 0 || n == 0 || depth == 0 {
        return Ok(());
    }
    let chunks: Vec<usize> = (0..depth).step_by(CHUNK).collect();
    let partials: Vec<Array2<f64>> = threads::install(|| {
        chunks
            .par_iter()
            .map(|&start| {
                let stop = (start + CHUNK).min(depth);
                let (a, b) = (g.slice(s![.., start..stop]), k.slice(s![.., start..stop]));
                let mut c = Array2::<f64>::zeros((m, n));
                let [sa0, sa1]: [isize; 2] = a.strides().try_into().expect("2 axes");
                let [sb0, sb1]: [isize; 2] = b.strides().try_into().expect("2 axes");
                // SAFETY: a [m, stop - start] and b^T [stop - start, n] are valid views, c owned.
                unsafe {
                    matrixmultiply::dgemm(
                        m,
                        stop - start,
                        n,
                        1.0,
                        a.as_ptr(),
                        sa0,
                        sa1,
                        b.as_ptr(),
                        sb1,
                        sb0,
                        0.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                c
            })
            .collect()
    });
    for c in &partials {
        out += c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Axis};

    fn naive(a: &Array3<f64>, b: &Array3<f64>, n: usize) -> Array3<f64> {
        let (n_a, m, k) = a.dim();
        let (n_b, _, p) = b.dim();
        let mut out = Array3::zeros((n, m, p));
        for h in 0..n {
            for i in 0..m {
                for j in 0..p {
                    out[[h, i, j]] = (0..k).map(|t| a[[h / (n / n_a), i, t]] * b[[h / (n / n_b), t, j]]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn grouped_products_match_the_definition() {
        let a = Array3::from_shape_fn((2, 5, 3), |(h, i, j)| (h * 7 + i * 3 + j) as f64 * 0.25 - 2.0);
        let b = Array3::from_shape_fn((6, 3, 4), |(h, i, j)| ((h + 1) * (i + 2)) as f64 - j as f64);
        let mut out = Array3::from_elem((6, 5, 4), 1.0);
        batched_matmul(a.view(), b.view(), out.view_mut(), true).unwrap();
        let want = naive(&a, &b, 6) + 1.0;
        assert!(out.iter().zip(want.iter()).all(|(x, y)| (x - y).abs() < 1e-12));
        // Transposed (strided) views give the same products.
        let mut t = Array3::zeros((6, 4, 5));
        let bt = b.view().permuted_axes([0, 2, 1]);
        let at = a.view().permuted_axes([0, 2, 1]);
        batched_matmul(bt, at, t.view_mut(), false).unwrap();
        for h in 0..6 {
            let diff = &t.index_axis(Axis(0), h).t() - &(&want.index_axis(Axis(0), h) - 1.0);
            assert!(diff.iter().all(|d| d.abs() < 1e-12));
        }
    }

    #[test]
    fn contraction_matches_the_definition_across_chunks() {
        let depth = 2 * CHUNK + 5;
        let g = Array2::from_shape_fn((3, depth), |(i, t)| ((i * 31 + t * 7) % 13) as f64 - 6.0);
        let k = Array2::from_shape_fn((4, depth), |(j, t)| ((j * 17 + t * 5) % 11) as f64 - 5.0);
        let mut out = Array2::from_elem((3, 4), 2.0);
        contract(g.view(), k.view(), out.view_mut()).unwrap();
        for i in 0..3 {
            for j in 0..4 {
                let want: f64 = 2.0 + (0..depth).map(|t| g[[i, t]] * k[[j, t]]).sum::<f64>();
                assert_eq!(out[[i, j]], want); // small integers: exact
            }
        }
    }

    #[test]
    fn bad_shapes_name_the_argument() {
        let a = Array3::<f64>::zeros((2, 5, 3));
        let b = Array3::<f64>::zeros((3, 3, 4));
        let mut out = Array3::<f64>::zeros((4, 5, 4));
        assert_eq!(batched_matmul(a.view(), b.view(), out.view_mut(), false).unwrap_err().arg, "b");
        let b = Array3::<f64>::zeros((4, 3, 4));
        let mut out = Array3::<f64>::zeros((4, 6, 4));
        assert_eq!(batched_matmul(a.view(), b.view(), out.view_mut(), false).unwrap_err().arg, "out");
    }
}
