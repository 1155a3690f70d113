"""engine/card.py and engine/runners/: the card validator, the one runner interface, provider
fallback, TensorRT engine sidecars. GPU paths are marked ``gpu`` and skip without one."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from avatar_stream.engine import runners
from avatar_stream.engine.card import (
    CARD_KEY,
    GRAPH_FILES,
    ModelCardError,
    card_from_dict,
    card_from_metadata,
    load_model_dir,
    read_card,
)
from avatar_stream.engine.runners import OrtRunner, RunnerError, TrtRunner, make_runner

RUNNER_PROPERTIES = ("input_names", "output_names", "providers", "batch_limit")


def _has_trt() -> bool:
    try:
        runners.import_trt()
    except RunnerError:
        return False
    return runners.gpu_name() is not None


requires_trt = pytest.mark.skipif(not _has_trt(), reason="needs TensorRT 10+, cuda-python and an NVIDIA GPU")


# ---------------------------------------------------------------------------- interface


def test_runners_expose_identical_signatures():
    assert inspect.signature(OrtRunner.run) == inspect.signature(TrtRunner.run)
    for name in RUNNER_PROPERTIES:
        a, b = getattr(OrtRunner, name), getattr(TrtRunner, name)
        assert isinstance(a, property) and isinstance(b, property), name
        assert inspect.signature(a.fget) == inspect.signature(b.fget), name
    # both satisfy the Protocol the engine codes against
    assert inspect.signature(OrtRunner.close) == inspect.signature(TrtRunner.close)
    assert {n for n, _ in inspect.getmembers(runners.Runner) if not n.startswith("_")} >= {
        "run", "close", *RUNNER_PROPERTIES}


def test_ort_runner_cpu(tiny_export):
    r = OrtRunner(tiny_export.out / "audio.onnx")
    assert isinstance(r, runners.Runner)
    assert r.providers == ("CPUExecutionProvider",) and r.fallback is None
    assert r.input_names == ("pcm",) and r.output_names == ("feat", "au_prob")
    out = r.run({"pcm": np.zeros((3, 4720), np.float64)})  # converted to float32 at the boundary
    assert list(out) == ["feat", "au_prob"] and out["feat"].dtype == np.float32
    assert out["au_prob"].shape == (3, 5) and ((out["au_prob"] >= 0) & (out["au_prob"] <= 1)).all()


def test_ort_runner_rejects_bad_inputs(tiny_export):
    r = OrtRunner(tiny_export.out / "tcsan_decoder.onnx")
    with pytest.raises(RunnerError, match=r"takes inputs \['feats', 'f_id', 'skip0'"):
        r.run({"feats": np.zeros((1, 15, 8), np.float32)})
    ident = OrtRunner(tiny_export.out / "identity.onnx")
    with pytest.raises(RunnerError, match=r"'face' has shape \(1, 3, 64, 64\), expected \['B', 3, 112, 112\]"):
        ident.run({"face": np.zeros((1, 3, 64, 64), np.float32)})


@pytest.mark.parametrize("backend", ["cuda", "tensorrt"])
def test_provider_fallback_is_reported(tiny_export, tmp_path, backend):
    import onnxruntime as ort

    if runners.ORT_BACKENDS[backend] in ort.get_available_providers():
        pytest.skip(f"{backend} is available here, so there is no fallback to observe")
    r = OrtRunner(tiny_export.out / "identity.onnx", backend, cache_dir=tmp_path)
    assert r.providers[0] == "CPUExecutionProvider"
    assert r.fallback and runners.ORT_BACKENDS[backend] in r.fallback and "CPUExecutionProvider" in r.fallback
    with pytest.raises(RunnerError, match=f"asked for {runners.ORT_BACKENDS[backend]}"):
        OrtRunner(tiny_export.out / "identity.onnx", backend, cache_dir=tmp_path, require=True)


def test_make_runner_and_backends(tiny_export):
    assert "cpu" in runners.available_backends()
    assert isinstance(make_runner(tiny_export.out / "audio.onnx", "cpu"), OrtRunner)
    with pytest.raises(RunnerError, match="unknown backend 'gpu'"):
        make_runner(tiny_export.out / "audio.onnx", "gpu")


def test_ort_tensorrt_provider_needs_libnvinfer(monkeypatch):
    """onnxruntime-gpu lists its TensorRT provider without TensorRT installed (seen on an H100:
    the session then ran CUDA): ``tensorrt`` is offered only where libnvinfer is found."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runners, "import_trt", lambda: (_ for _ in ()).throw(RunnerError("no tensorrt")))
    monkeypatch.setattr(runners, "tensorrt_version", lambda: None)
    assert runners.available_backends() == ("cuda", "cpu")
    monkeypatch.setattr(runners, "tensorrt_version", lambda: "10.13.0")
    assert runners.available_backends() == ("tensorrt", "cuda", "cpu")


