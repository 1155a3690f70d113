"""Phonemes -> target intensities of the five speech AUs, and coarticulated AU tracks.

The five AUs (order ``timebase.AU_NAMES``): AU10 upper lip raiser, AU14 dimpler (lip corners
tightened), AU20 lip stretcher (lips spread), AU25 lips part, AU26 jaw drop. Intensities are
in [0, 1]; 0 everywhere is the neutral closed mouth of a portrait photo.

Phonemes are grouped into visual classes (visemes). Every class has a target intensity per
AU and a dominance: how strongly the class imposes its shape on its neighbours (a bilabial
must close the lips whatever surrounds it; /h/ and the reduced vowels borrow their
neighbours' shape). The table is ``_CLASS_TABLE`` below (parsed into ``CLASSES``), one row
per class with the reason for its numbers; ``docs/au_table.md`` shows it with the phonemes
of each class (``markdown_table()`` generates it, a test keeps the two equal). Silence is 0
for every AU; bilabials close the lips (AU25 0) with the jaw nearly up; f/v lift the upper
lip onto the teeth; open vowels drop the jaw (AU26 up to 0.9); spread vowels stretch (AU20);
rounded vowels and w keep AU20 at 0 with a small lip opening.

Two alphabets land in the same classes: ARPAbet (CMU / pocketsphinx, stress digits and
``+NOISE+`` phones accepted) through ``ARPABET_CLASSES``, and espeak-ng's English mnemonics
through ``ESPEAK_TO_ARPABET`` first. A diphthong or a syllabic consonant passes through two
classes (AY = open -> near_front); its time span is split evenly between them.

Coarticulation (``au_curve``, ``au_tracks``) follows Cohen & Massaro (1993): the mouth shape
at time t is the dominance-weighted mean of all segment targets,

    F(t) = sum_i D_i(t) T_i / sum_i D_i(t),
    D_i(t) = a_i                                  inside segment i,
             a_i exp(-(start_i - t) / tau_ant)     before it (anticipation),
             a_i exp(-(t - end_i) / tau_carry)     after it (carry-over),

with the class dominance a_i and time constants longer for anticipation than for carry-over
(lips prepare for a rounded vowel well before it). The output is a convex combination of
targets, so it stays in [0, 1]. Outside the phoneme list the mouth is at rest (silence).
The visible mouth leads the sound (lips close and the jaw opens before the closure
or the vowel is heard): frame k shows F at the middle of video frame k plus ``lead_ms``
(default 40 ms, one video frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avatar_stream.engine.timebase import AU_NAMES, SAMPLE_RATE, SAMPLES_PER_FRAME

Phoneme = tuple[str, int, int]  # (symbol, start_sample, end_sample) at 16 kHz


@dataclass(frozen=True)
class VisemeClass:
    """Targets in ``AU_NAMES`` order, dominance, and why."""

    targets: tuple[float, float, float, float, float]
    dominance: float
    why: str


# One row per class: targets in AU_NAMES order, dominance, why. Parsed into CLASSES below.
_CLASS_TABLE = """
sil            0.00 0.00 0.00 0.00 0.00  0.6  pause: the photo's neutral closed mouth (weak: short pauses stay coarticulated)
bilabial       0.00 0.45 0.00 0.00 0.05  4.0  p b m: lips pressed shut, corners tightened by the press; closure is obligatory, so dominant
labiodental    0.60 0.00 0.00 0.30 0.10  3.0  f v: lower lip under the upper teeth, upper lip lifted
dental         0.05 0.00 0.05 0.55 0.25  1.5  th dh: tongue tip between the teeth, lips apart
alveolar       0.00 0.00 0.05 0.45 0.25  0.8  t d n l: tongue behind the teeth; lips and jaw follow the neighbours
sibilant       0.05 0.45 0.45 0.40 0.10  1.5  s z: teeth nearly together, lips spread, corners tight
postalveolar   0.55 0.00 0.00 0.50 0.15  2.0  sh zh ch jh: lips flared forward, upper lip raised
velar          0.00 0.00 0.05 0.45 0.25  0.7  k g ng: back of the tongue, jaw half open
glottal        0.00 0.00 0.05 0.50 0.30  0.3  hh: no oral gesture, takes the next vowel's shape
rhotic         0.45 0.00 0.00 0.35 0.15  1.2  r: lips slightly rounded and raised
labial_glide   0.05 0.00 0.00 0.20 0.10  2.5  w: lips tightly rounded, small opening
palatal_glide  0.05 0.40 0.55 0.40 0.15  1.0  y: as a short ee, lips spread, corners tight
open           0.00 0.00 0.05 1.00 0.90  1.0  aa (father): widest jaw opening
open_front     0.05 0.00 0.50 0.95 0.75  1.0  ae (cat): open and spread
open_mid       0.00 0.00 0.05 0.70 0.50  0.6  ah (cup), schwa: relaxed, half open, easily coarticulated
mid_front      0.05 0.05 0.50 0.75 0.50  1.0  eh (bed): half open, spread
near_front     0.05 0.40 0.60 0.55 0.25  1.0  ih (bit), end of ay/ey/oy: spread, jaw fairly closed, corners tight
close_front    0.05 0.50 0.75 0.50 0.15  1.2  iy (see): lips spread most, corners tightest
rhotic_vowel   0.45 0.00 0.00 0.50 0.30  1.0  er (bird): r-coloured, lips slightly rounded and raised
rounded_open   0.05 0.00 0.00 0.80 0.65  1.2  ao (law), start of oy: open and rounded, no spreading
rounded_mid    0.05 0.00 0.00 0.55 0.50  1.5  start of ow (go): rounded, half open
rounded_near   0.05 0.00 0.00 0.45 0.25  1.5  uh (book), end of ow/aw: rounded, nearly closed jaw
rounded_close  0.05 0.00 0.00 0.30 0.15  2.0  uw (too): lips rounded to a small opening
"""


def _parse_classes(table: str) -> dict[str, VisemeClass]:
    out = {}
    for line in table.strip().splitlines():
        name, *numbers = line.split(maxsplit=7)
        targets = tuple(float(v) for v in numbers[:5])
        out[name] = VisemeClass(targets, float(numbers[5]), numbers[6])  # type: ignore[arg-type]
    return out


CLASSES: dict[str, VisemeClass] = _parse_classes(_CLASS_TABLE)

# ARPAbet (the 39 CMU phones pocketsphinx's en-US model uses, plus SIL) -> classes passed through.
ARPABET_CLASSES: dict[str, tuple[str, ...]] = {
    "SIL": ("sil",),
    "P": ("bilabial",), "B": ("bilabial",), "M": ("bilabial",),
    "F": ("labiodental",), "V": ("labiodental",),
    "TH": ("dental",), "DH": ("dental",),
    "T": ("alveolar",), "D": ("alveolar",), "N": ("alveolar",), "L": ("alveolar",),
    "S": ("sibilant",), "Z": ("sibilant",),
    "SH": ("postalveolar",), "ZH": ("postalveolar",), "CH": ("postalveolar",), "JH": ("postalveolar",),
    "K": ("velar",), "G": ("velar",), "NG": ("velar",),
    "HH": ("glottal",),
    "R": ("rhotic",), "W": ("labial_glide",), "Y": ("palatal_glide",),
    "AA": ("open",), "AE": ("open_front",), "AH": ("open_mid",), "EH": ("mid_front",),
    "IH": ("near_front",), "IY": ("close_front",), "ER": ("rhotic_vowel",),
    "AO": ("rounded_open",), "UH": ("rounded_near",), "UW": ("rounded_close",),
    "AY": ("open", "near_front"), "AW": ("open", "rounded_near"), "EY": ("mid_front", "near_front"),
    "OY": ("rounded_open", "near_front"), "OW": ("rounded_mid", "rounded_near"),
}  # fmt: skip

# espeak-ng English phoneme mnemonics (every symbol of its en, en-us, en-us-nyc, en-rp, en-sc,
# en-n, en-wm and en-wi phoneme tables, plus the shared consonants those voices use) -> the
# ARPAbet phones a CMU dictionary writes for the same sound. Accent variants map to the
# American phone of the same lexical set (BATH "aa" -> AE, LOT "0" -> AA, "A@" -> AA R).
ESPEAK_TO_ARPABET: dict[str, tuple[str, ...]] = {
    # pauses
    "_": ("SIL",), "_:": ("SIL",), "_!": ("SIL",), "_^_": ("SIL",), "_|": ("SIL",), "_::": ("SIL",),
    "_;_": ("SIL",), "_X1": ("SIL",), "||": ("SIL",),
    # consonants
    "p": ("P",), "b": ("B",), "m": ("M",), "f": ("F",), "v": ("V",), "v#": ("V",),
    "T": ("TH",), "D": ("DH",),
    "t": ("T",), "t#": ("T",), "t2": ("T",), "t[": ("T",), "?": ("T",),  # ? = glottal stop for t
    "d": ("D",), "d#": ("D",), "d[": ("D",), "n": ("N",), "n.": ("N",), "n^": ("N",),
    "l": ("L",), "l/": ("L",), "l/2": ("L",), "l/3": ("L",), "l^": ("L",), "l.": ("L",), "l#": ("L",),
    "L/": ("L",),
    "s": ("S",), "z": ("Z",), "z#": ("Z",), "z/2": ("Z",), "ts": ("T", "S"), "dz": ("D", "Z"),
    "S": ("SH",), "Z": ("ZH",), "tS": ("CH",), "dZ": ("JH",),
    "k": ("K",), "g": ("G",), "N": ("NG",), "x": ("K",), "h": ("HH",),
    "r": ("R",), "r-": ("R",), "r/": ("R",), "w": ("W",), "w#": ("W",), "j": ("Y",), ";": ("Y",),
    "m-": ("AH", "M"), "n-": ("AH", "N"), "l-": ("AH", "L"), "@L": ("AH", "L"),  # syllabic
    # vowels
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@#": ("AH",), "a#": ("AH",), "a#2": ("AH",),
    "a2": ("AH",), "V": ("AH",),
    "a": ("AE",), "a/": ("AE",), "aa": ("AE",), "A:": ("AA",), "A#": ("AA",), "A~": ("AA",),
    "0": ("AA",), "0#": ("AA",), "02": ("AA",),
    "A@": ("AA", "R"), "3": ("ER",), "3:": ("ER",), "IR": ("ER",), "VR": ("ER",),
    "E": ("EH",), "E#": ("EH",), "E2": ("EH",), "e": ("EH",), "e#": ("EH",), "e@": ("EH", "R"),
    "e:": ("EY",), "eI": ("EY",),
    "I": ("IH",), "I#": ("IH",), "I2": ("IH",), "I2#": ("IH",),
    "i": ("IY",), "i:": ("IY",), "i@": ("IH", "R"), "i@3": ("IH", "R"),
    "O": ("AO",), "O:": ("AO",), "O2": ("AO",), "O~": ("AO",), "O@": ("AO", "R"), "o@": ("AO", "R"),
    "o": ("OW",), "o:": ("OW",), "oU": ("OW",), "oU#": ("OW",),
    "U": ("UH",), "U@": ("UH", "R"), "u": ("UW",), "u:": ("UW",),
    "aI": ("AY",), "aI2": ("AY",), "aI@": ("AY", "ER"), "aI3": ("AY", "ER"),
    "aU": ("AW",), "aU@": ("AW", "ER"), "OI": ("OY",),
}  # fmt: skip

# Occurrence thresholds, AU_NAMES order: an AU "occurs" in a frame when the mouth is past
# roughly the midpoint between rest and the classes that use the AU.
#   AU10 0.20  upper lip visibly raised: f v, sh ch, r, er (targets .45-.60; others <= .05)
#   AU14 0.20  corners tightened: bilabial closure, s z, y, ih/iy (targets .40-.50; others <= .05)
#   AU20 0.30  lips spread: front vowels, s z, y (targets .45-.75; others <= .05)
#   AU25 0.25  a visible gap between the lips: everything but p b m, w and rest
#   AU26 0.35  jaw clearly lowered: open and mid vowels (targets .40-.90), not consonants
OCCURRENCE_THRESHOLDS: tuple[float, float, float, float, float] = (0.20, 0.20, 0.30, 0.25, 0.35)


def arpabet_classes(phone: str) -> tuple[str, ...]:
    """Classes an ARPAbet phone passes through (one; two for diphthongs).

    Accepts stress digits (``"AH0"``), any case, pocketsphinx's ``"SIL"``/``"<sil>"`` and
    noise phones (``"+NSN+"``, ``"+SPN+"``: the mouth at rest). ``KeyError`` otherwise.
    """
    p = phone.strip().upper().rstrip("012")
    if p.startswith("+") or p in ("<SIL>", "SIL", "SP", ""):
        return ("sil",)
    try:
        return ARPABET_CLASSES[p]
    except KeyError:
        raise KeyError(
            f"{phone!r} is not an ARPAbet phone; known: {' '.join(sorted(ARPABET_CLASSES))}"
        ) from None


def espeak_to_arpabet(symbol: str) -> tuple[str, ...]:
    """ARPAbet phones for one espeak-ng English phoneme mnemonic (``"aI@"`` -> AY ER)."""
    try:
        return ESPEAK_TO_ARPABET[symbol]
    except KeyError:
        raise KeyError(
            f"espeak phoneme {symbol!r} is not in au_table.ESPEAK_TO_ARPABET; add it there "
            "(only English espeak voices are mapped)"
        ) from None


def espeak_classes(symbol: str) -> tuple[str, ...]:
    """Classes an espeak-ng English phoneme passes through, via its ARPAbet phones."""
    return tuple(c for p in espeak_to_arpabet(symbol) for c in ARPABET_CLASSES[p])


def class_segments(phonemes: Sequence[Phoneme], alphabet: str) -> list[tuple[str, int, int]]:
    """``(class, start, end)`` spans; a multi-class phoneme's span is split evenly."""
    to_classes = {"espeak": espeak_classes, "arpabet": arpabet_classes}.get(alphabet)
    if to_classes is None:
        raise ValueError(f"alphabet must be 'espeak' or 'arpabet', got {alphabet!r}")
    out = []
    for symbol, start, end in phonemes:
        classes = to_classes(symbol)
        edges = [start + (end - start) * i // len(classes) for i in range(len(classes) + 1)]
        out.extend((c, edges[i], edges[i + 1]) for i, c in enumerate(classes) if edges[i + 1] > edges[i])
    return out


def au_curve(
    phonemes: Sequence[Phoneme],
    times: np.ndarray,
    *,
    alphabet: str,
    anticipation_ms: float = 40.0,
    carryover_ms: float = 25.0,
) -> np.ndarray:
    """Coarticulated AU intensities ``(len(times), 5)`` float64 at sound times ``times``
    (16 kHz sample positions, any real values). No lead: ``au_tracks`` applies it."""
    segs = class_segments(phonemes, alphabet)
    # Rest before the first and after the last phoneme, unbounded: the neutral mouth there.
    first = min((s for _, s, _ in segs), default=0)
    last = max((e for _, _, e in segs), default=0)
    segs = [("sil", -np.inf, first), *segs, ("sil", last, np.inf)]
    starts = np.array([s for _, s, _ in segs], dtype=np.float64)[:, None]
    ends = np.array([e for _, _, e in segs], dtype=np.float64)[:, None]
    dominance = np.array([CLASSES[c].dominance for c, _, _ in segs])[:, None]
    targets = np.array([CLASSES[c].targets for c, _, _ in segs])  # (S, 5)
    t = np.asarray(times, dtype=np.float64)[None, :]
    tau_ant = anticipation_ms * SAMPLE_RATE / 1000.0
    tau_carry = carryover_ms * SAMPLE_RATE / 1000.0
    before = np.maximum(starts - t, 0.0)  # (S, T) distance to a segment still to come
    after = np.maximum(t - ends, 0.0)  # distance past a segment that has ended
    weight = dominance * np.exp(-before / tau_ant - after / tau_carry)
    # The tiny rest weight keeps a gap far from every segment (if a list has one) neutral.
    return (weight.T @ targets) / (weight.sum(axis=0)[:, None] + 1e-9)


def au_tracks(
    phonemes: Sequence[Phoneme],
    n_frames: int,
    *,
    alphabet: str,
    lead_ms: float = 40.0,
    anticipation_ms: float = 40.0,
    carryover_ms: float = 25.0,
) -> np.ndarray:
    """AU intensities per video frame, ``(n_frames, 5)`` float32 in [0, 1], ``AU_NAMES`` order.

    ``phonemes``: ``(symbol, start, end)`` in 16 kHz samples, in the espeak-ng or ARPAbet
    ``alphabet`` (required: the two share symbols with different meanings, e.g. ``"S"``).
    Frame k is the mouth at the middle of video frame k (sample ``640 k + 320``), which
    shows the sound ``lead_ms`` later: the mouth leads the voice.
    """
    lead = lead_ms * SAMPLE_RATE / 1000.0
    mid = np.arange(n_frames, dtype=np.float64) * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME / 2
    curve = au_curve(
        phonemes, mid + lead, alphabet=alphabet, anticipation_ms=anticipation_ms, carryover_ms=carryover_ms
    )
    return np.clip(curve, 0.0, 1.0).astype(np.float32).reshape(n_frames, len(AU_NAMES))


def occurrence(intensities: np.ndarray, thresholds: Sequence[float] = OCCURRENCE_THRESHOLDS) -> np.ndarray:
    """Per-AU occurrence labels ``uint8`` (same shape) from intensities ``(..., 5)``:
    1 where intensity >= the AU's threshold (``OCCURRENCE_THRESHOLDS``). NaN -> 0."""
    x = np.asarray(intensities)
    if x.shape[-1] != len(AU_NAMES):
        raise ValueError(
            f"intensities must end in {len(AU_NAMES)} AUs ({', '.join(AU_NAMES)}), got {x.shape}"
        )
    return (x >= np.asarray(thresholds, dtype=x.dtype)).astype(np.uint8)


def markdown_table() -> str:
    """The class table of docs/au_table.md, generated from ``CLASSES`` and ``ARPABET_CLASSES``."""
    members: dict[str, list[str]] = {c: [] for c in CLASSES}
    for phone, classes in ARPABET_CLASSES.items():
        for i, c in enumerate(classes):
            members[c].append(phone if len(classes) == 1 else f"{phone} ({'start' if i == 0 else 'end'})")
    head = "| class | " + " | ".join(AU_NAMES) + " | dominance | ARPAbet | why |"
    rows = [head, "|" + "---|" * (len(AU_NAMES) + 4)]
    for name, vc in CLASSES.items():
        cells = " | ".join(f"{v:.2f}" for v in vc.targets)
        rows.append(f"| {name} | {cells} | {vc.dominance:.1f} | {', '.join(members[name])} | {vc.why} |")
    thr = " | ".join(f"{v:.2f}" for v in OCCURRENCE_THRESHOLDS)
    rows += [
        "",
        "| occurrence threshold | " + " | ".join(AU_NAMES) + " |",
        "|" + "---|" * 6,
        f"| >= | {thr} |",
    ]
    return "\n".join(rows) + "\n"
