//! q and k of many attention heads, validated once, and the `[n, d_head]` matrices of each head.
//!
//! Heads are numbered in C order over `[*lead, n_heads]`, the leading axes of the output
//! `[*lead, n_heads, n, n]`. Query head `hq` reads kv head `hq / (n_heads / n_kv_heads)`, as
//! Hugging Face's `repeat_kv` lays grouped-query attention out.

use std::str::FromStr;

use ndarray::{ArrayView1, ArrayView2, ArrayViewD, Axis, CowArray, Dimension, Ix2, IxDyn};

use super::compute::{Compute, QkElement};
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
    q: CowArray<'a, C, IxDyn>,
    k: CowArray<'a, C, IxDyn>,
    layout: Layout,
    lead: Vec<usize>,
    dims: Dims,
    n_kv_heads: usize,
    mask: Option<PositionMask<'a>>,
}

impl<'a, C: Compute> QkHeads<'a, C> {
    /// Checks shapes (q and k agree on lead, n and d_head; kv heads divide heads), that every
    /// value is finite and that the mask is `[n]` or `[lead[0], n]`; converts to `C`.
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
        let mut heads =
            QkHeads { q: T::to_compute(q), k: T::to_compute(k), layout, lead, dims, n_kv_heads: kd.heads, mask: None };
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

    /// `[n, d_head]` queries of head h.
    pub fn query(&self, h: usize) -> ArrayView2<'_, C> {
        self.head_matrix(&self.q, h / self.dims.heads, h % self.dims.heads)
    }

    /// `[n, d_head]` keys that head h attends with (its kv head).
    pub fn key(&self, h: usize) -> ArrayView2<'_, C> {
        let group = self.dims.heads / self.n_kv_heads;
        self.head_matrix(&self.k, h / self.dims.heads, (h % self.dims.heads) / group)
    }

    /// Which keys head h may attend to (None: all).
    pub fn key_mask(&self, h: usize) -> Option<ArrayView1<'_, bool>> {
        self.mask.as_ref().map(|m| m.row(h))
    }

    /// `[*lead index, head]` of head h, for error messages.
    pub fn index_str(&self, h: usize) -> String {
        shape_str(&unravel(h, &self.heads_lead())).replace(",)", ")")
    }

    fn head_matrix<'s>(&'s self, a: &'s CowArray<'a, C, IxDyn>, lead_flat: usize, head: usize) -> ArrayView2<'s, C> {
        let mut v = a.view();
        for ix in unravel(lead_flat, &self.lead) {
            v.index_axis_inplace(Axis(0), ix);
        }
        v.index_axis_inplace(Axis(self.layout.head_axis()), head);
        v.into_dimensionality::<Ix2>().expect("a head's q or k is two-dimensional")
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
    use ndarray::{Array, ArrayD};

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
        assert_eq!(heads.query(7)[[2, 0]], 123.0);
        assert_eq!(heads.key(7)[[2, 0]], 121.0);
        assert_eq!(heads.key(5)[[0, 1]], 100.0);
        assert_eq!(heads.index_str(7), "(1, 3)");
        let qt = q.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let kt = k.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
        let heads = QkHeads::new(qt, kt, Layout::Bhnd, None).unwrap();
        assert_eq!(heads.query(7)[[2, 0]], 123.0);
        assert_eq!(heads.key(7)[[2, 0]], 121.0);
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
}
