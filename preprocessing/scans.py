"""Raw rocking-scan loaders: each returns ``(frames, geometry, mask)``.

``frames`` is ``[n_frames, rows, cols]``; ``mask`` is boolean of the frame shape (True = bad pixel) or None;
``geometry`` is a bound :class:`Geometry` when the files describe the beamline (SPEC + TIFF) and ``{}`` when
they do not (a bare HDF5 stack: pass your own geometry). Every problem with a file, a path, a scan number or a
dataset raises one ``defectscope.errors`` exception whose one-line message names the file or dataset:
a missing file or a link leaving the file -> ``PathNotAllowed``; an unreadable file, a missing scan or dataset
-> ``BadMessage``; sizes -> ``ShapeMismatch`` / ``TooLarge``; dtypes -> ``DtypeNotAllowed``; motors ->
``BadGeometry``. Nothing large is read before its size has been checked against ``Limits``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
from pathlib import Path

import h5py
import numpy as np
import tifffile

from defectscope.errors import BadGeometry, BadMessage, DefectscopeError, DtypeNotAllowed, PathNotAllowed, ShapeMismatch
from defectscope.preprocessing.loaders import open_tiff, safe_dataset
from defectscope.preprocessing.validate import check_scan_size
from defectscope.preprocessing.config import Limits
from defectscope.preprocessing.geometry import PRESETS, Geometry, geometry_from_dict, load_xrayutilities

TIM2_CHIP = (512, 512)  # 34-ID-C Timepix: the direct beam is assumed at chip pixel (256, 256), never recorded


def _existing_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PathNotAllowed(f"{what} {str(path)!r} does not exist or is not a file")
    return path


def _check_stack(n: int, shape, dtype: np.dtype, limits: Limits, source: str) -> None:
    """Size and dtype of a stack about to be read, checked before reading it."""
    if len(shape) != 2:
        raise ShapeMismatch(f"{source}: frames must be 2-D, got shape {tuple(shape)}")
    rows, cols = shape
    check_scan_size(n, rows, cols, limits, where=str(source))
    if np.dtype(dtype).newbyteorder("<").str not in limits.allowed_dtypes:
        raise DtypeNotAllowed(f"{source}: dtype {np.dtype(dtype).str} not allowed (allowed: {list(limits.allowed_dtypes)})")


# SPEC + TIFF (APS 34-ID-C) ---------------------------------------------------------------------------
def load_spec_tiff_scan(spec_path, scan_number: int, frames_dir_or_glob, *, dark=None, whitefield=None, roi=None,
                        preset: str = "aps-34idc", direct_beam=None, limits: Limits = Limits()):  # fmt: skip
    """Load a SPEC-described rocking scan of TIFF frames (34-ID-C layout).

    - ``scan_number`` is the ``#S`` number, looked up by number (``#S 54`` is not necessarily index 53).
    - Rocking motor: the first column of the scan (the scanned motor); per-frame values from that column give
      ``rocking start_deg`` (first value) and ``step_deg`` (mean step); a scan whose steps differ from the mean by
      more than 10 % is refused. Other motors from ``#O``/``#P`` (positions before the scan), matched to the
      preset's motor names ignoring case. 34-ID-C's ``Mu`` is not part of its geometry and must read 0.
    - Energy from motor ``Energy`` (keV) and distance from ``camdist`` (mm) when present, else the preset's.
    - ``roi = (row0, row1, col0, col1)`` in chip pixels (half-open); by default from ``#UIMR5`` (areaDetector
      ``minX sizeX minY sizeY``: X is the column); without either, the frames are taken to be the full chip.
    - Frames: ``*.tif``/``*.tiff`` of a directory, or a glob, sorted by the number ending each file name; their
      count must equal the number of scan points.
    - ``dark`` (path or array, chip or ROI size): pixels with dark > 1 are masked and set to 0 (cohere).
    - ``whitefield`` (path or array): cohere's 34-ID-C correction: on a full-chip field the seam pixels
      [255:257, 0:255] are zeroed, ``I = mean(field)``, values below ``mean - 3 std`` and dark-masked pixels
      are zeroed, then ``frame / field[roi] * I``; pixels where the field is 0 are masked and set to 0.
      Corrected frames are float32; without a whitefield the raw counts keep their dtype.
    - ``direct_beam`` (row, col) in frame pixels. 34-ID-C does not record it: the default is the Timepix chip
      pixel (256, 256) shifted by the ROI origin (an assumption, see the data README); other presets need it.
    """
    spec_path = _existing_file(spec_path, "SPEC file")
    scan = _spec_scan(spec_path, scan_number)
    if preset not in PRESETS:
        raise BadGeometry(f"unknown geometry preset {preset!r} (known: {sorted(PRESETS)})")
    files = _frame_files(frames_dir_or_glob)
    columns = scan.data.dtype.names
    if len(files) != len(scan.data):
        raise ShapeMismatch(f"{len(files)} frame files for SPEC scan {scan_number} with {len(scan.data)} points ({spec_path})")

    roi = _roi(scan, roi, spec_path)
    shape, dtype = _tiff_layout(files[0])
    _check_stack(len(files), shape, dtype, limits, str(files[0]))
    if roi is not None and (roi[1] - roi[0], roi[3] - roi[2]) != shape:
        raise ShapeMismatch(f"frames are {shape} but the ROI {list(roi)} is {(roi[1] - roi[0], roi[3] - roi[2])}")
    frames = np.empty((len(files), *shape), dtype=np.dtype(dtype).newbyteorder("="))
    for i, path in enumerate(files):
        frames[i] = _read_tiff(path, shape)

    mask, frames = _correct(frames, dark, whitefield, roi, limits)
    geometry = _spec_geometry(scan, columns, preset, shape, roi, direct_beam, spec_path, scan_number)
    return frames, geometry, mask


def _spec_scan(spec_path: Path, scan_number):
    if isinstance(scan_number, bool) or not isinstance(scan_number, (int, np.integer)):
        raise BadMessage(f"scan number must be an integer, got {scan_number!r}")
    xu = load_xrayutilities()
    try:
        # xrayutilities prints progress to stdout; a server's stdout is not the place for it.
        with contextlib.redirect_stdout(io.StringIO()):
            spec = xu.io.SPECFile(str(spec_path))
            scans = [s for s in spec.scan_list if s.nr == scan_number]
            if len(scans) == 1:
                scans[0].ReadData()
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise BadMessage(f"cannot read SPEC file {str(spec_path)!r}: {exc}") from None
    if not scans:
        raise BadMessage(f"SPEC file {str(spec_path)!r} has no scan #S {scan_number}")
    if len(scans) > 1:
        raise BadMessage(f"SPEC file {str(spec_path)!r} has {len(scans)} scans numbered #S {scan_number}")
    scan = scans[0]
    if scan.data is None or not scan.data.dtype.names or len(scan.data) < 2:
        raise BadMessage(f"SPEC scan #S {scan_number} of {str(spec_path)!r} has fewer than 2 points")
    return scan


def _frame_files(frames_dir_or_glob) -> list[Path]:
    where = Path(frames_dir_or_glob)
    if where.is_dir():
        files = [p for p in where.iterdir() if p.suffix.lower() in (".tif", ".tiff")]
    else:
        files = [Path(p) for p in glob.glob(str(frames_dir_or_glob))]
    if not files:
        raise PathNotAllowed(f"no TIFF frames found at {str(frames_dir_or_glob)!r}")
    numbered = {}
    for path in files:
        match = re.search(r"(\d+)$", path.stem)
        if match is None:
            raise BadMessage(f"frame file name {path.name!r} does not end with a frame number")
        number = int(match.group(1))
        if number in numbered:
            raise BadMessage(f"frame number {number} appears twice: {numbered[number].name}, {path.name}")
        numbered[number] = path
    return [numbered[k] for k in sorted(numbered)]


def _tiff_layout(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as fh, open_tiff(fh, path.name) as tif:
            return tuple(tif.pages[0].shape), tif.pages[0].dtype
    except DefectscopeError:
        raise
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise BadMessage(f"cannot read TIFF file {str(path)!r}: {exc}") from None


def _read_tiff(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One 2-D image, its header checked against ``shape`` before its pixels are read (from the same open
    file; ``open_tiff``: nothing but this file is read)."""
    try:
        with open(path, "rb") as fh, open_tiff(fh, path.name) as tif:
            found = (len(tif.pages), tuple(tif.pages[0].shape))
            image = tif.pages[0].asarray() if found == (1, shape) else None
    except DefectscopeError:
        raise
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise BadMessage(f"cannot read TIFF file {str(path)!r}: {exc}") from None
    if image is None:
        raise ShapeMismatch(f"TIFF file {str(path)!r} holds {found[0]} image(s) of {found[1]}, expected one of {shape}")
    return image


