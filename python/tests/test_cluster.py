"""`hopps.Client(etcd=..., cluster=...)` against a real etcd and three real `hopps serve` nodes."""

from __future__ import annotations

import time

import numpy as np
import pytest

import hopps
from conftest import poll

MODEL = "ctr"
CLUSTER = "pytest"
SHARDS = 4
REPLICAS = 2
STABLE_S = 2.5


def cluster_args(etcd, node_id: str) -> tuple:
    return (
        "--etcd", etcd.endpoint,
        "--cluster", CLUSTER,
        "--replicas", str(REPLICAS),
        "--lease-ttl", "2s",
        "--node-id", node_id,
    )


def fully_replicated(client: hopps.Client, alive: set) -> bool:
    """Settled: every shard is placed on exactly REPLICAS nodes of `alive`, and every node holds
    exactly the shards placed on it (no move in progress, no shard left over from one)."""
    status = client.status()
    if set(status["nodes"]) != alive:
        return False
    placement = status["placements"].get(MODEL)
    reports = status["reports"].get(MODEL, {})
    if placement is None or len(placement["assignment"]) != SHARDS:
        return False
    if any(len(nodes) != REPLICAS or not set(nodes) <= alive for nodes in placement["assignment"]):
        return False
    for node in alive:
        placed = [s for s, nodes in enumerate(placement["assignment"]) if node in nodes]
        if reports.get(node, {}).get("held") != placed:
            return False
    # The nodes' own status agrees with their reports (a node that just dropped shards may
    # report them gone a moment before its tables are).
    for entry in status["node_status"]:
        models = {m["name"]: m for m in entry.get("status", {}).get("models", [])}
        report = reports.get(entry["id"], {})
        if models.get(MODEL, {}).get("rows", 0) != report.get("rows", 0):
            return False
    return True


def settled(client: hopps.Client, alive: set, what: str) -> None:
    """Waits until `fully_replicated` holds at one placement epoch for STABLE_S: the controller
    re-plans at least every second, so a node that just registered gets its shards by then."""
    since = {}

    def check():
        if not fully_replicated(client, alive):
            since.clear()
            return False
        epoch = client.status()["placements"][MODEL]["epoch"]
        if since.get("epoch") != epoch:
            since.update(epoch=epoch, at=time.monotonic())
        return time.monotonic() - since["at"] >= STABLE_S

    poll(what, check, 60.0, every_s=0.1)


@pytest.fixture
def cluster(repo, serve, etcd):
    """Version 1 of a 4-shard model served by three nodes with two replicas per shard."""
    keys = np.arange(0, 400, dtype=np.uint64) * 7919
    values = np.random.default_rng(3).standard_normal((len(keys), 8)).astype(np.float32)
    hopps.publish_tables(str(repo), MODEL, {"user": (keys, values)}, shards=SHARDS)
    nodes = {f"n{i}": serve(*cluster_args(etcd, f"n{i}")) for i in range(3)}
    client = hopps.Client(etcd=etcd.endpoint, cluster=CLUSTER, timeout=10.0)
    settled(client, set(nodes), "three nodes with every shard on two of them")
    poll("the cluster to serve version 1", lambda: client.status()["serving"].get(MODEL, {}).get("version") == 1, 30.0)
    return client, nodes, keys, values


