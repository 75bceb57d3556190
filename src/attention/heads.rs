//! q and k of many attention heads, validated once, and the `[n, d_head]` matrices of each head.
//!
//! Heads are numbered in C order over `[*lead, n_heads]`, the leading axes of the output
//! `[*lead, n_heads, n, n]`. Query head `hq` reads kv head `hq / (n_heads / n_kv_heads)`, as
//! Hugging Face's `repeat_kv` lays grouped-query attention out.
//!
//! f32 and f64 input is read in place. f16 and bf16 input stays as given and each head's
//! `[n, d_head]` matrix is converted to f32 when a block of rows first asks for it, into a small
//! cache shared by the threads (a few heads per thread, least recently used first out): extra
//! memory O(threads · n · d_head) instead of an f32 copy of the whole of q and k.

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewD, Axis, Dimension, Ix2};

use super::compute::{Compute, QkElement, Source};
use crate::error::{shape_str, Error, Result};
use crate::stack::{unravel, PositionMask, Real};

/// Axis order of q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[*lead, n, heads, d_head]`: TransformerLens `hook_q` / `hook_k`.
    #[default]
    Bnhd,
    /// `[*lead, heads, n, d_head]`: Hugging Face.
    Bhnd,
}

impl Layout {
    fn axes(self) -> &'static str {
        match self {
            Layout::Bnhd => "(..., n, n_heads, d_head)",
            Layout::Bhnd => "(..., n_heads, n, d_head)",
        }
    }

    /// Axis of the heads within one leading index's `[n, heads, d]` or `[heads, n, d]` block.
    fn head_axis(self) -> usize {
        match self {
            Layout::Bnhd => 1,
            Layout::Bhnd => 0,
        }
    }
}

impl FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Layout> {
        match s {
            "bnhd" => Ok(Layout::Bnhd),
            "bhnd" => Ok(Layout::Bhnd),
            _ => Err(Error::invalid("layout", "\"bnhd\" or \"bhnd\"", format!("{s:?}"))),
        }
    }
}

/// Sizes read from q's shape.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    heads: usize,
    d_head: usize,
}

fn read_dims(shape: &[usize], layout: Layout) -> Dims {
    let r = shape.len();
    let (n, heads) = match layout {
        Layout::Bnhd => (shape[r - 3], shape[r - 2]),
        Layout::Bhnd => (shape[r - 2], shape[r - 3]),
    };
    Dims { n, heads, d_head: shape[r - 1] }
}

/// Validated q and k in their compute precision, with an optional key mask.
pub struct QkHeads<'a, C: Compute> {
    q: Matrices<'a, C>,
    k: Matrices<'a, C>,
    lead: Vec<usize>,
    dims: Dims,
    n_kv_heads: usize,
    mask: Option<PositionMask<'a>>,
}

