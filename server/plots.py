"""Pictures of prepared maps: three log-scale central slices with the class probabilities.

matplotlib is imported here only, lazily: the serving install does not need it.
"""

from __future__ import annotations

import numpy as np

from defectscope.errors import BadMessage
from defectscope.preprocessing.config import CANONICAL_AXES as AXIS_NAMES


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadMessage("plots need matplotlib: pip install 'defectscope[test]' or matplotlib") from None
    return plt


def slice_panel(axes_row, prepared: np.ndarray, floor: float = 1e-5) -> None:
    """Draw the three central slices (through voxel n//2) of one map on three matplotlib axes."""
    c = [n // 2 for n in prepared.shape]
    cuts = (prepared[c[0], :, :], prepared[:, c[1], :], prepared[:, :, c[2]])
    labels = ((AXIS_NAMES[1], AXIS_NAMES[2]), (AXIS_NAMES[0], AXIS_NAMES[2]), (AXIS_NAMES[0], AXIS_NAMES[1]))
    for ax, cut, (ylab, xlab) in zip(axes_row, cuts, labels):
        ax.imshow(np.log10(np.maximum(cut, floor)), cmap="viridis", origin="lower", vmin=np.log10(floor), vmax=0)
        ax.set_xlabel(xlab, fontsize=7)
        ax.set_ylabel(ylab, fontsize=7)
        ax.tick_params(labelsize=6)


def sampling_caption(reply: dict) -> str:
    """What the preparation found of the map's sampling: oversampling per axis, the resampling, the crystal
    extent it implies, and the warnings that qualify the answer."""
    prep = reply.get("preparation") or {}
    parts = []
    if prep.get("oversampling_per_axis"):
        factors = np.broadcast_to(np.asarray(prep.get("resample_factor", 1.0), float), (3,))
        confidence = prep.get("oversampling_confidence") or []
        parts.append("oversampling " + ", ".join(f"{s:.2f}" for s in prep["oversampling_per_axis"])
                     + (f" (confidence {', '.join(str(c) for c in confidence)})" if any(confidence) else "")
                     + (f", resampled x{', x'.join(f'{f:.2f}' for f in factors)}" if np.any(factors != 1.0) else ""))
    if prep.get("crystal_extent_nm"):
        parts.append("crystal " + " x ".join(f"{e:.0f}" for e in prep["crystal_extent_nm"]) + " nm")
    warnings = [w["reason"] for w in reply.get("warnings", [])]
    if warnings:
        parts.append("warnings: " + ", ".join(warnings))
    return "  ·  ".join(parts)


def fringe_bars(axes_row, reply: dict) -> None:
    """On each slice, a bar one fringe period long along each of its two axes (the oversampling after
    resampling, in voxels of the prepared map): what the network was shown as the crystal's size."""
    prep = reply.get("preparation") or {}
    if not prep.get("oversampling_per_axis"):
        return
    period = np.asarray(prep["oversampling_per_axis"], float) * np.asarray(prep.get("resample_factor", 1.0), float)
    pairs = ((1, 2), (0, 2), (0, 1))  # (rows, columns) of each slice, as slice_panel draws them
    for ax, (ry, rx) in zip(axes_row, pairs):
        ax.plot([2, 2 + period[rx]], [2, 2], color="white", lw=1.5)
        ax.plot([2, 2], [2, 2 + period[ry]], color="white", lw=1.5)


def plot_prepared(prepared: np.ndarray, reply: dict, out: str, title: str = "") -> None:
    """One map, its probabilities in the title, its sampling under it (``sampling_caption``, one fringe
    period drawn on each slice); written as PNG to ``out``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.5))
    slice_panel(axes, prepared)
    fringe_bars(axes, reply)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(reply["classes"], reply["probabilities"]))
    fig.suptitle(f"{title}  →  {reply['label']}  ({probs})\n{sampling_caption(reply)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
