"""scripts/classifier_f1.py: held-out F1 of AU classifiers, per AU and identity, with a paired
bootstrap of their differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.checkpoint import save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.datasets import to_chw
from avatar_stream.training.metrics import au_scores
from avatar_stream.training.models import AUClassifier
from avatar_stream.training.shards import load_clip, read_index, write_clip, write_split


def _corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    for speaker, n in (("fa_v1", 20), ("fa_v2", 13), ("fb_v1", 27)):
        frames = rng.integers(0, 255, (n, 112, 112, 3), dtype=np.uint8)
        au = rng.random((n, 5)).astype(np.float32)
        audio = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
        write_clip(root, speaker, "u", frames, audio, rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), au=au,
                   identity_name=speaker[:2])
    write_split(root, [], ["fa_v1", "fa_v2", "fb_v1"])


def _classifier(path: Path, seed: int) -> AUClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(au_clf_reference=True)
    clf = AUClassifier(cfg).eval()
    save_checkpoint(path, {"au_classifier": clf.state_dict()}, cfg)
    return clf


def test_scores_every_frame_once_and_bootstraps_the_difference(tmp_path, capsys, load_script):
    f1 = load_script("classifier_f1")
    root = tmp_path / "c"
    _corpus(root)
    a, b = _classifier(tmp_path / "a", 0), _classifier(tmp_path / "b", 1)
    out = tmp_path / "f1.json"
    assert f1.main(["--data", str(root), "--checkpoint", str(tmp_path / "a.safetensors"),
                    str(tmp_path / "b.safetensors"), "--resamples", "50", "--ensemble", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["clips"] == 3 and table["frames"] == 20 + 13 + 27
    rows = table["models"]
    # the figure is metrics.au_scores over every frame of the split, each once
    entries = read_index(root)
    with torch.no_grad():
        logits = {name: [] for name in "ab"}
        for e in entries:
            arr = load_clip(root, e, ("frames", "identity"))
            x = to_chw(arr["frames"])
            for name, clf in (("a", a), ("b", b)):
                logits[name].append(clf(clf.inputs(x, to_chw(arr["identity"])[None])).numpy())
    labels = np.concatenate([load_clip(root, e, ("au_label",))["au_label"] for e in entries])
    for name in "ab":
        want = au_scores(torch.sigmoid(torch.from_numpy(np.concatenate(logits[name]))).numpy(), labels)
        row = rows[str(tmp_path / f"{name}.safetensors")]
        assert abs(row["mean_f1"] - want.mean_f1) < 1e-12
        assert set(row["by_identity"]) == {"fa", "fb"}
    diff = rows[str(tmp_path / "b.safetensors")]["diff_vs_first"]
    assert abs(diff["mean"] - (rows[str(tmp_path / "b.safetensors")]["mean_f1"]
                               - rows[str(tmp_path / "a.safetensors")]["mean_f1"])) < 1e-12
    assert diff["se"] > 0 and diff["ci95"][0] <= diff["ci95"][1]
    assert "ensemble (mean logit)" in rows
    assert "bootstrap 50 resamples" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, load_script):
    f1 = load_script("classifier_f1")
    assert f1.main(["--data", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("classifier_f1:")
