//! PyO3 glue and nothing else: take numpy views (no copy), release the GIL around the kernel,
//! turn core errors into ValueError, hand back the owned result without copying it.
//! Dtype normalisation and friendly TypeErrors live in python/induct_fast/_arrays.py.

use ndarray::ArrayViewD;
use numpy::{
    IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArrayDyn,
    PyReadwriteArray2, PyReadwriteArray3, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::attention::{self, AttentionOptions, Layout, LseArray, LseOptions};
use crate::scores::{self, Detection, DetectionOptions, Measure, Reduce, ScoreOptions, Spans, TargetMeasure};
use crate::targets::Kind;
use crate::{batched, losses, threads, Error};

/// A float array of any supported dtype; the kernels are generic over it.
///
/// bfloat16 has no dtype in numpy itself (ml_dtypes adds one), so it arrives as the tuple
/// `("bfloat16", bits)` with `bits` a uint16 view of the same memory (any strides), which is
/// read as `half::bf16` (the same bits) without a copy. python/induct_fast/_arrays.py builds it
/// from torch bfloat16 tensors and ml_dtypes arrays alike.
enum FloatArray<'py> {
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
    Bf16(Bf16Tag, PyReadonlyArrayDyn<'py, u16>),
}

/// The same enum with PyO3's derived extraction, which tries the variants in turn (its errors
/// name `FloatArray` and every variant's failure).
mod in_turn {
    use super::*;

    #[derive(FromPyObject)]
    pub(super) enum FloatArray<'py> {
        F64(PyReadonlyArrayDyn<'py, f64>),
        F32(PyReadonlyArrayDyn<'py, f32>),
        F16(PyReadonlyArrayDyn<'py, half::f16>),
        Bf16(Bf16Tag, PyReadonlyArrayDyn<'py, u16>),
    }
}

/// Extraction by dtype: every failed try of the derived extraction builds a Python TypeError,
/// about 9 µs for a float32 array (one failure) and 18 µs for float16, more than the kernel of a
/// small stack takes. Arrays of a float dtype go straight to their variant; anything else (the
/// bfloat16 tuple, wrong dtypes) takes the derived path, so its errors are unchanged.
impl<'a, 'py> FromPyObject<'a, 'py> for FloatArray<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(array) = obj.cast::<PyUntypedArray>() {
            let (py, dtype) = (obj.py(), array.dtype());
            if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
                return Ok(FloatArray::F32(obj.extract()?));
            }
            if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
                return Ok(FloatArray::F64(obj.extract()?));
            }
            if dtype.is_equiv_to(&numpy::dtype::<half::f16>(py)) {
                return Ok(FloatArray::F16(obj.extract()?));
            }
        }
        Ok(match obj.extract::<in_turn::FloatArray<'py>>()? {
            in_turn::FloatArray::F64(a) => FloatArray::F64(a),
            in_turn::FloatArray::F32(a) => FloatArray::F32(a),
            in_turn::FloatArray::F16(a) => FloatArray::F16(a),
            in_turn::FloatArray::Bf16(tag, a) => FloatArray::Bf16(tag, a),
        })
    }
}

/// The first item of a bfloat16 array's tuple: the string "bfloat16".
struct Bf16Tag;

impl FromPyObject<'_, '_> for Bf16Tag {
    type Error = PyErr;

    fn extract(obj: Borrowed<'_, '_, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyString>()?.to_cow()?.as_ref() {
            "bfloat16" => Ok(Bf16Tag),
            other => Err(PyTypeError::new_err(format!("expected the dtype tag \"bfloat16\", got {other:?}"))),
        }
    }
}

/// uint16 bit patterns read as bf16, the same strides and memory.
fn bf16_view<'a>(bits: &'a PyReadonlyArrayDyn<'_, u16>) -> ArrayViewD<'a, half::bf16> {
    // SAFETY: half::bf16 is a #[repr(transparent)] u16 (same size and alignment, every bit
    // pattern valid), so the cast view addresses exactly the elements of the u16 view, which
    // stay borrowed (read-only) for 'a.
    unsafe { bits.as_array().raw_view().cast::<half::bf16>().deref_into_view() }
}

