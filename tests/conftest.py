"""Shared fixtures. Data that tests need is made here (espeak-ng speech, the scikit-image
astronaut) or read from ../shared/data, which only development machines have."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (development media). Skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (development media; not part of a fresh clone)")
    return SHARED_DATA


def _espeak_wav(text: str, path: Path, voice: str = "en-us", rate: int = 160) -> Path:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: run `make test`, which installs it with apt")
    subprocess.run([exe, "-v", voice, "-s", str(rate), "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """A real speech recording made by espeak-ng (22.05 kHz mono wav, ~3 s)."""
    d = tmp_path_factory.mktemp("speech")
    return _espeak_wav("bin blue at f two now, place red with p nine again", d / "speech.wav")


@pytest.fixture(scope="session")
def make_speech(tmp_path_factory):
    """Factory: ``make_speech(text, voice='en-us', rate=160) -> Path`` of an espeak-ng wav."""
    d = tmp_path_factory.mktemp("speech_many")
    counter = iter(range(10**6))

    def make(text: str, voice: str = "en-us", rate: int = 160) -> Path:
        return _espeak_wav(text, d / f"s{next(counter)}.wav", voice, rate)

    return make


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """The scikit-image astronaut photo, RGB uint8 (512, 512, 3): a real face shipped by a package."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised TalkingHead exported with avatar-export's pipeline
    (three graphs with model cards, parity-gated). Seeded: the same weights every run."""
    import torch

    from avatar_stream.export.onnx_export import ExportOptions, export_model
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.models import TalkingHead

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    export_model(TalkingHead(ModelConfig.tiny()), out, ExportOptions(), checkpoint_sha256="0" * 64,
                 log=lambda *a, **k: None)
    return out


def _trained_like(model, seed: int = 0):
    """Give a random TalkingHead the activation scale of a trained one, so that tests can see
    its output move with the audio (PyTorch's default init leaves the frame almost constant:
    frame-to-frame changes of 1e-5). Kaiming-normal conv/linear weights, then batch-norm
    statistics measured on the bundled face and speech, as training would leave them."""
    import torch
    from avatar_stream import ASSETS
    from avatar_stream.engine.audio import load_audio
    from avatar_stream.engine.image_io import read_image
    from avatar_stream.training.mfcc import mfcc_windows
    from torch import nn

    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batch
    face = torch.from_numpy(read_image(ASSETS / "face.jpg")).permute(2, 0, 1)[None].float() / 255.0
    face = torch.nn.functional.interpolate(face, size=(model.cfg.image_size,) * 2, mode="area")
    model.train()
    with torch.no_grad():
        model.frame_features(mfcc_windows(load_audio(ASSETS / "speech.wav")))
        model.encode_identity(torch.cat([face, face.flip(-1)]))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny TalkingHead with trained-like activations, saved as a checkpoint and exported by the
    ``avatar-export`` CLI (fp32, parity-gated). SimpleNamespace(model, checkpoint, out, stdout)."""
    import contextlib
    import io
    from types import SimpleNamespace

    import torch
    from avatar_stream.export.cli import main
    from avatar_stream.training.checkpoint import build_model_from_checkpoint, save_checkpoint
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.models import TalkingHead

    torch.manual_seed(0)
    model = _trained_like(TalkingHead(ModelConfig.tiny()))
    d = tmp_path_factory.mktemp("tiny_export")
    ckpt = save_checkpoint(d / "ckpt" / "tiny", {"generator": model.state_dict()}, model.cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--checkpoint", str(ckpt), "--out", str(d / "model")])
    assert rc == 0, buf.getvalue()
    return SimpleNamespace(model=build_model_from_checkpoint(ckpt), checkpoint=ckpt, out=d / "model",
                           stdout=buf.getvalue())


def _trained_like(model, seed: int = 0):
    """Give a random TalkingHead the activation scale of a trained one, so that tests can see
    its output move with the audio (PyTorch's default init leaves the frame almost constant:
    frame-to-frame changes of 1e-5). Kaiming-normal conv/linear weights, then batch-norm
    statistics measured on the bundled face and speech, as training would leave them."""
    import torch
    from avatar_stream import ASSETS
    from avatar_stream.engine.audio import load_audio
    from avatar_stream.engine.image_io import read_image
    from avatar_stream.training.mfcc import mfcc_windows
    from torch import nn

    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batch
    face = torch.from_numpy(read_image(ASSETS / "face.jpg")).permute(2, 0, 1)[None].float() / 255.0
    face = torch.nn.functional.interpolate(face, size=(model.cfg.image_size,) * 2, mode="area")
    model.train()
    with torch.no_grad():
        model.frame_features(mfcc_windows(load_audio(ASSETS / "speech.wav")))
        model.encode_identity(torch.cat([face, face.flip(-1)]))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny TalkingHead with trained-like activations, saved as a checkpoint and exported by the
    ``avatar-export`` CLI (fp32, parity-gated). SimpleNamespace(model, checkpoint, out, stdout)."""
    import contextlib
    import io
    from types import SimpleNamespace

    import torch
    from avatar_stream.export.cli import main
    from avatar_stream.training.checkpoint import build_model_from_checkpoint, save_checkpoint
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.models import TalkingHead

    torch.manual_seed(0)
    model = _trained_like(TalkingHead(ModelConfig.tiny()))
    d = tmp_path_factory.mktemp("tiny_export")
    ckpt = save_checkpoint(d / "ckpt" / "tiny", {"generator": model.state_dict()}, model.cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--checkpoint", str(ckpt), "--out", str(d / "model")])
    assert rc == 0, buf.getvalue()
    return SimpleNamespace(model=build_model_from_checkpoint(ckpt), checkpoint=ckpt, out=d / "model",
                           stdout=buf.getvalue())
