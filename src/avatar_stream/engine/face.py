"""Face front-end: dlib HOG detection, 68 landmarks, similarity alignment to the canonical
112x112 crop, and pasting a generated crop back with a feathered lower-face mask.

One function serves user photos and video frames (GRID is 360x288). The alignment is a
similarity (rotation, uniform scale, translation) fitted by least squares on the eyes and
the nose only: those points do not move when the person speaks, so in a video the crop
stays fixed to the head while the mouth and jaw move inside it. The mouth corners, which
stretch with AU20 and AU14, would pull the crop along with the speech.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from avatar_stream.engine.image_io import FaceError, read_image

__all__ = [
    "ALIGN_POINTS",
    "CANONICAL_LANDMARKS_112",
    "CROP_SIZE",
    "AlignedFace",
    "FaceAligner",
    "FaceError",
    "MIRROR_68",
    "MultipleFacesWarning",
    "PhotoDetail",
    "apply_transform",
    "canonical_template",
    "default_predictor_path",
    "draw_landmarks",
    "lower_face_mask",
    "mean_shape",
    "paste_back",
    "paste_box",
    "read_image",
    "similarity_transform",
    "warp_to_crop",
]

CROP_SIZE = 112

# iBUG 300-W 68-point scheme: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67.
ALIGN_POINTS: tuple[int, ...] = tuple(range(27, 36)) + tuple(range(36, 48))
# Index of the left-right mirror image of each point (a face seen in a mirror).
MIRROR_68: tuple[int, ...] = (
    tuple(range(16, -1, -1))  # jaw
    + tuple(range(26, 21, -1))
    + tuple(range(21, 16, -1))  # brows
    + (27, 28, 29, 30, 35, 34, 33, 32, 31)  # nose
    + (45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40)  # eyes
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55)  # outer lip
    + (64, 63, 62, 61, 60, 67, 66, 65)  # inner lip
)

# HOG detector score that counts as a confident face. Measured at pyramid level 0: real
# faces scored 0.99 or more on the 60 photos of shared/data/faces and 0.63 or more on all
# 300 GRID frames; the false positives that clothing produces (the patches on the
# astronaut's suit) scored 0.1 to 0.34. Weaker detections are used only where nothing
# stronger exists, so such a false positive neither outranks nor doubles a real face.
STRONG_SCORE = 0.5

# Where the canonical crop puts the face: mid-eye line at row 42, chin (point 8) of the mean
# face at row 96, mirror axis at column 55.5 (pixel centres are integers). Chosen so that
# brows (row 31) to chin fit with margin and rows 56:112, which the AU classifier reads,
# hold the nose tip, mouth and jaw. With the chin at row 100 instead, a long-faced GRID
# speaker opening wide (pwij3p) put the chin at row 112, outside the crop; now <= 108.
TEMPLATE_EYE_Y = 42.0
TEMPLATE_CHIN_Y = 96.0

# The 68-point template of the canonical 112x112 crop, in crop pixel coordinates.
# Produced once by tests/test_face.py::test_template_matches_faces_mean_shape (which also
# checks it) from the 60 photos in shared/data/faces: dlib landmarks of each photo ->
# mean_shape() (generalised Procrustes on ALIGN_POINTS, mirror-symmetrised) ->
# canonical_template(). Four points (x y) per line in index order, rounded to 0.01 px.
# The project does not need shared/ at run time.
_TEMPLATE_ROWS = """
  22.56  42.72     22.84  51.40     23.69  60.12     25.27  68.72    # 0-3
  28.27  76.83     33.33  83.88     39.74  89.83     47.07  94.57    # 4-7
  55.50  96.00     63.93  94.57     71.26  89.83     77.67  83.88    # 8-11
  82.73  76.83     85.73  68.72     87.31  60.12     88.16  51.40    # 12-15
  88.44  42.72     28.88  36.71     32.85  32.72     38.65  31.43    # 16-19
  44.68  32.20     50.38  34.50     60.62  34.50     66.32  32.20    # 20-23
  72.35  31.43     78.15  32.72     82.12  36.71     55.50  41.00    # 24-27
  55.50  46.67     55.50  52.34     55.50  58.22     48.95  62.14    # 28-31
  52.10  63.27     55.50  64.27     58.90  63.27     62.05  62.14    # 32-35
  35.53  42.13     39.00  40.02     43.25  40.06     46.97  42.79    # 36-39
  43.00  43.50     38.81  43.51     64.03  42.79     67.75  40.06    # 40-43
  72.00  40.02     75.47  42.13     72.19  43.51     68.00  43.50    # 44-47
  42.36  72.57     47.27  70.78     52.03  69.85     55.50  70.66    # 48-51
  58.97  69.85     63.73  70.78     68.64  72.57     63.88  76.83    # 52-55
  59.24  78.83     55.50  79.20     51.76  78.83     47.12  76.83    # 56-59
  44.35  72.84     52.01  72.67     55.50  73.04     58.99  72.67    # 60-63
  66.65  72.84     59.09  74.49     55.50  74.94     51.91  74.49    # 64-67
