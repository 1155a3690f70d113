"""Evaluation metrics (docs/design.md §4): PSNR, SSIM, per-AU F1 / accuracy, mouth landmark
distance (LMD), identity similarity, and the OpenFace CSV reader that supplies AU labels.

Image conventions: float arrays or tensors in ``[0, 1]``, ``(N, 3, H, W)`` or ``(3, H, W)``
(the model's layout), or uint8 ``(N, H, W, 3)`` / ``(H, W, 3)`` (the shard layout); both are
accepted by ``psnr`` and ``ssim`` and compared on a ``[0, 1]`` data range.

- PSNR: per image, ``10 log10(1 / MSE)`` over all pixels and channels; ``inf`` for identical
  images. Dataset PSNR is the mean of the per-frame values (how the paper's tables average).
- SSIM: Wang et al. 2004, 11x11 gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  covariance, computed **per RGB channel and averaged**, mean over the valid (unpadded) region:
  equal to ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_stream.engine.timebase import AU_NAMES

MOUTH = slice(48, 68)  # iBUG 68-point indices of the outer and inner lips

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # skimage / scipy truncate=3.5 -> 11 taps
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def to_nchw(images) -> torch.Tensor:
    """Images as float64 ``(N, C, H, W)`` in ``[0, 1]``: accepts uint8 NHWC/HWC or float NCHW/CHW."""
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dtype == torch.uint8:
        t = t.double() / 255.0
        if t.ndim == 3:
            t = t[None]
        return t.permute(0, 3, 1, 2)
    t = t.double()
    return t[None] if t.ndim == 3 else t


def psnr(pred, target) -> np.ndarray:
    """Per-image PSNR in dB ``(N,)`` on a data range of 1."""
    a, b = to_nchw(pred), to_nchw(target)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(1.0 / mse.numpy())).astype(np.float64)


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def ssim(pred, target) -> np.ndarray:
    """Per-image SSIM ``(N,)``: gaussian-window SSIM per channel, averaged over channels."""
    a, b = to_nchw(pred), to_nchw(target)
    h, w = a.shape[-2:]
    # A separable valid filter equals skimage's reflect-filter-then-crop: the cropped border
    # is exactly where the padding would have reached. As banded matrices it is two float64
    # matmuls (BLAS), much faster than float64 convolutions on CPU.
    g = _gaussian_window()
    k = len(g)
    if min(h, w) < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels, got {h}x{w}")

    def band(n: int) -> torch.Tensor:
        m = torch.zeros(n, n - k + 1, dtype=torch.float64)
        for j in range(n - k + 1):
            m[j : j + k, j] = g
        return m

    bw, bh = band(w), band(h).T.contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return bh @ (x @ bw)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(2, 3)).mean(dim=1).numpy()


@dataclass(frozen=True)
class AUScores:
    """Per-AU F1 and accuracy (AU_NAMES order); NaN where undefined (no positives at all)."""

    f1: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray  # frames with a known label, per AU

    @property
    def mean_f1(self) -> float:
        return float(np.nanmean(self.f1)) if np.isfinite(self.f1).any() else float("nan")

    @property
    def mean_accuracy(self) -> float:
        return float(np.nanmean(self.accuracy)) if np.isfinite(self.accuracy).any() else float("nan")

    def to_dict(self) -> dict:
        per_au = {
            name: {"f1": _num(self.f1[i]), "accuracy": _num(self.accuracy[i]), "frames": int(self.count[i])}
            for i, name in enumerate(AU_NAMES)
        }
        return {"per_au": per_au, "mean_f1": _num(self.mean_f1), "mean_accuracy": _num(self.mean_accuracy)}


def _num(x: float) -> float | None:
    """JSON has no NaN: undefined values become null."""
    return float(x) if np.isfinite(x) else None


def au_counts(pred, labels, valid=None, threshold: float = 0.5) -> np.ndarray:
    """``(3, n_au)`` true positives, false positives and false negatives of ``pred``
    (probabilities or 0/1, ``(N, n_au)``) against occurrence ``labels``, over the frames
    ``valid`` (bool ``(N, n_au)``, None = all) marks as labelled. Counts add up over frames,
    so F1 over any set of clips is ``f1_from_counts`` of their summed counts."""
    p = np.asarray(pred, dtype=np.float64) >= threshold
    y = np.asarray(labels).astype(bool)
    m = np.ones_like(y) if valid is None else np.asarray(valid, dtype=bool)
    return np.stack([(p & y & m).sum(0), (p & ~y & m).sum(0), (~p & y & m).sum(0)])


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Per-AU F1 of ``au_counts`` rows ``(..., 3, n_au)``; NaN for an AU with no positive
    label and no positive prediction (0/0)."""
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def au_scores(pred, labels, valid=None, threshold: float = 0.5) -> AUScores:
    """Per-AU F1 and accuracy of ``pred`` (probabilities or 0/1, ``(N, 5)``) against occurrence
    ``labels`` ``(N, 5)``; ``valid`` (bool ``(N, 5)``) masks frames whose label is unknown.
    F1 is NaN for an AU with no positive label and no positive prediction (0/0)."""
    p = np.asarray(pred, dtype=np.float64) >= threshold
    y = np.asarray(labels).astype(bool)
    m = np.ones_like(y) if valid is None else np.asarray(valid, dtype=bool)
    f1 = f1_from_counts(au_counts(p, y, m))
    n = m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, ((p == y) & m).sum(0) / n, np.nan)
    return AUScores(f1=f1.astype(np.float64), accuracy=acc.astype(np.float64), count=n.astype(np.int64))


