"""loaders: every map format, header checks before reading, HDF5 link safety, never unpickling."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from defectscope.errors import BadMessage, DtypeNotAllowed, PathNotAllowed, ShapeMismatch, TooLarge
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.loaders import MapFileNotFound, load_map, load_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def volume():
    return np.random.default_rng(0).random((6, 7, 8)).astype(np.float32) * 100  # asymmetric shape


# --- NumPy ----------------------------------------------------------------------------------------
def test_npy(tmp_path, volume):
    np.save(tmp_path / "map.npy", volume)
    out = load_map(tmp_path / "map.npy")
    assert np.array_equal(out, volume) and out.dtype == np.float32


def test_npy_big_endian_and_fortran_come_back_native(tmp_path, volume):
    np.save(tmp_path / "be.npy", volume.astype(">f8"))
    np.save(tmp_path / "f.npy", np.asfortranarray(volume.astype("<u2")))
    be = load_map(tmp_path / "be.npy")
    assert be.dtype == np.dtype("<f8") and np.array_equal(be, volume.astype(np.float64))
    assert np.array_equal(load_map(tmp_path / "f.npy"), volume.astype("<u2"))


UNPICKLED = []


def _tripwire():
    UNPICKLED.append(True)
    return 0


class Tripwire:
    """Unpickling this calls ``_tripwire``: the loader must refuse before it gets that far."""

    def __reduce__(self):
        return _tripwire, ()


def test_npy_with_objects_refused_without_unpickling(tmp_path):
    objects = np.empty((2, 2, 2), dtype=object)
    objects[...] = Tripwire()
    np.save(tmp_path / "evil.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", a=objects)
    for name in ("evil.npy", "evil.npz"):
        with pytest.raises(DtypeNotAllowed):
            load_map(tmp_path / name)
    assert not UNPICKLED
    # The tripwire works: numpy with pickles allowed does trip it.
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert UNPICKLED


def test_npy_too_large_refused_from_header(tmp_path):
    # A header that claims 8 GB over a few bytes of data: refused before any read or allocation.
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (2048, 1024, 1024)})
        fh.write(b"\0" * 64)
    with pytest.raises(TooLarge):
        load_map(path)


def test_npy_dtype_refused(tmp_path):
    np.save(tmp_path / "u8.npy", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DtypeNotAllowed):
        load_map(tmp_path / "u8.npy")


def test_npy_rank_refused(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ShapeMismatch):
        load_map(tmp_path / "image.npy")


def test_npz_single_and_named(tmp_path, volume):
    np.savez_compressed(tmp_path / "one.npz", intensity=volume)
    np.savez(tmp_path / "two.npz", intensity=volume, mask=volume > 50)
    assert np.array_equal(load_map(tmp_path / "one.npz"), volume)
    assert np.array_equal(load_map(tmp_path / "two.npz", "intensity"), volume)
    with pytest.raises(BadMessage, match="2 arrays"):
        load_map(tmp_path / "two.npz")
    with pytest.raises(BadMessage, match="no array 'data'"):
        load_map(tmp_path / "two.npz", "data")
    assert np.array_equal(load_mask(tmp_path / "two.npz", "mask", shape=volume.shape), volume > 50)


# --- TIFF -----------------------------------------------------------------------------------------
def test_tiff_stack(tmp_path, volume):
    tifffile.imwrite(tmp_path / "map.tif", volume)
    tifffile.imwrite(tmp_path / "counts.tiff", volume.astype(np.uint16), imagej=True)
    assert np.array_equal(load_map(tmp_path / "map.tif"), volume)
    assert np.array_equal(load_map(tmp_path / "counts.tiff"), volume.astype(np.uint16))


def test_tiff_dtype_refused_before_reading(tmp_path):
    tifffile.imwrite(tmp_path / "u8.tif", np.zeros((5, 6, 7), np.uint8), photometric="minisblack")
    with pytest.raises(DtypeNotAllowed):
        load_map(tmp_path / "u8.tif")


def test_tiff_too_large_refused(tmp_path, volume):
    tifffile.imwrite(tmp_path / "map.tif", volume)
    with pytest.raises(TooLarge):
        load_map(tmp_path / "map.tif", limits=Limits(max_map_voxels=100))


def test_tiff_bad_series(tmp_path, volume):
    tifffile.imwrite(tmp_path / "map.tif", volume)
    with pytest.raises(BadMessage, match="series"):
        load_map(tmp_path / "map.tif", "3")


OME_TYPES = {np.dtype("<u2"): "uint16", np.dtype("<f4"): "float"}


def write_ome_tiff(path: Path, planes: np.ndarray, others=(), own_name: str | None = None) -> Path:
    """An OME-TIFF holding ``planes`` [n, rows, cols] whose OME-XML names itself (as ``own_name``, default its
    file name) for them and adds one Z plane from each file named in ``others``: a multi-file OME series,
    the layout tifffile follows by default."""
    n, rows, cols = planes.shape
    uuid = [f"urn:uuid:00000000-0000-4000-8000-{k:012d}" for k in range(len(others) + 1)]
    data = f'<TiffData FirstZ="0" IFD="0" PlaneCount="{n}"><UUID FileName="{own_name or path.name}">{uuid[0]}</UUID></TiffData>'
    data += "".join(f'<TiffData FirstZ="{n + k}" IFD="0" PlaneCount="1"><UUID FileName="{name}">{uuid[k + 1]}</UUID></TiffData>'
                    for k, name in enumerate(others))
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
           f'UUID="{uuid[0]}"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" '
           f'Type="{OME_TYPES[planes.dtype]}" SizeX="{cols}" SizeY="{rows}" SizeZ="{n + len(others)}" SizeC="1" '
           f'SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>{data}</Pixels></Image></OME>')
    tifffile.imwrite(path, planes, description=xml, metadata=None, photometric="minisblack")
    return path


def test_ome_tiff_naming_another_file_is_refused(tmp_path):
    """Issue #14.4: tifffile follows the file names of an OME-XML by default; a map comes from its own file."""
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    secret = np.full((1, 6, 7), 7777, np.uint16)
    tifffile.imwrite(tmp_path / "outside" / "secret.tif", secret, metadata=None)
    own = np.arange(2 * 6 * 7, dtype=np.uint16).reshape(2, 6, 7)
    for name, other in (("relative.ome.tif", "../outside/secret.tif"), ("absolute.ome.tif", str(tmp_path / "outside" / "secret.tif"))):
        path = write_ome_tiff(tmp_path / "root" / name, own, others=[other])
        with tifffile.TiffFile(path) as tif:  # the hole: tifffile alone reads the other file's pixels
            assert tif.series[0].asarray()[2, 0, 0] == 7777
        with pytest.raises(PathNotAllowed, match="another file"):
            load_map(path)
        with pytest.raises(PathNotAllowed, match="another file"):
            load_mask(path)