"""
CANONICAL_LANDMARKS_112: np.ndarray = np.array(
    [float(v) for line in _TEMPLATE_ROWS.strip().splitlines() for v in line.split("#")[0].split()], np.float64
).reshape(68, 2)
CANONICAL_LANDMARKS_112.setflags(write=False)


class MultipleFacesWarning(UserWarning):
    """Several faces were found and the largest was used."""


@dataclass(frozen=True)
class AlignedFace:
    """One face cut to the canonical crop.

    crop: (112, 112, 3) uint8 RGB. matrix: (2, 3) float64 similarity, image -> crop
    coordinates. landmarks: (68, 2) float64 in image coordinates; crop_landmarks: the same
    points mapped by ``matrix``. box: the detection box (left, top, right, bottom) in pixels.
    """

    crop: np.ndarray
    matrix: np.ndarray
    landmarks: np.ndarray
    crop_landmarks: np.ndarray
    box: tuple[int, int, int, int]


# ---------------------------------------------------------------------------- geometry


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (no reflection) mapping ``src`` (N, 2) onto ``dst`` (N, 2).

    Umeyama (1991), closed form. Returns the (2, 3) float64 matrix ``[sR | t]``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix)) / float((s0**2).sum() / len(src))
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a (2, 3) affine matrix."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def mean_shape(shapes: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Mean 68-point shape of (N, 68, 2) landmark sets, upright and mirror-symmetric.

    Generalised Procrustes analysis: each shape is similarity-aligned on ALIGN_POINTS to
    the running mean until the mean stops moving. The result is rotated so that the eyes
    are level, averaged with its own mirror image, and normalised to zero mean and unit
    RMS radius over ALIGN_POINTS.
    """
    shapes = np.asarray(shapes, np.float64)
    idx = list(ALIGN_POINTS)
    mean = _normalise(shapes[0], idx)
    for _ in range(iterations):
        aligned = np.stack([apply_transform(similarity_transform(s[idx], mean[idx]), s) for s in shapes])
        new = _normalise(aligned.mean(0), idx)
        done = np.abs(new - mean).max() < 1e-9
        mean = new
        if done:
            break
    left, right = mean[36:42].mean(0), mean[42:48].mean(0)
    angle = np.arctan2(right[1] - left[1], right[0] - left[0])
    c, s = np.cos(-angle), np.sin(-angle)
    upright = mean @ np.array([[c, -s], [s, c]]).T
    mirrored = upright[list(MIRROR_68)] * np.array([-1.0, 1.0])
    return _normalise((upright + mirrored) / 2.0, idx)


def _normalise(shape: np.ndarray, idx: list[int]) -> np.ndarray:
    centred = shape - shape[idx].mean(0)
    return centred / np.sqrt((centred[idx] ** 2).sum(1).mean())


