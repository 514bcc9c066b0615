"""Detector-frame sampling: a pattern measured pixel by pixel in a rocking scan, then orthonormalised.

A measured map is not sampled on an orthonormal grid. Each pixel of each frame of a rocking scan sees one
q (``preprocessing.qspace.pixel_q_lab``); those q form an oblique, anisotropic lattice (detector rows and
columns, and the rocking step, of different lengths and directions), and the server grids them onto
isotropic voxels (``preprocessing.orthonormalise.Orthonormaliser`` on ``qspace.natural_grid``'s voxel), which
averages several pixels into some voxels and a different number into others. A share of the training
patterns (``SimulationConfig.detector_frame_fraction``) is made that way, so the network sees those
gridding artefacts:

1. The scan geometry is a preset's (``beamline_sampling.BEAMLINES``: diffractometer, energy, distance), with
   the detector at the reflection's 2θ (the crystal's own lattice constant) in the scattering plane and the
   sample rocked through θ. The rocking step is drawn as a ratio to the detector-pixel step in q
   (``detector_frame_rocking_ratio_range``, log-uniform): the measured beamlines span 0.46 (34-ID-C) to 2.7
   (SixS) (``docs/eval/beamline_sampling.json``).
2. The simulated crystal (~10 nm) is smaller than a measured one (~100-500 nm), so the scan's q offsets from
   the centre pixel are scaled by one factor ``s`` that puts the gridded map at the drawn oversampling: the
   exact pattern of a crystal 2π s times larger in the real geometry (``equivalent_extent_nm``), the same
   lattice of q points, directions and anisotropy included.
3. The kinematic sum is evaluated exactly at every pixel's q by a type-3 (non-uniform to non-uniform) NUFFT.
4. The frames are gridded by the product's ``Orthonormaliser`` onto the box of the model's shape cut from the
   natural grid around Q (as ``Orthonormaliser.finish_window`` cuts it for a measured scan); the beam and
   detector nuisances, counting noise and masks of ``simulator`` follow on the gridded map as for any pattern.

The scan covers the box with a margin (``MARGIN_VOXELS``), so every voxel of the box receives pixels. The
Bragg peak is moved off the centre pixel by the drawn sub-pixel shift; the recorded shift is where it lands
on the box (voxel k sits at q = dq (k - n/2 + shift), as for the other patterns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from defectscope.training.conventions import TWO_PI, transform_columns

N_UNIFORMS = 8
MARGIN_VOXELS = 2.0
PROBE_STEP_DEG = 0.01


@dataclass(frozen=True)
class DetectorFrameDraw:
    """Whether a pattern is sampled in the detector frame, and the scan it is sampled by."""

    on: bool
    preset: str
    rocking_ratio: float  # rocking step / detector-pixel step, lengths in q


def draw_detector_frame(rng: np.random.Generator, cfg) -> DetectorFrameDraw:
    """Always ``N_UNIFORMS`` uniforms (0 on?, 1 preset, 2 ratio, 3-7 spare): toggling reshuffles nothing."""
    u = rng.random(N_UNIFORMS)
    presets = cfg.detector_frame_presets
    lo, hi = (math.log(v) for v in cfg.detector_frame_rocking_ratio_range)
    return DetectorFrameDraw(bool(u[0] < cfg.detector_frame_fraction), presets[min(int(u[1] * len(presets)), len(presets) - 1)],
                             float(math.exp(lo + u[2] * (hi - lo))))


def bragg_angle_deg(energy_ev: float, lattice_a_angstrom: float, hkl) -> float:
    wavelength = 12398.419843320026 / energy_ev
    d = lattice_a_angstrom / math.sqrt(sum(int(h) ** 2 for h in hkl))
    return math.degrees(math.asin(wavelength / (2.0 * d)))


def _geometry(preset: str, theta_deg: float, step_deg: float, n_frames: int, frame_shape):
    from defectscope.preprocessing.beamline_presets import PRESETS
    from defectscope.preprocessing.geometry import geometry_from_dict
    from defectscope.training.beamline_sampling import BEAMLINES

    settings, p = BEAMLINES[preset], PRESETS[preset]
    angles = {m: 0.0 for m in (*p.sample_motors, *p.detector_motors) if m != settings["theta"]}
    angles[settings["two_theta"]] = 2.0 * theta_deg
    rows, cols = frame_shape
    return geometry_from_dict({
        "preset": preset, "energy_eV": settings["energy_eV"], "distance_m": settings["distance_m"],
        "direct_beam": [rows // 2, cols // 2], "angles": angles,
        "rocking": {"motor": settings["theta"], "start_deg": theta_deg - ((n_frames - 1) // 2) * step_deg,
                    "step_deg": step_deg},
    }, n_frames=n_frames, frame_shape=tuple(frame_shape))


def _steps(geometry) -> np.ndarray:
    """Rows: q steps (lab frame, 1/Å, 2π/d) of one row, one column and one frame at the scan's centre."""
    from defectscope.preprocessing.qspace import pixel_q_lab

    rows, cols = geometry.frame_shape
    mid, r0, c0 = (geometry.n_frames - 1) // 2, rows // 2, cols // 2
    q = pixel_q_lab(geometry, [mid, mid + 1], roi=[r0, r0 + 2, c0, c0 + 2])
    return np.stack([q[0, 1, 0] - q[0, 0, 0], q[0, 0, 1] - q[0, 0, 0], q[1, 0, 0] - q[0, 0, 0]])


