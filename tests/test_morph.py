"""training/morph.py (`avatar-train morph-faces`) and shards.merge_corpora (`avatar-train merge`).

Faces: the astronaut, its mirror image and a darker copy stretched 1.3x wide (another face
shape after alignment); real dlib alignment.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_stream.engine.face import FaceAligner
from avatar_stream.engine.warp import FaceWarper, face_frame
from avatar_stream.engine.warp_mesh import N_BORDER_ANCHORS
from avatar_stream.training import morph
from avatar_stream.training.cli import main
from avatar_stream.training.shards import (
    ShardError,
    load_clip,
    merge_corpora,
    read_index,
    read_split,
    split_entries,
    write_clip,
    write_split,
)
from avatar_stream.training.synth import find_identities


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, astronaut) -> Path:
    d = tmp_path_factory.mktemp("faces")
    darker = cv2.resize((astronaut.astype(np.float32) * 0.7).astype(np.uint8), None, fx=1.3, fy=1.0)
    for name, img in (("astronaut", astronaut), ("mirror", np.ascontiguousarray(astronaut[:, ::-1])),
                      ("darker", darker)):
        cv2.imwrite(str(d / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return d


@pytest.fixture(scope="module")
def identities(faces_dir, tmp_path_factory):
    found, bad = find_identities(faces_dir, tmp_path_factory.mktemp("cache"))
    assert not bad
    return {i.name: i for i in found}


def test_morph_ends_are_the_parents_and_the_middle_has_the_mean_shape(identities):
    a, b = identities["fastronaut"], identities["fdarker"]
    canvas_a, lm_a = morph._canvas(a)
    canvas_b, lm_b = morph._canvas(b)
    assert np.array_equal(morph.morph_pair(a, b, 0.0), canvas_a)
    assert np.array_equal(morph.morph_pair(a, b, 1.0), canvas_b)
    mid = morph.morph_pair(a, b, 0.5)
    found = FaceAligner().landmarks(mid)
    want = 0.5 * (lm_a + lm_b)
    err = np.linalg.norm(found - want, axis=1)
    # The parents' own landmarks differ by this much; dlib on the morph finds their mean.
    apart = np.linalg.norm(lm_a - lm_b, axis=1).mean()
    print(f"\nmorph landmarks vs the parents' mean: {err.mean():.2f} px (parents {apart:.2f} px apart)")
    assert err.mean() < 0.25 * apart
    with pytest.raises(ValueError, match="morph weight"):
        morph.morph_pair(a, b, 1.5)


def _nose_offset(lm: np.ndarray) -> float:
    """Nose tip (30) off the middle of the jaw contour (0, 16), in face widths: ~0 frontal."""
    return float((lm[30, 0] - (lm[0, 0] + lm[16, 0]) / 2) / (lm[16, 0] - lm[0, 0]))


def test_turned_mesh_narrows_the_far_side_and_folds_nothing(identities):
    a = identities["fastronaut"]
    warper = FaceWarper(*morph._canvas(a))
    src = warper.src
    _, ex, _, _, _ = face_frame(src[:68])
    assert np.array_equal(morph.turn_mesh(src, 0.0), src)
    for yaw in (-morph.MAX_YAW, 20.0, morph.MAX_YAW):
        dst = morph.turn_mesh(src, yaw)
        assert np.array_equal(dst[-N_BORDER_ANCHORS:], src[-N_BORDER_ANCHORS:])  # the image border stays
        moved = dst - src  # along the eye line only: a turn about the vertical axis
        assert np.abs(moved[:, 0] * ex[1] - moved[:, 1] * ex[0]).max() < 1e-9
        assert warper.folds(dst) == 0
        sign = np.sign(yaw)
        # the nose moves the turn's way, further than the chin (it stands out of the head) ...
        assert sign * (dst[30, 0] - src[30, 0]) > sign * (dst[8, 0] - src[8, 0]) > 0
        # ... and the cheek on that side (now the far one) narrows, the other widens
        far, near = (16, 0) if yaw > 0 else (0, 16)
        assert abs(dst[30, 0] - dst[far, 0]) < abs(src[30, 0] - src[far, 0])
        assert abs(dst[30, 0] - dst[near, 0]) > abs(src[30, 0] - src[near, 0])


def test_turned_morph_is_a_face_that_dlib_sees_turned(identities):
    a, b = identities["fastronaut"], identities["fdarker"]
    aligner = FaceAligner()
    offsets = {}
    for yaw in (-30.0, 0.0, 30.0):
        image = morph.morph_pair(a, b, 0.0, yaw)
        assert len(aligner.detect(image, name="the morph")) == 1
        offsets[yaw] = _nose_offset(aligner.landmarks(image))
    print("\nnose offset seen by dlib at -30 / 0 / +30 degrees: "
          + " / ".join(f"{v:+.3f}" for v in offsets.values()))
    assert offsets[-30.0] < offsets[0.0] - 0.1 and offsets[30.0] > offsets[0.0] + 0.1
    assert np.array_equal(morph.morph_pair(a, b, 0.0), morph.morph_pair(a, b, 0.0, 0.0))


def test_morph_faces_with_yaw_records_the_turns(faces_dir, tmp_path):
    morph.morph_faces(faces_dir, tmp_path / "y", 3, seed=5, yaw=30.0, progress=False)
    record = json.loads((tmp_path / "y" / "morphs.json").read_text())
    assert record["yaw"] == 30.0
    assert all(10.0 <= abs(m["yaw"]) <= 30.0 for m in record["morphs"].values())
    with pytest.raises(ValueError, match="--yaw must be in 0..40"):
        morph.morph_faces(faces_dir, tmp_path / "z", 1, yaw=50.0, progress=False)


def test_morph_faces_leaves_out_the_excluded_and_is_deterministic(faces_dir, tmp_path):
    report = morph.morph_faces(faces_dir, tmp_path / "m", 1, seed=3, exclude=["fdarker"], progress=False)
    assert (report.written, report.parents, report.excluded) == (1, 2, 1)
    record = json.loads((tmp_path / "m" / "morphs.json").read_text())
    assert record["excluded"] == ["fdarker"]
    m = record["morphs"]["morph0000.png"]
    assert {m["a"], m["b"]} == {"fastronaut", "fmirror"}
    assert morph.WEIGHT_RANGE[0] <= m["t"] <= morph.WEIGHT_RANGE[1]
    # All three photos: three pairs, each used once; the same seed gives the same files.
    runs = [morph.morph_faces(faces_dir, tmp_path / f"all{k}", 3, seed=5, progress=False) for k in range(2)]
    assert [r.written for r in runs] == [3, 3]
    record = json.loads((tmp_path / "all0" / "morphs.json").read_text())["morphs"]
    assert sorted(tuple(sorted((m["a"], m["b"]))) for m in record.values()) == [
        ("fastronaut", "fdarker"), ("fastronaut", "fmirror"), ("fdarker", "fmirror")]
    for name in record:
        assert (tmp_path / "all0" / name).read_bytes() == (tmp_path / "all1" / name).read_bytes()
    # The morphs are usable photos: synth finds one face in each.
    found, bad = find_identities(tmp_path / "all0", tmp_path / "cache")
    assert len(found) == 3 and not bad


def test_morph_faces_errors(faces_dir, tmp_path):
    with pytest.raises(ValueError, match="--prefix must be letters and digits"):
        morph.morph_faces(faces_dir, tmp_path, 1, prefix="a-b", progress=False)
    with pytest.raises(ValueError, match="--count must be >= 1"):
        morph.morph_faces(faces_dir, tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match="--exclude names no usable photo.*fnobody"):
        morph.morph_faces(faces_dir, tmp_path, 1, exclude=["fnobody"], progress=False)
    with pytest.raises(ValueError, match="1 usable photo"):
        morph.morph_faces(faces_dir, tmp_path, 1, exclude=["fdarker", "fmirror"], progress=False)
    with pytest.raises(ValueError, match="only 1 of 2 morphs"):  # two parents make one pair
        morph.morph_faces(faces_dir, tmp_path, 2, exclude=["fdarker"], seed=1, progress=False)


def test_held_out_identities_of_a_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="split.json is missing"):
        morph.held_out_identities(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(ValueError, match="records no test identities"):
        morph.held_out_identities(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "test": [], "detail": {"test_identities": ["fx"]}}))
    assert morph.held_out_identities(tmp_path) == ["fx"]


def test_cli_morph_faces(faces_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "split.json").write_text(json.dumps({"detail": {"test_identities": ["fmirror"]}}))
    rc = main(["morph-faces", "--faces", str(faces_dir), "--out", str(tmp_path / "m"), "--count", "1",
               "--exclude-test-of", str(corpus), "--prefix", "set2", "--no-progress"])
    assert rc == 0
    assert "1 morphs of 2 photos (1 held out" in capsys.readouterr().out
    parents = json.loads((tmp_path / "m" / "morphs.json").read_text())["morphs"]["set20000.png"]
    assert {parents["a"], parents["b"]} == {"fastronaut", "fdarker"}
    rc = main(["morph-faces", "--faces", str(faces_dir), "--out", str(tmp_path / "n"), "--count", "1",
               "--exclude", "fnobody"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fnobody" in err


# ----------------------------------------------------------------------------- merge


def _clip(root, speaker, identity, voice, value):
    frames = np.full((2, 112, 112, 3), value, np.uint8)
    write_clip(root, speaker, "u0", frames, np.zeros(2 * 640, np.float32), frames[0],
               au=np.zeros((2, 5), np.float32), voice=voice, identity_name=identity)


def _corpus(root: Path, train: list[tuple], test: list[tuple]) -> Path:
    for k, (speaker, identity, voice) in enumerate(train + test):
        _clip(root, speaker, identity, voice, 10 * k + len(str(root)))
    write_split(root, [s for s, _, _ in train], [s for s, _, _ in test])
    return root


def test_merge_unions_clips_and_splits(tmp_path):
    a = _corpus(tmp_path / "a", [("x-v1", "x", "v1")], [("y-v2", "y", "v2")])
    b = _corpus(tmp_path / "b", [("z-v3", "z", "v3"), ("w-v3", "w", "v3")], [])
    n = merge_corpora([a, b], tmp_path / "ab")
    assert n == {"clips": 4, "train": 3, "test": 1}
    ab = tmp_path / "ab"
    assert read_split(ab) == {"train": ["w-v3", "x-v1", "z-v3"], "test": ["y-v2"]}
    assert len(read_index(ab)) == 4
    for src in (a, b):
        for e in read_index(src):
            assert np.array_equal(load_clip(ab, e)["frames"], load_clip(src, e)["frames"])
            assert not (ab / "clips" / e["speaker"]).readlink().is_absolute()  # the pair can move together
    assert {e["speaker"] for e in split_entries(ab, "test")} == {"y-v2"}


def test_merge_refuses_leaks_and_warns_on_voices(tmp_path):
    a = _corpus(tmp_path / "a", [("x-v1", "x", "v1")], [("y-v2", "y", "v2")])
    same_speaker = _corpus(tmp_path / "s", [("x-v1", "x", "v1")], [])
    with pytest.raises(ShardError, match="speaker x-v1 is in both"):
        merge_corpora([a, same_speaker], tmp_path / "o1")
    trains_held_out = _corpus(tmp_path / "t", [("y-v9", "y", "v9")], [])
    with pytest.raises(ShardError, match="identities both trained on and held out.*: y"):
        merge_corpora([a, trains_held_out], tmp_path / "o2")
    hears_test_voice = _corpus(tmp_path / "h", [("q-v2", "q", "v2")], [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_corpora([a, hears_test_voice], tmp_path / "o3")
    assert any("test voice(s)" in str(w.message) and "v2" in str(w.message) for w in caught)
    with pytest.raises(ShardError, match="not empty"):
        merge_corpora([a], tmp_path / "o3")


def test_cli_merge(tmp_path, capsys):
    a = _corpus(tmp_path / "a", [("x-v1", "x", "v1")], [("y-v2", "y", "v2")])
    b = _corpus(tmp_path / "b", [("z-v3", "z", "v3")], [])
    assert main(["merge", "--data", str(a), "--data", str(b), "--out", str(tmp_path / "ab")]) == 0
    assert "3 clips (2 train / 1 test speakers) from 2 corpora" in capsys.readouterr().out
    assert main(["merge", "--data", str(a), "--out", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
