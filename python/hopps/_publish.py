"""``hopps.publish``: write a model version from numpy, pandas or pyarrow data.

The conversion of pandas and pyarrow containers to numpy happens here; the writing itself is
``hopps-format``'s (the same code as ``hopps model publish``), called through the native module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

from . import _hopps
from ._errors import InvalidArgument

if TYPE_CHECKING:
    from ._hopps import PublishSummary

_KEY_COLUMN = "key"
_VALUE_COLUMN = "value"
_DELETED_COLUMN = "deleted"


def _is_pandas(obj: Any, name: str) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("pandas") and type(obj).__name__ == name


def _is_arrow(obj: Any) -> bool:
    return (type(obj).__module__ or "").startswith("pyarrow")


def _columns(frame: Any) -> "dict[str, Any]":
    """Columns of a pandas DataFrame or a pyarrow Table / RecordBatch by name."""
    if _is_pandas(frame, "DataFrame"):
        return {str(name): frame[name] for name in frame.columns}
    return {name: frame.column(name) for name in frame.schema.names}


def _keys_array(keys: Any) -> Any:
    """pandas/pyarrow keys as numpy; anything else is left to the native conversion."""
    if _is_arrow(keys):
        if hasattr(keys, "combine_chunks"):
            keys = keys.combine_chunks()
        if keys.null_count:
            raise InvalidArgument(f"keys hold {keys.null_count} null(s); every key must be a number")
        return keys.to_numpy(zero_copy_only=False)
    if _is_pandas(keys, "Series") or _is_pandas(keys, "Index"):
        return keys.to_numpy()
    return keys


def _rows_array(values: Any, what: str) -> Any:
    """Rows as a 2-D numpy array: from a pyarrow (fixed-size) list array, a pandas Series of
    sequences or a DataFrame of one column per dimension; anything else is left as it is."""
    if _is_arrow(values):
        if hasattr(values, "combine_chunks"):
            values = values.combine_chunks()
        if values.null_count:
            raise InvalidArgument(f"{what} hold {values.null_count} null row(s); every row needs values")
        import pyarrow as pa  # type: ignore[import-untyped]

        if pa.types.is_fixed_size_list(values.type):
            dim = values.type.list_size
            flat = values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(len(values), dim)
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            return _stack(values.to_numpy(zero_copy_only=False), what)
        return values.to_numpy(zero_copy_only=False)
    if _is_pandas(values, "DataFrame"):
        return values.to_numpy()
    if _is_pandas(values, "Series"):
        if values.dtype == object:
            return _stack(values.to_numpy(), what)
        return values.to_numpy()
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim == 1:
        return _stack(values, what)
    return values


def _stack(rows: Any, what: str) -> np.ndarray:
    """A sequence of equally long rows as one (n, dim) array."""
    if len(rows) == 0:
        raise InvalidArgument(f"{what} is empty and has no dim; pass a (0, dim) array instead")
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise InvalidArgument(f"{what} rows have different lengths {sorted(lengths)[:5]}; every row needs dim values")
    return np.stack([np.asarray(row) for row in rows])


def _table_entry(model: str, table: str, keys: Any, values: Any, deleted: Any) -> tuple:
    """One table of a publish as the native module takes it: (name, keys, values, deleted)."""
    if values is None:
        if not (_is_pandas(keys, "DataFrame") or _is_arrow(keys)):
            raise InvalidArgument(
                f"publish of model {model!r} table {table!r}: values are missing; pass keys and values, "
                f"or a DataFrame / pyarrow Table with columns {_KEY_COLUMN!r} and {_VALUE_COLUMN!r}"
            )
        columns: "dict[str, Any]" = _columns(keys)
        for needed in (_KEY_COLUMN, _VALUE_COLUMN):
            if needed not in columns:
                raise InvalidArgument(
                    f"publish of model {model!r} table {table!r}: the data has no column {needed!r} "
                    f"(columns: {sorted(columns)}); name the columns key, value and, in deltas, deleted"
                )
        if deleted is None and _DELETED_COLUMN in columns:
            deleted = columns[_DELETED_COLUMN]
        keys, values = columns[_KEY_COLUMN], columns[_VALUE_COLUMN]
    if deleted is not None:
        deleted = _keys_array(deleted)
    return (table, _keys_array(keys), _rows_array(values, "values"), deleted)


def publish(
    repo: str,
    model: str,
    table: str,
    keys: Any,
    values: Any = None,
    *,
    delta: bool = False,
    deleted: Any = None,
    parent: Optional[int] = None,
    shards: int = 1,
    dtype: str = "f32",
    missing: str = "zeros",
    random_seed: int = 0,
    random_scale: float = 0.01,
    optimizer: Optional[str] = None,
    learning_rate: float = 0.01,
    allow_non_finite: bool = False,
    source: Optional[str] = None,
    storage_timeout: float = 30.0,
) -> "PublishSummary":
    """Write a version of ``model`` to the model repository ``repo`` and return
    ``{"model", "version", "kind", "rows"}``.

    ``repo`` is a path, ``file://...``, ``s3://bucket/prefix`` (credentials and endpoint from the
    usual ``AWS_*`` environment variables) or ``hdfs://host:port/path``.

    Rows come as ``keys`` (n,) of uint64 (or non-negative integers) and ``values`` (n, dim) of
    float32 (other float dtypes are converted), from numpy arrays, pandas Series, pyarrow arrays
    (a ``fixed_size_list<float>`` or list column for values), or one table: pass a pandas
    DataFrame or a pyarrow Table with columns ``key``, ``value`` and, in deltas, ``deleted`` as
    ``keys`` and leave ``values`` out.

    A full version holds every row of the model; ``delta=True`` writes upserts (and deletes where
    ``deleted`` is true) on top of ``parent`` (default: the newest committed version). The model
    is created on its first publish with ``shards`` shards (a power of two), and a table the
    model lacks is added with ``dtype`` (f32, f16, bf16, int8), the ``missing``-key policy
    ("zeros", "error", or "random" with ``random_seed``/``random_scale``) and the push
    ``optimizer`` ("sgd", "adagrad", "adam" with ``learning_rate``). NaN and infinite values are
    refused unless ``allow_non_finite``.

    The GIL is released while the files are written; the arrays are read in place (not copied),
    so do not modify them from another thread until ``publish`` returns.

    Raises :class:`hopps.InvalidArgument` for bad input (wrong dtype or shape, NaN values, a dim
    that differs from the model's), :class:`hopps.NotFound` for a delta of a model or parent
    that does not exist, :class:`hopps.Unavailable` when the storage cannot be reached.
    """
    entry = _table_entry(model, table, keys, values, deleted)
    return _hopps.publish(
        repo,
        model,
        [entry],
        delta=delta,
        parent=parent,
        shards=shards,
        dtype=dtype,
        missing=missing,
        random_seed=random_seed,
        random_scale=random_scale,
        optimizer=optimizer,
        learning_rate=learning_rate,
        allow_non_finite=allow_non_finite,
        source=source,
        storage_timeout=storage_timeout,
    )


def publish_tables(
    repo: str,
    model: str,
    tables: Mapping[str, Any],
    *,
    delta: bool = False,
    parent: Optional[int] = None,
    shards: int = 1,
    dtype: str = "f32",
    missing: str = "zeros",
    random_seed: int = 0,
    random_scale: float = 0.01,
    optimizer: Optional[str] = None,
    learning_rate: float = 0.01,
    allow_non_finite: bool = False,
    source: Optional[str] = None,
    storage_timeout: float = 30.0,
) -> "PublishSummary":
    """Write one version of ``model`` holding several tables; see :func:`publish`.

    ``tables`` maps a table name to ``(keys, values)``, ``(keys, values, deleted)``, a pandas
    DataFrame or a pyarrow Table (columns ``key``, ``value``, optional ``deleted``).
    """
    entries = []
    for table, data in tables.items():
        if isinstance(data, tuple):
            if len(data) not in (2, 3):
                raise InvalidArgument(
                    f"publish of model {model!r} table {table!r}: give (keys, values) or "
                    f"(keys, values, deleted), not a tuple of {len(data)}"
                )
            keys, values = data[0], data[1]
            deleted = data[2] if len(data) == 3 else None
            entries.append(_table_entry(model, table, keys, values, deleted))
        else:
            entries.append(_table_entry(model, table, data, None, None))
    return _hopps.publish(
        repo,
        model,
        entries,
        delta=delta,
        parent=parent,
        shards=shards,
        dtype=dtype,
        missing=missing,
        random_seed=random_seed,
        random_scale=random_scale,
        optimizer=optimizer,
        learning_rate=learning_rate,
        allow_non_finite=allow_non_finite,
        source=source,
        storage_timeout=storage_timeout,
    )
