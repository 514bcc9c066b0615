"""One crystal configuration → its ~10 measured-like patterns: the unit of work of ``defectscope simulate``.

Reproducibility: every random number of configuration ``i`` comes from ``np.random.SeedSequence(seed,
spawn_key=(stream, i, ...))``, so configuration ``i`` is the same whichever process computes it, in
whatever order, and whatever the total number of configurations. Streams:

    (0, i)        the configuration plan (element, size, shape, class, CD/RPD, reflection)
    (1, i)        the dislocation position (needs the built crystal)
    (2, i, o)     orientation o: sampling draws, counting noise, masked voxels, beam/detector nuisances,
                  detector-frame sampling (children 0-4 of the orientation's SeedSequence; adding a child leaves
                  the others as they were)
    (3,)          the train/validation/test split (``dataset.assign_splits``)
    (4, i)        relaxed or not (``relaxed_fraction``)
    (5, i)        the strain fields (``strain.draw_strain``)

The NUFFT runs with a fixed thread count (1 by default), so the floating-point sums, hence the counts,
are bit-identical in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from defectscope.training import crystals, detector, detector_frame, dislocations, sampling, strain
from defectscope.training.conventions import canonical_axes, reciprocal_vector_inv_angstrom_cryst, to_inv_angstrom_2pi
from defectscope.training.diffraction import NufftAmplitude, ReciprocalGrid, ScatteringAtoms, intensity, scattering_atoms
from defectscope.training.sim_config import CLASSES, SimulationConfig

SIMULATOR_VERSION = "1.0.0"  # defaults make the same counts as before; the bundled demo examples record it

STREAM_PLAN, STREAM_POSITION, STREAM_ORIENTATION, STREAM_SPLIT, STREAM_RELAXED, STREAM_STRAIN = 0, 1, 2, 3, 4, 5

BURGERS_HKL2 = (1, -1, 0)  # 2b/a: g·b = (h·1 - k·1)/2 for b = ½[1-10]
VISIBLE_111 = tuple(g for g in crystals.INTERFACE_NORMALS if g[0] != g[1])  # g·b = ±1
INVISIBLE_111 = tuple(g for g in crystals.INTERFACE_NORMALS if g[0] == g[1])  # g·b = 0
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def rng_for(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def g_dot_b(hkl) -> float:
    """g·b for b = ½[1-10] (dimensionless: G·b with G = hkl/a, b in units of a)."""
    return float(np.dot(hkl, BURGERS_HKL2)) / 2.0


def _pick(u: float, n: int) -> int:
    return min(int(u * n), n - 1)


def class_of_configuration(index: int, class_weights) -> int:
    """Deterministic, balanced class sequence: a golden-ratio (low-discrepancy) walk over the weights.

    Any prefix of the sequence holds each class in proportion to its weight within a couple of
    configurations, without depending on the total number of configurations.
    """
    cumulative = np.cumsum(class_weights) / np.sum(class_weights)
    u = ((index + 1) * _GOLDEN) % 1.0
    return int(min(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1))


@dataclass(frozen=True)
class ConfigurationPlan:
    """The choices that define one crystal configuration (shared by all of its orientations)."""

    index: int
    label: int  # index into CLASSES
    element: str
    size: str
    surface_energy_ratio: float
    interface_normal: tuple[int, int, int] | None
    truncation_fraction: float | None
    position_mode: str  # "CD", "RPD", or "none" (defect-free)
    reflection_hkl: tuple[int, int, int]

    @property
    def kind(self) -> str:
        return CLASSES[self.label]

    @property
    def invisible(self) -> bool:
        return self.label != 0 and g_dot_b(self.reflection_hkl) == 0.0


def plan_configuration(cfg: SimulationConfig, seed: int, index: int) -> ConfigurationPlan:
    """Draw configuration ``index``'s plan (cheap: no atoms)."""
    # A fixed block of uniforms, mapped onto the choices: changing one option does not reshuffle the others.
    u = rng_for(seed, STREAM_PLAN, index).random(8)
    label = class_of_configuration(index, cfg.class_weights)
    element = cfg.elements[_pick(u[0], len(cfg.elements))]
    size = cfg.sizes[_pick(u[1], len(cfg.sizes))]
    lo, hi = cfg.surface_energy_ratio_range
    ratio = float(lo + u[2] * (hi - lo))
    normal = crystals.INTERFACE_NORMALS[_pick(u[3], len(crystals.INTERFACE_NORMALS))]
    lo, hi = cfg.truncation_range
    truncation = float(lo + u[4] * (hi - lo))
    cd = bool(u[5] < cfg.cd_fraction)
    invisible = bool(u[6] < cfg.invisible_fraction)
    family = INVISIBLE_111 if (invisible and label != 0) else VISIBLE_111
    reflection = family[_pick(u[7], len(family))]
    return ConfigurationPlan(
        index=int(index), label=label, element=element, size=size, surface_energy_ratio=ratio,
        interface_normal=normal if cfg.truncate else None, truncation_fraction=truncation if cfg.truncate else None,
        position_mode="none" if label == 0 else ("CD" if cd else "RPD"), reflection_hkl=tuple(int(v) for v in reflection),
    )


