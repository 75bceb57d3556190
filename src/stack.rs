//! A stack of square matrices `[*lead, n, n]` (attention patterns, detection arrays) seen through
//! any strides, and the mapping from a flat head index to groups that broadcast against `lead`
//! (one token row per batch element, one detection matrix for all heads, ...).

use std::marker::PhantomData;

use ndarray::{ArrayView1, ArrayView2, ArrayViewD, Axis, Ix1, Ix2};

use crate::error::{shape_str, Error, Result};

/// Element types the kernels read. Everything is widened to f64 before it is summed.
pub trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;

    /// sum (or sum of |v|) of a slice in f64, in [`SUM_LANES`] independent lanes combined in a
    /// fixed order (so the loop vectorises and the result never depends on the CPU).
    #[inline]
    fn sum_widened(s: &[Self], abs: bool) -> f64 {
        lane_sum(s, abs)
    }

    /// `sum` plus the `len` elements `ptr + k·step` (k < len), widened to f64 and added one at
    /// a time in order, with one prefetch of `ahead + k·step` per [`SUM_GROUP`] elements (at
    /// the group's first k). The kernel of [`Line::sum_in_order`].
    ///
    /// # Safety
    /// The `len` elements must lie inside one borrowed array (`ahead` need not: it is only
    /// prefetched).
    #[inline(always)]
    unsafe fn sum_strided(ptr: *const Self, step: isize, len: usize, ahead: *const Self, sum: f64) -> f64 {
        // SAFETY: the caller's contract.
        unsafe { sum_strided_loop(ptr, step, len, ahead, sum) }
    }

    /// `chunk` as f32 values, for kernels that read f32 lanes: f32 itself in place, types that
    /// f32 holds exactly (f16, ...) converted into `buf` (at least `chunk.len()` long). None, the
    /// default, for types f32 cannot hold exactly (f64): those kernels then take their generic path.
    #[inline]
    fn as_f32<'a>(chunk: &'a [Self], buf: &'a mut [f32]) -> Option<&'a [f32]> {
        let _ = (chunk, buf);
        None
    }
}

/// Lanes of [`Real::sum_widened`].
pub const SUM_LANES: usize = 8;

#[inline(always)]
fn lane_sum<T: Real>(s: &[T], abs: bool) -> f64 {
    let f = |v: T| if abs { v.to_f64().abs() } else { v.to_f64() };
    let mut lanes = [0.0f64; SUM_LANES];
    let chunks = s.chunks_exact(SUM_LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }

    #[inline]
    fn sum_widened(s: &[f64], abs: bool) -> f64 {
        sum_widened_f64(s, abs)
    }
}

impl Real for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }

    /// A full pass is bound by this loop: run it with the widest vectors the CPU has (the lane
    /// order, and so the result, is the same on every CPU).
    #[inline]
    fn sum_widened(s: &[f32], abs: bool) -> f64 {
        sum_widened_f32(s, abs)
    }

    #[inline]
    fn as_f32<'a>(chunk: &'a [f32], _buf: &'a mut [f32]) -> Option<&'a [f32]> {
        Some(chunk)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sum_strided(ptr: *const f32, step: isize, len: usize, ahead: *const f32, sum: f64) -> f64 {
        // SAFETY: the caller's contract.
        unsafe { sum_strided_f32(ptr, step, len, ahead, sum) }
    }
}

crate::simd::dispatched!(
    /// [`Real::sum_widened`] for f32, compiled per CPU level.
    sum_widened_f32(s: &[f32], abs: bool) -> f64 = lane_sum::<f32>, lane_sum::<f32>
);
crate::simd::dispatched!(
    /// [`Real::sum_widened`] for f64, compiled per CPU level.
    sum_widened_f64(s: &[f64], abs: bool) -> f64 = lane_sum::<f64>, lane_sum::<f64>
);