/// Runs `$body` with `$view` bound to the array's `ArrayViewD` of its own element type.
macro_rules! with_view {
    ($array:expr, |$view:ident| $body:expr) => {
        match $array {
            FloatArray::F64(a) => {
                let $view = a.as_array();
                $body
            }
            FloatArray::F32(a) => {
                let $view = a.as_array();
                $body
            }
            FloatArray::F16(a) => {
                let $view = a.as_array();
                $body
            }
            FloatArray::Bf16(_, a) => {
                let $view = bf16_view(a);
                $body
            }
        }
    };
}

/// Runs `$body` with `$q`, `$k` bound to the views of two arrays of the same dtype.
macro_rules! with_qk_views {
    ($q:expr, $k:expr, |$qv:ident, $kv:ident| $body:expr) => {
        match ($q, $k) {
            (FloatArray::F64(a), FloatArray::F64(b)) => {
                let ($qv, $kv) = (a.as_array(), b.as_array());
                $body
            }
            (FloatArray::F32(a), FloatArray::F32(b)) => {
                let ($qv, $kv) = (a.as_array(), b.as_array());
                $body
            }
            (FloatArray::F16(a), FloatArray::F16(b)) => {
                let ($qv, $kv) = (a.as_array(), b.as_array());
                $body
            }
            (FloatArray::Bf16(_, a), FloatArray::Bf16(_, b)) => {
                let ($qv, $kv) = (bf16_view(a), bf16_view(b));
                $body
            }
            (q, k) => Err(PyTypeError::new_err(format!(
                "k: expected the dtype of q ({}), got {}",
                dtype_name(q),
                dtype_name(k)
            ))),
        }
    };
}

fn dtype_name(a: &FloatArray<'_>) -> &'static str {
    match a {
        FloatArray::F64(_) => "float64",
        FloatArray::F32(_) => "float32",
        FloatArray::F16(_) => "float16",
        FloatArray::Bf16(..) => "bfloat16",
    }
}

fn value_error(e: Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn reduce(per_query: bool) -> Reduce {
    if per_query {
        Reduce::PerQuery
    } else {
        Reduce::Mean
    }
}

fn parse_kinds(kinds: &[String]) -> PyResult<Vec<Kind>> {
    kinds.iter().map(|k| k.parse::<Kind>().map_err(value_error)).collect()
}

fn score_options(exclude_bos: bool, measure: &str) -> PyResult<ScoreOptions> {
    let measure: TargetMeasure = measure.parse().map_err(value_error)?;
    Ok(ScoreOptions { exclude_bos, measure })
}

type Flags<'py> = Option<PyReadonlyArrayDyn<'py, bool>>;

fn spans<'a>(queries: &'a Flags<'_>, keys: &'a Flags<'_>) -> Spans<'a> {
    Spans { queries: queries.as_ref().map(|m| m.as_array()), keys: keys.as_ref().map(|m| m.as_array()) }
}

/// Scores per query `[kinds, *lead, n]`, or their means `[kinds, *lead]` when `per_query` is false.
#[pyfunction]
#[pyo3(signature = (patterns, tokens, kinds, exclude_bos, per_query, attention_mask, measure = "mass", queries = None, keys = None))]
#[allow(clippy::too_many_arguments)]
fn head_scores<'py>(
    py: Python<'py>,
    patterns: FloatArray<'py>,
    tokens: Option<PyReadonlyArrayDyn<'py, i64>>,
    kinds: Vec<String>,
    exclude_bos: bool,
    per_query: bool,
    attention_mask: Flags<'py>,
    measure: &str,
    queries: Flags<'py>,
    keys: Flags<'py>,
) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let kinds = parse_kinds(&kinds)?;
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let mask = attention_mask.as_ref().map(|m| m.as_array());
    let options = score_options(exclude_bos, measure)?;
    let spans = spans(&queries, &keys);
    let result = with_view!(&patterns, |view| py.detach(|| match reduce(per_query) {
        Reduce::PerQuery => scores::per_query_scores(view, tokens, mask, spans.clone(), &kinds, options),
        Reduce::Mean => scores::head_scores(view, tokens, mask, spans.clone(), &kinds, options),
    }))
    .map_err(value_error)?;
    Ok(result.into_pyarray(py))
}