impl<'a, C: Compute> QkHeads<'a, C> {
    /// Checks shapes (q and k agree on lead, n and d_head; kv heads divide heads), that every
    /// value is finite and that the mask is `[n]` or `[lead[0], n]`. Copies nothing: narrow
    /// dtypes are converted to `C` one head at a time (see the module docs).
    pub fn new<T: QkElement<Compute = C>>(
        q: ArrayViewD<'a, T>,
        k: ArrayViewD<'a, T>,
        layout: Layout,
        mask: Option<ArrayViewD<'a, bool>>,
    ) -> Result<Self> {
        let (qs, ks) = (q.shape(), k.shape());
        if qs.len() < 3 {
            return Err(Error::invalid(
                "q",
                format!("an array of shape {} with at least 3 dimensions", layout.axes()),
                format!("shape {}", shape_str(qs)),
            ));
        }
        let dims = read_dims(qs, layout);
        if dims.d_head == 0 {
            return Err(Error::invalid("q", "d_head >= 1 (last axis)", format!("shape {}", shape_str(qs))));
        }
        let lead = qs[..qs.len() - 3].to_vec();
        if ks.len() != qs.len() || ks[..lead.len()] != lead[..] {
            return Err(Error::invalid(
                "k",
                format!("shape {} with the leading axes {} of q", layout.axes(), shape_str(&lead)),
                format!("shape {} (q has shape {})", shape_str(ks), shape_str(qs)),
            ));
        }
        let kd = read_dims(ks, layout);
        if kd.n != dims.n || kd.d_head != dims.d_head {
            return Err(Error::invalid(
                "k",
                format!(
                    "n = {} and d_head = {} like q (shape {}), layout {}",
                    dims.n,
                    dims.d_head,
                    shape_str(qs),
                    layout.axes()
                ),
                format!("n = {}, d_head = {} (shape {})", kd.n, kd.d_head, shape_str(ks)),
            ));
        }
        // Zero query heads with zero kv heads is an empty request (empty result), not an error.
        let divides = if kd.heads == 0 { dims.heads == 0 } else { dims.heads.is_multiple_of(kd.heads) };
        if !divides {
            return Err(Error::invalid(
                "k",
                format!("a number of kv heads >= 1 that divides q's {} heads (grouped-query attention)", dims.heads),
                format!("{} kv heads (shape {})", kd.heads, shape_str(ks)),
            ));
        }
        check_finite("q", &q)?;
        check_finite("k", &k)?;
        let select = HeadSelect { lead: lead.clone(), layout };
        let (q, k) = (Matrices::new(q, select.clone()), Matrices::new(k, select));
        let mut heads = QkHeads { q, k, lead, dims, n_kv_heads: kd.heads, mask: None };
        if let Some(m) = mask {
            heads.mask = Some(PositionMask::new(m, &heads.heads_lead(), dims.n)?);
        }
        Ok(heads)
    }

    /// `[*lead, n_heads]`: the leading axes of every output.
    pub fn heads_lead(&self) -> Vec<usize> {
        let mut lead = self.lead.clone();
        lead.push(self.dims.heads);
        lead
    }

    pub fn n(&self) -> usize {
        self.dims.n
    }

    pub fn d_head(&self) -> usize {
        self.dims.d_head
    }

    /// `[n, d_head]` queries of head h (`.view()` them).
    pub fn query(&self, h: usize) -> HeadMatrix<'_, C> {
        self.q.head(h / self.dims.heads, h % self.dims.heads)
    }

    /// `[n, d_head]` keys that head h attends with (its kv head; `.view()` them).
    pub fn key(&self, h: usize) -> HeadMatrix<'_, C> {
        let group = self.dims.heads / self.n_kv_heads;
        self.k.head(h / self.dims.heads, (h % self.dims.heads) / group)
    }

    /// Which keys head h may attend to (None: all).
    pub fn key_mask(&self, h: usize) -> Option<ArrayView1<'_, bool>> {
        self.mask.as_ref().map(|m| m.row(h))
    }

    /// `[*lead index, head]` of head h, for error messages.
    pub fn index_str(&self, h: usize) -> String {
        shape_str(&unravel(h, &self.heads_lead())).replace(",)", ")")
    }
}

/// How to find one head's `[n, d_head]` matrix in q or k.
#[derive(Clone)]
struct HeadSelect {
    lead: Vec<usize>,
    layout: Layout,
}

impl HeadSelect {
    fn view<'s, E>(&self, a: &ArrayViewD<'s, E>, lead_flat: usize, head: usize) -> ArrayView2<'s, E> {
        let mut v = a.clone();
        for ix in unravel(lead_flat, &self.lead) {
            v.index_axis_inplace(Axis(0), ix);
        }
        v.index_axis_inplace(Axis(self.layout.head_axis()), head);
        v.into_dimensionality::<Ix2>().expect("a head's q or k is two-dimensional")
    }
}

/// One head's `[n, d_head]` q or k in the compute precision: the input itself, or a converted
/// copy shared with the cache.
pub enum HeadMatrix<'s, C> {
    Borrowed(ArrayView2<'s, C>),
    Converted(Arc<Array2<C>>),
}

