"""scripts/assemble_starter.py: generator from a train run + AU classifier from its own run
into one starter checkpoint; the classifier's input option comes from the classifier's run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from avatar_stream.training.checkpoint import load_checkpoint, save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.models import AUClassifier, TalkingHead

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "assemble_starter.py"


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_assemble_takes_the_classifier_option_from_its_run(tmp_path):
    torch.manual_seed(0)
    gen_cfg = ModelConfig.tiny(w_per=0.0, w_mouth=5.0, a2a_width=0.5)
    save_checkpoint(tmp_path / "train", {"generator": TalkingHead(gen_cfg).state_dict()}, gen_cfg)
    clf_cfg = ModelConfig.tiny(au_clf_reference=True, au_clf_dropout=0.3, au_clf_symmetric=True)
    clf = AUClassifier(clf_cfg)
    save_checkpoint(tmp_path / "clf", {"au_classifier": clf.state_dict()}, clf_cfg)
    r = _run("--train", tmp_path / "train.safetensors", "--au-classifier", tmp_path / "clf.safetensors",
             "--out", tmp_path / "starter")
    assert r.returncode == 0, r.stderr
    cfg, states, extra = load_checkpoint(tmp_path / "starter")
    assert cfg.au_clf_reference and cfg.au_clf_symmetric and cfg.au_clf_dropout == 0.3 and cfg.w_per == 0.0 and set(states) == {"generator", "au_classifier"}
    assert cfg.w_mouth == 5.0  # the train run's loss weights, not the classifier run's
    assert cfg.a2a_width == 0.5  # and its Audio2AU width (the classifier run never set it)
    TalkingHead(cfg).load_state_dict(states["generator"])
    again = AUClassifier(cfg)
    again.load_state_dict(states["au_classifier"])  # the 6-channel classifier fits the stored config
    assert extra["au_classifier_from"].endswith("clf.safetensors")
    assert extra["generator_from"].endswith("train.safetensors")
    # an assembled starter as --train: its generator, and where that came from, are kept
    r = _run("--train", tmp_path / "starter.safetensors", "--au-classifier", tmp_path / "clf.safetensors",
             "--out", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    _, states2, extra2 = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(states2["generator"][k], v) for k, v in states["generator"].items())
    assert extra2["generator_from"] == extra["generator_from"] and extra2["generator_extra"] == extra["generator_extra"]
    # another architecture is refused with one line
    other = ModelConfig.tiny(f_id=32)
    save_checkpoint(tmp_path / "clf2", {"au_classifier": AUClassifier(other).state_dict()}, other)
    r = _run("--train", tmp_path / "train.safetensors", "--au-classifier", tmp_path / "clf2.safetensors",
             "--out", tmp_path / "bad")
    assert r.returncode == 2 and "another architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1
