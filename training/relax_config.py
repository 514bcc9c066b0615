"""What decides one relaxation: the crystal (``CrystalConfiguration``) and the stopping rule and potentials
(``RelaxationConfig``), and how the simulator's configurations become crystals to relax.

A configuration holds the shape parameters and, for a defective crystal, its kind and line position in units
of the lattice parameter, so it is independent of the lattice constant it is built at (``ideal_sites_half_a``,
``dislocation_at``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from defectscope.errors import BadMessage
from defectscope.training import crystals, dislocations, potentials
from defectscope.training.sim_config import CLASSES, SimulationConfig

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RelaxationConfig:
    """The stopping rule and the potentials: everything that decides a relaxation besides the crystal."""

    schema_version: int = SCHEMA_VERSION
    potentials: tuple[tuple[str, str], ...] = tuple(sorted(potentials.CHOSEN.items()))  # (element, name)
    min_style: str = "cg"
    energy_tolerance: float = 1e-6  # the paper's; relative change of the energy between iterations
    force_tolerance_ev_per_angstrom: float = 0.0  # 0: energy criterion only
    max_iterations: int = 2000
    max_evaluations: int = 20000
    vacuum_angstrom: float = 10.0  # initial box margin; 'm' boundaries grow it if atoms move out

    def __post_init__(self):
        pots = self.potentials.items() if isinstance(self.potentials, dict) else self.potentials
        object.__setattr__(self, "potentials", tuple(sorted((str(e), str(n)) for e, n in pots)))
        _check(self.schema_version == SCHEMA_VERSION, f"relaxation config schema_version must be {SCHEMA_VERSION}")
        for element, name in self.potentials:
            _check(name in potentials.CANDIDATES.get(element, ()), f"potential {name!r} is not a candidate for {element!r}")
        _check(self.min_style in ("cg", "sd", "fire", "quickmin"), f"min_style {self.min_style!r} not allowed")
        _check(0.0 <= self.energy_tolerance < 1e-2, "energy_tolerance must lie in [0, 1e-2)")
        _check(0.0 <= self.force_tolerance_ev_per_angstrom < 1.0, "force_tolerance_ev_per_angstrom must lie in [0, 1)")
        _check(self.energy_tolerance > 0 or self.force_tolerance_ev_per_angstrom > 0, "one tolerance must be > 0")
        _check(1 <= int(self.max_iterations) <= 10**6 and 1 <= int(self.max_evaluations) <= 10**7,
               "max_iterations / max_evaluations out of range")
        _check(1.0 <= self.vacuum_angstrom <= 100.0, "vacuum_angstrom must lie in [1, 100]")

    def potential_name(self, element: str) -> str:
        names = dict(self.potentials)
        if element not in names:
            raise BadMessage(f"no potential configured for {element!r}")
        return names[element]

    def stopping_rule(self) -> dict:
        return {"min_style": self.min_style, "energy_tolerance": self.energy_tolerance,
                "force_tolerance_ev_per_angstrom": self.force_tolerance_ev_per_angstrom,
                "max_iterations": int(self.max_iterations), "max_evaluations": int(self.max_evaluations),
                "vacuum_angstrom": self.vacuum_angstrom}

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "potentials": dict(self.potentials)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RelaxationConfig:
        d = json.loads(text)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadMessage(f"relaxation config has unknown options {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class CrystalConfiguration:
    """What defines one crystal's atoms, independent of the lattice constant it is built at."""

    element: str
    n_unit_cells: int
    surface_energy_ratio: float
    interface_normal: tuple[int, int, int] | None
    truncation_fraction: float | None
    kind: str = "defect_free"  # CLASSES
    position_mode: str = "none"  # none, CD, RPD
    dislocation_position_a: tuple[float, float, float] | None = None  # a point of the line, units of a
    index: int | None = None  # the simulator's configuration index: informative, not part of the key

    def __post_init__(self):
        _check(self.kind in CLASSES, f"kind must be one of {CLASSES}")
        _check((self.kind == "defect_free") == (self.dislocation_position_a is None),
               "a dislocation position is given exactly when the kind is screw or edge")
        if self.interface_normal is not None:
            object.__setattr__(self, "interface_normal", tuple(int(v) for v in self.interface_normal))
        if self.dislocation_position_a is not None:
            object.__setattr__(self, "dislocation_position_a", tuple(float(v) for v in self.dislocation_position_a))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("interface_normal", "dislocation_position_a"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CrystalConfiguration:
        return cls(**d)


def configuration_from_plan(cfg: SimulationConfig, seed: int, plan) -> CrystalConfiguration:
    """The simulator's configuration ``plan`` (``simulator.plan_configuration``), with the line position the
    simulator draws for it (same random stream), expressed in lattice parameters."""
    from defectscope.training import simulator

    position_a = None
    if plan.label != 0:
        crystal = crystals.build_crystal(plan.element, crystals.SIZES[plan.size], plan.surface_energy_ratio,
                                         plan.interface_normal, plan.truncation_fraction)
        position = dislocations.draw_position_angstrom(
            crystal, plan.kind, plan.position_mode, simulator.rng_for(seed, simulator.STREAM_POSITION, plan.index),
            cfg.cd_radius_fraction, cfg.rpd_radius_fraction)
        position_a = tuple(float(v) for v in position / crystal.element.lattice_a_angstrom)
    return CrystalConfiguration(plan.element, crystals.SIZES[plan.size], plan.surface_energy_ratio, plan.interface_normal,
                                plan.truncation_fraction, plan.kind, plan.position_mode, position_a, plan.index)


def simulator_configurations(cfg: SimulationConfig, seed: int, indices) -> list[CrystalConfiguration]:
    from defectscope.training import simulator

    return [configuration_from_plan(cfg, seed, simulator.plan_configuration(cfg, seed, i)) for i in indices]


# -- atoms ----------------------------------------------------------------------------------------------
def ideal_sites_half_a(conf: CrystalConfiguration) -> np.ndarray:
    """Integer fcc sites (units of a/2) of the configuration's particle, in the simulator's atom order."""
    crystal = crystals.build_crystal(conf.element, conf.n_unit_cells, conf.surface_energy_ratio,
                                     conf.interface_normal, conf.truncation_fraction)
    return np.rint(crystal.positions_angstrom / (crystal.element.lattice_a_angstrom / 2.0)).astype(np.int32)


def dislocation_at(conf: CrystalConfiguration, lattice_a_angstrom: float) -> dislocations.Dislocation | None:
    if conf.kind == "defect_free":
        return None
    return dislocations.make_dislocation(conf.kind, lattice_a_angstrom, crystals.element(conf.element).poisson_ratio,
                                         np.asarray(conf.dislocation_position_a) * lattice_a_angstrom)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadMessage(message)