impl<C> HeadMatrix<'_, C> {
    pub fn view(&self) -> ArrayView2<'_, C> {
        match self {
            HeadMatrix::Borrowed(v) => *v,
            HeadMatrix::Converted(a) => a.view(),
        }
    }
}

/// q or k: read in place, or converted per head through a small cache.
enum Matrices<'a, C> {
    Native(ArrayViewD<'a, C>, HeadSelect),
    Narrow(Converted<'a, C>),
}

/// A head's converted matrix, keyed by (flat lead index, head).
type Cached<C> = ((usize, usize), Arc<Array2<C>>);

struct Converted<'a, C> {
    convert: Box<dyn Fn(usize, usize) -> Array2<C> + Send + Sync + 'a>,
    /// Most recently used last; at most `capacity` heads.
    cache: Mutex<Vec<Cached<C>>>,
    capacity: usize,
}

impl<'a, C: Compute> Matrices<'a, C> {
    fn new<T: QkElement<Compute = C>>(a: ArrayViewD<'a, T>, select: HeadSelect) -> Self {
        match T::source(a) {
            Source::Native(v) => Matrices::Native(v, select),
            Source::Narrow(v) => Matrices::Narrow(Converted {
                convert: Box::new(move |lead_flat, head| select.view(&v, lead_flat, head).mapv(T::to_compute)),
                cache: Mutex::new(Vec::new()),
                // Each thread works on one head at a time (blocks of a head are adjacent), so a
                // few more heads than threads keep every thread's current head cached.
                capacity: crate::threads::get_num_threads() + 2,
            }),
        }
    }

    fn head(&self, lead_flat: usize, head: usize) -> HeadMatrix<'_, C> {
        match self {
            Matrices::Native(v, select) => HeadMatrix::Borrowed(select.view(v, lead_flat, head)),
            Matrices::Narrow(c) => HeadMatrix::Converted(c.head((lead_flat, head))),
        }
    }
}

