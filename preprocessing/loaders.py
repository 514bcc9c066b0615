"""Read one map from a file: HDF5 / NeXus / CXI, ``.npy``, ``.npz``, TIFF (SPEC §7).

Every reader checks the shape and dtype its format *declares* (``validate.check_declared``) before
reading any data, so a file that claims a huge or exotic array costs nothing. The format is recognised by
the file's first bytes, not its name. Nothing is ever unpickled.

HDF5 links are checked one path component at a time: soft links inside the file are followed (with a hop
limit against loops); external links, user-defined links, external raw storage and virtual datasets
(which read other files) raise ``PathNotAllowed`` — a server with a data root must not be steered outside it.
TIFF series that read other files (OME multi-file, Micro-Manager sets) are switched off, and an OME-XML
that names another file is refused the same way.

A file is opened once and every step reads that open file: ``open_under_root`` (``data_root``, imported
from here too) opens a request's path without leaving the data root, and the loaders take the open file
and never reopen it by name.
"""

from __future__ import annotations

import contextlib
import posixpath
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import h5py
import numpy as np
import tifffile

from defectscope.errors import BadMessage, DefectscopeError, DtypeNotAllowed, PathNotAllowed, ShapeMismatch
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.data_root import open_under_root  # noqa: F401 (re-exported: callers import it here)
from defectscope.preprocessing.validate import check_declared

CXI_DEFAULT = "entry_1/data_1/data"
_MAX_LINK_HOPS = 16
_MAGIC = {
    b"\x89HDF\r\n\x1a\n": "hdf5",
    b"\x93NUMPY": "npy",
    b"PK\x03\x04": "npz",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"II+\x00": "tiff",  # BigTIFF
    b"MM\x00+": "tiff",
}
MASK_DTYPE_KINDS = "biu"


class MapFileNotFound(BadMessage, FileNotFoundError):
    """The file named does not exist (BAD_MESSAGE on the wire; ``FileNotFoundError`` for library users)."""


def load_map(source, dataset: str | None = None, *, limits: Limits = Limits(), name: str | None = None) -> np.ndarray:
    """The map stored in ``source`` (3-D, or 4-D for a batch), native byte order, its own dtype.

    ``source``: a path, or a binary file open for reading (``open_under_root``), which is read and never
    reopened by name. ``name``: what messages call the file (default: the path, or the file's name).
    ``dataset``: HDF5 path (default: the NeXus ``default``/``signal`` chain, then CXI's
    ``entry_1/data_1/data``); ``.npz`` key (default: the only array); TIFF series index (default 0);
    ignored for ``.npy``.
    """
    with _opened(source, name) as (fh, path):
        kind = sniff_format(fh, path)
        try:
            array = _READERS[kind](fh, path, dataset,
                                   lambda shape, dtype: check_declared(shape, dtype, limits, any_byte_order=True))
        except DefectscopeError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, tifffile.TiffFileError) as exc:
            where = f" dataset {dataset!r}" if dataset else ""
            raise BadMessage(f"cannot read {kind} file {path}{where}: {exc}") from None
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def load_mask(source, dataset: str | None = None, *, shape=None, limits: Limits = Limits(),
              name: str | None = None) -> np.ndarray:
    """A bad-voxel mask (non-zero = bad) from the same formats, as bool; ``shape`` checks it matches a map.
    ``source`` and ``name`` as for ``load_map``."""
    with _opened(source, name) as (fh, path):
        return _load_mask(fh, path, dataset, shape, limits)


def _load_mask(fh, path: str, dataset, shape, limits: Limits) -> np.ndarray:
    kind = sniff_format(fh, path)

    def check(declared_shape, dtype):
        dtype = np.dtype(dtype)
        if dtype.kind not in MASK_DTYPE_KINDS or dtype.fields is not None:
            raise DtypeNotAllowed(f"mask in {path} has dtype {dtype}; a mask is boolean or integer")
        check_declared(declared_shape, "<u4", limits)  # size limits as for a map
        if shape is not None and tuple(declared_shape) != tuple(shape):
            raise ShapeMismatch(f"mask in {path} has shape {list(declared_shape)}, the map {list(shape)}")
        return tuple(declared_shape), dtype

    try:
        array = _READERS[kind](fh, path, dataset, check)
    except DefectscopeError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, tifffile.TiffFileError) as exc:
        raise BadMessage(f"cannot read mask from {kind} file {path}: {exc}") from None
    return array != 0


