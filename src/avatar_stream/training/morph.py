"""``avatar-train morph-faces``: more training identities from the photos there are.

The AU classifier learns on 50 training faces and loses most of its F1 between them and
held-out faces (0.95 on training faces, 0.89 on held-out ones; docs/experiments.md).
A morph of two training photos is a face that is neither of them: both photos are cut to the
same canonical canvas (their alignment matrices), the mean of the two landmark meshes is
taken with a random weight ``t``, each photo is warped onto that mesh piecewise-affinely
(engine/warp.py ``FaceWarper.reshape``) and the two warped photos are blended with the same
``t``. The face shape, skin, eyes, brows and lips of the morph lie between those of its
parents; backgrounds and hair blend into ghosts, which the 112 px face crop mostly cuts off.
With ``--yaw`` each morph is also turned about its vertical axis (``turn_mesh``): most photos
are frontal, and a morph is as frontal as the mean of its parents.

Only photos that are not held out may be parents: ``--exclude-test-of CORPUS`` reads a synth
corpus's split.json and leaves its test identities out, so a corpus made from the morphs
adds no held-out face to training. Every morph is checked by dlib (one face, landmarks
found) before it is kept, and ``OUT/morphs.json`` records its parents and weight.
Deterministic for a seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from avatar_stream.engine.face import FaceAligner, FaceError
from avatar_stream.engine.warp import FaceWarper, face_frame
from avatar_stream.engine.warp_mesh import N_BORDER_ANCHORS
from avatar_stream.training.shards import write_json
from avatar_stream.training.synth import Identity, cut_canvas, find_identities

MORPH_SCALE = 2  # the canvas is cut at twice the canonical crop's scale, as synth's is
MORPH_PAD = 64  # canvas margin: the jaw ring anchors of wide faces stay inside the picture
WEIGHT_RANGE = (0.35, 0.65)  # t: the share of the second parent
# --yaw: extra depth (share of the head radius) of the points standing out of the cylinder the
# head is modelled as: the nose (bridge 27-30, base 31-35) most, the lips a little.
NOSE_DEPTH = {27: 0.08, 28: 0.13, 29: 0.18, 30: 0.24, 31: 0.1, 32: 0.15, 33: 0.18, 34: 0.15, 35: 0.1}
LIP_DEPTH = 0.05
MAX_YAW = 40.0  # degrees (--yaw): beyond it the far cheek is squeezed thin


@dataclass
class MorphReport:
    written: int = 0
    parents: int = 0
    rejected: int = 0
    excluded: int = 0


def _canvas(identity: Identity) -> tuple[np.ndarray, np.ndarray]:
    """(canvas image, landmarks on it): synth's canvas cut, with the morph's wider margin."""
    return cut_canvas(identity, MORPH_SCALE, MORPH_PAD)


def turn_mesh(points: np.ndarray, degrees: float, fixed: int = N_BORDER_ANCHORS) -> np.ndarray:
    """Mesh vertices (68 landmarks, then the anchors, as ``FaceWarper.src``) of the same face
    turned by ``degrees`` about its vertical axis (positive: the nose moves along the eye
    line's direction, image right on an upright face). The head is a cylinder whose
    silhouette runs through landmarks 0 and 16, with the nose and lips standing out of it: a
    point at angle phi across it (``u = R sin(phi)``) goes to angle ``phi + yaw cos(phi)``,
    which turns the middle of the face by the full ``yaw`` and leaves the silhouette where it
    is, so nothing folds over: the far cheek narrows, the near one widens (what a real turn
    would hide or reveal is not drawn). Points outside the cylinder (the ring anchors, hair,
    background) and the last ``fixed`` points (the image border) stay."""
    if abs(degrees) > MAX_YAW:
        raise ValueError(f"a turn must be within +-{MAX_YAW:.0f} degrees, got {degrees}")
    pts = np.asarray(points, np.float64)
    lm = pts[:68]
    _, ex, _, _, _ = face_frame(lm)
    mid = (lm[0] + lm[16]) / 2.0
    radius = abs(float((lm[16] - lm[0]) @ ex)) / 2.0
    depth = np.zeros(len(pts))
    for i, d in NOSE_DEPTH.items():
        depth[i] = d
    depth[48:68] = LIP_DEPTH
    u = (pts - mid) @ ex
    phi = np.arcsin(np.clip(u / radius, -1.0, 1.0))
    du = radius * (1.0 + depth) * (np.sin(phi + np.radians(degrees) * np.cos(phi)) - np.sin(phi))
    du[np.abs(u) > radius] = 0.0
    if fixed:
        du[-fixed:] = 0.0
    return pts + du[:, None] * ex


def morph_pair(a: Identity, b: Identity, t: float, yaw: float = 0.0) -> np.ndarray:
    """RGB uint8 canvas (352 x 352) of the morph ``(1 - t) * a + t * b`` in shape and colour,
    turned by ``yaw`` degrees (``turn_mesh``)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"morph weight must be in [0, 1], got {t}")
    wa, wb = (FaceWarper(*_canvas(x)) for x in (a, b))
    if wa.src.shape != wb.src.shape:  # a ring anchor fell outside one canvas: no common mesh
        raise FaceError(f"{a.name} and {b.name} have meshes of different sizes; pick another pair")
    dst = (1.0 - t) * wa.src + t * wb.src
    if yaw:
        dst = turn_mesh(dst, yaw)
    blend = (1.0 - t) * wa.reshape(dst).astype(np.float32) + t * wb.reshape(dst).astype(np.float32)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def held_out_identities(corpus: Path) -> list[str]:
    """Test identity names recorded in a synth corpus's split.json."""
    path = Path(corpus) / "split.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: --exclude-test-of takes a corpus made by `avatar-train synth`")
    names = json.loads(path.read_text()).get("detail", {}).get("test_identities")
    if names is None:
        raise ValueError(f"{path} records no test identities (not a synth corpus): pass --exclude NAME instead")
    return list(names)