@dataclass(frozen=True, eq=False)
class DetectorScan:
    """A rocking scan covering the model's box, and how its q map onto the simulated crystal's."""

    geometry: object  # preprocessing.geometry.Geometry, bound to the scan size
    frame: object  # preprocessing.qspace.CanonicalFrame
    box: object  # preprocessing.qspace.Grid: the model's box and one voxel around it, cut from the natural grid around Q
    step_deg: float
    scale: float  # simulated-crystal q (1/Å, q = 1/d) per geometry q (1/Å, 2π/d)
    steps_canonical: np.ndarray  # (3, 3) rows: row, column, rocking steps in canonical coordinates (geometry q)


def plan_scan(draw: DetectorFrameDraw, lattice_a_angstrom: float, hkl, dq_inv_angstrom_cryst: float, shape) -> DetectorScan:
    """The scan of ``draw``'s preset whose natural voxel, scaled, is ``dq_inv_angstrom_cryst`` and which covers
    a box of ``shape`` voxels around Q with ``MARGIN_VOXELS`` to spare."""
    from defectscope.preprocessing.qspace import Grid, canonical_frame, natural_grid
    from defectscope.training.beamline_sampling import BEAMLINES

    theta = bragg_angle_deg(BEAMLINES[draw.preset]["energy_eV"], lattice_a_angstrom, hkl)
    probe = _steps(_geometry(draw.preset, theta, PROBE_STEP_DEG, 3, (4, 4)))
    pixel, rocking = np.linalg.norm(probe[0]), np.linalg.norm(probe[2])
    step_deg = PROBE_STEP_DEG * draw.rocking_ratio * pixel / rocking
    small = _geometry(draw.preset, theta, step_deg, 3, (4, 4))
    frame = canonical_frame(small)
    steps = _steps(small) @ frame.rotation.T  # canonical components of each step
    gridded = np.asarray(shape) + 2  # the box and one voxel around it: a crop of the natural grid (module docstring)
    half = (gridded / 2.0 + MARGIN_VOXELS) * frame.natural_voxel
    reach = np.abs(np.linalg.inv(steps.T)) @ half  # index range per step that covers the box's corners
    rows, cols, n_frames = (2 * math.ceil(r) + 1 for r in reach)
    geometry = _geometry(draw.preset, theta, step_deg, n_frames, (rows, cols))
    frame = canonical_frame(geometry)
    natural = natural_grid(geometry, frame, max_grid=1 << 16)
    d = natural.steps
    centre = frame.rotation @ frame.q_centre_lab
    first = np.rint((centre - np.asarray(natural.origin)) / d).astype(int) - gridded // 2
    box = Grid(shape=tuple(int(n) for n in gridded), origin=tuple(np.asarray(natural.origin) + first * d),
               voxel_size=natural.voxel_size)
    return DetectorScan(geometry, frame, box, float(step_deg), dq_inv_angstrom_cryst / frame.natural_voxel,
                        _steps(geometry) @ frame.rotation.T)


def pixel_offsets(scan: DetectorScan) -> np.ndarray:
    """Canonical q of every pixel relative to the centre pixel of the middle frame, (3, n_pixels), geometry q."""
    from defectscope.preprocessing.qspace import _canonical, pixel_q_lab

    q = pixel_q_lab(scan.geometry, np.arange(scan.geometry.n_frames)).reshape(-1, 3)
    coords = _canonical(scan.frame, q - scan.frame.q_centre_lab)
    return np.stack(coords)


def amplitude_at(atoms, frame_axes: np.ndarray, q_canonical_cryst: np.ndarray, eps: float, nthreads: int = 1) -> np.ndarray:
    """A(q) = Σ_j exp(-2πi (G+q)·(r_j+u_j)) at canonical q offsets (3, n), crystallographic: a type-3 NUFFT."""
    import finufft

    x = transform_columns(frame_axes, atoms.displaced_angstrom)
    s = TWO_PI * q_canonical_cryst
    strengths = np.exp(-1j * atoms.bragg_phase_rad)
    return finufft.nufft3d3(x[0], x[1], x[2], strengths, s[0], s[1], s[2], eps=eps, isign=-1, nthreads=int(nthreads),
                            debug=0)