def mouth_landmark_distance(pred_landmarks, true_landmarks) -> np.ndarray:
    """LMD per frame: mean Euclidean distance (pixels of the 112x112 crop) between the 20
    mouth landmarks (points 48-67) of generated and real frames. Inputs ``(N, 68, 2)``."""
    a = np.asarray(pred_landmarks, dtype=np.float64)[:, MOUTH]
    b = np.asarray(true_landmarks, dtype=np.float64)[:, MOUTH]
    return np.linalg.norm(a - b, axis=-1).mean(-1)


def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, D)`` descriptor arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def dlib_model_path(name: str) -> Path:
    """A model file shipped by face-recognition-models (located without importing it, which
    needs ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "face-recognition-models is not installed: run `pip install face-recognition-models`"
        )
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall face-recognition-models")
    return path


@dataclass(frozen=True)
class OpenFaceAUs:
    """AU columns of one OpenFace CSV, one row per video frame (the best-tracked face).

    ``intensity``: ``AU*_r / 5`` clipped to [0, 1], NaN where tracking failed or the column is
    absent; ``occurrence``: ``AU*_c`` as uint8 (0 where unknown); ``success``: bool per frame."""

    frame: np.ndarray
    success: np.ndarray
    intensity: np.ndarray
    occurrence: np.ndarray

    def for_frames(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(au (n, 5) float32, au_label (n, 5) uint8)`` for video frames ``0..n-1`` (OpenFace
        counts from 1); frames the CSV lacks or failed on get NaN / 0."""
        au = np.full((n, len(AU_NAMES)), np.nan, dtype=np.float32)
        lab = np.zeros((n, len(AU_NAMES)), dtype=np.uint8)
        idx = self.frame.astype(np.int64) - 1
        keep = (idx >= 0) & (idx < n) & self.success
        au[idx[keep]] = self.intensity[keep]
        lab[idx[keep]] = self.occurrence[keep]
        return au, lab