def _roi(scan, roi, spec_path):
    if roi is None:
        text = scan.getheader_element("UIMR5")
        if not text:
            return None
        try:
            min_x, size_x, min_y, size_y = (int(float(v)) for v in text.split()[:4])
        except ValueError:
            raise BadMessage(f"#UIMR5 line {text.strip()!r} of {str(spec_path)!r} is not 'minX sizeX minY sizeY'") from None
        roi = (min_y, min_y + size_y, min_x, min_x + size_x)
    if len(roi) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in roi):
        raise BadMessage(f"roi must be 4 integers (row0, row1, col0, col1), got {roi!r}")
    if roi[0] < 0 or roi[2] < 0 or roi[1] <= roi[0] or roi[3] <= roi[2]:
        raise BadMessage(f"roi {list(roi)} is empty or negative")
    return tuple(int(v) for v in roi)


def _field(value, name: str, limits: Limits) -> np.ndarray:
    """A dark/white field (path or array) as float64, either chip-sized or already cut to the ROI."""
    if isinstance(value, (str, Path)):
        path = _existing_file(value, f"{name} file")
        shape, _ = _tiff_layout(path)
        if len(shape) != 2 or shape[0] * shape[1] > limits.max_frame_pixels:
            raise ShapeMismatch(f"{name} file {str(path)!r} is not a 2-D image within the frame size limit: {shape}")
        value = _read_tiff(path, shape)
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 2:
        raise ShapeMismatch(f"{name} must be a 2-D image, got shape {value.shape}")
    return value


