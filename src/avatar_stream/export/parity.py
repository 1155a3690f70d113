"""The parity gate: every exported graph against its torch module, on recorded real inputs.

Real inputs (docs/design.md §8, habit 7): the bundled photo (``avatar_stream.ASSETS/face.jpg``) aligned by
``engine.face.FaceAligner`` exactly as the engine aligns a user's photo, and the bundled speech
(``ASSETS/speech.wav``) cut into ``timebase.frame_windows``. The decoder's inputs are the torch
features of that speech and that face, in the 2R+1 windows (edges replicated) the engine feeds.
Random tensors would miss what real data does: silence, loud vowels, saturated sigmoids.

Tolerance, per precision: output ``o`` passes when
``max|onnx(o) - torch(o)| <= TOL[precision] * max(1, max|torch(o)|)``, i.e. absolute for
outputs in [0, 1] (frames, AU probabilities) and relative to the output's range for features.
``int8`` is also judged by PSNR of the decoder frame (``INT8_MIN_PSNR_DB``) in quantize.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from avatar_stream import ASSETS
from avatar_stream.engine import timebase
from avatar_stream.errors import AvatarError
from avatar_stream.export.graphs import SPEC_BY_NAME, run_torch

# fp32: reordered float sums only. fp16: 10-bit mantissa through ~15 layers. int8: 8-bit
# activations and weights; features may move by several percent of their range.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.25}
PARITY_FRAMES = 16  # frame windows checked per graph (spread over the utterance)


class ParityError(AvatarError, RuntimeError):
    """An exported graph disagrees with torch beyond the tolerance of its precision."""


@dataclass(frozen=True)
class ParityResult:
    graph: str
    precision: str
    errors: dict[str, float]  # output -> max abs error
    scales: dict[str, float]  # output -> max(1, max |torch output|)
    batch: int

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.precision]

    def failures(self) -> dict[str, float]:
        return {o: e for o, e in self.errors.items() if not e <= self.tolerance * self.scales[o]}

    @property
    def passed(self) -> bool:
        return not self.failures()


def real_face(path: Path | None = None) -> tuple[np.ndarray, str]:
    """(crop (112,112,3) uint8 RGB, how it was obtained). The bundled photo by default."""
    from avatar_stream.engine.face import FaceAligner, MultipleFacesWarning, read_image

    image = read_image(path or ASSETS / "face.jpg")
    with warnings.catch_warnings():
        # The largest face is the one meant (the bundled photo has a small second detection).
        warnings.simplefilter("ignore", MultipleFacesWarning)
        return FaceAligner().align(image).crop, "engine.face.FaceAligner"


def real_speech(path: Path | None = None) -> np.ndarray:
    """16 kHz float32 speech; the bundled utterance by default."""
    from avatar_stream.engine.audio import load_audio

    return load_audio(path or ASSETS / "speech.wav")


def face_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 crops -> (B, 3, S, S) float32 in [0, 1] (docs/interfaces.md conventions)."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def edge_windows(feats: torch.Tensor, centres: list[int], lookahead: int) -> torch.Tensor:
    """(T, D) features -> (len(centres), 2R+1, D): frames k-R..k+R, edge frames replicated
    at both ends of the utterance (docs/design.md §3)."""
    t = feats.shape[0]
    idx = torch.tensor([[min(max(k + j, 0), t - 1) for j in range(-lookahead, lookahead + 1)] for k in centres])
    return feats[idx]


@torch.no_grad()
def record_inputs(model, crops: list[np.ndarray], audio: np.ndarray, centres: list[int] | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Real inputs of every graph: faces ``crops``; every video frame of ``audio`` for the audio graph;
    decoder windows around ``centres`` (all frames by default) with the first face's identity."""
    ident, audio_spec = SPEC_BY_NAME["identity"], SPEC_BY_NAME["audio"]
    from avatar_stream.export.graphs import AudioGraph, IdentityGraph

    face = face_tensor(crops)
    id_out = run_torch(IdentityGraph(model).eval(), ident, {"face": face})
    pcm = torch.from_numpy(timebase.frame_windows(audio))
    feats = torch.cat([run_torch(AudioGraph(model).eval(), audio_spec, {"pcm": p})["feat"] for p in pcm.split(64)])
    centres = list(range(len(pcm))) if centres is None else centres
    n = len(centres)
    dec = {"feats": edge_windows(feats, centres, model.cfg.lookahead_frames)}
    dec.update({k: v[:1].expand(n, *v.shape[1:]).contiguous() for k, v in id_out.items()})
    return {"identity": {"face": face}, "audio": {"pcm": pcm}, "tcsan_decoder": dec}


def spread(n_total: int, n: int) -> list[int]:
    """``n`` indices spread over ``0..n_total-1``, both ends included."""
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, min(n, n_total))})


def parity_inputs(model, face_path: Path | None = None, speech_path: Path | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """The recorded inputs of the gate: the face and its mirror image; ``PARITY_FRAMES`` speech
    windows; decoder windows at the same frames, including both utterance edges."""
    crop, _ = real_face(face_path)
    audio = real_speech(speech_path)
    t = timebase.num_frames(len(audio))
    centres = spread(t, PARITY_FRAMES)
    rec = record_inputs(model, [crop, np.ascontiguousarray(crop[:, ::-1])], audio, centres)
    rec["audio"]["pcm"] = rec["audio"]["pcm"][centres]
    return rec


def ort_session(model: onnx.ModelProto | str | Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_graph(onnx_model: onnx.ModelProto | str | Path, module: torch.nn.Module, graph: str,
                inputs: dict[str, torch.Tensor], precision: str) -> ParityResult:
    """Run ``onnx_model`` on onnxruntime CPU and ``module`` in torch on the same ``inputs``."""
    spec = SPEC_BY_NAME[graph]
    want = run_torch(module.eval(), spec, inputs)
    sess = ort_session(onnx_model)
    got = sess.run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})
    errors, scales = {}, {}
    for name, g in zip(spec.output_names, got, strict=True):
        w = want[name].numpy()
        if g.shape != w.shape:
            raise ParityError(f"{graph}: output {name} has shape {g.shape} in ONNX but {w.shape} in torch")
        errors[name] = float(np.max(np.abs(g.astype(np.float64) - w)))
        scales[name] = float(max(1.0, np.max(np.abs(w))))
    return ParityResult(graph, precision, errors, scales, batch=next(iter(inputs.values())).shape[0])


def parity_table(results: list[ParityResult]) -> str:
    """Human-readable table: one row per output."""
    rows = [f"{'graph':<14} {'output':<8} {'prec':<5} {'max abs err':>12} {'limit':>10}  result"]
    for r in results:
        for name, err in r.errors.items():
            limit = r.tolerance * r.scales[name]
            rows.append(f"{r.graph:<14} {name:<8} {r.precision:<5} {err:>12.3e} {limit:>10.3e}  "
                        f"{'ok' if err <= limit else 'FAIL'}")
    return "\n".join(rows)


def gate(results: list[ParityResult]) -> None:
    """Raise ParityError naming every output over its limit with its largest abs error."""
    bad = [f"{r.graph}.{o} max abs err {e:.3e} > {r.tolerance * r.scales[o]:.3e} ({r.precision})"
           for r in results for o, e in r.failures().items()]
    if bad:
        raise ParityError("parity gate failed: " + "; ".join(bad) + " — the exported graph does not "
                          "reproduce torch; check the exporter warnings, or export with --precision fp32")
