"""Point labels that do not collide: a small deterministic repel (no adjustText).

Each label is measured with the figure's renderer, then placed greedily (points sorted by position) at
the first free spot among offsets that step away from its point, right side first, then left; a label
moved away from its point gets a thin leader line. Call it after the axes' limits and the figure
layout are final: positions are computed in display pixels.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

GAP_PX = 5.0       # between a point and its label
MARKER_PX = 5.0    # half-size of the area around each point that labels keep clear of
MAX_STEPS = 40     # vertical steps tried on each side before settling for the least overlap


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _candidates(px, py, w, h):
    """Boxes (x0, y0, x1, y1) to try, nearest first: right of the point, up/down in label-height steps,
    then the same on the left."""
    for side in (1, -1):
        x0 = px + GAP_PX if side > 0 else px - GAP_PX - w
        for k in range(MAX_STEPS):
            for sgn in ((1,) if k == 0 else (1, -1)):
                y0 = py - h / 2 + sgn * k * (h + 1)
                yield (x0, y0, x0 + w, y0 + h)


def place(boxes_wh: list[tuple[float, float]], points: list[tuple[float, float]],
          bounds: tuple[float, float, float, float] | None = None) -> list[tuple[float, float, float, float]]:
    """Pure layout: label i (width, height in px) for point i -> its box. Boxes do not overlap each other
    or any point's marker area when a free spot exists (within `bounds`, if given)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    marks = [(x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX) for x, y in points]
    placed: dict[int, tuple] = {}
    for i in order:
        (w, h), (px, py) = boxes_wh[i], points[i]
        best, best_cost = None, None
        for box in _candidates(px, py, w, h):
            if bounds is not None and (box[0] < bounds[0] or box[2] > bounds[2] or box[1] < bounds[1]
                                       or box[3] > bounds[3]):
                continue
            cost = sum(_overlap(box, b) for b in placed.values()) + sum(_overlap(box, m) for m in marks)
            if cost == 0:
                best = box
                break
            if best_cost is None or cost < best_cost:
                best, best_cost = box, cost
        if best is None:  # nothing inside the bounds: the plain spot
            best = next(_candidates(px, py, w, h))
        placed[i] = best
    return [placed[i] for i in range(len(points))]


def label_points(ax: plt.Axes, xs, ys, texts: list[str], fontsize: float = 7, color: str = "0.25",
                 gid: str = "label") -> list:
    """Annotate (xs[i], ys[i]) with texts[i] without overlaps; returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    sizes = []
    for t in texts:  # measure each label once with the real font
        probe = ax.text(0, 0, t, fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        probe.remove()
    boxes = place(sizes, [tuple(p) for p in pts], tuple(ax.bbox.extents))  # inside the axes: off the legend
    to_pt = 72.0 / fig.dpi
    arts = []
    for t, x, y, (px, py), box, (w, h) in zip(texts, xs, ys, pts, boxes, sizes):
        cx, cy = min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3])
        far = np.hypot(cx - px, cy - py) > GAP_PX + h  # moved away: a leader line says whose label it is
        arts.append(ax.annotate(
            t, (x, y), xytext=((box[0] - px) * to_pt, (box[1] - py) * to_pt), textcoords="offset points",
            fontsize=fontsize, color=color, ha="left", va="bottom", gid=gid, annotation_clip=False,
            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.6", shrinkA=0, shrinkB=2,
                            relpos=(0.0 if box[0] >= px else 1.0, 0.5)) if far else None))
    return arts
