"""The streaming core: streaming == offline, readiness at the exact sample, reset, clock and
drop policy, bounded memory. Real exported graphs (a tiny random model) on onnxruntime CPU."""

from __future__ import annotations

import time

import numpy as np
import pytest

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import read_image
from avatar_stream.engine.session import SessionOptions, run_session
from avatar_stream.engine.sources import FileSource
from avatar_stream.engine.stream import Engine, render_offline


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir, backend="cpu", renderer="neural")  # warp: test_mouth_head.py


@pytest.fixture(scope="module")
def face(engine):
    return engine.prepare_face(read_image(DEMO_FACE))


@pytest.fixture(scope="module")
def speech():
    return load_audio(DEMO_SPEECH)


@pytest.fixture(scope="module")
def offline(engine, face, speech):
    return render_offline(engine, face, speech, crop_only=True)


def _write_wav(path, audio):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(tb.SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _max_diff(a, b) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.crop.astype(np.int16) - y.crop.astype(np.int16)).max()) for x, y in zip(a, b, strict=True))


def test_offline_frame_count_and_pts(offline, speech):
    assert len(offline) == tb.num_frames(len(speech))
    assert [f.index for f in offline] == list(range(len(offline)))
    assert [f.pts for f in offline] == [k * tb.SAMPLES_PER_FRAME for k in range(len(offline))]
    # A random model still depends on the audio: frames must not all be identical.
    assert len({f.crop.tobytes() for f in offline}) > len(offline) // 2


@pytest.mark.parametrize("chunks", [[1], [7], [160], [333], [4096], "random"])
def test_streaming_equals_offline(engine, face, speech, offline, chunks):
    audio = speech
    ref = offline
    if chunks == "random":
        rng = np.random.default_rng(1)
        chunks = list(rng.integers(1, 5000, size=200))
    elif chunks[0] < 100:
        # Tiny chunks: a shorter excerpt keeps the test fast; its own offline pass is the reference.
        audio = speech[: 2 * tb.SAMPLE_RATE]
        ref = render_offline(engine, face, audio, crop_only=True)
    frames = render_offline(engine, face, audio, chunks=chunks, crop_only=True)
    diff = _max_diff(ref, frames)
    print(f"chunks {chunks[:3]}...: {len(frames)} frames, max abs diff {diff}")
    assert diff == 0  # bit-exact on CPU


def test_frame_ready_exactly_when_last_sample_arrives(engine, face, speech):
    stream = engine.create_stream(face, crop_only=True)
    r = engine.lookahead_frames
    for k in range(3):
        need = tb.last_sample_needed(k, r)
        have = stream.samples_received
        stream.accept_waveform(speech[have : need - 1])
        assert not stream.is_ready(), f"frame {k} ready one sample early"
        stream.accept_waveform(speech[need - 1 : need])
        assert stream.is_ready(), f"frame {k} not ready at sample {need}"
        assert stream.step().index == k
        assert not stream.is_ready()
    assert engine.latency.samples == tb.last_sample_needed(0, r)


def test_reset_stream_equals_fresh(engine, face, speech):
    audio = speech[: 3 * tb.SAMPLE_RATE]
    fresh = render_offline(engine, face, audio, crop_only=True)
    stream = engine.create_stream(face, crop_only=True)
    stream.accept_waveform(speech[-20000:])  # unrelated audio, then reset mid-way
    while stream.is_ready():
        stream.step()
    stream.reset()
    stream.accept_waveform(audio)
    stream.input_finished()
    again = []
    while stream.is_ready():
        again.append(stream.step())
    assert _max_diff(fresh, again) == 0
    assert stream.frames_out == len(fresh) and stream.frames_dropped == 0


def test_resampled_input_matches_offline_resample(engine, face, speech):
    """48 kHz audio pushed in chunks == the same audio resampled once, then rendered."""
    from avatar_stream.engine.audio import resample

    x48 = resample(speech[: 2 * tb.SAMPLE_RATE], tb.SAMPLE_RATE, 48000)
    ref = render_offline(engine, face, resample(x48, 48000), crop_only=True)
    stream = engine.create_stream(face, crop_only=True)
    out = []
    for i in range(0, len(x48), 1234):
        stream.accept_waveform(x48[i : i + 1234], 48000)
        while stream.is_ready():
            out.append(stream.step())
    stream.input_finished()
    while stream.is_ready():
        out.append(stream.step())
    assert _max_diff(ref, out) == 0


