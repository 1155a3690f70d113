"""training/metrics.py on hand-made inputs with known answers, and SSIM against scikit-image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from avatar_stream.training.metrics import (
    au_scores,
    cosine_similarity,
    mouth_landmark_distance,
    psnr,
    read_openface_csv,
    ssim,
)


def test_psnr_known_values():
    a = np.zeros((2, 3, 8, 8), np.float32)
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1, :, :4] += 0.5  # half the pixels off by 0.5: MSE 0.125 -> 9.0309 dB
    np.testing.assert_allclose(psnr(b, a), [20.0, 10 * np.log10(8.0)], rtol=1e-6)
    assert psnr(a[:1], a[:1])[0] == np.inf


def test_psnr_uint8_layout_matches_float_layout():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    v = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    f = lambda x: x.transpose(0, 3, 1, 2).astype(np.float64) / 255.0  # noqa: E731
    np.testing.assert_allclose(psnr(u, v), psnr(f(u), f(v)), rtol=1e-12)


@pytest.mark.parametrize("distortion", ["noise", "blur", "shift"])
def test_ssim_matches_skimage(astronaut, distortion):
    rng = np.random.default_rng(1)
    ref = cv2.resize(astronaut[30:250, 140:360], (112, 112), interpolation=cv2.INTER_AREA)
    if distortion == "noise":
        out = np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255).astype(np.uint8)
    elif distortion == "blur":
        out = cv2.GaussianBlur(ref, (7, 7), 2.0)
    else:
        out = np.roll(ref, 3, axis=1)
    ours = ssim(out, ref)[0]
    theirs = structural_similarity(out.astype(np.float64) / 255, ref.astype(np.float64) / 255, channel_axis=-1,
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    assert ours < 0.95  # a real distortion, not a trivially perfect pair


def test_ssim_identical_is_one_and_batch_is_per_image(astronaut):
    ref = cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA)
    dark = (ref // 2).astype(np.uint8)
    s = ssim(np.stack([ref, dark]), np.stack([ref, ref]))
    assert s[0] == pytest.approx(1.0, abs=1e-12)
    assert s[1] < 0.9


def test_au_scores_by_hand():
    # AU10: tp=2 fp=1 fn=1 tn=0 -> F1 = 4/6, acc 2/4. AU14: all correct. AU20: never positive
    # anywhere -> F1 undefined (NaN), acc 1. AU25: all wrong. AU26: one frame masked out.
    labels = np.array([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0], [1, 1, 0, 0, 1], [0, 0, 0, 0, 0]])
    probs = np.array([[0.9, 0.8, 0.1, 0.2, 0.7], [0.6, 0.3, 0.2, 0.1, 0.9],
                      [0.4, 0.9, 0.0, 0.7, 0.2], [0.7, 0.1, 0.3, 0.8, 0.1]])
    valid = np.ones_like(labels, bool)
    valid[1, 4] = False  # a wrong prediction on an unknown label must not count
    s = au_scores(probs, labels, valid)
    np.testing.assert_allclose(s.f1[[0, 1, 3]], [4 / 6, 1.0, 0.0])
    assert np.isnan(s.f1[2])
    np.testing.assert_allclose(s.accuracy, [0.5, 1.0, 1.0, 0.0, 2 / 3])
    np.testing.assert_array_equal(s.count, [4, 4, 4, 4, 3])
    # AU26 without frame 1: tp=1 (frame 0), fn=1 (frame 2), tn=1 -> F1 2/3
    assert s.f1[4] == pytest.approx(2 / 3)
    assert s.mean_f1 == pytest.approx(np.mean([4 / 6, 1.0, 0.0, 2 / 3]))
    d = s.to_dict()
    assert d["per_au"]["AU20"]["f1"] is None and d["per_au"]["AU10"]["frames"] == 4


def test_mouth_landmark_distance_reads_only_the_mouth():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 112, (3, 68, 2))
    b = a.copy()
    b[:, :48] += 50.0  # jaw, brows, nose, eyes: ignored
    b[0, 48:] += (3.0, 4.0)  # every mouth point 5 px away
    b[1, 48:58] += (0.0, 2.0)  # half of the mouth points 2 px away -> mean 1
    np.testing.assert_allclose(mouth_landmark_distance(b, a), [5.0, 1.0, 0.0], atol=1e-12)


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [0.0, 1.0, -1.0], atol=1e-12)


OPENFACE_CSV = """frame, face_id, timestamp, confidence, success, AU10_r, AU14_r, AU20_r, AU25_r, AU26_r, AU10_c, AU14_c, AU20_c, AU25_c, AU26_c
1, 0, 0.00, 0.98, 1, 1.50, 0.00, 6.00, 2.50, 0.50, 1, 0, 1, 1, 0
2, 0, 0.04, 0.97, 1, 0.00, 2.00, 0.00, 0.00, 5.00, 0, 1, 0, 0, 1
2, 1, 0.04, 0.40, 1, 4.00, 4.00, 4.00, 4.00, 4.00, 1, 1, 1, 1, 1
3, 0, 0.08, 0.10, 0, 0.00, 0.00, 0.00, 0.00, 0.00, 0, 0, 0, 0, 0
5, 0, 0.16, 0.95, 1, 5.00, 5.00, 5.00, 5.00, 5.00, 1, 1, 1, 1, 1
"""


def test_read_openface_csv(tmp_path):
    p = tmp_path / "clip.csv"
    p.write_text(OPENFACE_CSV)
    of = read_openface_csv(p)
    np.testing.assert_array_equal(of.frame, [1, 2, 3, 5])
    np.testing.assert_array_equal(of.success, [True, True, False, True])
    np.testing.assert_allclose(of.intensity[0], [0.3, 0.0, 1.0, 0.5, 0.1], rtol=1e-6)  # /5, clipped at 1
    np.testing.assert_allclose(of.intensity[1], [0.0, 0.4, 0.0, 0.0, 1.0], rtol=1e-6)  # confident face kept
    assert np.isnan(of.intensity[2]).all()  # tracking failed
    np.testing.assert_array_equal(of.occurrence[1], [0, 1, 0, 0, 1])
    au, lab = of.for_frames(6)  # video frames 0..5; CSV frame k+1 is video frame k
    assert np.isnan(au[2]).all() and np.isnan(au[3]).all() and np.isnan(au[5]).all()  # failed / absent
    np.testing.assert_array_equal(lab[:, 0], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(au[4], 1.0)


def test_read_openface_csv_rejects_other_files(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("frame, timestamp, gaze_0_x\n1, 0.0, 0.1\n")
    with pytest.raises(ValueError, match="AU10"):
        read_openface_csv(p)


def test_face_metrics_on_a_real_face(astronaut):
    from avatar_stream.engine.face import FaceAligner
    from avatar_stream.training.metrics import FaceMetrics

    fm = FaceMetrics(FaceAligner())
    crop = fm.aligner.align(astronaut).crop
    box = fm.box(crop)
    lm = fm.landmarks(crop, box)
    # Content moved down by 3 px inside the same box: the fitted mouth follows it.
    moved = np.roll(crop, 3, axis=0)
    d = mouth_landmark_distance(fm.landmarks(moved, box)[None], lm[None])[0]
    assert mouth_landmark_distance(lm[None], lm[None])[0] == 0.0
    assert 1.5 < d < 4.5, d
    same = cosine_similarity(fm.descriptor(crop, box)[None], fm.descriptor(crop, box)[None])[0]
    noise = np.random.default_rng(0).integers(0, 256, crop.shape, dtype=np.uint8)
    other = cosine_similarity(fm.descriptor(noise, box)[None], fm.descriptor(crop, box)[None])[0]
    mirror = cosine_similarity(fm.descriptor(np.ascontiguousarray(crop[:, ::-1]), box)[None],
                               fm.descriptor(crop, box)[None])[0]
    assert same == pytest.approx(1.0, abs=1e-9)
    assert mirror > 0.97  # the same person seen in a mirror
    assert other < 0.9  # noise is not that person