impl Real for half::f16 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }

    #[inline]
    fn as_f32<'a>(chunk: &'a [half::f16], buf: &'a mut [f32]) -> Option<&'a [f32]> {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..chunk.len()];
        chunk.convert_to_f32_slice(buf);
        Some(buf)
    }
}

/// bfloat16 is the upper half of an f32: widening is a shift, exact for every value (NaN stays
/// NaN, ±inf stays ±inf). Written out rather than `half::bf16::to_f64`, whose branches keep
/// loops over it from vectorising.
#[inline(always)]
pub fn bf16_to_f32(v: half::bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

impl Real for half::bf16 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16_to_f32(self) as f64
    }

    /// Vectorised like f32's (a bf16 pass reads half the bytes of an f32 one).
    #[inline]
    fn sum_widened(s: &[half::bf16], abs: bool) -> f64 {
        sum_widened_bf16(s, abs)
    }

    /// Exact (a shift), so bf16 logits take the f32-lane kernels of `token_losses`.
    #[inline]
    fn as_f32<'a>(chunk: &'a [half::bf16], buf: &'a mut [f32]) -> Option<&'a [f32]> {
        let buf = &mut buf[..chunk.len()];
        buf.iter_mut().zip(chunk).for_each(|(d, &v)| *d = bf16_to_f32(v));
        Some(buf)
    }
}

crate::simd::dispatched!(
    /// [`Real::sum_widened`] for bf16, compiled per CPU level.
    sum_widened_bf16(s: &[half::bf16], abs: bool) -> f64 = lane_sum::<half::bf16>, lane_sum::<half::bf16>
);

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
            return Err(Error::invalid(
                arg,
                "an array of shape (..., n, n) with at least 2 dimensions",
                format!("shape {}", shape_str(shape)),
            ));
        }
        let (q, k) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        if q != k {
            return Err(Error::invalid(
                arg,
                "square matrices in the last two axes (queries == keys)",
                format!("shape {}", shape_str(shape)),
            ));
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

    /// The `[n, n]` matrix of flat head `h` (h < n_heads). Plain arithmetic on strides, no
    /// allocation: kernels call this once per block of rows.
    pub fn head(&self, h: usize) -> Matrix<'_, T> {
        assert!(h < self.n_heads(), "head {h} out of range");
        let strides = self.view.strides();
        let mut offset = 0isize;
        let mut rest = h;
        for (axis, &dim) in self.lead.iter().enumerate().rev() {
            offset += (rest % dim) as isize * strides[axis];
            rest /= dim;
        }
        let k = strides.len();
        Matrix {
            // SAFETY: the index (h's multi-index, 0, 0) lies inside the view's shape, so the
            // offset stays inside the allocation the view borrows.
            ptr: unsafe { self.view.as_ptr().offset(offset) },
            n: self.n,
            row_stride: strides[k - 2],
            col_stride: strides[k - 1],
            _borrow: PhantomData,
        }
    }

    /// Multi-index of head h over the leading axes, for error messages.
    pub fn lead_str(&self, h: usize) -> String {
        shape_str(&unravel(h, &self.lead)).replace(",)", ")")
    }

    /// Multi-index `[*lead_index, i, j]` of an element, for error messages.
    pub fn index_str(&self, h: usize, i: usize, j: usize) -> String {
        let mut ix = unravel(h, &self.lead);
        ix.extend([i, j]);
        shape_str(&ix).replace(",)", ")")
    }
}

/// One `[n, n]` matrix of a stack, any strides (negative included), read-only.
#[derive(Clone, Copy)]
pub struct Matrix<'a, T> {
    ptr: *const T,
    n: usize,
    row_stride: isize,
    col_stride: isize,
    _borrow: PhantomData<&'a T>,
}

// SAFETY: a Matrix only reads through its pointer, like the `&'a T` it stands for.
unsafe impl<T: Sync> Send for Matrix<'_, T> {}
unsafe impl<T: Sync> Sync for Matrix<'_, T> {}

