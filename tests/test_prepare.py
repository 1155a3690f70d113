"""Dataset shards (training/shards.py) and ``avatar-train prepare`` (training/prepare.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.cli import main
from avatar_stream.training.datasets import (
    AudioAUDataset,
    AUFrameDataset,
    ClipDataset,
    MFCCCache,
    window_starts,
)
from avatar_stream.training.mfcc import mfcc_windows
from avatar_stream.training.prepare import find_grid, find_tcd_timit, prepare, speaker_split
from avatar_stream.training.shards import (
    ShardError,
    load_clip,
    load_frames,
    read_index,
    read_split,
    write_clip,
    write_split,
)

GRID_LAYOUT = {"s1": ["lrwp9a", "pwij3p"], "s2": ["sbia1a", "sbwe5n"]}


def _clip(t: int, seed: int = 0):
    """Frame k is filled with value k (so positions are readable); audio is noise."""
    frames = np.repeat(np.arange(t, dtype=np.uint8)[:, None, None, None], 112, 1).repeat(112, 2).repeat(3, 3)
    audio = np.random.default_rng(seed).normal(0, 0.1, t * SAMPLES_PER_FRAME).astype(np.float32)
    return frames, audio, np.full((112, 112, 3), 200, np.uint8)


# ----------------------------------------------------------------------------- shards


def test_write_clip_round_trip_and_index(tmp_path):
    frames, audio, ident = _clip(5)
    au = np.linspace(0, 1, 25, dtype=np.float32).reshape(5, 5)
    e = write_clip(tmp_path, "s1", "utt1", frames, audio, ident, au=au, voice="v1")
    write_clip(tmp_path, "s2", "utt2", frames, audio, ident)
    write_clip(tmp_path, "s1", "utt1", frames, audio, ident, au=au, voice="v1")  # rewrite: no duplicate
    assert e == {"path": "clips/s1/utt1.npz", "speaker": "s1", "voice": "v1", "identity": "s1", "frames": 5}
    index = read_index(tmp_path)
    assert [c["path"] for c in index] == ["clips/s1/utt1.npz", "clips/s2/utt2.npz"]
    assert json.loads((tmp_path / "index.json").read_text())["version"] == 1
    arr = load_clip(tmp_path, index[0])
    np.testing.assert_array_equal(arr["frames"], frames)
    np.testing.assert_array_equal(arr["au_label"], (au >= 0.2).astype(np.uint8))  # derived from intensities
    assert np.isnan(load_clip(tmp_path, index[1])["au"]).all()  # unknown labels
    with np.load(tmp_path / index[0]["path"], allow_pickle=False) as z:  # no pickles inside
        assert sorted(z.files) == ["au", "au_label", "audio", "frames", "identity"]
    assert not list(tmp_path.rglob("*.tmp"))
    mode = stat.S_IMODE(os.stat(tmp_path / index[0]["path"]).st_mode)
    assert mode & stat.S_IRGRP  # readable like any other file, not mkstemp's 0600


@pytest.mark.parametrize("bad, match", [
    (dict(audio=np.zeros(100, np.float32)), "exactly T\\*640"),
    (dict(frames=np.zeros((3, 64, 64, 3), np.uint8)), "frames must be uint8"),
    (dict(identity=np.zeros((112, 112, 3), np.float32)), "identity must be uint8"),
    (dict(au=np.zeros((2, 5), np.float32)), "au must be"),
])
def test_write_clip_rejects_bad_arrays(tmp_path, bad, match):
    frames, audio, ident = _clip(3)
    args = dict(frames=frames, audio=audio, identity=ident) | bad
    with pytest.raises(ShardError, match=match):
        write_clip(tmp_path, "s1", "u", **args)
    with pytest.raises(ShardError, match="safe file name"):
        write_clip(tmp_path, "../x", "u", frames, audio, ident)


def test_clip_dataset_edge_replication_and_mfcc(tmp_path):
    frames, audio, ident = _clip(6)
    write_clip(tmp_path, "s1", "a", frames, audio, ident, au=np.full((6, 5), 0.5, np.float32))
    write_split(tmp_path, ["s1"], [])
    r = 2
    ds = ClipDataset(tmp_path, "train", context=r, clip_len=3)
    assert ds.samples == [(0, 0), (0, 3)]
    m = mfcc_windows(audio).numpy()
    s0, s1 = ds[0], ds[1]
    assert s0.mfcc.shape == (3 + 2 * r, 12, 28) and s0.frames.shape == (3, 3, 112, 112)
    # Sample 0 needs frames -2..4: frames -2, -1 replicate frame 0.
    np.testing.assert_allclose(s0.mfcc.numpy(), m[[0, 0, 0, 1, 2, 3, 4]], atol=1e-5)
    # Sample 1 needs frames 1..7: frames 6, 7 replicate frame 5.
    np.testing.assert_allclose(s1.mfcc.numpy(), m[[1, 2, 3, 4, 5, 5, 5]], atol=1e-5)
    np.testing.assert_allclose(s1.frames[:, 0, 0, 0].numpy(), np.array([3, 4, 5]) / 255.0)
    assert s0.identity.shape == (3, 112, 112) and float(s0.identity.max()) == pytest.approx(200 / 255)
    assert s0.au.shape == (3, 5) and float(s0.au_label.sum()) == 15.0
    # The MFCC cache was written and is what a fresh reader returns.
    cached = list((tmp_path / "cache").rglob("a.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(MFCCCache(tmp_path).get(read_index(tmp_path)[0]), np.load(cached[0]))
    whole = ClipDataset(tmp_path, "train", context=r, clip_len=None)
    assert len(whole) == 1 and whole[0].frames.shape[0] == 6 and whole[0].mfcc.shape[0] == 10


def test_load_frames_reads_rows_in_place(tmp_path):
    frames, audio, ident = _clip(9)
    e = write_clip(tmp_path, "s1", "a", frames, audio, ident)
    idx = np.array([8, 0, 3, 3])
    np.testing.assert_array_equal(load_frames(tmp_path, e, idx), frames[idx])
    # A compressed npz (np.savez_compressed, e.g. written by hand) is read the slow way.
    arrays = dict(np.load(tmp_path / e["path"]))
    np.savez_compressed(tmp_path / e["path"], **arrays)
    np.testing.assert_array_equal(load_frames(tmp_path, e, idx), frames[idx])
    (tmp_path / e["path"]).write_bytes(b"not a zip")
    with pytest.raises(ShardError, match="re-run prepare"):
        load_frames(tmp_path, e, idx)


def test_window_starts_cover_every_frame():
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(8, 4, 4) == [0, 4]
    assert window_starts(3, 4, 4) == []


def test_frame_datasets_use_labelled_clips_only(tmp_path):
    frames, audio, ident = _clip(10)
    au = np.zeros((10, 5), np.float32)
    au[::2, 1] = 0.6
    au[9] = np.nan  # one frame with failed tracking
    write_clip(tmp_path, "s1", "lab", frames, audio, ident, au=au)
    write_clip(tmp_path, "s1", "nolab", frames, audio, ident)  # no labels: not used
    write_split(tmp_path, ["s1"], [])
    ds = AUFrameDataset(tmp_path, "train", per_item=4)
    assert len(ds) == 3  # ceil(10 / 4) chunks of the labelled clip only
    seen = []
    for i in range(len(ds)):
        lower, lab, valid = ds[i]
        assert lower.shape == (4, 3, 56, 112)
        seen += list((lower[:, 0, 0, 0] * 255).round().int().tolist())
        np.testing.assert_array_equal(lab[:, 1].numpy(), [1.0 if v % 2 == 0 else 0.0 for v in seen[-4:]])
        np.testing.assert_array_equal(valid[:, 0].numpy(), [0.0 if v == 9 else 1.0 for v in seen[-4:]])
    assert set(seen) == set(range(10))  # every frame once per epoch (two wrap around)
    ref = AUFrameDataset(tmp_path, "train", per_item=4, reference=True)
    lower, lab, _ = ref[0]
    assert lower.shape == (4, 6, 56, 112)
    assert torch.equal(lower[:, :3], ds[0][0]) and torch.equal(lab, ds[0][1])
    assert torch.equal(lower[0, 3:], torch.from_numpy(ident[56:]).permute(2, 0, 1).float() / 255)
    jit = AUFrameDataset(tmp_path, "train", per_item=4, reference=True, jitter=True)
    torch.manual_seed(0)
    x = jit[0][0]
    assert x.shape == (4, 6, 56, 112) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert not torch.equal(x, lower)
    # "full" jitter: position, scale, rotation, blur, noise on top; deterministic per torch seed
    full = AUFrameDataset(tmp_path, "train", per_item=4, reference=True, jitter="full")
    torch.manual_seed(0)
    y = full[0][0]
    torch.manual_seed(0)
    assert torch.equal(y, full[0][0])
    assert y.shape == (4, 6, 56, 112) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert not torch.equal(y, x) and torch.equal(full[0][1], lab)
    with pytest.raises(ValueError, match="image jitter must be one of"):
        AUFrameDataset(tmp_path, "train", jitter="strong")
    a = AudioAUDataset(tmp_path, "train", per_item=4)
    x, lab, valid = a[0]
    assert x.shape == (4, 12, 28)
    np.testing.assert_allclose(x.numpy(), mfcc_windows(audio).numpy()[[0, 3, 6, 9]], atol=1e-5)
    write_clip(tmp_path / "empty", "s1", "nolab", frames, audio, ident)
    write_split(tmp_path / "empty", ["s1"], [])
    with pytest.raises(ShardError, match="no AU labels"):
        AUFrameDataset(tmp_path / "empty", "train")


def test_full_jitter_moves_the_reference_alone_by_at_most_the_reference_shift():
    """--reference-shift: frame and identity image get one similarity transform, the identity
    up to reference_shift px more; at 0 it lines up with the frames exactly (blur and noise,
    with probability 0.3 each, touch the frames only). The random stream does not depend on the
    shift: the frames come out the same for any shift."""
    import cv2

    from avatar_stream.training.datasets import _image_jitter_full

    rng = np.random.default_rng(0)
    ident = cv2.GaussianBlur(rng.uniform(0, 255, (112, 112, 3)).astype(np.uint8), (0, 0), 2.0)
    frames = np.stack([ident, ident])
    aligned = 0
    for seed in range(20):
        f0, i0 = _image_jitter_full(frames, ident, np.random.default_rng(seed), reference_shift=0.0)
        f1, i1 = _image_jitter_full(frames, ident, np.random.default_rng(seed), reference_shift=1.5)
        np.testing.assert_array_equal(f0, f1)
        assert not np.array_equal(i0, i1)
        aligned += np.array_equal(i0, f0[0])
    assert aligned >= 3  # no blur and no noise: probability 0.49 per draw
    with pytest.raises(ValueError, match="reference shift"):
        AUFrameDataset(Path("."), "train", jitter="full", reference_shift=-1.0)


# ----------------------------------------------------------------------------- layouts, split


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_find_grid_layouts(tmp_path):
    _touch(tmp_path / "g", "s1/a.mpg", "s1/b.mpg", "s2/video/mpg_6000/c.mpg", "s10/d.mpg")
    items = find_grid(tmp_path / "g")
    assert sorted((i.speaker, i.utt) for i in items) == [("s1", "a"), ("s1", "b"), ("s10", "d"), ("s2", "c")]
    _touch(tmp_path / "flat_s7", "x.mpg", "y.mpg")
    assert {(i.speaker, i.utt) for i in find_grid(tmp_path / "flat_s7")} == {("flat_s7", "x"), ("flat_s7", "y")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .mpg"):
        find_grid(tmp_path / "empty")


def test_find_tcd_timit_layout(tmp_path):
    _touch(tmp_path, "volunteers/01M/Clips/straightcam/sa1.mp4", "volunteers/01M/Clips/30degcam/sa1.mp4",
           "volunteers/01M/audio/sa1.wav", "volunteers/02F/Clips/straightcam/si100.mp4",
           "lipspeakers/Lipspkr1/Clips/straightcam/sx3.mp4")
    items = {(i.speaker, i.utt): i for i in find_tcd_timit(tmp_path)}
    assert sorted(items) == [("01M", "sa1"), ("02F", "si100"), ("Lipspkr1", "sx3")]
    assert items[("01M", "sa1")].audio == tmp_path / "volunteers/01M/audio/sa1.wav"
    assert "straightcam" in items[("01M", "sa1")].path.parts and items[("02F", "si100")].audio is None


def test_speaker_split_proportions():
    grid = [f"s{i}" for i in range(1, 35) if i != 21]  # the 33 GRID speakers with video
    sp = speaker_split(grid, "grid")
    assert (len(sp["train"]), len(sp["test"])) == (27, 6)
    assert not set(sp["train"]) & set(sp["test"]) and set(sp["train"]) | set(sp["test"]) == set(grid)
    assert sp == speaker_split(list(reversed(grid)), "grid")  # deterministic
    tcd = [f"{i:02d}M" for i in range(59)]
    assert [len(v) for v in speaker_split(tcd, "tcd-timit").values()] == [49, 10]
    assert [len(v) for v in speaker_split(["a", "b"], "grid").values()] == [1, 1]
    assert [len(v) for v in speaker_split(["a"], "grid").values()] == [1, 0]
    assert [len(v) for v in speaker_split([f"s{i}" for i in range(11)], "grid").values()] == [9, 2]


# ----------------------------------------------------------------------------- bad clips


def _write_faceless_video(path: Path, n: int = 10) -> None:
    """An mpeg1 video of gray frames with a tone: decodable, with audio, but no face."""
    with av.open(str(path), "w", format="mpeg") as c:
        v = c.add_stream("mpeg1video", rate=25)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("mp2", rate=44100)
        a.layout = "mono"
        for i in range(n):
            img = np.full((64, 64, 3), 100 + i, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        t = np.arange(int(44100 * n / 25)) / 44100
        tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
        af = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        af.sample_rate = 44100
        for p in a.encode(af):
            c.mux(p)
        for s in (v, a):
            for p in s.encode():
                c.mux(p)


def test_prepare_skips_corrupt_and_faceless_clips(tmp_path):
    src = tmp_path / "src"
    (src / "s1").mkdir(parents=True)
    # Fixed garbage: some random byte strings probe as a container without streams.
    (src / "s1" / "broken.mpg").write_bytes(np.random.default_rng(0).bytes(5000))
    _write_faceless_video(src / "s1" / "noface.mpg")
    with pytest.raises(ShardError, match="no clip"):
        prepare("grid", src, tmp_path / "out", progress=False)
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())["clips"]
    reasons = {s["utt"]: s["reason"] for s in skipped}
    assert reasons["broken"].startswith("corrupt video"), reasons
    assert reasons["noface"].startswith("no face"), reasons
    with pytest.raises(FileNotFoundError, match="s9"):
        prepare("grid", src, tmp_path / "out", speakers=["s9"], progress=False)


# ----------------------------------------------------------------------------- real GRID clips


@pytest.fixture(scope="module")
def grid_shards(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    for spk, utts in GRID_LAYOUT.items():
        (root / "src" / spk).mkdir(parents=True)
        for u in utts:
            (root / "src" / spk / f"{u}.mpg").symlink_to(shared_data / "grid_dev" / f"{u}.mpg")
    assert main(["prepare", "grid", str(root / "src"), "--out", str(root / "data"), "--no-progress"]) == 0
    return root


@pytest.mark.shared
def test_prepare_grid_writes_shards(grid_shards, capsys):
    data = grid_shards / "data"
    index = read_index(data)
    assert [(c["speaker"], Path(c["path"]).stem) for c in index] == [
        (s, u) for s, us in GRID_LAYOUT.items() for u in us]
    split = read_split(data)
    assert len(split["train"]) == 1 and len(split["test"]) == 1
    for c in index:
        arr = load_clip(data, c)
        assert c["frames"] == 75 and arr["frames"].shape == (75, 112, 112, 3)  # 3 s at 25 fps
        assert arr["audio"].shape == (75 * SAMPLES_PER_FRAME,) and np.abs(arr["audio"]).max() > 0.1
        np.testing.assert_array_equal(arr["identity"], arr["frames"][0])
        # Aligned crops of one talking head: consecutive frames are close, the mouth moves.
        diff = np.abs(arr["frames"][1:].astype(int) - arr["frames"][:-1].astype(int)).mean(axis=(1, 2, 3))
        assert diff.mean() < 12, diff.mean()
        assert arr["frames"][:, 70:100, 35:77].std(axis=0).mean() > 2.0
    # Resumable: a second run writes nothing new.
    assert main(["prepare", "grid", str(grid_shards / "src"), "--out", str(data), "--no-progress"]) == 0
    assert "wrote 0 clips, 4 already there" in capsys.readouterr().out


@pytest.mark.shared
def test_trainer_reads_prepared_grid(grid_shards, tmp_path):
    data = grid_shards / "data"
    ds = ClipDataset(data, "train", context=1, clip_len=4)
    s = ds[0]
    assert s.mfcc.shape == (6, 12, 28) and torch.isfinite(s.mfcc).all() and s.frames.shape == (4, 3, 112, 112)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--tiny", "--set", "tcsan_levels=1", "--no-vgg",
                 "--steps", "1", "--batch", "1", "--clip-len", "2", "--val-batches", "1", "--workers", "0",
                 "--no-progress"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--checkpoint", str(run / "last.safetensors"), "--json", str(out),
                 "--max-clips", "1", "--face-every", "25", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["corpus"] == "grid" and res["frames"] == 75
    assert 5 < res["psnr"] < 40 and 0 < res["ssim"] < 1 and res["lmd"] > 0 and -1 <= res["identity_similarity"] <= 1