@contextlib.contextmanager
def _opened(source, name: str | None):
    """``(file, name)``: an open binary file is used as it is (and left open); a path is opened once, here."""
    if hasattr(source, "read"):
        own = getattr(source, "name", None)  # an int for a file opened from a descriptor
        yield source, name or (own if isinstance(own, str) else "<open file>")
        return
    name = name or str(source)
    try:
        fh = open(source, "rb")
    except FileNotFoundError:
        raise MapFileNotFound(f"no such file: {name}") from None
    except IsADirectoryError:
        raise BadMessage(f"{name} is a directory, not a map file") from None
    except OSError as exc:
        raise BadMessage(f"cannot open {name}: {exc.strerror or exc}") from None
    with fh:
        yield fh, name


def sniff_format(fh, name: str) -> str:
    """``hdf5`` | ``npy`` | ``npz`` | ``tiff`` from the first bytes of the open file; a clear error otherwise."""
    try:
        fh.seek(0)
        head = fh.read(8)
    except IsADirectoryError:
        raise BadMessage(f"{name} is a directory, not a map file") from None
    except OSError as exc:
        raise BadMessage(f"cannot read {name}: {exc.strerror or exc}") from None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    raise BadMessage(f"{name} is not a map file this reader knows (HDF5/NeXus/CXI, .npy, .npz, TIFF)")


# --- NumPy ------------------------------------------------------------------------------------------
def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise BadMessage(f"unknown .npy format version {version}")
    return shape, dtype


def _read_npy(fh, path: str, dataset, check) -> np.ndarray:
    fh.seek(0)
    check(*_npy_header(fh))
    fh.seek(0)
    return np.load(fh, allow_pickle=False)


def _read_npz(fh, path: str, dataset, check) -> np.ndarray:
    fh.seek(0)
    with np.load(fh, allow_pickle=False) as npz:
        keys = list(npz.files)
        if dataset is None:
            if len(keys) != 1:
                raise BadMessage(f"{path} holds {len(keys)} arrays {keys}: name one as the dataset")
            dataset = keys[0]
        if dataset not in keys:
            raise BadMessage(f"{path} has no array {dataset!r}; it holds {keys}")
        with npz.zip.open(dataset + ".npy") as member:  # the header, before decompressing the data
            check(*_npy_header(member))
        return npz[dataset]


# --- TIFF -------------------------------------------------------------------------------------------
# tifffile series kinds that read other files named in the file or found beside it (OME multi-file
# series, Micro-Manager MMStack and NDTiff sets): switched off with tifffile's ``is_<kind>=False`` flags.
_TIFF_KINDS_READING_OTHER_FILES = ("ome", "mmstack", "ndtiff")


def open_tiff(fh, name: str) -> tifffile.TiffFile:
    """A ``TiffFile`` that reads the open file ``fh`` and nothing else (close it; ``fh`` stays open).

    tifffile follows the file names in an OME-XML by default, so a TIFF could pull pixels from any TIFF
    the process can read: those series are off here, and an OME-XML that names any file but this one is
    refused (``PathNotAllowed``), so the caller is told rather than handed part of a map.
    """
    fh.seek(0)
    tif = tifffile.TiffFile(fh, name=posixpath.basename(str(name)) or "map.tif",
                            **{f"is_{kind}": False for kind in _TIFF_KINDS_READING_OTHER_FILES})
    try:
        _refuse_other_files(tif, name)
    except BaseException:
        tif.close()
        raise
    return tif


def _refuse_other_files(tif: tifffile.TiffFile, name: str) -> None:
    text = tif.pages.first.description if len(tif.pages) else ""
    if "FileName" not in text:
        return
    try:
        xml = ElementTree.fromstring(text)
    except (ElementTree.ParseError, ValueError):
        return  # not XML: nothing names a file (and tifffile's OME reading is off)
    own = posixpath.basename(str(name))
    for element in xml.iter():
        for key, value in element.attrib.items():
            if key.rpartition("}")[2] == "FileName" and value != own:
                raise PathNotAllowed(f"{name}: its OME-XML takes image data from another file, {value!r}; "
                                     "a map is read from its own file only")


def _read_tiff(fh, path: str, dataset, check) -> np.ndarray:
    with open_tiff(fh, path) as tif:
        series_list = tif.series
        if not series_list:
            raise BadMessage(f"{path} holds no readable image (a damaged TIFF?)")
        try:
            index = 0 if dataset is None else int(dataset)
            series = series_list[index]
        except (ValueError, IndexError):
            raise BadMessage(f"{path} has {len(series_list)} image series; dataset must be an index 0..{len(series_list) - 1}, got {dataset!r}") from None
        shape = _squeeze_to_map(tuple(series.shape))
        check(shape, series.dtype)
        return series.asarray().reshape(shape)