impl<'a, T: Real> Matrix<'a, T> {
    pub fn n(&self) -> usize {
        self.n
    }

    /// A[i, j]; panics when out of range (a bug in the caller, never bad input).
    #[inline(always)]
    pub fn get(&self, i: usize, j: usize) -> T {
        assert!(i < self.n && j < self.n, "index ({i}, {j}) out of range for n = {}", self.n);
        // SAFETY: both indices are in range, so the offset addresses an element of the view.
        unsafe { *self.ptr.offset(i as isize * self.row_stride + j as isize * self.col_stride) }
    }

    /// Hints the CPU to start loading A[i, j]: scattered reads (one row per page) are otherwise
    /// latency-bound, since hardware prefetchers do not cross pages.
    #[inline(always)]
    pub fn prefetch(&self, i: usize, j: usize) {
        #[cfg(target_arch = "x86_64")]
        if i < self.n && j < self.n {
            let offset = i as isize * self.row_stride + j as isize * self.col_stride;
            // SAFETY: in range as above; a prefetch never faults and reads nothing observable.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(self.ptr.offset(offset) as *const i8);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, j);
    }

    /// The line of elements A[i, i·along - back] (along 0: a column, along 1: a diagonal) for
    /// the rows i from `first` to the last: element k of the line is row `first + k`'s. Panics
    /// unless A[first, first·along - back] is in range (then every later row's element is).
    pub fn line(&self, along: usize, back: usize, first: usize) -> Line<'a, T> {
        assert!(along <= 1, "a line moves at most one column per row");
        let j = (first * along).checked_sub(back);
        assert!(first < self.n && j.is_some_and(|j| j < self.n), "line start ({first}, {j:?}) out of range");
        let offset = first as isize * self.row_stride + j.unwrap_or(0) as isize * self.col_stride;
        Line {
            // SAFETY: (first, j) is in range, so the offset addresses an element of the view.
            ptr: unsafe { self.ptr.offset(offset) },
            step: self.row_stride + along as isize * self.col_stride,
            len: self.n - first,
            _borrow: PhantomData,
        }
    }

    /// Row i as a slice when its elements are adjacent in memory.
    #[inline]
    pub fn row_slice(&self, i: usize) -> Option<&'a [T]> {
        assert!(i < self.n, "row {i} out of range for n = {}", self.n);
        (self.col_stride == 1 || self.n <= 1).then(|| {
            // SAFETY: row i's n elements are contiguous (stride 1) and inside the view.
            unsafe { std::slice::from_raw_parts(self.ptr.offset(i as isize * self.row_stride), self.n) }
        })
    }

    /// The elements of row i, in column order, whatever the strides.
    #[inline]
    pub fn row(&self, i: usize) -> impl Iterator<Item = T> + '_ {
        (0..self.n).map(move |j| self.get(i, j))
    }
}

/// Elements per group of [`Real::sum_strided`]: one prefetch per group.
pub const SUM_GROUP: usize = 8;

/// [`Real::sum_strided`] as plain Rust (one prefetch per group of [`SUM_GROUP`]).
///
/// # Safety
/// As [`Real::sum_strided`].
#[inline(always)]
unsafe fn sum_strided_loop<T: Real>(ptr: *const T, step: isize, len: usize, ahead: *const T, mut sum: f64) -> f64 {
    for k in 0..len {
        if k % SUM_GROUP == 0 {
            prefetch(ahead.wrapping_offset(k as isize * step));
        }
        // SAFETY: k < len (the caller's contract).
        sum += unsafe { *ptr.offset(k as isize * step) }.to_f64();
    }
    sum
}

