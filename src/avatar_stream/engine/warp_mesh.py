"""The triangle mesh that engine/warp.py moves: the 68 landmarks plus fixed anchors.

The mouth is not left to Delaunay. With the lips closed the inner-lip points of the upper and
lower lip nearly coincide, and Delaunay happily connects an upper-lip point to a lower-lip
point; such a triangle tears or folds the moment the mouth opens. So the outer lip contour is
forced into the triangulation (edge flips, Sloan 1993), everything Delaunay put inside it is
dropped, and the lips get a fixed mesh: an upper-lip strip, a lower-lip strip and the inner
mouth (the cavity, drawn over by the renderer once the lips part).
"""

from __future__ import annotations

import cv2
import numpy as np

from avatar_stream.engine.face import FaceError

OUTER_LIP = tuple(range(48, 60))
INNER_LIP = tuple(range(60, 68))
# Upper lip: outer 48..54 over inner 60..64; lower lip: outer 48,59..55,54 over 60,67..65,64.
LIP_STRIPS = (
    (48, 49, 60), (49, 61, 60), (49, 50, 61), (50, 62, 61), (50, 51, 62),
    (51, 52, 62), (52, 63, 62), (52, 53, 63), (53, 64, 63), (53, 54, 64),
    (48, 59, 60), (59, 67, 60), (59, 58, 67), (58, 66, 67), (58, 57, 66),
    (57, 56, 66), (56, 65, 66), (56, 55, 65), (55, 64, 65), (55, 54, 64),
)  # fmt: skip
N_BORDER_ANCHORS = 16  # the last anchors: 5 points per image side, corners shared
MOUTH_INTERIOR = ((60, 61, 67), (61, 66, 67), (61, 62, 66), (62, 63, 66), (63, 65, 66), (63, 64, 65))


def anchors(landmarks: np.ndarray, shape: tuple[int, int], up: np.ndarray, height: float) -> np.ndarray:
    """Fixed points: a ring around the face (the jaw line pushed out by 45%, the brows raised
    by a third of the face height ``height`` along ``-up``), so that the warp stays local, and
    16 points on the image border."""
    h_img, w_img = shape
    centre = landmarks[27:36].mean(0)
    ring = np.vstack([centre + (landmarks[0:17] - centre) * 1.45, landmarks[17:27] - 0.35 * height * up])
    xs = np.linspace(0, w_img - 1, 5)
    ys = np.linspace(0, h_img - 1, 5)
    border = [(x, y) for x in xs for y in (ys[0], ys[-1])] + [(x, y) for y in ys[1:-1] for x in (xs[0], xs[-1])]
    # Ring points outside (or within 3 px of) the image would crowd or duplicate the border.
    inside = (ring[:, 0] > 3) & (ring[:, 0] < w_img - 4) & (ring[:, 1] > 3) & (ring[:, 1] < h_img - 4)
    return np.vstack([ring[inside], np.array(border)])


def outer_ring(landmarks: np.ndarray, shape: tuple[int, int], up: np.ndarray, height: float) -> np.ndarray:
    """Fixed points further out than ``anchors``' ring (the jaw line pushed out 1.8 times, the
    brows raised by 0.6 face heights), inside the image with 3 px to spare: a head pose moves
    the inner ring and stops here (a ring further out would make every frame redraw more of
    the picture for a sway of a few pixels)."""
    h_img, w_img = shape
    centre = landmarks[27:36].mean(0)
    ring = np.vstack([centre + (landmarks[0:17:2] - centre) * 1.8, landmarks[17:27:2] - 0.6 * height * up])
    inside = (ring[:, 0] > 3) & (ring[:, 0] < w_img - 4) & (ring[:, 1] > 3) & (ring[:, 1] < h_img - 4)
    return ring[inside]


