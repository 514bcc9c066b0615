"""The EAM potential of Zhou, Johnson & Wadley, Phys. Rev. B 69, 144113 (2004), written as a single-element
setfl file (``pair_style eam/alloy``) from the published functional forms and parameters (``ZHOU_2004``;
the same numbers as LAMMPS's ``tools/eam_database``, including its correction of Pt's ρn = 0.25 ρe,
without which Pt's embedding function jumps by 2.6 eV at ρn)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from defectscope.errors import BadMessage


@dataclass(frozen=True)
class ZhouParameters:
    """One element of ZJW 2004 (their Table III, names as in the paper)."""

    re: float  # equilibrium nearest-neighbour distance, Å
    fe: float
    rho_e: float
    rho_s: float
    alpha: float
    beta: float
    A: float  # eV
    B: float  # eV
    kappa: float
    lam: float
    F_n: tuple[float, float, float, float]  # F_n0..F_n3: ρ < ρn
    F_m: tuple[float, float, float, float]  # F_0..F_3: ρn ≤ ρ < ρ0
    eta: float
    F_e: float  # ρ ≥ ρ0
    atomic_number: int
    mass_amu: float
    rho_n_fraction: float = 0.85  # ρn = 0.85 ρe, ρ0 = 1.15 ρe in the paper
    rho_0_fraction: float = 1.15

    @property
    def lattice_a_angstrom(self) -> float:
        return math.sqrt(2.0) * self.re


ZHOU_2004: dict[str, ZhouParameters] = {
    "Au": ZhouParameters(2.885034, 1.529021, 19.991632, 19.991509, 9.516052, 5.075228, 0.229762, 0.356666,
                         0.356570, 0.748798, (-2.937772, -0.500288, 1.601954, -0.835530),
                         (-2.98, 0.0, 1.706587, -1.134778), 1.021095, -2.978815, 79, 196.96654),
    "Ag": ZhouParameters(2.891814, 1.106232, 14.604100, 14.604144, 9.132010, 4.870405, 0.277758, 0.419611,
                         0.339710, 0.750758, (-1.729364, -0.255882, 0.912050, -0.561432),
                         (-1.75, 0.0, 0.744561, -1.150650), 0.783924, -1.748423, 47, 107.8682),
    "Pt": ZhouParameters(2.771916, 2.336509, 33.367564, 35.205357, 7.105782, 3.789750, 0.556398, 0.696037,
                         0.385255, 0.770510, (-1.455568, -2.149952, 0.528491, 1.222875),
                         (-4.17, 0.0, 3.010561, -2.420128), 1.450000, -4.145597, 78, 195.08,
                         rho_n_fraction=0.25),
    "Al": ZhouParameters(2.863924, 1.403115, 20.418205, 23.195740, 6.613165, 3.527021, 0.314873, 0.365551,
                         0.379846, 0.759692, (-2.807602, -0.301435, 1.258562, -1.247604),
                         (-2.83, 0.0, 0.622245, -2.488244), 0.785902, -2.824528, 13, 26.981539),
}


def zhou_density(p: ZhouParameters, r: np.ndarray) -> np.ndarray:
    """f(r) = fe exp[-β(r/re - 1)] / (1 + (r/re - λ)^20)."""
    x = np.asarray(r, dtype=float) / p.re
    return p.fe * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20)


def zhou_pair(p: ZhouParameters, r: np.ndarray) -> np.ndarray:
    """φ(r) = A exp[-α(r/re - 1)] / (1 + (r/re - κ)^20) - B exp[-β(r/re - 1)] / (1 + (r/re - λ)^20), eV."""
    x = np.asarray(r, dtype=float) / p.re
    return (p.A * np.exp(-p.alpha * (x - 1.0)) / (1.0 + (x - p.kappa) ** 20)
            - p.B * np.exp(-p.beta * (x - 1.0)) / (1.0 + (x - p.lam) ** 20))


def zhou_embedding(p: ZhouParameters, rho: np.ndarray) -> np.ndarray:
    """F(ρ): cubic in ρ/ρn - 1 below ρn, cubic in ρ/ρe - 1 up to ρ0, F_e (1 - η ln y) y^η (y = ρ/ρs) above."""
    rho = np.asarray(rho, dtype=float)
    rho_n, rho_0 = p.rho_n_fraction * p.rho_e, p.rho_0_fraction * p.rho_e
    low = rho / rho_n - 1.0
    mid = rho / p.rho_e - 1.0
    y = np.maximum(rho, 1e-300) / p.rho_s
    f_low = sum(c * low**k for k, c in enumerate(p.F_n))
    f_mid = sum(c * mid**k for k, c in enumerate(p.F_m))
    f_high = p.F_e * (1.0 - p.eta * np.log(y)) * y**p.eta
    return np.where(rho < rho_n, f_low, np.where(rho < rho_0, f_mid, f_high))


def zhou_setfl_text(symbol: str, n_r: int = 2000, n_rho: int = 2000) -> str:
    """A single-element DYNAMO setfl file (``pair_style eam/alloy``); byte-identical for the same inputs.

    Tables as in Zhou's generator: r from 0 to √5 re (beyond the fifth neighbours, where the (·)^20 cutoffs
    have taken φ and f below 1e-6 of their values at re), r clamped at 0.5 Å to avoid the repulsive
    blow-up at 0; ρ from 0 to max(f(0.5 Å), 2ρe, 100).
    """
    p = zhou_parameters(symbol)
    cutoff = math.sqrt(5.0) * p.re
    r = np.linspace(0.0, cutoff, n_r)
    r_eval = np.maximum(r, 0.5)
    density = zhou_density(p, r_eval)
    rho_max = max(float(density.max()), 2.0 * p.rho_e, 100.0)
    rho = np.linspace(0.0, rho_max, n_rho)
    embedding = zhou_embedding(p, rho)
    r_phi = r_eval * zhou_pair(p, r_eval)
    lines = [
        f"Zhou, Johnson, Wadley, Phys. Rev. B 69, 144113 (2004): {symbol}",
        "written by defectscope.training.potentials from the published functional forms and parameters",
        "units metal: r in angstrom, energies in eV",
        f"1 {symbol}",
        f"{n_rho} {rho[1] - rho[0]:.16e} {n_r} {r[1] - r[0]:.16e} {cutoff:.16e}",
        f"{p.atomic_number} {p.mass_amu:.6f} {p.lattice_a_angstrom:.6f} fcc",
    ]
    for table in (embedding, density, r_phi):
        for start in range(0, len(table), 5):
            lines.append(" ".join(f"{v:.16e}" for v in table[start:start + 5]))
    return "\n".join(lines) + "\n"


def zhou_parameters(symbol: str) -> ZhouParameters:
    try:
        return ZHOU_2004[symbol]
    except KeyError:
        raise BadMessage(f"no Zhou 2004 parameters for {symbol!r}; known: {sorted(ZHOU_2004)}") from None