/// Hints the CPU to load the cache line of `p` (any address: a prefetch never faults and reads
/// nothing observable).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above; no memory is read.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`Real::sum_strided`] for f32 in hand-scheduled x86-64: per element one `cvtss2sd` from
/// memory and one `addsd` (the same widening and the same adds in the same order as the loop,
/// so the same bits), with the group's eight addresses formed by the addressing modes from
/// three registers (p + {0, 1, 2, 4}·step, r + {0, 2, 4}·step with r = p + 3·step, p + 6·step).
/// LLVM's version of the loop spends an add per element on the address and a separate load:
/// about 4.4 instructions per element against 2.4 here, and this walk is bound by how many rows
/// ahead the out-of-order window reaches (its misses in flight). Measured on Zen 3, 288 heads
/// of 1024: 4.3 against 4.7 ns per element (numpy's strided sum: 4.4).
///
/// # Safety
/// As [`Real::sum_strided`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_strided_f32(ptr: *const f32, step: isize, len: usize, ahead: *const f32, mut sum: f64) -> f64 {
    let groups = len / SUM_GROUP;
    let bytes = step * 4;
    if groups > 0 {
        // SAFETY: the asm reads the 8·groups elements ptr + k·step, k < 8·groups <= len, all
        // in range by the caller's contract; it only prefetches through `ahead` and writes
        // nothing but its registers (and the flags: `add` and `dec` set them, so no
        // `preserves_flags`).
        unsafe {
            std::arch::asm!(
                "2:",
                "prefetcht0 [{q}]",
                "lea {r}, [{p} + {s3}]",
                "cvtss2sd {x}, dword ptr [{p}]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{p} + {s1}]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{p} + {s1}*2]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{r}]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{p} + {s1}*4]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{r} + {s1}*2]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{p} + {s3}*2]",
                "addsd {sum}, {x}",
                "cvtss2sd {x}, dword ptr [{r} + {s1}*4]",
                "addsd {sum}, {x}",
                "add {p}, {s8}",
                "add {q}, {s8}",
                "dec {g}",
                "jnz 2b",
                p = inout(reg) ptr as *const u8 => _,
                q = inout(reg) ahead as *const u8 => _,
                g = inout(reg) groups => _,
                r = out(reg) _,
                s1 = in(reg) bytes,
                s3 = in(reg) 3 * bytes,
                s8 = in(reg) 8 * bytes,
                x = out(xmm_reg) _,
                sum = inout(xmm_reg) sum,
                options(nostack, readonly),
            );
        }
    }
    let done = groups * SUM_GROUP;
    // SAFETY: the rest, elements done..len, as the loop (prefetching past `ahead` is harmless).
    let (rest, rest_ahead) = (ptr.wrapping_offset(done as isize * step), ahead.wrapping_offset(done as isize * step));
    unsafe { sum_strided_loop(rest, step, len - done, rest_ahead, sum) }
}

/// Elements of a matrix one row apart at a constant stride ([`Matrix::line`]): the walk of a
/// diagonal or a column as a pointer and a step, so the kernel that reads one element per row
/// pays no index arithmetic or bounds check per element.
#[derive(Clone, Copy)]
pub struct Line<'a, T> {
    ptr: *const T,
    /// Elements from one row's element to the next's.
    step: isize,
    len: usize,
    _borrow: PhantomData<&'a T>,
}

// SAFETY: a Line only reads through its pointer, like the `&'a T` it stands for.
unsafe impl<T: Sync> Send for Line<'_, T> {}
unsafe impl<T: Sync> Sync for Line<'_, T> {}

