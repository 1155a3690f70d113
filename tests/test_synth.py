"""training/synth.py: the synthetic GRID-shaped corpus (`avatar-train synth`).

A tiny corpus (2 identities: the astronaut and its mirror image, 3 utterances) is built once
per module; run with -s to see the measured numbers (clips/s, AU26 vs dlib mouth opening r).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from avatar_stream.engine.face import default_predictor_path, warp_to_crop
from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training import synth
from avatar_stream.training.au_table import CLASSES, espeak_classes
from avatar_stream.training.datasets import ClipDataset
from avatar_stream.training.shards import load_clip, read_index, read_split
from avatar_stream.training.speech import english_voices, synthesize

N_UTT = 3


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory, astronaut) -> Path:
    d = tmp_path_factory.mktemp("faces")
    cv2.imwrite(str(d / "astronaut.png"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "mirror.png"), cv2.cvtColor(np.ascontiguousarray(astronaut[:, ::-1]), cv2.COLOR_RGB2BGR))
    return d


def _opts(faces: Path, out: Path, **kw) -> synth.SynthOptions:
    base = dict(faces=faces, out=out, utterances=N_UTT, seed=7, test_identities=1, test_voices=1, progress=False)
    return synth.SynthOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, faces_dir):
    out = tmp_path_factory.mktemp("corpus")
    t0 = time.perf_counter()
    report = synth.build_corpus(_opts(faces_dir, out))
    elapsed = time.perf_counter() - t0
    print(f"\ntiny corpus: {report.summary()}; whole build {elapsed:.1f} s")
    assert elapsed < 60
    return out, report


def test_shards_have_the_prepare_format(corpus):
    root, report = corpus
    entries = read_index(root)
    assert report.clips == len(entries) == N_UTT
    for e in entries:
        assert e["path"] == f"clips/{e['speaker']}/{Path(e['path']).stem}.npz"
        assert e["speaker"] == f"{e['identity']}-{e['voice']}"
        clip = load_clip(root, e)
        t = e["frames"]
        assert clip["frames"].dtype == np.uint8 and clip["frames"].shape == (t, 112, 112, 3)
        assert clip["audio"].dtype == np.float32 and clip["audio"].shape == (t * SAMPLES_PER_FRAME,)
        assert clip["identity"].dtype == np.uint8 and clip["identity"].shape == (112, 112, 3)
        assert clip["au"].dtype == np.float32 and clip["au"].shape == (t, 5)
        assert np.isfinite(clip["au"]).all() and clip["au"].min() >= 0 and clip["au"].max() <= 1
        assert clip["au_label"].dtype == np.uint8 and set(np.unique(clip["au_label"])) <= {0, 1}
        assert np.abs(clip["audio"]).max() > 0.05  # speech, not silence
    for split in ("train", "test"):
        ds = ClipDataset(root, split, context=7, clip_len=None)
        s = ds[0]
        t = len(s.frames)
        assert s.frames.shape == (t, 3, 112, 112) and s.mfcc.shape == (t + 14, 12, 28)
        assert s.identity.shape == (3, 112, 112) and s.au.shape == (t, 5)


def test_split_by_identity_and_voice(corpus):
    root, _ = corpus
    split = json.loads((root / "split.json").read_text())
    detail = split["detail"]
    assert read_split(root)["test"] == split["test"] and split["test"]
    assert len(detail["test_identities"]) == 1 and len(detail["test_voices"]) == 1
    assert not set(detail["test_identities"]) & set(detail["train_identities"])
    assert not set(detail["test_voices"]) & set(detail["train_voices"])
    for e in read_index(root):
        held = (e["identity"] in detail["test_identities"], e["voice"] in detail["test_voices"])
        assert held == ((True, True) if e["speaker"] in split["test"] else (False, False)), e


def _frame_classes(phonemes, n_frames: int, lead: int = 640) -> list[set[str]]:
    """Viseme classes sounding at each frame's displayed instant (middle + the 40 ms lead)."""
    out = []
    for k in range(n_frames):
        t = k * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME // 2 + lead
        out.append({c for s, a, b in phonemes if a <= t < b for c in espeak_classes(s)})
    return out