def canonical_template(
    mean: np.ndarray,
    crop_size: int = CROP_SIZE,
    eye_y: float = TEMPLATE_EYE_Y,
    chin_y: float = TEMPLATE_CHIN_Y,
) -> np.ndarray:
    """Place a symmetric mean shape in the crop: eye line at ``eye_y``, chin at ``chin_y``,
    mirror axis in the middle column. Scale and offset follow from those two rows alone."""
    mid_eye_y = mean[36:48, 1].mean()
    scale = (chin_y - eye_y) / (mean[8, 1] - mid_eye_y)
    out = mean * scale
    out[:, 0] += (crop_size - 1) / 2.0 - out[27:31, 0].mean()
    out[:, 1] += eye_y - out[36:48, 1].mean()
    return out


def warp_to_crop(image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Cut the (size, size) crop that ``matrix`` (image -> crop) describes.

    Downscales by more than 2x go through an image pyramid first: bilinear sampling of a
    large photo straight into 112 px would alias (jagged hair, moire on fabric).
    """
    m = np.array(matrix, np.float64)
    scale = np.sqrt(abs(np.linalg.det(m[:, :2])))
    src = image
    while scale < 0.5 and min(src.shape[:2]) >= 4:
        src = cv2.pyrDown(src)  # pixel i of the result is centred on pixel 2i of its input
        m[:, :2] *= 2.0
        scale *= 2.0
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------------------- dlib models


def default_predictor_path() -> Path:
    """Where face-recognition-models keeps the 68-landmark predictor.

    Located with find_spec: importing the package needs pkg_resources, which recent
    setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FaceError(
            "the 68-landmark model is missing: `pip install face-recognition-models` "
            "or pass predictor_path= to shape_predictor_68_face_landmarks.dat"
        )
    return Path(spec.origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"


@functools.lru_cache(maxsize=4)
def _load_predictor(path: str) -> dlib.shape_predictor:
    # Cached per process and path: loading the 100 MB model takes about a second.
    return dlib.shape_predictor(path)


@functools.lru_cache(maxsize=1)
def _detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


# ---------------------------------------------------------------------------- aligner


class FaceAligner:
    """Detects faces (dlib HOG), finds 68 landmarks and cuts the canonical crop.

    ``upsample`` is the most times the image is doubled for detection; levels are tried
    from 0 upward and the first that finds a face wins (a face that level 0 can see costs
    a quarter of the time, and HOG finds faces down to 80 / 2**upsample px).
    ``min_face`` is the smallest accepted face width in pixels.
    Faces are numbered largest first; ``face_index=None`` takes the largest.
    """

    def __init__(
        self, predictor_path: str | os.PathLike | None = None, min_face: int = 40, upsample: int = 1
    ):
        path = Path(predictor_path) if predictor_path is not None else default_predictor_path()
        if not path.is_file():
            raise FaceError(
                f"68-landmark model not found at {path}: `pip install face-recognition-models` "
                "or pass the path of shape_predictor_68_face_landmarks.dat"
            )
        self.predictor_path = path
        self.min_face = int(min_face)
        self.upsample = int(upsample)
        self._predictor = _load_predictor(str(path.resolve()))
        self._detector = _detector()

    def detect(self, image: np.ndarray, name: str = "the image") -> list[tuple[int, int, int, int]]:
        """Face boxes (left, top, right, bottom), largest first.

        Pyramid levels are tried from 0 up to ``upsample`` until one gives a confident
        detection (score >= STRONG_SCORE); weak detections count only where no level gives
        a confident one. Box sizes are quantised per level, so equal sizes are common: ties
        go to the higher score.
        """
        img = _check_image(image, name)
        weak: list[tuple[tuple[int, int, int, int], float]] = []
        for level in range(self.upsample + 1):
            rects, scores, _ = self._detector.run(img, level, 0.0)
            found = [
                ((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in zip(rects, scores, strict=True)
            ]
            strong = [f for f in found if f[1] >= STRONG_SCORE]
            if strong:
                break
            weak = weak or found
        else:
            strong = weak
        strong.sort(key=lambda bs: (-(bs[0][2] - bs[0][0]) * (bs[0][3] - bs[0][1]), -bs[1]))
        return [box for box, _ in strong]

    def landmarks(
        self, image: np.ndarray, face_index: int | None = None, name: str = "the image", subpixel: int = 1
    ) -> np.ndarray:
        """(68, 2) float64 landmarks, image coordinates, of the chosen face.

        dlib returns whole pixels. ``subpixel`` = s > 1 fits the landmarks on the face's region
        upscaled s times (bicubic) and maps them back: a resolution of 1/s px, for measures of
        small moves (a mouth opening by one pixel is about 1% of a 100 px face)."""
        return self._landmarks_and_box(image, face_index, name, subpixel)[0]

    def align(self, image: np.ndarray, face_index: int | None = None, name: str = "the image") -> AlignedFace:
        """Detect, find landmarks and cut the canonical 112x112 crop of one face."""
        points, box = self._landmarks_and_box(image, face_index, name)
        return self._align_points(image, points, box)

    def align_video(self, frames, name: str = "the video") -> list[AlignedFace]:
        """Align every frame of a one-speaker video (an iterable of RGB uint8 frames).

        Detection runs on every frame. A frame where the detector misses the face (blur,
        a blink of the HOG score) reuses the box of the nearest frame that has one: the box
        only seeds the landmark fit, which then runs on the frame itself.
        """
        frames = [_check_image(f, f"frame {i} of {name}") for i, f in enumerate(frames)]
        boxes = [self.detect(f) for f in frames]
        found = [i for i, b in enumerate(boxes) if b]
        if not found:
            raise FaceError(
                f"no face found in any of the {len(frames)} frames of {name}: "
                "use a video with a well-lit, frontal face"
            )
        if any(len(b) > 1 for b in boxes):
            warnings.warn(
                f"several faces in some frames of {name}; using the largest in each frame",
                MultipleFacesWarning,
                stacklevel=2,
            )
        out = []
        for i, frame in enumerate(frames):
            nearest = min(found, key=lambda j: (abs(j - i), j))
            box = boxes[nearest][0]
            self._check_size(box, f"frame {nearest} of {name}")
            out.append(self._align_points(frame, self._fit(frame, box), box))
        return out

    # -- internals

    def _landmarks_and_box(self, image, face_index, name, subpixel=1):
        img = _check_image(image, name)
        boxes = self.detect(img)
        if not boxes:
            raise FaceError(
                f"no face found in {name}: use a well-lit, frontal photo with the whole face "
                f"visible and at least {self.min_face} px wide"
            )
        if face_index is None:
            if len(boxes) > 1:
                w = boxes[0][2] - boxes[0][0]
                warnings.warn(
                    f"{len(boxes)} faces found in {name}; using the largest (index 0, {w} px wide): "
                    f"pass --face-index N (0..{len(boxes) - 1}, largest first) to choose another",
                    MultipleFacesWarning,
                    stacklevel=3,
                )
            face_index = 0
        if not 0 <= face_index < len(boxes):
            raise FaceError(
                f"--face-index {face_index} is out of range: {len(boxes)} face(s) found in {name} "
                f"(use 0..{len(boxes) - 1}, largest first)"
            )
        box = boxes[face_index]
        self._check_size(box, name)
        points = self._fit_subpixel(img, box, int(subpixel)) if subpixel > 1 else self._fit(img, box)
        return points, box

    def _check_size(self, box, name):
        width = box[2] - box[0]
        if width < self.min_face:
            raise FaceError(
                f"the face in {name} is {width} px wide, below the minimum of {self.min_face} px: "
                "use a larger or closer photo of the face"
            )

    def _fit(self, img, box):
        shape = self._predictor(img, dlib.rectangle(*box))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float64)

    def _fit_subpixel(self, img, box, s):
        # The box plus half its size on each side (clamped), upscaled s times; pixel centres
        # map back as x = x0 + (x_s + 0.5) / s - 0.5.
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        cx0, cy0 = max(0, x0 - w // 2), max(0, y0 - h // 2)
        cx1, cy1 = min(img.shape[1], x1 + w // 2), min(img.shape[0], y1 + h // 2)
        region = cv2.resize(img[cy0:cy1, cx0:cx1], None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
        # The box only seeds the fit: scaling its corners without the (s - 1) / 2 px centre
        # offset moves the fitted points by under 0.1 px (measured), the same on every frame.
        scaled = ((x0 - cx0) * s, (y0 - cy0) * s, (x1 - cx0) * s, (y1 - cy0) * s)
        return (self._fit(region, scaled) + 0.5) / s - 0.5 + np.array([cx0, cy0], np.float64)

    def _align_points(self, image, points, box):
        idx = list(ALIGN_POINTS)
        matrix = similarity_transform(points[idx], CANONICAL_LANDMARKS_112[idx])
        crop = warp_to_crop(image, matrix)
        return AlignedFace(crop, matrix, points, apply_transform(matrix, points), tuple(int(v) for v in box))


def _check_image(image, name: str) -> np.ndarray:
    """Boundary check: RGB uint8 (H, W, 3), C-contiguous (dlib needs it)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FaceError(f"{name} must be an RGB uint8 (H, W, 3) array, got {got}: load it with read_image()")
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------- paste back


@functools.lru_cache(maxsize=8)
def _cached_mask(crop_size: int, feather: float) -> np.ndarray:
    scale = crop_size / CROP_SIZE
    t = (CANONICAL_LANDMARKS_112 + 0.5) * scale - 0.5
    centre = np.array([t[27:36, 0].mean(), t[33, 1]])
    # Jaw line pushed out by 6% so that a jaw the generator drops (AU26) is still covered,
    # closed across the face at the middle of the nose (point 29): AU10 moves the upper lip
    # up to the nostrils, while the eyes and everything above stay the photo's own.
    jaw = centre + (t[2:15] - centre) * 1.06
    top_y = t[29, 1]
    poly = np.vstack([[jaw[0, 0], top_y], jaw, [jaw[-1, 0], top_y]])
    hard = np.zeros((crop_size + 2, crop_size + 2), np.uint8)  # 1 px zero border: feather to 0 at the edge
    cv2.fillPoly(hard, [np.round((poly + 1) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    dist = cv2.distanceTransform(hard, cv2.DIST_L2, 5)[1:-1, 1:-1]
    ramp = np.clip(dist / max(feather, 1e-6), 0.0, 1.0)
    mask = (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep: no visible band
    mask.setflags(write=False)
    return mask


def lower_face_mask(crop_size: int = CROP_SIZE, feather: float = 8.0) -> np.ndarray:
    """Float32 (crop_size, crop_size) mask in crop coordinates: 1 over the mouth, cheeks and
    jaw of the canonical face, falling smoothly to exactly 0 over ``feather`` px at its edge
    (and 0 everywhere outside, including the crop border). Read-only; copy to modify."""
    return _cached_mask(int(crop_size), float(feather))


def paste_box(shape, matrix: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1): the image box that the non-zero part of a crop-sized ``mask`` maps to
    through the inverse of ``matrix`` (1 px more for bilinear reach); None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    corners = np.array(
        [
            [xs.min() - 1, ys.min() - 1],
            [xs.max() + 1, ys.min() - 1],
            [xs.min() - 1, ys.max() + 1],
            [xs.max() + 1, ys.max() + 1],
        ],
        np.float64,
    )
    foot = apply_transform(inv, corners)
    h, w = shape[:2]
    x0, y0 = np.maximum(np.floor(foot.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(foot.max(0)).astype(int) + 1, [w, h])
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _to_roi(matrix: np.ndarray, box) -> tuple[np.ndarray, tuple[int, int]]:
    inv = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    inv[:, 2] -= (box[0], box[1])
    return inv, (int(box[2] - box[0]), int(box[3] - box[1]))


@dataclass(frozen=True)
class PhotoDetail:
    """What a 112x112 crop cannot hold of a photo: the photo minus its own crop pasted back
    (everything finer than the crop's pixels), in the paste box, float32. Added back where the
    generated face does not move, it keeps the photo's skin, stubble and lip texture sharp
    at the photo's resolution."""

    box: tuple[int, int, int, int]
    detail: np.ndarray  # (y1 - y0, x1 - x0, 3) float32

    @classmethod
    def of(cls, photo: np.ndarray, matrix: np.ndarray, crop_size: int = CROP_SIZE) -> PhotoDetail | None:
        box = paste_box(photo.shape, matrix, lower_face_mask(crop_size))
        if box is None:
            return None
        to_roi, size = _to_roi(matrix, box)
        own = cv2.warpAffine(warp_to_crop(photo, matrix, crop_size), to_roi, size, flags=cv2.INTER_CUBIC,
                             borderMode=cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = box
        return cls(box, photo[y0:y1, x0:x1].astype(np.float32) - own.astype(np.float32))


def paste_back(
    image: np.ndarray, crop: np.ndarray, matrix: np.ndarray, mask: np.ndarray | None = None,
    detail: PhotoDetail | None = None, keep: np.ndarray | None = None,
) -> np.ndarray:
    """Blend ``crop`` back into a copy of ``image`` through the inverse of ``matrix``.

    ``mask`` (crop-sized float in [0, 1]) defaults to ``lower_face_mask``. The blend is
    computed only inside the image box that the mask's non-zero part maps to, and only
    where the warped mask is non-zero: every other pixel is bit-identical to ``image``.
    ``detail`` (the photo's ``PhotoDetail``, default mask only) is added to the pasted face,
    weighted by ``keep`` (crop-sized float in [0, 1]: 1 where the face is as in the photo,
    0 where it moves; default 1).
    """
    _check_image(image, "image")
    _check_image(crop, "crop")
    n = crop.shape[0]
    if crop.shape[:2] != (n, n) or np.shape(matrix) != (2, 3):
        raise FaceError(
            f"paste_back needs a square crop and a (2, 3) matrix, got {crop.shape} and {np.shape(matrix)}"
        )
    mask = lower_face_mask(n) if mask is None else np.asarray(mask, np.float32)
    if mask.shape != (n, n):
        raise FaceError(f"mask must match the crop size ({n}, {n}), got {mask.shape}")
    out = image.copy()
    box = paste_box(image.shape, matrix, mask)
    if box is None:
        return out
    x0, y0, x1, y1 = box
    to_roi, size = _to_roi(matrix, box)
    face = cv2.warpAffine(crop, to_roi, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(
        mask, to_roi, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    roi = out[y0:y1, x0:x1]
    if detail is not None and detail.box == box:
        weight = np.ones((n, n), np.float32) if keep is None else np.asarray(keep, np.float32)
        w = cv2.warpAffine(weight, to_roi, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        face = cv2.add(face, cv2.multiply(detail.detail, cv2.merge([w, w, w])), dtype=cv2.CV_8U)
    # roi + (face - roi) * alpha in float32, rounded once. Where alpha is 0 the sum is roi
    # exactly, so those pixels come back bit-identical (tests check it). OpenCV does this
    # about twice as fast as the same numpy expression (it matters at 1080p, per frame).
    diff = cv2.subtract(face, roi, dtype=cv2.CV_32F)
    roi[...] = cv2.add(roi, cv2.multiply(diff, cv2.merge([alpha, alpha, alpha])), dtype=cv2.CV_8U)
    return out


def draw_landmarks(image: np.ndarray, points: np.ndarray, color=(0, 255, 0), radius: int = 1) -> np.ndarray:
    """A copy of ``image`` with the points drawn as dots (for demos and debugging)."""
    out = np.ascontiguousarray(image).copy()
    for x, y in np.asarray(points):
        cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1, lineType=cv2.LINE_AA)
    return out
