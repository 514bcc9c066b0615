"""Training data: labelled map files -> the serving pipeline's prepared maps -> ``tf.data`` pipelines.

Every map is prepared by ``preprocessing.pipeline.prepare`` with the ``PipelineConfig`` that is then
written into the exported ONNX file, so the network trains on exactly what the server will feed it.
Maps are read one at a time from HDF5 (never the whole file in memory); preparing costs ~7 ms per map
(plus ~2 ms to read and decompress it), so by default each split is prepared once into a float32
``.npy`` memory map (``PreparedCache``, 1 MiB per map, keyed by the file, the config and the code that
prepares, ``preparation_code``) and streamed from there in later epochs.

Two file layouts are read (``open_map_file`` tells them apart):

1. A simulated dataset from ``defectscope simulate`` (layout: ``training.dataset``): raw counts, mask,
   labels, the configuration-level split and the physical parameters of every pattern.
2. **Labelled maps**, e.g. measured maps for fine-tuning, in any HDF5 file laid out as::

       /maps  or /counts  (N, n0, n1, n2)  one map per row, any dtype the server accepts (float or counts),
                                           orthonormal grid; canonical frame (axis 0 along Q) unless the
                                           dataset's attribute ``axes`` names other axes
       /labels            (N,)  integer class index; attribute ``classes``: the names in index order,
                                ["defect_free", "screw", "edge"] or ["defect_free", "defective"]
       /mask              (N, n0, n1, n2), optional: non-zero = bad voxel
       /split             (N,), optional: 0 train, 1 validation, 2 test. Give it whenever several maps come
                          from one crystal (keep a crystal in one split). Without it, maps are split at
                          random per map, stratified by class, with ``split_fractions`` and the seed.
       /q_direction       (N, 3), optional: Q in the map's frame, when axis 0 is not along Q
       /voxel_size        (N, 3), optional: voxel size per axis (1/angstrom), for anisotropic grids

   Write one with ``write_labelled_maps``. Maps of any size are accepted: ``prepare`` crops or pads them.

Labels are mapped onto the model's classes by name; a 2-class model collapses screw and edge into
``defective``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import defectscope.preprocessing
import numpy as np
from defectscope.preprocessing.config import SCHEMA_VERSION, PipelineConfig
from defectscope.preprocessing.pipeline import prepare

from defectscope import __version__
from defectscope.errors import BadMessage, DefectscopeError

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
LABELLED_DATA_KEYS = ("maps", "counts")
DEFECTIVE = "defective"
CACHE_FORMAT_VERSION = 2  # 2: the key holds the preparation code (preparation_code)


def label_map(file_classes, model_classes) -> np.ndarray:
    """Index array: file class index -> model class index (screw/edge -> defective for a 2-class model)."""
    file_classes, model_classes = list(file_classes), list(model_classes)
    out = []
    for name in file_classes:
        if name in model_classes:
            out.append(model_classes.index(name))
        elif name in ("screw", "edge") and DEFECTIVE in model_classes:
            out.append(model_classes.index(DEFECTIVE))
        else:
            raise BadMessage(f"data class {name!r} has no counterpart among the model's classes {model_classes}")
    return np.asarray(out, dtype=np.int64)


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _assign_random_split(labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Per-map split, stratified by class: test and validation counts rounded, at least one training map."""
    rng = np.random.default_rng([seed, 0x5EED])
    split = np.zeros(labels.shape[0], dtype=np.uint8)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[rng.permutation(members.size)]
        n_test = int(round(fractions[2] * members.size))
        n_val = int(round(fractions[1] * members.size))
        n_test, n_val = min(n_test, max(members.size - 1, 0)), min(n_val, max(members.size - 1 - n_test, 0))
        split[order[members.size - n_test:]] = 2
        split[order[members.size - n_test - n_val:members.size - n_test]] = 1
    return split


