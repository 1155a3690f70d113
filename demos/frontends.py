"""Run the audio and face front-ends on the bundled inputs and write what they produce.

    python demos/frontends.py --out demo_out [--face PHOTO] [--audio FILE]

Writes: aligned_crop.png (the canonical 112x112 crop), landmarks.png (the 68 points on the
photo), pasted.png (the crop pasted back with its feathered lower-face mask), mfcc.png (the
12 x T MFCC of the speech, with frame 0's 28-frame window marked) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from avatar_stream import DEMO_FACE, DEMO_SPEECH
from avatar_stream.engine import timebase as tb
from avatar_stream.engine.audio import load_audio
from avatar_stream.engine.face import FaceAligner, draw_landmarks, lower_face_mask, paste_back, read_image


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--face", type=Path, default=DEMO_FACE)
    p.add_argument("--audio", type=Path, default=DEMO_SPEECH)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    photo = read_image(args.face)
    aligned = FaceAligner().align(photo, name=str(args.face))
    _write_rgb(args.out / "aligned_crop.png", aligned.crop)
    _write_rgb(args.out / "landmarks.png", draw_landmarks(photo, aligned.landmarks))
    # Paste-back round trip: a visibly tinted crop shows exactly where the mask acts.
    tinted = aligned.crop.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 60, 0, 255).astype(np.uint8)
    _write_rgb(args.out / "pasted.png", paste_back(photo, tinted, aligned.matrix))

    import torch

    from avatar_stream.training.mfcc import MFCC

    audio = load_audio(args.audio)
    with torch.no_grad():
        mfcc = MFCC()(torch.from_numpy(audio)[None])[0].numpy()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.imshow(mfcc, aspect="auto", origin="lower", cmap="magma",
              extent=(0, mfcc.shape[1] * tb.MFCC_HOP / tb.SAMPLE_RATE, 1, tb.MFCC_N_COEFFS + 1))
    s, e = tb.window_bounds(tb.num_frames(len(audio)) // 2)
    ax.axvspan(s / tb.SAMPLE_RATE, e / tb.SAMPLE_RATE, color="cyan", alpha=0.25,
               label="280 ms window of the middle video frame")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MFCC c1..c12")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out / "mfcc.png", dpi=100)
    summary = {
        "face": str(args.face), "photo_size": list(photo.shape[:2]),
        "face_box": [int(v) for v in aligned.box],
        "audio": str(args.audio), "audio_seconds": len(audio) / tb.SAMPLE_RATE,
        "video_frames": tb.num_frames(len(audio)), "mfcc_shape": list(mfcc.shape),
        "mask_area_fraction": float(lower_face_mask().mean()),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/aligned_crop.png landmarks.png pasted.png mfcc.png summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
