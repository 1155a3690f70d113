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
def load_script():
    """``load_script("name")``: scripts/name.py imported as a module (scripts/ is not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


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
def tiny_model_dir(tiny_export) -> Path:
    """The exported model directory of ``tiny_export`` (three graphs with model cards)."""
    return tiny_export.out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny TalkingHead with trained-like activations (``export.measure.trained_like``: with
    PyTorch's default init the frame hardly moves with the audio, so streaming/precision tests
    could not see a mistake), saved as a checkpoint and exported by the ``avatar-export`` CLI
    (fp32, parity-gated). SimpleNamespace(model, checkpoint, out, stdout)."""
    import contextlib
    import io
    from types import SimpleNamespace

    import torch

    from avatar_stream.export.cli import main
    from avatar_stream.export.measure import trained_like
    from avatar_stream.training.checkpoint import build_model_from_checkpoint, save_checkpoint
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.models import TalkingHead

    torch.manual_seed(0)
    model = trained_like(TalkingHead(ModelConfig.tiny()))
    d = tmp_path_factory.mktemp("tiny_export")
    ckpt = save_checkpoint(d / "ckpt" / "tiny", {"generator": model.state_dict()}, model.cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--checkpoint", str(ckpt), "--out", str(d / "model")])
    assert rc == 0, buf.getvalue()
    return SimpleNamespace(model=build_model_from_checkpoint(ckpt), checkpoint=ckpt, out=d / "model",
                           stdout=buf.getvalue())


def write_alsa_home(home: Path, infile: Path | None) -> Path:
    """A HOME whose .asoundrc makes ALSA's default capture device read ``infile`` (raw s16le
    mono) through a file PCM: a real PortAudio microphone without hardware
    (../shared/ENVIRONMENT.md). ``infile`` None: no .asoundrc, i.e. no input device here."""
    home.mkdir(parents=True, exist_ok=True)
    if infile is not None:
        (home / ".asoundrc").write_text(
            'pcm.!default { type plug slave.pcm "wavin" }\n'
            f'pcm.wavin {{ type file slave.pcm "null" file "/dev/null" infile "{infile}" format "raw" }}\n'
        )
    return home


@pytest.fixture
def alsa_home(tmp_path):
    """Factory: ``alsa_home(infile) -> HOME folder`` (see ``write_alsa_home``)."""
    return lambda infile: write_alsa_home(tmp_path / "alsa_home", infile)
