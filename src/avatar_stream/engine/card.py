"""Reading and validating the model card stored inside every exported ONNX graph.

The card is the JSON string in ``metadata_props["avatar_stream.card"]`` (docs/interfaces.md,
"Exported model directory"). The engine takes every shape and rate from it and refuses a card
it does not understand, naming the mismatch (docs/design.md §8, habit 5): a graph exported for another
window, frame rate or AU order would otherwise produce plausible-looking but wrong video.

No torch here: the card is read through onnxruntime, which the engine needs anyway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from avatar_stream.engine import timebase
from avatar_stream.errors import AvatarError

CARD_KEY = "avatar_stream.card"
CARD_FORMAT = "avatar-stream-card"
# 2: the audio graph is named "audio" (audio.onnx); version 1 called it "frame" (frame.onnx).
CARD_VERSION = 2
IMAGE_SIZE = 112
PRECISIONS = ("fp32", "fp16", "int8")
REEXPORT = "re-export with this version of avatar-export"

# Graph name -> (input names, output names), in the order the graphs declare them.
GRAPH_IO: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType(
    {
        "identity": (("face",), ("f_id", "skip0", "skip1", "skip2", "skip3")),
        "audio": (("pcm",), ("feat", "au_prob")),
        "tcsan_decoder": (("feats", "f_id", "skip0", "skip1", "skip2", "skip3"), ("frame",)),
        "mouth": (("feats",), ("mouth",)),
    }
)
# The graphs every model directory has; ``mouth`` (the mouth head trained on real video,
# training/mouth_head.py) is optional: without it the warp renderer reads the Audio2AU
# probabilities instead.
REQUIRED_GRAPHS = ("identity", "audio", "tcsan_decoder")
OPTIONAL_GRAPHS = ("mouth",)
GRAPH_FILES: Mapping[str, str] = MappingProxyType({g: f"{g}.onnx" for g in REQUIRED_GRAPHS})
OPTIONAL_GRAPH_FILES: Mapping[str, str] = MappingProxyType({g: f"{g}.onnx" for g in OPTIONAL_GRAPHS})
# Card fields a card may lack (older exports): their default applies.
OPTIONAL_FIELDS = ("head",)

# Card fields whose value this engine build fixes: a different value means the graph was
# made for another definition of time or another AU set.
EXPECTED: Mapping[str, Any] = MappingProxyType(
    {
        "format": CARD_FORMAT,
        "card_version": CARD_VERSION,
        "sample_rate": timebase.SAMPLE_RATE,
        "fps": timebase.FPS,
        "window_samples": timebase.WINDOW_SAMPLES,
        "window_offset": timebase.WINDOW_OFFSET,
        "samples_per_frame": timebase.SAMPLES_PER_FRAME,
        "au_order": list(timebase.AU_NAMES),
        "image_size": IMAGE_SIZE,
    }
)


class ModelCardError(AvatarError, ValueError):
    """A model file or card the engine cannot use; the message says what to do."""


def _frozen(value: Any) -> Any:
    """Read-only view of nested JSON so a frozen card cannot be changed through its dicts."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelCard:
    """The validated card of one graph. ``inputs``/``outputs`` map each tensor name to its
    dims, ``"B"`` marking the dynamic batch axis."""

    graph: str
    package_version: str
    sample_rate: int
    fps: int
    window_samples: int
    window_offset: int
    samples_per_frame: int
    lookahead_frames: int
    receptive_field: int
    au_order: tuple[str, ...]
    image_size: int
    frame_feature_dim: int
    inputs: Mapping[str, tuple]
    outputs: Mapping[str, tuple]
    config: Mapping[str, Any]
    checkpoint_sha256: str
    exporter_version: str
    precision: str
    parity: Mapping[str, float]
    format: str = CARD_FORMAT
    card_version: int = CARD_VERSION
    # The mouth graph's own description (its config, checkpoint, measures, what it was
    # trained on); empty for the other graphs.
    head: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (without ``source``, which is where it was read from, and
        without an empty ``head``, so the other graphs' cards read as before)."""
        return {f.name: _thawed(getattr(self, f.name)) for f in fields(self)
                if f.name != "source" and not (f.name == "head" and not self.head)}

    def to_json(self) -> str:
        # Key order is meaningful: inputs/outputs are listed in graph order.
        return json.dumps(self.to_dict())

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs)


def card_from_dict(data: Mapping[str, Any], source: str = "card") -> ModelCard:
    """Validate a card dict and freeze it. Raises ModelCardError naming the first mismatch."""
    if not isinstance(data, Mapping):
        raise ModelCardError(f"{source}: model card is not a JSON object: {REEXPORT}")
    for key, want in EXPECTED.items():
        got = data.get(key)
        if key == "au_order" and isinstance(got, list | tuple):
            got = list(got)
        if got != want:
            raise ModelCardError(
                f"{source}: card {key}={got!r} but this engine expects {want!r}: {REEXPORT}"
            )
    names = [f.name for f in fields(ModelCard) if f.name != "source"]
    missing = [n for n in names if n not in data and n not in OPTIONAL_FIELDS]
    if missing:
        raise ModelCardError(f"{source}: model card lacks {', '.join(missing)}: {REEXPORT}")
    card = ModelCard(**{n: _frozen(data[n]) for n in names if n in data}, source=source)
    _check_consistency(card, source)
    return card


