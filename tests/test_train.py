"""Training stages, exact mid-epoch resume, eval and torchrun, on a small labelled corpus
written with ``write_clip`` (a face photo whose mouth opens with the audio's loudness)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from avatar_stream.engine.timebase import SAMPLES_PER_FRAME
from avatar_stream.training.checkpoint import load_checkpoint, save_checkpoint
from avatar_stream.training.cli import main
from avatar_stream.training.loop import lr_factor
from avatar_stream.training.shards import write_clip, write_split

FRAMES = 12
# Tiny model, one TCSAN level (R = 1): CPU-fast, same code path as the paper model.
MODEL = ["--tiny", "--set", "tcsan_levels=1"]
FAST = ["--workers", "0", "--no-progress", "--val-batches", "1"]


def _corpus(root: Path, face: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    base = cv2.resize(face[20:300, 120:400], (112, 112), interpolation=cv2.INTER_AREA)
    for spk in ("s1", "s2"):
        for u in range(2):
            loud = rng.uniform(0, 1, FRAMES)
            t = np.arange(FRAMES * SAMPLES_PER_FRAME) / 16000
            env = np.repeat(loud, SAMPLES_PER_FRAME)
            audio = (0.5 * env * np.sin(2 * np.pi * (150 + 100 * u) * t)).astype(np.float32)
            frames = np.repeat(base[None], FRAMES, 0)
            for k in range(FRAMES):  # a dark mouth opening as tall as the sound is loud
                h = int(2 + 12 * loud[k])
                frames[k, 78 : 78 + h, 44:68] = 30
            au = np.clip(loud[:, None] * np.array([0.6, 0.8, 1.0, 1.2, 1.4]) - 0.1, 0, 1).astype(np.float32)
            au[3, :] = np.nan  # one frame without a label
            write_clip(root, spk, f"u{u}", frames, audio, base, au=au, au_label=(au >= 0.3))
    write_split(root, ["s1"], ["s2"])
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, astronaut) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus"), astronaut)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_stages_then_eval(corpus, tmp_path, capsys):
    au_run, clf_run, run = tmp_path / "au", tmp_path / "clf", tmp_path / "run"
    data = ["--data", str(corpus)]
    assert main(["pretrain-au", *data, "--out", str(au_run), "--steps", "2", "--batch", "2", *MODEL, *FAST]) == 0
    assert main(["pretrain-au-classifier", *data, "--out", str(clf_run), "--steps", "2", "--batch", "2",
                 *MODEL, *FAST]) == 0
    _, states, extra = load_checkpoint(au_run / "best")
    assert set(states) == {"audio2au"} and extra["stage"] == "pretrain-au"
    assert main(["train", *data, "--out", str(run), "--steps", "3", "--batch", "2", "--clip-len", "2", "--no-vgg",
                 "--audio2au", str(au_run / "best.safetensors"), "--au-classifier", str(clf_run / "best.safetensors"),
                 "--log-every", "1", "--ckpt-every", "2", "--image-every", "2", *MODEL, *FAST]) == 0
    log = _log(run)
    train_rows = [r for r in log if "train/total" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["train/au"] > 0 for r in train_rows)  # L_au is on: labels and a pretrained classifier
    assert all("val/total" in r for r in log if r not in train_rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb")).Reload().Tags()
    assert "samples" in tb["images"] and {"train/total", "train/au", "val/rec"} <= set(tb["scalars"])
    cfg, states, extra = load_checkpoint(run / "last")
    assert set(states) == {"generator", "au_classifier", "rng"}
    assert extra["loop"]["step"] == 3 and extra["world_size"] == 1 and cfg.tcsan_levels == 1
    assert states["rng"]["torch"].shape[0] == 1  # one RNG state per process
    # The pretrained Audio2AU went in (fine-tuned at 1e-6: still within 1e-3 of it).
    _, au_states, _ = load_checkpoint(au_run / "best")
    w0 = au_states["audio2au"]["0.lstm.weight_ih_l0"]
    assert float((states["generator"]["audio2au.0.lstm.weight_ih_l0"] - w0).abs().max()) < 1e-3
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", *data, "--checkpoint", str(run / "best.safetensors"), "--json", str(out),
                 "--no-face-metrics", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Table 5" in printed and "Table 6" in printed and "AU26" in printed
    res = json.loads(out.read_text())
    assert res["clips"] == 2 and res["frames"] == 2 * FRAMES and res["split"] == "test"
    assert 3 < res["psnr"] < 40 and 0 < res["ssim"] < 1
    for key in ("au_generated", "au_real"):
        assert res[key]["per_au"]["AU10"]["frames"] == 2 * (FRAMES - 1)  # the unlabelled frames are out
        assert 0 <= res[key]["mean_accuracy"] <= 1


@pytest.mark.parametrize("stage,module", [("pretrain-au", "audio2au"), ("pretrain-au-classifier", "au_classifier")])
def test_pretrain_init_starts_a_new_run_from_a_checkpoint(corpus, tmp_path, capsys, stage, module):
    """``pretrain-* --init CKPT``: the weights start as CKPT's, the step count and the best
    validation loss start afresh (a corpus change makes the old best loss meaningless)."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--data", str(corpus), "--batch", "2", *MODEL, *FAST]
    assert main([stage, *base, "--out", str(first), "--steps", "2"]) == 0
    _, before, _ = load_checkpoint(first / "last")
    # --lr 0: the second run's weights (not the batch-norm statistics) stay exactly the init's.
    assert main([stage, *base, "--out", str(second), "--steps", "1", "--lr", "0",
                 "--init", str(first / "last.safetensors")]) == 0
    _, after, extra = load_checkpoint(second / "last")
    assert extra["loop"]["step"] == 1 and extra["init"] == str(first / "last.safetensors")
    weights = [k for k in after[module] if "running_" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(after[module][k], before[module][k]) for k in weights)
    assert (second / "best.safetensors").exists()
    wrong = "audio2au" if module == "au_classifier" else "au_classifier"
    other = tmp_path / wrong
    assert main([{"audio2au": "pretrain-au", "au_classifier": "pretrain-au-classifier"}[wrong], *base,
                 "--out", str(other), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([stage, *base, "--out", str(tmp_path / "bad"), "--steps", "1",
                 "--init", str(other / "last.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"not {module!r}" in err[0]


@pytest.mark.parametrize("stage", ["pretrain-au", "pretrain-au-classifier"])
def test_pretrain_teacher_mixes_into_the_targets(corpus, tmp_path, capsys, stage):
    """``--teacher CKPT`` (distillation): a teacher of another width is read with its own config;
    at ``--teacher-weight 0`` the run is exactly the run without a teacher (same batches, same
    losses), at 1 the targets are the teacher's probabilities, so the losses differ."""
    base = ["--data", str(corpus), "--batch", "2", "--steps", "2", "--log-every", "1", *MODEL, *FAST]
    teacher = tmp_path / "teacher"
    assert main([stage, *base, "--out", str(teacher), "--width", "0.125"]) == 0  # narrower than --tiny

    def losses(name, *extra):
        assert main([stage, *base, "--out", str(tmp_path / name), *extra]) == 0
        return [r["train/bce"] for r in _log(tmp_path / name) if "train/bce" in r]

    plain = losses("plain")
    t = ["--teacher", str(teacher / "last.safetensors")]
    assert losses("w0", *t, "--teacher-weight", "0") == plain
    distilled = losses("w1", *t, "--teacher-weight", "1")
    assert len(distilled) == 2 and all(a != b for a, b in zip(distilled, plain, strict=True))
    _, _, extra = load_checkpoint(tmp_path / "w1" / "last")
    assert extra["teachers"] == [str(teacher / "last.safetensors")] and extra["teacher_weight"] == 1.0
    capsys.readouterr()
    assert main([stage, *base, "--out", str(tmp_path / "bad"), "--teacher", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--teacher" in err and "no such checkpoint" in err and "\n" not in err
    assert main([stage, *base, "--out", str(tmp_path / "bad"), *t, "--teacher-weight", "1.5"]) == 2
    assert "--teacher-weight 1.5" in capsys.readouterr().err
    # A teacher must name the same AUs in the same order (else its targets land on the wrong AU).
    cfg, states, extra = load_checkpoint(teacher / "last")
    swapped = dataclasses.replace(cfg, au_names=(cfg.au_names[1], cfg.au_names[0], *cfg.au_names[2:]))
    save_checkpoint(tmp_path / "reordered", states, swapped, extra=extra)
    assert main([stage, *base, "--out", str(tmp_path / "bad"), "--teacher", str(tmp_path / "reordered.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "au_names" in err and "\n" not in err


def test_reference_shift_is_recorded_and_needs_full_image_augmentation(corpus, tmp_path, capsys):
    """``--reference-shift PX`` sets --augment-images full's extra move of the identity image,
    is kept in the checkpoint, and is refused (one line, exit 2) without ``full``."""
    base = ["pretrain-au-classifier", "--data", str(corpus), "--batch", "2", "--steps", "1", *MODEL, *FAST,
            "--set", "au_clf_reference=true"]
    assert main([*base, "--out", str(tmp_path / "ok"), "--augment-images", "full", "--reference-shift", "0.25"]) == 0
    assert load_checkpoint(tmp_path / "ok" / "last")[2]["reference_shift"] == 0.25
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--augment-images", "--reference-shift", "0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference-shift 0.25" in err and "--augment-images full" in err and "\n" not in err
    assert main([*base, "--out", str(tmp_path / "bad"), "--augment-images", "full", "--reference-shift", "-1"]) == 2
    assert "--reference-shift -1" in capsys.readouterr().err
    # The deleted --aspect-jitter experiment is gone from the CLI.
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "asp"), "--augment-images", "full", "--aspect-jitter", "0.1"])


def test_soft_labels_follow_the_intensities(tmp_path, astronaut):
    """``--soft-labels TAU``: targets sigmoid((intensity - threshold) / TAU), on the right side of
    0.5 exactly where the 0/1 label is 1; refused for labels that are not thresholded intensities."""
    from avatar_stream.training.au_table import OCCURRENCE_THRESHOLDS, occurrence
    from avatar_stream.training.datasets import AudioAUDataset, AUFrameDataset
    from avatar_stream.training.shards import load_clip

    root = tmp_path / "soft"
    base = cv2.resize(astronaut[20:300, 120:400], (112, 112), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(3)
    for spk in ("s1", "s2"):
        au = rng.uniform(0, 1, (FRAMES, 5)).astype(np.float32)
        au[2, 1] = np.nan
        write_clip(root, spk, "u0", np.repeat(base[None], FRAMES, 0),
                   rng.normal(0, 0.1, FRAMES * SAMPLES_PER_FRAME).astype(np.float32), base,
                   au=au, au_label=occurrence(au))
    write_split(root, ["s1"], ["s2"])
    tau = 0.05
    for cls in (AUFrameDataset, AudioAUDataset):
        ds = cls(root, "train", per_item=FRAMES, soft_labels=tau)
        hard = cls(root, "train", per_item=FRAMES)
        _, y, v = ds[0]
        _, y0, v0 = hard[0]
        assert torch.equal(v, v0)
        idx = ds.frame_indices(0, 0)
        au = load_clip(root, ds.entries[0], ("au",))["au"][idx]
        want = 1.0 / (1.0 + np.exp(-(np.nan_to_num(au) - np.asarray(OCCURRENCE_THRESHOLDS)) / tau))
        known = v.numpy() > 0
        assert np.allclose(y.numpy()[known], want[known], atol=1e-6)
        assert np.array_equal((y.numpy() > 0.5)[known], y0.numpy()[known] > 0)
        assert float(y[2, 1]) == 0.0 and float(v[2, 1]) == 0.0  # unknown stays out
        assert 0 < float(y[known].min()) and float(y[known].max()) < 1 and not np.array_equal(y, y0)
    with pytest.raises(ValueError, match="not its intensities"):
        AUFrameDataset(corpus_root_with_other_thresholds(tmp_path, base), "train", soft_labels=tau)


def corpus_root_with_other_thresholds(tmp_path: Path, base: np.ndarray) -> Path:
    root = tmp_path / "other"
    au = np.full((FRAMES, 5), 0.25, np.float32)  # past AU10's threshold (0.20), labelled 0
    write_clip(root, "s1", "u0", np.repeat(base[None], FRAMES, 0), np.zeros(FRAMES * SAMPLES_PER_FRAME, np.float32),
               base, au=au, au_label=au >= 0.3)
    write_split(root, ["s1"], [])
    return root


def test_pretrain_init_widens_a_narrow_checkpoint(corpus, tmp_path, capsys):
    """``--init`` with a narrower classifier: the new run starts from the same function."""
    base = ["pretrain-au-classifier", "--data", str(corpus), "--batch", "2", "--tiny",
            "--workers", "0", "--no-progress", "--val-batches", "1"]
    assert main([*base, "--out", str(tmp_path / "narrow"), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "wide"), "--steps", "1", "--lr", "0",
                 "--set", "au_clf_width=0.25", "--init", str(tmp_path / "narrow" / "last.safetensors")]) == 0
    assert "widened" in capsys.readouterr().err
    from avatar_stream.training.models import AUClassifier

    clfs = []
    for run in ("narrow", "wide"):
        cfg, states, _ = load_checkpoint(tmp_path / run / "last")
        clf = AUClassifier(cfg).eval()
        clf.load_state_dict(states["au_classifier"])
        clfs.append(clf)
    assert clfs[1].convs[0].out_channels > clfs[0].convs[0].out_channels
    x = torch.rand(3, clfs[0].in_channels, 56, 112)
    with torch.no_grad():
        assert torch.allclose(clfs[0](x), clfs[1](x), atol=1e-5)
    assert main([*base, "--out", str(tmp_path / "bad"), "--steps", "1", "--set", "au_clf_width=0.0625",
                 "--init", str(tmp_path / "wide" / "last.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "narrower" in err and "\n" not in err


def test_resume_mid_epoch_gives_the_same_next_losses(corpus, tmp_path):
    # 2 train clips x 6 windows of 2 frames = 12 samples, batch 2: 6 steps per epoch, so step 2
    # is mid-epoch and steps 3..4 must match an uninterrupted run exactly. On CUDA (--device
    # auto picks it) cuDNN's backward kernels are not bit-reproducible: on an H100 step 3
    # differed by 4e-6 relative, so there the match is to 1e-5 (a wrong data order or RNG
    # state changes the loss by ~1e-2, see a[3] != a[4]).
    args = ["--data", str(corpus), "--batch", "2", "--clip-len", "2", "--no-vgg", "--log-every", "1",
            "--ckpt-every", "100", "--seed", "7", *MODEL, *FAST]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--out", str(full), "--steps", "4", *args]) == 0
    assert main(["train", "--out", str(part), "--steps", "2", *args]) == 0
    loop = json.loads((part / "last.json").read_text())["extra"]["loop"]
    assert (loop["step"], loop["epoch"], loop["position"]) == (2, 0, 2)
    assert main(["train", "--out", str(part), "--steps", "4", "--resume", *args]) == 0
    a = {r["step"]: r["train/total"] for r in _log(full) if "train/total" in r}
    b = {r["step"]: r["train/total"] for r in _log(part) if "train/total" in r}
    tol = 1e-5 * abs(a[3]) if torch.cuda.is_available() else 0.0
    assert abs(b[3] - a[3]) <= tol and abs(b[4] - a[4]) <= tol, (a, b)
    assert a[3] != a[4]  # a real sequence of different batches, not a constant
    # A different seed changes the data order and the initial weights: another loss.
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--steps", "1", *[x if x != "7" else "8" for x in args]]) == 0
    assert _log(other)[0]["train/total"] != a[1]


def test_cosine_schedule_resumes_exactly(corpus, tmp_path, monkeypatch):
    """--lr-schedule cosine: a run of 4 steps stopped after its step-2 checkpoint and resumed
    takes steps 3..4 with the same learning rates and losses as the uninterrupted run."""
    import avatar_stream.training.loop as loop

    args = ["pretrain-au", "--data", str(corpus), "--batch", "2", "--log-every", "1", "--ckpt-every", "2",
            "--seed", "7", "--steps", "4", "--lr-schedule", "cosine", *MODEL, *FAST]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*args, "--out", str(full)]) == 0
    calls, real = [], loop.mean_across

    def stop_at_step_3(info, losses):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(info, losses)

    monkeypatch.setattr(loop, "mean_across", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(part)])
    monkeypatch.setattr(loop, "mean_across", real)
    assert main([*args, "--out", str(part), "--resume"]) == 0
    a = {r["step"]: (r["train/total"], r["lr_factor"]) for r in _log(full) if "train/total" in r}
    b = {r["step"]: (r["train/total"], r["lr_factor"]) for r in _log(part) if "train/total" in r}
    tol = 1e-5 * abs(a[3][0]) if torch.cuda.is_available() else 0.0  # cuDNN: see the test above
    assert all(abs(b[s][0] - a[s][0]) <= tol and b[s][1] == a[s][1] for s in (3, 4)), (a, b)
    assert [a[s][1] for s in (1, 2, 3, 4)] == pytest.approx([lr_factor("cosine", s, 4) for s in range(4)])


def test_lr_factor():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert 0 < lr_factor("cosine", 9, 10) < 0.03
    with pytest.raises(ValueError, match="cosine"):
        lr_factor("linear", 0, 10)


def test_train_errors_are_one_line(corpus, tmp_path, capsys):
    base = ["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "1", *MODEL, *FAST]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "--vgg-weights" in err and "\n" not in err
    assert main([*base, "--vgg-weights", str(tmp_path / "missing.pth")]) == 2
    assert "VGG-19 weights not found" in capsys.readouterr().err
    assert main([*base, "--no-vgg", "--clip-len", "50"]) == 2
    assert "--clip-len" in capsys.readouterr().err
    assert main([*base, "--no-vgg", "--lr-schedule", "linear"]) == 2
    assert "learning-rate schedule 'linear'" in capsys.readouterr().err
    assert main([*base, "--no-vgg", "--batch", "2", "--clip-len", "2"]) == 0
    capsys.readouterr()
    changed = [x if x != "tcsan_levels=1" else "tcsan_levels=2" for x in base]
    assert main([*changed, "--no-vgg", "--batch", "2", "--clip-len", "2", "--resume"]) == 2
    assert "another model config" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(corpus, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "avatar_stream.training.cli", "train", "--data", str(corpus), "--out", str(run),
           "--steps", "3", "--batch", "1", "--clip-len", "2", "--no-vgg", "--log-every", "1", "--ckpt-every", "2",
           "--device", "cpu", *MODEL, *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, states, extra = load_checkpoint(run / "last")
    assert extra["world_size"] == 2 and extra["loop"]["step"] == 3
    assert states["rng"]["torch"].shape[0] == 2  # both ranks' RNG states
    # Only rank 0 wrote: one line per step, no duplicates.
    steps = [r["step"] for r in _log(run) if "train/total" in r]
    assert steps == [1, 2, 3]
    # Resume under torchrun continues at step 4 with both ranks' RNG restored.
    proc = subprocess.run([*cmd[:cmd.index("--steps") + 1], "4", *cmd[cmd.index("--steps") + 2:], "--resume"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {r["step"]: r["train/total"] for r in _log(run) if "train/total" in r}
    assert sorted(resumed) == [1, 2, 3, 4]
    # ... with the loss an uninterrupted 2-process run has at step 4.
    full = tmp_path / "ddp_full"
    cmd_full = [*cmd[:cmd.index("--out") + 1], str(full), *cmd[cmd.index("--out") + 2:]]
    cmd_full[cmd_full.index("--steps") + 1] = "4"
    proc = subprocess.run(cmd_full, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["step"]: r["train/total"] for r in _log(full) if "train/total" in r} == resumed
    out = tmp_path / "eval.json"
    assert main(["eval", "--data", str(corpus), "--checkpoint", str(run / "last"), "--json", str(out),
                 "--no-face-metrics", "--no-progress"]) == 0
    assert json.loads(out.read_text())["frames"] == 2 * FRAMES


def test_freeze_audio_trains_the_image_side_only(corpus, tmp_path):
    """``train --init CKPT --freeze-audio``: the audio encoder and Audio2AU (weights and
    batch-norm statistics) come out exactly as CKPT's, so its audio graph and a mouth head
    reading it stay valid; the decoder trains."""
    first, second = tmp_path / "first", tmp_path / "second"
    data = ["--data", str(corpus), "--batch", "2", "--clip-len", "2", "--no-vgg", *MODEL, *FAST]
    assert main(["train", *data, "--out", str(first), "--steps", "1"]) == 0
    assert main(["train", *data, "--out", str(second), "--steps", "3", "--freeze-audio",
                 "--init", str(first / "last.safetensors")]) == 0
    a = load_checkpoint(first / "last")[1]["generator"]
    b = load_checkpoint(second / "last")[1]["generator"]
    audio = [k for k in a if k.startswith(("audio_encoder.", "audio2au."))]
    assert any("running_mean" in k for k in audio)
    assert all(torch.equal(a[k], b[k]) for k in audio)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert main(["train", *data, "--out", str(tmp_path / "x"), "--steps", "1", "--freeze-audio"]) == 2
