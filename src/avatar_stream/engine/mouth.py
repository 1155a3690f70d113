"""How open, wide and round a mouth is: the one definition of the mouth measures.

Every comparison of a generated mouth with a real one uses these (the real-media evaluation,
the mouth targets of real video, the mouth head trained on them, and the warp renderer that
turns the head's output back into landmark moves). All are lengths in inter-ocular distances
(IOD: between the two eye centres, the means of points 36-41 and 42-47 of the iBUG 68),
a length that does not change while a person speaks:

- ``opening``: the inner-lip gap, mean of the pairs 61-67, 62-66, 63-65;
- ``width``: the outer mouth corners 48-54;
- ``jaw``: the nose tip (33) to the chin (8);
- ``lip_height``: the outer lips' height, 51-57 (with ``width``: how round the lips are).
"""

from __future__ import annotations

import numpy as np

MEASURES: tuple[str, ...] = ("opening", "width", "jaw", "lip_height")
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))


def iod(landmarks: np.ndarray) -> np.ndarray:
    """Inter-ocular distance of (..., 68, 2) landmarks, shape (...)."""
    lm = np.asarray(landmarks, np.float64)
    return np.linalg.norm(lm[..., 42:48, :].mean(-2) - lm[..., 36:42, :].mean(-2), axis=-1)


def mouth_measures(landmarks: np.ndarray) -> np.ndarray:
    """(..., 68, 2) landmarks (NaN where no face) -> (..., 4) ``MEASURES`` in IODs."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape[-2:] != (68, 2):
        raise ValueError(f"landmarks must be (..., 68, 2), got {lm.shape}")

    def dist(a, b):
        return np.linalg.norm(lm[..., a, :] - lm[..., b, :], axis=-1)

    opening = np.mean([dist(up, lo) for up, lo in INNER_LIP_PAIRS], axis=0)
    scale = iod(lm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([opening, dist(48, 54), dist(33, 8), dist(51, 57)], -1) / scale[..., None]


__all__ = ["INNER_LIP_PAIRS", "MEASURES", "iod", "mouth_measures"]