def test_cluster_lookups_return_the_published_rows(cluster, etcd):
    client, _, keys, values = cluster
    assert client.addr is None and client.cluster == CLUSTER
    assert "cluster=" in repr(client)
    missing = np.array([1, 2, 3], dtype=np.uint64)  # not multiples of 7919
    query = np.concatenate([keys[::-1], missing])
    rows = client.lookup(MODEL, "user", query)
    assert rows.version == 1
    assert rows.dim == 8
    assert rows.values.shape == (len(query), 8) and rows.values.dtype == np.float32
    np.testing.assert_array_equal(rows.found, [True] * len(keys) + [False] * 3)
    np.testing.assert_array_equal(rows.values[: len(keys)], values[::-1])
    assert not rows.values[len(keys):].any()
    pinned = client.lookup(MODEL, "user", keys[:5], version=1)
    np.testing.assert_array_equal(pinned.values, values[:5])

    both = client.multi_lookup(MODEL, {"user": keys[:10]})
    np.testing.assert_array_equal(both["user"].values, values[:10])
    assert both["user"].version == 1
    pinned = client.multi_lookup(MODEL, [("user", keys[10:20])], version=1)
    np.testing.assert_array_equal(pinned["user"].values, values[10:20])

    status = client.status()
    assert status["cluster"] == CLUSTER and set(status["nodes"]) == {"n0", "n1", "n2"}
    assert all("status" in n for n in status["node_status"]), status["node_status"]
    assert [v["version"] for v in client.versions(MODEL)] == [1]


def test_cluster_writes_reach_every_replica(cluster):
    client, nodes, _, _ = cluster
    new_keys = np.array([5, 6], dtype=np.uint64)
    rows = np.full((2, 8), 0.25, dtype=np.float32)
    ack = client.upsert(MODEL, "user", new_keys, rows)
    assert ack["rows"] == 2
    got = client.lookup(MODEL, "user", new_keys)
    np.testing.assert_array_equal(got.found, [True, True])
    np.testing.assert_array_equal(got.values, rows)
    # Every node holding the key's shard has the row; the others do not hold the shard.
    holders = 0
    for node_id, node in nodes.items():
        try:
            answer = node.client.lookup(MODEL, "user", new_keys[:1])
        except hopps.FailedPrecondition:
            continue
        assert answer.found[0], (
            f"node {node_id} answers for the key's shard but lacks the written row; "
            f"ack {ack}; cluster {client.status()}"
        )
        np.testing.assert_array_equal(answer.values[0], rows[0])
        holders += 1
    assert holders >= REPLICAS
    client.delete(MODEL, "user", new_keys)
    np.testing.assert_array_equal(client.lookup(MODEL, "user", new_keys).found, [False, False])


def test_killing_a_node_fails_no_lookup(cluster):
    client, nodes, keys, values = cluster
    victim = nodes["n1"]
    victim.process.kill()  # SIGKILL: no deregistration; the lease expires after 2 s
    victim.process.wait()
    failures = []
    answered = 0
    deadline = time.monotonic() + 5.0  # past the lease TTL: the node is dropped meanwhile
    while time.monotonic() < deadline:
        try:
            rows = client.lookup(MODEL, "user", keys)
            assert rows.version == 1
            np.testing.assert_array_equal(rows.values, values)
            answered += 1
        except hopps.HoppsError as err:
            failures.append(str(err))
    assert not failures, f"{len(failures)} of {answered + len(failures)} lookups failed: {failures[:3]}"
    assert answered > 10
    poll("re-replication onto the two nodes left", lambda: fully_replicated(client, {"n0", "n2"}), 60.0)
    rows = client.lookup(MODEL, "user", keys)
    np.testing.assert_array_equal(rows.values, values)


def test_client_needs_one_node_or_one_cluster(etcd):
    for kwargs in ({}, {"etcd": etcd.endpoint}, {"cluster": CLUSTER}):
        with pytest.raises(ValueError, match="addr=.*cluster="):
            hopps.Client(**kwargs)
    with pytest.raises(hopps.InvalidArgument, match="together"):
        hopps.Client("127.0.0.1:1", etcd=etcd.endpoint, cluster=CLUSTER)


def test_node_only_calls_say_how_to_ask_a_node(cluster):
    client = cluster[0]
    with pytest.raises(hopps.InvalidArgument, match="one node"):
        client.checkpoint(MODEL)
    with pytest.raises(hopps.InvalidArgument, match="one node"):
        client.list_models()
