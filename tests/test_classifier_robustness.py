"""scripts/classifier_robustness.py: a classifier's F1 on test frames, as they are and perturbed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.checkpoint import save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.metrics import au_scores
from avatar_stream.training.models import AUClassifier
from avatar_stream.training.shards import write_clip, write_split


def _corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(2):
        t = 20
        frames = rng.integers(0, 255, (t, 112, 112, 3), dtype=np.uint8)
        au = rng.random((t, 5)).astype(np.float32)
        audio = np.zeros(t * SAMPLES_PER_FRAME, np.float32)
        write_clip(root, f"t{k}", "u", frames, audio, rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), au=au)
    write_split(root, [], ["t0", "t1"])


def test_table_scores_the_same_items_as_is_and_perturbed(tmp_path, capsys, load_script):
    cr = load_script("classifier_robustness")
    _corpus(tmp_path / "c")
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(au_clf_reference=True)
    clf = AUClassifier(cfg).eval()
    save_checkpoint(tmp_path / "clf", {"au_classifier": clf.state_dict()}, cfg)
    out = tmp_path / "t.json"
    assert cr.main(["--data", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "clf.safetensors"),
                    "--items", "0", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["mean_f1"][str(tmp_path / "clf.safetensors")]
    assert list(row) == list(cr.PERTURBATIONS)
    # "as is" is the plain held-out F1: the classifier on the dataset's own (unperturbed) inputs
    from avatar_stream.training.datasets import AUFrameDataset

    ds = AUFrameDataset(tmp_path / "c", "test", per_item=16, reference=True)
    with torch.no_grad():
        parts = [ds[i] for i in range(len(ds))]
        p = torch.sigmoid(clf(torch.cat([x for x, _, _ in parts]))).numpy()
    y = torch.cat([y for _, y, _ in parts]).numpy()
    v = torch.cat([v for _, _, v in parts]).numpy() > 0
    assert row["as is"] == au_scores(p, y, v).mean_f1
    # a perturbation changes what the classifier sees
    x0, _ = cr.inputs(clf, ds, 0, cr.PERTURBATIONS["as is"])
    x1, _ = cr.inputs(clf, ds, 0, cr.PERTURBATIONS["reference 1.5 px shift"])
    assert torch.equal(x0[:, :3], x1[:, :3]) and not torch.equal(x0[:, 3:], x1[:, 3:])
    assert "as is" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, load_script):
    cr = load_script("classifier_robustness")
    assert cr.main(["--data", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "x.safetensors")]) == 2
    _corpus(tmp_path / "c")
    cfg = ModelConfig.tiny()
    save_checkpoint(tmp_path / "gen", {"other": torch.nn.Linear(2, 2).state_dict()}, cfg)
    assert cr.main(["--data", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "gen.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("classifier_robustness:") for line in err)
    assert "no au_classifier" in err[1]