def test_labels_follow_the_phonemes(corpus, faces_dir):
    """AU25/AU26 are high where espeak placed open vowels and low in the leading silence."""
    root, _ = corpus
    identities, _ = synth.find_identities(faces_dir, root / "cache")
    jobs, _ = synth.plan(_opts(faces_dir, root), identities, english_voices(), [])
    open_cls = {c for c, v in CLASSES.items() if v.targets[4] >= 0.5}
    vowel, silence = [], []
    for job in jobs:
        utt = synthesize(job.text, *job.espeak)
        clip = load_clip(root, {"path": f"clips/{job.speaker}/{job.utt}.npz"})
        n = len(clip["au"])
        for k, classes in enumerate(_frame_classes(utt.phonemes, n)):
            if classes and classes <= open_cls:
                vowel.append(clip["au"][k])
            elif k < 2 and classes <= {"sil"}:
                silence.append(clip["au"][k])
    vowel, silence = np.array(vowel), np.array(silence)
    print(f"\nopen-vowel frames {len(vowel)}: AU25 {vowel[:, 3].mean():.2f} AU26 {vowel[:, 4].mean():.2f}; "
          f"silence frames {len(silence)}: AU25 {silence[:, 3].mean():.2f} AU26 {silence[:, 4].mean():.2f}")
    assert len(vowel) >= 3 and len(silence) >= 1
    assert vowel[:, 3].mean() > silence[:, 3].mean() + 0.3
    assert vowel[:, 4].mean() > silence[:, 4].mean() + 0.3


def test_rendered_mouth_opening_follows_au26(corpus):
    """dlib landmarks on the stored 112 px crops (upscaled 4x): inner-lip gap vs AU26."""
    root, _ = corpus
    predictor = dlib.shape_predictor(str(default_predictor_path()))
    gaps, jaw = [], []
    for e in read_index(root):
        clip = load_clip(root, e)
        box = dlib.rectangle(4 * 20, 4 * 24, 4 * 92, 4 * 104)  # the canonical face's box, 4x
        for frame, au in zip(clip["frames"], clip["au"], strict=True):
            big = cv2.resize(frame, (448, 448), interpolation=cv2.INTER_CUBIC)
            p = np.array([(q.x, q.y) for q in predictor(big, box).parts()], float) / 4
            gaps.append(np.mean(p[[67, 66, 65], 1] - p[[61, 62, 63], 1]))
            jaw.append(au[4])
    r = float(np.corrcoef(gaps, jaw)[0, 1])
    print(f"\n{len(gaps)} frames: Pearson r(dlib inner-lip gap, AU26) = {r:.2f}")
    assert r > 0.6


def test_same_seed_same_corpus(corpus, faces_dir, tmp_path):
    root, _ = corpus
    synth.build_corpus(_opts(faces_dir, tmp_path))
    assert (tmp_path / "index.json").read_bytes() == (root / "index.json").read_bytes()
    assert (tmp_path / "split.json").read_bytes() == (root / "split.json").read_bytes()
    for e in read_index(root):  # the same bytes (np.savez stamps members with a fixed date)
        assert (tmp_path / e["path"]).read_bytes() == (root / e["path"]).read_bytes(), e["path"]
    # A different seed makes a different corpus.
    other = tmp_path / "other"
    synth.build_corpus(_opts(faces_dir, other, seed=8))
    assert (other / "index.json").read_bytes() != (root / "index.json").read_bytes()


def test_rebuild_skips_existing_clips(corpus, faces_dir):
    root, _ = corpus
    report = synth.build_corpus(_opts(faces_dir, root))
    assert report.clips == 0 and report.skipped_existing == N_UTT


def test_canvas_matches_the_alignment(astronaut, faces_dir, tmp_path):
    """The neutral synth crop is the photo's aligned crop (same geometry, resampled)."""
    identities, _ = synth.find_identities(faces_dir, tmp_path)
    ident = next(i for i in identities if i.name == "fastronaut")
    face = synth.CanvasFace(ident)
    ours = face.crop(np.zeros(5)).astype(np.float64)
    ref = warp_to_crop(astronaut, np.array(ident.matrix)).astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((ours - ref) ** 2))
    assert psnr > 28, psnr
    assert np.array_equal(face.crop(np.zeros(5)), face.crop(np.zeros(5), 0.0, None))


def test_jitter_and_blinks_statistics():
    rng = np.random.default_rng(0)
    m = synth.head_jitter(rng, 20000)
    c = (synth.SCALE * synth.CROP - 1) / 2.0
    centre = m[:, :, :2] @ [c, c] + m[:, :, 2]
    shift = (centre - c) / synth.SCALE  # crop px
    scale = np.sqrt(np.abs(np.linalg.det(m[:, :, :2])))
    expected = np.hypot(*synth.JITTER_SHIFT_PX)
    assert shift.std(0) == pytest.approx([expected, expected], rel=0.25)
    assert np.log(scale).std() == pytest.approx(np.hypot(*synth.JITTER_SCALE), rel=0.25)
    # The slow part dominates: neighbouring frames move together.
    assert np.corrcoef(shift[:-1, 0], shift[1:, 0])[0, 1] > 0.8
    b = synth.blink_track(rng, 25 * 600)
    starts = np.flatnonzero((b[1:] > 0) & (b[:-1] == 0))
    assert 0 <= b.min() and b.max() == 1.0
    gap_s = np.diff(starts).mean() / 25
    assert 3.0 < gap_s < 6.5, gap_s