def test_load_model_never_runs_another_backend_than_asked(tiny_model_dir, monkeypatch, caplog):
    """A backend named by the user must run as asked (onnxruntime would quietly fall back to
    the CPU); ``auto`` goes on to the next backend whose sessions start. The audio graph is
    on the CPU unless ``audio_backend="same"``."""
    import onnxruntime as ort

    from avatar_stream.engine import model as model_mod

    with pytest.raises(model_mod.BackendError, match="unknown audio backend 'gpu'"):
        model_mod.load_model(tiny_model_dir, "cpu", audio_backend="gpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA runs here, so there is no fallback to observe")
    monkeypatch.setattr(model_mod, "available_backends", lambda: ("cuda", "cpu"))
    with pytest.raises(model_mod.BackendError, match="identity.onnx: asked for CUDAExecutionProvider"):
        model_mod.load_model(tiny_model_dir, "cuda", audio_backend="same")
    with pytest.raises(model_mod.BackendError, match="identity.onnx: asked for CUDAExecutionProvider"):
        model_mod.load_model(tiny_model_dir, "cuda")  # identity and decoder still ask for CUDA
    with caplog.at_level("WARNING", logger="avatar_stream.engine.model"):
        m = model_mod.load_model(tiny_model_dir, "auto")
    assert m.backend == "cpu" and m.decoder.providers[0] == m.audio.providers[0] == "CPUExecutionProvider"
    assert "backend cuda did not start" in caplog.text and "trying cpu" in caplog.text


def test_onnxruntime_session_errors_are_runner_errors(tmp_path, monkeypatch):
    """onnxruntime raises its own Exception types (Fail, EPFail): the runner turns them into
    RunnerError, so ``auto`` can go on to the next backend and the CLI prints one line."""
    bad = tmp_path / "audio.onnx"
    bad.write_bytes(b"not an onnx file")
    monkeypatch.setattr(runners.ort, "read_card", lambda path: None)  # reach the session without a card
    with pytest.raises(RunnerError, match="audio.onnx: onnxruntime could not start a cpu session"):
        OrtRunner(bad)


def test_batches_over_a_runner_limit_are_split(tiny_model_dir):
    """Engines with a batch limit (TensorRT profiles) get big batches in pieces; the result is
    the same as one call."""
    from avatar_stream.engine.model import load_model, run_batched

    m = load_model(tiny_model_dir, "cpu")

    class Limited:
        batch_limit = 2
        calls: list[int] = []

        def run(self, feed):
            n = next(iter(feed.values())).shape[0]
            assert n <= 2
            self.calls.append(n)
            return m.audio.run(feed)

    pcm = (0.1 * np.random.default_rng(1).standard_normal((5, 4720))).astype(np.float32)
    want = m.audio.run({"pcm": pcm})
    got = run_batched(Limited(), {"pcm": pcm})
    assert Limited.calls == [2, 2, 1]
    assert all(np.abs(got[k] - want[k]).max() <= 1e-6 for k in want)


def test_frame_graph_beside_a_gpu_gets_few_sleeping_threads(tiny_model_dir, monkeypatch):
    """With the decoder on a GPU, the CPU frame session gets AUDIO_CPU_THREADS threads that
    do not spin (measured on an H100: spinning threads slowed the paste-back); on an all-CPU
    backend it keeps onnxruntime's thread count, and its idle threads sleep too. The
    non-spinning session computes the same."""
    from avatar_stream.engine import model as model_mod

    asked: list[tuple[str, str, dict]] = []

    def fake(path, backend, **opts):
        asked.append((Path(path).stem, backend, opts))
        return OrtRunner(path, "cpu", **{k: v for k, v in opts.items() if k != "require"})

    monkeypatch.setattr(model_mod, "make_runner", fake)
    monkeypatch.setattr(model_mod, "resolve_backend", lambda b: b)
    model_mod.load_model(tiny_model_dir, "cuda")
    assert asked == [("identity", "cuda", {"require": True}),
                     ("audio", "cpu", {"require": True, "threads": min(model_mod.AUDIO_CPU_THREADS, os.cpu_count()),
                                       "spin": False}),
                     ("tcsan_decoder", "cuda", {"require": True})]
    asked.clear()
    model_mod.load_model(tiny_model_dir, "cpu")
    assert [opts for _, _, opts in asked] == [{"require": True, "spin": False}] * 3
    pcm = (0.1 * np.random.default_rng(0).standard_normal((3, 4720))).astype(np.float32)
    a = OrtRunner(tiny_model_dir / "audio.onnx").run({"pcm": pcm})
    b = OrtRunner(tiny_model_dir / "audio.onnx", threads=2, spin=False).run({"pcm": pcm})
    assert all(np.abs(a[k] - b[k]).max() <= 1e-6 for k in a)


