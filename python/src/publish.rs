//! `hopps._hopps.publish`: a version of one or more tables written to a model repository from arrays,
//! through `hopps_format::Repository::publish_arrays` (the same writer as `hopps model publish`).
//!
//! Unlike the client's calls, the arrays are borrowed, not copied, while the GIL is released:
//! a model can be most of the machine's memory, and a copy would double it. The caller must not
//! write to the arrays until `publish` returns (documented on `hopps.publish`).

use hopps_format::{
    MissingPolicy, ModelSpec, OptimizerSpec, PublishOptions, Repository, StorageOptions,
    TableArrays, TableSpec, VersionKind,
};
use numpy::{PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::arrays;
use crate::error::Failure;
use crate::pyobj::to_python;
use crate::runtime::runtime;

/// The table's missing-key policy from its Python spelling.
fn missing_policy(missing: &str, seed: u64, scale: f32) -> Result<MissingPolicy, Failure> {
    match missing {
        "zeros" => Ok(MissingPolicy::Zeros),
        "error" => Ok(MissingPolicy::Error),
        "random" => Ok(MissingPolicy::Random { seed, scale }),
        other => Err(Failure::Input(format!(
            "unknown missing-key policy {other:?}; use \"zeros\", \"error\" or \"random\""
        ))),
    }
}

/// The table a publish argument belongs to, for error messages.
struct Target<'a> {
    model: &'a str,
    table: &'a str,
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "publish of model {:?} table {:?}",
            self.model, self.table
        )
    }
}

/// One table of a publish, borrowed from the caller's (converted) arrays.
struct Borrowed<'py> {
    table: String,
    keys: PyReadonlyArray1<'py, u64>,
    values: PyReadonlyArray2<'py, f32>,
    deleted: Option<PyReadonlyArray1<'py, bool>>,
}

fn borrow_table<'py>(
    model: &str,
    entry: &Bound<'py, PyAny>,
    delta: bool,
) -> PyResult<Borrowed<'py>> {
    let (table, keys, values, deleted): (
        String,
        Bound<'py, PyAny>,
        Bound<'py, PyAny>,
        Option<Bound<'py, PyAny>>,
    ) = entry.extract().map_err(|err| {
        Failure::Input(format!(
            "publish of model {model:?}: each table is (name, keys, values, deleted or None): {err}"
        ))
    })?;
    let target = Target {
        model,
        table: &table,
    };
    let keys = arrays::keys(&keys, &target)?;
    let rows = keys.as_array().len();
    let values = arrays::rows(&values, rows, &target, "values")?;
    let deleted = match deleted {
        Some(_) if !delta => {
            return Err(Failure::Input(format!(
                "{target}: deleted flags only make sense in a delta; pass delta=True"
            ))
            .into());
        }
        Some(flags) => Some(arrays::flags(&flags, rows, &target)?),
        None => None,
    };
    Ok(Borrowed {
        table,
        keys,
        values,
        deleted,
    })
}

fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
    target: &Target<'_>,
    argument: &str,
) -> Result<&'a [T], Failure> {
    array
        .as_slice()
        .map_err(|err| Failure::Input(format!("{target}: {argument}: {err}")))
}

/// Writes a version of `model` from arrays: a full version, or a delta with `delta=True`.
///
/// `tables` is a list of `(table, keys, values, deleted)`: keys (n,) uint64, values (n, dim)
/// float32, deleted (n,) bool or None (deltas only). The model is created on its first publish
/// with `shards` shards, and a table it lacks is added with the given `dtype`, `missing` policy
/// and `optimizer`; existing tables must keep their dims. Returns
/// `{"model", "version", "kind", "rows"}`. `hopps.publish` is the documented entry point.
#[pyfunction]
#[pyo3(signature = (
    repo, model, tables, *, delta = false, parent = None,
    shards = 1, dtype = "f32", missing = "zeros", random_seed = 0, random_scale = 0.01,
    optimizer = None, learning_rate = 0.01, allow_non_finite = false, source = None,
    storage_timeout = 30.0,
))]
#[allow(clippy::too_many_arguments)] // A Python signature with keyword arguments.
pub(crate) fn publish(
    py: Python<'_>,
    repo: &str,
    model: &str,
    tables: &Bound<'_, PyAny>,
    delta: bool,
    parent: Option<u64>,
    shards: u32,
    dtype: &str,
    missing: &str,
    random_seed: u64,
    random_scale: f32,
    optimizer: Option<&str>,
    learning_rate: f32,
    allow_non_finite: bool,
    source: Option<String>,
    storage_timeout: f64,
) -> PyResult<Py<PyAny>> {
    let borrowed = tables
        .try_iter()?
        .map(|entry| borrow_table(model, &entry?, delta))
        .collect::<PyResult<Vec<_>>>()?;
    let missing = missing_policy(missing, random_seed, random_scale)?;
    let mut specs = Vec::with_capacity(borrowed.len());
    let mut arrays = Vec::with_capacity(borrowed.len());
    for t in &borrowed {
        let target = Target {
            model,
            table: &t.table,
        };
        let cols = t.values.as_array().ncols();
        let dim = u32::try_from(cols).map_err(|_| {
            Failure::Input(format!(
                "{target}: dim {cols} is too large; rows have at most 65536 values"
            ))
        })?;
        let mut spec = TableSpec::new(t.table.as_str(), dim);
        spec.dtype = dtype.to_string();
        spec.missing = missing;
        spec.optimizer = optimizer.map(|kind| OptimizerSpec::new(kind, learning_rate));
        specs.push(spec);
        arrays.push(TableArrays {
            table: &t.table,
            dim,
            keys: slice(&t.keys, &target, "keys")?,
            values: slice(&t.values, &target, "values")?,
            deleted: t
                .deleted
                .as_ref()
                .map(|flags| slice(flags, &target, "deleted"))
                .transpose()?,
        });
    }
    let timeout = std::time::Duration::try_from_secs_f64(storage_timeout).map_err(|_| {
        Failure::Input(format!(
            "storage_timeout must be a finite, non-negative number of seconds, got {storage_timeout}"
        ))
    })?;
    let options = PublishOptions {
        parent,
        create: Some(ModelSpec::new(model, shards, specs)),
        allow_non_finite,
        source: source.unwrap_or_else(|| format!("python hopps {}", env!("CARGO_PKG_VERSION"))),
        ..PublishOptions::default()
    };
    let storage = StorageOptions {
        timeout,
        ..StorageOptions::default()
    };
    let kind = if delta {
        VersionKind::Delta
    } else {
        VersionKind::Full
    };
    let (_, runtime) = runtime()?;
    let summary = py.detach(|| {
        runtime.block_on(async {
            let repository = Repository::open(repo, &storage).await?;
            repository
                .publish_arrays(model, kind, &arrays, &options)
                .await
        })
    });
    let summary = summary.map_err(Failure::from)?;
    to_python(py, &summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_policies_parse() {
        assert_eq!(
            missing_policy("zeros", 0, 0.1).expect("zeros"),
            MissingPolicy::Zeros
        );
        assert_eq!(
            missing_policy("error", 0, 0.1).expect("error"),
            MissingPolicy::Error
        );
        assert_eq!(
            missing_policy("random", 7, 0.5).expect("random"),
            MissingPolicy::Random {
                seed: 7,
                scale: 0.5
            }
        );
        let err = missing_policy("nan", 0, 0.1).expect_err("unknown");
        assert!(err.to_string().contains("\"zeros\""), "{err}");
    }
}
