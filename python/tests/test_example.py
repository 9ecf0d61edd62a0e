"""The PyTorch EmbeddingBag example, where torch is installed (CI does not install it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed here: the nn.EmbeddingBag example was skipped (pip install torch)"
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch_embeddingbag.py"


def load_example():
    spec = importlib.util.spec_from_file_location("pytorch_embeddingbag", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embeddingbag_from_hopps_matches_the_published_arrays(repo, serve, mode):
    example = load_example()
    # Publish once so the node has the model when it starts; the example then publishes its
    # own version and waits until the node serves it.
    ids, weights, version = example.publish_table(str(repo), 300, 8)
    node = serve()
    node.wait_serving(example.MODEL, version)
    example.run(str(repo), node.addr, num_embeddings=300, dim=8, mode=mode)
