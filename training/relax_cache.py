"""The cache of relaxed configurations: ``<cache_dir>/relaxed-<key>.npz``.

``key`` hashes the configuration, the potential file's bytes, the stopping rule and ``RELAX_VERSION``. The
reflection, orientations and the seed are not in it, so every pattern made from one crystal reuses one
relaxation. Files are written whole (temporary name, then rename) and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectscope.training import potentials
from defectscope.training.relax_config import CrystalConfiguration, RelaxationConfig

RELAX_VERSION = 1  # bump when the procedure changes what a cached file holds


def cache_key(conf: CrystalConfiguration, potential: potentials.Potential, relax_cfg: RelaxationConfig) -> str:
    content = {k: v for k, v in conf.to_dict().items() if k != "index"}
    text = json.dumps({"configuration": content, "potential_sha256": potential.sha256,
                       "stopping_rule": relax_cfg.stopping_rule(), "relax_version": RELAX_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass(frozen=True, eq=False)
class RelaxedConfiguration:
    configuration: CrystalConfiguration
    lattice_a_angstrom: float  # the potential's: ideal sites are sites_half_a · a / 2
    sites_half_a: np.ndarray  # (n, 3) int
    displacement_angstrom: np.ndarray  # (n, 3): relaxed - ideal (Volterra field + relaxation)
    cna: np.ndarray  # (n,) LAMMPS cna/atom of the relaxed crystal: 1 fcc, 2 hcp, 3 bcc, 4 ico, 0/5 other
    record: dict
    from_cache: bool

    @property
    def ideal_positions_angstrom(self) -> np.ndarray:
        return self.sites_half_a * (self.lattice_a_angstrom / 2.0)

    @property
    def relaxed_positions_angstrom(self) -> np.ndarray:
        return self.ideal_positions_angstrom + self.displacement_angstrom


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"relaxed-{key}.npz"


def save(path: Path, sites: np.ndarray, displacement: np.ndarray, cna: np.ndarray, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, sites_half_a=sites.astype(np.int16), displacement_angstrom=displacement.astype(np.float32),
                                cna=cna.astype(np.int8),
                                record=np.array(json.dumps(record, sort_keys=True)))
        os.replace(tmp, path)  # a killed run leaves a *.partial, never a truncated .npz
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(conf: CrystalConfiguration, cache_dir, relax_cfg: RelaxationConfig | None = None,
                potential_cache_dir=None) -> RelaxedConfiguration | None:
    """The cached relaxation of ``conf``, or None when there is none."""
    relax_cfg = relax_cfg or RelaxationConfig()
    potential = potentials.get_potential(relax_cfg.potential_name(conf.element), potential_cache_dir or cache_dir)
    path = cache_path(cache_dir, cache_key(conf, potential, relax_cfg))
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        record = json.loads(str(z["record"][()]))
        sites = z["sites_half_a"].astype(np.int32)
        displacement = z["displacement_angstrom"].astype(np.float64)
        cna = z["cna"].astype(np.int8)
    return RelaxedConfiguration(conf, record["lattice_a_angstrom"], sites, displacement, cna, record, from_cache=True)