def test_test_real_speakers_holds_out_whole_speakers(tmp_path):
    """--test-real-speakers: that many real speakers (all their recordings) are test speech,
    independently of --test-voices; by default as many as --test-voices; identities and
    espeak voices split as before."""
    ids = [synth.Identity(f"p{i}", f"p{i}.png", (), ()) for i in range(6)]
    voices = tuple(f"v{i}" for i in range(8))
    real = [synth.RealFile(f"s{i}_{j}.wav", f"s{i}", None) for i in range(10) for j in range(2)]
    opts = lambda **kw: _opts(tmp_path, tmp_path, utterances=60, test_identities=2, test_voices=2, **kw)  # noqa: E731

    def held(split):
        d = split["detail"]
        return (d["test_identities"], [v for v in d["test_voices"] if v.startswith("es_")],
                {v for v in d["test_voices"] if v.startswith("rs_")}, {v for v in d["train_voices"] if v.startswith("rs_")})

    jobs0, split0 = synth.plan(opts(), ids, voices, real)
    jobs5, split5 = synth.plan(opts(test_real_speakers=5), ids, voices, real)
    assert len(held(split0)[2]) == 2 and len(held(split5)[2]) == 5
    assert held(split0)[:2] == held(split5)[:2]  # the same photos and espeak voices held out
    for jobs, split in ((jobs0, split0), (jobs5, split5)):
        test_rs, train_rs = held(split)[2:]
        assert not test_rs & train_rs and len(test_rs | train_rs) == 10
        for j in jobs:
            if j.real is not None:
                assert (j.voice in test_rs) == (j.split == "test")
    with pytest.raises(ValueError, match="--test-real-speakers -1"):
        synth.plan(opts(test_real_speakers=-1), ids, voices, real)


def test_bad_options_one_line_errors(faces_dir, tmp_path):
    with pytest.raises(ValueError, match="--test-identities 2 must be 0..1"):
        synth.build_corpus(_opts(faces_dir, tmp_path, test_identities=2))
    with pytest.raises(ValueError, match="--utterances must be >= 1"):
        synth.build_corpus(_opts(faces_dir, tmp_path, utterances=0))
    with pytest.raises(FileNotFoundError, match="no face photos"):
        synth.build_corpus(_opts(tmp_path, tmp_path / "x"))


def test_cli_synth(faces_dir, tmp_path, capsys):
    from avatar_stream.training.cli import main

    rc = main(["synth", "--faces", str(faces_dir), "--out", str(tmp_path), "--utterances", "2",
               "--test-identities", "0", "--test-voices", "0", "--no-progress"])
    assert rc == 0
    assert "2 clips" in capsys.readouterr().out
    assert len(read_index(tmp_path)) == 2 and read_split(tmp_path)["test"] == []
    rc = main(["synth", "--faces", str(faces_dir), "--out", str(tmp_path / "y"), "--utterances", "2",
               "--test-identities", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--test-identities 5" in err


@pytest.mark.slow
def test_workers_give_the_same_corpus(corpus, faces_dir, tmp_path):
    root, _ = corpus
    synth.build_corpus(_opts(faces_dir, tmp_path, workers=2))
    assert (tmp_path / "index.json").read_bytes() == (root / "index.json").read_bytes()
    for e in read_index(root):
        assert (tmp_path / e["path"]).read_bytes() == (root / e["path"]).read_bytes(), e["path"]


@pytest.mark.shared
def test_real_speech_and_shared_faces(shared_data, tmp_path):
    """Real recordings (LJSpeech with transcripts, GRID clips named by their sentence) on two
    shared photos: alignments cached, labels present, one speaker per real voice."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("003_deepface.jpg", "012_deepface.jpg"):
        (faces / name).symlink_to(shared_data / "faces" / name)
    opts = _opts(faces, tmp_path / "out", utterances=6, real_share=1.0,
                 real_speech=(shared_data / "speech_dev", shared_data / "grid_dev"))
    t0 = time.perf_counter()
    report = synth.build_corpus(opts)
    print(f"\nreal speech: {report.summary()} ({time.perf_counter() - t0:.1f} s)")
    cached = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cache" / "align").glob("*.json")]
    assert cached and all(c["method"] == "forced" for c in cached)  # every file has a transcript
    for e in read_index(tmp_path / "out"):
        assert e["voice"].startswith("rs_") and e["frames"] <= 8 * 25
        assert load_clip(tmp_path / "out", e, ("au_label",))["au_label"][:, 3].any()