/// TransformerLens `head_detector` scores: `[len(kinds), *lead]` against kinds (one pass for
/// all of them), or `[*lead]` against explicit matrices.
#[pyfunction]
#[pyo3(signature = (patterns, kinds, matrices, tokens, measure, exclude_bos, exclude_current_token))]
#[allow(clippy::too_many_arguments)]
fn detection_scores<'py>(
    py: Python<'py>,
    patterns: FloatArray<'py>,
    kinds: Option<Vec<String>>,
    matrices: Option<PyReadonlyArrayDyn<'py, f64>>,
    tokens: Option<PyReadonlyArrayDyn<'py, i64>>,
    measure: &str,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let measure: Measure = measure.parse().map_err(value_error)?;
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let options = DetectionOptions { exclude_bos, exclude_current_token };
    let result = match (kinds, &matrices) {
        (Some(names), None) => {
            let kinds = names
                .iter()
                .map(|k| {
                    k.parse::<Kind>().map_err(|_| {
                        value_error(Error::invalid(
                            "detection",
                            format!("a kind ({}) or a 0/1 array", Kind::NAMES),
                            format!("{k:?}"),
                        ))
                    })
                })
                .collect::<PyResult<Vec<Kind>>>()?;
            with_view!(&patterns, |view| py
                .detach(|| scores::detection_scores_of_kinds(view, &kinds, tokens, measure, options)))
        }
        (None, Some(m)) => {
            let detection = Detection::Matrices(m.as_array());
            with_view!(&patterns, |view| py
                .detach(|| scores::detection_scores(view, detection, tokens, measure, options)))
        }
        _ => return Err(PyValueError::new_err("detection: expected exactly one of kind names or an array")),
    }
    .map_err(value_error)?;
    Ok(result.into_pyarray(py))
}

fn attention_options(
    scale: Option<f64>,
    causal: bool,
    softcap: Option<f64>,
    window: Option<usize>,
    layout: &str,
) -> PyResult<AttentionOptions> {
    let layout: Layout = layout.parse().map_err(value_error)?;
    Ok(AttentionOptions { scale, causal, softcap, window, layout })
}

/// Attention patterns `[*lead, n_heads, n, n]` (float32 for bfloat16/float16/32 input, float64 for float64).
#[pyfunction]
#[pyo3(signature = (q, k, scale, causal, attention_mask, layout, softcap, window))]
#[allow(clippy::too_many_arguments)]
fn attention_patterns<'py>(
    py: Python<'py>,
    q: FloatArray<'py>,
    k: FloatArray<'py>,
    scale: Option<f64>,
    causal: bool,
    attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    layout: &str,
    softcap: Option<f64>,
    window: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let options = attention_options(scale, causal, softcap, window, layout)?;
    let mask = attention_mask.as_ref().map(|m| m.as_array());
    with_qk_views!(&q, &k, |qv, kv| {
        let patterns = py.detach(|| attention::attention_patterns(qv, kv, mask, options)).map_err(value_error)?;
        Ok(patterns.into_pyarray(py).into_any())
    })
}