def test_memory_bounded_over_long_stream(engine, face):
    """Two minutes of noise through a stream: buffers stay bounded, pts monotonic, no drift."""
    rng = np.random.default_rng(0)
    stream = engine.create_stream(face, crop_only=True)
    total = 120 * tb.SAMPLE_RATE + 123
    pushed = 0
    max_buf = max_feats = 0
    last = -1
    while pushed < total:
        n = int(min(rng.integers(1, 20000), total - pushed))
        stream.accept_waveform((rng.standard_normal(n) * 0.05).astype(np.float32))
        pushed += n
        while stream.is_ready():
            if stream.next_frame % 10:
                stream.skip()  # skip most frames: this test is about bookkeeping, not pixels
                continue
            f = stream.step()
            assert f.index > last
            last = f.index
        max_buf = max(max_buf, stream._buf.size)
        max_feats = max(max_feats, len(stream._feats))
    stream.input_finished()
    while stream.is_ready():
        stream.skip()
    assert stream.frames_out + stream.frames_dropped == tb.num_frames(total) == 3000
    # Bounded by one window span of the lookahead plus one chunk, not by the stream length.
    span = tb.WINDOW_SAMPLES + (2 * engine.lookahead_frames + 2) * tb.SAMPLES_PER_FRAME
    assert max_buf <= span + 20000, max_buf
    assert max_feats <= 2 * engine.lookahead_frames + 2 + 20000 // tb.SAMPLES_PER_FRAME


