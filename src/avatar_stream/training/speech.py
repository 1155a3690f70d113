"""Speech with phoneme timings: sentences (training/sentences.py) spoken by espeak-ng.

``synthesize(text, voice, rate, pitch) -> Utterance`` returns 16 kHz float32 audio and the
phonemes espeak-ng itself placed in it, as ``(symbol, start_sample, end_sample)`` in 16 kHz
samples. The symbols are espeak's own mnemonics (``"b"``, ``"I"``, ``"aU"``, ``"_:"``);
``training.au_table.espeak_class`` turns them into mouth-shape classes.

How the timings are obtained: libespeak-ng is driven through ctypes in synchronous mode with
phoneme events enabled (``espeakINITIALIZE_PHONEME_EVENTS``). Every event carries the sample
index at 22,050 Hz where its phoneme starts; a phoneme ends where the next one starts.

Why a helper process: libespeak-ng 1.51 keeps synthesiser state (glottal phase, pitch
smoothing) from one utterance to the next, so the same text spoken twice in one process
differs by a few samples in length and in every sample after the first vowel. Only the
first utterance after ``espeak_Initialize`` in a fresh process is reproducible. So one small
single-threaded zygote process loads and initialises the library once and forks a child
for every utterance: each child starts from the same pristine state, output is bit-exact
for a fixed ``(text, voice, rate, pitch)``, and a crash inside the C library cannot take the
caller down. The fork costs about a millisecond. POSIX only (``os.fork``).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np

from avatar_stream.engine.audio import resample
from avatar_stream.engine.timebase import SAMPLE_RATE

# ----------------------------------------------------------------------------- voices

RATE_RANGE = (120, 220)  # words per minute, inclusive; espeak's default is 175
PITCH_RANGE = (30, 70)  # espeak's 0-100 base pitch scale, inclusive; 50 is the voice's own

# espeak-ng voice variants ("en-us+f3") that sound like a human speaker. Left out on purpose:
# whisper/whisperf (unvoiced), croak, robots, "Demonic", "announcer" and effect voices, whose
# spectra a microphone will not deliver. Variants missing from an installation are skipped.
HUMAN_VARIANTS: tuple[str, ...] = (
    "", "f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie", "aunty", "david", "edward",
    "linda", "max", "michel", "paul", "rob", "robert", "steph", "travis", "zac",
)  # fmt: skip


@dataclass(frozen=True)
class Voice:
    """An espeak-ng speaker: voice name (``"en-gb-x-rp+m3"``), rate (wpm), base pitch (0-100)."""

    name: str = "en-us"
    rate: int = 160
    pitch: int = 50


@functools.cache
def english_voices() -> tuple[str, ...]:
    """Every English base voice of this espeak-ng installation (mbrola voices excluded:
    they need non-free data) combined with every installed ``HUMAN_VARIANTS`` entry,
    e.g. ``("en", "en+f1", ..., "en-us+zac")``. Sorted, never empty."""
    header, _ = _zygote_call({"op": "voices"})
    bases, variants = header["bases"], set(header["variants"])
    return tuple(
        sorted(b + (f"+{v}" if v else "") for b in bases for v in HUMAN_VARIANTS if v in variants or not v)
    )


def random_voice(rng: np.random.Generator, voices: tuple[str, ...] | None = None) -> Voice:
    """A voice drawn from ``voices`` (default ``english_voices()``) with rate and pitch drawn
    uniformly from ``RATE_RANGE`` and ``PITCH_RANGE``."""
    voices = voices or english_voices()
    return Voice(
        name=voices[int(rng.integers(len(voices)))],
        rate=int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
        pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
    )


# ----------------------------------------------------------------------------- synthesis


@dataclass(frozen=True, eq=False)
class Utterance:
    """Audio and espeak's phonemes for it.

    ``audio``: float32 (N,) at 16 kHz in [-1, 1]. ``phonemes``: ``(symbol, start, end)`` in
    16 kHz samples, sorted, contiguous (each start is the previous end), covering exactly
    ``[0, N)``; pauses are espeak's ``"_"``-symbols, leading silence included.
    """

    text: str
    voice: Voice
    audio: np.ndarray
    phonemes: tuple[tuple[str, int, int], ...]


def synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> Utterance:
    """Speak ``text`` (UTF-8; ``[[...]]`` is read as espeak phonemes) with an espeak-ng voice.

    Bit-exact for a fixed ``(text, voice, rate, pitch)``. Raises ``ValueError`` for an unknown
    voice, a rate outside 80-450 wpm, a pitch outside 0-100 or text with nothing to speak.
    """
    if not 80 <= rate <= 450:
        raise ValueError(f"espeak-ng rate {rate} wpm is outside 80-450; use e.g. {RATE_RANGE}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"espeak-ng pitch {pitch} is outside 0-100; 50 is the voice's own pitch")
    header, pcm = _zygote_call({"op": "synth", "text": text, "voice": voice, "rate": rate, "pitch": pitch})
    if all(name.startswith("_") for name, _ in header["phonemes"]):  # pauses only, or nothing
        raise ValueError(f"espeak-ng found nothing to speak in {text!r}: give it words")
    audio22 = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    # The band-limited resampler can overshoot a full-scale peak by a hair: keep [-1, 1].
    audio = np.clip(resample(audio22, header["sample_rate"]), -1.0, 1.0)
    phonemes = _phonemes_16k(header["phonemes"], header["sample_rate"], len(audio))
    return Utterance(text=text, voice=Voice(voice, rate, pitch), audio=audio, phonemes=phonemes)


def _phonemes_16k(events: list, rate: int, n_samples: int) -> tuple[tuple[str, int, int], ...]:
    """espeak phoneme starts (samples at ``rate``) -> contiguous 16 kHz spans over [0, n)."""
    starts, latest = [], 0
    for name, s in events:  # running maximum: spans can never overlap, even if events did
        latest = max(latest, (2 * s * SAMPLE_RATE + rate) // (2 * rate))  # rounded rate conversion
        starts.append((name, latest))
    if not starts or starts[0][1] > 0:
        starts.insert(0, ("_", 0))  # the silence espeak puts before the first phoneme
    out = []
    for i, (name, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else n_samples
        start, end = min(start, n_samples), min(end, n_samples)
        if end > start:  # events that round onto one sample, or lie past the end, carry no time
            out.append((name, start, end))
    return tuple(out)


# ----------------------------------------------------------------------------- the zygote

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8, _PHONEMES = 0x1, 0x100
_EVENT_PHONEME = 7
_PARAM_RATE, _PARAM_PITCH = 1, 3
_POS_CHARACTER = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT, speak_lib.h (API revision 12)
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # sample index at the library's rate
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _VoiceStruct(ctypes.Structure):  # espeak_VOICE
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),  # (priority byte, name, NUL)*, NUL
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


def _load_library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libespeak-ng.so.1")
    except OSError as e:
        raise RuntimeError(
            f"libespeak-ng is not installed ({e}): run `make apt` (apt-get install libespeak-ng1)"
        ) from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_VoiceStruct)]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))
    return lib


def _child_synth(lib: ctypes.CDLL, rate: int, req: dict) -> tuple[dict, bytes]:
    """One utterance in a freshly forked child (pristine library state)."""
    chunks: list[bytes] = []
    phonemes: list[list] = []

    def on_synth(wav, n, events) -> int:
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events[i].type != 0:  # the list ends with espeakEVENT_LIST_TERMINATED
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                phonemes.append([ev.id.string.decode("utf-8", "replace"), ev.sample])
            i += 1
        return 0

    # espeak-ng draws its noise (breath, frication) from the C library's rand(), whose state
    # is the process's: whatever in this process called rand() before would change the
    # samples. Seeding it as a fresh process starts (glibc's initial seed is 1) makes every
    # utterance a function of its arguments alone, and equal to the espeak-ng program's.
    ctypes.CDLL(None).srand(1)
    callback = _SynthCallback(on_synth)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(req["voice"].encode()) != 0:
        raise ValueError(f"unknown espeak-ng voice {req['voice']!r}: pick one of speech.english_voices()")
    lib.espeak_SetParameter(_PARAM_RATE, req["rate"], 0)
    lib.espeak_SetParameter(_PARAM_PITCH, req["pitch"], 0)
    text = req["text"].encode("utf-8")
    status = lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _PHONEMES, None, None)
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status}")
    return {"sample_rate": rate, "phonemes": phonemes}, b"".join(chunks)


def _child_voices(lib: ctypes.CDLL) -> tuple[dict, bytes]:
    voices = lib.espeak_ListVoices(None)
    bases = set()
    i = 0
    while voices[i]:
        ident = voices[i].contents.identifier.decode()
        name = ident.rsplit("/", 1)[-1].lower()
        if not ident.startswith("mb/") and (name == "en" or name.startswith("en-")):
            bases.add(name)
        i += 1
    spec = _VoiceStruct(languages=b"variant")
    found = lib.espeak_ListVoices(ctypes.byref(spec))
    variants = set()
    i = 0
    while found[i]:
        variants.add(found[i].contents.identifier.decode().rsplit("/", 1)[-1])
        i += 1
    return {"bases": sorted(bases), "variants": sorted(variants)}, b""


def _serve() -> None:
    """Zygote main loop: one JSON request per stdin line, one framed reply on the protocol fd.

    Runs in its own single-threaded process (so forking is safe). fd 1 is pointed at stderr
    so that nothing the C library prints can corrupt the reply stream.
    """
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    lib = _load_library()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
    for line in sys.stdin.buffer:
        req = json.loads(line)
        if rate <= 0:
            reply = _frame(
                {"error": "espeak_Initialize failed: is espeak-ng-data installed (`make apt`)?"}, b""
            )
        else:
            reply = _fork_and_run(lib, rate, req)
        _write_all(reply_fd, reply)


def _fork_and_run(lib: ctypes.CDLL, rate: int, req: dict) -> bytes:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: do the work from the pristine state, hand the bytes back, vanish
        os.close(r)
        try:
            header, payload = _child_synth(lib, rate, req) if req["op"] == "synth" else _child_voices(lib)
            reply = _frame(header, payload)
        except (ValueError, RuntimeError) as e:  # RuntimeError: the library itself refused
            reply = _frame({"error": str(e), "value_error": isinstance(e, ValueError)}, b"")
        _write_all(w, reply)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        reply = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(reply) < 8:
        return _frame(
            {"error": f"espeak-ng crashed on {req.get('text', req['op'])!r} (wait status {status})"}, b""
        )
    return reply


def _frame(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<II", len(head), len(payload)) + head + payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Zygote:
    """Client side: starts ``_serve`` in ``sys.executable`` and talks to it over pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from avatar_stream.training.speech import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def call(self, req: dict) -> tuple[dict, bytes]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            n_head, n_payload = struct.unpack("<II", self._read(8))
            return json.loads(self._read(n_head)), self._read(n_payload)
        except (OSError, EOFError, struct.error) as e:
            raise RuntimeError(
                f"the espeak-ng helper process failed ({e}); its own message is on stderr"
            ) from e

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if len(data) != n:
            raise EOFError(f"helper exited mid-reply ({len(data)} of {n} bytes)")
        return data

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF ends the serve loop
            self.proc.wait(timeout=10)


_LOCK = threading.Lock()
_ZYGOTE: _Zygote | None = None


def _zygote_call(req: dict) -> tuple[dict, bytes]:
    """Send one request (serialised: the zygote answers in order), restarting a dead zygote."""
    global _ZYGOTE
    with _LOCK:
        if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
            _ZYGOTE = _Zygote()
            atexit.register(_ZYGOTE.close)  # a restarted zygote registers its own close
        try:
            header, payload = _ZYGOTE.call(req)
        except RuntimeError:
            _ZYGOTE = None  # the stream is out of step: the next call starts a new helper
            raise
    if "error" in header:
        raise (ValueError if header.get("value_error") else RuntimeError)(header["error"])
    return header, payload


def _forget_zygote() -> None:
    # A forked child (a DataLoader or multiprocessing worker) must not share the parent's
    # pipes, whose replies would interleave, nor a lock another thread held at fork time.
    global _ZYGOTE, _LOCK
    _ZYGOTE, _LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_zygote)
