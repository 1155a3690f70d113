"""AU-driven face warp: one photo, five action-unit intensities in, the photo with the mouth,
jaw (and optionally eyelids and head) moved out. No learning, no torch.

The 68 landmarks of the photo are moved by the AUs (``warp_landmarks``), the image follows
the landmarks by a piecewise-affine warp over a Delaunay triangulation of the landmarks plus
fixed anchors (a ring around the face and the image border, so hair, background and the
upper face stay put), and the inner mouth is drawn where the lips part: a dark cavity with
the upper teeth under the upper lip. This renders the synthetic training corpus
(training/synth.py, docs/design.md §5) and is a renderer in its own right for predicted AUs.

Movements are expressed in the face's own frame (x along the eye line, y from the eyes to
the chin) in units of the face height H = eye line to chin, so they scale with the photo and
follow a tilted head. The amplitudes at intensity 1 are chosen from what GRID speakers show
in the canonical 112 crop (H = 54 px there): the chin drops 7 to 12 px on wide vowels, the
inner lips part 2 to 5 px on a relaxed open mouth, the corners move out 2 to 4 px on "ee".

Pixel contract: ``render(zeros)`` returns the photo bit-identically, and any render leaves
every pixel outside the triangles with a moving vertex bit-identical too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from avatar_stream.engine.face import AlignedFace, FaceError, apply_transform, warp_to_crop
from avatar_stream.engine.image_io import is_grayscale
from avatar_stream.engine.interior import MouthInterior, opening_ratio, paint, skin_colour
from avatar_stream.engine.mouth import MEASURES, mouth_measures
from avatar_stream.engine.timebase import AU_NAMES
from avatar_stream.engine.warp_mesh import N_BORDER_ANCHORS, anchors, face_mesh, outer_ring, signed_area

__all__ = ["AU_NAMES", "FaceWarper", "WarpRenderer", "face_frame", "mouth_gap", "warp_landmarks"]

N_AU = len(AU_NAMES)
I_AU10, I_AU14, I_AU20, I_AU25, I_AU26 = range(N_AU)

# Movement at intensity 1, in face heights H (y down, x away from the face's midline).
JAW_DROP = 0.16  # AU26: chin
LIP_PART = 0.075  # AU25: inner-lip gap without the jaw
LIP_RAISE = 0.12  # AU10: upper lip centre
STRETCH = 0.2  # AU20: each corner outward, in mouth widths
DIMPLE_IN = 0.18  # AU14: each corner inward, in mouth widths
CORNER_UP = 0.03  # AU14: each corner up (and AU20: down), in H
CREASE = 0.45  # AU14: darkening of the dimple beside each corner at intensity 1
FURROW = 0.35  # AU10: darkening of the nasolabial furrow at intensity 1
BLINK_CLOSE = 0.92  # blink 1: fraction of the lid opening closed (a full close folds triangles)
# au_for_mouth: the share of a mouth opening the jaw makes (AU26); the lips part for the rest
# (AU25). In speech the jaw does most of it.
JAW_SHARE = 0.7

UPPER_INNER, LOWER_INNER = (61, 62, 63), (67, 66, 65)  # pairs face each other across the gap
CORNERS_OUTER, CORNERS_INNER = (48, 54), (60, 64)
INNER_LIP = tuple(range(60, 68))
# Upper-lid points, and the lower-lid contour from corner to corner (x increasing).
EYELIDS = (((37, 38), (36, 41, 40, 39)), ((43, 44), (42, 47, 46, 45)))


def face_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """``(origin, ex, ey, H, W)``: mid-eye point, unit vectors along the eye line and towards
    the chin, face height (eye line to chin, point 8) and mouth width (48 to 54), in pixels."""
    lm = np.asarray(landmarks, np.float64)
    left, right = lm[36:42].mean(0), lm[42:48].mean(0)
    ex = right - left
    ex /= max(np.linalg.norm(ex), 1e-9)
    ey = np.array([-ex[1], ex[0]])
    origin = (left + right) / 2.0
    height = float((lm[8] - origin) @ ey)
    width = float(np.linalg.norm(lm[54] - lm[48]))
    return origin, ex, ey, height, width


def mouth_gap(landmarks: np.ndarray) -> float:
    """Mean inner-lip gap (upper inner lip to lower inner lip, along the face's vertical), px."""
    lm = np.asarray(landmarks, np.float64)
    _, _, ey, _, _ = face_frame(lm)
    return float(np.mean([(lm[lo] - lm[up]) @ ey for up, lo in zip(UPPER_INNER, LOWER_INNER, strict=True)]))


def _check_au(au) -> np.ndarray:
    a = np.asarray(au, np.float64).reshape(-1)
    if a.shape != (N_AU,) or not np.all(np.isfinite(a)):
        raise ValueError(f"au must be {N_AU} finite intensities in AU_NAMES order {AU_NAMES}, got {np.shape(au)}")
    return np.clip(a, 0.0, 1.0)


def _jaw_weights(local: np.ndarray) -> np.ndarray:
    """How far each jaw point (0-16) follows the chin: 0 at points 1/15 (near the hinge,
    below the ear), 1 at the chin, by height on the face (the jaw rotates about the hinge)."""
    v = local[:17, 1]
    top = (v[1] + v[15]) / 2.0
    return np.clip((v - top) / max(v[8] - top, 1e-9), 0.0, 1.0) ** 1.3


def warp_landmarks(landmarks: np.ndarray, au, blink: float = 0.0, head=None) -> np.ndarray:
    """The 68 landmarks moved by ``au`` (5 intensities in [0, 1], AU_NAMES order), ``blink``
    in [0, 1] and optional ``head`` = (dx px, dy px, angle degrees clockwise on screen) about
    the nose tip.

    Everything but the mouth, jaw, nose wings and upper lids stays where it was; all zeros
    return the input unchanged.
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be (68, 2), got {lm.shape}")
    a = _check_au(au)
    origin, ex, ey, h, w = face_frame(lm)
    local = np.stack([(lm - origin) @ ex, (lm - origin) @ ey], 1)
    mid_x = local[27:31, 0].mean()
    side = np.sign(local[:, 0] - mid_x)  # -1 left of the midline, +1 right
    d = np.zeros((68, 2))  # (outward-signed x via `side`, y) displacement in px

    a10, a14, a20, a25, a26 = a
    # AU26: the chin and lower jaw drop, the lower lip rides on the jaw, corners half-way
    # down and slightly in (an open mouth is taller and narrower).
    jaw = JAW_DROP * h * a26
    d[:17, 1] += jaw * _jaw_weights(local)
    for idx, f in (((57, 66), 0.9), ((56, 58, 65, 67), 0.85), ((55, 59), 0.7), ((48, 54, 60, 64), 0.4)):
        d[list(idx), 1] += f * jaw
    d[[48, 54, 60, 64], 0] -= 0.08 * jaw
    # AU25: the lips part without the jaw: mostly the lower lip comes down.
    gap = LIP_PART * h * a25
    for idx, up in (((61, 63), -0.25), ((62,), -0.3), ((65, 67), 0.6), ((66,), 0.7), ((56, 57, 58), 0.35)):
        d[list(idx), 1] += up * gap
    # AU10: the upper lip rises (centre most), the nose wings a little with it.
    rise = LIP_RAISE * h * a10
    for idx, f in (((50, 51, 52), 1.0), ((61, 62, 63), 0.9), ((49, 53), 0.7), ((48, 54, 60, 64), 0.3),
                   ((31, 35), 0.35), ((32, 33, 34), 0.2)):
        d[list(idx), 1] -= f * rise
    # AU20: corners pulled out sideways and a little down; the lips thin.
    st = STRETCH * w * a20
    for idx, f in (((48, 54, 60, 64), 1.0), ((49, 53, 59, 55, 61, 63, 65, 67), 0.5), ((50, 52, 56, 58), 0.2)):
        d[list(idx), 0] += f * st
    d[[48, 54, 60, 64], 1] += CORNER_UP * h * a20
    d[[50, 51, 52], 1] += 0.012 * h * a20
    d[[56, 57, 58], 1] -= 0.012 * h * a20
    # AU14: corners pulled back into the cheek (in, in a frontal view) and a little up, the
    # lip points next to them half as far; the lips tighten (thin) in the middle.
    dim = DIMPLE_IN * w * a14
    for idx, f in (((48, 54, 60, 64), 1.0), ((49, 53, 59, 55, 61, 63, 65, 67), 0.5), ((50, 52, 56, 58), 0.2)):
        d[list(idx), 0] -= f * dim
        d[list(idx), 1] -= f * CORNER_UP * h * a14
    d[[50, 51, 52], 1] += 0.008 * h * a14
    d[[56, 57, 58], 1] -= 0.008 * h * a14
    d[:, 0] *= side  # outward -> image x of the face frame; midline points have no sideways move
    _keep_lips_thick(local, d)
    if blink:
        b = BLINK_CLOSE * float(np.clip(blink, 0.0, 1.0))
        for upper, lower in EYELIDS:
            # Each upper-lid point goes down towards the lower lid right below it (the lower
            # contour interpolated at its x), so it never crosses that contour.
            xs, ys = local[list(lower), 0], local[list(lower), 1]
            for i in upper:
                d[i, 1] += b * (np.interp(local[i, 0], xs, ys) - local[i, 1])
    # Add the displacement rather than rebuild from face coordinates: a zero move is exact.
    out = lm + d[:, :1] * ex + d[:, 1:] * ey
    if head is not None:
        out = apply_transform(_head_matrix(lm, head), out)
    return out


# (outer, inner) lip point pairs, upper lip then lower lip.
_UPPER_LIP_PAIRS = ((49, 61), (50, 61), (51, 62), (52, 63), (53, 63))
_LOWER_LIP_PAIRS = ((59, 67), (58, 67), (57, 66), (56, 65), (55, 65))


def _keep_lips_thick(local: np.ndarray, d: np.ndarray) -> None:
    """Keep each lip at least 40% of its own thickness (in place on ``d``): AUs that move the
    inner lip (AU25, AU10) must not push it through the outer lip of a thin-lipped face,
    which would fold the warp. A move of zero stays zero."""
    for pairs, sign in ((_UPPER_LIP_PAIRS, 1.0), (_LOWER_LIP_PAIRS, -1.0)):
        for outer, inner in pairs:
            thick = sign * (local[inner, 1] - local[outer, 1])
            least = min(0.4 * thick, thick)
            now = sign * (local[inner, 1] + d[inner, 1] - local[outer, 1] - d[outer, 1])
            if now < least:
                d[inner, 1] += sign * (least - now)


def _head_matrix(landmarks: np.ndarray, head) -> np.ndarray:
    dx, dy, angle = (float(v) for v in head)
    centre = tuple(float(v) for v in landmarks[30])
    m = cv2.getRotationMatrix2D(centre, -angle, 1.0)  # cv2: positive = counter-clockwise on screen
    m[:, 2] += (dx, dy)
    return m


@dataclass(frozen=True)
class _Tints:
    cavity: np.ndarray  # RGB float of the mouth cavity
    teeth: np.ndarray  # RGB float of the upper teeth
    tongue: np.ndarray  # RGB float of the tongue, seen low in a wide-open mouth
    crease: float  # darkening of the AU14 dimple at intensity 1


class FaceWarper:
    """One photo prepared for AU rendering.

    ``image``: RGB uint8 (H, W, 3). ``landmarks68``: (68, 2) in image pixels (iBUG order, as
    ``FaceAligner.landmarks`` returns). Preparation (once): anchors and the mesh
    (engine/warp_mesh.py: Delaunay outside the lips, a fixed mesh for the lips and the inner
    mouth), the neutral mouth gap, and the colours of the cavity, tongue and teeth from the
    photo's own lips, skin and (where they show) teeth.
    """

    def __init__(self, image: np.ndarray, landmarks68: np.ndarray, moving_head: bool = False,
                 interior: MouthInterior | None = None, interpolation: int = cv2.INTER_LINEAR,
                 coarse_maps: bool = False):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise FaceError(f"the photo must be RGB uint8 (H, W, 3), got {got}: load it with read_image()")
        lm = np.asarray(landmarks68, np.float64)
        if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
            raise FaceError(f"landmarks must be 68 finite (x, y) points, got {lm.shape}: use FaceAligner.landmarks()")
        self.image = np.ascontiguousarray(image)
        self.landmarks = lm
        # How moved pixels are resampled. The engine uses cubic: a head sway moves the whole
        # face by fractions of a pixel, which bilinear sampling visibly blurs.
        self.interpolation = interpolation
        # The engine's renderers compute the maps of large moves coarsely (``_coarse_maps``);
        # the training corpus keeps them exact.
        self.coarse_maps = coarse_maps
        self.shape = image.shape[:2]
        _, ex, ey, self.face_height, self.mouth_width = face_frame(lm)
        if self.face_height < 8 or self.mouth_width < 4:
            raise FaceError(f"the face is too small to animate ({self.face_height:.0f} px eye-to-chin): use a larger photo")
        self.anchors = anchors(lm, self.shape, ey, self.face_height)
        # The ring around the face: the anchors a head pose moves along with the landmarks.
        self._ring = np.zeros(len(self.anchors), bool)
        self._ring[: len(self.anchors) - N_BORDER_ANCHORS] = moving_head
        if moving_head:
            # A second, fixed ring further out keeps a pose's stretch between the two rings,
            # so the background stays where it is and only the region around the face is redrawn.
            outer = outer_ring(lm, self.shape, ey, self.face_height)
            ring = self.anchors[: len(self.anchors) - N_BORDER_ANCHORS]
            self.anchors = np.vstack([ring, outer, self.anchors[len(ring):]])
            self._ring = np.r_[np.ones(len(ring), bool), np.zeros(len(outer) + N_BORDER_ANCHORS, bool)]
        self.src = np.vstack([lm, self.anchors])
        self.triangles, self.interior = face_mesh(lm, self.anchors, self.shape)
        # Triangles that may fold: all but the inner mouth and those already degenerate.
        area = signed_area(self.src, self.triangles)
        self._checked = self.triangles[~self.interior & (area > 1e-6 * self.face_height**2)]
        # Border anchors close below the chin (a photo cut off under the chin) go down with it,
        # so the jaw never runs into the image border; all other anchors stay put.
        rel = self.anchors - lm[8]
        below, across = rel @ ey, rel @ ex
        follow = np.clip(1.0 - below / (0.6 * self.face_height), 0.0, 1.0) * (below > 0)
        follow *= np.exp(-((across / (0.8 * self.face_height)) ** 2))
        follow[: -N_BORDER_ANCHORS] = 0.0
        self._follow = follow[:, None]
        self.neutral_gap = max(mouth_gap(lm), 0.0)
        self.teeth_show = self.neutral_gap > 0.03 * self.face_height  # lips apart in the photo
        self.gray = is_grayscale(self.image)
        self.tints = self._tints()
        # Real mouth interiors (engine/interior.py) in this photo's light; None: drawn ones.
        self.mouth_bank = interior
        self._interior_tex = interior.adapted(skin_colour(self.image, lm), self.gray) if interior else None
        # A photo that shows its own teeth keeps them (the bank would swap in another person's).
        self.own_teeth = self.teeth_show and self._teeth_visible()
        self.jacobian = self._mouth_jacobian()

    # -- preparation

    def _tints(self) -> _Tints:
        lm = self.landmarks
        lips = self.image[self._mask(lm[48:60], lm[60:68]) > 0]
        skin = self.image[self._mask(lm[[29, 31, 33, 35]]) > 0]
        lip = np.median(lips, 0) if len(lips) else np.array([150.0, 80.0, 80.0])
        sk = np.median(skin, 0) if len(skin) else np.array([180.0, 140.0, 120.0])
        # Light on the face: 1 for a well-lit face (skin luminance ~150), less in shadow.
        light = float(np.clip((0.3 * sk[0] + 0.59 * sk[1] + 0.11 * sk[2]) / 150.0, 0.45, 1.1))
        teeth = np.array([236.0, 228.0, 212.0]) * light
        if self.teeth_show:
            # Teeth already show: take their colour, the brightest quarter of the open mouth.
            inside = self.image[self._mask(lm[60:68]) > 0].astype(np.float64)
            if len(inside) >= 8:
                lum = inside @ np.array([0.3, 0.59, 0.11])
                teeth = inside[lum >= np.percentile(lum, 75)].mean(0)
        cavity = lip * np.array([0.32, 0.16, 0.17])
        tongue = lip * np.array([0.55, 0.28, 0.28])
        teeth = np.clip(teeth, 0, 245)
        if self.gray:  # a gray photo gets a gray mouth: each tint's luminance on all channels
            cavity, tongue, teeth = (np.full(3, float(c @ np.array([0.299, 0.587, 0.114]))) for c in (cavity, tongue, teeth))
        return _Tints(cavity=cavity, teeth=teeth, tongue=tongue, crease=CREASE)

    def _teeth_visible(self) -> bool:
        """Whether the photo's open mouth shows teeth: its brightest quarter is about as light
        as the skin (a dark open mouth shows none)."""
        lm = self.landmarks
        inside = self.image[self._mask(lm[60:68]) > 0].astype(np.float64)
        skin = self.image[self._mask(lm[[29, 31, 33, 35]]) > 0].astype(np.float64)
        if len(inside) < 8 or not len(skin):
            return False
        luma = np.array([0.299, 0.587, 0.114])
        lum = inside @ luma
        return bool(lum[lum >= np.percentile(lum, 75)].mean() >= 0.85 * np.median(skin @ luma))

    def _mask(self, poly: np.ndarray, hole: np.ndarray | None = None) -> np.ndarray:
        m = np.zeros(self.shape, np.uint8)
        cv2.fillPoly(m, [np.round(poly).astype(np.int32)], 1)
        if hole is not None:
            cv2.fillPoly(m, [np.round(hole).astype(np.int32)], 0)
        return m

    # -- rendering

    def render(self, au, blink: float = 0.0, head=None, pose=None) -> np.ndarray:
        """RGB uint8 image at the photo's resolution with the face moved by ``au`` (5 in [0, 1],
        AU_NAMES order), eyelids lowered by ``blink`` in [0, 1], the head alone moved by
        ``pose`` = (dx px, dy px, angle degrees clockwise on screen about the nose tip; needs
        ``moving_head=True``) and the whole picture moved by ``head`` (same units)."""
        a = _check_au(au)
        dst = self.unfold(self.points(a, blink, pose))
        out = self._piecewise_affine(dst)
        self._draw_mouth(out, dst[:68], a)
        if head is not None and any(float(v) != 0.0 for v in head):
            h, w = self.shape
            out = cv2.warpAffine(out, _head_matrix(self.landmarks, head), (w, h),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return out

    def reshape(self, dst: np.ndarray) -> np.ndarray:
        """The photo with the mesh vertices (68 landmarks, then the anchors, as ``src``)
        moved to ``dst``, as far as that folds no triangle (``unfold``); no mouth drawn."""
        dst = np.asarray(dst, np.float64)
        if dst.shape != self.src.shape:
            raise ValueError(f"dst must be {self.src.shape} (landmarks + anchors), got {dst.shape}")
        return self._piecewise_affine(self.unfold(dst))

    def points(self, au, blink: float = 0.0, pose=None) -> np.ndarray:
        """Mesh vertices (68 landmarks, then the anchors) moved by ``au``, ``blink`` and ``pose``."""
        moved = warp_landmarks(self.landmarks, au, blink)
        anchors_ = self.anchors + self._follow * (moved[8] - self.landmarks[8])
        if pose is not None and any(float(v) != 0.0 for v in pose):
            if not self._ring.any():
                raise ValueError("pose needs a FaceWarper made with moving_head=True")
            m = _head_matrix(self.landmarks, pose)
            moved = apply_transform(m, moved)
            anchors_ = anchors_.copy()
            anchors_[self._ring] = apply_transform(m, anchors_[self._ring])
        return np.vstack([moved, anchors_])

    def warp_image(self, image: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Another image of the photo's size (e.g. the photo with a generated face pasted in)
        carried along the mesh moved to ``dst`` (after ``unfold``), as ``reshape`` does the photo."""
        if image.shape != self.image.shape:
            raise ValueError(f"image must have the photo's shape {self.image.shape}, got {image.shape}")
        return self._piecewise_affine(self.unfold(np.asarray(dst, np.float64)), image)

    def _mouth_jacobian(self) -> np.ndarray:
        """(4, 5): change of each mouth measure (engine/mouth.py, IODs) per unit of each AU on
        this face, the secant from 0 to intensity 0.5 (the moves are not quite linear)."""
        base = mouth_measures(self.landmarks)
        cols = []
        for i in range(N_AU):
            a = np.zeros(N_AU)
            a[i] = 0.5
            cols.append((mouth_measures(warp_landmarks(self.landmarks, a)) - base) / 0.5)
        return np.stack(cols, 1)

    def au_for_mouth(self, mouth) -> np.ndarray:
        """AU intensities (5, in [0, 1]) that give this face the mouth ``mouth``: changes of
        ``MEASURES`` (opening, width, jaw, lip height) from the photo's own, in IODs, as the
        mouth head predicts them. The opening is split between the jaw (AU26, ``JAW_SHARE``
        of it) and the lips (AU25, the rest); what is left of the width change after those is
        a stretch (AU20) or a pucker (AU14). A mouth cannot close past the photo's."""
        d = np.asarray(mouth, np.float64).reshape(-1)
        if d.shape != (len(MEASURES),) or not np.all(np.isfinite(d)):
            raise ValueError(f"mouth must be {len(MEASURES)} finite changes {MEASURES}, got {np.shape(mouth)}")
        j = self.jacobian
        op, wi = MEASURES.index("opening"), MEASURES.index("width")
        a = np.zeros(N_AU)
        opening = max(d[op], 0.0)
        a[I_AU26] = np.clip(JAW_SHARE * opening / max(j[op, I_AU26], 1e-6), 0, 1)
        a[I_AU25] = np.clip((opening - a[I_AU26] * j[op, I_AU26]) / max(j[op, I_AU25], 1e-6), 0, 1)
        rest = d[wi] - a[I_AU26] * j[wi, I_AU26] - a[I_AU25] * j[wi, I_AU25]
        if rest > 0 and j[wi, I_AU20] > 1e-6:
            a[I_AU20] = np.clip(rest / j[wi, I_AU20], 0, 1)
        elif rest < 0 and j[wi, I_AU14] < -1e-6:
            a[I_AU14] = np.clip(rest / j[wi, I_AU14], 0, 1)
        return a.astype(np.float32)

    def folds(self, dst: np.ndarray) -> int:
        """How many triangles (outside the inner mouth) ``dst`` turns over."""
        return int((signed_area(dst, self._checked) <= 0).sum())

    def unfold(self, dst: np.ndarray) -> np.ndarray:
        """``dst`` itself, or where it would turn a triangle over (a thin triangle on an unusual
        face, the chin pushed past the image border) the largest fraction of the move from
        the neutral points that folds nothing (bisection to 1/64)."""
        if not self.folds(dst):
            return dst
        lo, hi = 0.0, 1.0
        for _ in range(6):
            mid = (lo + hi) / 2
            if self.folds(self.src + mid * (dst - self.src)):
                hi = mid
            else:
                lo = mid
        return self.src + lo * (dst - self.src)

    def _piecewise_affine(self, dst: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Backward map over the box of the moved triangles: each pixel samples the photo
        (or ``image``) through the affine map (dst -> src) of the triangle that owns it in a
        triangle-id raster; pixels of no moved triangle map onto themselves, which remap copies
        exactly."""
        image = self.image if image is None else image
        out = image.copy()
        moving = np.abs(dst - self.src).max(1) > 1e-9
        active = self.triangles[moving[self.triangles].any(1)]
        if len(active) == 0:
            return out
        h, w = self.shape
        pts = dst[active]  # (M, 3, 2)
        x0, y0 = np.maximum(np.floor(pts.reshape(-1, 2).min(0)).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(pts.reshape(-1, 2).max(0)).astype(int) + 1, (w, h))
        if x1 <= x0 or y1 <= y0:
            return out
        # Pixels on a shared edge go to the triangle drawn last: draw the largest last, so that
        # sliver triangles (inner lips nearly closed) keep only pixels inside them; a sliver's
        # steep affine map would throw a pixel just outside it far across the photo.
        order = np.argsort(np.abs(signed_area(dst, active)), kind="stable")
        labels = np.zeros((y1 - y0, x1 - x0), np.uint16)
        fixed = np.round((pts - (x0, y0)) * 16).astype(np.int32)
        for i in order:
            cv2.fillConvexPoly(labels, fixed[i], int(i) + 1, lineType=cv2.LINE_8, shift=4)
        coef = np.empty((len(active) + 1, 6), np.float32)
        coef[0] = (1, 0, 0, 0, 1, 0)  # label 0: identity
        # src = S^T lam and lam = B [x y 1]: the affine map is S^T B.
        coef[1:] = np.einsum("mkd,mkj->mdj", self.src[active], self._barycentric(pts)).reshape(-1, 6)
        if self.coarse_maps and min(x1 - x0, y1 - y0) >= 64:
            mx, my = self._coarse_maps(labels, coef, x0, y0, dst)
        else:
            mx, my = _maps(labels, coef, x0, y0)
        out[y0:y1, x0:x1] = cv2.remap(image, mx, my, self.interpolation, borderMode=cv2.BORDER_REFLECT_101)
        return out

    def _coarse_maps(self, labels: np.ndarray, coef: np.ndarray, x0: int, y0: int, dst: np.ndarray):
        """The maps of ``_maps`` computed on every other pixel and interpolated, exact again
        around the mouth and the eyes. The map is continuous and affine inside each triangle:
        interpolation errs only within a pixel of an edge between triangles that move
        differently, and those that move most (lips, lids) are computed exactly. A head sway
        moves the whole face every frame; this makes that four times cheaper."""
        h, w = labels.shape
        # Coarse pixel j stands for full-resolution x = 2 j + 0.5, so cv2.resize's linear
        # upscaling by exactly 2 (even sizes: the raster is padded by a pixel where odd) puts
        # every sample back where it belongs.
        even = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
        mx, my = _maps(even[::2, ::2], coef, x0 + 0.5, y0 + 0.5, step=2)
        size = (even.shape[1], even.shape[0])
        mx = cv2.resize(mx, size, interpolation=cv2.INTER_LINEAR)[:h, :w]
        my = cv2.resize(my, size, interpolation=cv2.INTER_LINEAR)[:h, :w]
        lm = dst[:68]
        for idx in (range(48, 68), range(36, 42), range(42, 48)):
            p = lm[list(idx)]
            pad = 0.3 * float(np.ptp(p[:, 0])) + 2
            bx0, by0 = np.maximum(np.floor(p.min(0) - pad).astype(int) - (x0, y0), 0)
            bx1, by1 = np.minimum(np.ceil(p.max(0) + pad).astype(int) + 1 - (x0, y0), (w, h))
            if bx1 > bx0 and by1 > by0:
                ex, ey = _maps(labels[by0:by1, bx0:bx1], coef, x0 + bx0, y0 + by0)
                mx[by0:by1, bx0:bx1], my[by0:by1, bx0:bx1] = ex, ey
        return mx, my

    @staticmethod
    def _barycentric(tri: np.ndarray) -> np.ndarray:
        """(M, 3, 3) matrices B with barycentric coordinates = B @ [x, y, 1] for each
        triangle (M, 3, 2). A degenerate triangle covers no pixel; it gets weight 1 on its
        first vertex."""
        d = np.concatenate([tri, np.ones((len(tri), 3, 1))], 2).transpose(0, 2, 1)  # columns [x y 1]
        ok = np.abs(np.linalg.det(d)) > 1e-9
        out = np.zeros((len(tri), 3, 3))
        out[:, 0, 2] = 1.0
        out[ok] = np.linalg.inv(d[ok])
        return out

    def _draw_mouth(self, out: np.ndarray, lm: np.ndarray, a: np.ndarray) -> None:
        """Cavity and upper teeth inside the inner lips, dimple creases (AU14), nasolabial
        furrows (AU10); in place. The shading is what FACS codes these AUs by besides the
        lip movement, and it makes them visible at their occurrence thresholds, where the
        lips themselves move about a pixel in the 112 crop."""
        h = self.face_height
        opening = mouth_gap(lm) - self.neutral_gap
        if opening > 0.004 * h:
            self._draw_cavity(out, lm, opening)
        if a[I_AU14] > 0:
            self._draw_creases(out, lm, a[I_AU14])
        if a[I_AU10] > 0:
            self._draw_furrows(out, lm, a[I_AU10])

    def _region(self, pts: np.ndarray, pad: float):
        hh, ww = self.shape
        x0, y0 = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(pts.max(0) + pad).astype(int) + 1, (ww, hh))
        return x0, y0, x1, y1

    def _poly_mask(self, size: tuple[int, int], poly: np.ndarray, sigma: float) -> np.ndarray:
        m = np.zeros(size, np.uint8)
        cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
        f = m.astype(np.float32) / 255.0
        return cv2.GaussianBlur(f, (0, 0), sigma) if sigma > 0.3 else f

    def _draw_cavity(self, out: np.ndarray, lm: np.ndarray, opening: float) -> None:
        h = self.face_height
        inner = _closed_spline(lm[60:68])  # lips are curves, not the 8-point polygon
        x0, y0, x1, y1 = self._region(inner, 3)
        if x1 <= x0 or y1 <= y0:
            return
        off = np.array([x0, y0], np.float64)
        size = (y1 - y0, x1 - x0)
        sigma = max(0.004 * h, 0.35)
        cav = self._poly_mask(size, inner - off, sigma) * float(np.clip(opening / (0.025 * h), 0, 1))
        if self._interior_tex is not None and not self.own_teeth:
            # A real mouth's inside, of the opening nearest this one, mapped into the lips
            # (fading in as the lips part beyond the photo's own gap).
            tex = self._interior_tex[self.mouth_bank.pick(opening_ratio(lm))]
            region = paint(out[y0:y1, x0:x1].astype(np.float32), off, lm, tex, cav)
            out[y0:y1, x0:x1] = np.clip(np.rint(region), 0, 255).astype(np.uint8)
            return
        _, ex, ey, _, _ = face_frame(lm)
        gap = opening + self.neutral_gap
        # Upper teeth: a band hanging from the upper inner lip, seen only inside the cavity,
        # its height limited by the opening (the lower lip hides the rest).
        # Where the photo shows its own teeth, they stay where they are (upper teeth sit on the
        # skull; the upper lip hardly moves) and the band is at least as deep as they were.
        upper = lm[[60, 61, 62, 63, 64]]
        depth = min(0.05 * h, 0.6 * gap)
        if self.teeth_show:
            depth = max(depth, 0.45 * self.neutral_gap)
        band = np.vstack([upper, (upper + depth * ey)[::-1]])
        teeth = self._poly_mask(size, band - off, 1.5 * sigma) * cav
        if not self.teeth_show:
            teeth *= float(np.clip((opening - 0.01 * h) / (0.02 * h), 0, 1))
        # Tongue: low in the mouth, visible once the mouth is well open.
        lower = lm[[64, 65, 66, 67, 60]]
        tongue_poly = np.vstack([lower, (lower - 0.25 * gap * ey)[::-1]])
        tongue = self._poly_mask(size, tongue_poly - off, 3 * sigma) * cav
        tongue *= float(np.clip((opening - 0.06 * h) / (0.06 * h), 0, 0.6))
        # Shading: the cavity is darker at the back (middle); teeth and tongue darken towards
        # the corners, where they turn away into the mouth.
        gy, gx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
        rel = np.stack([gx, gy], -1) - (inner.mean(0) - off).astype(np.float32)
        half_w = max(0.5 * float(np.linalg.norm(lm[64] - lm[60])), 1.0)
        across = np.clip(np.abs(rel @ ex.astype(np.float32)) / half_w, 0, 1)
        down = np.clip(np.abs(rel @ ey.astype(np.float32)) / max(0.5 * gap, 1.0), 0, 1)
        cavity_c = self.tints.cavity * (0.55 + 0.45 * np.maximum(across, down))[..., None]
        side = (1.0 - 0.45 * across * across)[..., None]
        # Teeth end at the canines, short of the corners, and sit in the upper lip's shadow.
        teeth *= np.clip((0.92 - across) / 0.3, 0, 1)
        below = np.clip((rel @ ey.astype(np.float32) + 0.5 * gap) / max(0.05 * h, 1.0), 0, 1)
        teeth_c = self.tints.teeth * side * (0.8 + 0.2 * below)[..., None]
        if self.teeth_show:
            teeth_c = self.image[y0:y1, x0:x1].astype(np.float32)
        region = out[y0:y1, x0:x1].astype(np.float32)
        for alpha, colour in ((cav, cavity_c), (tongue, self.tints.tongue * side), (teeth, teeth_c)):
            a3 = alpha[..., None]
            region = region * (1 - a3) + a3 * colour
        out[y0:y1, x0:x1] = np.clip(np.rint(region), 0, 255).astype(np.uint8)

    def _draw_creases(self, out: np.ndarray, lm: np.ndarray, amount: float) -> None:
        h = self.face_height
        _, ex, _, _, _ = face_frame(lm)
        for corner, sign in ((48, -1.0), (54, 1.0)):
            c = lm[corner] + sign * 0.07 * h * ex
            rad = 0.045 * h
            x0, y0, x1, y1 = self._region(c[None], 2.5 * rad)
            if x1 <= x0 or y1 <= y0:
                continue
            gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            g = np.exp(-(((gx - c[0]) ** 2 + (gy - c[1]) ** 2) / (2 * rad * rad)))
            _darken(out, (x0, y0, x1, y1), g, self.tints.crease * float(amount))

    def _draw_furrows(self, out: np.ndarray, lm: np.ndarray, amount: float) -> None:
        """Nasolabial furrows: a soft dark line from above each nose wing, bowed outwards,
        down to beside the mouth corner; darker with ``amount`` (AU10 deepens them)."""
        h = self.face_height
        _, ex, ey, _, _ = face_frame(lm)
        t = np.linspace(0.0, 1.0, 12)[:, None]
        for wing, corner, sign in ((31, 48, -1.0), (35, 54, 1.0)):
            top = lm[wing] + sign * 0.05 * h * ex - 0.04 * h * ey
            end = lm[corner] + sign * 0.05 * h * ex + 0.03 * h * ey
            bow = (top + end) / 2 + sign * 0.035 * h * ex
            curve = (1 - t) ** 2 * top + 2 * t * (1 - t) * bow + t**2 * end
            sigma = max(0.012 * h, 0.5)
            x0, y0, x1, y1 = self._region(curve, 4 * sigma + 2)
            if x1 <= x0 or y1 <= y0:
                continue
            m = np.zeros((y1 - y0, x1 - x0), np.uint8)
            pts = np.round((curve - (x0, y0)) * 16).astype(np.int32)
            cv2.polylines(m, [pts], False, 255, max(int(round(0.015 * h)), 1), cv2.LINE_AA, shift=4)
            g = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), sigma)
            g /= max(float(g.max()), 1e-6)
            _darken(out, (x0, y0, x1, y1), g, FURROW * float(amount))


def _maps(labels: np.ndarray, coef: np.ndarray, x0: float, y0: float, step: int = 1):
    """(map_x, map_y) float32 of a triangle-id raster whose pixel (i, j) is the image point
    (x0 + step j, y0 + step i): each pixel through the affine map ``coef[label]``."""
    sel = coef[labels]  # (h, w, 6)
    gx = (x0 + step * np.arange(labels.shape[1], dtype=np.float32))[None, :].astype(np.float32)
    gy = (y0 + step * np.arange(labels.shape[0], dtype=np.float32))[:, None].astype(np.float32)
    mx = sel[..., 0] * gx + sel[..., 1] * gy + sel[..., 2]
    my = sel[..., 3] * gx + sel[..., 4] * gy + sel[..., 5]
    return mx, my


def _darken(out: np.ndarray, box: tuple[int, int, int, int], weight: np.ndarray, strength: float) -> None:
    """Multiply ``out`` in ``box`` = (x0, y0, x1, y1) by 1 - strength * weight (in place)."""
    x0, y0, x1, y1 = box
    dark = 1.0 - strength * weight[..., None]
    out[y0:y1, x0:x1] = np.clip(np.rint(out[y0:y1, x0:x1] * dark), 0, 255).astype(np.uint8)


def _closed_spline(points: np.ndarray, per_segment: int = 6) -> np.ndarray:
    """Closed Catmull-Rom curve through ``points`` (N, 2), ``per_segment`` samples per edge."""
    p = np.asarray(points, np.float64)
    p0, p1, p2, p3 = np.roll(p, 1, 0), p, np.roll(p, -1, 0), np.roll(p, -2, 0)
    t = (np.arange(per_segment) / per_segment)[:, None, None]
    curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                   + (3 * p1 - p0 - 3 * p2 + p3) * t**3)  # (per_segment, N, 2)
    return curve.transpose(1, 0, 2).reshape(-1, 2)


@functools.cache
def default_interior() -> MouthInterior | None:
    """The bank of real mouth interiors shipped with the package (``assets/mouth_interior.npz``);
    None where an install lacks it (the renderer then draws the inside)."""
    from avatar_stream import ASSETS

    path = ASSETS / "mouth_interior.npz"
    return MouthInterior.load(path) if path.is_file() else None


class WarpRenderer:
    """Engine renderer: drives one aligned photo from AU intensities (e.g. Audio2AU output).

    ``interior``: the bank of real mouth interiors to show when the lips part ("default": the
    one shipped with the package; None: the drawn cavity and teeth of the synthetic corpus).

    ``photo`` RGB uint8 at its own resolution, ``aligned`` its ``FaceAligner.align`` result.
    ``render(au, blink=0, head=None)`` -> the full-resolution photo; ``render_crop(au)`` -> the
    canonical (112, 112, 3) crop of that render through ``aligned.matrix``.
    """

    def __init__(self, photo: np.ndarray, aligned: AlignedFace, moving_head: bool = False,
                 interior: MouthInterior | None | str = "default"):
        if isinstance(interior, str):
            interior = default_interior() if interior == "default" else MouthInterior.load(interior)
        self.aligned = aligned
        self.warper = FaceWarper(photo, aligned.landmarks, moving_head=moving_head, interior=interior,
                                 interpolation=cv2.INTER_CUBIC, coarse_maps=True)

    def render(self, au, blink: float = 0.0, head=None, pose=None) -> np.ndarray:
        return self.warper.render(au, blink, head, pose)

    def render_crop(self, au, blink: float = 0.0) -> np.ndarray:
        return warp_to_crop(self.warper.render(au, blink), self.aligned.matrix)
