"""Raw scan loaders: SPEC + TIFF (34-ID-C) and HDF5/CXI stacks, their corrections and their errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from defectscope.errors import BadGeometry, BadMessage, DtypeNotAllowed, PathNotAllowed, ShapeMismatch, TooLarge
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.geometry import Geometry
from defectscope.preprocessing.scans import load_hdf5_scan, load_spec_tiff_scan

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCAN_34IDC = SHARED_DATA / "aps34idc_au111_s54"
SIXS_CXI = SHARED_DATA / "sixs_pt_s1398" / "S1398_pynx_norm_128_300_294_1_1_1.cxi"
CXI_DATA, CXI_MASK = "entry_1/instrument_1/detector_1/data", "entry_1/instrument_1/detector_1/mask"

N_POINTS, ROI, CHIP = 9, (2, 10, 3, 13), (16, 16)  # 9 frames of 8x10 pixels cut from a 16x16 chip


def write_spec(path: Path, *, thetas=None, o0="Delta  Theta  Chi  Phi  Mu  Gamma", p0="30.5 0.2 90 -5 0 12.25",
               energy_kev=9.0, uimr5="3 10 2 8 1"):  # fmt: skip
    """A small SPEC file laid out like 34-ID-C's: #O motor names, #P positions, #UIMR5 ROI, scans 6 and 7."""
    thetas = np.linspace(-0.1, 0.1, N_POINTS) if thetas is None else thetas
    rows = "\n".join(f"{t:.7f} {1000 + k} {k}" for k, t in enumerate(thetas))
    scan = (
        f"#S 7  ascan  th -0.1 0.1 {N_POINTS - 1} 0.25\n#D Tue Feb 04 12:28:23 2020\n#T 0.25  (Seconds)\n"
        f"#P0 {p0}\n#P1 500 {energy_kev}\n#UIMR5  {uimr5}\n#N 3\n#L Theta  Monitor  Detector\n{rows}\n"
    )
    path.write_text(
        "#F fake.spec\n#E 1580609738\n#D Sat Feb 01 20:15:38 2020\n#C sixc  User = test\n\n"
        f"#O0 {o0}\n#O1 camdist  Energy\n\n"
        f"#S 6  ascan  th 0 1 2 0.25\n#D Tue Feb 04 12:20:00 2020\n#P0 {p0}\n#P1 500 9\n#N 3\n"
        "#L Theta  Monitor  Detector\n0 1 0\n0.5 1 0\n1 1 0\n\n" + scan
    )
    return path


