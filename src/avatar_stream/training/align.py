"""Phone timings on real speech with pocketsphinx (CMU en-US acoustic model, offline).

``force_align(audio, transcript)`` places the transcript's ARPAbet phones in 16 kHz audio
(Viterbi alignment against the CMU dictionary pronunciations, two passes: words, then
phones). ``recognize_phones(audio)`` needs no transcript: a phone loop with the en-US phone
bigram (``en-us-phone.lm.bin``) recognises phones directly, less accurately (a wrong phone
of the right class still moves the mouth right). ``recognize_words(audio)`` is pocketsphinx's
word recogniser (the en-US trigram LM and CMU dictionary); forcing the audio onto its
hypothesis gives far better phones than the phone loop even where words are wrong, since a
misheard word is mostly a similar-sounding one. Measured on the 29 real recordings in
shared/data with a transcript (speech_train, speech_dev, grid_dev), occurrence labels of
the five AUs against those from the true transcript's alignment: mean F1 0.926 with the
recognised words, 0.729 with the phone loop. ``align_with_fallback`` uses the transcript
when there is one, else the recognised words, else the phone loop.

Phones are ``(ARPAbet, start_sample, end_sample)`` at 16 kHz: contiguous, sorted, covering
exactly ``[0, len(audio))``; silence and noise are ``"SIL"``. pocketsphinx works in 10 ms
frames (``FRAME_SAMPLES``), so boundaries are multiples of 160 samples except the last end.

Words missing from the CMU dictionary get a pronunciation from espeak-ng
(``speech.synthesize`` phonemes mapped by ``au_table.espeak_to_arpabet``), so names and
numbers in a transcript do not stop an alignment.
"""

from __future__ import annotations

import functools
import re
import threading

import numpy as np

from avatar_stream.engine.timebase import SAMPLE_RATE, exact_div
from avatar_stream.errors import AvatarError
from avatar_stream.training import au_table, speech

FRAME_SAMPLES = exact_div(SAMPLE_RATE, 100)  # pocketsphinx analyses 100 frames per second
PHONE_SEARCH = "phone_loop"

Phone = tuple[str, int, int]


class AlignmentError(AvatarError, ValueError):
    """The transcript could not be aligned to the audio (one line, says what to do)."""


_LOCK = threading.Lock()  # the cached decoders serve one call at a time


def _pocketsphinx():
    try:
        import pocketsphinx
    except ImportError as e:
        raise RuntimeError(f"pocketsphinx is missing ({e}): pip install -e '.[train]'") from e
    return pocketsphinx


@functools.cache
def _aligner():
    # Beams far wider than the recogniser defaults (1e-48): an alignment search is small, and
    # with the defaults about half of a set of espeak utterances lost the correct path
    # (16/30 aligned; 30/30 with these). bestpath=False: the lattice rescoring pass can drop
    # words from an alignment (seen: the last word of "bibles in mainz").
    return _pocketsphinx().Decoder(
        samprate=SAMPLE_RATE, loglevel="FATAL", bestpath=False,
        beam=1e-250, wbeam=1e-200, pbeam=1e-250, maxhmmpf=-1,
    )  # fmt: skip


@functools.cache
def _phone_loop():
    ps = _pocketsphinx()
    decoder = ps.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
    decoder.add_allphone_file(PHONE_SEARCH, ps.get_model_path("en-us/en-us-phone.lm.bin"))
    decoder.activate_search(PHONE_SEARCH)
    return decoder


def normalize_transcript(text: str) -> list[str]:
    """Lower-case words as the CMU dictionary spells them: letters, digits, inner apostrophes."""
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower())


def _pcm_bytes(audio: np.ndarray) -> bytes:
    x = np.asarray(audio)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"audio must be 1-D float samples at 16 kHz, got {x.dtype} {x.shape}")
    if len(x) < 10 * FRAME_SAMPLES:
        raise AlignmentError(f"audio is {len(x)} samples long; alignment needs at least 100 ms at 16 kHz")
    return (np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


def _decode(decoder, pcm: bytes) -> None:
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)  # full_utt: cepstral mean from the whole utterance
    decoder.end_utt()


def _add_missing_words(decoder, words: list[str]) -> None:
    """Give out-of-dictionary words espeak-ng's pronunciation (once per decoder)."""
    for word in dict.fromkeys(words):
        if decoder.lookup_word(word) is not None:
            continue
        try:
            utt = speech.synthesize(word, "en-us")
            phones = [a for sym, _, _ in utt.phonemes for a in au_table.espeak_to_arpabet(sym) if a != "SIL"]
        except (ValueError, KeyError) as e:
            raise AlignmentError(
                f"cannot pronounce {word!r} ({e}); spell it out in words in the transcript"
            ) from e
        decoder.add_word(word, " ".join(phones), True)


