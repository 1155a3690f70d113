"""Real talking-face video: the manifest and speaker split, landmark tracks, A/V offsets,
prepare-real on a tiny split of ../shared/data/av_real (marked ``shared``), eval-real and its
pooled figures, the mouth-interior bank, and the shipping rule on real media."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avatar_stream.training import avreal
from avatar_stream.training.real_eval import (
    RealEvalOptions,
    bootstrap,
    evaluate_real,
    max_chroma,
    median_amp,
    pooled_amp,
    pooled_r,
    shift,
)

TINY = ("deepavsr_LRS2_00001.mp4", "deepavsr_LRS2_00008.mp4", "deepavsr_LRS2_00022.mp4")


def _clip(file, speaker, source="repo/a", seconds=5.0):
    return avreal.RealClip(file=file, speaker=speaker, source=source, seconds=seconds, fps=25, width=1, height=1)


def test_speaker_split_is_by_speaker_stratified_and_seeded():
    clips = [_clip(f"a{i}.mp4", f"a{i}", "repo/a") for i in range(9)] + \
            [_clip(f"b{i}.mp4", f"b{i}", "repo/b") for i in range(6)] + \
            [_clip("a0_again.mp4", "a0", "repo/a"), _clip("long.mp4", "long", "repo/b", seconds=60),
             _clip("one.mp4", "one", "repo/c")]
    split = avreal.speaker_split(clips)
    assert not set(split["train"]) & set(split["dev"])
    assert set(split["train"]) | set(split["dev"]) == {c.speaker for c in clips}
    assert sum(s.startswith("a") for s in split["dev"]) == 3 and sum(s.startswith("b") for s in split["dev"]) == 2
    assert "long" in split["train"]  # long speakers stay on the training side
    assert split == avreal.speaker_split(list(reversed(clips)))


def test_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(avreal.RealDataError, match="no manifest"):
        avreal.read_manifest(tmp_path)
    (tmp_path / "MANIFEST.tsv").write_text("file\tspeaker_note\nx.mp4\tno key here\n")
    with pytest.raises(avreal.RealDataError, match=r"\[spk=\.\.\.\]"):
        avreal.read_manifest(tmp_path)


def test_shift_and_pooled_figures():
    a = np.arange(10.0)
    assert np.array_equal(shift(a, 2)[2:], a[:-2]) and np.isnan(shift(a, 2)[:2]).all()
    assert np.array_equal(shift(a, -3)[:-3], a[3:])
    rng = np.random.default_rng(0)
    pairs = []
    for n in (40, 80, 120):
        x = rng.standard_normal(n)
        pairs.append((x, x + rng.standard_normal(n)))
    rs = [np.corrcoef(x, y)[0, 1] for x, y in pairs]
    assert pooled_r(pairs) == pytest.approx(np.average(rs, weights=[40, 80, 120]), abs=1e-9)
    assert pooled_amp([(a, 2 * a)]) == pytest.approx(2.0) and median_amp([(a, a), (a, 3 * a), (a, 2 * a)]) == 2.0
    draws = bootstrap(["s1", "s1", "s2"], lambda idx: float(len(idx)), b=50)
    assert set(draws) <= {2.0, 3.0, 4.0}


def test_offsets_found_from_a_reference_predictor():
    """Recordings whose opening follows the features two frames later; one recording's face
    is 3 frames late: only that one is called out of sync, with the offset that moves it back."""
    rng = np.random.default_rng(0)
    feats, opening, speakers = {}, {}, {}
    w = rng.standard_normal(6)
    for i in range(12):
        f = rng.standard_normal((200, 6))
        y = np.convolve(f @ w, np.ones(3) / 3, "same") + 0.3 * rng.standard_normal(200)
        if i == 5:
            y = np.r_[np.full(3, y[0]), y[:-3]]
        feats[f"r{i}"], opening[f"r{i}"], speakers[f"r{i}"] = f, y, f"s{i}"
    res = avreal.estimate_offsets(feats, opening, speakers, radius=2)
    assert res["r5"]["offset"] == -3
    assert all(res[k]["offset"] == 0 for k in res if k != "r5")
    back = shift(opening["r5"], res["r5"]["offset"])
    clean = np.convolve(feats["r5"] @ w, np.ones(3) / 3, "same")
    assert np.corrcoef(back[3:-3], clean[3:-3])[0, 1] > 0.8  # unshifted: about 0


def test_max_chroma_and_mouth_box():
    gray = np.full((20, 20, 3), 90, np.uint8)
    assert max_chroma(gray) == 0
    gray[3, 4] = (90, 95, 90)
    assert max_chroma(gray) == 5


# ---------------------------------------------------------------------------------- shared


@pytest.fixture(scope="module")
def tiny_real(shared_data, tmp_path_factory):
    """prepare-real on three small LRS2 recordings of ../shared/data/av_real."""
    src = shared_data / "av_real"
    d = tmp_path_factory.mktemp("real")
    clips = d / "clips"
    clips.mkdir()
    lines = (src / "MANIFEST.tsv").read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0] in TINY]
    (clips / "MANIFEST.tsv").write_text("\n".join(keep) + "\n")
    for f in TINY:
        (clips / f).symlink_to(src / "clips" / f)
    meta = avreal.prepare_real(clips, d / "data", workers=1, progress=False)
    return d / "data", meta


@pytest.mark.shared
def test_frames_25fps_matches_the_whole_clip_reader(shared_data):
    from avatar_stream.training.landmarks import frames_25fps
    from avatar_stream.training.prepare import read_video_25fps

    path = shared_data / "grid_dev" / "lrwp9a.mpg"
    whole, _ = read_video_25fps(path)
    one_by_one = list(frames_25fps(path))
    assert len(whole) == len(one_by_one) and all(np.array_equal(a, b) for a, b in zip(whole, one_by_one, strict=True))


@pytest.mark.shared
def test_prepare_real_writes_shards_tracks_and_a_split(tiny_real):
    data, meta = tiny_real
    assert set(meta["recordings"]) == {f[:-4] for f in TINY}
    split = json.loads((data / "split.json").read_text())
    assert set(split["train"]) | set(split["test"]) == {e["speaker"] for e in meta["recordings"].values()}
    assert split["test"] == meta["split"]["dev"] and len(split["test"]) == 1
    for e in meta["recordings"].values():
        assert isinstance(e["av_offset"], int) and e["face_found"] > 0.9
        with np.load(data / e["path"]) as z:
            t = len(z["frames"])
            assert z["landmarks"].shape == (t, 68, 2) and z["mouth"].shape == (t, 4)
            assert z["audio"].shape == (t * 640,) and z["photo"].shape == (160, 160, 3)
            assert np.isfinite(z["mouth"]).mean() > 0.9
            # The opening is a plausible share of the eye distance on these talking faces.
            assert 0.0 <= np.nanmedian(z["mouth"][:, 0]) < 0.6
    # Resumable: nothing to redo.
    again = avreal.prepare_real(data.parent / "clips", data, workers=1, progress=False, model=False)
    assert again["recordings"].keys() == meta["recordings"].keys()


@pytest.mark.shared
def test_eval_real_scores_both_renderers_against_loudness(tiny_real, tmp_path):
    data, _ = tiny_real
    res = evaluate_real(RealEvalOptions(data=data, split="all", max_seconds=2.0, gray_seconds=0.4,
                                        sheet=tmp_path / "sheet.png", mouth_sheet=tmp_path / "mouth.png"),
                        progress=None)
    assert set(res["renderers"]) == {"neural", "warp"} and len(res["recordings"]) == 3
    for name, r in res["renderers"].items():
        recs = r["recordings"]
        n = sum(x["frames"] for x in recs.values())
        assert r["pooled_r"] == pytest.approx(sum(x["r_open"] * x["frames"] for x in recs.values()) / n, abs=1e-9)
        assert r["max_chroma_gray"] <= 3, name  # a gray photo stays gray
        assert all(0.0 < x["sharp"] < 20 for x in recs.values())
        assert r["se"] >= 0
    assert np.isfinite(res["loudness"]["pooled_r"])
    assert (tmp_path / "sheet.png").stat().st_size > 1000 and (tmp_path / "mouth.png").stat().st_size > 1000


@pytest.mark.shared
def test_mouth_interior_bank_from_a_recording(tiny_real, tmp_path):
    from avatar_stream.engine.interior import MouthInterior

    data, meta = tiny_real
    name = sorted(meta["recordings"])[0]
    bank = avreal.build_interior(data, name, tmp_path / "bank.npz", ratios=(0.05, 0.1, 0.2), size=(16, 32))
    again = MouthInterior.load(tmp_path / "bank.npz")
    assert again.textures.shape[1:] == (16, 32, 3) and np.array_equal(again.ratios, bank.ratios)
    assert again.pick(0.0) == 0 and again.pick(1.0) == len(again.ratios) - 1
    gray = again.adapted(np.array([120.0, 100.0, 90.0]), gray=True)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_write_clip_keeps_extra_arrays_and_refuses_clashes(tmp_path):
    from avatar_stream.training.shards import ShardError, load_clip, write_clip

    t = 3
    frames = np.zeros((t, 112, 112, 3), np.uint8)
    entry = write_clip(tmp_path, "s", "u", frames, np.zeros(t * 640, np.float32), frames[0],
                       extra={"mouth": np.ones((t, 4), np.float32)})
    assert np.array_equal(load_clip(tmp_path, entry, ("mouth",))["mouth"], np.ones((t, 4)))
    with pytest.raises(ShardError, match="would replace"):
        write_clip(tmp_path, "s", "v", frames, np.zeros(t * 640, np.float32), frames[0], extra={"audio": frames})