@dataclass(frozen=True, eq=False)
class BuiltConfiguration:
    plan: ConfigurationPlan
    crystal: crystals.Crystal
    dislocation: dislocations.Dislocation | None
    g_inv_angstrom_cryst: np.ndarray
    atoms: ScatteringAtoms
    label: int = -1  # what the crystal is (a dislocation that left makes it defect_free); -1: the plan's
    relaxation: object | None = None  # ``relax_simulator.RelaxedAtoms`` of a relaxed configuration (or twin)
    strain: dict = field(default_factory=dict)  # ``strain.strain_field`` record

    @property
    def final_label(self) -> int:
        return self.plan.label if self.label < 0 else self.label


def is_relaxed(cfg: SimulationConfig, seed: int, index: int) -> bool:
    """Whether configuration ``index`` is built from its relaxation (stream 4: independent of everything else)."""
    return cfg.relaxed_fraction > 0.0 and bool(rng_for(seed, STREAM_RELAXED, index).random() < cfg.relaxed_fraction)


def build_configuration(cfg: SimulationConfig, seed: int, plan: ConfigurationPlan,
                        relaxed: bool | None = None) -> BuiltConfiguration:
    """Atoms, dislocation and displacement field of a planned configuration.

    ``relaxed``: None as drawn (``is_relaxed``), True/False to force it. A relaxed configuration comes from
    its cached relaxation (``relax_simulator``; ``cfg.relaxed_twin``: its unrelaxed twin) at the potential's
    lattice constant; the others are built as in version 1 (room-temperature a, Volterra field).
    """
    relaxed = is_relaxed(cfg, seed, plan.index) if relaxed is None else bool(relaxed)
    relaxation, label = None, plan.label
    if relaxed:
        from defectscope.training import relax_simulator  # LAMMPS only where relaxation is asked for

        relaxation = relax_simulator.relaxed_atoms(cfg, seed, plan, twin=cfg.relaxed_twin)
        crystal, dislocation, u = relaxation.crystal, relaxation.dislocation, relaxation.displacement_angstrom
        label = relax_simulator.label_after_relaxation(plan.label, relaxation.record)
    else:
        crystal = crystals.build_crystal(plan.element, crystals.SIZES[plan.size], plan.surface_energy_ratio,
                                         plan.interface_normal, plan.truncation_fraction)
        dislocation = None
        if plan.label != 0:
            position = dislocations.draw_position_angstrom(crystal, plan.kind, plan.position_mode,
                                                           rng_for(seed, STREAM_POSITION, plan.index),
                                                           cfg.cd_radius_fraction, cfg.rpd_radius_fraction)
            dislocation = dislocations.make_dislocation(plan.kind, crystal.element.lattice_a_angstrom,
                                                        crystal.element.poisson_ratio, position)
        u = dislocations.displacement_angstrom(crystal.positions_angstrom, dislocation)
    g = reciprocal_vector_inv_angstrom_cryst(plan.reflection_hkl, crystal.element.lattice_a_angstrom)
    added, strain_record = strain.strain_field(crystal.positions_angstrom, g,
                                               strain.draw_strain(rng_for(seed, STREAM_STRAIN, plan.index), cfg),
                                               plan.interface_normal, crystal.element.poisson_ratio)
    if strain_record["interface_strain"] or strain_record["smooth_strain"]:
        u = u + added
    return BuiltConfiguration(plan, crystal, dislocation, g, scattering_atoms(crystal.positions_angstrom, u, g),
                              label, relaxation, strain_record)


