"""``simulate_dataset``: configurations → patterns → one HDF5 file, serially or on a Dask cluster.

The unit of work is one configuration (``simulator.simulate_configuration``): its atoms and displacement
field are built once and reused for all of its orientations. Tasks are pure functions of (config, seed,
index), computed with a fixed NUFFT thread count, and written in index order, so the file is
byte-identical whether one process, two local workers or a remote cluster made it.

Parallelism: ``workers > 1`` starts a local Dask cluster of single-threaded worker processes (one per
core is the right number: each task is single-threaded by design); ``scheduler="tcp://host:8786"`` uses an
existing cluster whose workers have defectscope[train] installed. At most ``window`` tasks are in flight,
which bounds the memory held by results waiting for an earlier, slower configuration.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from defectscope.training import simulator
from defectscope.training.dataset import SPLITS, DatasetWriter, assign_splits, encode_chunks
from defectscope.training.sim_config import SimulationConfig


def configuration_sizes(n_patterns: int, orientations_per_configuration: int) -> list[int]:
    """Orientations of each configuration: full configurations, the last one possibly shorter."""
    n_conf = math.ceil(n_patterns / orientations_per_configuration)
    sizes = [orientations_per_configuration] * n_conf
    if n_conf:
        sizes[-1] = n_patterns - orientations_per_configuration * (n_conf - 1)
    return sizes


def split_per_configuration(cfg: SimulationConfig, seed: int, n_configurations: int) -> np.ndarray:
    labels = np.array([simulator.class_of_configuration(i, cfg.class_weights) for i in range(n_configurations)])
    return assign_splits(labels, cfg.split_fractions, simulator.rng_for(seed, simulator.STREAM_SPLIT))


def simulate_dataset(n_patterns: int, out_path, cfg: SimulationConfig | None = None, seed: int = 0,
                     workers: int = 1, scheduler: str | None = None, progress: bool = True,
                     window: int | None = None, resume: bool = True, only_split: str | None = None) -> Path:
    """Simulate ``n_patterns`` patterns into ``out_path`` (HDF5, ``dataset`` layout); returns the path.

    A run stopped before the end leaves ``<out>.partial``; the same call picks up after its last whole
    configuration (``DatasetWriter``), giving the same bytes as an uninterrupted run (``resume=False``:
    start over). ``only_split`` ("train", "validation" or "test"): only the configurations of that split of
    the ``n_patterns`` run, the same patterns in the same order (e.g. the unrelaxed twin of a test split)."""
    cfg = cfg or SimulationConfig()
    if n_patterns < 1:
        raise ValueError("--n must be at least 1")
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    sizes = configuration_sizes(n_patterns, cfg.orientations_per_configuration)
    split_conf = split_per_configuration(cfg, seed, len(sizes))
    indices = list(range(len(sizes)))
    if only_split is not None:
        if only_split not in SPLITS:
            raise ValueError(f"only_split must be one of {list(SPLITS)}, got {only_split!r}")
        indices = [int(i) for i in np.flatnonzero(split_conf == SPLITS.index(only_split))]
        if not indices:
            raise ValueError(f"the {only_split} split of a {n_patterns}-pattern run holds no configuration")
    chosen = [sizes[i] for i in indices]
    split = np.repeat(split_conf[indices], chosen)
    subset = None if only_split is None else {"only_split": only_split, "n_patterns_of_run": int(n_patterns)}
    writer = DatasetWriter(out_path, sum(chosen), len(indices), cfg, seed, resume=resume,
                           simulator_version=simulator.SIMULATOR_VERSION, subset=subset)
    start = int(np.searchsorted(np.cumsum([0, *chosen]), writer.written))  # whole configurations are written
    bar = _progress_bar(sum(chosen), progress)
    bar.update(writer.written)
    try:
        if scheduler is None and workers == 1:
            results = (simulator.simulate_configuration(cfg, seed, i, sizes[i]) for i in indices[start:])
            for result in results:
                writer.write(result)
                bar.update(len(result.params["label"]))
        else:
            for result in _dask_results(cfg, seed, sizes, workers, scheduler, window, indices[start:]):
                writer.write(result)
                bar.update(len(result.params["label"]))
        return writer.finish(split, simulator.SIMULATOR_VERSION)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="pattern", desc="simulate", dynamic_ncols=True)


def _dask_results(cfg: SimulationConfig, seed: int, sizes: list[int], workers: int, scheduler: str | None,
                  window: int | None, indices: list[int]):
    """Yield the results of configurations ``indices`` (ascending) in that order, computed on a Dask cluster."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        # Processes, not threads: the NUFFT and numpy release the GIL only partly; one thread per worker
        # because each task is single-threaded on purpose (bit-reproducibility). The scheduler's HTTP
        # server binds 8787 even with the dashboard off unless told ":0" (any free port): two runs on one
        # machine (a simulation and the tests) would otherwise collide.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=50)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        n_slots = window or max(2, 3 * sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
        config_json = cfg.to_json()
        # Keys name the config too, so two different runs sharing a cluster never share results.
        tag = hashlib.sha256(f"{config_json}{seed}".encode()).hexdigest()[:12]
        futures = as_completed()
        submitted = 0  # positions in ``indices``
        done: dict[int, object] = {}
        position = 0
        while position < len(indices):
            # Never run more than n_slots configurations ahead of the next one to write: memory stays bounded
            # even when one configuration is much slower than the others.
            while submitted < len(indices) and submitted < position + n_slots:
                i = indices[submitted]
                futures.add(client.submit(_task, config_json, seed, i, sizes[i], key=f"simulate-{tag}-{i}", pure=False))
                submitted += 1
            future = next(futures)
            result = future.result()
            future.release()
            done[result.index] = result
            while position < len(indices) and indices[position] in done:
                yield done.pop(indices[position])
                position += 1
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _task(config_json: str, seed: int, index: int, n_orientations: int):
    """Worker-side entry point (takes the config as JSON: plain data crosses the wire, no pickled objects of ours)."""
    cfg = SimulationConfig.from_json(config_json)
    result = simulator.simulate_configuration(cfg, seed, index, n_orientations)
    # Compress here, in parallel, and send ~10x fewer bytes back; the writer only copies chunks.
    result.chunks = encode_chunks(result.counts, result.mask, cfg.compression_level)
    result.counts = result.mask = None
    return result