/// Fused scores per query `[kinds, *lead, n_heads, n]`, or their means when `per_query` is false.
/// With `lse` (`[*lead, n_heads, n]`, any float dtype) the rows' normalisers come from it; with
/// `return_lse` the result is a tuple (scores, lse `[*lead, n_heads, n]` float64).
#[pyfunction]
#[pyo3(signature = (
    q, k, tokens, kinds, scale, causal, attention_mask, layout, exclude_bos, per_query, softcap, window,
    lse = None, return_lse = false, measure = "mass", queries = None, keys = None
))]
#[allow(clippy::too_many_arguments)]
fn scores_from_qk<'py>(
    py: Python<'py>,
    q: FloatArray<'py>,
    k: FloatArray<'py>,
    tokens: Option<PyReadonlyArrayDyn<'py, i64>>,
    kinds: Vec<String>,
    scale: Option<f64>,
    causal: bool,
    attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    layout: &str,
    exclude_bos: bool,
    per_query: bool,
    softcap: Option<f64>,
    window: Option<usize>,
    lse: Option<FloatArray<'py>>,
    return_lse: bool,
    measure: &str,
    queries: Flags<'py>,
    keys: Flags<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let kinds = parse_kinds(&kinds)?;
    let options = attention_options(scale, causal, softcap, window, layout)?;
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let mask = attention_mask.as_ref().map(|m| m.as_array());
    let score = score_options(exclude_bos, measure)?;
    let spans = spans(&queries, &keys);
    let given = lse.as_ref().map(|a| match a {
        FloatArray::F64(a) => LseArray::F64(a.as_array()),
        FloatArray::F32(a) => LseArray::F32(a.as_array()),
        FloatArray::F16(a) => LseArray::F16(a.as_array()),
        FloatArray::Bf16(_, a) => LseArray::Bf16(bf16_view(a)),
    });
    let lse = LseOptions { given, return_lse };
    let (scores, lse) = with_qk_views!(&q, &k, |qv, kv| {
        py.detach(|| {
            attention::scores_and_lse_from_qk(
                qv,
                kv,
                tokens,
                mask,
                spans,
                &kinds,
                options,
                score,
                reduce(per_query),
                lse,
            )
        })
        .map_err(value_error)
    })?;
    let scores = scores.into_pyarray(py).into_any();
    match lse {
        None => Ok(scores),
        Some(lse) => Ok((scores, lse.into_pyarray(py)).into_pyobject(py)?.into_any()),
    }
}

/// Per-token cross-entropy `[*lead, n - 1]` from logits `[*lead, n, vocab]` and tokens `[*lead, n]`.
#[pyfunction]
#[pyo3(signature = (logits, tokens))]
fn token_losses<'py>(
    py: Python<'py>,
    logits: FloatArray<'py>,
    tokens: PyReadonlyArrayDyn<'py, i64>,
) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let tokens = tokens.as_array();
    let result = with_view!(&logits, |view| py.detach(|| losses::token_losses(view, tokens))).map_err(value_error)?;
    Ok(result.into_pyarray(py))
}

/// `out[h] (+)= a[h / (n / n_a)] @ b[h / (n / n_b)]`: per-head float64 products (circuits.py).
#[pyfunction]
#[pyo3(signature = (a, b, out, accumulate))]
fn batched_matmul<'py>(
    py: Python<'py>,
    a: PyReadonlyArray3<'py, f64>,
    b: PyReadonlyArray3<'py, f64>,
    mut out: PyReadwriteArray3<'py, f64>,
    accumulate: bool,
) -> PyResult<()> {
    let (a, b, out) = (a.as_array(), b.as_array(), out.as_array_mut());
    py.detach(|| batched::batched_matmul(a, b, out, accumulate)).map_err(value_error)
}

/// `out += g @ k^T` in fixed depth chunks (circuits.py's contraction of packed Gram pieces).
#[pyfunction]
#[pyo3(signature = (g, k, out))]
fn contract<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f64>,
    k: PyReadonlyArray2<'py, f64>,
    mut out: PyReadwriteArray2<'py, f64>,
) -> PyResult<()> {
    let (g, k, out) = (g.as_array(), k.as_array(), out.as_array_mut());
    py.detach(|| batched::contract(g, k, out)).map_err(value_error)
}

/// Sets the number of threads every later call uses (n >= 1).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    threads::set_num_threads(n).map_err(value_error)
}

/// The number of threads calls use now.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::get_num_threads()
}

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(head_scores, m)?)?;
    m.add_function(wrap_pyfunction!(detection_scores, m)?)?;
    m.add_function(wrap_pyfunction!(attention_patterns, m)?)?;
    m.add_function(wrap_pyfunction!(scores_from_qk, m)?)?;
    m.add_function(wrap_pyfunction!(token_losses, m)?)?;
    m.add_function(wrap_pyfunction!(batched_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(contract, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
