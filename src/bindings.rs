//! PyO3 glue and nothing else: take numpy views (no copy), release the GIL around the kernel,
//! turn core errors into ValueError, hand back the owned result without copying it.
//! Dtype normalisation and friendly TypeErrors live in python/induct_fast/_arrays.py.

use numpy::{
    IntoPyArray, PyArrayDyn, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArrayDyn, PyReadwriteArray2,
    PyReadwriteArray3,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::attention::{self, AttentionOptions, Layout, LseArray, LseOptions};
use crate::scores::{self, Detection, DetectionOptions, Measure, Reduce, ScoreOptions};
use crate::targets::Kind;
use crate::{batched, losses, threads, Error};

/// A float array of any supported dtype; the kernels are generic over it.
#[derive(FromPyObject)]
enum FloatArray<'py> {
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
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

/// Scores per query `[kinds, *lead, n]`, or their means `[kinds, *lead]` when `per_query` is false.
#[pyfunction]
#[pyo3(signature = (patterns, tokens, kinds, exclude_bos, per_query, attention_mask))]
fn head_scores<'py>(
    py: Python<'py>,
    patterns: FloatArray<'py>,
    tokens: Option<PyReadonlyArrayDyn<'py, i64>>,
    kinds: Vec<String>,
    exclude_bos: bool,
    per_query: bool,
    attention_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let kinds = parse_kinds(&kinds)?;
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let mask = attention_mask.as_ref().map(|m| m.as_array());
    let options = ScoreOptions { exclude_bos };
    let result = with_view!(&patterns, |view| py.detach(|| match reduce(per_query) {
        Reduce::PerQuery => scores::per_query_scores(view, tokens, mask, &kinds, options),
        Reduce::Mean => scores::head_scores(view, tokens, mask, &kinds, options),
    }))
    .map_err(value_error)?;
    Ok(result.into_pyarray(py))
}

/// TransformerLens `head_detector` scores `[*lead]` against a kind or explicit matrices.
#[pyfunction]
#[pyo3(signature = (patterns, kind, matrices, tokens, measure, exclude_bos, exclude_current_token))]
#[allow(clippy::too_many_arguments)]
fn detection_scores<'py>(
    py: Python<'py>,
    patterns: FloatArray<'py>,
    kind: Option<String>,
    matrices: Option<PyReadonlyArrayDyn<'py, f64>>,
    tokens: Option<PyReadonlyArrayDyn<'py, i64>>,
    measure: &str,
    exclude_bos: bool,
    exclude_current_token: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
    let measure: Measure = measure.parse().map_err(value_error)?;
    let detection = match (kind, &matrices) {
        (Some(k), None) => Detection::Kind(k.parse().map_err(|_| {
            value_error(Error::invalid(
                "detection",
                format!("a kind ({}) or a 0/1 array", Kind::NAMES),
                format!("{k:?}"),
            ))
        })?),
        (None, Some(m)) => Detection::Matrices(m.as_array()),
        _ => return Err(PyValueError::new_err("detection: expected exactly one of a kind name or an array")),
    };
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let options = DetectionOptions { exclude_bos, exclude_current_token };
    let result = with_view!(&patterns, |view| py
        .detach(|| scores::detection_scores(view, detection, tokens, measure, options)))
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

/// Attention patterns `[*lead, n_heads, n, n]` (float32 for float16/32 input, float64 for float64).
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
    lse = None, return_lse = false
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
) -> PyResult<Bound<'py, PyAny>> {
    let kinds = parse_kinds(&kinds)?;
    let options = attention_options(scale, causal, softcap, window, layout)?;
    let tokens = tokens.as_ref().map(|t| t.as_array());
    let mask = attention_mask.as_ref().map(|m| m.as_array());
    let score = ScoreOptions { exclude_bos };
    let given = lse.as_ref().map(|a| match a {
        FloatArray::F64(a) => LseArray::F64(a.as_array()),
        FloatArray::F32(a) => LseArray::F32(a.as_array()),
        FloatArray::F16(a) => LseArray::F16(a.as_array()),
    });
    let lse = LseOptions { given, return_lse };
    let (scores, lse) = with_qk_views!(&q, &k, |qv, kv| {
        py.detach(|| {
            attention::scores_and_lse_from_qk(qv, kv, tokens, mask, &kinds, options, score, reduce(per_query), lse)
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