def signed_area(p: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Signed area of each triangle (positive = counter-clockwise in x-right, y-up terms)."""
    a, b, c = p[tris[:, 0]], p[tris[:, 1]], p[tris[:, 2]]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def delaunay(points: np.ndarray, shape: tuple[int, int]) -> list[list[int]]:
    """Delaunay triangles of ``points`` as vertex index triples (OpenCV Subdiv2D)."""
    h, w = shape
    lo = np.minimum(points.min(0), 0) - 2
    hi = np.maximum(points.max(0), (w, h)) + 2
    sub = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1))
    # Subdiv2D numbers its own vertices; a duplicate point returns the earlier one's id.
    back: dict[int, int] = {}
    for i, (x, y) in enumerate(points):
        back.setdefault(sub.insert((float(x), float(y))), i)
    tris = []
    for t in sub.getTriangleList().reshape(-1, 3, 2):
        idx = [back.get(sub.findNearest((float(x), float(y)))[0], -1) for x, y in t]
        if min(idx) >= 0 and len(set(idx)) == 3:
            tris.append(idx)
    return tris


def _orient(a, b, c) -> float:
    return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))


def _crosses(p, u: int, v: int, a: int, b: int) -> bool:
    """Segments u-v and a-b cross at a point inside both (shared endpoints do not count)."""
    if {u, v} & {a, b}:
        return False
    return (_orient(p[u], p[v], p[a]) * _orient(p[u], p[v], p[b]) < 0
            and _orient(p[a], p[b], p[u]) * _orient(p[a], p[b], p[v]) < 0)


def _insert_edge(tris: list[list[int]], p: np.ndarray, a: int, b: int) -> None:
    """Flip edges crossing a-b until a-b is an edge of the triangulation (in place)."""
    for _ in range(10 * len(tris)):
        edges: dict[tuple[int, int], list[int]] = {}
        for ti, t in enumerate(tris):
            for k in range(3):
                edges.setdefault(tuple(sorted((t[k], t[(k + 1) % 3]))), []).append(ti)
        if (min(a, b), max(a, b)) in edges:
            return
        for (u, v), owners in edges.items():
            if len(owners) != 2 or not _crosses(p, u, v, a, b):
                continue
            t1, t2 = (tris[i] for i in owners)
            x = next(k for k in t1 if k not in (u, v))
            y = next(k for k in t2 if k not in (u, v))
            if _crosses(p, x, y, u, v):  # convex quad: the flip is valid
                tris[owners[0]], tris[owners[1]] = [x, y, u], [x, y, v]
                break
        else:
            break
    raise FaceError("cannot build a face mesh from these landmarks (the lip contour crosses itself): "
                    "use a frontal photo with the mouth visible")


def face_mesh(landmarks: np.ndarray, anchor_points: np.ndarray, shape: tuple[int, int]):
    """``(triangles (M, 3) int64, interior (M,) bool)`` over ``vstack([landmarks, anchor_points])``.

    Triangles are counter-clockwise on the neutral landmarks (screen coordinates), except the
    ``interior`` ones (inner mouth), which may be degenerate there.
    """
    pts = np.vstack([landmarks, anchor_points])
    keep = np.array([i for i in range(len(pts)) if i not in INNER_LIP])
    tris = [[int(keep[i]) for i in t] for t in delaunay(pts[keep], shape)]
    for k in range(len(OUTER_LIP)):
        _insert_edge(tris, pts, OUTER_LIP[k], OUTER_LIP[(k + 1) % len(OUTER_LIP)])
    contour = landmarks[list(OUTER_LIP)].astype(np.float32)
    outside = [t for t in tris
               if not (set(t) <= set(OUTER_LIP)
                       and cv2.pointPolygonTest(contour, tuple(map(float, pts[t].mean(0))), False) > 0)]
    out = np.array(outside + [list(t) for t in LIP_STRIPS + MOUTH_INTERIOR], np.int64)
    interior = np.zeros(len(out), bool)
    interior[-len(MOUTH_INTERIOR):] = True
    flip = (signed_area(pts, out) < 0) & ~interior
    out[flip] = out[flip][:, ::-1]
    return out, interior
