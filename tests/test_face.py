"""Face front-end (engine/face.py, engine/image_io.py) on real images: the scikit-image
astronaut everywhere, and with shared/ the 60 photos in faces/ and the 300 frames of the
4 GRID clips. Numbers worth reading are printed (run with -s)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from avatar_stream.engine.face import (
    ALIGN_POINTS,
    CANONICAL_LANDMARKS_112,
    CROP_SIZE,
    MIRROR_68,
    TEMPLATE_CHIN_Y,
    TEMPLATE_EYE_Y,
    FaceAligner,
    FaceError,
    MultipleFacesWarning,
    apply_transform,
    canonical_template,
    lower_face_mask,
    mean_shape,
    paste_back,
    read_image,
    similarity_transform,
)

ALIGN = list(ALIGN_POINTS)


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _landmark_error(face) -> tuple[float, float]:
    """Mean distance (crop px) to the template: over ALIGN_POINTS, and over all 68 points."""
    d = np.linalg.norm(face.crop_landmarks - CANONICAL_LANDMARKS_112, axis=1)
    return float(d[ALIGN].mean()), float(d.mean())


def _check_aligned(face, image_shape) -> None:
    assert face.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and face.crop.dtype == np.uint8
    assert face.matrix.shape == (2, 3) and face.matrix.dtype == np.float64
    assert face.landmarks.shape == face.crop_landmarks.shape == (68, 2)
    np.testing.assert_allclose(apply_transform(face.matrix, face.landmarks), face.crop_landmarks)
    left, top, right, bottom = face.box
    assert 0 <= left < right and 0 <= top < bottom and right <= image_shape[1] + 40


# ------------------------------------------------------------------ geometry


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, (21, 2))
    angle, scale, shift = 0.3, 0.37, np.array([12.5, -40.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, np.hstack([scale * rot, shift[:, None]]), atol=1e-9)
    # A mirrored target must still give a rotation (det > 0), never a reflection.
    assert np.linalg.det(similarity_transform(src, dst * [-1, 1])[:, :2]) > 0


def test_template_layout():
    t = CANONICAL_LANDMARKS_112
    assert t.shape == (68, 2) and not t.flags.writeable
    assert abs(t[36:48, 1].mean() - TEMPLATE_EYE_Y) < 0.01 and abs(t[8, 1] - TEMPLATE_CHIN_Y) < 0.01
    assert 40 <= TEMPLATE_EYE_Y <= 46 and 94 <= TEMPLATE_CHIN_Y <= 100
    assert t[:, 0].min() > 8 and t[:, 0].max() < CROP_SIZE - 8 and t[:, 1].min() > 8 and t[:, 1].max() < 106
    # Mirror-symmetric about the middle column; MIRROR_68 is an involution.
    assert sorted(MIRROR_68) == list(range(68)) and all(MIRROR_68[MIRROR_68[i]] == i for i in range(68))
    np.testing.assert_allclose(t[list(MIRROR_68)] * [-1, 1] + [CROP_SIZE - 1, 0], t, atol=0.011)
    # The AU classifier reads rows 56:112: mouth and jaw must be in there.
    assert t[48:68, 1].min() > 56 and t[4:13, 1].min() > 56


def test_lower_face_mask_covers_mouth_and_jaw_only():
    m = lower_face_mask()
    assert m.shape == (CROP_SIZE, CROP_SIZE) and m.dtype == np.float32 and not m.flags.writeable
    assert m.min() == 0.0 and m.max() == 1.0
    t = np.round(CANONICAL_LANDMARKS_112).astype(int)
    assert (m[t[48:68, 1], t[48:68, 0]] == 1.0).all(), "mouth must be fully inside"
    assert (m[t[3:14, 1], t[3:14, 0]] > 0).all(), "jaw line must be covered"
    assert (m[: int(t[36:48, 1].max()) + 3] == 0).all(), "eyes and above stay the photo's own"
    border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
    assert (border == 0).all(), "crop edges must never show"
    # Feathered: between 0 and 1 there are intermediate values on every side.
    assert ((m > 0.1) & (m < 0.9)).sum() > 200


# ------------------------------------------------------------------ image loading


def test_read_image_formats(astronaut, tmp_path):
    pil = Image.fromarray(astronaut)
    gray = np.asarray(pil.convert("L"))
    rgba = np.dstack([astronaut, np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))])

    def pil_rgb(data: bytes) -> np.ndarray:  # reference decoder for the lossy cases
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    gray_jpg = _encode(pil.convert("L"), "JPEG", quality=95)
    cmyk_jpg = _encode(pil.convert("CMYK"), "JPEG", quality=95)
    cases = {  # name: (encoded file, expected RGB or None, tolerance)
        "rgb.png": (_encode(pil, "PNG"), astronaut, 0),
        "gray.png": (_encode(pil.convert("L"), "PNG"), np.dstack([gray] * 3), 0),
        "gray.jpg": (gray_jpg, pil_rgb(gray_jpg), 1),
        "gray16.png": (
            cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
            np.dstack([gray] * 3),
            0,
        ),
        "rgb16.png": (
            cv2.imencode(".png", (astronaut.astype(np.uint16) * 257)[:, :, ::-1])[1].tobytes(),
            astronaut,
            0,
        ),
        "palette.png": (_encode(pil.convert("P"), "PNG"), np.asarray(pil.convert("P").convert("RGB")), 0),
        # CMYK: OpenCV's libjpeg conversion must agree with Pillow's.
        "cmyk.jpg": (cmyk_jpg, pil_rgb(cmyk_jpg), 3),
        "rgba.png": (_encode(Image.fromarray(rgba), "PNG"), None, 0),
        "la.png": (_encode(Image.fromarray(np.dstack([gray, rgba[:, :, 3]]), "LA"), "PNG"), None, 0),
    }
    for name, (data, expected, tol) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        img = read_image(path)
        assert img.shape == (512, 512, 3) and img.dtype == np.uint8, name
        np.testing.assert_array_equal(img, read_image(data), err_msg=name)  # bytes == path
        if expected is not None:
            assert np.abs(img.astype(int) - expected).max() <= tol, name
    # Alpha is composited on white: transparent column 0 is white, opaque column 511 is the photo.
    out = read_image(tmp_path / "rgba.png")
    assert (out[:, 0] == 255).all()
    np.testing.assert_array_equal(out[:, -1], astronaut[:, -1])
    expect = np.rint(astronaut * (rgba[:, :, 3:] / 255.0) + 255 * (1 - rgba[:, :, 3:] / 255.0))
    assert np.abs(out.astype(int) - expect).max() <= 1
    la = read_image(tmp_path / "la.png")
    assert (la[:, 0] == 255).all() and (la[..., 0] == la[..., 1]).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_exif_orientation(astronaut, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(astronaut[:400, :300]), "JPEG", quality=95, exif=exif.tobytes())
    # Reference: OpenCV's own IMREAD_COLOR path, which applies the orientation.
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(data), ref)


@pytest.mark.parametrize("name", ["gray.jpg", "rgba.png", "cmyk.jpg"])
def test_unusual_formats_align(astronaut, aligner, tmp_path, name):
    pil = Image.fromarray(astronaut)
    make = {
        "gray.jpg": lambda: _encode(pil.convert("L"), "JPEG", quality=90),
        "rgba.png": lambda: _encode(pil.convert("RGBA"), "PNG"),
        "cmyk.jpg": lambda: _encode(pil.convert("CMYK"), "JPEG", quality=90),
    }
    (tmp_path / name).write_bytes(make[name]())
    face = aligner.align(read_image(tmp_path / name), name=name)
    _check_aligned(face, (512, 512))
    assert _landmark_error(face)[0] < 3.0


# ------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(FaceError, match=r"image file not found: .*nope\.jpg: pass the path"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(FaceError, match="is a directory"):
        read_image(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", np.random.default_rng(1).bytes(5000), b"\xff\xd8\xff\xe0" + b"\0" * 64]
)
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(FaceError) as err:
        read_image(path)
    msg = str(err.value)
    assert str(path) in msg and "not an image OpenCV can read" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_no_face(aligner, kind):
    img = np.full((300, 400, 3), 128, np.uint8)
    if kind == "noise":
        img = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(FaceError, match=r"^no face found in empty\.png: use a well-lit, frontal photo"):
        aligner.align(img, name="empty.png")


def test_face_too_small(astronaut, aligner):
    small = cv2.resize(astronaut, (200, 200), interpolation=cv2.INTER_AREA)
    with pytest.raises(FaceError) as err:
        aligner.align(small, name="small.jpg")
    found = re.search(r"the face in small\.jpg is (\d+) px wide, below the minimum of 40 px", str(err.value))
    assert found and int(found.group(1)) < 40, str(err.value)
    with pytest.raises(FaceError, match=r"is \d+ px wide, below the minimum of 150 px"):
        FaceAligner(min_face=150).align(astronaut)


def test_several_faces(astronaut, aligner):
    # Two astronauts side by side, the right one smaller: the left one is the largest.
    two = np.full((512, 922, 3), 255, np.uint8)
    two[:, :512] = astronaut
    two[51:461, 512:] = cv2.resize(astronaut, (410, 410), interpolation=cv2.INTER_AREA)
    with pytest.warns(
        MultipleFacesWarning, match=r"2 faces found in two\.jpg; using the largest.*--face-index N"
    ):
        first = aligner.align(two, name="two.jpg")
    assert first.box[2] < 512
    second = aligner.align(two, face_index=1)
    assert second.box[0] > 512
    # Same person: the two crops agree (the second is the smaller copy of the same face).
    assert _psnr(first.crop, second.crop) > 24
    with pytest.raises(FaceError, match=r"--face-index 5 is out of range: 2 face\(s\) found .*0\.\.1"):
        aligner.align(two, face_index=5)


def test_bad_array_and_missing_model(astronaut, tmp_path):
    with pytest.raises(FaceError, match=r"must be an RGB uint8 \(H, W, 3\) array, got float32"):
        FaceAligner().align(astronaut.astype(np.float32))
    with pytest.raises(FaceError, match="68-landmark model not found at .*missing.dat"):
        FaceAligner(predictor_path=tmp_path / "missing.dat")


# ------------------------------------------------------------------ alignment, paste back


def test_astronaut_aligns(astronaut, aligner):
    t0 = time.perf_counter()
    face = aligner.align(astronaut)
    elapsed = time.perf_counter() - t0
    _check_aligned(face, astronaut.shape)
    err_align, err_all = _landmark_error(face)
    print(
        f"\nastronaut: align {elapsed * 1000:.0f} ms, landmark error {err_align:.2f} px (eyes+nose), {err_all:.2f} px (68)"
    )
    assert err_align < 2.0 and err_all < 4.0
    # Scale consistency: the same photo at twice the size gives the same crop.
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    face2 = aligner.align(big)
    assert _psnr(face.crop, face2.crop) > 28
    np.testing.assert_allclose(face2.matrix[:, :2] * 2, face.matrix[:, :2], rtol=0.03, atol=0.01)


def test_predictor_is_loaded_once():
    a, b = FaceAligner(), FaceAligner()
    assert a._predictor is b._predictor


def _mask_in_image(face, shape) -> np.ndarray:
    inv = cv2.invertAffineTransform(face.matrix)
    return cv2.warpAffine(lower_face_mask(), inv, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)


def test_paste_back_roundtrip(astronaut, aligner):
    face = aligner.align(astronaut)
    out = paste_back(astronaut, face.crop, face.matrix)
    assert out.shape == astronaut.shape and out.dtype == np.uint8 and out is not astronaut
    inside = _mask_in_image(face, astronaut.shape) > 0
    assert inside.sum() > 2000
    np.testing.assert_array_equal(out[~inside], astronaut[~inside])
    psnr = _psnr(out[inside], astronaut[inside])
    print(f"\nastronaut paste-back PSNR in the mask: {psnr:.1f} dB")
    assert psnr > 25


def test_paste_back_touches_only_the_mask(astronaut, aligner):
    face = aligner.align(astronaut)
    red = np.zeros_like(face.crop)
    red[..., 0] = 255
    out = paste_back(astronaut, red, face.matrix)
    alpha = _mask_in_image(face, astronaut.shape)
    np.testing.assert_array_equal(out[alpha == 0], astronaut[alpha == 0])
    assert (out[alpha == 1] == [255, 0, 0]).all()
    changed = (out != astronaut).any(axis=2)
    assert changed.sum() > 0.9 * (alpha > 0).sum()
    # A zero mask changes nothing; a full mask changes nothing outside the crop's footprint.
    np.testing.assert_array_equal(paste_back(astronaut, red, face.matrix, np.zeros((112, 112))), astronaut)
    full = paste_back(astronaut, red, face.matrix, np.ones((112, 112), np.float32))
    foot = cv2.warpAffine(np.ones((112, 112), np.float32), cv2.invertAffineTransform(face.matrix), (512, 512))
    np.testing.assert_array_equal(full[foot == 0], astronaut[foot == 0])


def test_engine_face_does_not_import_torch():
    code = "import sys, avatar_stream.engine.face; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------ real data (shared/)


@pytest.fixture(scope="module")
def photos(shared_data, aligner):
    """Align all 60 photos once: {name: AlignedFace}, {name: error message}, image, seconds."""
    faces, failures, images, seconds = {}, {}, {}, {}
    for path in sorted((shared_data / "faces").glob("*.jpg")):
        images[path.name] = read_image(path)
        t0 = time.perf_counter()
        try:
            faces[path.name] = aligner.align(images[path.name], name=path.name)
        except FaceError as e:
            failures[path.name] = str(e)
        seconds[path.name] = time.perf_counter() - t0
    return faces, failures, images, seconds


@pytest.mark.shared
def test_all_photos_align(photos):
    faces, failures, images, seconds = photos
    assert len(faces) + len(failures) == 60
    assert not failures, "photos that did not align:\n" + "\n".join(f"{k}: {v}" for k, v in failures.items())
    errors = np.array([_landmark_error(f) for f in faces.values()])
    worst = max(faces, key=lambda k: _landmark_error(faces[k])[1])
    t = np.array(list(seconds.values())) * 1000
    print(
        f"\n60 photos: landmark error vs template {errors[:, 0].mean():.2f} px eyes+nose "
        f"(max {errors[:, 0].max():.2f}), {errors[:, 1].mean():.2f} px all 68 (max {errors[:, 1].max():.2f}, {worst}); "
        f"detect+align {t.mean():.0f} ms mean, {t.max():.0f} ms max"
    )
    for name, face in faces.items():
        _check_aligned(face, images[name].shape)
    assert errors[:, 0].mean() < 2.0 and errors[:, 1].mean() < 4.0
    assert errors[:, 0].max() < 5.0 and errors[:, 1].max() < 10.0
    # The AU classifier reads rows 56:112: every mouth and chin must land there.
    cl = np.stack([f.crop_landmarks for f in faces.values()])
    assert cl[:, 48:68, 1].min() > 56 and cl[:, 8, 1].max() < CROP_SIZE


@pytest.mark.shared
def test_photos_paste_back(photos):
    faces, _, images, _ = photos
    psnrs = {}
    for name, face in faces.items():
        image = images[name]
        out = paste_back(image, face.crop, face.matrix)
        inside = _mask_in_image(face, image.shape) > 0
        np.testing.assert_array_equal(out[~inside], image[~inside], err_msg=name)
        psnrs[name] = _psnr(out[inside], image[inside])
    worst = min(psnrs, key=psnrs.get)
    print(
        f"\npaste-back PSNR in the mask: mean {np.mean(list(psnrs.values())):.1f} dB, min {psnrs[worst]:.1f} ({worst})"
    )
    assert psnrs[worst] > 25


@pytest.mark.shared
def test_template_matches_faces_mean_shape(photos):
    faces, _, _, _ = photos
    template = canonical_template(mean_shape(np.stack([f.landmarks for f in faces.values()])))
    diff = np.abs(template - CANONICAL_LANDMARKS_112).max()
    assert diff < 0.02, f"CANONICAL_LANDMARKS_112 is {diff:.3f} px off the photos' mean shape: regenerate it"


def _grid_frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.shared
def test_grid_every_frame_aligns(shared_data, aligner):
    clips = sorted((shared_data / "grid_dev").glob("*.mpg"))
    assert len(clips) == 4
    total_s, n, errors = 0.0, 0, []
    for clip in clips:
        frames = _grid_frames(clip)
        assert len(frames) == 75 and frames[0].shape == (288, 360, 3)
        t0 = time.perf_counter()
        faces = [aligner.align(f, name=f"{clip.name} frame {i}") for i, f in enumerate(frames)]
        total_s += time.perf_counter() - t0
        n += len(faces)
        for f in faces:
            _check_aligned(f, frames[0].shape)
            errors.append(_landmark_error(f))
        cl = np.stack([f.crop_landmarks for f in faces])
        assert cl[:, 48:68, 1].min() > 56 and cl[:, 8, 1].max() < CROP_SIZE, clip.name
        # Speech moves the mouth, not the crop: the eyes stay put within a pixel or two.
        assert cl[:, 36:48].std(axis=0).mean() < 1.0, clip.name
    errors = np.array(errors)
    print(
        f"\nGRID: {n} frames aligned, {1000 * total_s / n:.1f} ms/frame ({total_s:.1f} s); landmark error "
        f"{errors[:, 0].mean():.2f} px eyes+nose, {errors[:, 1].mean():.2f} px all 68"
    )
    assert errors[:, 0].mean() < 2.0


@pytest.mark.shared
def test_align_video_matches_per_frame_and_bridges_misses(shared_data, aligner):
    frames = _grid_frames(shared_data / "grid_dev" / "lrwp9a.mpg")[:30]
    ref = aligner.align_video(frames)
    assert len(ref) == 30
    for i in (0, 17, 29):
        single = aligner.align(frames[i])
        np.testing.assert_allclose(ref[i].matrix, single.matrix)
        np.testing.assert_array_equal(ref[i].crop, single.crop)
    # A frame too dark for the detector borrows the nearest frame's box.
    frames[10] = (frames[10] * 0.05).astype(np.uint8)
    assert aligner.detect(frames[10]) == []
    out = aligner.align_video(frames)
    assert out[10].box == ref[9].box
    np.testing.assert_allclose(out[11].matrix, ref[11].matrix)
    with pytest.raises(FaceError, match=r"no face found in any of the 3 frames of clip\.mpg"):
        aligner.align_video([np.zeros((288, 360, 3), np.uint8)] * 3, name="clip.mpg")