def test_caches_go_to_the_user_cache_when_the_model_dir_is_read_only(tiny_export, tmp_path, monkeypatch):
    """The starter lives in site-packages, often read-only: TensorRT caches move to
    $XDG_CACHE_HOME/avatar-stream/<model folder>-<hash>/."""
    d = tiny_export.out
    assert runners.writable_dir(d / "tensorrt") == d / "tensorrt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runners.gpu.os, "access", lambda path, mode: Path(path) != d)
    moved = runners.writable_dir(d / "tensorrt")
    assert moved.parent.parent == tmp_path / "cache" / "avatar-stream" and moved.name == "tensorrt"
    assert moved.parent.name.startswith(d.name + "-") and moved == runners.writable_dir(d / "tensorrt")
    assert runners.engine_paths(d / "audio.onnx", "fp16")[0] == moved / "audio.fp16.engine"
    card = runners.ort.read_card(d / "audio.onnx")
    trt_ep = runners.ort._ort_providers("tensorrt", card, d / "audio.onnx", None, True, 4)[0][1]
    assert Path(trt_ep["trt_engine_cache_path"]).parent == moved.parent / "trt_cache"


def test_trt_runner_without_tensorrt_says_what_to_install(tiny_export):
    if _has_trt():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(RunnerError, match="tensorrt and cuda-python"):
        TrtRunner(tiny_export.out / "audio.onnx")


def test_trt_cache_key_names_gpu_and_version(monkeypatch):
    monkeypatch.setattr(runners.gpu, "gpu_name", lambda device=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(runners.gpu, "tensorrt_version", lambda: "10.13.0.35")
    assert runners.trt_cache_key() == "NVIDIA-H100-80GB-HBM3_trt10.13.0.35"


# ---------------------------------------------------------------------------- card


def _card_dict(tiny_export) -> dict:
    return read_card(tiny_export.out / "audio.onnx").to_dict()


@pytest.mark.parametrize("key, value", [
    ("format", "other-card"), ("card_version", 1), ("sample_rate", 22050), ("fps", 30),
    ("window_samples", 4800), ("window_offset", -2000), ("samples_per_frame", 533),
    ("au_order", ["AU10", "AU12", "AU20", "AU25", "AU26"]), ("image_size", 128),
])
def test_card_refuses_what_it_does_not_know(tiny_export, key, value):
    data = _card_dict(tiny_export)
    data[key] = value
    with pytest.raises(ModelCardError) as err:
        card_from_dict(data, "audio.onnx")
    msg = str(err.value)
    assert f"card {key}={value!r}" in msg and "re-export with this version of avatar-export" in msg
    assert "\n" not in msg


def test_card_consistency_checks(tiny_export):
    data = _card_dict(tiny_export)
    data["receptive_field"] = 13
    with pytest.raises(ModelCardError, match="receptive_field=13 is not 2\\*lookahead_frames\\+1"):
        card_from_dict(data)
    data = _card_dict(tiny_export)
    data["outputs"] = {"au_prob": ["B", 5], "feat": data["outputs"]["feat"]}
    with pytest.raises(ModelCardError, match="expected \\['pcm'\\] / \\['feat', 'au_prob'\\]"):
        card_from_dict(data)
    data = _card_dict(tiny_export)
    del data["parity"]
    with pytest.raises(ModelCardError, match="lacks parity"):
        card_from_dict(data)
    with pytest.raises(ModelCardError, match="no 'avatar_stream.card' metadata"):
        card_from_metadata({}, "x.onnx")


def test_card_is_frozen_and_round_trips(tiny_export):
    card = read_card(tiny_export.out / "audio.onnx")
    with pytest.raises(AttributeError):
        card.fps = 30
    with pytest.raises(TypeError):
        card.inputs["pcm"] = ("B", 1)
    assert card_from_dict(json.loads(card.to_json())) == card


def test_load_model_dir_errors(tiny_export, tmp_path):
    with pytest.raises(ModelCardError, match="does not exist: run avatar-export"):
        load_model_dir(tmp_path / "nowhere")
    d = tmp_path / "partial"
    d.mkdir()
    shutil.copy(tiny_export.out / "identity.onnx", d / "identity.onnx")
    with pytest.raises(ModelCardError, match=r"audio\.onnx is missing"):
        load_model_dir(d)
    # a graph file holding another graph's card
    shutil.copy(tiny_export.out / "identity.onnx", d / "audio.onnx")
    shutil.copy(tiny_export.out / "tcsan_decoder.onnx", d / "tcsan_decoder.onnx")
    with pytest.raises(ModelCardError, match="carries the card of graph 'identity', not 'audio'"):
        load_model_dir(d)


def test_an_export_of_card_version_1_says_to_re_export(tiny_export, tmp_path):
    """Version 1 named the audio graph "frame" (frame.onnx): such a directory, or a graph
    whose card says version 1, gets one line saying to re-export."""
    import onnx

    d = tmp_path / "v1"
    shutil.copytree(tiny_export.out, d)
    (d / "audio.onnx").rename(d / "frame.onnx")
    with pytest.raises(ModelCardError, match=r"older avatar-export \(model card version 1.*re-export"):
        load_model_dir(d)
    (d / "frame.onnx").rename(d / "audio.onnx")
    model = onnx.load(str(d / "identity.onnx"))
    entry = next(p for p in model.metadata_props if p.key == CARD_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "card_version": 1})
    onnx.save(model, str(d / "identity.onnx"))
    with pytest.raises(ModelCardError, match="card_version=1 but this engine expects 2: re-export"):
        load_model_dir(d)