def _check_consistency(card: ModelCard, source: str) -> None:
    if card.graph not in GRAPH_IO:
        raise ModelCardError(
            f"{source}: card graph={card.graph!r}, expected one of {sorted(GRAPH_IO)}: {REEXPORT}"
        )
    want_in, want_out = GRAPH_IO[card.graph]
    if card.input_names != want_in or card.output_names != want_out:
        raise ModelCardError(
            f"{source}: {card.graph} graph has inputs {list(card.input_names)} / outputs "
            f"{list(card.output_names)}, expected {list(want_in)} / {list(want_out)}: {REEXPORT}"
        )
    if card.receptive_field != 2 * card.lookahead_frames + 1:
        raise ModelCardError(
            f"{source}: receptive_field={card.receptive_field} is not 2*lookahead_frames+1 "
            f"(lookahead_frames={card.lookahead_frames}): {REEXPORT}"
        )
    if card.precision not in PRECISIONS:
        raise ModelCardError(
            f"{source}: card precision={card.precision!r}, expected one of {PRECISIONS}: {REEXPORT}"
        )


def card_from_json(text: str, source: str = "card") -> ModelCard:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelCardError(f"{source}: model card is not valid JSON ({e}): {REEXPORT}") from None
    return card_from_dict(data, source)


def card_from_metadata(metadata: Mapping[str, str], source: str) -> ModelCard:
    """The card from a graph's custom metadata map (``onnxruntime`` ``custom_metadata_map``)."""
    if CARD_KEY not in metadata:
        raise ModelCardError(
            f"{source} has no '{CARD_KEY}' metadata: it was not written by avatar-export; {REEXPORT}"
        )
    return card_from_json(metadata[CARD_KEY], source)


def read_card(onnx_path: str | Path) -> ModelCard:
    """Read and validate the card of one ONNX file."""
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise ModelCardError(f"{path} does not exist: run avatar-export --checkpoint CKPT --out DIR")
    opts = ort.SessionOptions()
    # Only the metadata is wanted: skip graph optimisation to keep this cheap.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelCardError(f"{path} is not a readable ONNX model ({type(e).__name__}): {REEXPORT}") from e
    return card_from_metadata(sess.get_modelmeta().custom_metadata_map, str(path))


def load_model_dir(path: str | Path) -> dict[str, ModelCard]:
    """Cards of the graphs of an exported model directory (the three required ones and
    ``mouth`` where present), keyed by graph name.

    Checks that the graphs belong together (same checkpoint, feature size and lookahead):
    a mouth head carries the checkpoint of the audio graph whose features it was trained on.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelCardError(
            f"model directory {root} does not exist: run avatar-export --checkpoint CKPT --out {root}"
        )
    if (root / "frame.onnx").is_file() and not (root / GRAPH_FILES["audio"]).is_file():
        raise ModelCardError(
            f"{root} was exported by an older avatar-export (model card version 1, audio graph in "
            f"frame.onnx); this engine reads version {CARD_VERSION}: {REEXPORT} "
            f"(avatar-export --checkpoint CKPT --out {root})")
    cards: dict[str, ModelCard] = {}
    for graph, fname in GRAPH_FILES.items():
        f = root / fname
        if not f.is_file():
            raise ModelCardError(f"{f} is missing: {REEXPORT} (avatar-export --out {root})")
        card = read_card(f)
        if card.graph != graph:
            raise ModelCardError(f"{f} carries the card of graph {card.graph!r}, not {graph!r}: {REEXPORT}")
        cards[graph] = card
    for graph, fname in OPTIONAL_GRAPH_FILES.items():
        f = root / fname
        if f.is_file():
            card = read_card(f)
            if card.graph != graph:
                raise ModelCardError(f"{f} carries the card of graph {card.graph!r}, not {graph!r}: {REEXPORT}")
            cards[graph] = card
    _check_same_model(cards, root)
    return cards


def _check_same_model(cards: Mapping[str, ModelCard], root: Path) -> None:
    for key in ("checkpoint_sha256", "frame_feature_dim", "lookahead_frames", "exporter_version"):
        values = {g: getattr(c, key) for g, c in cards.items()}
        if key == "exporter_version":  # a mouth head may be exported later, by a newer avatar-export
            values = {g: v for g, v in values.items() if g in REQUIRED_GRAPHS}
        if len(set(values.values())) > 1:
            if "mouth" in values and len(set(v for g, v in values.items() if g != "mouth")) == 1:
                raise ModelCardError(
                    f"{root}: mouth.onnx was trained on the features of another model ({key} "
                    f"{values['mouth']} vs {values['audio']}): train it on this model's features "
                    f"(avatar-train train-mouth --model {root}) or delete it")
            raise ModelCardError(
                f"{root}: graphs disagree on {key} ({values}): they come from different exports; "
                f"{REEXPORT} into an empty directory"
            )