def test_ome_tiff_naming_only_itself_loads(tmp_path):
    """Single-file OME-TIFFs (Bio-Formats writes a UUID naming the file itself) are read as before."""
    own = np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7)
    assert np.array_equal(load_map(write_ome_tiff(tmp_path / "self.ome.tif", own)), own)
    tifffile.imwrite(tmp_path / "plain.ome.tif", own, ome=True)  # tifffile's own OME writer
    assert np.array_equal(load_map(tmp_path / "plain.ome.tif"), own)
    with pytest.raises(PathNotAllowed, match="another file"):  # the same bytes under another name name another file
        load_map(write_ome_tiff(tmp_path / "renamed.ome.tif", own, own_name="original.ome.tif"))


# --- reading an open file -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "npz", "tif", "h5"])
def test_an_open_file_is_read_not_its_name(tmp_path, volume, fmt):
    """Issue #14.5: given an open file, the loaders read it and never open the path again: a file put in its
    place after it was opened is not what they read."""
    def write(path, v):
        {"npy": lambda: np.save(path, v), "npz": lambda: np.savez(path, data=v),
         "tif": lambda: tifffile.imwrite(path, v), "h5": lambda: h5py.File(path, "w").create_dataset("data", data=v).file.close()}[fmt]()

    counts = volume.astype("<u2")  # integers: the same file serves as a mask
    path = tmp_path / f"map.{fmt}"
    write(path, counts)
    write(tmp_path / f"other.{fmt}", counts + 1)
    dataset = "data" if fmt == "h5" else None
    with open(path, "rb") as fh:
        os.replace(tmp_path / f"other.{fmt}", path)
        assert np.array_equal(load_map(fh, dataset, name="map"), counts)
        assert np.array_equal(load_mask(fh, dataset, name="map"), counts != 0)
        assert not fh.closed  # the caller's to close


