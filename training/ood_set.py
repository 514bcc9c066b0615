"""Maps the models never saw, and what the served models answer on them.

    python -m defectscope.training.ood_set [--per-kind 12] [--seed 7] [--in-distribution DATA.h5]
        [--out docs/eval/ood.json]

Kinds (each built on the simulator's crystals: its defect-free plans, kinematic NUFFT sums, counting noise):

- ``two_dislocations``: a screw and an edge line, both inside the crystal (fields added);
- ``dislocation_loop``: a square Volterra loop (b = a/2[1-10]) of half the crystal's size; displacement
  u = -b Ω / 4π, Ω the solid angle of the loop (the isotropic-elastic correction left out);
- ``stacking_fault``: every atom on one side of a {111} plane through the centre shifted by an a/6<112> in
  that plane (an intrinsic fault crossing the whole crystal), plane and shift chosen visible at the map's
  reflection (g·R = ±1/3 mod 1: a fault with g·R integer leaves the pattern unchanged);
- ``strongly_strained``: a smooth quadratic + cubic field whose phase spans 8 rad (1st-99th percentile);
- ``two_grains``: the pattern plus a second crystal's, 12 voxels away along q_perp1 (two grains in one window);
- ``peak_cut``: the map zeroed beyond a plane 3 voxels from the peak (the peak on a detector edge);
- ``noise``: flat Poisson background of 5 counts per voxel, no crystal.

Each map is classified by each bundled model through ``server.core.Classifier`` as served (cross-check on).
Reported per kind and model: answers, refusals, labels, how many are ``defect_free`` with ``decision:
confident`` (must be none), and the OOD score's ROC AUC against in-distribution maps (``--in-distribution``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "eval" / "ood.json"
KINDS = ("two_dislocations", "dislocation_loop", "stacking_fault", "strongly_strained", "two_grains", "peak_cut", "noise")
SHAPE = (64, 64, 64)


def _solid_angle(points: np.ndarray, a, b, c) -> np.ndarray:
    """Signed solid angle of triangle (a, b, c) seen from each point (Van Oosterom & Strackee)."""
    r1, r2, r3 = a - points, b - points, c - points
    n1, n2, n3 = (np.linalg.norm(r, axis=1) for r in (r1, r2, r3))
    num = np.einsum("ij,ij->i", r1, np.cross(r2, r3))
    den = n1 * n2 * n3 + np.einsum("ij,ij->i", r1, r2) * n3 + np.einsum("ij,ij->i", r1, r3) * n2 \
        + np.einsum("ij,ij->i", r2, r3) * n1
    return 2.0 * np.arctan2(num, den)


def loop_displacement(positions: np.ndarray, centre, half: float, a: float) -> np.ndarray:
    """u = -b Ω / 4π of a square loop in the (111) plane through ``centre`` (half-side ``half`` Å)."""
    n = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    e1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    e2 = np.cross(n, e1)
    corners = [centre + half * (s1 * e1 + s2 * e2) for s1, s2 in ((1, 1), (-1, 1), (-1, -1), (1, -1))]
    omega = _solid_angle(positions, corners[0], corners[1], corners[2]) + _solid_angle(positions, corners[0], corners[2], corners[3])
    b = a / 2.0 * np.array([1.0, -1.0, 0.0])
    return -omega[:, None] * b[None, :] / (4 * np.pi)


def visible_fault(hkl) -> tuple[np.ndarray, np.ndarray]:
    """A {111} fault plane normal and a <112> shift in it (units of a/6) seen at reflection ``hkl``."""
    from itertools import permutations

    for normal in ((1, 1, 1), (1, -1, 1), (-1, 1, 1), (1, 1, -1)):
        for shift in sorted({p for v in ((1, 1, -2), (-1, -1, 2)) for p in permutations(v)}):
            if np.dot(normal, shift) == 0 and abs(np.dot(hkl, shift) / 6.0 % 1.0 - 0.5) < 0.3:
                return np.array(normal, float), np.array(shift, float)
    raise ValueError(f"no visible fault at {hkl}")


def displacement(kind: str, built, rng: np.random.Generator) -> np.ndarray:
    """The extra displacement field (Å) of a kind that changes the crystal."""
    from defectscope.training import dislocations, strain

    crystal = built.crystal
    pos, centre, a = crystal.positions_angstrom, crystal.centre_angstrom, crystal.element.lattice_a_angstrom
    size = float(np.ptp(pos, axis=0).max())
    if kind == "two_dislocations":
        u = np.zeros_like(pos)
        for k in ("screw", "edge"):
            where = centre + rng.uniform(-0.15, 0.15, 3) * size
            u += dislocations.displacement_angstrom(pos, dislocations.make_dislocation(k, a, crystal.element.poisson_ratio, where))
        return u
    if kind == "dislocation_loop":
        return loop_displacement(pos, centre + rng.uniform(-0.1, 0.1, 3) * size, 0.25 * size, a)
    if kind == "stacking_fault":
        normal, shift = visible_fault(built.plan.reflection_hkl)
        above = (pos - centre) @ (normal / np.linalg.norm(normal)) > rng.uniform(-0.1, 0.1) * size
        return np.where(above[:, None], a / 6.0 * shift, 0.0)
    if kind == "strongly_strained":
        field = strain.smooth_displacement_angstrom(pos, rng.normal(size=(3, len(strain._MONOMIALS))))
        return strain._scaled_to_range(field, built.g_inv_angstrom_cryst, 8.0)[0]
    return np.zeros_like(pos)


def make_map(kind: str, index: int, seed: int) -> np.ndarray:
    """One map of ``kind`` (float32 counts, 64^3, canonical frame)."""
    from defectscope.training import sampling
    from defectscope.training.diffraction import NufftAmplitude, intensity, scattering_atoms
    from defectscope.training.sim_config import SimulationConfig
    from defectscope.training.simulator import build_configuration, orientation_grid, plan_configuration

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(KINDS.index(kind), index)))
    if kind == "noise":
        return rng.poisson(5.0, SHAPE).astype(np.float32)
    cfg = SimulationConfig(class_weights=(1.0, 0.0, 0.0))
    built = build_configuration(cfg, seed, plan_configuration(cfg, seed, 1000 + index))
    u = displacement(kind, built, rng)  # the default config's defect-free crystals carry no field of their own
    atoms = scattering_atoms(built.crystal.positions_angstrom, u, built.g_inv_angstrom_cryst) if np.any(u) else built.atoms
    draw = sampling.draw_orientation(rng, cfg, SHAPE)
    grid, _ = orientation_grid(built, draw, SHAPE)
    pattern = intensity(NufftAmplitude(SHAPE)(atoms, grid))
    if kind == "two_grains":
        pattern = pattern + 0.7 * np.roll(pattern, 12, axis=1)
    counts = sampling.counting_noise(pattern, 10 ** rng.uniform(4, 6), 0.0, rng).astype(np.float32)
    if kind == "peak_cut":
        peak = np.unravel_index(int(np.argmax(counts)), counts.shape)
        counts[:, peak[1] + 3:, :] = 0.0
    return counts


def auc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an out-of-distribution map > score of an in-distribution one), ties halved."""
    inside, outside = np.asarray(inside, float), np.asarray(outside, float)
    if not inside.size or not outside.size:
        return float("nan")
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)


