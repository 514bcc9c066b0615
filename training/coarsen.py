"""Simulated maps gridded at a coarser voxel: the sampling of measured scans below the trained range.

    python -m defectscope.training.coarsen --data /work/data/realistic_mix_20000_s0.h5 --split train \\
        --n 6000 --oversampling 1.3 2.1 --seed 0 --out /work/data/coarse_train.h5

Measured scans are often sampled below the simulations' range (SixS Pt scan 1398: 1.5-1.9 per axis on the
server's own grid, `docs/measured-data.md`), and a map gridded at twice a scan's voxel is too. Each map
drawn here is gridded again, as the server's gridder would grid its pixels at a voxel ``b`` times larger
(the same on every axis, the canonical frame's voxels being cubic): every voxel goes whole to the coarse
voxel that holds its centre, masked voxels are left out, and a coarse voxel is the mean of the rest
(``Gridder3D``'s rule), masked when none is left. ``b`` is drawn per map so that the geometric mean of the
map's true oversampling lands uniformly in ``--oversampling``; the coarse grid's origin is drawn within
one coarse voxel. The coarse map is written at the centre of the source's shape (zeros around it, as
``prepare`` pads a small map).

The output is a labelled-maps file (``training.map_files``): the coarse maps, their masks and labels,
every map in ``--as-split`` (default: the source split's own name for ``train``, else ``test``, so that
coarse maps of validation crystals never enter a run's validation set), and the source's physical
parameters with ``oversampling`` and ``voxel_size_inv_angstrom`` of the coarse grid, plus
``coarsening_factor``, ``coarsening_origin`` (in source voxels) and ``source_index``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from defectscope.preprocessing.centring import crop_pad
from defectscope.training.dataset import SPLITS

from defectscope.errors import BadMessage


def coarse_indices(n: int, factor: float, origin: float) -> np.ndarray:
    """Coarse voxel of each of ``n`` fine voxels: the one that holds its centre, bins ``factor`` wide from
    ``-origin`` (0 <= origin < factor)."""
    if not factor >= 1.0 or not 0.0 <= origin < factor:
        raise BadMessage(f"coarsening needs factor >= 1 and 0 <= origin < factor, got {factor}, {origin}")
    return np.floor((np.arange(n) + 0.5 + origin) / factor).astype(np.int64)


def grid_coarser(counts: np.ndarray, mask: np.ndarray | None, factor: float,
                 origin=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """``counts`` gridded at ``factor`` times its voxel: mean of the unmasked voxels in each coarse voxel.

    Returns (coarse map float32, coarse mask uint8: 1 where every fine voxel was masked)."""
    idx = [coarse_indices(n, factor, o) for n, o in zip(counts.shape, origin)]
    shape = tuple(int(i[-1]) + 1 for i in idx)
    flat = np.ravel_multi_index(np.meshgrid(*idx, indexing="ij"), shape).ravel()
    good = np.ones(counts.size, dtype=bool) if mask is None else (np.asarray(mask).ravel() == 0)
    size = int(np.prod(shape))
    sums = np.bincount(flat[good], weights=np.asarray(counts, dtype=np.float64).ravel()[good], minlength=size)
    hits = np.bincount(flat[good], minlength=size)
    coarse = np.divide(sums, hits, out=np.zeros(size), where=hits > 0).reshape(shape)
    return coarse.astype(np.float32), (hits == 0).reshape(shape).astype(np.uint8)


def centred(volume: np.ndarray, shape) -> np.ndarray:
    """``volume`` at the centre of a float32 zero array of ``shape`` (it must fit), by ``prepare``'s own
    ``crop_pad``."""
    if any(v > s for v, s in zip(volume.shape, shape)):
        raise BadMessage(f"a coarse map {volume.shape} does not fit in {tuple(shape)}")
    return crop_pad(volume, [s // 2 - (s - v) // 2 for v, s in zip(volume.shape, shape)], shape)


def draw_factor(oversampling, lo: float, hi: float, rng: np.random.Generator) -> float:
    """A voxel factor that puts the geometric mean of ``oversampling`` uniformly in [lo, hi] (at least 1)."""
    target = rng.uniform(lo, hi)
    return max(1.0, float(np.exp(np.mean(np.log(oversampling)))) / target)


def _chosen(src, split: str, n: int, rng) -> np.ndarray:
    members = np.flatnonzero(src["split"][()] == SPLITS.index(split))
    if n < len(members):
        members = np.sort(rng.choice(members, size=n, replace=False))
    return members


def write_coarse(data, out, *, split: str = "train", n: int = 1000, oversampling=(1.3, 2.1), seed: int = 0,
                 as_split: str | None = None) -> dict:
    """Write ``n`` maps of ``data``'s ``split``, each gridded coarser (module docstring). Returns a summary."""
    import h5py

    if split not in SPLITS:
        raise BadMessage(f"split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise BadMessage(f"--n must be at least 1, got {n}")
    as_split = as_split or ("train" if split == "train" else "test")
    lo, hi = (float(v) for v in oversampling)
    if not 0 < lo <= hi:
        raise BadMessage(f"--oversampling must be 0 < LO <= HI, got {lo}, {hi}")
    rng = np.random.default_rng(seed)
    with h5py.File(data, "r") as src:
        if "parameters" not in src or "oversampling" not in src["parameters"]:
            raise BadMessage(f"{str(data)!r} is not a simulated dataset with per-map oversampling")
        chosen = _chosen(src, split, n, rng)
        shape = src["counts"].shape[1:]
        params = {name: ds[()][chosen] for name, ds in src["parameters"].items()}
        factors, origins = np.empty(len(chosen)), np.empty((len(chosen), 3))
        with h5py.File(out, "w") as dst:
            maps = dst.create_dataset("maps", shape=(len(chosen), *shape), dtype=np.float32,
                                      chunks=(1, *shape), compression="gzip", shuffle=True, track_times=False)
            masks = dst.create_dataset("mask", shape=(len(chosen), *shape), dtype=np.uint8,
                                       chunks=(1, *shape), compression="gzip", track_times=False)
            for k, i in enumerate(chosen):
                factors[k] = draw_factor(params["oversampling"][k], lo, hi, rng)
                origins[k] = rng.uniform(0.0, factors[k], size=3)
                coarse, cmask = grid_coarser(src["counts"][i], src["mask"][i], factors[k], origins[k])
                maps[k] = centred(coarse, shape)
                masks[k] = centred(cmask, shape).astype(np.uint8)
            dst.create_dataset("labels", data=src["labels"][()][chosen], track_times=False).attrs["classes"] = \
                list(src["labels"].attrs["classes"])
            dst.create_dataset("split", data=np.full(len(chosen), SPLITS.index(as_split), dtype=np.uint8),
                               track_times=False).attrs["names"] = list(SPLITS)
            params["oversampling"] = params["oversampling"] / factors[:, None]
            params["voxel_size_inv_angstrom"] = params["voxel_size_inv_angstrom"] * factors.reshape(
                (-1,) + (1,) * (params["voxel_size_inv_angstrom"].ndim - 1))
            params.update(coarsening_factor=factors, coarsening_origin=origins, source_index=chosen)
            group = dst.create_group("parameters")
            for name, value in params.items():
                group.create_dataset(name, data=value, track_times=False)
            dst.attrs["coarsened_from"] = f"{Path(data).name} split {split}, seed {seed}, oversampling {lo}-{hi}"
    return {"maps": len(chosen), "factor_range": [round(float(factors.min()), 3), round(float(factors.max()), 3)],
            "oversampling_median": [round(float(v), 3) for v in np.median(params["oversampling"], axis=0)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m defectscope.training.coarsen", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a simulated dataset (defectscope simulate)")
    ap.add_argument("--split", default="train", choices=SPLITS, help="which of its maps to draw from")
    ap.add_argument("--n", type=int, default=1000, help="how many maps (at most the split's)")
    ap.add_argument("--oversampling", type=float, nargs=2, default=(1.3, 2.1), metavar=("LO", "HI"),
                    help="range of the coarse maps' oversampling (geometric mean over the axes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--as-split", choices=SPLITS, help="the split written (default: train for train, else test)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    summary = write_coarse(args.data, args.out, split=args.split, n=args.n, oversampling=args.oversampling,
                           seed=args.seed, as_split=args.as_split)
    print(f"wrote {summary['maps']} coarse maps to {args.out}: voxel x{summary['factor_range'][0]}-"
          f"{summary['factor_range'][1]}, median oversampling {summary['oversampling_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