class SlowRunner:
    """A backend that takes ``delay`` seconds per call: simulates a machine too slow for
    real time (the clock tests ask for 2x the frame budget)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.input_names, self.output_names, self.providers = inner.input_names, inner.output_names, inner.providers
        self.batch_limit = inner.batch_limit

    def run(self, inputs):
        time.sleep(self.delay)
        return self.inner.run(inputs)


class RecordingSink:
    def __init__(self):
        self.pts: list[int] = []

    def write(self, frame, pts):
        self.pts.append(pts)


def test_slow_backend_drops_frames_and_stays_bounded(tiny_model_dir, face, tmp_path):
    engine = Engine(tiny_model_dir, backend="cpu", renderer="neural")
    engine.model.decoder = SlowRunner(engine.model.decoder, 2 * 1.0 / tb.FPS)
    audio = load_audio(DEMO_SPEECH)[: 3 * tb.SAMPLE_RATE]
    path = _write_wav(tmp_path / "three_seconds.wav", audio)
    stream = engine.create_stream(face, crop_only=True)
    sink = RecordingSink()
    t0 = time.perf_counter()
    report = run_session(stream, FileSource(path, realtime=True), [sink], (),
                         SessionOptions(live=True, max_backlog=2))
    wall = time.perf_counter() - t0
    total = tb.num_frames(len(audio))
    print(f"slow backend: {report.frames} frames shown, {report.dropped} dropped of {total}, "
          f"max backlog {report.max_backlog_seen}, wall {wall:.2f} s for 3.0 s of audio")
    assert report.frames + report.dropped == total
    assert report.dropped >= total // 4  # a 2x-too-slow decoder must shed about half
    assert sink.pts == sorted(set(sink.pts)) and all(p % tb.SAMPLES_PER_FRAME == 0 for p in sink.pts)
    # Latency bounded: the session ends within a few frame budgets of the audio's end.
    assert wall < 3.0 + (report.max_backlog_seen + 4) * 2 / tb.FPS + 1.0


def test_realtime_file_keeps_up_without_drops(engine, face, tmp_path):
    """The tiny model on CPU is far faster than real time: a paced file drops nothing. (Drops
    are allowed only where a step really overran the 40 ms budget: a machine busy with other
    work; the frame count adds up either way.)"""
    audio = load_audio(DEMO_SPEECH)[: 2 * tb.SAMPLE_RATE]
    path = _write_wav(tmp_path / "two_seconds.wav", audio)
    stream = engine.create_stream(face, crop_only=True)
    report = run_session(stream, FileSource(path, realtime=True), [RecordingSink()], (),
                         SessionOptions(live=True))
    assert report.frames + report.dropped == 50
    assert report.dropped == 0 or report.step_ms_p99 > 1000 / tb.FPS, report.lines()


@pytest.mark.slow
def test_one_hour_stream_exact_frame_count(engine, face):
    """One hour of audio, random chunking, as fast as possible: exactly 3600 * 25 frames,
    monotonic pts, no drift. Frames are rendered every 25th (a full render of 90,000 frames
    is a benchmark, not a test); the rest go through skip(), which shares the bookkeeping."""
    rng = np.random.default_rng(7)
    stream = engine.create_stream(face, crop_only=True)
    total = 3600 * tb.SAMPLE_RATE
    block = (rng.standard_normal(tb.SAMPLE_RATE) * 0.05).astype(np.float32)
    pushed, last = 0, -1
    while pushed < total:
        n = int(min(rng.integers(1, 8000), total - pushed))
        start = pushed % tb.SAMPLE_RATE
        chunk = np.resize(np.roll(block, -start), n)
        stream.accept_waveform(chunk)
        pushed += n
        while stream.is_ready():
            if stream.next_frame % 25:
                stream.skip()
            else:
                f = stream.step()
                assert f.index > last and f.pts == f.index * tb.SAMPLES_PER_FRAME
                last = f.index
    stream.input_finished()
    while stream.is_ready():
        stream.skip()
    assert stream.frames_out + stream.frames_dropped == 3600 * tb.FPS
    assert stream.samples_received == total


def test_warp_renderer_streaming_equals_offline(tiny_model_dir, speech):
    """--renderer warp: the photo warped by the (smoothed) predicted AUs; same invariance."""
    engine = Engine(tiny_model_dir, backend="cpu", renderer="warp")
    face = engine.prepare_face(read_image(DEMO_FACE))
    audio = speech[: 2 * tb.SAMPLE_RATE]
    ref = render_offline(engine, face, audio)
    got = render_offline(engine, face, audio, chunks=[333])
    assert len(ref) == len(got) == 50
    assert max(int(np.abs(a.image.astype(int) - b.image.astype(int)).max()) for a, b in zip(ref, got, strict=True)) == 0
    assert ref[0].image.shape == read_image(DEMO_FACE).shape
    # The drive is the Audio2AU output: frames differ where the AUs differ.
    aus = np.stack([f.au for f in ref])
    assert aus.shape == (50, 5) and np.all((aus >= 0) & (aus <= 1))


def _max_image_diff(a, b) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.image.astype(np.int16) - y.image.astype(np.int16)).max()) for x, y in zip(a, b, strict=True))


def test_step_many_batches_streams_like_single_steps(engine, speech):
    """Three sessions (different faces, different audio offsets) stepped together with one
    batched audio-graph call, one batched decoder call and the paste-backs on threads give the
    frames each would give alone, crops and full photos (within one grey level: a batched
    convolution may sum in another order)."""
    photo = read_image(DEMO_FACE)
    faces = [engine.prepare_face(photo), engine.prepare_face(photo[:, ::-1].copy()),
             engine.prepare_face(photo)]
    audios = [speech[: 2 * tb.SAMPLE_RATE], speech[8000 : 8000 + 2 * tb.SAMPLE_RATE], speech[-32000:]]
    alone = [render_offline(engine, f, a) for f, a in zip(faces, audios, strict=True)]
    streams = [engine.create_stream(f) for f in faces]
    got: list[list] = [[], [], []]
    for s, a in zip(streams, audios, strict=True):
        s.accept_waveform(a)
        s.input_finished()
    while any(s.is_ready() for s in streams):
        for i, fr in enumerate(engine.step_many(streams)):
            if fr is not None:
                got[i].append(fr)
    for a, g in zip(alone, got, strict=True):
        assert _max_diff(a, g) <= 1 and _max_image_diff(a, g) <= 1
    assert _max_image_diff(alone[0], alone[1][: len(alone[0])]) > 10  # the streams do differ


def test_step_many_live_batches_the_audio_graph_across_streams(engine, face, speech, monkeypatch):
    """Live use (one frame of audio per stream per round, each stream its own audio): each
    round's new windows of all streams go through one audio-graph call, and every stream
    still gets its own offline frames (a mix-up between streams would show)."""
    from avatar_stream.engine.stream import step_many

    audios = [speech, speech[16000:], speech[::-1].copy()]
    alone = [render_offline(engine, face, a, crop_only=True) for a in audios]
    calls: list[int] = []
    real = engine.frame_features
    monkeypatch.setattr(engine, "frame_features", lambda w: calls.append(len(w)) or real(w))
    streams = [engine.create_stream(face, crop_only=True) for _ in audios]
    got: list[list] = [[] for _ in audios]
    spf = tb.SAMPLES_PER_FRAME
    for pos in range(0, len(speech), spf):
        calls.clear()
        for s, a in zip(streams, audios, strict=True):
            if pos < len(a):
                s.accept_waveform(a[pos : pos + spf])
        for i, fr in enumerate(step_many(streams)):
            if fr is not None:
                got[i].append(fr)
        assert len(calls) <= 1  # one call per round for all the streams
    for s in streams:
        s.input_finished()
    while any(s.is_ready() for s in streams):
        for i, fr in enumerate(step_many(streams)):
            if fr is not None:
                got[i].append(fr)
    for a, g in zip(alone, got, strict=True):
        assert _max_diff(a, g) <= 1
    assert _max_diff(alone[0][: len(alone[1])], alone[1]) > 10  # the streams do differ
    with pytest.raises(ValueError, match="appears twice"):
        step_many([streams[0], streams[1], streams[0]])


def test_limit_samples_does_not_wait_for_a_chunk_past_the_limit():
    """Once n samples were yielded the limit stops without pulling another chunk (a
    microphone or a silent stdin pipe would block on it)."""
    from avatar_stream.engine.session import limit_samples

    def source():
        yield np.zeros(640, np.float32)
        yield np.zeros(640, np.float32)
        raise AssertionError("pulled a chunk past the limit")

    assert sum(len(c) for c in limit_samples(source(), 1280)) == 1280


def test_sample_rate_change_within_stream_is_refused(engine, face, speech):
    stream = engine.create_stream(face, crop_only=True)
    stream.accept_waveform(speech[:4800], 48000)
    with pytest.raises(ValueError, match="sample rate changed"):
        stream.accept_waveform(speech[:1600], tb.SAMPLE_RATE)
    stream.reset()
    stream.accept_waveform(speech[:1600], tb.SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample rate changed"):
        stream.accept_waveform(speech[:4800], 48000)