def test_load_model_dir_refuses_mixed_exports(tiny_export, tmp_path):
    import onnx

    d = tmp_path / "mixed"
    shutil.copytree(tiny_export.out, d)
    model = onnx.load(str(d / "audio.onnx"))
    entry = next(p for p in model.metadata_props if p.key == CARD_KEY)
    data = json.loads(entry.value)
    data["checkpoint_sha256"] = "f" * 64
    entry.value = json.dumps(data)
    onnx.save(model, str(d / "audio.onnx"))
    with pytest.raises(ModelCardError, match="graphs disagree on checkpoint_sha256"):
        load_model_dir(d)
    assert set(load_model_dir(tiny_export.out)) == set(GRAPH_FILES)


# ---------------------------------------------------------------------------- TensorRT sidecars


def test_sidecar_mismatch_reasons(tmp_path):
    engine, sidecar = tmp_path / "frame.fp16.engine", tmp_path / "frame.fp16.engine.json"
    want = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H100", "precision": "fp16", "onnx_sha256": "ab",
            "batch_max": 8}
    assert runners.sidecar_mismatch(engine, sidecar, want) == "no engine built yet"
    engine.write_bytes(b"engine")
    assert "is missing" in runners.sidecar_mismatch(engine, sidecar, want)
    sidecar.write_text(json.dumps({**want, "gpu": "NVIDIA A100", "tensorrt_version": "10.3.0"}))
    reason = runners.sidecar_mismatch(engine, sidecar, want)
    assert "gpu 'NVIDIA A100' != 'NVIDIA H100'" in reason and "tensorrt_version '10.3.0' != '10.13.0'" in reason
    sidecar.write_text(json.dumps({**want, "opt_batch": 1}))
    assert runners.sidecar_mismatch(engine, sidecar, want) is None


def test_engine_paths_per_precision(tiny_export):
    e16, s16 = runners.engine_paths(tiny_export.out / "audio.onnx", "fp16")
    assert e16 == tiny_export.out / "tensorrt" / "audio.fp16.engine" and s16.name == "audio.fp16.engine.json"
    assert runners.engine_paths(tiny_export.out / "audio.onnx", "fp32")[0].name == "audio.fp32.engine"


@pytest.mark.gpu
@requires_trt
def test_trt_runner_matches_onnxruntime_and_rebuilds_on_mismatch(tiny_export, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_export.out, d)
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal((4, 4720))).astype(np.float32)
    ref = OrtRunner(d / "audio.onnx").run({"pcm": pcm})
    with TrtRunner(d / "audio.onnx", fp16=False, batch_max=4) as trt:
        assert trt.providers[0].startswith("TensorRT")
        for b in (1, 4):
            got = trt.run({"pcm": pcm[:b]})
            for k in ref:
                assert np.abs(got[k] - ref[k][:b]).max() <= 1e-3 * max(1.0, np.abs(ref[k]).max())
        engine = trt.engine_path
    sidecar = engine.with_suffix(".engine.json")
    data = json.loads(sidecar.read_text())
    data["tensorrt_version"] = "0.0.0"
    sidecar.write_text(json.dumps(data))
    before = engine.stat().st_mtime_ns
    with TrtRunner(d / "audio.onnx", fp16=False, batch_max=4) as trt:  # must rebuild, not load
        trt.run({"pcm": pcm[:1]})
    assert engine.stat().st_mtime_ns != before
    assert json.loads(sidecar.read_text())["tensorrt_version"] == runners.tensorrt_version()


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu with the CUDA provider")
def test_ort_cuda_matches_cpu(tiny_export):
    feed = {"face": np.random.default_rng(0).random((2, 3, 112, 112), dtype=np.float32)}
    cpu = OrtRunner(tiny_export.out / "identity.onnx").run(feed)
    cuda = OrtRunner(tiny_export.out / "identity.onnx", "cuda", require=True)
    got = cuda.run(feed)
    for k in cpu:
        assert np.abs(got[k] - cpu[k]).max() <= 1e-3 * max(1.0, np.abs(cpu[k]).max())
