"""training/mfcc.py: shapes, locality (window k = MFCC of frame k's excerpt), ONNX parity,
and a cross-check against librosa on real speech."""

from __future__ import annotations

import io

import librosa  # imported once per module: its first call is slow
import numpy as np
import onnxruntime as ort
import pytest
import torch

from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.timebase import (
    MFCC_HOP,
    SAMPLES_PER_FRAME,
    WINDOW_OFFSET,
    WINDOW_SAMPLES,
    frame_window,
    num_frames,
)
from avatar_stream.training.mfcc import MFCC, mfcc_windows

# librosa puts the 400-sample window in the middle of its 512-sample frame; this many
# zeros each side make its frame t cover exactly our samples [160 t, 160 t + 400).
LIBROSA_PAD = (512 - 400) // 2


@pytest.fixture(scope="module")
def mfcc() -> MFCC:
    return MFCC().eval()


@pytest.fixture(scope="module")
def speech(speech_wav) -> np.ndarray:
    return load_audio(speech_wav)


def _run(module: MFCC, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.atleast_2d(x).astype(np.float32))).numpy()


def test_shapes_and_no_checkpoint_state(mfcc):
    for n in (400, 401, 559, 560, 4720, 16000):
        assert _run(mfcc, np.zeros((3, n), np.float32)).shape == (3, 12, 1 + (n - 400) // 160)
    assert _run(mfcc, np.zeros((2, WINDOW_SAMPLES), np.float32)).shape == (2, 12, 28)
    assert mfcc.state_dict() == {}  # fixed matrices are buffers, not weights
    with pytest.raises(ValueError, match=r"expects \(B, N >= 400\)"):
        mfcc(torch.zeros(399))


def test_window_k_equals_mfcc_of_its_own_excerpt(mfcc, speech):
    windows = mfcc_windows(speech).numpy()
    t = num_frames(len(speech))
    assert windows.shape == (t, 12, 28) and windows.dtype == np.float32
    # The whole clip analysed once on the hop grid that window 0 starts on: window k is
    # MFCC frames [4k, 4k + 28). Equal because nothing is padded or centred.
    padded = np.concatenate(
        [np.zeros(-WINDOW_OFFSET, np.float32), speech, np.zeros(WINDOW_SAMPLES, np.float32)]
    )
    whole = _run(mfcc, padded)[0]
    step = SAMPLES_PER_FRAME // MFCC_HOP
    for k in (0, 1, 2, 17, t // 2, t - 2, t - 1):
        alone = _run(mfcc, frame_window(speech, k))[0]
        np.testing.assert_allclose(windows[k], alone, atol=1e-4, rtol=1e-5, err_msg=f"k={k}")
        np.testing.assert_allclose(
            whole[:, step * k : step * k + 28], alone, atol=1e-3, rtol=1e-4, err_msg=f"k={k}"
        )
    # Batching is an implementation detail.
    np.testing.assert_allclose(mfcc_windows(speech, batch=7).numpy(), windows, atol=1e-4, rtol=1e-5)


def test_onnx_export_matches_torch(mfcc, speech, tmp_path):
    example = torch.from_numpy(np.stack([frame_window(speech, 10), frame_window(speech, 30)]))
    buf = io.BytesIO()
    torch.onnx.export(
        mfcc,
        (example,),
        buf,
        input_names=["pcm"],
        output_names=["mfcc"],
        dynamic_axes={"pcm": {0: "batch", 1: "samples"}, "mfcc": {0: "batch", 2: "frames"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (
        np.stack([frame_window(speech, k) for k in (0, 25, 50)]),  # batch 3 != export batch
        speech[None, :16000],  # one long input: dynamic samples axis
    ):
        (got,) = session.run(None, {"pcm": x})
        ref = _run(mfcc, x)
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    print(f"onnxruntime vs torch MFCC: max abs diff {worst:.2e}")
    assert worst < 1e-3


def _librosa_mfcc(x: np.ndarray) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=np.pad(x, LIBROSA_PAD), sr=16000, n_fft=512, hop_length=160, win_length=400, window="hamming",
        center=False, power=2.0, n_mels=40, fmin=20, fmax=8000, htk=True, norm=None,
    )  # fmt: skip
    return librosa.feature.mfcc(S=np.log(mel + 1e-6), n_mfcc=13, dct_type=2, norm="ortho")[1:]


def _compare_with_librosa(mfcc: MFCC, x: np.ndarray, name: str) -> None:
    ours = _run(mfcc, x)[0]
    ref = _librosa_mfcc(x)
    assert ours.shape == ref.shape
    corr = np.array([np.corrcoef(ours[i], ref[i])[0, 1] for i in range(12)])
    diff = float(np.abs(ours - ref).max())
    print(
        f"{name}: min correlation with librosa {corr.min():.8f} (c{1 + corr.argmin()}), max abs diff {diff:.2e}"
    )
    assert corr.min() >= 0.99, corr
    assert diff < 1e-2  # same definition, float32 arithmetic: far tighter than correlation needs


def test_matches_librosa_on_espeak_speech(mfcc, speech):
    _compare_with_librosa(mfcc, speech, "espeak-ng")


@pytest.mark.shared
def test_matches_librosa_on_recorded_speech(mfcc, shared_data):
    wav = sorted((shared_data / "speech_dev").glob("*.wav"))[1]
    _compare_with_librosa(mfcc, load_audio(wav), wav.name)
