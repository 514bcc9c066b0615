"""Simulated training datasets: the HDF5 layout (SPEC §7), a deterministic writer, and readers.

Layout (N patterns, S = config ``shape``, default 64³)::

    /counts          (N, *S) uint32   raw photon counts, canonical frame (attr axes = q_par, q_perp1, q_perp2),
                                      gzip + shuffle, one chunk per pattern
    /mask            (N, *S) uint8    1 = no measurement (detector gap or masked voxel; counts are 0 there)
    /labels          (N,)    uint8    class index; attr ``classes`` = ["defect_free", "screw", "edge"]
    /split           (N,)    uint8    0 train, 1 validation, 2 test; attr ``names``; assigned per configuration
    /parameters/<name> (N, ...)       every physical parameter of every pattern (``PARAMETERS``)
    root attributes: format, format_version, simulator_version, defectscope_version, simulator_config (JSON),
                     seed, n_patterns, n_configurations, conventions

Bit-reproducibility: patterns are written strictly in index order with fixed chunking and compression,
parameters are written once at the end, HDF5 object timestamps are off and nothing time-dependent is stored.
The file is written under ``<name>.partial`` and renamed when complete, so a killed run leaves no file
that looks finished.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from defectscope import __version__
from defectscope.errors import BadMessage
from defectscope.training.conventions import AXES
from defectscope.training.sim_config import CLASSES, SimulationConfig

FORMAT = "defectscope.simulated-bcdi"
FORMAT_VERSION = 3  # 2: relaxation, strain and nuisance parameters; 3: detector-frame sampling (older files lack them)
SPLITS = ("train", "validation", "test")
CONVENTIONS = ("lattice frame x[100] y[010] z[001]; lengths in angstrom; voxel_size_inv_angstrom in the "
               "Q = 2*pi/d convention (SPEC 4); canonical frame: axis 0 along Q = G, axes 1, 2 perpendicular, "
               "right-handed; frame_axes rows = canonical axes in the lattice frame; kinematic amplitude "
               "sum_j exp(-2 pi i (G+q).(r_j+u_j)) with q = 1/d internally")

# name -> (dtype, per-pattern shape, description). Units are in the names.
PARAMETERS: dict[str, tuple[str, tuple, str]] = {
    "configuration_index": ("<i4", (), "crystal configuration; its orientations share it and its split"),
    "orientation_index": ("<i2", (), "orientation of the configuration (0 .. orientations-1)"),
    "element": ("S2", (), "Al, Ag, Au or Pt"),
    "size": ("S5", (), "small (40 cells) or large (80 cells)"),
    "n_unit_cells": ("<i2", (), "edge of the cube the Wulff shape is carved from, unit cells"),
    "lattice_a_angstrom": ("<f8", (), "lattice parameter"),
    "poisson_ratio": ("<f8", (), "isotropic Poisson ratio of the displacement field"),
    "surface_energy_ratio": ("<f8", (), "gamma111 / gamma100 of the Wulff construction"),
    "interface_normal": ("<i1", (3,), "{111} substrate interface normal (0,0,0: untruncated)"),
    "truncation_fraction": ("<f8", (), "remaining fraction of the free particle's height (1: untruncated)"),
    "n_atoms": ("<i4", (), "atoms in the particle"),
    "position_mode": ("S4", (), "CD (centred), RPD (random position) or none"),
    "burgers_vector_angstrom": ("<f8", (3,), "b, lattice frame (zeros: defect-free)"),
    "line_direction": ("<f8", (3,), "unit line direction t, lattice frame (zeros: defect-free)"),
    "dislocation_position_angstrom": ("<f8", (3,), "point of the line relative to the particle centroid"),
    "dislocation_offset_angstrom": ("<f8", (), "distance from the centroid to the line (NaN: defect-free)"),
    "reflection_hkl": ("<i1", (3,), "Bragg reflection hkl"),
    "g_dot_b": ("<f8", (), "g.b of the reflection with b = 1/2[1-10]"),
    "invisible": ("|b1", (), "defective but g.b = 0 (invisibility criterion)"),
    "rotation_about_q_rad": ("<f8", (), "rotation of axes 1, 2 about Q"),
    "frame_axes": ("<f8", (3, 3), "rows: canonical axes 0 (Q), 1, 2 in the lattice frame"),
    "voxel_size_inv_angstrom": ("<f8", (3,), "voxel size per axis, Q = 2 pi/d convention"),
    "oversampling": ("<f8", (3,), "field of view / crystal extent per canonical axis"),
    "oversampling_target": ("<f8", (), "oversampling drawn for the largest extent"),
    "crystal_extent_angstrom": ("<f8", (3,), "crystal extent along each canonical axis"),
    "subpixel_shift_voxels": ("<f8", (3,), "grid shift: voxel k sits at q = dq (k - n/2 + shift)"),
    "peak_counts_target": ("<f8", (), "expected counts of the brightest voxel before noise"),
    "background_counts_per_voxel": ("<f8", (), "flat background, mean counts per voxel"),
    "peak_intensity_kinematic": ("<f8", (), "max |A|^2 on the grid, atomic form factor 1"),
    "n_gap_stripes": ("<i1", (), "detector-gap stripes"),
    "masked_voxel_fraction": ("<f8", (), "probability that a voxel is masked (hot/dead pixel)"),
    "n_masked_voxels": ("<i4", (), "voxels with mask = 1"),
    # Relaxation (format 2; relax_simulator) ------------------------------------------------------------
    "label_inserted": ("u1", (), "class inserted; label differs when the dislocation left the crystal in relaxation"),
    "relaxed": ("|b1", (), "built from its LAMMPS relaxation (false: Volterra field, or the relaxed twin)"),
    "potential": ("S16", (), "EAM potential of the relaxation or twin ('' : none, room-temperature a)"),
    "relax_cg_iterations": ("<i4", (), "conjugate-gradient steps of the minimisation (-1: not relaxed)"),
    "relax_energy_change_ev": ("<f8", (), "energy change of the minimisation (NaN: not relaxed)"),
    "relax_energy_change_per_atom_ev": ("<f8", (), "energy change per atom (NaN: not relaxed)"),
    "relax_hcp_atoms": ("<i4", (), "hcp atoms after relaxation (CNA: stacking-fault ribbon; -1: not relaxed)"),
    "stacking_fault_width_angstrom": ("<f8", (), "width of the hcp ribbon across the line (NaN: none)"),
    "partial_separation_angstrom": ("<f8", (), "ribbon width + a*sqrt(3)/4 (the cores sit outside it; NaN: none)"),
    "relax_state": ("S16", (), "unrelaxed, none, compact, dissociated, one_partial_left, fault_across, left"),
    "dislocation_left_crystal": ("|b1", (), "the dislocation left the crystal in relaxation (label: defect_free)"),
    "character_after_relaxation": ("S6", (), "measured line character: screw, edge, mixed ('': not measured)"),
    "relaxation_phase_range_rad": ("<f8", (), "1st-99th percentile range of 2 pi G.(u_relaxed - u_Volterra)"),
    # Strain (format 2; strain) ---------------------------------------------------------------------------
    "interface_strain": ("|b1", (), "substrate misfit strain at the truncation facet"),
    "interface_misfit": ("<f8", (), "misfit strain at the interface (+ tensile)"),
    "interface_decay_length_angstrom": ("<f8", (), "decay length of the misfit strain into the particle"),
    "interface_phase_range_rad": ("<f8", (), "1st-99th percentile range of its Bragg phase inside the crystal"),
    "smooth_strain": ("|b1", (), "random quadratic + cubic displacement field"),
    "smooth_phase_range_rad": ("<f8", (), "1st-99th percentile range of its Bragg phase inside the crystal"),
    "strain_phase_range_rad": ("<f8", (), "1st-99th percentile range of the Bragg phase of both fields together"),
    # Beam and detector (format 2; detector) ------------------------------------------------------------------
    "fringe_visibility": ("<f8", (3,), "partial coherence: gamma at the crystal extent per axis (1: coherent)"),
    "coherence_length_angstrom": ("<f8", (3,), "Gaussian coherence length per canonical axis (inf: coherent)"),
    "psf_sigma_voxels": ("<f8", (), "detector point-spread, Gaussian sigma along axes 1, 2 (0: none)"),
    "n_hot_pixels": ("<i1", (), "hot pixels (lines along axis 0)"),
    "hot_pixel_counts": ("<f8", (), "counts of every voxel of a hot-pixel line"),
    "hot_pixel_voxels": ("<i2", (4, 2), "axis-1, axis-2 indices of each hot-pixel line (-1: none)"),
    "n_dead_lines": ("<i1", (), "dead detector rows/columns (zero planes)"),
    "dead_line_axes": ("<i1", (2,), "axis (1 or 2) whose index is constant on each dead plane (0: none)"),
    "dead_line_indices": ("<i2", (2,), "index of each dead plane (-1: none)"),
    "n_aliens": ("<i1", (), "alien (parasitic) spots"),
    "alien_centres_voxels": ("<f8", (3, 3), "centre of each alien spot (NaN: none)"),
    "alien_sigma_voxels": ("<f8", (3,), "Gaussian sigma of each alien spot"),
    "alien_relative_intensity": ("<f8", (3,), "peak of each alien spot / peak_counts_target"),
    "detector_defects_masked": ("|b1", (), "hot pixels and dead lines are flagged in the mask"),
    # Detector-frame sampling (format 3; detector_frame) -------------------------------------------------------
    "detector_frame": ("|b1", (), "computed at the pixels of a rocking scan and gridded by the orthonormaliser"),
    "detector_frame_preset": ("S12", (), "beamline preset of the scan ('': orthonormal sampling)"),
    "detector_frame_rocking_ratio": ("<f8", (), "rocking step / detector-pixel step, lengths in q"),
    "detector_frame_two_theta_deg": ("<f8", (), "detector angle: the reflection's 2 theta at the preset's energy"),
    "detector_frame_rocking_step_deg": ("<f8", (), "rocking step of the scan"),
    "detector_frame_scan_shape": ("<i4", (3,), "frames, rows, columns of the scan"),
    "detector_frame_q_steps_inv_angstrom": ("<f8", (3,), "q step of a row, a column, a frame (scaled to the crystal)"),
    "detector_frame_raw_oversampling": ("<f8", (3,), "oversampling along the row, column and rocking steps"),
    "detector_frame_equivalent_extent_nm": ("<f8", (), "extent of the crystal the real geometry samples alike"),
    "detector_frame_pixels_per_voxel": ("<f8", (), "mean pixels gridded into a voxel of the map"),
    "detector_frame_empty_voxels": ("<i4", (), "voxels of the map no pixel reached (0; -1: orthonormal sampling)"),
}


def assign_splits(labels_per_configuration: np.ndarray, fractions, rng: np.random.Generator) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) per configuration, stratified by class.

    Whole configurations are assigned, so the orientations of one crystal never straddle two splits.
    """
    labels = np.asarray(labels_per_configuration)
    splits = np.zeros(labels.shape[0], dtype=np.uint8)
    for label in range(len(CLASSES)):  # fixed order: the draws do not depend on which classes occur
        members = np.flatnonzero(labels == label)
        order = members[rng.permutation(members.size)]
        n_test = int(round(fractions[2] * members.size))
        n_val = int(round(fractions[1] * members.size))
        splits[order[members.size - n_test:]] = 2
        splits[order[members.size - n_test - n_val:members.size - n_test]] = 1
    return splits


