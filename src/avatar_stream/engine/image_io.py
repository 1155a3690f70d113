"""Reading user photos into the project's one image format: RGB ``uint8`` ``(H, W, 3)``.

OpenCV decodes everything (``IMREAD_UNCHANGED`` so that alpha and 16-bit depth survive
and can be converted deliberately). Two things ``IMREAD_UNCHANGED`` does not do are done
here: the EXIF orientation of JPEGs is applied (phone photos are stored sideways and
rely on it), and transparency is composited on white instead of exposing whatever
colour the transparent pixels happen to hold. CMYK JPEGs need nothing: libjpeg in
OpenCV converts them to BGR (checked against Pillow in tests/test_face.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from avatar_stream.errors import AvatarError


class FaceError(AvatarError, ValueError):
    """A user-facing problem with a face image; the message is one actionable line."""


def read_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """Decode an image file (path) or encoded bytes to RGB ``uint8`` ``(H, W, 3)``.

    Grayscale is replicated to three channels, 16-bit and float images are scaled to
    8 bits, alpha is composited on white, palette images are expanded, and the EXIF
    orientation of JPEGs is applied. Raises ``FaceError`` for a missing file or data
    that is not an image OpenCV can decode.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "the image bytes"
    else:
        path = Path(source)
        if not path.is_file():
            what = (
                f"{path} is a directory, not an image file"
                if path.is_dir()
                else f"image file not found: {path}"
            )
            raise FaceError(f"{what}: pass the path of a JPEG or PNG photo")
        # read_bytes + imdecode, not cv2.imread: imread fails silently on non-ASCII paths.
        data, name = path.read_bytes(), str(path)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None or img.size == 0:
        raise FaceError(
            f"{name} is not an image OpenCV can read (corrupt, truncated or an unsupported "
            "format): save the photo as JPEG or PNG and try again"
        )
    rgb = _to_rgb8(img, name)
    return _apply_orientation(rgb, _jpeg_exif_orientation(data))


def _to_rgb8(img: np.ndarray, name: str) -> np.ndarray:
    """OpenCV's decoded array (any depth; 1, 3 or 4 channels, BGR order) -> RGB uint8."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels not in (1, 3, 4):
        raise FaceError(f"{name} has {channels} colour channels: save it as an RGB JPEG or PNG")
    if img.dtype == np.uint8 and channels != 4:
        # Fast path for the usual 8-bit opaque photo: no float round trip.
        code = cv2.COLOR_GRAY2RGB if channels == 1 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(img, code)
    unit = _to_unit_float(img, name)
    if channels == 1:
        rgb = np.repeat(unit[:, :, None], 3, axis=2)
    else:
        rgb = unit[:, :, 2::-1]  # BGR(A) -> RGB
        if channels == 4:
            alpha = unit[:, :, 3:4]
            rgb = rgb * alpha + (1.0 - alpha)  # composite on white
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _to_unit_float(img: np.ndarray, name: str) -> np.ndarray:
    """Scale an integer or float image to float32 in [0, 1] by its type's full range."""
    if img.dtype in (np.uint8, np.uint16):
        return img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    if img.dtype in (np.float32, np.float64):
        # HDR / float TIFF: assume linear [0, 1] display range and clip the rest.
        return np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0)
    raise FaceError(
        f"{name} has {img.dtype} pixels, which are not supported: save it as an 8-bit JPEG or PNG"
    )


# EXIF orientation value -> the numpy operation that turns the stored pixels upright.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 CCW -> rotate 90 CW
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # stored rotated 90 CW -> rotate 90 CCW
}


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    op = _ORIENT.get(orientation)
    return rgb if op is None else np.ascontiguousarray(op(rgb))


def _jpeg_exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, 1 where absent or not a JPEG.

    Walks the JPEG marker segments up to the start of scan; metadata always precedes it.
    """
    if data[:2] != b"\xff\xd8":
        return 1
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 1  # not at a marker: malformed header, leave the image as stored
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no metadata follows
            return 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length field
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + seg_len])
        i += 2 + seg_len
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation (tag 0x0112) from IFD0 of an EXIF TIFF block; 1 if absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            # A SHORT value sits left-justified in the 4-byte value field.
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


# Channel spread (max - min of R, G, B) up to which a pixel counts as gray: JPEG's chroma
# rounding leaves a gray photo a level or two off.
GRAY_SPREAD = 3


def is_grayscale(image: np.ndarray, share: float = 0.995) -> bool:
    """Whether an RGB ``uint8`` image is a gray photo (``share`` of its pixels within
    ``GRAY_SPREAD`` levels across channels): its generated faces must stay gray."""
    img = image[::4, ::4].astype(np.int16)  # a sample is enough, and keeps this cheap on big photos
    spread = img.max(2) - img.min(2)
    return bool((spread <= GRAY_SPREAD).mean() >= share)


def to_gray_rgb(image: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` -> the same image in gray (three equal channels, ITU-R 601 luma)."""
    return cv2.cvtColor(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
