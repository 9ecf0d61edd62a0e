"""The Python client against a real `hopps serve`: exact values, errors, writes, rollback."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

import hopps

MODEL = "ctr"
U64_MAX = np.iinfo(np.uint64).max


def exact_rows(n: int, dim: int, seed: int = 7) -> np.ndarray:
    """Rows with awkward floats (negative zero, subnormals, huge and tiny values) among random ones."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, dim)).astype(np.float32)
    specials = np.array([-0.0, 1e-45, -3.4e38, 3.4e38, 1.17549435e-38, 0.1], dtype=np.float32)
    values.flat[: specials.size] = specials
    return values


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to the bit (so -0.0 differs from 0.0 and no rounding hides)."""
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.fixture
def served(repo, serve):
    """A model with table user (dim 8) and item (dim 3), version 1, on a running node."""
    keys = np.array([0, 1, 2, 1000, 2**40 + 3, U64_MAX], dtype=np.uint64)
    user = exact_rows(len(keys), 8)
    item_keys = np.arange(100, 150, dtype=np.uint64)
    item = exact_rows(len(item_keys), 3, seed=11)
    summary = hopps.publish_tables(str(repo), MODEL, {"user": (keys, user), "item": (item_keys, item)}, shards=4)
    assert summary == {"model": MODEL, "version": 1, "kind": "full", "rows": len(keys) + len(item_keys)}
    node = serve()
    node.wait_serving(MODEL, 1)
    return node, keys, user, item_keys, item


def test_exact_values_round_trip_from_publish_to_lookup(served):
    node, keys, user, _, _ = served
    order = np.array([5, 0, 3, 1, 4, 2])
    query = np.concatenate([keys[order], np.array([777, 3], dtype=np.uint64)])
    rows = node.client.lookup(MODEL, "user", query)
    assert rows.version == 1
    assert rows.dim == 8
    assert rows.values.dtype == np.float32 and rows.values.shape == (8, 8)
    assert rows.found.dtype == np.bool_ and rows.found.shape == (8,)
    assert_bits_equal(rows.values[:6], user[order])
    np.testing.assert_array_equal(rows.found, [True] * 6 + [False, False])
    # Missing keys of a "zeros" table are rows of zeros.
    assert not rows.values[6:].any()
    values, found = rows  # a named pair
    assert values is rows.values and found is rows.found


def test_results_own_the_client_buffers_and_are_writable(served):
    node, keys, user, _, _ = served
    values, found = node.client.lookup(MODEL, "user", keys)
    # The decoded Vec became the array's buffer: numpy does not own a copy of its own.
    assert not values.flags.owndata and values.base is not None
    assert values.flags.c_contiguous and values.flags.writeable
    assert found.flags.writeable
    values[0, 0] = 42.0  # writing to our array does not touch the server
    again, _ = node.client.lookup(MODEL, "user", keys[:1])
    assert_bits_equal(again, user[:1])


def test_keys_convert_from_lists_signed_and_narrow_integers(served):
    node, keys, user, _, _ = served
    small = keys[:4]
    expected = node.client.lookup(MODEL, "user", small).values
    for variant in (small.tolist(), small.astype(np.int64), small.astype(np.uint32), small[::-1][::-1].copy()):
        assert_bits_equal(node.client.lookup(MODEL, "user", variant).values, expected)
    strided = np.repeat(small, 2)[::2]  # non-contiguous view
    assert_bits_equal(node.client.lookup(MODEL, "user", strided).values, expected)
    empty = node.client.lookup(MODEL, "user", np.array([], dtype=np.uint64))
    assert empty.values.shape == (0, 8) and empty.found.shape == (0,)


def test_key_dtype_and_shape_errors_name_the_call(served):
    node, _, _, _, _ = served
    with pytest.raises(hopps.InvalidArgument, match=r'lookup of model "ctr" table "user".*float64'):
        node.client.lookup(MODEL, "user", np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"1-D"):  # InvalidArgument is a ValueError
        node.client.lookup(MODEL, "user", np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(hopps.InvalidArgument, match=r"keys\[1\] = -5"):
        node.client.lookup(MODEL, "user", np.array([3, -5, -6]))
    with pytest.raises(hopps.InvalidArgument, match=r"dtype <U1|dtype <U"):
        node.client.lookup(MODEL, "user", ["a", "b"])
    with pytest.raises(hopps.InvalidArgument):
        node.client.lookup(MODEL, "user", 7)  # a scalar is not a batch


def test_value_shape_and_dtype_errors(served):
    node, _, _, _, _ = served
    keys = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(hopps.InvalidArgument, match=r'upsert of model "ctr" table "user": values has 3 rows for 2 keys'):
        node.client.upsert(MODEL, "user", keys, np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(hopps.InvalidArgument, match=r"2-D"):
        node.client.upsert(MODEL, "user", keys, np.zeros(16, dtype=np.float32))
    with pytest.raises(hopps.InvalidArgument, match=r"floating point.*int64"):
        node.client.upsert(MODEL, "user", keys, np.zeros((2, 8), dtype=np.int64))
    # A dim the table does not have is refused by the server, with the server's message.
    with pytest.raises(hopps.InvalidArgument) as err:
        node.client.upsert(MODEL, "user", keys, np.zeros((2, 5), dtype=np.float32))
    assert err.value.code == "INVALID_ARGUMENT"
    assert "dim 8" in err.value.message and "\"user\"" in err.value.message


def test_unknown_model_and_table_are_not_found(served):
    node, keys, _, _, _ = served
    with pytest.raises(hopps.NotFound) as err:
        node.client.lookup("no_such_model", "user", keys)
    assert "no_such_model" in str(err.value)
    assert isinstance(err.value, LookupError) and err.value.code == "NOT_FOUND"
    assert not err.value.retryable
    with pytest.raises(hopps.NotFound, match="no_such_table"):
        node.client.lookup(MODEL, "no_such_table", keys)
    with pytest.raises(hopps.NotFound, match="no_such_model"):
        node.client.versions("no_such_model")


def test_multi_lookup_reads_every_table_at_one_version(served):
    node, keys, user, item_keys, item = served
    out = node.client.multi_lookup(MODEL, {"user": keys, "item": item_keys[::-1]})
    assert list(out) == ["user", "item"]
    assert out["user"].version == out["item"].version == 1
    assert_bits_equal(out["user"].values, user)
    assert_bits_equal(out["item"].values, item[::-1])
    assert out["item"].found.all()
    pairs = node.client.multi_lookup(MODEL, [("item", item_keys[:2])])
    assert_bits_equal(pairs["item"].values, item[:2])


def test_upsert_and_delete_are_visible_to_lookups(served):
    node, keys, _, _, _ = served
    new_keys = np.array([5_000_000, 2], dtype=np.uint64)
    new_rows = exact_rows(2, 8, seed=99)
    ack = node.client.upsert(MODEL, "user", new_keys, new_rows)
    assert ack["rows"] == 2
    rows = node.client.lookup(MODEL, "user", new_keys)
    assert rows.found.all()
    assert_bits_equal(rows.values, new_rows)
    ack = node.client.delete(MODEL, "user", new_keys)
    assert ack["rows"] >= 1
    rows = node.client.lookup(MODEL, "user", new_keys)
    assert not rows.found.any()


def test_push_applies_sgd_on_the_server(repo, serve):
    keys = np.array([1, 2], dtype=np.uint64)
    hopps.publish(str(repo), "pushed", "emb", keys, np.ones((2, 4), dtype=np.float32), optimizer="sgd", learning_rate=0.5)
    node = serve()
    node.wait_serving("pushed", 1)
    gradients = np.full((2, 4), 0.5, dtype=np.float32)
    node.client.push("pushed", "emb", keys, gradients)
    rows = node.client.lookup("pushed", "emb", keys)
    # w - lr * g = 1 - 0.5 * 0.5, exact in float32.
    np.testing.assert_array_equal(rows.values, np.full((2, 4), 0.75, dtype=np.float32))


def test_rollback_restores_the_earlier_version(repo, serve):
    keys = np.arange(1, 65, dtype=np.uint64)
    v1 = exact_rows(len(keys), 4, seed=1)
    hopps.publish(str(repo), MODEL, "user", keys, v1)
    node = serve()
    node.wait_serving(MODEL, 1)
    changed = keys[:16]
    v2_rows = exact_rows(len(changed), 4, seed=2)
    summary = hopps.publish(str(repo), MODEL, "user", changed, v2_rows, delta=True)
    assert summary["kind"] == "delta" and summary["version"] == 2
    node.wait_serving(MODEL, 2)
    rows = node.client.lookup(MODEL, "user", keys)
    assert rows.version == 2
    assert_bits_equal(rows.values[:16], v2_rows)
    assert_bits_equal(rows.values[16:], v1[16:])
    pinned = node.client.lookup(MODEL, "user", keys, version=2)
    assert pinned.version == 2
    with pytest.raises((hopps.FailedPrecondition, hopps.NotFound)) as err:
        node.client.lookup(MODEL, "user", keys, version=99)
    assert "99" in err.value.message

    report = node.client.rollback(MODEL, 1)
    assert report["from"] == 2 and report["to"] == 1 and report["model"] == MODEL
    rows = node.client.lookup(MODEL, "user", keys)
    assert rows.version == 1
    assert_bits_equal(rows.values, v1)
    versions = {v["version"]: v for v in node.client.versions(MODEL)}
    assert versions[1]["kind"] == "full" and versions[2]["kind"] == "delta"
    assert versions[1]["state"] == "serving"
    status = node.client.status()
    assert [m["serving_version"] for m in status["models"] if m["name"] == MODEL] == [1]
    events = [e["event"] for e in node.client.history(MODEL)]
    assert "rolled_back" in events


def test_rollback_to_an_unknown_version_fails_with_the_servers_message(served):
    node, _, _, _, _ = served
    with pytest.raises(hopps.HoppsError) as err:
        node.client.rollback(MODEL, 99)
    assert isinstance(err.value, (hopps.NotFound, hopps.FailedPrecondition, hopps.InvalidArgument))
    assert "99" in err.value.message


def test_admin_answers_are_plain_data(served):
    node, _, _, _, _ = served
    models = node.client.list_models()
    assert [m["name"] for m in models] == [MODEL]
    tables = {t["name"]: t for t in models[0]["tables"]}
    assert tables["user"]["dim"] == 8 and tables["item"]["dim"] == 3
    assert models[0]["shards"] == 4
    status = node.client.status()
    assert status["ready"] is True
    (model,) = [m for m in status["models"] if m["name"] == MODEL]
    assert model["serving_version"] == 1 and model["rows"] == 6 + 50


def test_a_closed_port_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(hopps.Unavailable) as err:
        hopps.Client(f"127.0.0.1:{port}", connect_timeout=2.0)
    assert isinstance(err.value, ConnectionError)
    assert str(port) in str(err.value) and err.value.retryable


def test_calls_release_the_gil_while_they_wait():
    # A listener that completes TCP handshakes but never speaks HTTP/2: a call waits until its
    # deadline. Meanwhile a Python thread must keep running.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        addr = "127.0.0.1:%d" % listener.getsockname()[1]
        try:
            client = hopps.Client(addr, connect_timeout=2.0, timeout=1.0)
        except hopps.HoppsError as err:  # the connection itself waited for the handshake
            assert isinstance(err, (hopps.Unavailable, hopps.DeadlineExceeded)), err
            return
        ticks = 0
        stop = threading.Event()

        def spin():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                time.sleep(0.001)

        spinner = threading.Thread(target=spin)
        spinner.start()
        started = time.monotonic()
        try:
            with pytest.raises((hopps.DeadlineExceeded, hopps.Unavailable)):
                client.lookup(MODEL, "user", [1, 2, 3])
        finally:
            stop.set()
            spinner.join()
        waited = time.monotonic() - started
        assert waited >= 0.5, waited
        # Had the GIL been held for the whole wait, the spinner could not have ticked.
        assert ticks > 50, ticks


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_client_from_before_fork_refuses_and_a_new_one_works(served):
    node, keys, user, _, _ = served
    client = node.client
    client.lookup(MODEL, "user", keys)  # the runtime exists before the fork
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                client.lookup(MODEL, "user", keys)
                code = 2
            except hopps.FailedPrecondition as err:
                if "new hopps.Client" in str(err):
                    fresh = hopps.Client(node.addr)
                    rows = fresh.lookup(MODEL, "user", keys)
                    code = 0 if np.array_equal(rows.values.view(np.uint32), user.view(np.uint32)) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