@dataclass
class MapFile:
    """One HDF5 file of labelled maps (either layout), read map by map."""

    path: Path
    layout: str  # "simulated" | "labelled"
    classes: tuple[str, ...]
    labels: np.ndarray  # (N,) file class indices
    split: np.ndarray  # (N,) uint8 0/1/2
    split_source: str
    _file: object = field(repr=False)
    _data: object = field(repr=False)
    _mask: object = field(repr=False, default=None)
    axes: tuple[str, ...] | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def indices(self, split: str | None) -> np.ndarray:
        """Map indices of one split ("train", "validation", "test"), or all of them for None/"all"."""
        if split in (None, "all"):
            return np.arange(self.n)
        if split not in SPLIT_NAMES:
            raise BadMessage(f"split must be one of {SPLIT_NAMES} or 'all', got {split!r}")
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        volume = self._data[int(i)]
        mask = self._mask[int(i)] if self._mask is not None else None
        return volume, mask

    def frame(self, i: int) -> dict:
        """The ``prepare`` keywords that describe map ``i``'s frame."""
        kwargs = {}
        if self.axes is not None:
            kwargs["axes"] = self.axes
        for name in ("q_direction", "voxel_size"):
            if name in self._file:
                kwargs[name] = self._file[name][int(i)]
        return kwargs

    def prepare(self, i: int, config: PipelineConfig):
        volume, mask = self.read(i)
        return prepare(volume, config, mask=mask, **self.frame(i))

    def parameters(self) -> dict[str, np.ndarray]:
        """Per-map physical parameters (simulated datasets; empty for labelled maps)."""
        if "parameters" not in self._file:
            return {}
        return {name: ds[()] for name, ds in self._file["parameters"].items()}

    def identity(self) -> dict:
        """What makes a prepared cache of this file valid: path, size, modification time."""
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "n": self.n}

    def summary(self) -> dict:
        """For the model card: what the data was and how it is split."""
        counts = {name: int(np.count_nonzero(self.split == k)) for k, name in enumerate(SPLIT_NAMES)}
        out = {"path": str(self.path), "layout": self.layout, "n_maps": self.n, "classes": list(self.classes),
               "split": counts, "split_source": self.split_source,
               "class_counts": {c: int(np.count_nonzero(self.labels == k)) for k, c in enumerate(self.classes)}}
        for key in ("seed", "n_configurations", "simulator_version", "defectscope_version", "format"):
            if key in self.attrs:
                value = self.attrs[key]
                out[key] = value.item() if hasattr(value, "item") else value
        if "simulator_config" in self.attrs:
            out["simulator_config"] = json.loads(self.attrs["simulator_config"])
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_map_file(path, *, seed: int = 0, split_fractions=DEFAULT_SPLIT_FRACTIONS) -> MapFile:
    """Open a simulated dataset or a labelled-maps file (layouts in the module docstring)."""
    import h5py
    from defectscope.training.dataset import FORMAT

    path = Path(path)
    if not path.is_file():
        raise BadMessage(f"data file {str(path)!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BadMessage(f"{str(path)!r} is not a readable HDF5 file: {exc}") from None
    try:
        attrs = {k: f.attrs[k] for k in f.attrs}
        if attrs.get("format") == FORMAT:
            data, layout = f["counts"], "simulated"
        else:
            key = next((k for k in LABELLED_DATA_KEYS if k in f), None)
            if key is None:
                raise BadMessage(f"{str(path)!r}: neither a simulated dataset nor labelled maps "
                                 f"(no /maps or /counts dataset)")
            data, layout = f[key], "labelled"
        if data.ndim != 4:
            raise BadMessage(f"{str(path)!r}: /{data.name.strip('/')} must be (N, n0, n1, n2), got shape {data.shape}")
        if "labels" not in f:
            raise BadMessage(f"{str(path)!r}: no /labels dataset")
        labels = np.asarray(f["labels"][()]).astype(np.int64)
        if "classes" not in f["labels"].attrs:
            raise BadMessage(f"{str(path)!r}: /labels has no 'classes' attribute (class names in index order)")
        classes = tuple(_decode(f["labels"].attrs["classes"]))
        if labels.shape != (data.shape[0],):
            raise BadMessage(f"{str(path)!r}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} maps")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise BadMessage(f"{str(path)!r}: labels outside 0..{len(classes) - 1}")
        mask = f["mask"] if "mask" in f else None
        if mask is not None and mask.shape != data.shape:
            raise BadMessage(f"{str(path)!r}: /mask shape {mask.shape} differs from the maps' {data.shape}")
        if "split" in f:
            split = np.asarray(f["split"][()], dtype=np.uint8)
            if split.shape != labels.shape or (split.size and split.max() > 2):
                raise BadMessage(f"{str(path)!r}: /split must hold one of 0, 1, 2 per map")
            split_source = "file"
        else:
            split = _assign_random_split(labels, split_fractions, seed)
            split_source = f"assigned per map at random (seed {seed}, fractions {list(split_fractions)})"
        axes = tuple(_decode(data.attrs["axes"])) if layout == "labelled" and "axes" in data.attrs else None
        return MapFile(path, layout, classes, labels, split, split_source, f, data, mask, axes, attrs)
    except BaseException:
        f.close()
        raise


def write_labelled_maps(path, maps, labels, classes, *, mask=None, split=None, axes=None) -> Path:
    """Write maps and labels in the labelled-maps layout (for fine-tuning on measured data)."""
    import h5py

    maps = np.asarray(maps)
    labels = np.asarray(labels, dtype=np.int64)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("maps", data=maps, chunks=(1, *maps.shape[1:]), compression="gzip")
        if axes is not None:
            d.attrs["axes"] = list(axes)
        f.create_dataset("labels", data=labels).attrs["classes"] = list(classes)
        if mask is not None:
            f.create_dataset("mask", data=np.asarray(mask, dtype=np.uint8), chunks=(1, *maps.shape[1:]), compression="gzip")
        if split is not None:
            f.create_dataset("split", data=np.asarray(split, dtype=np.uint8))
    return Path(path)


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
        bar = _progress(n, f"preparing {self.array_path.stem.split('-')[0]}", progress)
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


def _progress(total: int, desc: str, enabled: bool):
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


# -- augmentation ------------------------------------------------------------------------------------
def mirror_about_centre(x: np.ndarray, axis: int) -> np.ndarray:
    """Reflect a prepared map about voxel n//2 along ``axis`` (where ``prepare`` put the centre of mass).

    ``x[::-1]`` alone would move the centre to n//2 - 1 on an even axis; here out[i] = x[n - i] for
    i >= 1 and out[0] = 0 (the first voxel is at the map's edge, where a prepared map is ~0).
    """
    out = np.zeros_like(x)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    src[axis] = slice(x.shape[axis] - 1, 0, -1)
    dst[axis] = slice(1, None)
    out[tuple(dst)] = x[tuple(src)]
    return out


def augment_mirror(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random element of the 8 symmetries of the (q_perp1, q_perp2) square: swap, mirror 1, mirror 2.

    Each is a mirror or a rotation about Q, so the pattern stays that of a physically possible crystal of
    the same class: the simulator already draws rotations about Q; a mirror through a plane containing Q
    adds the other handedness (a left-handed screw, the mirror image of the facets). Axis 0 (along Q) is
    never flipped.
    """
    if x.shape[1] == x.shape[2] and rng.random() < 0.5:
        x = np.swapaxes(x, 1, 2)
    for axis in (1, 2):
        if rng.random() < 0.5:
            x = mirror_about_centre(x, axis)
    return np.ascontiguousarray(x)


# -- tf.data ---------------------------------------------------------------------------------------------
class MapStream:
    """A generator of (map[..., None], one-hot) over one split: from a ``PreparedCache``, or preparing
    each map as it is read (``cache=None``). Index order reshuffled every epoch from (seed, epoch)."""

    def __init__(self, examples: Examples, config: PipelineConfig, *, cache: PreparedCache | None = None,
                 shuffle: bool = False, augment: bool = False, seed: int = 0, repeats: np.ndarray | None = None):
        self.examples, self.config, self.cache = examples, config, cache
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.epoch = 0  # the next epoch's number; set by the trainer when it resumes
        self.refused = 0
        eye = np.eye(examples.n_classes, dtype=np.float32)
        self.onehot = eye[examples.labels] if examples.n else np.zeros((0, examples.n_classes), np.float32)
        self.indices = np.arange(examples.n) if cache is None else np.flatnonzero(cache.valid)
        if repeats is not None:  # oversampling: an example appears repeats[k] times per epoch
            self.indices = np.repeat(self.indices, np.asarray(repeats)[self.indices])

    def __len__(self) -> int:
        return int(self.indices.size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.indices.size)]

    def __call__(self):
        epoch = self.epoch
        self.epoch += 1
        rng = np.random.default_rng([self.seed, epoch, 1])
        for k in self.order(epoch):
            if self.cache is not None:
                x = np.asarray(self.cache.array[k])
            else:
                mf, i = self.examples.locate(k)
                try:
                    x = mf.prepare(i, self.config).array
                except DefectscopeError:
                    self.refused += 1
                    continue
            if self.augment:
                x = augment_mirror(x, rng)
            yield x[..., None], self.onehot[k]

    def dataset(self, batch: int, prefetch: int = 2):
        import tensorflow as tf

        signature = (tf.TensorSpec((*self.config.shape, 1), tf.float32),
                     tf.TensorSpec((self.examples.n_classes,), tf.float32))
        ds = tf.data.Dataset.from_generator(self, output_signature=signature)
        if self.cache is not None:  # the number of maps is known: Keras then sizes its epochs and progress bar
            ds = ds.apply(tf.data.experimental.assert_cardinality(len(self)))
        return ds.batch(batch).prefetch(prefetch)

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``limit`` maps (in order) and their labels as arrays (small sets: calibration, parity)."""
        maps, labels = [], []
        saved = (self.shuffle, self.augment, self.epoch)
        self.shuffle = self.augment = False
        try:
            for x, y in self():
                maps.append(x)
                labels.append(int(np.argmax(y)))
                if limit is not None and len(maps) >= limit:
                    break
        finally:
            self.shuffle, self.augment, self.epoch = saved
        shape = (0, *self.config.shape, 1)
        return (np.stack(maps) if maps else np.zeros(shape, np.float32)), np.asarray(labels, dtype=np.int64)
