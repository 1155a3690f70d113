"""The inside of an open mouth, taken from real people: teeth, tongue and the dark cavity.

A photo with closed lips has nothing to show when the warp renderer opens them. Drawing the
inside (a dark polygon, a white band for teeth) reads as fake at once; this module instead
carries a small bank of real mouth interiors (``MouthInterior``), cut from video frames of
one real speaker at several openings, and maps the one whose opening matches into the
opened lips of the photo.

Mouth coordinates ("strip" coordinates): ``u`` runs along the line from the inner-lip corner
60 to the corner 64 (0 to 1), ``v`` from the upper inner lip (0) to the lower inner lip (1) at
that ``u``, the lip curves being Catmull-Rom splines through 60-61-62-63-64 and 60-67-66-65-64.
A texture of ``(H, W)`` pixels samples that square; the same map cuts a texture out of a
real frame (``cut_interior``) and puts it into a rendered mouth (``MouthInterior.paint``).
Each texture is chosen by its opening ``ratio`` (the mean inner-lip gap over the inner
width): a texture is never stretched far from the shape it was cut from, so teeth keep
their proportions.

Colour: a texture is brought to the photo's light by the ratio of the photo's skin luminance
to its source's and a third of the colour cast between them, and made gray for a gray photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

UPPER = (60, 61, 62, 63, 64)
LOWER = (60, 67, 66, 65, 64)
SAMPLES = 64  # points per lip curve


def _spline(points: np.ndarray, n: int = SAMPLES) -> np.ndarray:
    """Open Catmull-Rom curve through ``points`` (K, 2), ``n`` samples, ends included."""
    p = np.asarray(points, np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0, len(p) - 1, n)
    i = np.minimum(t.astype(int), len(p) - 2)
    f = (t - i)[:, None]
    p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
    return 0.5 * (2 * p1 + (p2 - p0) * f + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f**2 + (3 * p1 - p0 - 3 * p2 + p3) * f**3)


@dataclass(frozen=True)
class Strip:
    """The strip frame of one mouth: origin (corner 60), unit axes, inner width ``length``
    and the lips as functions of ``u``: ``upper(u)``, ``lower(u)`` (distances along ``ey``)."""

    origin: np.ndarray
    ex: np.ndarray
    ey: np.ndarray
    length: float
    us: np.ndarray  # increasing u samples in [0, 1]
    up: np.ndarray
    lo: np.ndarray

    @classmethod
    def of(cls, landmarks: np.ndarray) -> Strip | None:
        lm = np.asarray(landmarks, np.float64)
        c0, c1 = lm[60], lm[64]
        length = float(np.linalg.norm(c1 - c0))
        if not np.isfinite(length) or length < 2.0:
            return None
        ex = (c1 - c0) / length
        ey = np.array([-ex[1], ex[0]])
        curves = []
        for idx in (UPPER, LOWER):
            c = _spline(lm[list(idx)]) - c0
            u, d = c @ ex / length, c @ ey
            order = np.argsort(u, kind="stable")
            curves.append((u[order], d[order]))
        us = np.linspace(0.0, 1.0, SAMPLES)
        up = np.interp(us, *curves[0])
        lo = np.interp(us, *curves[1])
        return cls(c0, ex, ey, length, us, up, lo)

    def source_maps(self, height: int, width: int, inset: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
        """(map_x, map_y) float32 (height, width): image points of the texture's pixels
        (``v`` from ``inset`` to ``1 - inset``: the lips' own edge stays out)."""
        u = np.linspace(0.0, 1.0, width)
        v = np.linspace(inset, 1.0 - inset, height)[:, None]
        up, lo = np.interp(u, self.us, self.up), np.interp(u, self.us, self.lo)
        along = (u * self.length)[None, :]
        across = up[None, :] * (1 - v) + lo[None, :] * v
        pts = self.origin + along[..., None] * self.ex + across[..., None] * self.ey
        return pts[..., 0].astype(np.float32), pts[..., 1].astype(np.float32)


def opening_ratio(landmarks: np.ndarray) -> float:
    """Mean inner-lip gap (61-67, 62-66, 63-65) over the inner width (60-64)."""
    lm = np.asarray(landmarks, np.float64)
    gap = np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in ((61, 67), (62, 66), (63, 65))])
    width = np.linalg.norm(lm[64] - lm[60])
    return float(gap / width) if width > 0 else 0.0


