"""The always-on live avatar (engine/live.py): sound in == sound out, picture == offline
rendering of the same timeline, segment ends, barge-in, batching, bad input. The shipped
starter model with the default renderer, on onnxruntime CPU."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import AudioError, load_audio, resample
from avatar_stream.engine.face import read_image
from avatar_stream.engine.live import LiveAvatar, render_ticks
from avatar_stream.engine.stream import Engine

RATE = 24_000
TICK = RATE // tb.FPS


@pytest.fixture(scope="module")
def engine():
    return Engine(backend="cpu")


@pytest.fixture(scope="module")
def face(engine):
    return engine.prepare_face(read_image(DEMO_FACE))


@pytest.fixture(scope="module")
def pcm():
    """1.6 s of the bundled speech as 24 kHz int16, the way a TTS engine delivers it."""
    x = resample(load_audio(DEMO_SPEECH)[: 16_000 * 16 // 10], tb.SAMPLE_RATE, RATE)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def _push(live, pcm, sizes=(480, 1111, 37, 2400)):
    """Push in uneven pieces, as network frames arrive."""
    i, n = 0, 0
    while i < pcm.size:
        step = sizes[n % len(sizes)]
        live.push_audio(pcm[i : i + step], RATE)
        i, n = i + step, n + 1


def _offline_images(engine, face, timeline_pcm, n):
    """The frames a plain Stream makes of the same 24 kHz timeline pushed at once."""
    s = engine.create_stream(face)
    s.accept_waveform(timeline_pcm.astype(np.float32) / 32768.0, RATE)
    return [s.step().image for _ in range(n)]


def test_audio_out_is_audio_in_after_the_lead(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    _push(live, pcm)
    live.end_segment()
    ticks = pcm.size // TICK + live.lead_ticks + 5
    frames = [live.next_frame() for _ in range(ticks)]
    out = np.concatenate([f.audio[:, 0] for f in frames])
    lead = live.lead_ticks * TICK
    assert not out[:lead].any()  # the model's lookahead plays silence first
    assert np.array_equal(out[lead : lead + pcm.size], pcm)  # int16 in, the same int16 out
    assert not out[lead + pcm.size :].any()
    assert [f.index for f in frames] == list(range(ticks))
    assert all(f.audio.shape == (TICK, 1) and f.audio.dtype == np.int16 for f in frames)
    ends = [f.index for f in frames if f.segment_end]
    assert ends == [live.lead_ticks + (pcm.size - 1) // TICK]  # the tick playing the last sample
    speaking = [f.index for f in frames if f.speaking]
    assert speaking == list(range(live.lead_ticks, ends[0] + 1))
    assert all(f.latency_s is not None and f.latency_s >= 0 for f in frames if f.speaking)
    assert live.stats.segments == 1 and live.stats.underruns == 0


def test_pictures_equal_offline_rendering_of_the_timeline(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    _push(live, pcm)
    n = pcm.size // TICK + 3
    frames = [live.next_frame() for _ in range(n)]
    timeline = np.concatenate([np.zeros(live.lead_ticks * TICK, np.int16), pcm,
                               np.zeros((n + 2) * TICK, np.int16)])
    offline = _offline_images(engine, face, timeline, n)
    for f, ref in zip(frames, offline, strict=True):
        np.testing.assert_array_equal(f.image, ref)
    # The mouth moves with speech: speaking frames differ from the idle ones around them.
    (x0, y0), (x1, y1) = face.aligned.landmarks[48:68].min(0).astype(int), face.aligned.landmarks[48:68].max(0).astype(int)
    mouth = [f.image[y0 - 5 : y1 + 5, x0 - 5 : x1 + 5].astype(np.float32) for f in frames]
    assert max(np.abs(m - mouth[0]).mean() for m in mouth[live.lead_ticks :]) > 2.0


def test_idle_frames_while_silent_still_move(engine, face):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    frames = [live.next_frame() for _ in range(100)]  # 4 s: blinks and sway
    assert not any(f.speaking for f in frames) and not any(f.audio.any() for f in frames)
    moved = [(np.abs(f.image.astype(int) - frames[0].image.astype(int)) > 8).sum() for f in frames]
    assert max(moved) > 100


def test_clear_silences_sound_and_mouth_at_once(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    _push(live, pcm)
    live.end_segment()
    cut_tick = live.lead_ticks + 10  # ten ticks of speech have played
    before = [live.next_frame() for _ in range(cut_tick)]
    assert before[-1].speaking
    live.clear()
    assert live.buffered_seconds == 0.0 and not live.speaking
    after = [live.next_frame() for _ in range(live.lead_ticks + 5)]
    assert not any(f.audio.any() for f in after) and not any(f.speaking for f in after)
    assert after[0].interrupted and after[0].segment_end
    assert not any(f.segment_end for f in after[1:])
    assert live.stats.interruptions == 1
    # The picture after the cut is what the same 16 kHz signal, silenced from the cut, gives.
    pushed = np.zeros((cut_tick + live.lead_ticks) * TICK, np.float32)  # what was in the pipeline
    spoken = (cut_tick + live.lead_ticks) * TICK - live.lead_ticks * TICK
    pushed[live.lead_ticks * TICK :] = pcm[:spoken].astype(np.float32) / 32768.0
    x16 = resample(pushed, RATE, tb.SAMPLE_RATE)
    x16[cut_tick * tb.SAMPLES_PER_FRAME :] = 0.0
    x16 = np.concatenate([x16, np.zeros((len(after) + live.lead_ticks) * tb.SAMPLES_PER_FRAME, np.float32)])
    s = engine.create_stream(face)
    s.accept_waveform(x16)
    offline = [s.step().image for _ in range(cut_tick + len(after))]
    bad = [f.index for f in after if not np.array_equal(f.image, offline[f.index])]
    assert not bad, (bad, cut_tick)


def test_clear_from_another_thread_while_ticking(engine, face, pcm):
    """Barge-in comes from the network while the tick thread renders: the cut waits for
    the next tick instead of editing the stream mid-render."""
    import threading

    live = LiveAvatar(engine, face, audio_rate=RATE)
    errors: list[BaseException] = []
    done = threading.Event()

    def tick():
        try:
            for _ in range(60):
                live.next_frame()
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)
        done.set()

    t = threading.Thread(target=tick)
    t.start()
    while not done.is_set():
        live.push_audio(pcm[:TICK * 3], RATE)
        live.clear()
    t.join()
    assert not errors, errors
    assert not live.speaking and live.buffered_seconds == 0.0
    f = [live.next_frame() for _ in range(live.lead_ticks + 1)]
    assert not any(x.audio.any() for x in f)


def test_jittery_input_plays_without_gaps(engine, face, pcm):
    """Audio in 20 ms pieces, two per tick, the first tick coming after the first piece:
    that tick waits for the second half, and from then on the sound comes out whole."""
    live = LiveAvatar(engine, face, audio_rate=RATE)
    half = TICK // 2
    pieces = [pcm[i : i + half] for i in range(0, 40 * TICK, half)]
    frames = []
    for n, p in enumerate(pieces):
        live.push_audio(p, RATE)
        if n % 2 == 0:
            frames.append(live.next_frame())
    live.end_segment()
    frames += [live.next_frame() for _ in range(live.lead_ticks + 3)]
    out = np.concatenate([f.audio[:, 0] for f in frames])
    start = np.flatnonzero(out)[0]
    assert start == (live.lead_ticks + 1) * TICK  # the first tick waited for its second half
    assert np.array_equal(out[start : start + 40 * TICK], pcm[: 40 * TICK])  # no gap inside
    assert live.stats.underruns == 1


def test_a_partial_tick_waits_once_then_plays(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    live.push_audio(pcm[:100], RATE)  # the rest of the utterance is late
    frames = [live.next_frame() for _ in range(live.lead_ticks + 2)]
    assert [f.speaking for f in frames[-2:]] == [False, True]
    assert np.array_equal(frames[-1].audio[:100, 0], pcm[:100]) and not frames[-1].audio[100:].any()
    assert live.stats.underruns == 1
    live.push_audio(pcm[100:150], RATE)
    live.end_segment()  # the end is known: no wait
    f = [live.next_frame() for _ in range(live.lead_ticks + 1)][-1]
    assert f.speaking and f.segment_end and np.array_equal(f.audio[:50, 0], pcm[100:150])


def test_clear_when_idle_reports_no_interruption(engine, face):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    live.next_frame()
    live.clear()
    f = live.next_frame()
    assert not f.interrupted and not f.segment_end and live.stats.interruptions == 0


def test_render_ticks_batched_equals_one_by_one(engine, face, pcm):
    a1, b1 = (LiveAvatar(engine, face, audio_rate=RATE, seed=s) for s in (1, 2))
    a2, b2 = (LiveAvatar(engine, face, audio_rate=RATE, seed=s) for s in (1, 2))
    for live in (a1, a2):
        _push(live, pcm[: 20 * TICK])
    batched = [render_ticks([a1, b1]) for _ in range(25)]
    single = [(a2.next_frame(), b2.next_frame()) for _ in range(25)]
    for (fa, fb), (ga, gb) in zip(batched, single, strict=True):
        np.testing.assert_array_equal(fa.image, ga.image)
        np.testing.assert_array_equal(fb.image, gb.image)
        np.testing.assert_array_equal(fa.audio, ga.audio)
    skipped = render_ticks([a1, b1], render=[False, True])
    assert skipped[0].image is None and skipped[1].image is not None
    assert a1.stats.skipped == 1 and a1.stats.frames == 26


def test_other_rates_and_channels_are_converted(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=48_000, channels=2)
    x16 = load_audio(DEMO_SPEECH)[:16_000]
    live.push_audio(np.stack([x16, x16], axis=1), 16_000, channels=2)
    live.end_segment()
    frames = [live.next_frame() for _ in range(25 + live.lead_ticks + 2)]
    out = np.concatenate([f.audio for f in frames]).astype(np.float32) / 32768
    assert out.shape[1] == 2 and np.array_equal(out[:, 0], out[:, 1])
    lead = live.lead_ticks * 1920
    ref = resample(x16, 16_000, 48_000)
    n = min(ref.size, out.shape[0] - lead) - 200  # the resampler's tail arrives at the flush
    assert np.abs(out[lead : lead + n, 0] - ref[:n]).max() < 2e-3


def test_live_queue_bound_drops_the_oldest(engine, face, pcm):
    live = LiveAvatar(engine, face, audio_rate=RATE, max_queue_seconds=0.2)
    live.push_audio(pcm[: RATE], RATE)
    assert live.queued_seconds == pytest.approx(0.2)
    assert live.stats.dropped_samples == RATE - RATE // 5
    f = [live.next_frame() for _ in range(live.lead_ticks + 1)][-1]
    ref = pcm[RATE - RATE // 5 : RATE - RATE // 5 + TICK].astype(int)
    assert np.array_equal(f.audio[:, 0].astype(int), ref)


@pytest.mark.parametrize(("call", "match"), [
    (lambda lv: lv.push_audio(np.zeros(10, np.int32), RATE), "int16 PCM or float32"),
    (lambda lv: lv.push_audio(np.zeros(11, np.int16), RATE, channels=2), "whole number"),
    (lambda lv: lv.push_audio(np.zeros((10, 3), np.int16), RATE, channels=2), "does not match"),
    (lambda lv: lv.push_audio(np.zeros(10, np.int16), 0), "positive integer"),
])
def test_bad_pushes_say_what_to_do(engine, face, call, match):
    live = LiveAvatar(engine, face, audio_rate=RATE)
    with pytest.raises(AudioError, match=match):
        call(live)


def test_audio_rate_must_fit_whole_ticks(engine, face):
    with pytest.raises(AudioError, match="divisible by 25"):
        LiveAvatar(engine, face, audio_rate=22_049)
