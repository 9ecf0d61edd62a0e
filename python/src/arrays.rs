//! numpy in, numpy out.
//!
//! Inputs: anything `numpy.asarray` accepts (ndarray, list, pandas Series, pyarrow array). Each is
//! turned into a C-contiguous array of the dtype the protocol carries (`uint64` keys, `float32`
//! rows, `bool` delete flags) by numpy itself, which copies only when the dtype or layout differs;
//! the Rust side then borrows it as a slice. Keys must be integers (a float key is almost always
//! a bug upstream), signed keys must be non-negative, rows must be real floats of shape (n, dim).
//!
//! Outputs: the `Vec`s the Rust client decoded become the numpy arrays' buffers (no copy); numpy
//! frees them through the array's base object. They are writable, so `torch.from_numpy` takes
//! them as they are.

use std::fmt::Display;

use numpy::ndarray::Array2;
use numpy::prelude::*;
use numpy::{PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArray};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use crate::error::Failure;

static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn numpy(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    NUMPY
        .get_or_try_init(py, || py.import("numpy").map(Bound::unbind))
        .map(|m| m.bind(py))
}

/// `obj` as an ndarray (itself when it is one already).
fn as_ndarray<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        return Ok(arr.clone());
    }
    let arr = numpy(obj.py())?.call_method1("asarray", (obj,))?;
    Ok(arr.cast_into::<PyUntypedArray>()?)
}

/// `arr` as a C-contiguous array of `dtype` (no copy when it already is one).
fn contiguous<'py>(arr: &Bound<'py, PyUntypedArray>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    numpy(arr.py())?.call_method1("ascontiguousarray", (arr, dtype))
}

fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn shape_text(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Turns a Python error raised while converting an argument into an `InvalidArgument` that says
/// which argument of which call it was.
fn conversion_failed(what: &dyn Display, argument: &str, err: PyErr) -> PyErr {
    Failure::Input(format!(
        "{what}: cannot convert {argument} to a numpy array: {err}"
    ))
    .into()
}

/// Keys of a call as a borrowed `uint64` array.
pub(crate) fn keys<'py>(
    obj: &Bound<'py, PyAny>,
    what: &dyn Display,
) -> PyResult<PyReadonlyArray1<'py, u64>> {
    // The common case, a contiguous uint64 vector, needs no call into numpy.
    if let Ok(exact) = obj.cast::<PyArray1<u64>>()
        && exact.is_c_contiguous()
    {
        return borrow1(exact, what, "keys");
    }
    let arr = as_ndarray(obj).map_err(|err| conversion_failed(what, "keys", err))?;
    if arr.ndim() != 1 {
        return Err(Failure::Input(format!(
            "{what}: keys must be a 1-D array of uint64, got shape {}; flatten them with keys.ravel()",
            shape_text(arr.shape())
        ))
        .into());
    }
    let converted = if arr.is_empty() {
        contiguous(&arr, "uint64")?
    } else {
        match arr.dtype().kind() {
            b'u' => contiguous(&arr, "uint64")?,
            b'i' => {
                let signed = contiguous(&arr, "int64")?.cast_into::<PyArray1<i64>>()?;
                check_non_negative(&signed, what)?;
                // Same bytes, read as unsigned: every value is known to be >= 0.
                signed.call_method1("view", ("uint64",))?
            }
            _ => {
                return Err(Failure::Input(format!(
                    "{what}: keys must be unsigned 64-bit integers (numpy uint64), got dtype {}; \
                     convert whole-number keys with numpy.asarray(keys, dtype=numpy.uint64)",
                    dtype_name(&arr)
                ))
                .into());
            }
        }
    };
    borrow1(&converted.cast_into::<PyArray1<u64>>()?, what, "keys")
}

fn check_non_negative(signed: &Bound<'_, PyArray1<i64>>, what: &dyn Display) -> PyResult<()> {
    let view = borrow1(signed, what, "keys")?;
    let slice = view
        .as_slice()
        .map_err(|err| Failure::Input(format!("{what}: keys: {err}")))?;
    if let Some((index, key)) = slice.iter().enumerate().find(|(_, k)| **k < 0) {
        let count = slice.iter().filter(|k| **k < 0).count();
        return Err(Failure::Input(format!(
            "{what}: {count} key(s) are negative, the first is keys[{index}] = {key}; hopps keys \
             are unsigned 64-bit integers: reinterpret signed hashes with keys.view(numpy.uint64)"
        ))
        .into());
    }
    Ok(())
}

