"""Training data: labelled map files -> the serving pipeline's prepared maps -> ``tf.data`` pipelines.

Every map is prepared by ``preprocessing.pipeline.prepare`` with the ``PipelineConfig`` that is then
written into the exported ONNX file, so the network trains on exactly what the server will feed it.
Maps are read one at a time from HDF5 (never the whole file in memory); preparing costs ~7 ms per map
(plus ~2 ms to read and decompress it), so by default each split is prepared once into a float32
``.npy`` memory map (``PreparedCache``, 1 MiB per map, keyed by the file, the config and the code that
prepares, ``preparation_code``) and streamed from there in later epochs.

The parts: ``map_files`` (the two file layouts: ``open_map_file``, ``write_labelled_maps``, ``label_map``
onto the model's classes), ``augment`` (the mirrors of a prepared map) and ``map_stream`` (``MapStream``,
what ``tf.data`` reads). This module selects the maps of a split (``select``) and keeps them prepared
(``PreparedCache``); the parts' public names are importable from here.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import defectscope.preprocessing
import numpy as np
from defectscope.preprocessing.config import SCHEMA_VERSION, PipelineConfig
from defectscope.training.augment import augment_mirror, mirror_about_centre
from defectscope.training.map_files import (
    DEFAULT_SPLIT_FRACTIONS,
    DEFECTIVE,
    LABELLED_DATA_KEYS,
    SPLIT_NAMES,
    MapFile,
    label_map,
    open_map_file,
    write_labelled_maps,
)
from defectscope.training.map_stream import MapStream

from defectscope import __version__
from defectscope.errors import DefectscopeError

__all__ = [
    "CACHE_FORMAT_VERSION", "DEFAULT_SPLIT_FRACTIONS", "DEFECTIVE", "LABELLED_DATA_KEYS", "POSITION_MODES",
    "SPLIT_NAMES", "Examples", "MapFile", "MapStream", "PreparedCache", "augment_mirror", "label_map",
    "mirror_about_centre", "open_map_file", "preparation_code", "progress_bar", "repeat_factors", "select",
    "source_sha256", "write_labelled_maps",
]

CACHE_FORMAT_VERSION = 2  # 2: the key holds the preparation code (preparation_code)


# -- prepared maps ------------------------------------------------------------------------------------
@dataclass
class Examples:
    """The maps of one split of one or more files, with their labels in the model's classes."""

    sources: list  # list[(MapFile, index array)]
    labels: np.ndarray  # (n,) model class indices, concatenated over sources
    n_classes: int

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def locate(self, k: int) -> tuple[MapFile, int]:
        for mf, idx in self.sources:
            if k < idx.size:
                return mf, int(idx[k])
            k -= idx.size
        raise IndexError(k)


POSITION_MODES = ("CD", "RPD", "none")


def repeat_factors(examples: Examples, oversample: dict | None) -> np.ndarray:
    """Per-example repeat counts from ``{position_mode: factor}``; 1 where a file has no position modes."""
    out = np.ones(examples.n, dtype=np.int64)
    if not oversample:
        return out
    start = 0
    for mf, idx in examples.sources:
        modes = mf.parameters().get("position_mode")
        if modes is not None:
            names = np.array([m.decode() if isinstance(m, bytes) else str(m) for m in modes[idx]])
            for mode, factor in oversample.items():
                out[start:start + idx.size][names == mode] = int(factor)
        start += idx.size
    return out


def select(files: list[MapFile], split: str, model_classes) -> Examples:
    sources, labels = [], []
    for mf in files:
        idx = mf.indices(split)
        sources.append((mf, idx))
        labels.append(label_map(mf.classes, model_classes)[mf.labels[idx]])
    labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return Examples(sources, labels, len(model_classes))