def read_openface_csv(path: str | Path) -> OpenFaceAUs:
    """Read an OpenFace 2.x (FeatureExtraction / FaceLandmarkVidMulti) or 1.x CSV. Column names
    carry leading spaces in OpenFace output; both spellings are accepted. Where a frame has
    several faces the most confident one is kept."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty: pass the CSV written by OpenFace FeatureExtraction")
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    if "frame" not in col:
        raise ValueError(f"{path} has no 'frame' column: is it an OpenFace output CSV?")
    if not any(f"{au}_c" in col or f"{au}_r" in col for au in AU_NAMES):
        raise ValueError(f"{path} has none of the {'/'.join(AU_NAMES)} columns: run OpenFace with -aus")
    best: dict[int, list[str]] = {}
    conf_i = col.get("confidence")
    for r in rows[1:]:
        if len(r) < len(header):
            continue  # a truncated last line from an interrupted run
        fr = int(float(r[col["frame"]]))
        if fr not in best or (conf_i is not None and float(r[conf_i]) > float(best[fr][conf_i])):
            best[fr] = r
    frames = np.array(sorted(best), dtype=np.int64)
    ordered = [best[int(k)] for k in frames]
    n = len(ordered)
    success = np.array([bool(int(float(r[col["success"]]))) for r in ordered], dtype=bool) \
        if "success" in col else np.ones(n, dtype=bool)
    inten = np.full((n, len(AU_NAMES)), np.nan, dtype=np.float32)
    occ = np.zeros((n, len(AU_NAMES)), dtype=np.uint8)
    for j, au in enumerate(AU_NAMES):
        if f"{au}_r" in col:
            inten[:, j] = np.clip([float(r[col[f"{au}_r"]]) / 5.0 for r in ordered], 0.0, 1.0)
        if f"{au}_c" in col:
            occ[:, j] = [int(float(r[col[f"{au}_c"]]) >= 0.5) for r in ordered]
            if f"{au}_r" not in col:
                inten[:, j] = occ[:, j]  # keeps "NaN = unknown" meaningful without a _r column
        elif f"{au}_r" in col:
            # 1.x CSVs may lack a _c column; OpenFace's own presence threshold is intensity >= 1.
            occ[:, j] = (inten[:, j] * 5.0 >= 1.0).astype(np.uint8)
    inten[~success] = np.nan
    occ[~success] = 0
    return OpenFaceAUs(frame=frames, success=success, intensity=inten, occurrence=occ)


# Detection box of the canonical crop (what dlib's HOG detector returns on aligned GRID crops):
# the fallback when the detector misses a crop.
CANONICAL_CROP_BOX = (21, 21, 93, 93)


class FaceMetrics:
    """LMD and identity similarity on 112x112 crops with dlib models.

    Landmarks come from the same 68-point model the engine's FaceAligner uses, fitted inside
    one box per clip: the detection box of the *real* crop (HOG on the identity image), so
    real and generated frames are measured in the same frame of reference and a blurry
    generated frame cannot make detection fail. Identity descriptors are dlib's ResNet
    (``dlib_face_recognition_resnet_model_v1.dat``, 128-d) from those landmarks."""

    def __init__(self, aligner=None):
        import dlib

        from avatar_stream.engine.face import FaceAligner

        self._dlib = dlib
        self.aligner = aligner or FaceAligner()
        self._shape = dlib.shape_predictor(str(self.aligner.predictor_path))
        self._rec = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def box(self, crop: np.ndarray) -> tuple[int, int, int, int]:
        boxes = self.aligner.detect(crop)
        return boxes[0] if boxes else CANONICAL_CROP_BOX

    def _fit(self, crop: np.ndarray, box):
        return self._shape(np.ascontiguousarray(crop), self._dlib.rectangle(*box))

    def landmarks(self, crop: np.ndarray, box) -> np.ndarray:
        """(68, 2) float64 landmarks of an RGB uint8 crop inside ``box``."""
        return np.array([(p.x, p.y) for p in self._fit(crop, box).parts()], np.float64)

    def descriptor(self, crop: np.ndarray, box) -> np.ndarray:
        """128-d dlib face descriptor of an RGB uint8 crop."""
        img = np.ascontiguousarray(crop)
        return np.asarray(self._rec.compute_face_descriptor(img, self._fit(img, box)), np.float64)
