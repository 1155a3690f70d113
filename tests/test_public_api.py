"""The package's front door: the names ``avatar_stream`` exports, the one error base, and
the rule that the runtime never imports torch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import avatar_stream
from avatar_stream import AvatarError


def test_every_public_name_resolves_and_is_documented():
    for name in avatar_stream.__all__:
        obj = getattr(avatar_stream, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("avatar_stream."), name
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        avatar_stream.Nope  # noqa: B018


def test_the_readme_example_runs_from_the_top_level_imports():
    from avatar_stream import DEMO_FACE, DEMO_SPEECH, Engine, load_audio, read_image

    engine = Engine(backend="cpu")
    stream = engine.create_stream(read_image(DEMO_FACE))
    stream.accept_waveform(load_audio(DEMO_SPEECH)[:16_000])
    frames = []
    while stream.is_ready():
        frames.append(stream.step())
    assert frames and frames[0].image.dtype.name == "uint8"


def _modules(package: str):
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        yield info.name


def test_every_deliberate_error_is_an_avatar_error():
    skip_optional = ("avatar_stream.integrations", "avatar_stream.export.torch_trt")
    errors = []
    for package in ("avatar_stream.engine", "avatar_stream.export", "avatar_stream.training"):
        for name in _modules(package):
            if name.startswith(skip_optional):
                continue
            mod = importlib.import_module(name)
            errors += [c for _, c in inspect.getmembers(mod, inspect.isclass)
                       if issubclass(c, Exception) and c.__module__ == name and c.__name__.endswith("Error")]
    assert len(errors) >= 15
    assert [e.__name__ for e in errors if not issubclass(e, AvatarError)] == []
    # The built-in type each always had is kept: old `except ValueError` still catches.
    from avatar_stream.engine.audio import AudioError
    from avatar_stream.engine.sinks import SinkError
    assert issubclass(AudioError, ValueError) and issubclass(SinkError, RuntimeError)


def test_the_runtime_never_imports_torch():
    """Every engine module and the public names load without torch (a deployment installs
    numpy + onnxruntime, not PyTorch)."""
    code = ("import sys, importlib, pkgutil, avatar_stream, avatar_stream.engine as e\n"
            "[getattr(avatar_stream, n) for n in avatar_stream.__all__]\n"
            "for m in pkgutil.walk_packages(e.__path__, 'avatar_stream.engine.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            "sys.exit(f'torch imported: {bad[:3]}' if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
