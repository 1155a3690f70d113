"""From the user's photo to the output picture, once, at load: the work per frame then
depends on the output's size, never on the photo's.

A 12-megapixel phone photo animated at its own size costs tens of milliseconds a frame in
warps and paste-backs alone, and nobody streams 4000x3000 video. So the photo is scaled
(``INTER_AREA``) and framed to the output size before anything else: face detection,
alignment, the warp mesh and every frame are at the output's resolution.

- No size asked for: the photo's own aspect, scaled down so its long side is at most
  ``MAX_SIDE`` px (never up).
- ``size`` with ``fit="crop"`` (the default): the photo covers the output (aspect kept), and
  the window is centred on the face as far as the photo allows; where even then the face
  with a margin would not fit, the photo is scaled down until it does, and the rest is
  filled with the photo's edge colour.
- ``size`` with ``fit="letterbox"``: the whole photo, scaled to fit inside, centred, black bars.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_SIDE = 1280
FITS = ("crop", "letterbox")
FACE_MARGIN = 1.6  # the face box times this must fit in a crop (hair, chin, a little air)


@dataclass(frozen=True)
class Framing:
    """``photo -> output``: scale by ``scale``, then the output's pixel (0, 0) is the scaled
    photo's pixel (``x0``, ``y0``) (negative: the output starts left of / above the photo)."""

    size: tuple[int, int]  # output (width, height)
    scale: float
    x0: int
    y0: int
    fit: str

    @property
    def matrix(self) -> np.ndarray:
        """(2, 3) affine, photo pixel -> output pixel."""
        return np.array([[self.scale, 0.0, -self.x0], [0.0, self.scale, -self.y0]])

    def apply(self, photo: np.ndarray) -> np.ndarray:
        """The output picture (H, W, 3) uint8 of ``photo``."""
        h, w = photo.shape[:2]
        sw, sh = max(1, round(w * self.scale)), max(1, round(h * self.scale))
        scaled = photo if (sw, sh) == (w, h) else cv2.resize(
            photo, (sw, sh), interpolation=cv2.INTER_AREA if self.scale < 1 else cv2.INTER_CUBIC)
        ow, oh = self.size
        left, top = max(0, -self.x0), max(0, -self.y0)
        right, bottom = max(0, self.x0 + ow - sw), max(0, self.y0 + oh - sh)
        if left or top or right or bottom:
            border = cv2.BORDER_CONSTANT if self.fit == "letterbox" else cv2.BORDER_REPLICATE
            scaled = cv2.copyMakeBorder(scaled, top, bottom, left, right, border, value=(0, 0, 0))
        x, y = self.x0 + left, self.y0 + top
        return np.ascontiguousarray(scaled[y : y + oh, x : x + ow])


def plan(photo_shape, face_box=None, size: tuple[int, int] | None = None, fit: str = "crop",
         max_side: int = MAX_SIDE) -> Framing:
    """The framing of a photo of ``photo_shape`` (H, W[, C]) whose face is ``face_box`` =
    (left, top, right, bottom) in photo pixels (None: the photo's centre) into ``size``."""
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}: use {' or '.join(FITS)}")
    h, w = photo_shape[:2]
    if size is None:
        s = min(1.0, max_side / max(h, w))
        return Framing((max(1, round(w * s)), max(1, round(h * s))), s, 0, 0, "crop")
    ow, oh = size
    if ow < 16 or oh < 16:
        raise ValueError(f"output size {ow}x{oh} is too small: give at least 16x16")
    if fit == "letterbox":
        s = min(ow / w, oh / h)
        return Framing(size, s, round((w * s - ow) / 2), round((h * s - oh) / 2), fit)
    s = max(ow / w, oh / h)
    if face_box is None:
        cx, cy, fw, fh = w / 2, h / 2, 0.0, 0.0
    else:
        left, top, right, bottom = face_box
        cx, cy = (left + right) / 2, (top + bottom) / 2
        fw, fh = FACE_MARGIN * (right - left), FACE_MARGIN * (bottom - top)
    if fw * s > ow or fh * s > oh:  # the face would not fit: show it whole, smaller
        s = min(ow / fw, oh / fh)
    sw, sh = w * s, h * s
    # Centre the window on the face, then slide it back inside the photo where the photo
    # is large enough (a window larger than the photo stays centred on the face).
    x0 = cx * s - ow / 2
    y0 = cy * s - oh / 2
    x0 = min(max(x0, 0.0), sw - ow) if sw >= ow else x0
    y0 = min(max(y0, 0.0), sh - oh) if sh >= oh else y0
    return Framing(size, s, round(x0), round(y0), fit)


def find_face_box(photo: np.ndarray, aligner, face_index: int | None = None, detect_side: int = 1024):
    """The chosen face's box in ``photo`` pixels, detected on a copy whose long side is at
    most ``detect_side`` (HOG over a 12-megapixel photo takes seconds); None if none found
    (the caller's alignment then says so in its own words)."""
    h, w = photo.shape[:2]
    s = min(1.0, detect_side / max(h, w))
    small = photo if s == 1.0 else cv2.resize(photo, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    boxes = aligner.detect(np.ascontiguousarray(small))
    if not boxes:
        return None
    i = 0 if face_index is None else face_index
    if not 0 <= i < len(boxes):
        return None
    return tuple(v / s for v in boxes[i])


__all__ = ["FITS", "MAX_SIDE", "Framing", "find_face_box", "plan"]