impl<T: Real> Line<'_, T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The line from its element k on (k <= len).
    pub fn skip(&self, k: usize) -> Self {
        assert!(k <= self.len, "skip {k} past a line of {}", self.len);
        Line {
            // Wrapping: with k == len the address lies a step past the last row's element (an
            // empty line, never read).
            ptr: self.ptr.wrapping_offset(k as isize * self.step),
            len: self.len - k,
            ..*self
        }
    }

    /// Calls `f(k, element k)` for every k in `ks`, in order, and before each read hints the
    /// CPU to load element k of `ahead` (another line, or this one further on). Panics when `ks`
    /// runs past the line. `ahead` may run past its own end: a prefetch never faults and reads
    /// nothing observable, so its element k is only an address.
    #[inline(always)]
    pub fn each(&self, ks: std::ops::Range<usize>, ahead: &Line<'_, T>, mut f: impl FnMut(usize, T)) {
        assert!(ks.end <= self.len, "rows {ks:?} past a line of {}", self.len);
        for k in ks {
            ahead.prefetch(k);
            // SAFETY: k < len, so row first + k is in range and so is its element.
            f(k, unsafe { *self.ptr.offset(k as isize * self.step) });
        }
    }

    /// `sum` plus the elements `ks`, widened to f64 and added one at a time in order (so the
    /// result is the plain loop's, bit for bit), with one prefetch per [`SUM_GROUP`] elements: of
    /// `ahead`'s element k at the group's first k (as [`Line::each`]). `ahead` must step like
    /// this line (a line of the same stack and key). Panics when `ks` runs past the line.
    #[inline(always)]
    pub fn sum_in_order(&self, ks: std::ops::Range<usize>, ahead: &Line<'_, T>, sum: f64) -> f64 {
        assert!(ks.end <= self.len, "rows {ks:?} past a line of {}", self.len);
        assert_eq!(ahead.step, self.step, "a lookahead line steps like the line");
        if ks.is_empty() {
            return sum;
        }
        let k = ks.start as isize * self.step;
        // SAFETY: the ks.len() elements from element ks.start are in range (ks.end <= len);
        // the lookahead is only prefetched.
        unsafe { T::sum_strided(self.ptr.offset(k), self.step, ks.len(), ahead.ptr.wrapping_offset(k), sum) }
    }

    /// Hints the CPU to load element k (only an address: k may lie past the line).
    #[inline(always)]
    pub fn prefetch(&self, k: usize) {
        prefetch(self.ptr.wrapping_offset(k as isize * self.step));
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
    let fits = group_shape.len() <= lead.len() && group_shape.iter().zip(lead).all(|(&g, &l)| g == 1 || g == l);
    if !fits {
        return Err(Error::invalid(
            arg,
            format!(
                "leading axes that match the patterns' leading axes {} from the left (each 1 or equal)",
                shape_str(lead)
            ),
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

/// Per-position 0/1 flags `[n]` or `[g, n]` (an `attention_mask`: true = a real token, false =
/// padding), one row per group of heads, broadcast over `[*lead]` like tokens are.
pub struct PositionMask<'a> {
    rows: ArrayView2<'a, bool>,
    group_of: Vec<usize>,
}

impl<'a> PositionMask<'a> {
    /// Checks that `mask` is `[n]` or `[g, n]` with g 1 or `lead[0]`; errors name `attention_mask`
    /// and give the expected and the actual shape.
    pub fn new(mask: ArrayViewD<'a, bool>, lead: &[usize], n: usize) -> Result<Self> {
        PositionMask::named("attention_mask", mask, lead, n)
    }

    /// [`PositionMask::new`] for flags named `arg` in errors (a span: `queries`, `keys`).
    pub fn named(arg: &'static str, mask: ArrayViewD<'a, bool>, lead: &[usize], n: usize) -> Result<Self> {
        let shape = mask.shape().to_vec();
        let bad_shape = || {
            let meaning = if arg == "attention_mask" { "0 = padding" } else { "1 = in the span" };
            let expected = match lead.first() {
                Some(b) => format!("0/1 flags of shape ({n},) or ({b}, {n}) (batch, positions; {meaning})"),
                None => format!("0/1 flags of shape ({n},) or (1, {n}) (positions; {meaning})"),
            };
            Error::invalid(arg, expected, format!("shape {}", shape_str(&shape)))
        };
        if !(1..=2).contains(&shape.len()) || shape[shape.len() - 1] != n {
            return Err(bad_shape());
        }
        let group_of = group_of_heads(arg, lead, &shape[..shape.len() - 1]).map_err(|_| bad_shape())?;
        let rows = match mask.ndim() {
            1 => mask.into_dimensionality::<Ix1>().expect("1-d mask").insert_axis(Axis(0)),
            _ => mask.into_dimensionality::<Ix2>().expect("2-d mask"),
        };
        Ok(PositionMask { rows, group_of })
    }

    /// The flags of flat head h.
    pub fn row(&self, h: usize) -> ArrayView1<'_, bool> {
        self.rows.row(self.group_of[h])
    }

    /// The first mask row (prompt) whose position `j` is padding.
    pub fn first_padded_at(&self, j: usize) -> Option<usize> {
        self.rows.outer_iter().position(|row| !row[j])
    }
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
        assert_eq!(stack.head(4).get(2, 0), 112.0);
        assert_eq!(stack.index_str(4, 2, 0), "(1, 1, 2, 0)");
        // Negative and permuted strides address the same elements as ndarray does.
        let mut flipped = a.view();
        flipped.invert_axis(ndarray::Axis(1));
        flipped.invert_axis(ndarray::Axis(3));
        let flipped = flipped.permuted_axes(IxDyn(&[1, 0, 3, 2]));
        let stack = MatrixStack::new("patterns", flipped.clone()).unwrap();
        for h in 0..6 {
            let ix = unravel(h, &[3, 2]);
            for (i, j) in [(0, 0), (1, 3), (3, 2)] {
                assert_eq!(stack.head(h).get(i, j), flipped[[ix[0], ix[1], i, j]]);
            }
            assert!(stack.head(h).row_slice(0).is_none());
            assert_eq!(
                stack.head(h).row(1).collect::<Vec<_>>(),
                flipped.slice(ndarray::s![ix[0], ix[1], 1, ..]).to_vec()
            );
        }
    }

    #[test]
    fn bf16_widens_exactly_and_sums_like_f32() {
        use half::bf16;
        // Every bit pattern (zeros, subnormals, ±inf) widens to what half's conversion gives; NaN stays NaN.
        for bits in 0..=u16::MAX {
            let b = bf16::from_bits(bits);
            let (got, want) = (Real::to_f64(b), half::bf16::to_f64(b));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "bits {bits:#06x}");
        }
        let values: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 613) as f32 / 64.0 - 4.0).collect();
        let narrow: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = narrow.iter().map(|&v| bf16_to_f32(v)).collect();
        for abs in [false, true] {
            assert_eq!(bf16::sum_widened(&narrow, abs).to_bits(), f32::sum_widened(&widened, abs).to_bits());
        }
    }

    #[test]
    fn lines_sum_like_the_plain_loop() {
        // Every length up to past a few groups, transposed and flipped (negative step) views,
        // values whose rounding shows the order of the adds, -0 and large entries.
        let n = 37;
        let a = Array::from_shape_fn(IxDyn(&[n, n]), |ix| match (ix[0] * 31 + ix[1] * 7) % 23 {
            0 => -0.0,
            1 => 1e30,
            v => (v as f32 - 11.3) / (ix[0] as f32 + 0.7),
        });
        let mut flipped = a.view();
        flipped.invert_axis(ndarray::Axis(0));
        for view in [a.view(), a.t().into_dyn(), flipped] {
            let m = MatrixStack::new("a", view.clone()).unwrap();
            let m = m.head(0);
            for (along, back) in [(1, 0), (1, 1), (1, 5), (0, 0)] {
                for first in back.max(1)..n {
                    let line = m.line(along, back, first);
                    for len in 0..=line.len() {
                        let want = (first..first + len).fold(0.25, |s, i| s + m.get(i, i * along - back) as f64);
                        let got = line.sum_in_order(0..len, &line, 0.25);
                        assert_eq!(got.to_bits(), want.to_bits(), "first {first}, len {len}");
                    }
                }
            }
        }
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
