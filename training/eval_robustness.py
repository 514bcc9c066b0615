"""Robustness of a model to transforms of the raw counts about the peak, after the paper's supplementary
Fig. 14: rotations about a random axis (Q tilted off axis 0, as a wrong ``q_direction`` would) and, as a
control, about Q itself; zooms (voxel size / f, oversampling x f). Each transformed map is prepared and
classified through the serving path (``evaluate``'s scorer)."""

from __future__ import annotations

import numpy as np
from defectscope.training.data import progress_bar
from defectscope.training.eval_metrics import collapse_two_class, round6

ROTATION_ANGLES_DEG = (0, 5, 10, 20, 30, 45, 90, 180)
ZOOM_FACTORS = (0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0)


def rotation_matrix(axis, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s, C = np.cos(angle_rad), np.sin(angle_rad), 1 - np.cos(angle_rad)
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


def transform_about(volume: np.ndarray, mask, matrix: np.ndarray, centre) -> tuple[np.ndarray, np.ndarray | None]:
    """Output voxel o holds the input at centre + M^-1 (o - centre): M a rotation or a zoom (f * identity).

    Linear interpolation of the counts (masked voxels zeroed first), nearest for the mask; the shape is kept.
    """
    from scipy.ndimage import affine_transform

    inverse = np.linalg.inv(matrix)
    centre = np.asarray(centre, dtype=np.float64)
    offset = centre - inverse @ centre
    work = np.asarray(volume, dtype=np.float32)
    if mask is not None:
        work = np.where(mask != 0, 0.0, work).astype(np.float32)
    out = affine_transform(work, inverse, offset=offset, order=1, mode="constant", cval=0.0)
    out_mask = None
    if mask is not None and np.any(mask):
        out_mask = affine_transform(np.asarray(mask, dtype=np.uint8), inverse, offset=offset, order=0, mode="constant", cval=0)
    return np.maximum(out, 0.0), out_mask


def _robust_subset(meta, tags, files, labels_space_n: int, n: int, seed: int) -> list[int]:
    """Indices into ``tags`` (prepared maps in the canonical frame), class-balanced, seeded."""
    rng = np.random.default_rng([seed, 14])
    canonical = [not files[meta[t][0]].frame(meta[t][1]) for t in tags]
    by_class = [[k for k, t in enumerate(tags) if meta[t][2] == c and canonical[k]] for c in range(labels_space_n)]
    chosen = []
    per = max(1, n // max(1, sum(1 for b in by_class if b)))
    for members in by_class:
        if members:
            chosen += [members[j] for j in rng.permutation(len(members))[:per]]
    return sorted(chosen)[:n]


def robustness(scorer, files, meta, tags, reports, label_space, collapse_model, n, seed, angles, zooms, progress):
    """Accuracy on ``n`` class-balanced maps of the split per rotation angle (random axis, about Q) and zoom
    factor, with the oversampling ``prepare`` estimated before and after its resampling."""
    subset = _robust_subset(meta, tags, files, len(label_space), n, seed)
    rng = np.random.default_rng([seed, 1414])
    # One random axis per (map, angle), drawn up front so each curve is reproducible on its own.
    axes = rng.normal(size=(len(subset), len(angles), 3))
    about_q_sign = rng.choice([-1.0, 1.0], size=(len(subset), len(angles)))
    cases = []
    for s, k in enumerate(subset):
        for a, angle in enumerate(angles):
            cases.append(("random_axis", a, s, k, rotation_matrix(axes[s, a], np.radians(angle))))
            cases.append(("about_q", a, s, k, rotation_matrix([1.0, 0, 0], about_q_sign[s, a] * np.radians(angle))))
        for z, factor in enumerate(zooms):
            cases.append(("zoom", z, s, k, np.eye(3) * factor))

    def items():
        bar = progress_bar(len(cases), "robustness", progress)
        for c, (_, _, _, k, matrix) in enumerate(cases):
            f_index, i, _, _ = meta[tags[k]]
            volume, mask = files[f_index].read(i)
            bar.update(1)
            out, out_mask = transform_about(volume, mask, matrix, reports[k]["peak_centre"])
            yield out, out_mask, {}, c
        bar.close()

    probs, done, rep, refused = scorer.run(items())
    if collapse_model:
        probs, _ = collapse_two_class(probs, np.zeros(len(probs), np.int64), scorer.predictor.classes)
    predicted = probs.argmax(axis=1)
    result = {"maps": len(subset), "seed": seed, "refused": refused, "interpolation": "linear (mask: nearest)",
              "rotation": {"angles_deg": list(angles)}, "zoom": {"factors": list(zooms)}}
    series = {("random_axis", a): [] for a in range(len(angles))}
    series.update({("about_q", a): [] for a in range(len(angles))})
    series.update({("zoom", z): [] for z in range(len(zooms))})
    oversampling = {z: ([], []) for z in range(len(zooms))}
    for j, c in enumerate(done):
        kind, pos, _, k, _ = cases[c]
        series[(kind, pos)].append(predicted[j] == meta[tags[k]][2])
        if kind == "zoom":
            oversampling[pos][0].append(rep[j]["oversampling"])
            oversampling[pos][1].append(rep[j]["oversampling_after"])
    for kind in ("random_axis", "about_q"):
        result["rotation"][kind] = {
            "accuracy": [round6(np.mean(series[(kind, a)])) if series[(kind, a)] else None for a in range(len(angles))],
            "n": [len(series[(kind, a)]) for a in range(len(angles))]}
    result["zoom"].update({
        "accuracy": [round6(np.mean(series[("zoom", z)])) if series[("zoom", z)] else None for z in range(len(zooms))],
        "n": [len(series[("zoom", z)]) for z in range(len(zooms))],
        "oversampling_estimated_median": [round6(np.median(oversampling[z][0])) if oversampling[z][0] else None for z in range(len(zooms))],
        "oversampling_after_resampling_median": [round6(np.median(oversampling[z][1])) if oversampling[z][1] else None for z in range(len(zooms))],
    })
    return result
