"""`hopps.publish` from numpy, pandas and pyarrow, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hopps

pd = pytest.importorskip("pandas", reason="pandas is not installed (python/test.sh installs it)")
pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (python/test.sh installs it)")


def manifest(repo, model: str, version: int) -> dict:
    path = repo / model / "versions" / f"{version:020d}" / "MANIFEST.json"
    return json.loads(path.read_text())


def test_versions_are_numbered_and_committed_with_a_manifest(repo):
    keys = np.arange(10, dtype=np.uint64)
    values = np.ones((10, 2), dtype=np.float32)
    assert hopps.publish(str(repo), "m", "t", keys, values, shards=2)["version"] == 1
    delta = hopps.publish(str(repo), "m", "t", keys[:2], values[:2], delta=True, deleted=np.array([False, True]))
    assert delta == {"model": "m", "version": 2, "kind": "delta", "rows": 2}
    first, second = manifest(repo, "m", 1), manifest(repo, "m", 2)
    assert first["kind"] == "full" and first["rows"] == 10
    assert second["kind"] == "delta" and second["parent"] == 1
    assert second["source"].startswith("python hopps")
    spec = json.loads((repo / "m" / "model.json").read_text())
    assert spec["shards"] == 2 and spec["tables"][0]["dim"] == 2


def test_float64_values_are_converted_and_float32_kept(repo, serve):
    keys = np.array([1, 2, 3], dtype=np.uint64)
    values64 = np.array([[0.1, 0.2], [0.3, 0.4], [1e-3, 7.0]], dtype=np.float64)
    hopps.publish(str(repo), "conv", "t", keys.astype(np.int64), values64)
    node = serve()
    node.wait_serving("conv", 1)
    rows = node.client.lookup("conv", "t", keys)
    np.testing.assert_array_equal(rows.values, values64.astype(np.float32))


def test_pandas_and_pyarrow_inputs_round_trip(repo, serve):
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(1, 2**62, size=60, dtype=np.int64))[:50].astype(np.uint64)
    assert len(keys) == 50
    values = rng.standard_normal((50, 4)).astype(np.float32)
    frame = pd.DataFrame({"key": keys, "value": list(values)})
    table = pa.table(
        {
            "key": pa.array(keys[:20] + 1, type=pa.uint64()),
            "value": pa.FixedSizeListArray.from_arrays(pa.array(values[:20].ravel() * 2), 4),
        }
    )
    series_keys = pd.Series(keys[:5] + 2)
    hopps.publish_tables(
        str(repo),
        "frames",
        {
            "from_pandas": frame,
            "from_arrow": table,
            "from_series": (series_keys, pd.DataFrame(values[:5] * 3)),
            "from_arrow_list": (pa.array(keys[:3] + 3), pa.array([list(r) for r in values[:3] * 4])),
        },
    )
    node = serve()
    node.wait_serving("frames", 1)
    out = node.client.multi_lookup(
        "frames",
        {"from_pandas": keys, "from_arrow": keys[:20] + 1, "from_series": keys[:5] + 2, "from_arrow_list": keys[:3] + 3},
    )
    np.testing.assert_array_equal(out["from_pandas"].values, values)
    np.testing.assert_array_equal(out["from_arrow"].values, values[:20] * 2)
    np.testing.assert_array_equal(out["from_series"].values, values[:5] * 3)
    np.testing.assert_array_equal(out["from_arrow_list"].values, values[:3] * 4)
    assert all(rows.found.all() for rows in out.values())


def test_a_delta_from_a_dataframe_with_deleted_flags(repo, serve):
    keys = np.arange(1, 9, dtype=np.uint64)
    hopps.publish(str(repo), "d", "t", keys, np.ones((8, 2), dtype=np.float32))
    node = serve()
    node.wait_serving("d", 1)
    delta = pd.DataFrame({"key": [1, 2], "value": [[5.0, 5.0], [0.0, 0.0]], "deleted": [False, True]})
    assert hopps.publish(str(repo), "d", "t", delta, delta=True)["version"] == 2
    node.wait_serving("d", 2)
    rows = node.client.lookup("d", "t", [1, 2, 3])
    np.testing.assert_array_equal(rows.found, [True, False, True])
    np.testing.assert_array_equal(rows.values[0], [5.0, 5.0])


def test_bad_input_is_refused_and_nothing_is_published(repo):
    keys = np.array([1, 2, 3], dtype=np.uint64)
    good = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(hopps.InvalidArgument, match="float64"):
        hopps.publish(str(repo), "m", "t", keys.astype(np.float64), good)
    with pytest.raises(hopps.InvalidArgument, match="2 rows for 3 keys"):
        hopps.publish(str(repo), "m", "t", keys, good[:2])
    with pytest.raises(hopps.InvalidArgument, match="2-D"):
        hopps.publish(str(repo), "m", "t", keys, np.ones(3, dtype=np.float32))
    with pytest.raises(hopps.InvalidArgument, match="values are missing"):
        hopps.publish(str(repo), "m", "t", keys)
    with pytest.raises(hopps.InvalidArgument, match="delta=True"):
        hopps.publish(str(repo), "m", "t", keys, good, deleted=np.zeros(3, dtype=bool))
    nan = good.copy()
    nan[1, 1] = np.nan
    with pytest.raises(hopps.InvalidArgument) as err:
        hopps.publish(str(repo), "m", "t", keys, nan)
    assert "2" in str(err.value)  # names the first offending key
    # Nothing was committed: no version directory holds a manifest.
    assert not list(repo.glob("m/versions/*/MANIFEST.json"))
    # allow_non_finite lets them through.
    version = hopps.publish(str(repo), "m", "t", keys, nan, allow_non_finite=True)["version"]
    assert [p.parent.name for p in repo.glob("m/versions/*/MANIFEST.json")] == [f"{version:020d}"]


def test_a_dim_that_differs_from_the_model_is_refused(repo):
    keys = np.array([1, 2], dtype=np.uint64)
    hopps.publish(str(repo), "m", "t", keys, np.ones((2, 4), dtype=np.float32))
    with pytest.raises(hopps.InvalidArgument, match="dim 4"):
        hopps.publish(str(repo), "m", "t", keys, np.ones((2, 3), dtype=np.float32), delta=True)


def test_a_delta_of_an_unknown_model_is_not_found(repo):
    with pytest.raises(hopps.NotFound, match="nothing_here"):
        hopps.publish(str(repo), "nothing_here", "t", [1], np.ones((1, 2)), delta=True)
