"""training/scorecard.py: the figures' plumbing and the rule that decides whether new
weights replace the shipped starter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.checkpoint import save_checkpoint
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.evaluate import EvalOptions, evaluate
from avatar_stream.training.models import AUClassifier, TalkingHead
from avatar_stream.training.scorecard import (
    ScoreOptions,
    audio2au_f1,
    beats,
    headline,
    same_classifier,
    score,
)
from avatar_stream.training.shards import write_clip, write_split


def _res(r_neural=0.5, psnr=25.0, f1=0.8, quiet=0.05):
    scores = {"mean_f1": f1}
    return {"audio2au": {"all": scores}, "classifier": scores,
            "generator": {"psnr": psnr, "ssim": 0.8, "au_f1": f1},
            "mouth": {"renderers": {"neural": {"mean_r": r_neural, "quiet": {"silence": {"ratio_to_speech_std": quiet}}},
                                    "warp": {"mean_r": 0.1, "quiet": {"silence": {"ratio_to_speech_std": 0.0}}}}}}


def test_headline_is_flat():
    h = headline(_res())
    assert h["mouth_r_neural"] == 0.5 and h["mouth_r_warp"] == 0.1
    assert h["quiet_silence_neural"] == 0.05 and h["psnr"] == 25.0 and h["classifier_f1"] == 0.8


def test_beats_needs_an_improvement_and_no_regression():
    shipped = _res()
    ok, why = beats(_res(psnr=25.3), shipped)
    assert ok and "psnr 25.000 -> 25.300" in why[0]
    ok, why = beats(_res(), shipped)
    assert not ok and why == ["no figure improves by its margin"]
    # The GRID mouth r is reported, no longer judged (real_beats judges the mouth on real media).
    assert not beats(_res(r_neural=0.9), shipped)[0] and beats(_res(r_neural=0.1, psnr=25.3), shipped)[0]
    assert not beats(_res(psnr=24.0, f1=0.85), shipped)[0]
    assert beats(_res(psnr=24.6, f1=0.85), shipped)[0]
    assert not beats(_res(psnr=25.3, f1=0.75), shipped)[0]
    assert beats(_res(f1=0.85), shipped)[0]
    assert not beats(_res(psnr=25.3, quiet=0.2), shipped)[0]
    # The shipped model already above the target: a candidate may not get worse on quiet input,
    # and getting better there counts.
    noisy_shipped = _res(quiet=0.20)
    assert beats(_res(psnr=25.3, quiet=0.21), noisy_shipped)[0]
    ok, why = beats(_res(psnr=25.3, quiet=0.26), noisy_shipped)
    assert not ok and "worse than the shipped" in why[0]
    ok, why = beats(_res(quiet=0.13), noisy_shipped)
    assert ok and why == ["quiet_silence_neural 0.200 -> 0.130"]
    # The AU classifier's F1 alone: +0.005 counts (its bootstrap SE is about 0.001), +0.004 does not.
    better_classifier = {**shipped, "classifier": {"mean_f1": 0.806}}
    ok, why = beats(better_classifier, shipped)
    assert ok and why == ["classifier_f1 0.800 -> 0.806"]
    assert not beats({**shipped, "classifier": {"mean_f1": 0.804}}, shipped)[0]
    assert not beats({**shipped, "classifier": {"mean_f1": 0.77}}, shipped)[0]


def _real(rs: dict[str, float], amp=1.0, sharp=0.9, chroma=0, renderer="warp", frames=100):
    """An eval-real result: one recording per speaker, r per recording."""
    recs = {k: {"r_open": r, "frames": frames} for k, r in rs.items()}
    pooled = float(np.mean(list(rs.values())))
    return {"recordings": {k: {"speaker": f"spk_{k}"} for k in rs},
            "renderers": {renderer: {"recordings": recs, "pooled_r": pooled, "amp": amp, "sharp_median": sharp,
                                     "max_chroma_gray": chroma}}}


def test_real_rule_is_paired_over_speakers_and_gated():
    from avatar_stream.training.scorecard import real_beats, real_difference

    rng = np.random.default_rng(0)
    base = {f"r{i}": float(v) for i, v in enumerate(rng.uniform(0.0, 0.4, 15))}
    shipped = _real(base, renderer="neural")
    better = _real({k: v + 0.1 for k, v in base.items()})
    diff, se = real_difference(better, shipped, "warp", "neural")
    assert diff == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-9)  # the same gain everywhere
    ok, why = real_beats(better, shipped, "warp", "neural")
    assert ok and "+0.100" in why[0]
    noisy = _real({k: v + (0.3 if i % 2 else -0.25) for i, (k, v) in enumerate(base.items())})
    ok, why = real_beats(noisy, shipped, "warp", "neural")
    assert not ok and "not an improvement" in why[0]
    worse = _real({k: v - 0.1 for k, v in base.items()})
    assert "below the shipped" in real_beats(worse, shipped, "warp", "neural")[1][0]
    for bad, what in ((dict(amp=0.5), "amp"), (dict(sharp=0.3), "sharp_median"), (dict(chroma=9), "max_chroma_gray")):
        ok, why = real_beats(_real({k: v + 0.1 for k, v in base.items()}, **bad), shipped, "warp", "neural")
        assert not ok and what in why[0]
    with pytest.raises(ValueError, match="share no recording"):
        real_difference(_real({"x": 0.1}), shipped, "warp", "neural")


def test_audio2au_f1_counts_every_labelled_test_frame(tmp_path):
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    n = 9
    for spk, voice in (("a-es_x", "es_x"), ("b-rs_y", "rs_y"), ("c-es_z", "es_z")):
        audio = (0.3 * rng.standard_normal(n * SAMPLES_PER_FRAME)).astype(np.float32)
        au = rng.uniform(0, 1, (n, 5)).astype(np.float32)
        au[0] = np.nan
        write_clip(tmp_path, spk, "u0", np.repeat(face[None], n, 0), audio, face, au=au, voice=voice)
    write_split(tmp_path, ["a-es_x"], ["b-rs_y", "c-es_z"])
    torch.manual_seed(0)
    model = TalkingHead(ModelConfig.tiny())
    ckpt = save_checkpoint(tmp_path / "ckpt", {"generator": model.state_dict()}, model.cfg)
    res = audio2au_f1(ckpt, tmp_path)
    assert res["frames"] == 2 * n
    assert set(res) == {"all", "espeak", "real", "voices", "frames"}
    assert {k: v["frames"] for k, v in res["voices"].items()} == {"rs_y": n, "es_z": n}
    assert res["real"]["per_au"]["AU10"]["frames"] == n - 1  # the NaN frame is not scored
    assert res["all"]["per_au"]["AU10"]["frames"] == 2 * (n - 1)


def _tiny_corpus(root, n=9):
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    for spk, voice in (("a-es_x", "es_x"), ("b-rs_y", "rs_y"), ("c-es_z", "es_z")):
        audio = (0.3 * rng.standard_normal(n * SAMPLES_PER_FRAME)).astype(np.float32)
        frames = np.clip(face[None].astype(int) + rng.integers(-20, 20, (n, 112, 112, 3)), 0, 255).astype(np.uint8)
        au = rng.uniform(0, 1, (n, 5)).astype(np.float32)
        write_clip(root, spk, "u0", frames, audio, face, au=au, voice=voice)
    write_split(root, ["a-es_x"], ["b-rs_y", "c-es_z"])


def test_generated_frames_of_two_models_are_judged_by_one_classifier(tmp_path):
    """same_classifier compares the classifiers' weights and options; ScoreOptions.judge scores
    a model's generated frames with another checkpoint's classifier as well (what
    compare_starter does when the candidate brings a new classifier)."""
    _tiny_corpus(tmp_path / "data")
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    gen = TalkingHead(cfg).state_dict()
    ckpt = lambda name, clf, c=cfg: save_checkpoint(tmp_path / name, {"generator": gen, "au_classifier": clf}, c)  # noqa: E731
    clf_a, clf_b = AUClassifier(cfg).state_dict(), AUClassifier(cfg).state_dict()
    a, a2, b = ckpt("a", clf_a), ckpt("a2", {k: v.clone() for k, v in clf_a.items()}), ckpt("b", clf_b)
    sym = ckpt("sym", clf_a, dataclasses.replace(cfg, au_clf_symmetric=True))
    assert same_classifier(a, a2) and not same_classifier(a, b) and not same_classifier(a, sym)
    opts = ScoreOptions(checkpoint=a, model_dir=None, data=tmp_path / "data")
    own = score(opts)["generator"]["au_f1"]
    res = score(dataclasses.replace(opts, judge=b))
    by_b = evaluate(EvalOptions(data=tmp_path / "data", checkpoint=a, au_classifier=b, face_metrics=False,
                                progress=False))["au_generated"]["mean_f1"]
    assert res["generator"]["au_f1_own_classifier"] == own and res["generator"]["au_judge"] == str(b)
    assert res["generator"]["au_f1"] == by_b != own and headline(res)["generated_au_f1"] == by_b


def test_ship_verdict_needs_no_regression_in_either_half_and_a_gain_in_one():
    from avatar_stream.training.scorecard import ship_verdict

    flat_s = (False, ["no figure improves by its margin"])
    flat_r = (False, ["real-media r changes by +0.010 (SE 0.030): not an improvement"])
    assert ship_verdict(flat_s, (True, ["real-media r 0.2 -> 0.4"])) == (True, ["real-media r 0.2 -> 0.4"])
    assert ship_verdict((True, ["psnr 25 -> 26"]), flat_r)[0]
    assert ship_verdict(None, (True, ["gain"]))[0]
    ok, why = ship_verdict((False, ["psnr 24.0 is more than 0.5 below the shipped 25.0"]), (True, ["gain"]))
    assert not ok and why == ["psnr 24.0 is more than 0.5 below the shipped 25.0"]
    ok, why = ship_verdict((True, ["psnr 25 -> 26"]), (False, ["warp amp 0.5 is outside 0.7..1.4"]))
    assert not ok and "amp" in why[0]
    assert not ship_verdict(flat_s, flat_r)[0]
    with pytest.raises(ValueError, match="nothing was scored"):
        ship_verdict(None, None)


def test_compare_starter_needs_the_synthetic_half_for_new_weights(load_script, tiny_export, tmp_path, capsys):
    compare = load_script("compare_starter")
    real = tmp_path / "real"
    real.mkdir()
    args = ["--checkpoint", str(tiny_export.checkpoint), "--model", str(tiny_export.out), "--real-data", str(real)]
    assert compare.main(args) == 2
    assert "--data is needed" in capsys.readouterr().err
    assert compare.main(["--checkpoint", str(tiny_export.checkpoint), "--model", str(tiny_export.out),
                         "--no-shipped"]) == 2
    assert "give --data" in capsys.readouterr().err