def morph_faces(faces: Path, out: Path, count: int, seed: int = 0, exclude=(), progress: bool = True,
                aligner: FaceAligner | None = None, prefix: str = "morph", yaw: float = 0.0) -> MorphReport:
    """Write ``count`` morphs of pairs of photos in ``faces`` (minus ``exclude``, identity names
    as synth gives them, e.g. ``f025_face-recognition``) to ``out`` as ``<prefix>NNNN.png``.
    ``yaw`` > 0: each morph is also turned (``turn_mesh``) by an angle of random sign and a
    size drawn from ``yaw / 3 .. yaw`` degrees."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", prefix):
        raise ValueError(f"--prefix must be letters and digits (a file and speaker name part), got {prefix!r}")
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    if not 0.0 <= yaw <= MAX_YAW:
        raise ValueError(f"--yaw must be in 0..{MAX_YAW:.0f} degrees, got {yaw}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identities, _ = find_identities(faces, out / "cache")
    excluded = set(exclude)
    unknown = sorted(excluded - {i.name for i in identities})
    if unknown:
        raise ValueError(f"--exclude names no usable photo of {faces}: {', '.join(unknown)}")
    parents = [i for i in identities if i.name not in excluded]
    report = MorphReport(parents=len(parents), excluded=len(identities) - len(parents))
    if len(parents) < 2:
        raise ValueError(f"{faces} has {len(parents)} usable photo(s) to morph; it takes >= 2")
    rng = np.random.default_rng([seed, 0x3090])
    pairs = [(i, j) for i in range(len(parents)) for j in range(i + 1, len(parents))]
    order = rng.permutation(len(pairs))
    aligner = aligner or FaceAligner()
    record = {}
    bar = tqdm(total=count, desc="morph", unit="face", disable=not progress)
    for k in order:
        if report.written == count:
            break
        i, j = pairs[k]
        if rng.random() < 0.5:
            i, j = j, i
        t = float(rng.uniform(*WEIGHT_RANGE))
        # drawn only with --yaw, so that morphs without it stay those of earlier versions
        turn = float(rng.choice((-1.0, 1.0)) * rng.uniform(yaw / 3.0, yaw)) if yaw else 0.0
        a, b = parents[i], parents[j]
        try:
            image = morph_pair(a, b, t, turn)
            if len(aligner.detect(image, name="the morph")) != 1:  # a ghost of a second face: not one identity
                raise FaceError("not exactly one face in the morph")
            aligner.align(image, name="the morph")  # landmarks found: usable by synth
        except FaceError:
            report.rejected += 1
            continue
        name = f"{prefix}{report.written:04d}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        record[name] = {"a": a.name, "b": b.name, "t": round(t, 4)} | ({"yaw": round(turn, 2)} if yaw else {})
        report.written += 1
        bar.update(1)
    bar.close()
    if report.written < count:
        raise ValueError(f"only {report.written} of {count} morphs could be made from {len(parents)} photos "
                         f"({report.rejected} rejected): ask for fewer")
    write_json(out / "morphs.json", {"seed": seed, "excluded": sorted(excluded), "morphs": record}
               | ({"yaw": yaw} if yaw else {}))
    return report


def main_morph(args) -> int:
    """``avatar-train morph-faces`` entry point (argv parsed in training/cli.py)."""
    exclude = list(args.exclude or [])
    for corpus in args.exclude_test_of or []:
        exclude += held_out_identities(corpus)
    report = morph_faces(Path(args.faces), Path(args.out), args.count, seed=args.seed, exclude=sorted(set(exclude)),
                         progress=not args.no_progress, prefix=args.prefix, yaw=args.yaw)
    print(f"{report.written} morphs of {report.parents} photos ({report.excluded} held out, {report.rejected} "
          f"rejected by the face check) in {args.out}: make a corpus of them with `avatar-train synth --faces "
          f"{args.out} --test-identities 0`")
    return 0


def add_arguments(p) -> None:
    """The ``morph-faces`` subcommand's flags (called by training/cli.py)."""
    p.add_argument("--faces", type=Path, required=True, help="folder of face photos (one identity each)")
    p.add_argument("--out", type=Path, required=True, help="folder for the morphs (PNG) and morphs.json")
    p.add_argument("--count", type=int, required=True, help="morphs to make")
    p.add_argument("--seed", type=int, default=0, help="same seed, same morphs")
    p.add_argument("--prefix", default="morph",
                   help="file names <prefix>0000.png, ...: give each set of morphs its own, so that corpora made "
                        "from two sets can be merged (default morph)")
    p.add_argument("--exclude", action="append", metavar="NAME",
                   help="an identity that must not be a parent, named as synth names it (repeatable)")
    p.add_argument("--exclude-test-of", type=Path, action="append", metavar="CORPUS",
                   help="leave out the test identities of this synth corpus (repeatable)")
    p.add_argument("--yaw", type=float, default=0.0, metavar="DEG",
                   help="also turn each morph about its vertical axis by DEG/3..DEG degrees, either way: more "
                        f"faces seen from the side (default 0: frontal as the parents; at most {MAX_YAW:.0f})")
    p.add_argument("--no-progress", action="store_true")
