"""A PyTorch ``nn.EmbeddingBag`` whose weights come from hopps.

Publishes an embedding table to a model repository, waits until a running ``hopps serve``
serves it, then computes the same bags three ways and checks they agree exactly:

1. reference: an ``EmbeddingBag`` built from the published numpy array;
2. full fetch: every row looked up from hopps into one ``EmbeddingBag``;
3. sparse fetch: only the ids of the batch looked up (what an inference service does), the
   bag computed over the fetched rows with the ids remapped.

Run it against a node that serves the repository::

    hopps serve --repo ./hopps-data --listen 127.0.0.1:7070 &
    python python/examples/pytorch_embeddingbag.py --repo ./hopps-data --addr 127.0.0.1:7070
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import hopps

MODEL = "embeddingbag_example"
TABLE = "items"


def publish_table(repo: str, num_embeddings: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Publishes ids 0..num_embeddings-1 with random rows; returns (ids, weights, version)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(num_embeddings, dtype=np.uint64)
    weights = rng.standard_normal((num_embeddings, dim)).astype(np.float32)
    summary = hopps.publish(repo, MODEL, TABLE, ids, weights)
    return ids, weights, summary["version"]


def wait_serving(client: hopps.Client, version: int, deadline_s: float = 60.0) -> None:
    """Polls the node's status until it serves `version` of the model."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for model in client.status()["models"]:
            if model["name"] == MODEL and model["serving_version"] == version:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the node did not serve {MODEL} version {version} within {deadline_s}s")


def sparse_bags(client: hopps.Client, ids: torch.Tensor, offsets: torch.Tensor, mode: str) -> torch.Tensor:
    """Bags of `ids` computed from the rows of only those ids, fetched from hopps."""
    unique, local = torch.unique(ids, return_inverse=True)
    rows = client.lookup(MODEL, TABLE, unique.numpy().astype(np.uint64))
    if not rows.found.all():
        missing = unique.numpy()[~rows.found]
        raise KeyError(f"ids {missing[:5].tolist()} are not in {MODEL}/{TABLE}")
    weights = torch.from_numpy(rows.values)  # shares the buffer hopps decoded into
    return nn.functional.embedding_bag(local, weights, offsets, mode=mode)


def run(repo: str, addr: str, num_embeddings: int = 1000, dim: int = 16, mode: str = "sum") -> None:
    ids, weights, version = publish_table(repo, num_embeddings, dim)
    client = hopps.Client(addr)
    wait_serving(client, version)

    # A batch of 4 bags of different sizes.
    rng = np.random.default_rng(1)
    bag_ids = torch.from_numpy(rng.integers(0, num_embeddings, size=23).astype(np.int64))
    offsets = torch.tensor([0, 5, 6, 15], dtype=torch.int64)

    reference = nn.EmbeddingBag.from_pretrained(torch.from_numpy(weights), mode=mode)
    expected = reference(bag_ids, offsets)

    rows = client.lookup(MODEL, TABLE, ids)
    assert rows.found.all(), "every published id must be found"
    served = nn.EmbeddingBag.from_pretrained(torch.from_numpy(rows.values), mode=mode)
    full = served(bag_ids, offsets)

    sparse = sparse_bags(client, bag_ids, offsets, mode)

    assert torch.equal(full, expected), "full fetch differs from the published arrays"
    # The sparse path sums the same rows in the same order, so it is exact too.
    assert torch.equal(sparse, expected), "sparse fetch differs from the published arrays"
    print(f"{MODEL}/{TABLE} version {rows.version}: {expected.shape[0]} bags of dim {dim} agree exactly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="model repository the node serves")
    parser.add_argument("--addr", required=True, help="gRPC address of the node (host:port)")
    parser.add_argument("--num-embeddings", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--mode", choices=["sum", "mean", "max"], default="sum")
    args = parser.parse_args()
    run(args.repo, args.addr, args.num_embeddings, args.dim, args.mode)


if __name__ == "__main__":
    main()
