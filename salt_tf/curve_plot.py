"""The chart of `runs diff --plot`: val_metric and train_loss per epoch of two runs, side by side, as a PNG.

matplotlib draws it when installed (the `plots` extra); else OpenCV, which salt_tf needs anyway, draws the same
two panels in the same colours (A blue, B orange), so the command works on a bare install.
"""

from __future__ import annotations

import math

import numpy as np

from salt_tf import rundir
from salt_tf.run_table import CURVE_KEYS, RunError


def plot_curves(curves: list[dict], labels: tuple[str, str], path: str) -> str:
    """Writes val_metric and train_loss vs epoch of both runs to a PNG.

    Args:
        curves: run_table.metric_curves of the two runs.
        labels: the runs' names, A then B (the legend).
        path: the PNG to write.

    Returns:
        The renderer used: "matplotlib" or "opencv".
    """
    try:
        import matplotlib
    except ImportError:
        plot_curves_cv2(curves, labels, path)
        return "opencv"
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, CURVE_KEYS):
        for side, label in zip("ab", labels):
            points = _points(curves, f"{key}_{side}")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _points(curves: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of one curve, leaving out the epochs without a value."""
    return [(r["epoch"], float(r[key])) for r in curves
            if r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]


# BGR: matplotlib's first two default colours, so both renderers draw A blue and B orange.
CV2_COLOURS = ((180, 119, 31), (14, 127, 255))


def plot_curves_cv2(curves: list[dict], labels: tuple[str, str], path: str) -> None:
    """plot_curves drawn with OpenCV (arguments as there); RunError if the PNG cannot be written."""
    import cv2

    image = np.full((450, 1000, 3), 255, np.uint8)
    for k, label in enumerate(labels):  # legend, one line per run
        y = 20 + 22 * k
        cv2.line(image, (_LEFT, y), (_LEFT + 30, y), CV2_COLOURS[k], 3)
        cv2.putText(image, f"{'AB'[k]}: {label}"[-100:], (_LEFT + 38, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    for p, key in enumerate(CURVE_KEYS):
        _draw_panel_cv2(image, curves, key, _LEFT + p * (_PANEL_W + 100))
    try:
        rundir.write_png(path, image)
    except (OSError, ValueError) as e:
        raise RunError(f"--plot={path}: could not write the PNG ({getattr(e, 'strerror', None) or e})") from None


_LEFT, _TOP, _PANEL_W, _PANEL_H = 70, 90, 400, 300  # pixels: left margin, top of the panels, panel size


def _draw_panel_cv2(image: np.ndarray, curves: list[dict], key: str, x0: int) -> None:
    """One panel at x0: axes, grid and labels, then `key`'s curve of each run (lines and markers)."""
    import cv2

    font, black, grey, y0 = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (200, 200, 200), _TOP
    epochs = [r["epoch"] for r in curves] or [1]
    series = [_points(curves, f"{key}_{side}") for side in "ab"]
    to_pixel, (v0, v1) = _pixel_mapping(epochs, [v for s in series for _, v in s] or [0.0, 1.0], x0)
    for i in range(5):  # grid and y labels
        value = v0 + (v1 - v0) * i / 4
        _, y = to_pixel(min(epochs), value)
        cv2.line(image, (x0, y), (x0 + _PANEL_W, y), grey, 1)
        cv2.putText(image, f"{value:.3f}", (x0 - 62, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    for epoch in sorted(set(epochs))[:: max(1, len(set(epochs)) // 10)]:  # x labels
        x, _ = to_pixel(epoch, v0)
        cv2.putText(image, str(epoch), (x - 5, y0 + _PANEL_H + 18), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.rectangle(image, (x0, y0), (x0 + _PANEL_W, y0 + _PANEL_H), black, 1)
    cv2.putText(image, key, (x0 + _PANEL_W // 2 - 40, y0 - 12), font, 0.6, black, 1, cv2.LINE_AA)
    cv2.putText(image, "epoch", (x0 + _PANEL_W // 2 - 20, y0 + _PANEL_H + 40), font, 0.45, black, 1, cv2.LINE_AA)
    for k, points in enumerate(series):
        pixels = np.array([to_pixel(e, v) for e, v in points], np.int32)
        if len(pixels) > 1:
            cv2.polylines(image, [pixels.reshape(-1, 1, 2)], False, CV2_COLOURS[k], 2, cv2.LINE_AA)
        for x, y in pixels:  # markers (A drawn larger, so equal values show both): one epoch is a point
            cv2.circle(image, (int(x), int(y)), 6 - 2 * k, CV2_COLOURS[k], -1, cv2.LINE_AA)


def _pixel_mapping(epochs: list[int], values: list[float], x0: int):
    """((epoch, value) -> pixel of the panel at x0, the value range shown: the values' range padded by 8%)."""
    e0, e1 = min(epochs), max(epochs)
    v0, v1 = min(values), max(values)
    pad = (v1 - v0) * 0.08 or max(abs(v0) * 0.05, 0.01)
    v0, v1 = v0 - pad, v1 + pad

    def to_pixel(epoch, value):
        fx = 0.5 if e1 == e0 else (epoch - e0) / (e1 - e0)
        return (int(round(x0 + fx * _PANEL_W)), int(round(_TOP + (v1 - value) / (v1 - v0) * _PANEL_H)))

    return to_pixel, (v0, v1)