def raw_frames(seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.poisson(3.0, size=(N_POINTS, ROI[1] - ROI[0], ROI[3] - ROI[2])).astype(np.int32)
    frames[:, 0, 0] = np.arange(N_POINTS) * 1000  # each frame says which it is
    return frames


def write_frames(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir()
    for i in np.random.default_rng(0).permutation(len(frames)):  # unpadded numbers: 'f_10' sorts before 'f_9'
        tifffile.imwrite(folder / f"scan_f_{i + 1}.tif", frames[i])
    return folder


@pytest.fixture
def fake_scan(tmp_path):
    frames = raw_frames()
    return write_spec(tmp_path / "fake.spec"), write_frames(tmp_path / "frames", frames), frames


def test_spec_tiff_scan_loads_frames_in_number_order_with_its_geometry(fake_scan):
    spec, folder, frames = fake_scan
    loaded, geometry, mask = load_spec_tiff_scan(spec, 7, folder)
    np.testing.assert_array_equal(loaded, frames)
    assert mask is None and loaded.dtype == np.int32
    assert isinstance(geometry, Geometry) and geometry.preset == "aps-34idc"
    assert (geometry.n_frames, geometry.frame_shape) == (N_POINTS, (8, 10))
    assert (geometry.energy_ev, geometry.distance_m) == (9000.0, 0.5)
    assert dict(geometry.angles) == {"chi": 90.0, "phi": -5.0, "delta": 30.5, "gamma": 12.25}
    assert geometry.rocking_motor == "theta"
    assert geometry.rocking_start_deg == pytest.approx(-0.1)
    assert geometry.rocking_step_deg == pytest.approx(0.025)
    assert geometry.direct_beam == (256.0 - ROI[0], 256.0 - ROI[2])  # chip (256, 256) seen from the ROI
    glob_loaded, _, _ = load_spec_tiff_scan(spec, 7, str(folder / "*.tif"), direct_beam=(1.5, 2.5))
    np.testing.assert_array_equal(glob_loaded, frames)


def test_dark_and_whitefield_corrections_follow_cohere(fake_scan, tmp_path):
    spec, folder, frames = fake_scan
    rng = np.random.default_rng(9)
    dark = np.zeros(CHIP, dtype=np.int32)
    dark[4, 5] = dark[9, 12] = 7  # inside the ROI
    dark[0, 0] = 50  # outside
    white = rng.normal(1000.0, 10.0, CHIP).astype(np.float32)
    white[6, 8] = 5.0  # a dead pixel: below mean - 3 std
    tifffile.imwrite(tmp_path / "dark.tif", dark)
    loaded, _, mask = load_spec_tiff_scan(spec, 7, folder, dark=tmp_path / "dark.tif", whitefield=white)
    w = white.astype(np.float64)
    mean = w.mean()
    w[w < mean - 3 * w.std()] = 0
    w[dark > 1] = 0
    w = w[ROI[0] : ROI[1], ROI[2] : ROI[3]]
    expected = np.where(w > 0, frames / np.where(w > 0, w, 1) * mean, 0)
    np.testing.assert_allclose(loaded, expected, rtol=1e-6)
    assert loaded.dtype == np.float32
    assert sorted(zip(*np.nonzero(mask))) == [(2, 2), (4, 5), (7, 9)]  # dark (4,5), (9,12) and dead (6,8)
    assert (loaded[:, mask] == 0).all()


SPEC_ERRORS = {
    "missing spec file": (dict(spec="nowhere.spec"), PathNotAllowed, "nowhere.spec"),
    "wrong scan number": (dict(scan=99), BadMessage, "#S 99"),
    "scan number not an integer": (dict(scan="7"), BadMessage, "integer"),
    "no frames there": (dict(frames="empty/*.tif"), PathNotAllowed, "no TIFF frames"),
    "fewer frames than points": (dict(drop=1), ShapeMismatch, "8 frame files"),
    "uneven rocking steps": (dict(thetas=np.r_[np.linspace(-0.1, 0.05, N_POINTS - 1), 0.3]), BadGeometry, "uniform"),
    "motor not recorded": (dict(o0="Delta  Theta  Chi  Phi  Mu", p0="30.5 0.2 90 -5 0"), BadGeometry, "gamma"),
    "mu not zero": (dict(p0="30.5 0.2 90 -5 1.5 12.25"), BadGeometry, "Mu"),
    "roi of another size": (dict(roi=(0, 8, 0, 8)), ShapeMismatch, "ROI"),
    "unknown preset": (dict(preset="nope"), BadGeometry, "nope"),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_tiff_errors(tmp_path, case):
    opts, error, needle = SPEC_ERRORS[case]
    kwargs = {k: opts[k] for k in ("o0", "p0", "thetas") if k in opts}
    spec = write_spec(tmp_path / "s.spec", **kwargs)
    frames = raw_frames()[: N_POINTS - opts.get("drop", 0)]
    folder = write_frames(tmp_path / "frames", frames)
    (tmp_path / "empty").mkdir()
    where = tmp_path / opts["frames"] if "frames" in opts else folder
    call = dict(roi=opts.get("roi"), preset=opts.get("preset", "aps-34idc"))
    with pytest.raises(error, match=needle) as info:
        load_spec_tiff_scan(tmp_path / opts.get("spec", "s.spec"), opts.get("scan", 7), where, **call)
    assert "\n" not in str(info.value)


def test_bad_frame_files_are_refused_before_reading(tmp_path):
    spec = write_spec(tmp_path / "s.spec")
    folder = write_frames(tmp_path / "frames", raw_frames())
    tifffile.imwrite(folder / "scan_f_4.tif", np.zeros((2, 8, 10), np.int32))  # a stack where a frame belongs
    with pytest.raises(ShapeMismatch, match="scan_f_4.tif"):
        load_spec_tiff_scan(spec, 7, folder)
    (folder / "scan_f_4.tif").write_text("not a tiff")
    with pytest.raises(BadMessage, match="scan_f_4.tif"):
        load_spec_tiff_scan(spec, 7, folder)


def test_duplicate_frame_numbers_are_refused(tmp_path):
    spec = write_spec(tmp_path / "s.spec")
    folder = write_frames(tmp_path / "frames", raw_frames())
    tifffile.imwrite(folder / "other_0001.tif", raw_frames()[0])
    with pytest.raises(BadMessage, match="appears twice"):
        load_spec_tiff_scan(spec, 7, folder)


# HDF5 ------------------------------------------------------------------------------------------------
@pytest.fixture
def h5_files(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.random((6, 8, 10)).astype(np.float32)
    mask = (rng.random((6, 8, 10)) < 0.1).astype(np.int8)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = data
        f.create_group("grp")["data"] = data
    raw = tmp_path / "raw.bin"
    data.tofile(raw)
    path = tmp_path / "scan.cxi"
    with h5py.File(path, "w") as f:
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["data"] = data
        det["mask"] = mask
        det["mask2d"] = mask[0]
        det["flat"] = data[0]
        det["bytes"] = (data * 100).astype(np.int8)
        det.create_dataset("big_endian", data=data.astype(">f4"))
        f["ext"] = h5py.ExternalLink(str(other), "/data")
        f["ext_grp"] = h5py.ExternalLink(str(other), "/grp")
        f["soft_ext"] = h5py.SoftLink("/ext")
        f["soft_ok"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        f.create_dataset("external", shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        layout[:] = h5py.VirtualSource(str(other), "data", shape=data.shape)
        f.create_virtual_dataset("virtual", layout)
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("plain text")
    return path, data, mask, not_h5


def test_hdf5_stack_and_mask_load(h5_files):
    path, data, mask, _ = h5_files
    frames, geometry, loaded_mask = load_hdf5_scan(path, "entry_1/instrument_1/detector_1/data",
                                                   mask_dataset="/entry_1/instrument_1/detector_1/mask")  # fmt: skip
    np.testing.assert_array_equal(frames, data)
    np.testing.assert_array_equal(loaded_mask, mask != 0)
    assert geometry == {} and loaded_mask.dtype == bool
    _, _, mask2d = load_hdf5_scan(path, "soft_ok", mask_dataset="entry_1/instrument_1/detector_1/mask2d")
    assert mask2d.shape == data.shape[1:]
    swapped, _, _ = load_hdf5_scan(path, "entry_1/instrument_1/detector_1/big_endian")
    np.testing.assert_array_equal(swapped, data)
    assert swapped.dtype.isnative


HDF5_ERRORS = {
    "missing file": (dict(path="gone.h5"), PathNotAllowed, "gone.h5"),
    "not an hdf5 file": (dict(path="not.h5"), BadMessage, "not.h5"),
    "missing dataset": (dict(dataset="entry_1/data"), BadMessage, "entry_1/data'"),
    "group, not dataset": (dict(dataset="entry_1/instrument_1"), BadMessage, "group"),
    "external link": (dict(dataset="ext"), PathNotAllowed, "external link"),
    "external link to a group": (dict(dataset="ext_grp/data"), PathNotAllowed, "external link"),
    "soft link to an external link": (dict(dataset="soft_ext"), PathNotAllowed, "external link"),
    "external storage": (dict(dataset="external"), PathNotAllowed, "external files"),
    "virtual dataset": (dict(dataset="virtual"), PathNotAllowed, "virtual"),
    "2-D data": (dict(dataset="entry_1/instrument_1/detector_1/flat"), ShapeMismatch, "n_frames"),
    "int8 data": (dict(dataset="entry_1/instrument_1/detector_1/bytes"), DtypeNotAllowed, "i1"),
    "too many frames": (dict(limits=Limits(max_scan_frames=4)), TooLarge, "6 frames"),
    "mask not integer": (dict(mask="entry_1/instrument_1/detector_1/flat"), DtypeNotAllowed, "mask"),
    "mask not there": (dict(mask="entry_1/nomask"), BadMessage, "nomask"),
}


@pytest.mark.parametrize("case", sorted(HDF5_ERRORS))
def test_hdf5_errors(h5_files, case):
    path, _, _, _ = h5_files
    opts, error, needle = HDF5_ERRORS[case]
    where = path.parent / opts["path"] if "path" in opts else path
    kwargs = {"mask_dataset": opts.get("mask"), "limits": opts.get("limits", Limits())}
    with pytest.raises(error, match=needle) as info:
        load_hdf5_scan(where, opts.get("dataset", "entry_1/instrument_1/detector_1/data"), **kwargs)
    assert "\n" not in str(info.value)


def test_hdf5_mask_shape_must_fit(h5_files):
    path, _, _, _ = h5_files
    with h5py.File(path, "a") as f:
        f["entry_1/instrument_1/detector_1/mask_small"] = np.zeros((8, 9), np.int8)
    with pytest.raises(ShapeMismatch, match="mask_small"):
        load_hdf5_scan(path, CXI_DATA, mask_dataset="entry_1/instrument_1/detector_1/mask_small")


# Measured data ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_34idc():
    if not SCAN_34IDC.is_dir():
        pytest.skip(f"measured data not present at {SCAN_34IDC}")
    return SCAN_34IDC


def test_34idc_scan_54_loads_as_documented(data_34idc):
    frames, geometry, mask = load_spec_tiff_scan(data_34idc / "example.spec", 54, data_34idc / "Staff20-1a_S0054")
    assert frames.shape == (201, 256, 256) and frames.dtype == np.int32 and mask is None
    assert int(frames.sum()) == 46_155_653  # README statistics: right files, right order
    assert np.unravel_index(np.argmax(frames), frames.shape) == (99, 126, 127)
    assert dict(geometry.angles) == {"chi": 90.0, "phi": -5.0, "delta": 32.174, "gamma": 12.6346}
    assert geometry.rocking_start_deg == pytest.approx(-0.2799992, abs=1e-7)
    assert geometry.rocking_step_deg == pytest.approx(0.005, abs=1e-7)
    assert (geometry.energy_ev, geometry.distance_m, geometry.direct_beam) == (9000.0, 0.5, (256.0, 256.0))


def test_34idc_dark_and_whitefield(data_34idc):
    frames, _, mask = load_spec_tiff_scan(data_34idc / "example.spec", 54, data_34idc / "Staff20-1a_S0054",
                                          dark=data_34idc / "dark.tif", whitefield=data_34idc / "whitefield.tif")  # fmt: skip
    dark = tifffile.imread(data_34idc / "dark.tif")[:256, :256]
    assert mask[dark > 1].all()
    assert frames.dtype == np.float32 and np.isfinite(frames).all()
    assert (frames[:, mask] == 0).all() and frames.max() > 0


def test_sixs_cxi_loads_with_its_mask():
    if not SIXS_CXI.is_file():
        pytest.skip(f"measured data not present at {SIXS_CXI}")
    frames, geometry, mask = load_hdf5_scan(SIXS_CXI, CXI_DATA, mask_dataset=CXI_MASK)
    assert frames.shape == (128, 300, 294) and frames.dtype == np.float32 and geometry == {}
    assert mask.shape == frames.shape and mask.mean() == pytest.approx(0.082, abs=0.001)
    assert np.unravel_index(np.argmax(frames), frames.shape) == (64, 177, 131)