def test_messages_name_the_file_as_the_caller_does(tmp_path):
    (tmp_path / "notes.txt").write_text("not a map")
    with open(tmp_path / "notes.txt", "rb") as fh, pytest.raises(BadMessage, match="^sub/notes.txt is not a map"):
        load_map(fh, name="sub/notes.txt")


# --- HDF5 / NeXus / CXI ---------------------------------------------------------------------------
def test_hdf5_dataset_path(tmp_path, volume):
    with h5py.File(tmp_path / "map.h5", "w") as f:
        f.create_dataset("scan/intensity", data=volume, compression="gzip")
    assert np.array_equal(load_map(tmp_path / "map.h5", "scan/intensity"), volume)
    assert np.array_equal(load_map(tmp_path / "map.h5", "/scan/intensity"), volume)


def test_hdf5_missing_dataset_or_group(tmp_path, volume):
    with h5py.File(tmp_path / "map.h5", "w") as f:
        f.create_dataset("scan/intensity", data=volume)
    with pytest.raises(BadMessage, match="scan/data") as info:
        load_map(tmp_path / "map.h5", "scan/data")
    assert "map.h5" in str(info.value) and "intensity" in str(info.value)
    with pytest.raises(BadMessage, match="group, not a dataset"):
        load_map(tmp_path / "map.h5", "scan")
    with pytest.raises(BadMessage, match="no dataset named"):
        load_map(tmp_path / "map.h5")


