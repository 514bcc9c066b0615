"""Pictures of prepared maps: three log-scale central slices with the class probabilities.

matplotlib is imported here only, lazily: the serving install does not need it.
"""

from __future__ import annotations

import numpy as np

from defectscope.errors import BadMessage

AXIS_NAMES = ("q_par", "q_perp1", "q_perp2")


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


def plot_prepared(prepared: np.ndarray, reply: dict, out: str, title: str = "") -> None:
    """One map, its probabilities in the title; written as PNG to ``out``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    slice_panel(axes, prepared)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(reply["classes"], reply["probabilities"]))
    fig.suptitle(f"{title}  →  {reply['label']}  ({probs})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
