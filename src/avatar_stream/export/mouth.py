"""Export a mouth head (training/mouth_head.py) into a model directory as ``mouth.onnx``.

    MouthGraph  feats (B, 2R+1, D) of frames k-R..k+R -> mouth (B, M) for frame k, in IODs

The head reads the features of one model's audio graph: it is exported into that model's
directory, its card carries that model's checkpoint hash (so the engine refuses it beside
another model's graphs) and, in ``head``, its own config, checkpoint hash, measure names and
what it was trained on. Parity: the graph against torch on real features (the bundled
speech through the directory's own audio.onnx), fp32 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avatar_stream.engine import timebase
from avatar_stream.engine.card import GRAPH_IO, ModelCardError, read_card
from avatar_stream.engine.runners import file_sha256
from avatar_stream.export.card import build_card, exporter_version, write_card
from avatar_stream.export.graphs import GraphSpec
from avatar_stream.export.onnx_export import MANIFEST_FORMAT, OPSET, check, to_onnx
from avatar_stream.export.parity import PARITY_FRAMES, ParityResult, gate, ort_session, real_speech, spread

SPEC = GraphSpec("mouth", lambda head: MouthGraph(head), *GRAPH_IO["mouth"])


class MouthGraph(nn.Module):
    """feats (B, 2R+1, D) -> mouth (B, M): the head's measures for the centre frame."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)


def _real_feature_windows(model_dir: Path, lookahead: int, speech_path: Path | None) -> np.ndarray:
    from avatar_stream.engine.model import load_model

    model = load_model(model_dir, "cpu")
    audio = real_speech(speech_path)
    feat, _ = model.frame_features(timebase.frame_windows(audio))
    t = len(feat)
    idx = np.clip(np.arange(t)[:, None] + np.arange(-lookahead, lookahead + 1)[None], 0, t - 1)
    return feat[idx][spread(t, PARITY_FRAMES)].astype(np.float32)


def export_mouth_head(head_path: str | Path, model_dir: str | Path, parity: bool = True,
                      speech_path: Path | None = None) -> Path:
    """Write ``model_dir/mouth.onnx`` from a ``save_mouth_head`` file; returns its path."""
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.mouth_head import load_mouth_head

    model_dir = Path(model_dir)
    audio = read_card(model_dir / "audio.onnx")
    head, extra = load_mouth_head(head_path)
    # Heads saved before the audio graph had its name carry the older key.
    trained_on = extra.get("audio_checkpoint_sha256", extra.get("frame_checkpoint_sha256"))
    if trained_on != audio.checkpoint_sha256:
        raise ModelCardError(
            f"{head_path} was trained on the features of checkpoint {str(trained_on)[:12]}, "
            f"{model_dir} holds {audio.checkpoint_sha256[:12]}: train the head on this model "
            f"(avatar-train train-mouth --model {model_dir})")
    if head.cfg.feature_dim != audio.frame_feature_dim or head.cfg.lookahead_frames != audio.lookahead_frames:
        raise ModelCardError(f"{head_path}: reads {head.cfg.feature_dim} features x {head.cfg.window} frames, "
                             f"{model_dir} gives {audio.frame_feature_dim} x {audio.receptive_field}")
    graph = MouthGraph(head).eval()
    example = {"feats": torch.randn(2, head.cfg.window, head.cfg.feature_dim) * head.std + head.mean}
    proto = to_onnx(graph, SPEC, example)
    check(proto)
    errors: dict[str, float] = {}
    if parity:
        x = _real_feature_windows(model_dir, audio.lookahead_frames, speech_path)
        with torch.no_grad():
            want = graph(torch.from_numpy(x)).numpy()
        got = ort_session(proto).run(["mouth"], {"feats": x})[0]
        result = ParityResult("mouth", "fp32", {"mouth": float(np.max(np.abs(got - want)))},
                              {"mouth": float(max(1.0, np.max(np.abs(want))))}, batch=len(x))
        gate([result])
        errors = result.errors
    with torch.no_grad():
        out = graph(example["feats"])
    info = {"config": json.loads(head.cfg.to_json()), "checkpoint_sha256": file_sha256(_safetensors(head_path)),
            "measures": list(head.cfg.measures), "units": "inter-ocular distances, relative to rest",
            **{k: v for k, v in extra.items() if k not in ("audio_checkpoint_sha256", "frame_checkpoint_sha256")}}
    card = build_card("mouth", ModelConfig.from_dict(dict(audio.config)),
                      {"feats": ["B", head.cfg.window, head.cfg.feature_dim]}, {"mouth": ["B", int(out.shape[1])]},
                      checkpoint_sha256=audio.checkpoint_sha256, precision="fp32", parity=errors,
                      exporter=exporter_version(OPSET), head=info)
    path = model_dir / "mouth.onnx"
    onnx.save(write_card(proto, card), path)
    _add_to_manifest(model_dir, path, errors)
    return path


def _safetensors(path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def _add_to_manifest(model_dir: Path, path: Path, errors: dict[str, float]) -> None:
    mpath = model_dir / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {"format": MANIFEST_FORMAT, "graphs": {}}
    manifest.setdefault("graphs", {})["mouth"] = {"file": path.name, "sha256": file_sha256(path),
                                                  "precision": "fp32", "parity": errors}
    mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


__all__ = ["MouthGraph", "export_mouth_head"]
