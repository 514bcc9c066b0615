"""Files of labelled maps, read map by map (never the whole file in memory).

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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from defectscope.preprocessing.config import PipelineConfig
from defectscope.preprocessing.pipeline import prepare

from defectscope.errors import BadMessage

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
LABELLED_DATA_KEYS = ("maps", "counts")
DEFECTIVE = "defective"


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