def test_nexus_default_chain(tmp_path, volume):
    with h5py.File(tmp_path / "map.nxs", "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["default"] = "plot"
        plot = entry.create_group("plot")
        plot.attrs["signal"] = "counts"
        plot.create_dataset("counts", data=volume)
        entry.create_dataset("other", data=np.zeros((2, 2, 2), np.float32))
    assert np.array_equal(load_map(tmp_path / "map.nxs"), volume)


def test_cxi_default_through_internal_soft_link(tmp_path, volume):
    with h5py.File(tmp_path / "map.cxi", "w") as f:
        f.create_dataset("entry_1/instrument_1/detector_1/data", data=volume)
        f.create_dataset("entry_1/instrument_1/detector_1/mask", data=(volume > 90).astype(np.int8))
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        f["entry_1/detector_alias"] = h5py.SoftLink("instrument_1/detector_1")  # relative soft link
    assert np.array_equal(load_map(tmp_path / "map.cxi"), volume)
    assert np.array_equal(load_map(tmp_path / "map.cxi", "entry_1/detector_alias/data"), volume)
    mask = load_mask(tmp_path / "map.cxi", "entry_1/instrument_1/detector_1/mask", shape=volume.shape)
    assert mask.dtype == bool and np.array_equal(mask, volume > 90)
    with pytest.raises(ShapeMismatch):
        load_mask(tmp_path / "map.cxi", "entry_1/instrument_1/detector_1/mask", shape=(6, 7, 9))


def test_hdf5_external_link_refused(tmp_path, volume):
    with h5py.File(tmp_path / "outside.h5", "w") as f:
        f.create_dataset("secret/data", data=volume)
    with h5py.File(tmp_path / "map.h5", "w") as f:
        f["data"] = h5py.ExternalLink("outside.h5", "/secret/data")
        f["group"] = h5py.ExternalLink("outside.h5", "/secret")
        f["hop"] = h5py.SoftLink("/group/data")  # a soft link whose target crosses the external link
        f["entry/data"] = h5py.ExternalLink("outside.h5", "/secret/data")
        f["entry"].attrs["default"] = "data"
    for name in ("data", "group/data", "hop", "entry/data"):
        with pytest.raises(PathNotAllowed, match="external link"):
            load_map(tmp_path / "map.h5", name)
    with pytest.raises(PathNotAllowed):  # the NeXus default chain is checked the same way
        load_map(tmp_path / "map.h5")


def test_hdf5_soft_link_loop_refused(tmp_path):
    with h5py.File(tmp_path / "loop.h5", "w") as f:
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
    with pytest.raises(BadMessage, match="soft links"):
        load_map(tmp_path / "loop.h5", "a")


def test_hdf5_virtual_dataset_refused(tmp_path, volume):
    with h5py.File(tmp_path / "source.h5", "w") as f:
        f.create_dataset("data", data=volume)
    layout = h5py.VirtualLayout(shape=volume.shape, dtype=volume.dtype)
    layout[...] = h5py.VirtualSource(str(tmp_path / "source.h5"), "data", shape=volume.shape)
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        f.create_virtual_dataset("data", layout)
    with pytest.raises(PathNotAllowed, match="virtual"):
        load_map(tmp_path / "vds.h5", "data")


def test_hdf5_external_storage_refused(tmp_path, volume):
    raw = tmp_path / "raw.bin"
    volume.tofile(raw)
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        f.create_dataset("data", shape=volume.shape, dtype=volume.dtype, external=[(str(raw), 0, volume.nbytes)])
    with pytest.raises(PathNotAllowed, match="external files"):
        load_map(tmp_path / "ext.h5", "data")


def test_hdf5_too_large_refused_before_reading(tmp_path):
    with h5py.File(tmp_path / "huge.h5", "w") as f:
        f.create_dataset("data", shape=(1024, 1024, 1024), dtype="<f4", chunks=(64, 64, 64))  # never written
    assert os.path.getsize(tmp_path / "huge.h5") < 1_000_000
    with pytest.raises(TooLarge):
        load_map(tmp_path / "huge.h5", "data")


def test_hdf5_dtype_refused(tmp_path):
    with h5py.File(tmp_path / "str.h5", "w") as f:
        f.create_dataset("data", data=np.array([b"abc"] * 8).reshape(2, 2, 2))
    with pytest.raises(DtypeNotAllowed):
        load_map(tmp_path / "str.h5", "data")


def test_hdf5_bad_paths(tmp_path, volume):
    with h5py.File(tmp_path / "map.h5", "w") as f:
        f.create_dataset("data", data=volume)
    with pytest.raises(BadMessage, match=r"'\.\.'"):
        load_map(tmp_path / "map.h5", "../data")
    with pytest.raises(BadMessage, match="is a dataset"):
        load_map(tmp_path / "map.h5", "data/more")


# --- files that are not maps ----------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(MapFileNotFound) as info:
        load_map(tmp_path / "nope.h5")
    assert isinstance(info.value, BadMessage) and isinstance(info.value, FileNotFoundError)
    assert info.value.reason == "BAD_MESSAGE" and "nope.h5" in str(info.value)


def test_directory_and_unknown_files(tmp_path):
    with pytest.raises(BadMessage, match="directory"):
        load_map(tmp_path)
    (tmp_path / "notes.txt").write_text("not a map")
    with pytest.raises(BadMessage, match="not a map file"):
        load_map(tmp_path / "notes.txt")


def test_truncated_hdf5_is_a_bad_message(tmp_path, volume):
    with h5py.File(tmp_path / "map.h5", "w") as f:
        f.create_dataset("data", data=volume)
    data = (tmp_path / "map.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:600])
    with pytest.raises(BadMessage, match="cut.h5"):
        load_map(tmp_path / "cut.h5", "data")


def test_corrupt_npy_is_a_bad_message(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(BadMessage, match="bad.npy"):
        load_map(tmp_path / "bad.npy")


# --- measured data --------------------------------------------------------------------------------
def test_measured_cxi_with_mask():
    path = DATA / "sixs_pt_s1398" / "S1398_pynx_norm_128_300_294_1_1_1.cxi"
    if not path.exists():
        pytest.skip(f"measured data not available ({path})")
    data = load_map(path)  # CXI default entry_1/data_1/data, a soft link to the detector data
    mask = load_mask(path, "entry_1/instrument_1/detector_1/mask", shape=data.shape)
    assert data.shape == (128, 300, 294) and data.dtype == np.float32
    assert 0.05 < mask.mean() < 0.12 and not data[mask].any()