def answer(classifier, volume) -> dict:
    from defectscope.errors import DefectscopeError

    try:
        reply = classifier.classify_map(np.ascontiguousarray(volume), request_id="ood").reply
    except DefectscopeError as exc:
        return {"refused": exc.reason}
    return {"label": reply["label"], "decision": reply["decision"], "verdict": reply["verdict"],
            "ood_score": reply["preparation"].get("ood_score"), "warnings": [w["reason"] for w in reply["warnings"]]}


def in_distribution(path, n: int) -> list[np.ndarray]:
    from defectscope.training.map_files import open_map_file

    with open_map_file(path) as mf:
        idx = np.linspace(0, mf.n - 1, min(n, mf.n)).astype(int)
        return [mf.read(int(i))[0].astype(np.float32) for i in idx]


def summarise(rows: list[dict]) -> dict:
    answered = [r for r in rows if "label" in r]
    return {"n": len(rows), "refused": len(rows) - len(answered),
            "labels": {k: sum(r["label"] == k for r in answered) for k in sorted({r["label"] for r in answered})},
            "uncertain": sum(r["decision"] == "uncertain" for r in answered),
            "out_of_distribution_warned": sum("OUT_OF_DISTRIBUTION" in r["warnings"] for r in answered),
            "confident_defect_free": sum(r["label"] == "defect_free" and r["decision"] == "confident" for r in answered)}


def main(argv=None) -> int:
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import cross_check_for, resolve_model
    from defectscope.server.core import Classifier
    from defectscope.training.evaluate import command_line, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--in-distribution", default=None, help="simulated maps for the ROC's negatives")
    parser.add_argument("--n-in", type=int, default=300)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    maps = {k: [make_map(k, i, args.seed) for i in range(args.per_kind)] for k in KINDS}
    inside = in_distribution(args.in_distribution, args.n_in) if args.in_distribution else []
    result = {"command": command_line("defectscope.training.ood_set", argv),
              "per_kind": args.per_kind, "models": {}}
    for name in ("defectscope-3class", "defectscope-2class"):
        other = cross_check_for(name)
        classifier = Classifier(Predictor(resolve_model(name), provider="cpu"), overlap=False,
                                cross_check=Predictor(other, provider="cpu") if other else None)
        rows = {k: [answer(classifier, m) for m in v] for k, v in maps.items()}
        base = [answer(classifier, m) for m in inside]
        base_scores = [r["ood_score"] for r in base if r.get("ood_score") is not None]
        entry = {"model": classifier.predictor.describe(), "kinds": {}}
        for k, rs in rows.items():
            scores = [r["ood_score"] for r in rs if r.get("ood_score") is not None]
            entry["kinds"][k] = {**summarise(rs), "ood_auc": round(auc(base_scores, scores), 4) if base_scores else None}
        entry["in_distribution"] = summarise(base) if base else None
        entry["confident_defect_free_total"] = sum(e["confident_defect_free"] for e in entry["kinds"].values())
        result["models"][name] = entry
        print(name, json.dumps({k: (v["confident_defect_free"], v["uncertain"], v["ood_auc"]) for k, v in entry["kinds"].items()}))
    write_json(result, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