def cut_interior(image: np.ndarray, landmarks: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The inside of the mouth of ``image`` as a (height, width, 3) strip texture."""
    strip = Strip.of(landmarks)
    if strip is None:
        return None
    mx, my = strip.source_maps(height, width)
    return cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def skin_colour(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Median RGB of the cheeks-and-nose patch (points 29, 31, 33, 35 and the lip corners'
    cheeks): the light a texture is matched to."""
    lm = np.asarray(landmarks, np.float64)
    m = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(m, [np.round(lm[[29, 31, 33, 35]]).astype(np.int32)], 1)
    px = image[m > 0]
    return np.median(px, 0).astype(np.float64) if len(px) else np.array([180.0, 140.0, 120.0])


class MouthInterior:
    """A bank of strip textures of one real speaker's open mouth, by opening ratio."""

    def __init__(self, textures: np.ndarray, ratios: np.ndarray, skin: np.ndarray, source: str = ""):
        t = np.asarray(textures)
        if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != np.uint8 or len(t) != len(ratios) or not len(t):
            raise ValueError(f"textures must be uint8 (N, H, W, 3) with one ratio each, got {t.shape} / {len(ratios)}")
        order = np.argsort(ratios)
        self.textures = t[order]
        self.ratios = np.asarray(ratios, np.float64)[order]
        self.skin = np.asarray(skin, np.float64)
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> MouthInterior:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["textures"], z["ratios"], z["skin"], str(z["source"]) if "source" in z else "")

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, textures=self.textures, ratios=self.ratios, skin=self.skin,
                            source=np.array(self.source))

    def adapted(self, photo_skin: np.ndarray, gray: bool) -> np.ndarray:
        """The textures in the photo's light (float32, 0-255): scaled by the ratio of the skin
        luminances, and a third of the way towards the photo's colour cast (all of it would
        dye the teeth with the skin's own tone)."""
        luma = np.array([0.299, 0.587, 0.114])
        photo_skin = np.asarray(photo_skin, np.float64)
        level = float(photo_skin @ luma) / max(float(self.skin @ luma), 1.0)
        cast = (photo_skin / max(float(photo_skin @ luma), 1.0)) / (self.skin / max(float(self.skin @ luma), 1.0))
        gain = np.clip(level * cast ** (1.0 / 3.0), 0.3, 2.5)
        out = np.clip(self.textures.astype(np.float32) * gain.astype(np.float32), 0, 255)
        if gray:
            lum = out @ np.array([0.299, 0.587, 0.114], np.float32)
            out = np.repeat(lum[..., None], 3, -1)
        return out

    def pick(self, ratio: float) -> int:
        return int(np.argmin(np.abs(self.ratios - ratio)))


def paint(region: np.ndarray, offset: np.ndarray, landmarks: np.ndarray, texture: np.ndarray,
          alpha: np.ndarray) -> np.ndarray:
    """``region`` (h, w, 3) float32 of the image whose top-left pixel is ``offset`` (x, y),
    with ``texture`` mapped into the inner lips of ``landmarks`` (image coordinates),
    blended by ``alpha`` (h, w) in [0, 1] times the strip's own mask. Returns the new region."""
    strip = Strip.of(landmarks)
    if strip is None:
        return region
    h, w = region.shape[:2]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    rel = np.stack([gx + offset[0], gy + offset[1]], -1) - strip.origin
    u = (rel @ strip.ex) / strip.length
    d = rel @ strip.ey
    up, lo = np.interp(u, strip.us, strip.up), np.interp(u, strip.us, strip.lo)
    gap = lo - up
    ok = (u >= 0) & (u <= 1) & (gap > 0.5)
    v = np.where(ok, (d - up) / np.where(ok, gap, 1.0), -1.0)
    th, tw = texture.shape[:2]
    mx = (np.clip(u, 0, 1) * (tw - 1)).astype(np.float32)
    my = (np.clip(v, 0, 1) * (th - 1)).astype(np.float32)
    tex = cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Soft edge: full weight a pixel inside either lip line, none a pixel outside.
    edge = np.clip(np.minimum(d - up, lo - d) + 0.5, 0.0, 1.0) * ok
    a = (alpha * edge).astype(np.float32)[..., None]
    return region * (1 - a) + tex * a


__all__ = ["MouthInterior", "Strip", "cut_interior", "opening_ratio", "paint", "skin_colour"]
