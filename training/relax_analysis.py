"""What became of the dislocation in a relaxed crystal: interior defect atoms, the stacking-fault ribbon
between Shockley partials (hcp atoms of LAMMPS ``compute cna/atom``), its width, the state of the
dislocation and its measured line direction and character."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from defectscope.training import dislocations

CNA_NAMES = ("other", "fcc", "hcp", "bcc", "icosahedral")  # LAMMPS cna/atom values 0..4 (its "unknown" is 5)
# An atom is "interior" when its ideal site lies at least this many lattice parameters from the nearest
# surface site: a non-fcc atom there is a defect (core or fault), not a surface or edge atom.
INTERIOR_DEPTH_A = 1.5


def depth_below_surface_a(sites_half_a: np.ndarray) -> np.ndarray:
    """Distance (lattice parameters) from each ideal site to the nearest surface site (fewer than 12 neighbours)."""
    tree = cKDTree(sites_half_a)
    neighbours = tree.query_ball_point(sites_half_a, r=1.5, return_length=True) - 1  # nn at √2 half-units
    surface = sites_half_a[neighbours < 12]
    depth, _ = cKDTree(surface).query(sites_half_a)
    return depth / 2.0


def analyse_defect(sites_half_a: np.ndarray, relaxed: np.ndarray, cna: np.ndarray, a: float,
                   dislocation: dislocations.Dislocation | None) -> dict:
    """Interior defect atoms, the stacking-fault ribbon and what became of the dislocation.

    ``state``: ``dissociated`` (an interior hcp ribbon bounded by two partial cores), ``compact`` (interior
    core atoms but no ribbon: undissociated or partials closer than CNA resolves), ``one_partial_left``
    (a ribbon from an interior partial to the surface), ``fault_across`` (a ribbon from surface to surface:
    both partials left, the fault stays), ``left`` (no interior defect atoms), ``none`` (defect-free and
    nothing found). ``dislocation_left_crystal`` is true for ``fault_across`` and ``left``.
    ``stacking_fault_width_angstrom``: extent of the ribbon's hcp atoms across the line, in its plane; the
    partial cores sit just outside it, so the partial separation is this plus about one row (a√3/4 ≈ 1.7 Å
    for Au). Reported only for ``dissociated``, where both ends are partial cores.
    """
    depth = depth_below_surface_a(sites_half_a)
    interior = depth >= INTERIOR_DEPTH_A
    defect = interior & (cna != 1)
    hcp = cna == 2
    out: dict = {"interior_defect_atoms": int(defect.sum()), "interior_hcp_atoms": int((hcp & interior).sum())}
    ribbon = _largest_cluster(np.flatnonzero(hcp), relaxed, 1.2 * a / math.sqrt(2.0))
    ribbon_ok = len(ribbon) >= 6 and (interior[ribbon]).any()
    repeat = a / math.sqrt(2.0) if dislocation is None or dislocation.kind == "screw" else a * math.sqrt(6.0) / 2.0
    # A line through the interior leaves at least one non-fcc atom per two repeats along it; fewer is noise
    # (a few interior atoms disturbed by a surface step).
    chord = _chord_length_angstrom(sites_half_a[interior] * (a / 2.0), dislocation) if dislocation is not None else 0.0
    core_found = out["interior_defect_atoms"] >= max(4, 0.5 * chord / repeat)
    out["ribbon_hcp_atoms"] = len(ribbon) if ribbon_ok else 0
    out["line_chord_interior_angstrom"] = round(chord, 2)
    if ribbon_ok:
        points = relaxed[ribbon]
        centred = points - points.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        normal = vectors[:, 0]  # least spread: the fault plane's normal
        plane = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]]) / math.sqrt(3.0)
        out["ribbon_plane"] = [int(v) for v in np.rint(plane[np.argmax(np.abs(plane @ normal))] * math.sqrt(3.0))]
        t = dislocation.line_direction if dislocation is not None else vectors[:, 2]
        geometry = _ribbon_geometry(points, relaxed, normal, t, a)
        out.update(geometry)
        state = {0: "dissociated", 1: "one_partial_left", 2: "fault_across"}[sum(geometry["ribbon_ends_at_surface"])]
        if state != "dissociated":
            out.pop("stacking_fault_width_angstrom")
    elif core_found:
        state = "compact"
    else:
        state = "left" if dislocation is not None else "none"
    out["state"] = state
    out["dislocation_left_crystal"] = state in ("fault_across", "left")
    out.update(_line_character(relaxed[defect], dislocation) if state in ("dissociated", "compact") else {})
    return out


def _ribbon_geometry(ribbon: np.ndarray, relaxed: np.ndarray, normal: np.ndarray, t: np.ndarray, a: float) -> dict:
    """Width of the fault ribbon across the line and whether each of its edges is the crystal's surface.

    The ribbon is cut into slices along the line (4 repeats long). In each slice the ribbon's extent across
    the line is compared with the crystal's own extent in the fault plane: an edge within one lattice
    parameter of the crystal's is the surface (no surface atom is hcp), otherwise it is a partial core.
    Per slice, not over the whole ribbon, so a line that bows near the surfaces does not count as a fault
    that reaches them; an edge is "at the surface" in more than half of the slices.
    """
    origin = ribbon.mean(axis=0)
    t_in = t - (t @ normal) * normal
    t_in /= np.linalg.norm(t_in)
    across = np.cross(normal, t_in)
    s_r, l_r = (ribbon - origin) @ across, (ribbon - origin) @ t_in
    rel = relaxed - origin
    in_plane = np.abs(rel @ normal) < a / math.sqrt(3.0)  # the two {111} layers of the fault
    s_c, l_c = rel[in_plane] @ across, rel[in_plane] @ t_in
    step = 4.0 * a / math.sqrt(2.0)
    widths, low, high = [], [], []
    for start in np.arange(l_r.min(), l_r.max() + 1e-9, step):
        r_in = (l_r >= start) & (l_r < start + step)
        c_in = (l_c >= start) & (l_c < start + step)
        if r_in.sum() < 4 or not c_in.any():
            continue
        widths.append(s_r[r_in].max() - s_r[r_in].min())
        low.append(s_r[r_in].min() - s_c[c_in].min() < a)
        high.append(s_c[c_in].max() - s_r[r_in].max() < a)
    if not widths:
        return {"ribbon_ends_at_surface": [False, False], "stacking_fault_width_angstrom": None}
    return {"ribbon_ends_at_surface": [bool(np.mean(low) > 0.5), bool(np.mean(high) > 0.5)],
            "stacking_fault_width_angstrom": round(float(np.median(widths)), 2)}


def _largest_cluster(indices: np.ndarray, positions: np.ndarray, cutoff: float) -> np.ndarray:
    if len(indices) == 0:
        return indices
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = cKDTree(positions[indices]).query_pairs(cutoff, output_type="ndarray")
    n = len(indices)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n))
    _, labels = connected_components(graph, directed=False)
    return indices[labels == np.bincount(labels).argmax()]


def _chord_length_angstrom(interior_positions: np.ndarray, d: dislocations.Dislocation) -> float:
    """Length of the inserted line inside the interior: extent along t of interior sites within a of it."""
    rel = interior_positions - d.position_angstrom
    along = rel @ d.line_direction
    off = np.linalg.norm(rel - np.outer(along, d.line_direction), axis=1)
    near = along[off < 2.0 * np.linalg.norm(d.burgers_vector_angstrom)]
    return float(near.max() - near.min()) if len(near) > 1 else 0.0


def _line_character(core_positions: np.ndarray, d: dislocations.Dislocation | None) -> dict:
    """Line direction of the interior defect atoms (cores and fault: their principal axis) and its angle to b:
    screw below 15°, edge above 75°, mixed between."""
    if d is None or len(core_positions) < 8:
        return {}
    centred = core_positions - core_positions.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    if values[2] < 4.0 * values[1]:  # not elongated: no line direction to speak of
        return {}
    t = vectors[:, 2]
    b = d.burgers_vector_angstrom / np.linalg.norm(d.burgers_vector_angstrom)
    angle = math.degrees(math.acos(min(1.0, abs(float(t @ b)))))
    character = "screw" if angle < 15.0 else "edge" if angle > 75.0 else "mixed"
    t = t if t @ d.line_direction >= 0 else -t
    return {"line_direction_measured": [round(float(v), 4) for v in t],
            "line_angle_to_b_deg": round(angle, 1), "character_after_relaxation": character}
