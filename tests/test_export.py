"""avatar-export: graphs, cards, checker, dynamic batch, parity gate, precisions, streaming use.

The ``tiny_export`` fixture (conftest.py) exports a tiny TalkingHead with trained-like
activations through the real CLI once per session; tests here read what it wrote.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch

from avatar_stream import ASSETS
from avatar_stream.engine import timebase
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.card import CARD_KEY, GRAPH_FILES, GRAPH_IO, REQUIRED_GRAPHS, load_model_dir
from avatar_stream.engine.runners import OrtRunner
from avatar_stream.export import parity as parity_mod
from avatar_stream.export.cli import main
from avatar_stream.export.graphs import SPEC_BY_NAME, SPECS, example_inputs, run_torch
from avatar_stream.export.onnx_export import ExportOptions, export_model, to_onnx
from avatar_stream.training.config import ModelConfig
from avatar_stream.training.mfcc import mfcc_windows
from avatar_stream.training.models import TalkingHead


def test_cli_prints_parity_table_and_writes_directory(tiny_export):
    out = tiny_export.stdout
    assert "max abs err" in out and "FAIL" not in out
    for graph, outputs in ((g, GRAPH_IO[g][1]) for g in REQUIRED_GRAPHS):
        for name in outputs:
            assert f"{graph:<14} {name:<8} fp32" in out
    assert sorted(p.name for p in tiny_export.out.iterdir()) == [
        "audio.onnx", "identity.onnx", "manifest.json", "tcsan_decoder.onnx"]


def test_cards_describe_the_model(tiny_export):
    cfg = tiny_export.model.cfg
    cards = load_model_dir(tiny_export.out)
    manifest = json.loads((tiny_export.out / "manifest.json").read_text())
    for graph, card in cards.items():
        assert card.graph == graph
        assert (card.sample_rate, card.fps, card.window_samples, card.window_offset) == (
            timebase.SAMPLE_RATE, timebase.FPS, timebase.WINDOW_SAMPLES, timebase.WINDOW_OFFSET)
        assert card.lookahead_frames == cfg.lookahead_frames == 7
        assert card.receptive_field == cfg.receptive_field == 15
        assert card.frame_feature_dim == cfg.frame_feature_dim
        assert card.au_order == timebase.AU_NAMES
        assert card.to_dict()["config"] == cfg.to_dict()
        assert card.precision == "fp32"
        assert (card.input_names, card.output_names) == GRAPH_IO[graph]
        # every output's measured parity error is recorded and within the fp32 gate
        assert set(card.parity) == set(card.output_names)
        assert all(0 <= e < 1e-3 for e in card.parity.values())  # fp32: reordered sums only
        assert manifest["graphs"][graph]["parity"] == dict(card.parity)
        assert card.checkpoint_sha256 == manifest["checkpoint_sha256"]
    d = cfg.frame_feature_dim
    assert cards["audio"].inputs == {"pcm": ("B", timebase.WINDOW_SAMPLES)}
    assert cards["audio"].outputs == {"feat": ("B", d), "au_prob": ("B", 5)}
    assert cards["tcsan_decoder"].inputs["feats"] == ("B", 15, d)
    assert cards["tcsan_decoder"].outputs == {"frame": ("B", 3, 112, 112)}
    assert cards["identity"].outputs["f_id"] == ("B", cfg.f_id)
    # the decoder's skip inputs are exactly the identity graph's skip outputs
    for i in range(4):
        assert cards["tcsan_decoder"].inputs[f"skip{i}"] == cards["identity"].outputs[f"skip{i}"]


def test_graphs_pass_checker_with_named_dynamic_batch(tiny_export):
    for graph, fname in GRAPH_FILES.items():
        model = onnx.load(str(tiny_export.out / fname))
        onnx.checker.check_model(model, full_check=True)
        assert CARD_KEY in {p.key for p in model.metadata_props}
        ins, outs = GRAPH_IO[graph]
        assert [i.name for i in model.graph.input] == list(ins)
        assert [o.name for o in model.graph.output] == list(outs)
        for v in (*model.graph.input, *model.graph.output):
            assert v.type.tensor_type.shape.dim[0].dim_param == "B", v.name
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_1_and_4_match_torch(tiny_export, batch):
    model = tiny_export.model
    inputs = example_inputs(model, batch, seed=batch)
    for spec in SPECS:
        runner = OrtRunner(tiny_export.out / GRAPH_FILES[spec.name])
        got = runner.run({k: v.numpy() for k, v in inputs[spec.name].items()})
        want = run_torch(spec.wrapper(model).eval(), spec, inputs[spec.name])
        for name in spec.output_names:
            assert got[name].shape == tuple(want[name].shape)
            scale = max(1.0, float(want[name].abs().max()))
            assert np.abs(got[name] - want[name].numpy()).max() <= 1e-4 * scale, (spec.name, name)


def test_streaming_frame_by_frame_equals_torch_offline(tiny_export):
    """identity once; audio.onnx per frame on frame_window(audio, k); the decoder on the 2R+1
    features around k, edge frames replicated at both ends — as the streaming engine does —
    against the torch model run offline on the whole utterance."""
    model, out = tiny_export.model, tiny_export.out
    audio = load_audio(ASSETS / "speech.wav")
    crop, _ = parity_mod.real_face()
    face = parity_mod.face_tensor([crop])
    r, t = model.cfg.lookahead_frames, timebase.num_frames(len(audio))

    ident, audio_graph, dec = (OrtRunner(out / GRAPH_FILES[g]) for g in ("identity", "audio", "tcsan_decoder"))
    id_out = ident.run({"face": face.numpy()})
    feats, frames = [], []

    def emit(k: int) -> None:
        window = np.stack([feats[min(max(j, 0), t - 1)] for j in range(k - r, k + r + 1)])[None]
        frames.append(dec.run({"feats": window, **id_out})["frame"][0])

    for j in range(t):  # feature j arrives; frame j - R has all its context now
        feats.append(audio_graph.run({"pcm": timebase.frame_window(audio, j)[None]})["feat"][0])
        if j - r >= 0:
            emit(j - r)
    for k in range(max(t - r, 0), t):  # input finished: the last R frames use replicated edges
        emit(k)
    stream = np.stack(frames)

    with torch.no_grad():
        f_id, skips = model.encode_identity(face)
        feat, _ = model.frame_features(mfcc_windows(audio))
        padded = torch.cat([feat[:1].expand(r, -1), feat, feat[-1:].expand(r, -1)])
        offline = model.decode(padded[None], f_id, skips)[0].numpy()

    assert stream.shape == offline.shape == (t, 3, 112, 112)
    diff = float(np.abs(stream - offline).max())
    motion = float(np.abs(offline[1:] - offline[:-1]).max())
    print(f"streaming ONNX vs offline torch: max abs diff {diff:.2e} over {t} frames (frame-to-frame {motion:.2f})")
    assert motion > 0.01, "the test model must react to the audio for this comparison to mean anything"
    assert diff <= 1e-4


def test_parity_gate_names_output_and_error(tiny_export):
    """Gate a correct identity graph against a *different* torch model: it must fail, naming
    each output with its largest abs error."""
    torch.manual_seed(1)
    other = TalkingHead(ModelConfig.tiny()).eval()
    inputs = parity_mod.parity_inputs(tiny_export.model)
    result = parity_mod.check_graph(tiny_export.out / "identity.onnx", SPEC_BY_NAME["identity"].wrapper(other),
                                    "identity", inputs["identity"], "fp32")
    assert not result.passed
    with pytest.raises(parity_mod.ParityError) as err:
        parity_mod.gate([result])
    msg = str(err.value)
    for name in GRAPH_IO["identity"][1]:
        assert f"identity.{name} max abs err {result.errors[name]:.3e}" in msg
    same = parity_mod.check_graph(tiny_export.out / "identity.onnx",
                                  SPEC_BY_NAME["identity"].wrapper(tiny_export.model),
                                  "identity", inputs["identity"], "fp32")
    assert same.passed


def test_parity_inputs_are_real(tiny_export):
    inputs = parity_mod.parity_inputs(tiny_export.model)
    face = inputs["identity"]["face"]
    assert face.shape == (2, 3, 112, 112) and torch.equal(face[1], face[0].flip(-1))
    assert 0.05 < float(face.std()) and 0.0 <= float(face.min()) and float(face.max()) <= 1.0
    pcm = inputs["audio"]["pcm"]
    assert pcm.shape == (parity_mod.PARITY_FRAMES, timebase.WINDOW_SAMPLES)
    assert float(pcm.abs().max()) > 0.1  # speech, not silence or noise floor
    feats = inputs["tcsan_decoder"]["feats"]
    assert feats.shape[1:] == (15, tiny_export.model.cfg.frame_feature_dim)
    # the first decoder window sits on the utterance start: its first R+1 frames are replicas
    assert all(torch.equal(feats[0, i], feats[0, 7]) for i in range(7))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_lower_precision_export(tiny_export, tmp_path, precision):
    model = tiny_export.model
    report = export_model(model, tmp_path, ExportOptions(precision=precision), checkpoint_sha256="1" * 64)
    cards = load_model_dir(tmp_path)
    want = {"fp16": ("fp16", "fp16", "fp16"), "int8": ("fp32", "int8", "int8")}[precision]
    assert tuple(cards[g].precision for g in ("identity", "audio", "tcsan_decoder")) == want
    for graph, fname in GRAPH_FILES.items():
        m = onnx.load(str(tmp_path / fname))
        onnx.checker.check_model(m, full_check=True)
        # float32 I/O: the runner interface does not change with precision
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in (*m.graph.input, *m.graph.output))
        ops = {n.op_type for n in m.graph.node}
        if cards[graph].precision == "int8":
            assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        if graph == "audio":  # the MFCC front-end stays float32 in every precision
            mfcc = [n for n in m.graph.node if n.name.startswith("/mfcc/")]
            assert len([n for n in mfcc if n.op_type in ("Conv", "Log", "MatMul")]) == 4
            assert len([n for n in mfcc if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast")]) <= 1
        assert _fp16_roundtrips(m) == 0
    assert all(r.passed for r in report.parity)
    runner = OrtRunner(tmp_path / "tcsan_decoder.onnx")
    for b in (1, 4):
        feed = {k: v.numpy() for k, v in example_inputs(model, b)["tcsan_decoder"].items()}
        assert runner.run(feed)["frame"].shape == (b, 3, 112, 112)
    if precision == "int8":
        r = report.int8["tcsan_decoder"]
        assert r["int8_ms"] > 0 and r["fp32_ms"] > 0 and 20.0 < r["psnr_db"]
        assert json.loads((tmp_path / "manifest.json").read_text())["int8"]["tcsan_decoder"]["psnr_db"] == r["psnr_db"]


def _fp16_roundtrips(model: onnx.ModelProto) -> int:
    """Cast-to-float32 nodes reading a Cast-to-float16: float32 data rounded for nothing."""
    def to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if to(n) == onnx.TensorProto.FLOAT
               and n.input[0] in producer and to(producer[n.input[0]]) == onnx.TensorProto.FLOAT16)


def test_fp16_frame_graph_on_extreme_audio(tiny_export):
    """A full-scale square wave and near-silence: the float32 MFCC inside the fp16 graph keeps
    both finite and within the fp16 tolerance of torch."""
    from avatar_stream.export.quantize import to_fp16

    model, spec = tiny_export.model, SPEC_BY_NAME["audio"]
    module = spec.wrapper(model).eval()
    proto = to_fp16(to_onnx(module, spec, example_inputs(model, 2)["audio"]))
    n = np.arange(timebase.WINDOW_SAMPLES)
    pcm = np.stack([np.sign(np.sin(2 * np.pi * 440 * n / timebase.SAMPLE_RATE)),
                    1e-4 * np.random.default_rng(0).standard_normal(len(n))]).astype(np.float32)
    res = parity_mod.check_graph(proto, module, "audio", {"pcm": torch.from_numpy(pcm)}, "fp16")
    assert res.passed and all(np.isfinite(e) for e in res.errors.values()), res.errors


def test_cli_one_line_errors(tmp_path, tiny_export):
    def run(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
        return code, err.getvalue()

    code, err = run("--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "nope.safetensors not found" in err

    from safetensors.torch import save_file  # a safetensors file not written by avatar-train

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    code, err = run("--checkpoint", str(tmp_path / "foreign.safetensors"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "not an avatar-stream checkpoint" in err

    # an avatar-stream checkpoint whose config this version does not know / cannot serve
    from avatar_stream.training.checkpoint import FORMAT, save_checkpoint

    cfg = json.loads(tiny_export.model.cfg.to_json())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "future.safetensors"),
              metadata={"format": FORMAT, "format_version": "1", "config": json.dumps({**cfg, "new_knob": 3})})
    code, err = run("--checkpoint", str(tmp_path / "future.safetensors"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "new_knob" in err
    ablation = TalkingHead(ModelConfig.tiny(audio2au=False))
    path = save_checkpoint(tmp_path / "ablation", {"generator": ablation.state_dict()}, ablation.cfg)
    code, err = run("--checkpoint", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "without Audio2AU" in err

    code, err = run("--checkpoint", str(tiny_export.checkpoint), "--out", str(tmp_path / "o"), "--fp16")
    assert code == 2 and "--tensorrt" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(tiny_export):
    """The alternative exporter stays usable: checker-clean, batch 1 and 4, fp32 parity."""
    model = tiny_export.model
    for spec in SPECS:
        module = spec.wrapper(model).eval()
        proto = to_onnx(module, spec, example_inputs(model, 2)[spec.name], dynamo=True)
        onnx.checker.check_model(proto, full_check=True)
        for b in (1, 4):
            res = parity_mod.check_graph(proto, module, spec.name, example_inputs(model, b, seed=b)[spec.name], "fp32")
            assert res.passed, res.errors


@pytest.mark.slow
def test_paper_width_export(tmp_path):
    """The paper-width model (frame feature 832, f_id 512) exports and passes the fp32 gate."""
    torch.manual_seed(0)
    model = TalkingHead(ModelConfig()).eval()
    report = export_model(model, tmp_path, ExportOptions(), checkpoint_sha256="2" * 64)
    cards = load_model_dir(tmp_path)
    assert cards["audio"].frame_feature_dim == 832 and all(r.passed for r in report.parity)


def _gpu_tools() -> tuple[bool, bool]:
    """(TensorRT + cuda-python + GPU, torch-tensorrt + CUDA)."""
    from avatar_stream.engine import runners

    try:
        runners.import_trt()
        trt = runners.gpu_name() is not None
    except runners.RunnerError:
        trt = False
    try:
        import torch_tensorrt  # noqa: F401

        ttrt = torch.cuda.is_available()
    except ImportError:
        ttrt = False
    return trt, ttrt


HAS_TRT, HAS_TORCH_TRT = _gpu_tools()


def test_cli_gpu_flags_fail_fast_without_gpu_tools(tiny_export, tmp_path):
    if HAS_TRT and HAS_TORCH_TRT:
        pytest.skip("TensorRT and torch-tensorrt are both usable here")
    flag, missing = ("--tensorrt", "tensorrt and cuda-python") if not HAS_TRT else ("--torch-tensorrt", "torch")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--checkpoint", str(tiny_export.checkpoint), "--out", str(tmp_path / "o"), flag])
    assert code == 2 and err.getvalue().count("\n") == 1 and missing in err.getvalue()
    assert not (tmp_path / "o").exists()  # refused before exporting anything


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT 10+, cuda-python and an NVIDIA GPU")
def test_cli_tensorrt_engines_pass_gate(tiny_export, tmp_path):
    from avatar_stream.engine.runners import TrtRunner

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--checkpoint", str(tiny_export.checkpoint), "--out", str(tmp_path), "--tensorrt", "--fp16",
                     "--batch-max", "4"])
    assert code == 0, out.getvalue()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for graph in GRAPH_FILES:
        side = manifest["tensorrt"][graph]
        assert side["precision"] == "fp16" and side["batch_max"] == 4 and set(side["parity"])
        assert (tmp_path / side["file"]).is_file()
    with TrtRunner(tmp_path / "tcsan_decoder.onnx", fp16=True, batch_max=4) as r:  # reuses the engine
        feed = {k: v.numpy() for k, v in example_inputs(tiny_export.model, 1)["tcsan_decoder"].items()}
        assert r.run(feed)["frame"].shape == (1, 3, 112, 112)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TORCH_TRT, reason="needs torch-tensorrt and a CUDA GPU")
def test_torch_tensorrt_path_passes_gate(tiny_export, tmp_path):
    from avatar_stream.export.torch_trt import compile_all

    real = parity_mod.parity_inputs(tiny_export.model)
    results = compile_all(tiny_export.model, tmp_path, real, fp16=True, batch_max=4)
    tiny_export.model.to("cpu")
    parity_mod.gate(results)
    assert sorted(p.name for p in (tmp_path / "torch_trt").iterdir()) == [
        "frame.ep", "identity.ep", "tcsan_decoder.ep"]


@pytest.mark.gpu
@pytest.mark.skipif("TensorrtExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu with the TensorRT execution provider")
def test_ort_tensorrt_ep_with_engine_cache(tiny_export, tmp_path):
    from avatar_stream.engine.runners import trt_cache_key

    feed = {k: v.numpy() for k, v in example_inputs(tiny_export.model, 4)["tcsan_decoder"].items()}
    want = OrtRunner(tiny_export.out / "tcsan_decoder.onnx").run(feed)["frame"]
    r = OrtRunner(tiny_export.out / "tcsan_decoder.onnx", "tensorrt", cache_dir=tmp_path, require=True)
    got = r.run(feed)["frame"]
    assert np.abs(got - want).max() <= parity_mod.TOLERANCES["fp16"]
    assert any((tmp_path / trt_cache_key()).iterdir())