@dataclass(eq=False)
class ConfigurationResult:
    """The patterns of one configuration: counts, masks, and one row of parameters per pattern."""

    index: int
    counts: np.ndarray  # (n_orientations, *shape) uint32, canonical frame
    mask: np.ndarray  # (n_orientations, *shape) bool, True = no valid measurement
    params: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_orientations, ...) array
    intensity: np.ndarray | None = None  # noiseless |A|², only when asked for (figures, tests)
    chunks: list | None = None  # HDF5-encoded counts and mask per pattern (``dataset.encode_chunks``)


def orientation_grid(built: BuiltConfiguration, draw: sampling.OrientationDraw, shape) -> tuple[ReciprocalGrid, np.ndarray]:
    """The q grid of one pattern and the crystal's extent along its canonical axes (Å)."""
    frame = canonical_axes(built.g_inv_angstrom_cryst, draw.rotation_about_q_rad)
    extent = sampling.canonical_extent_angstrom(frame, built.atoms.displaced_angstrom)
    dq = sampling.voxel_size_for_oversampling(draw.oversampling_target, extent)
    return ReciprocalGrid(frame, dq, np.asarray(draw.subpixel_shift_voxels), tuple(shape)), extent


def simulate_configuration(cfg: SimulationConfig, seed: int, index: int, n_orientations: int | None = None,
                           nthreads: int = 1, keep_intensity: bool = False, relaxed: bool | None = None) -> ConfigurationResult:
    """All patterns of configuration ``index``; a pure function of (cfg, seed, index, n_orientations, relaxed)."""
    n_orientations = cfg.orientations_per_configuration if n_orientations is None else int(n_orientations)
    built = build_configuration(cfg, seed, plan_configuration(cfg, seed, index), relaxed=relaxed)
    shape = cfg.shape
    nufft = NufftAmplitude(shape, eps=cfg.nufft_eps, nthreads=nthreads)
    counts = np.empty((n_orientations, *shape), dtype=np.uint32)
    mask = np.empty((n_orientations, *shape), dtype=bool)
    kept = np.empty((n_orientations, *shape), dtype=np.float64) if keep_intensity else None
    rows = []
    for o in range(n_orientations):
        draw_rng, noise_rng, mask_rng, nuisance_rng, scan_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(
            int(seed), spawn_key=(STREAM_ORIENTATION, index, o)).spawn(5))
        draw = sampling.draw_orientation(draw_rng, cfg, shape)
        nuisances = detector.draw_nuisances(nuisance_rng, cfg, shape)
        scan = detector_frame.draw_detector_frame(scan_rng, cfg)
        grid, extent = orientation_grid(built, draw, shape)
        pattern, grid, scan_record = _pattern(cfg, built, grid, extent, scan, nufft, nthreads)
        measured = detector.blur(pattern, nuisances, extent, grid.dq_inv_angstrom_cryst)
        counts[o] = sampling.counting_noise(measured, draw.peak_counts_target, draw.background_counts_per_voxel, noise_rng,
                                            extra_counts=detector.alien_counts(shape, nuisances, draw.peak_counts_target))
        detector.apply_detector_defects(counts[o], nuisances)
        mask[o] = sampling.gap_mask(shape, draw) | sampling.random_voxel_mask(shape, draw.masked_voxel_fraction, mask_rng)
        if nuisances.defects_masked:
            mask[o] |= detector.defect_mask(shape, nuisances)
        counts[o][mask[o]] = 0  # a masked voxel holds no measurement; the mask says so
        if kept is not None:
            kept[o] = pattern
        rows.append({**_parameters(built, draw, grid, extent, o, float(pattern.max()), int(mask[o].sum())),
                     **detector.parameters(nuisances, extent), **scan_record})
    params = {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
    return ConfigurationResult(int(index), counts, mask, params, kept)


def _pattern(cfg: SimulationConfig, built: BuiltConfiguration, grid: ReciprocalGrid, extent, scan, nufft, nthreads: int):
    """|A|² on ``grid``, or as ``scan``'s rocking scan measures and the orthonormaliser grids it (then the grid
    carries where the peak landed); and the detector-frame record."""
    if not scan.on:
        return intensity(nufft(built.atoms, grid)), grid, detector_frame.OFF_RECORD
    sampled = detector_frame.sample_pattern(built.atoms, grid, extent, scan, built.crystal.element.lattice_a_angstrom,
                                            built.plan.reflection_hkl, cfg.nufft_eps, nthreads)
    landed = ReciprocalGrid(grid.frame_axes, grid.dq_inv_angstrom_cryst, sampled.shift_voxels, grid.shape)
    return sampled.intensity, landed, sampled.record


def _parameters(built: BuiltConfiguration, draw: sampling.OrientationDraw, grid: ReciprocalGrid, extent, orientation: int,
                peak_intensity: float, n_masked: int) -> dict:
    """One pattern's physical parameters, named as stored in the dataset (``dataset.PARAMETERS``)."""
    plan, crystal, d = built.plan, built.crystal, built.dislocation
    centre = crystal.centre_angstrom
    from defectscope.training.relax_simulator import parameters as relaxation_parameters

    return {
        **relaxation_parameters(built.relaxation, built.g_inv_angstrom_cryst),
        **built.strain,
        "configuration_index": plan.index,
        "orientation_index": orientation,
        "label": built.final_label,
        "label_inserted": plan.label,
        "element": plan.element,
        "size": plan.size,
        "n_unit_cells": crystal.n_unit_cells,
        "lattice_a_angstrom": crystal.element.lattice_a_angstrom,
        "poisson_ratio": crystal.element.poisson_ratio,
        "surface_energy_ratio": plan.surface_energy_ratio,
        "interface_normal": plan.interface_normal or (0, 0, 0),
        "truncation_fraction": plan.truncation_fraction if plan.truncation_fraction is not None else 1.0,
        "n_atoms": crystal.n_atoms,
        "position_mode": plan.position_mode,
        "burgers_vector_angstrom": d.burgers_vector_angstrom if d is not None else np.zeros(3),
        "line_direction": d.line_direction if d is not None else np.zeros(3),
        "dislocation_position_angstrom": (d.position_angstrom - centre) if d is not None else np.zeros(3),
        "dislocation_offset_angstrom": dislocations.perpendicular_offset_angstrom(centre, d) if d is not None else np.nan,
        "reflection_hkl": plan.reflection_hkl,
        "g_dot_b": g_dot_b(plan.reflection_hkl),
        "invisible": plan.invisible,
        "rotation_about_q_rad": draw.rotation_about_q_rad,
        "frame_axes": grid.frame_axes,
        "voxel_size_inv_angstrom": np.full(3, float(to_inv_angstrom_2pi(grid.dq_inv_angstrom_cryst))),
        "oversampling": sampling.oversampling_per_axis(grid.dq_inv_angstrom_cryst, extent),
        "oversampling_target": draw.oversampling_target,
        "crystal_extent_angstrom": extent,
        "subpixel_shift_voxels": np.asarray(grid.shift_voxels, dtype=float),
        "peak_counts_target": draw.peak_counts_target,
        "background_counts_per_voxel": draw.background_counts_per_voxel,
        "peak_intensity_kinematic": peak_intensity,
        "n_gap_stripes": len(draw.gap_axes),
        "masked_voxel_fraction": draw.masked_voxel_fraction,
        "n_masked_voxels": n_masked,
    }