impl<C> Converted<'_, C> {
    /// The converted head, from the cache or converted now (outside the lock, so threads
    /// convert different heads at once). Conversion is exact, so what is cached never changes
    /// a result.
    fn head(&self, key: (usize, usize)) -> Arc<Array2<C>> {
        let lock = || self.cache.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut cache = lock();
            if let Some(pos) = cache.iter().position(|(k, _)| *k == key) {
                let entry = cache.remove(pos);
                let matrix = Arc::clone(&entry.1);
                cache.push(entry);
                return matrix;
            }
        }
        let matrix = Arc::new((self.convert)(key.0, key.1));
        let mut cache = lock();
        if !cache.iter().any(|(k, _)| *k == key) {
            if cache.len() >= self.capacity {
                cache.remove(0);
            }
            cache.push((key, Arc::clone(&matrix)));
        }
        matrix
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// NaN or inf in q or k is an error naming its index (checked before any work).
fn check_finite<T: Real>(arg: &'static str, a: &ArrayViewD<'_, T>) -> Result<()> {
    if a.iter().all(|v| v.to_f64().is_finite()) {
        return Ok(());
    }
    let (ix, v) = a.indexed_iter().find(|(_, v)| !v.to_f64().is_finite()).expect("a non-finite element exists");
    Err(Error::invalid(
        arg,
        "finite values",
        format!("{} at index {}", v.to_f64(), shape_str(ix.slice()).replace(",)", ")")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{attention_patterns, scores_and_lse_from_qk, AttentionOptions, LseOptions};
    use crate::scores::{Reduce, ScoreOptions, Spans};
    use crate::targets::Kind;
    use ndarray::{Array, ArrayD, IxDyn};

    fn zeros(shape: &[usize]) -> ArrayD<f32> {
        Array::zeros(IxDyn(shape))
    }

    fn err(q: &[usize], k: &[usize], layout: Layout) -> String {
        let (q, k) = (zeros(q), zeros(k));
        QkHeads::<f32>::new(q.view(), k.view(), layout, None).err().expect("an error").to_string()
    }

    #[test]
    fn shapes_are_checked_with_named_arguments() {
        assert!(err(&[4, 16], &[4, 16], Layout::Bnhd).starts_with("q:"));
        assert!(err(&[2, 5, 4, 16], &[2, 6, 4, 16], Layout::Bnhd).starts_with("k:"));
        assert!(err(&[2, 5, 4, 16], &[2, 5, 4, 8], Layout::Bnhd).contains("d_head = 16"));
        assert!(err(&[2, 5, 4, 16], &[3, 5, 4, 16], Layout::Bnhd).contains("leading axes"));
        assert!(err(&[5, 6, 16], &[5, 4, 16], Layout::Bnhd).contains("divides q's 6 heads"));
        assert!(err(&[6, 5, 16], &[0, 5, 16], Layout::Bhnd).contains("0 kv heads"));
        assert!(err(&[5, 6, 0], &[5, 6, 0], Layout::Bnhd).contains("d_head >= 1"));
        assert!("bshd".parse::<Layout>().unwrap_err().to_string().starts_with("layout:"));
    }

    #[test]
    fn grouped_heads_share_kv_heads_in_both_layouts() {
        // q [2, n=3, H=4, d=2], k [2, 3, 2, 2]; value encodes (batch, position, head).
        let q = Array::from_shape_fn(IxDyn(&[2, 3, 4, 2]), |ix| (ix[0] * 100 + ix[1] * 10 + ix[2]) as f32);
        let k = Array::from_shape_fn(IxDyn(&[2, 3, 2, 2]), |ix| (ix[0] * 100 + ix[1] * 10 + ix[2]) as f32);
        let heads = QkHeads::new(q.view(), k.view(), Layout::Bnhd, None).unwrap();
        assert_eq!(heads.heads_lead(), vec![2, 4]);
        assert_eq!(heads.heads_lead().iter().product::<usize>(), 8);
        // head 7 = batch 1, head 3 -> kv head 1.
        assert_eq!(heads.query(7).view()[[2, 0]], 123.0);
        assert_eq!(heads.key(7).view()[[2, 0]], 121.0);
        assert_eq!(heads.key(5).view()[[0, 1]], 100.0);
        assert_eq!(heads.index_str(7), "(1, 3)");
        let qt = q.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let kt = k.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let heads = QkHeads::new(qt, kt, Layout::Bhnd, None).unwrap();
        assert_eq!(heads.query(7).view()[[2, 0]], 123.0);
        assert_eq!(heads.key(7).view()[[2, 0]], 121.0);
    }

    #[test]
    fn masks_and_non_finite_values() {
        let q = zeros(&[2, 3, 1, 4]);
        let mask = Array::from_shape_vec(IxDyn(&[2, 3]), vec![false, true, true, true, true, true]).unwrap();
        let heads = QkHeads::new(q.view(), q.view(), Layout::Bnhd, Some(mask.view())).unwrap();
        assert!(!heads.key_mask(0).unwrap()[0]);
        assert!(heads.key_mask(1).unwrap()[0]);
        let shared = Array::from_elem(IxDyn(&[3]), true);
        assert!(QkHeads::new(q.view(), q.view(), Layout::Bnhd, Some(shared.view())).is_ok());
        let bad = Array::from_elem(IxDyn(&[2, 4]), true);
        let e = QkHeads::new(q.view(), q.view(), Layout::Bnhd, Some(bad.view())).err().unwrap().to_string();
        assert!(e.starts_with("attention_mask:") && e.contains("(2, 3)") && e.contains("(2, 4)"), "{e}");
        let mut nan = zeros(&[2, 3, 1, 4]);
        nan[[1, 2, 0, 3]] = f32::NAN;
        let e = QkHeads::new(q.view(), nan.view(), Layout::Bnhd, None).err().unwrap().to_string();
        assert_eq!(e, "k: expected finite values, got NaN at index (1, 2, 0, 3)");
    }

    /// Values every narrow type holds exactly (multiples of 1/8 in [-4, 4)).
    fn exact(shape: &[usize], seed: usize) -> ArrayD<f32> {
        Array::from_shape_fn(IxDyn(shape), |ix| {
            let flat = ix.slice().iter().fold(seed, |acc, &i| acc * 31 + i);
            ((flat * 2654435761) % 64) as f32 / 8.0 - 4.0
        })
    }

    fn bits<T: Real>(a: &ArrayD<T>) -> Vec<u64> {
        a.iter().map(|v| v.to_f64().to_bits()).collect()
    }

    /// f16 and bf16 heads are the f32 heads of the same values, in both layouts and through
    /// strided views, and the converted heads held at once stay within the cache's capacity.
    #[test]
    fn narrow_heads_equal_the_f32_heads_of_the_same_values() {
        let (q, k) = (exact(&[2, 7, 6, 5], 1), exact(&[2, 7, 3, 5], 2));
        let wide = QkHeads::new(q.view(), k.view(), Layout::Bnhd, None).unwrap();
        let (qb, kb) = (q.mapv(half::bf16::from_f32), k.mapv(half::bf16::from_f32));
        let (qh, kh) = (q.mapv(half::f16::from_f32), k.mapv(half::f16::from_f32));
        let bf = QkHeads::new(qb.view(), kb.view(), Layout::Bnhd, None).unwrap();
        let hf = QkHeads::new(qh.view(), kh.view(), Layout::Bnhd, None).unwrap();
        let (qt, kt) = (qb.view().permuted_axes(IxDyn(&[0, 2, 1, 3])), kb.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
        let bf_t = QkHeads::new(qt, kt, Layout::Bhnd, None).unwrap();
        for h in 0..12 {
            for narrow in [&bf, &hf, &bf_t] {
                assert_eq!(narrow.query(h).view(), wide.query(h).view(), "query {h}");
                assert_eq!(narrow.key(h).view(), wide.key(h).view(), "key {h}");
            }
        }
        for m in [&bf.q, &bf.k] {
            match m {
                Matrices::Narrow(c) => assert!(c.cached() <= c.capacity && c.capacity >= 3),
                Matrices::Native(..) => panic!("bf16 is converted per head"),
            }
        }
        assert!(matches!(wide.q, Matrices::Native(..)));
    }

    /// Patterns and fused scores of bf16 and f16 q, k are bit for bit those of f32 q, k of the
    /// same values: conversion is exact and the f32 kernels do the rest.
    #[test]
    fn narrow_kernels_equal_f32_kernels_bit_for_bit() {
        type Bits = (Vec<u64>, Vec<u64>, Vec<u64>);
        fn run<T: QkElement<Compute = f32>>(q: &ArrayD<f32>, k: &ArrayD<f32>, to: fn(f32) -> T) -> Bits {
            let (q, k) = (q.mapv(to), k.mapv(to));
            let n = q.shape()[1];
            let tokens = Array::from_shape_fn(IxDyn(&[n]), |ix| (ix[0] % 13) as i64);
            let kinds = [Kind::PreviousToken, Kind::Induction, Kind::Entropy];
            let opts = AttentionOptions { softcap: Some(3.0), ..AttentionOptions::default() };
            let p = attention_patterns(q.view(), k.view(), None, opts).unwrap();
            let (score, per_query) = (ScoreOptions::default(), Reduce::PerQuery);
            let ask = LseOptions { given: None, return_lse: true };
            let (s, lse) = scores_and_lse_from_qk(
                q.view(),
                k.view(),
                Some(tokens.view()),
                None,
                Spans::default(),
                &kinds,
                opts,
                score,
                per_query,
                ask,
            )
            .unwrap();
            (bits(&p), bits(&s), bits(&lse.unwrap()))
        }
        let (q, k) = (exact(&[1, 300, 4, 8], 3).mapv(|v| v * 0.25), exact(&[1, 300, 2, 8], 4));
        let want = run(&q, &k, |v| v);
        assert!(run(&q, &k, half::bf16::from_f32) == want, "bf16 differs from f32 of the same values");
        assert!(run(&q, &k, half::f16::from_f32) == want, "f16 differs from f32 of the same values");
    }
}
