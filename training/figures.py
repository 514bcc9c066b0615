"""A picture of what the simulator makes: three log-scale central slices per class.

    python -m defectscope.training.figures --out sim_slices.png [--element Au] [--size small] [--counts 1e6]

One Winterbottom particle, the same for the three rows (defect-free, screw, edge through the same point
near its centre), seen at a {111} reflection with g·b ≠ 0. Expected: facet streaks and thickness fringes
in every row; a split / ring-shaped peak for the screw, a split, asymmetric peak for the edge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from defectscope.training import crystals, dislocations
from defectscope.training.conventions import AXES
from defectscope.training.sim_config import CLASSES
from defectscope.training.validation import pattern


def class_patterns(element: str = "Au", size: str = "small", hkl=(1, -1, 1), oversampling: float = 3.0,
                   rotation_rad: float = 0.4, offset_angstrom=(2.0, -1.5, 1.0)) -> dict[str, np.ndarray]:
    """Noiseless intensity of one particle without defect, with a screw, with an edge dislocation."""
    crystal = crystals.build_crystal(element, crystals.SIZES[size], 0.95, (1, 1, -1), 0.70)
    position = crystal.centre_angstrom + np.asarray(offset_angstrom)
    el = crystal.element
    out = {}
    for label in CLASSES:
        d = None if label == "defect_free" else dislocations.make_dislocation(label, el.lattice_a_angstrom,
                                                                               el.poisson_ratio, position)
        out[label] = pattern(crystal, d, hkl, oversampling=oversampling, rotation_rad=rotation_rad)
    return out


def plot_slices(patterns: dict[str, np.ndarray], out_path, title: str = "", counts: float | None = None,
                seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    reference = max(float(i.max()) for i in patterns.values())  # one colour scale: the drops are visible
    fig, axes = plt.subplots(len(patterns), 3, figsize=(10.5, 3.4 * len(patterns)), constrained_layout=True)
    for row, (label, intensity) in enumerate(patterns.items()):
        ratio = float(intensity.max()) / reference
        if counts:
            intensity = rng.poisson(intensity * (counts / reference)).astype(float)
            vmin, vmax = 0.0, np.log10(counts)
        else:
            vmax = np.log10(reference)
            vmin = vmax - 6.0  # ~ the dynamic range of a good measurement
        centre = [n // 2 for n in intensity.shape]
        slices = [intensity[centre[0], :, :], intensity[:, centre[1], :], intensity[:, :, centre[2]]]
        names = [(AXES[1], AXES[2]), (AXES[0], AXES[2]), (AXES[0], AXES[1])]
        for col, (sl, (ylabel, xlabel)) in enumerate(zip(slices, names)):
            ax = axes[row, col]
            im = ax.imshow(np.log10(np.maximum(sl, 10.0 ** (vmin - 1))), origin="lower", cmap="turbo",
                           vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{label}, peak {ratio:.2f}: {AXES[col]} = 0", fontsize=9)
        fig.colorbar(im, ax=axes[row, :], shrink=0.8, label="log10 I" + (" (counts)" if counts else ""))
    if title:
        fig.suptitle(title)
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Three log-scale slices per class of simulated patterns")
    parser.add_argument("--out", default="sim_slices.png")
    parser.add_argument("--element", default="Au", choices=sorted(crystals.ELEMENTS))
    parser.add_argument("--size", default="small", choices=sorted(crystals.SIZES))
    parser.add_argument("--hkl", default="1,-1,1", help="reflection (default 1,-1,1: g·b = 1)")
    parser.add_argument("--counts", type=float, default=0.0, help="Poisson noise at this peak count (0: noiseless)")
    args = parser.parse_args(argv)
    hkl = tuple(int(v) for v in args.hkl.split(","))
    patterns = class_patterns(args.element, args.size, hkl)
    title = f"{args.element} {args.size} Winterbottom particle, reflection {hkl}, centred dislocations (same point)"
    path = plot_slices(patterns, args.out, title=title, counts=args.counts or None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