@dataclass(eq=False)
class SampledPattern:
    intensity: np.ndarray  # gridded |A|², the box's shape (canonical frame)
    shift_voxels: np.ndarray  # where the Bragg peak landed: voxel k sits at q = dq (k - n/2 + shift)
    record: dict


def sample_pattern(atoms, grid, extent_angstrom, draw: DetectorFrameDraw, lattice_a_angstrom: float, hkl, eps: float,
                   nthreads: int = 1) -> SampledPattern:
    """The pattern of ``atoms`` on ``grid`` (a ``diffraction.ReciprocalGrid``: frame, voxel size, shift, shape)
    as ``draw``'s scan measures it and the product's orthonormaliser grids it."""
    from defectscope.preprocessing.orthonormalise import Orthonormaliser

    shape = np.asarray(grid.shape)
    scan = plan_scan(draw, lattice_a_angstrom, hkl, grid.dq_inv_angstrom_cryst, grid.shape)
    d = scan.frame.natural_voxel
    shift = np.asarray(grid.shift_voxels, dtype=np.float64)
    q = scan.scale * (pixel_offsets(scan) + (shift * d)[:, None])  # the peak sits -shift voxels from the centre pixel
    frames = intensity_of(amplitude_at(atoms, grid.frame_axes, q, eps, nthreads))
    n_frames, (rows, cols) = scan.geometry.n_frames, scan.geometry.frame_shape
    gridder = Orthonormaliser(max_grid=int(shape.max()) + 2)
    volume = gridder(frames.reshape(n_frames, rows, cols), scan.geometry, grid=scan.box).volume[1:-1, 1:-1, 1:-1]
    mapping = gridder.mapping(scan.geometry, grid=scan.box)
    centre = (scan.frame.rotation @ scan.frame.q_centre_lab - np.asarray(scan.box.origin)) / d - 1.0  # in the crop
    landed = shift - (centre - shape // 2)
    return SampledPattern(np.ascontiguousarray(volume), landed,
                          _record(scan, draw, atoms, grid.frame_axes, extent_angstrom, mapping))


def intensity_of(amplitude: np.ndarray) -> np.ndarray:
    return amplitude.real**2 + amplitude.imag**2


def _record(scan: DetectorScan, draw: DetectorFrameDraw, atoms, frame_axes, extent_angstrom, mapping) -> dict:
    steps_cryst = scan.scale * scan.steps_canonical  # (3, 3): row, column, rocking steps in the crystal's q
    lengths = np.linalg.norm(steps_cryst, axis=1)
    x = transform_columns(frame_axes, atoms.displaced_angstrom)
    along = [float(np.ptp((s / np.linalg.norm(s)) @ x)) for s in steps_cryst]  # crystal extent along each step
    geometry = scan.geometry
    counts = np.zeros(mapping.grid.n_voxels)
    counts[mapping.touched] = mapping.counts
    counts = counts.reshape(mapping.grid.shape)
    return {
        "detector_frame": True,
        "detector_frame_preset": draw.preset,
        "detector_frame_rocking_ratio": draw.rocking_ratio,
        "detector_frame_two_theta_deg": float(geometry.angles[_two_theta_motor(draw.preset)]),
        "detector_frame_rocking_step_deg": scan.step_deg,
        "detector_frame_scan_shape": np.array([geometry.n_frames, *geometry.frame_shape]),
        "detector_frame_q_steps_inv_angstrom": TWO_PI * lengths,
        "detector_frame_raw_oversampling": 1.0 / (lengths * np.asarray(along)),
        "detector_frame_equivalent_extent_nm": TWO_PI * scan.scale * float(np.max(extent_angstrom)) / 10.0,
        "detector_frame_pixels_per_voxel": float(counts[1:-1, 1:-1, 1:-1].mean()),
        "detector_frame_empty_voxels": int(np.count_nonzero(counts[1:-1, 1:-1, 1:-1] == 0)),
    }


def _two_theta_motor(preset: str) -> str:
    from defectscope.training.beamline_sampling import BEAMLINES

    return BEAMLINES[preset]["two_theta"]


OFF_RECORD = {
    "detector_frame": False, "detector_frame_preset": "", "detector_frame_rocking_ratio": np.nan,
    "detector_frame_two_theta_deg": np.nan, "detector_frame_rocking_step_deg": np.nan,
    "detector_frame_scan_shape": np.zeros(3, dtype=int), "detector_frame_q_steps_inv_angstrom": np.full(3, np.nan),
    "detector_frame_raw_oversampling": np.full(3, np.nan), "detector_frame_equivalent_extent_nm": np.nan,
    "detector_frame_pixels_per_voxel": np.nan, "detector_frame_empty_voxels": -1,
}