def _cut(field: np.ndarray, roi, shape, name: str) -> np.ndarray:
    if field.shape == tuple(shape):
        return field
    if roi is not None and field.shape[0] >= roi[1] and field.shape[1] >= roi[3]:
        return field[roi[0] : roi[1], roi[2] : roi[3]]
    raise ShapeMismatch(f"{name} of shape {field.shape} fits neither the frames {tuple(shape)} nor the ROI {roi}")


def _correct(frames: np.ndarray, dark, whitefield, roi, limits: Limits):
    """cohere's 34-ID-C corrections (see ``load_spec_tiff_scan``); returns (mask or None, frames)."""
    shape = frames.shape[1:]
    dark_full = _field(dark, "dark field", limits) if dark is not None else None
    bad = _cut(dark_full, roi, shape, "dark field") > 1 if dark_full is not None else np.zeros(shape, bool)
    if whitefield is not None:
        white = _field(whitefield, "whitefield", limits).copy()
        if white.shape == TIM2_CHIP:
            white[255:257, 0:255] = 0  # pixels on the Timepix seam respond oddly (cohere)
        mean, std = white.mean(), white.std()
        white[white < mean - 3 * std] = 0
        if dark_full is not None and dark_full.shape == white.shape:
            white[dark_full > 1] = 0
        white = _cut(white, roi, shape, "whitefield")
        bad |= white == 0
        scale = np.divide(mean, white, out=np.zeros_like(white), where=white != 0)
        frames = (frames * scale).astype(np.float32)
    if bad.any():
        frames[:, bad] = 0
        return bad, frames
    return None, frames