def encode_chunks(counts: np.ndarray, mask: np.ndarray, level: int) -> list[tuple[bytes, bytes | None]]:
    """HDF5 chunks of each pattern, filtered as the datasets declare (counts: shuffle + deflate; mask: deflate).

    Done where the patterns are computed (on the Dask workers), so the process writing the file only copies
    bytes; the encoding is deterministic, so the file does not depend on where it ran. ``None`` for an
    all-zero mask (left unallocated in the file, read back as the fill value 0).
    """
    out = []
    for k in range(counts.shape[0]):
        c = np.ascontiguousarray(counts[k], dtype="<u4")
        shuffled = c.view(np.uint8).reshape(-1, c.itemsize).T.tobytes()  # HDF5 shuffle: byte planes
        m = mask[k]
        out.append((zlib.compress(shuffled, level),
                    zlib.compress(np.ascontiguousarray(m, dtype=np.uint8).tobytes(), level) if m.any() else None))
    return out


class DatasetWriter:
    """Write patterns in index order; ``finish`` adds labels, splits, parameters and renames the file.

    Resumable: the file is ``<out>.partial`` until it is finished, and after every configuration it holds
    the patterns so far with their labels and parameters (group ``_progress``, attribute ``written``),
    flushed. A writer made again for the same run (same config, seed and size) with ``resume`` continues
    from there (``written``: the patterns already in); a partial file of another run is refused, unless
    ``resume`` is False, which starts over.
    """

    def __init__(self, path, n_patterns: int, n_configurations: int, cfg: SimulationConfig, seed: int,
                 *, resume: bool = True, simulator_version: str | None = None, subset: dict | None = None):
        import h5py

        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.n_patterns = int(n_patterns)
        self.cfg = cfg
        self._next = 0
        run = {"simulator_config": cfg.to_json(), "seed": int(seed), "n_patterns": self.n_patterns,
               "n_configurations": int(n_configurations), "format_version": FORMAT_VERSION,
               "simulator_version_of_progress": str(simulator_version),  # no patterns of two simulators in a file
               **(subset or {})}  # the configurations of one split of a larger run (``runner.simulate_dataset``)
        if resume and self.partial.exists():
            self._reopen(run)
            return
        self._file = h5py.File(self.partial, "w")
        chunk = (1, *cfg.shape)
        self._counts = self._file.create_dataset(
            "counts", shape=(self.n_patterns, *cfg.shape), dtype="<u4", chunks=chunk, compression="gzip",
            compression_opts=int(cfg.compression_level), shuffle=True, fillvalue=0, track_times=False)
        self._counts.attrs["axes"] = list(AXES)
        self._counts.attrs["units"] = "photon counts"
        self._mask = self._file.create_dataset(
            "mask", shape=(self.n_patterns, *cfg.shape), dtype="u1", chunks=chunk, compression="gzip",
            compression_opts=int(cfg.compression_level), shuffle=False, fillvalue=0, track_times=False)
        self._params = {name: np.zeros((self.n_patterns, *shape), dtype=dtype) for name, (dtype, shape, _) in PARAMETERS.items()}
        self._labels = np.zeros(self.n_patterns, dtype=np.uint8)
        progress = self._file.create_group("_progress")
        progress.create_dataset("labels", data=self._labels, track_times=False)
        for name, values in self._params.items():
            progress.create_dataset(name, data=values, track_times=False)
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs.update(run)
        attrs["conventions"] = CONVENTIONS
        attrs["written"] = 0
        self._file.flush()

    def _reopen(self, run: dict) -> None:
        import h5py

        try:
            self._file = h5py.File(self.partial, "r+")
        except OSError as exc:
            raise BadMessage(f"{str(self.partial)!r} (an interrupted run) cannot be opened ({exc}); remove it, or "
                             "start over with --force") from None
        attrs, mismatch = self._file.attrs, None
        if "written" not in attrs or "_progress" not in self._file:
            mismatch = "it holds no progress record"
        else:
            mismatch = next((f"its {k} differs" for k, v in run.items() if attrs.get(k) != v), None)
        if mismatch:
            self._file.close()
            raise BadMessage(f"{str(self.partial)!r} is a partial dataset of another run ({mismatch}); remove it, "
                             "or start over with --force")
        self._counts, self._mask = self._file["counts"], self._file["mask"]
        progress = self._file["_progress"]
        self._labels = progress["labels"][()]
        self._params = {name: progress[name][()] for name in PARAMETERS}
        self._next = int(attrs["written"])

    @property
    def written(self) -> int:
        """Patterns already in the file (all of earlier configurations: a resumed run starts after them)."""
        return self._next

    def write(self, result) -> None:
        """Append one configuration's patterns (results must arrive in index order)."""
        chunks = result.chunks if result.chunks is not None else encode_chunks(result.counts, result.mask,
                                                                               self.cfg.compression_level)
        n = len(chunks)
        sl = slice(self._next, self._next + n)
        if sl.stop > self.n_patterns:
            raise ValueError("more patterns written than the dataset holds")
        zeros = (0,) * len(self.cfg.shape)
        for k, (counts_chunk, mask_chunk) in enumerate(chunks):  # one chunk per pattern, in index order
            self._counts.id.write_direct_chunk((self._next + k, *zeros), counts_chunk)
            if mask_chunk is not None:  # all-zero masks stay unallocated (fill value 0)
                self._mask.id.write_direct_chunk((self._next + k, *zeros), mask_chunk)
        progress = self._file["_progress"]
        for name in PARAMETERS:
            self._params[name][sl] = result.params[name]
            progress[name][sl] = self._params[name][sl]
        self._labels[sl] = result.params["label"]
        progress["labels"][sl] = self._labels[sl]
        self._next = sl.stop
        self._file.attrs["written"] = self._next
        self._file.flush()  # a stopped run resumes after this configuration

    def finish(self, split_per_pattern: np.ndarray, simulator_version: str) -> Path:
        if self._next != self.n_patterns:
            raise ValueError(f"dataset incomplete: {self._next} of {self.n_patterns} patterns written")
        f = self._file
        labels = f.create_dataset("labels", data=self._labels, track_times=False)
        labels.attrs["classes"] = list(CLASSES)
        split = f.create_dataset("split", data=np.asarray(split_per_pattern, dtype=np.uint8), track_times=False)
        split.attrs["names"] = list(SPLITS)
        group = f.create_group("parameters", track_order=False)
        for name, (_, _, description) in PARAMETERS.items():
            group.create_dataset(name, data=self._params[name], track_times=False).attrs["description"] = description
        f.attrs["classes"] = list(CLASSES)
        f.attrs["simulator_version"] = simulator_version
        f.attrs["defectscope_version"] = __version__
        del f["_progress"], f.attrs["written"], f.attrs["simulator_version_of_progress"]
        f.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close, keeping the partial file: the same command resumes it."""
        self._file.close()


# -- reading -----------------------------------------------------------------------------------------
class SimulatedDataset:
    """Read access: ``with SimulatedDataset(path) as ds: ds.counts[i], ds.labels, ds.indices('train')``."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        if self._file.attrs.get("format") != FORMAT:
            self._file.close()
            raise BadMessage(f"{str(self.path)!r} is not a defectscope simulated dataset")
        self.counts = self._file["counts"]
        self.mask = self._file["mask"]
        self.labels = self._file["labels"][()]
        self.split = self._file["split"][()]
        self.classes = [str(c) for c in self._file["labels"].attrs["classes"]]
        self.config = SimulationConfig.from_json(self._file.attrs["simulator_config"])

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: ds[()] for name, ds in self._file["parameters"].items()}

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
