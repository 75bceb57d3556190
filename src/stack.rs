//! A stack of square matrices `[*lead, n, n]` (attention patterns, detection arrays) seen through
//! any strides, and the mapping from a flat head index to groups that broadcast against `lead`
//! (one token row per batch element, one detection matrix for all heads, ...).

use ndarray::{ArrayView2, ArrayViewD, Axis, Ix2};

use crate::error::{shape_str, Error, Result};

/// Element types the kernels read. Everything is widened to f64 before it is summed.
pub trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

impl Real for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for half::f16 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}

/// `[*lead, n, n]` matrices, addressed by a flat head index over `lead` (C order).
pub struct MatrixStack<'a, T> {
    view: ArrayViewD<'a, T>,
    lead: Vec<usize>,
    n: usize,
}

impl<'a, T: Real> MatrixStack<'a, T> {
    /// Checks that `view` is `[*lead, n, n]`; `arg` names it in errors.
    pub fn new(arg: &'static str, view: ArrayViewD<'a, T>) -> Result<Self> {
        let shape = view.shape();
        if shape.len() < 2 {
            return Err(Error::invalid(arg, "an array of shape (..., n, n) with at least 2 dimensions", format!("shape {}", shape_str(shape))));
        }
        let (q, k) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        if q != k {
            return Err(Error::invalid(arg, "square matrices in the last two axes (queries == keys)", format!("shape {}", shape_str(shape))));
        }
        let lead = shape[..shape.len() - 2].to_vec();
        Ok(MatrixStack { view, lead, n: q })
    }

    pub fn lead(&self) -> &[usize] {
        &self.lead
    }

    /// Sequence length (queries == keys).
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn n_heads(&self) -> usize {
        self.lead.iter().product()
    }

    /// The `[n, n]` matrix of flat head `h`.
    pub fn head(&self, h: usize) -> ArrayView2<'_, T> {
        let mut v = self.view.view();
        for ix in unravel(h, &self.lead) {
            v.index_axis_inplace(Axis(0), ix);
        }
        v.into_dimensionality::<Ix2>().expect("a MatrixStack head is two-dimensional")
    }

    /// Multi-index `[*lead_index, i, j]` of an element, for error messages.
    pub fn index_str(&self, h: usize, i: usize, j: usize) -> String {
        let mut ix = unravel(h, &self.lead);
        ix.extend([i, j]);
        shape_str(&ix).replace(",)", ")")
    }
}

/// C-order multi-index of flat index `flat` in `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut ix = vec![0; shape.len()];
    for (axis, &dim) in shape.iter().enumerate().rev() {
        ix[axis] = flat % dim;
        flat /= dim;
    }
    ix
}

/// For every flat head over `lead`, the flat index of its group in `group_shape`, where
/// `group_shape` broadcasts against `lead` the numpy way: aligned from the left (a group axis per
/// leading axis, missing trailing axes count as 1), each of size 1 or equal to the lead axis.
/// Left alignment is what lets tokens `[batch, n]` serve patterns `[batch, layer, head, n, n]`.
pub fn group_of_heads(arg: &'static str, lead: &[usize], group_shape: &[usize]) -> Result<Vec<usize>> {
    let fits = group_shape.len() <= lead.len()
        && group_shape.iter().zip(lead).all(|(&g, &l)| g == 1 || g == l);
    if !fits {
        return Err(Error::invalid(
            arg,
            format!("leading axes that match the patterns' leading axes {} from the left (each 1 or equal)", shape_str(lead)),
            format!("leading axes {}", shape_str(group_shape)),
        ));
    }
    let n_heads: usize = lead.iter().product();
    let groups = (0..n_heads)
        .map(|h| {
            let ix = unravel(h, lead);
            group_shape.iter().zip(&ix).fold(0, |acc, (&g, &i)| acc * g + if g == 1 { 0 } else { i })
        })
        .collect();
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn};

    #[test]
    fn heads_follow_c_order_of_lead_axes() {
        let a = Array::from_shape_fn(IxDyn(&[2, 3, 4, 4]), |ix| (ix[0] * 100 + ix[1] * 10 + ix[2]) as f64);
        let stack = MatrixStack::new("patterns", a.view()).unwrap();
        assert_eq!(stack.n_heads(), 6);
        assert_eq!(stack.head(4)[[2, 0]], 112.0);
        assert_eq!(stack.index_str(4, 2, 0), "(1, 1, 2, 0)");
    }

    #[test]
    fn rejects_non_square_and_low_rank() {
        let a = Array::<f32, _>::zeros(IxDyn(&[2, 3, 4]));
        let err = MatrixStack::new("patterns", a.view()).err().unwrap();
        assert!(err.to_string().contains("square"), "{err}");
        let b = Array::<f32, _>::zeros(IxDyn(&[4]));
        assert!(MatrixStack::new("patterns", b.view()).is_err());
    }

    #[test]
    fn groups_broadcast_from_the_left() {
        assert_eq!(group_of_heads("tokens", &[2, 3], &[2]).unwrap(), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(group_of_heads("tokens", &[2, 3], &[]).unwrap(), vec![0; 6]);
        assert_eq!(group_of_heads("d", &[2, 3], &[1, 3]).unwrap(), vec![0, 1, 2, 0, 1, 2]);
        assert!(group_of_heads("tokens", &[2, 3], &[3]).is_err());
        assert!(group_of_heads("tokens", &[], &[2]).is_err());
    }
}