def _spec_geometry(scan, columns, preset, shape, roi, direct_beam, spec_path, scan_number) -> Geometry:
    p = PRESETS[preset]
    motors = {name[len("INIT_MOPO_"):].lower(): value for name, value in scan.init_motor_pos.items()}
    rocking = columns[0].lower()
    if rocking not in p.sample_motors:
        raise BadGeometry(f"SPEC scan #S {scan_number} scans {columns[0]!r}, not a sample motor of {preset} {list(p.sample_motors)}")
    values = np.asarray(scan.data[columns[0]], dtype=np.float64)
    step = (values[-1] - values[0]) / (len(values) - 1)
    if step == 0 or np.abs(np.diff(values) - step).max() > 0.1 * abs(step):
        raise BadGeometry(f"SPEC scan #S {scan_number}: {columns[0]} steps are not uniform (mean step {step:g} deg)")
    angles = {}
    for motor in p.sample_motors + p.detector_motors:
        if motor != rocking:
            if motor not in motors:
                raise BadGeometry(f"SPEC file {str(spec_path)!r} records no position of motor {motor!r} before scan #S {scan_number}")
            angles[motor] = motors[motor]
    if preset == "aps-34idc" and motors.get("mu", 0.0) != 0.0:
        raise BadGeometry(f"scan #S {scan_number} has Mu = {motors['mu']} deg; the aps-34idc geometry models Mu = 0 only")
    if direct_beam is None:
        if preset != "aps-34idc":
            raise BadGeometry(f"preset {preset} has no default direct beam: pass direct_beam=(row, col)")
        r0, c0 = (roi[0], roi[2]) if roi is not None else (0, 0)
        direct_beam = (TIM2_CHIP[0] // 2 - r0, TIM2_CHIP[1] // 2 - c0)
    d = {
        "preset": preset,
        "direct_beam": list(direct_beam),
        "angles": angles,
        "rocking": {"motor": rocking, "start_deg": float(values[0]), "step_deg": float(step)},
    }
    if "energy" in motors:
        d["energy_eV"] = motors["energy"] * 1000.0
    if "camdist" in motors:
        d["distance_m"] = motors["camdist"] / 1000.0
    return geometry_from_dict(d, n_frames=len(values), frame_shape=tuple(shape))


# HDF5 / NeXus / CXI ----------------------------------------------------------------------------------
def load_hdf5_scan(source, dataset: str, *, mask_dataset: str | None = None, limits: Limits = Limits(),
                   name: str | None = None):
    """Load a frame stack ``[n_frames, rows, cols]`` (and optionally its mask) from an HDF5/NeXus/CXI file.

    ``source``: a path, or a binary file open for reading (``loaders.open_under_root``), read and never
    reopened by name; ``name``: what messages call it. The mask dataset may be 2-D (one frame) or 3-D
    (the scan); nonzero = bad. External links, external raw storage and virtual datasets are refused
    (``PathNotAllowed``): the file must hold its data itself.
    Returns ``(frames, {}, mask)``: an HDF5 stack carries no trusted geometry.
    """
    if hasattr(source, "read"):
        return _hdf5_scan(source, name or "<open file>", dataset, mask_dataset, limits)
    path = str(source)
    try:
        fh = open(path, "rb")
    except OSError:
        raise PathNotAllowed(f"HDF5 file {path!r} does not exist or is not a file") from None
    with fh:
        return _hdf5_scan(fh, name or path, dataset, mask_dataset, limits)


def _hdf5_scan(fh, path: str, dataset: str, mask_dataset: str | None, limits: Limits):
    try:
        fh.seek(0)
        h5 = h5py.File(fh, "r")
    except OSError as exc:
        raise BadMessage(f"cannot open {path!r} as HDF5: {exc}") from None
    with h5:
        data = _dataset(h5, dataset, path)
        if data.ndim != 3:
            raise ShapeMismatch(f"dataset {dataset!r} in {path!r} must be [n_frames, rows, cols], got shape {data.shape}")
        _check_stack(data.shape[0], data.shape[1:], data.dtype, limits, f"dataset {dataset!r} in {path!r}")
        mask = None
        if mask_dataset is not None:
            m = _dataset(h5, mask_dataset, path)
            if m.shape not in (data.shape, data.shape[1:]):
                raise ShapeMismatch(f"mask {mask_dataset!r} of shape {m.shape} fits neither {data.shape} nor {data.shape[1:]}")
            if m.dtype != bool and m.dtype.kind not in "iu":
                raise DtypeNotAllowed(f"mask {mask_dataset!r} has dtype {m.dtype.str}; boolean or integer expected")
            mask = m[()] != 0
        frames = data[()].astype(data.dtype.newbyteorder("="), copy=False)
    return frames, {}, mask


def _dataset(h5: h5py.File, name: str, path: str) -> h5py.Dataset:
    return safe_dataset(h5, name, path)