def source_sha256(directory) -> str:
    """sha256 over the relative names and bytes of the ``.py`` files under ``directory``, in sorted order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.py")):
        body = path.read_bytes()
        h.update(f"{path.relative_to(directory).as_posix()}\0{len(body)}\0".encode())
        h.update(body)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def preparation_code() -> dict:
    """The code that turns a stored map into a prepared one, as a cache key.

    The package version alone is not enough: it stays the same across the commits of a development
    tree. Neither is the pipeline schema version: it moves only when config fields change, not when
    the steps behind them do. So the key holds a sha256 of the preprocessing package's sources and of
    the reader (``MapFile``), plus the numpy and scipy versions whose filters and interpolation shape
    the maps. Any edit there, even one that changes no output, rebuilds the cache (~7 ms per map):
    the price of never training on maps prepared by other code.
    """
    import scipy

    reader = hashlib.sha256(inspect.getsource(MapFile).encode()).hexdigest()
    return {"defectscope": __version__, "pipeline_schema": SCHEMA_VERSION,
            "preprocessing_sha256": source_sha256(Path(defectscope.preprocessing.__file__).parent),
            "reader_sha256": reader, "numpy": np.__version__, "scipy": scipy.__version__}


class PreparedCache:
    """The prepared maps of one ``Examples`` set in a float32 ``.npy`` memory map, plus a validity flag.

    Keyed by the files' identity, the indices, the whole pipeline config and the preparation code
    (``preparation_code``); a stale or partial cache is rebuilt. Maps that ``prepare`` refuses
    (e.g. LOW_SIGNAL) are flagged invalid and never trained on.
    """

    def __init__(self, directory, name: str, examples: Examples, config: PipelineConfig):
        self.directory = Path(directory)
        self.examples, self.config = examples, config
        key = {"version": CACHE_FORMAT_VERSION, "pipeline": config.to_dict(), "code": preparation_code(),
               "sources": [{**mf.identity(), "indices_sha256": hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()}
                           for mf, idx in examples.sources]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.key = key
        self.array_path = self.directory / f"{name}-{digest}.npy"
        self.meta_path = self.directory / f"{name}-{digest}.json"
        self.array = None
        self.valid = None

    def ready(self) -> bool:
        if not (self.array_path.is_file() and self.meta_path.is_file()):
            return False
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return False
        return meta.get("key") == self.key and meta.get("complete") is True

    def build(self, progress: bool = False, log=print) -> "PreparedCache":
        if not self.ready():
            self._write(progress, log)
        self.array = np.load(self.array_path, mmap_mode="r")
        meta = json.loads(self.meta_path.read_text())
        self.valid = np.asarray(meta["valid"], dtype=bool)
        self.failures = meta.get("failures", {})
        return self

    def _write(self, progress: bool, log) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        n = self.examples.n
        # Per-process names: two runs sharing a cache directory (e.g. the 3- and 2-class models on one
        # dataset) may build the same cache at once; both write identical bytes, the last rename wins.
        partial = self.array_path.with_name(f"{self.array_path.name}.{os.getpid()}.partial")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, *self.config.shape))
        valid = np.zeros(n, dtype=bool)
        failures: dict[str, int] = {}
        t0 = time.perf_counter()
        bar = progress_bar(n, f"preparing {self.array_path.stem.split('-')[0]}", progress)
        for k in range(n):
            mf, i = self.examples.locate(k)
            try:
                out[k] = mf.prepare(i, self.config).array
                valid[k] = True
            except DefectscopeError as exc:
                out[k] = 0.0
                failures[exc.reason] = failures.get(exc.reason, 0) + 1
            bar.update(1)
        bar.close()
        out.flush()
        del out
        os.replace(partial, self.array_path)
        meta_tmp = self.meta_path.with_name(f"{self.meta_path.name}.{os.getpid()}.partial")
        meta_tmp.write_text(json.dumps({"key": self.key, "complete": True, "valid": valid.tolist(),
                                        "failures": failures, "seconds": round(time.perf_counter() - t0, 1)}))
        os.replace(meta_tmp, self.meta_path)
        if failures:
            log(f"  {sum(failures.values())} of {n} maps refused by the pipeline ({failures}); left out")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` maps, or one that shows nothing (not ``enabled``, or no tqdm installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if enabled:
        return tqdm(total=total, desc=desc, unit="map", dynamic_ncols=True, leave=False)

    class _Null:
        def update(self, _):
            pass

        def close(self):
            pass

    return _Null()