fn borrow1<'py, T: numpy::Element>(
    arr: &Bound<'py, PyArray1<T>>,
    what: &dyn Display,
    argument: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    arr.try_readonly().map_err(|err| {
        Failure::Input(format!(
            "{what}: {argument} is being written by other Rust code: {err}"
        ))
        .into()
    })
}

/// Rows of a call (`values` of an upsert, `gradients` of a push) as a borrowed `float32` array
/// of shape `(rows, dim)`.
pub(crate) fn rows<'py>(
    obj: &Bound<'py, PyAny>,
    rows: usize,
    what: &dyn Display,
    argument: &str,
) -> PyResult<PyReadonlyArray2<'py, f32>> {
    let arr = as_ndarray(obj).map_err(|err| conversion_failed(what, argument, err))?;
    let shape = arr.shape().to_vec();
    if shape.len() != 2 {
        return Err(Failure::Input(format!(
            "{what}: {argument} must be a 2-D float32 array of shape (len(keys), dim) = ({rows}, dim), \
             got shape {}",
            shape_text(&shape)
        ))
        .into());
    }
    if shape[0] != rows {
        return Err(Failure::Input(format!(
            "{what}: {argument} has {} rows for {rows} keys; give one row per key",
            shape[0]
        ))
        .into());
    }
    if shape[1] == 0 {
        return Err(Failure::Input(format!(
            "{what}: {argument} has shape {}: rows of dim 0 are not rows; give dim >= 1",
            shape_text(&shape)
        ))
        .into());
    }
    if arr.dtype().kind() != b'f' {
        return Err(Failure::Input(format!(
            "{what}: {argument} must be floating point (float32, or float64/float16 to be \
             converted), got dtype {}",
            dtype_name(&arr)
        ))
        .into());
    }
    let converted = contiguous(&arr, "float32")?.cast_into::<PyArray2<f32>>()?;
    converted.try_readonly().map_err(|err| {
        Failure::Input(format!(
            "{what}: {argument} is being written by other Rust code: {err}"
        ))
        .into()
    })
}

/// Delete flags of a delta as a borrowed `bool` array of `rows` entries.
pub(crate) fn flags<'py>(
    obj: &Bound<'py, PyAny>,
    rows: usize,
    what: &dyn Display,
) -> PyResult<PyReadonlyArray1<'py, bool>> {
    let arr = as_ndarray(obj).map_err(|err| conversion_failed(what, "deleted", err))?;
    if arr.ndim() != 1 || arr.len() != rows {
        return Err(Failure::Input(format!(
            "{what}: deleted must be a 1-D bool array with one flag per key ({rows}), got shape {}",
            shape_text(arr.shape())
        ))
        .into());
    }
    if arr.dtype().kind() != b'b' && !arr.is_empty() {
        return Err(Failure::Input(format!(
            "{what}: deleted must be a bool array, got dtype {}",
            dtype_name(&arr)
        ))
        .into());
    }
    let converted = contiguous(&arr, "bool")?.cast_into::<PyArray1<bool>>()?;
    borrow1(&converted, what, "deleted")
}

/// Decoded rows as a `(n, dim)` float32 array that owns the client's buffer.
pub(crate) fn values_array(
    py: Python<'_>,
    values: Vec<f32>,
    rows: usize,
    dim: usize,
    what: &dyn Display,
) -> PyResult<Py<PyArray2<f32>>> {
    let matrix = Array2::from_shape_vec((rows, dim), values).map_err(|err| {
        Failure::Client(hopps_client::ClientError::Protocol {
            what: what.to_string(),
            reason: format!("{rows} rows of dim {dim}: {err}"),
        })
    })?;
    Ok(PyArray2::from_owned_array(py, matrix).unbind())
}

/// Found flags as a bool array that owns the client's buffer.
pub(crate) fn found_array(py: Python<'_>, found: Vec<bool>) -> Py<PyArray1<bool>> {
    PyArray1::from_vec(py, found).unbind()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_read_like_numpy() {
        assert_eq!(shape_text(&[3]), "(3,)");
        assert_eq!(shape_text(&[2, 4]), "(2, 4)");
        assert_eq!(shape_text(&[]), "()");
    }
}
