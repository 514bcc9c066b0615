"""A dataset of some configurations of another, finished or still being written (``<out>.partial``).

    python -m defectscope.training.subset --data /work/data/realistic_mix_20000_s0.h5.partial \\
        --configurations 300:800 --split test --out /work/data/realistic_mix_c300-800.h5

The same patterns (compressed chunks copied as they are), labels and parameters, every map in ``--split``:
to score models on configurations none of them was trained on while the rest of a long run is still being
simulated. A partial file is read without HDF5's file lock (its writer holds it) and only up to the patterns
it says are written, each flushed before the count moved past it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from defectscope.errors import BadMessage
from defectscope.training.dataset import FORMAT, PARAMETERS, SPLITS
from defectscope.training.runner import configuration_sizes
from defectscope.training.sim_config import CLASSES, SimulationConfig

_KEPT_ATTRS = ("format", "format_version", "simulator_config", "seed", "conventions", "simulator_version",
               "simulator_version_of_progress", "defectscope_version")


def write_subset(data, first: int, stop: int, out, split: str = "test") -> Path:
    """Configurations ``first`` .. ``stop - 1`` of ``data`` into ``out``, every map in ``split``."""
    import h5py

    if split not in SPLITS:
        raise BadMessage(f"split must be one of {SPLITS}, got {split!r}")
    with h5py.File(data, "r", locking=False) as src:
        if src.attrs.get("format") != FORMAT:
            raise BadMessage(f"{str(data)!r} is not a defectscope simulated dataset")
        cfg = SimulationConfig.from_json(src.attrs["simulator_config"])
        sizes = configuration_sizes(int(src.attrs["n_patterns"]), cfg.orientations_per_configuration)
        ends = np.cumsum([0, *sizes])
        if not 0 <= first < stop <= len(sizes):
            raise BadMessage(f"configurations {first}:{stop} outside 0:{len(sizes)}")
        lo, hi = int(ends[first]), int(ends[stop])
        partial = "_progress" in src  # still being written: labels and parameters kept in its progress record
        written = int(src.attrs["written"] if partial else src.attrs["n_patterns"])
        if hi > written:
            raise BadMessage(f"{str(data)!r} holds {written} patterns so far; configuration {stop - 1} ends at {hi}")
        labels = (src["_progress"] if partial else src)["labels"][lo:hi]
        group = src["_progress"] if partial else src["parameters"]
        params = {name: group[name][lo:hi] for name in PARAMETERS}
        with h5py.File(out, "w") as dst:
            for name in ("counts", "mask"):
                s = src[name]
                d = dst.create_dataset(name, shape=(hi - lo, *s.shape[1:]), dtype=s.dtype, chunks=s.chunks,
                                       compression=s.compression, compression_opts=s.compression_opts,
                                       shuffle=s.shuffle, fillvalue=0, track_times=False)
                for key, value in s.attrs.items():
                    d.attrs[key] = value
                zeros = (0,) * (s.ndim - 1)
                for i in range(lo, hi):
                    if s.id.get_chunk_info_by_coord((i, *zeros)).byte_offset is not None:  # unallocated: all zero
                        filters, chunk = s.id.read_direct_chunk((i, *zeros))
                        d.id.write_direct_chunk((i - lo, *zeros), chunk, filters)
            dst.create_dataset("labels", data=labels, track_times=False).attrs["classes"] = list(CLASSES)
            dst.create_dataset("split", data=np.full(hi - lo, SPLITS.index(split), dtype=np.uint8),
                               track_times=False).attrs["names"] = list(SPLITS)
            group = dst.create_group("parameters")
            for name, (_, _, description) in PARAMETERS.items():
                group.create_dataset(name, data=params[name], track_times=False).attrs["description"] = description
            for key in _KEPT_ATTRS:
                if key in src.attrs:
                    dst.attrs[key] = src.attrs[key]
            dst.attrs["classes"] = list(CLASSES)
            dst.attrs["n_patterns"] = hi - lo
            dst.attrs["n_configurations"] = stop - first
            dst.attrs["subset_of"] = f"{Path(data).name} configurations {first}:{stop} (patterns {lo}:{hi})"
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m defectscope.training.subset", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--configurations", required=True, help="FIRST:STOP (configuration indices)")
    ap.add_argument("--split", default="test", choices=SPLITS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        first, stop = (int(v) for v in args.configurations.split(":"))
    except ValueError:
        raise SystemExit(f"--configurations must be FIRST:STOP, got {args.configurations!r}") from None
    path = write_subset(args.data, first, stop, args.out, args.split)
    print(f"wrote configurations {first}:{stop} of {args.data} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
