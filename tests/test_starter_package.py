"""The starter that ships in the package: its weights stay within the budget the issue sets,
and its exported graphs are the export of exactly the shipped checkpoint."""

from __future__ import annotations

import hashlib
import json

from avatar_stream import STARTER_DIR
from avatar_stream.training.checkpoint import load_checkpoint

BUDGET = 30 * 1000 * 1000  # issue 4: the weights (safetensors + config) <= 30 MB


def test_starter_weights_fit_the_budget():
    size = sum((STARTER_DIR / f"starter.{ext}").stat().st_size for ext in ("safetensors", "json"))
    assert size <= BUDGET, f"starter weights are {size / 1e6:.1f} MB"


def test_starter_graphs_are_exported_from_the_shipped_checkpoint():
    manifest = json.loads((STARTER_DIR / "onnx" / "manifest.json").read_text())
    digest = hashlib.sha256((STARTER_DIR / "starter.safetensors").read_bytes()).hexdigest()
    assert manifest["checkpoint_sha256"] == digest
    for graph in manifest["graphs"].values():
        assert hashlib.sha256((STARTER_DIR / "onnx" / graph["file"]).read_bytes()).hexdigest() == graph["sha256"]
    cfg, states, _ = load_checkpoint(STARTER_DIR / "starter")
    assert {"generator", "au_classifier"} <= set(states)