def _squeeze_to_map(shape: tuple[int, ...]) -> tuple[int, ...]:
    # ImageJ hyperstacks add singleton channel/time axes around a 3-D stack.
    while len(shape) > 3 and 1 in shape:
        i = shape.index(1)
        shape = shape[:i] + shape[i + 1:]
    return shape


# --- HDF5 / NeXus / CXI -----------------------------------------------------------------------------
def _read_hdf5(fh, path: str, dataset, check) -> np.ndarray:
    fh.seek(0)
    with h5py.File(fh, "r") as f:
        name = dataset if dataset is not None else _default_dataset(f, path)
        node = safe_dataset(f, name, path)
        check(node.shape, node.dtype)
        return node[()]


def safe_dataset(f, name: str, path: Path) -> "h5py.Dataset":
    """The dataset at ``name``, refusing every way an HDF5 file can make us read another file.

    The one place these checks live (map loaders, scan loaders, the Tango device all come here): every
    path component is resolved link by link (external and user-defined links refused, soft links
    followed only inside the file), then virtual datasets and external storage are refused.
    """
    if not isinstance(name, str) or not name.strip("/"):
        raise BadMessage(f"{path}: dataset path must be a non-empty string, got {name!r}")
    node = resolve_hdf5_path(f, name, path)
    if not isinstance(node, h5py.Dataset):
        raise BadMessage(f"{path}: {name!r} is a group, not a dataset")
    if node.is_virtual:
        raise PathNotAllowed(f"{path}: dataset {name!r} is a virtual dataset (reads other files)")
    if node.external:
        raise PathNotAllowed(f"{path}: dataset {name!r} keeps its data in external files")
    return node


def resolve_hdf5_path(f, name: str, path: Path, hops: int = 0):
    """The object at ``name``, following only hard links and soft links that stay in the file."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadMessage(f"{path}: HDF5 path {name!r} may not contain '..'")
    node, here = f["/"], "/"
    for part in parts:
        if not isinstance(node, h5py.Group):
            raise BadMessage(f"{path}: {here!r} is a dataset, so {name!r} does not exist")
        link = node.get(part, getlink=True)
        if link is None:
            raise BadMessage(f"{path}: no {posixpath.join(here, part)!r} (in {here!r}: {sorted(node)[:20]})")
        if isinstance(link, h5py.ExternalLink):
            raise PathNotAllowed(f"{path}: {posixpath.join(here, part)!r} is an external link to {link.filename}:{link.path}")
        if isinstance(link, h5py.SoftLink):
            if hops >= _MAX_LINK_HOPS:
                raise BadMessage(f"{path}: more than {_MAX_LINK_HOPS} soft links while resolving {name!r} (a loop?)")
            node = resolve_hdf5_path(f, posixpath.join(here, link.path), path, hops + 1)
        elif isinstance(link, h5py.HardLink):
            node = node[part]
        else:
            raise PathNotAllowed(f"{path}: {posixpath.join(here, part)!r} is a user-defined link")
        here = posixpath.join(here, part)
    return node


def _default_dataset(f, path: Path) -> str:
    """NeXus ``default`` -> NXentry ``default`` -> NXdata ``signal``; else CXI's ``entry_1/data_1/data``."""
    chain, node = [], f["/"]
    if _text_attr(node, "default") is None:
        # No root pointer: a file with a single top-level group (one NXentry) starts the chain there.
        groups = [k for k in node if isinstance(node.get(k, getlink=True), h5py.HardLink) and isinstance(node[k], h5py.Group)]
        if len(groups) == 1:
            chain, node = groups, node[groups[0]]
    for key in ("default", "default", "signal"):
        child = _text_attr(node, key)
        if child is None:
            break
        chain.append(child)
        try:
            node = resolve_hdf5_path(f, "/".join(chain), path)
        except BadMessage:
            break
        if isinstance(node, h5py.Dataset):
            return "/".join(chain)
    try:
        if isinstance(resolve_hdf5_path(f, CXI_DEFAULT, path), h5py.Dataset):
            return CXI_DEFAULT
    except BadMessage:
        pass
    raise BadMessage(f"{path}: no dataset named and no NeXus default or {CXI_DEFAULT!r}; give the dataset path")


def _text_attr(obj, key: str) -> str | None:
    value = obj.attrs.get(key)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


_READERS = {"hdf5": _read_hdf5, "npy": _read_npy, "npz": _read_npz, "tiff": _read_tiff}