def _covering(spans: list[Phone], n_samples: int) -> list[Phone]:
    """Clip to the audio, fill gaps with SIL, merge adjacent SIL, end exactly at n_samples."""
    out: list[Phone] = []
    cursor = 0
    for name, start, end in spans:
        start, end = max(start, cursor), min(end, n_samples)
        if end <= start:
            continue
        if start > cursor:
            out.append(("SIL", cursor, start))
        out.append((name, start, end))
        cursor = end
    if cursor < n_samples:
        out.append(("SIL", cursor, n_samples))
    merged: list[Phone] = []
    for name, start, end in out:
        if merged and name == "SIL" and merged[-1][0] == "SIL":
            merged[-1] = ("SIL", merged[-1][1], end)
        else:
            merged.append((name, start, end))
    if merged and merged[-1][0] != "SIL":  # the last frame may be partial: give it the tail
        merged[-1] = (merged[-1][0], merged[-1][1], n_samples)
    return merged


def _phone_name(name: str) -> str:
    return "SIL" if name.startswith(("+", "<", "[")) or name.upper() == "SIL" else name.upper()


def _align(audio: np.ndarray, transcript: str) -> tuple[list[Phone], list[Phone]]:
    words = normalize_transcript(transcript)
    if not words:
        raise AlignmentError(f"transcript {transcript!r} has no words; pass the text that is spoken")
    pcm = _pcm_bytes(audio)
    with _LOCK:
        decoder = _aligner()
        _add_missing_words(decoder, words)
        decoder.set_align_text(" ".join(words))
        _decode(decoder, pcm)
        if decoder.hyp() is None:
            raise AlignmentError(f"{transcript!r} could not be aligned: is it what the audio says?")
        decoder.set_alignment()
        _decode(decoder, pcm)
        alignment = decoder.get_alignment()
        word_spans = [
            (re.sub(r"\(\d+\)$", "", w.name), w.start * FRAME_SAMPLES, (w.start + w.duration) * FRAME_SAMPLES)
            for w in alignment
        ]
        phone_spans = [
            (_phone_name(p.name), p.start * FRAME_SAMPLES, (p.start + p.duration) * FRAME_SAMPLES)
            for p in alignment.phones()
        ]
    found = [w for w, _, _ in word_spans if _phone_name(w) != "SIL"]
    if found != words:
        raise AlignmentError(
            f"alignment found {' '.join(found)!r}, not {' '.join(words)!r}; check the transcript"
        )
    return _covering(phone_spans, len(audio)), [s for s in word_spans if _phone_name(s[0]) != "SIL"]


def force_align(audio: np.ndarray, transcript: str) -> list[Phone]:
    """ARPAbet phones of ``transcript`` placed in ``audio`` (16 kHz float32), covering it.

    Raises ``AlignmentError`` when the transcript has no words, the audio is shorter than
    100 ms, or the decoder cannot fit the transcript to the audio.
    """
    return _align(audio, transcript)[0]


def force_align_words(audio: np.ndarray, transcript: str) -> list[tuple[str, int, int]]:
    """The transcript's words ``(word, start, end)`` in 16 kHz samples, pauses left out."""
    return _align(audio, transcript)[1]


def recognize_phones(audio: np.ndarray) -> list[Phone]:
    """ARPAbet phones recognised by the phone loop (no transcript), covering ``audio``."""
    pcm = _pcm_bytes(audio)
    with _LOCK:
        decoder = _phone_loop()
        _decode(decoder, pcm)
        # seg() end frames are inclusive.
        spans = [
            (_phone_name(s.word), s.start_frame * FRAME_SAMPLES, (s.end_frame + 1) * FRAME_SAMPLES)
            for s in decoder.seg()
        ]
    return _covering(spans, len(audio))


@functools.cache
def _recognizer():
    return _pocketsphinx().Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")  # en-us LM + dictionary


def recognize_words(audio: np.ndarray) -> str:
    """What pocketsphinx's en-US word recogniser hears in ``audio`` (lower case, "" for none)."""
    pcm = _pcm_bytes(audio)
    with _LOCK:
        decoder = _recognizer()
        _decode(decoder, pcm)
        hyp = decoder.hyp()
    return hyp.hypstr.strip() if hyp is not None else ""


def align_with_fallback(audio: np.ndarray, transcript: str | None) -> tuple[list[Phone], str]:
    """``(phones, method)``: forced alignment when a transcript is given and fits
    (method ``"forced"``); else forced alignment of what the word recogniser heard
    (``"recognized"``); else the phone loop (``"phone_loop"``).

    A transcript that fits the audio's length but not its words is still placed (the
    aligner does not judge it); only one that cannot be placed falls back. Audio under
    100 ms raises ``AlignmentError`` either way.
    """
    if transcript is not None and normalize_transcript(transcript):
        try:
            return force_align(audio, transcript), "forced"
        except AlignmentError:
            pass  # a wrong or partial transcript: recognise instead
    heard = recognize_words(audio)
    if normalize_transcript(heard):
        try:
            return force_align(audio, heard), "recognized"
        except AlignmentError:
            pass
    return recognize_phones(audio), "phone_loop"
