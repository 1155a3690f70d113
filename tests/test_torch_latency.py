"""The torch-path latency benchmark runs (on CPU here; the same code times CUDA with
synchronisation on a GPU machine) and names what it cannot do in one line."""

import json

import pytest
import torch

from avatar_stream.export.torch_latency import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny checkpoint, no ONNX export: the torch path needs neither onnxruntime nor the face
    aligner (dlib), so the GPU test also runs on a machine that only has torch."""
    from avatar_stream.training.checkpoint import save_checkpoint
    from avatar_stream.training.config import ModelConfig
    from avatar_stream.training.models import TalkingHead

    torch.manual_seed(0)
    model = TalkingHead(ModelConfig.tiny())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", {"generator": model.state_dict()}, model.cfg)


def test_torch_latency_table_and_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--batch", "1,2",
                 "--precision", "fp32", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["graph"], r["batch"]) for r in rows} == {
        (g, b) for g in ("identity", "audio", "tcsan_decoder") for b in (1, 2)}
    assert all(r["ms_p50"] > 0 for r in rows)
    assert "tcsan_decoder" in capsys.readouterr().out


def test_cuda_without_gpu_is_one_line(tiny_checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--repeats", "1"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_torch_cuda_fp16_runs(tiny_checkpoint, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert main(["--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--batch", "1,32",
                 "--precision", "fp32,fp16", "--repeats", "5", "--json", str(tmp_path / "g.json")]) == 0
