"""Evaluation of an exported model through the serving path: ``Predictor`` + ``prepare`` on raw maps.

``evaluate_model(MODEL.onnx, DATA.h5, split="test")`` prepares every map of the split with the pipeline
config stored *in the ONNX file* and classifies it with ONNX Runtime, exactly as the server would, then
computes: accuracy; per-class precision, recall and F1; the confusion matrix (counts, and normalised per
true class); for a 3-class model its 2-class collapse (defective = screw + edge, probabilities summed);
accuracy by element, CD/RPD position, crystal size, peak-count decade and estimated oversampling; the
expected calibration error (15 confidence bins), NLL and Brier score. Maps the pipeline refuses (e.g.
LOW_SIGNAL) are counted by reason and left out of the scores.

Robustness (``robust_maps`` > 0), after the paper's supplementary Fig. 14, on a class-balanced random
subset of the split (maps in the canonical frame): the raw counts (and mask) are transformed about the peak with
``scipy.ndimage.affine_transform`` (linear interpolation; masks nearest), then prepared and classified:

- rotation by an angle about a random axis (tilts Q off axis 0 by up to that angle, as a wrong
  ``q_direction`` would) and, as a control, about Q itself (the simulator draws those: should be flat);
- zoom by a factor f about the peak (voxel size / f, oversampling x f): how far the pipeline's
  oversampling resampling and the network hold up for finer and coarser sampling.

``--plots DIR`` writes PNGs (matplotlib, Agg): confusion matrices, reliability diagram, accuracy by group,
robustness curves. Every number is in the JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from defectscope.training.calibration import expected_calibration_error
from defectscope.training.data import DEFAULT_SPLIT_FRACTIONS, label_map, open_map_file

from defectscope.errors import BadMessage, DefectscopeError

ROTATION_ANGLES_DEG = (0, 5, 10, 20, 30, 45, 90, 180)
ZOOM_FACTORS = (0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0)
TWO_CLASSES = ("defect_free", "defective")


# -- scores ---------------------------------------------------------------------------------------------
def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes) -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix (rows: true, columns: predicted)."""
    classes = list(classes)
    k = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(probabilities).argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(classes):
        tp = counts[c, c]
        support, called = counts[c].sum(), counts[:, c].sum()
        precision = tp / called if called else None
        recall = tp / support if support else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if support else None)
        per_class[name] = {"precision": _f(precision), "recall": _f(recall), "f1": _f(f1), "support": int(support)}
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    return {
        "n": int(labels.size),
        "accuracy": _f((predicted == labels).mean()) if labels.size else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "rows": "true class", "columns": "predicted class",
                             "counts": counts.tolist(), "normalised": np.round(normalised, 5).tolist()},
    }


def collapse_two_class(probabilities: np.ndarray, labels: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """3-class probabilities and labels -> (defect_free, defective): p_defective = p_screw + p_edge."""
    classes = list(classes)
    df = classes.index("defect_free")
    p = np.asarray(probabilities, dtype=np.float64)
    p2 = np.stack([p[:, df], p.sum(axis=1) - p[:, df]], axis=1)
    return p2, (np.asarray(labels) != df).astype(np.int64)


def group_accuracy(correct: np.ndarray, keys) -> dict:
    keys = np.asarray(keys, dtype=object)
    out = {}
    for key in sorted(set(keys.tolist()), key=str):
        sel = keys == key
        out[str(key)] = {"n": int(sel.sum()), "accuracy": _f(correct[sel].mean())}
    return out


def _f(x):
    return None if x is None else round(float(x), 6)


def _decade(counts: float) -> str:
    if not counts > 0:
        return "0"
    e = int(np.floor(np.log10(counts)))
    return f"1e{e}-1e{e + 1}"


def _oversampling_bin(value: float) -> str:
    lo = np.floor(value * 2) / 2
    return f"{lo:.1f}-{lo + 0.5:.1f}"


# -- transforms about the peak ----------------------------------------------------------------------------
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


# -- the evaluation ------------------------------------------------------------------------------------------
class _Scorer:
    """Prepare + predict, batched, through the serving path; remembers refusals by reason."""

    def __init__(self, predictor, batch: int = 32):
        self.predictor, self.batch = predictor, batch

    def run(self, items):
        """items: iterable of (volume, mask, frame kwargs, tag) -> (probabilities, tags, reports, refused)."""
        from defectscope.preprocessing.pipeline import prepare

        pipeline = self.predictor.pipeline
        probs, tags, reports, refused = [], [], [], {}
        xs, pending = [], []

        def flush():
            if xs:
                probs.append(self.predictor.predict(np.stack(xs)))
                tags.extend(t for t, _ in pending)
                reports.extend(r for _, r in pending)
                xs.clear()
                pending.clear()

        for volume, mask, frame, tag in items:
            try:
                prepared = prepare(volume, pipeline, mask=mask, **frame)
            except DefectscopeError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                continue
            xs.append(prepared.array)
            pending.append((tag, prepared.report))
            if len(xs) == self.batch:
                flush()
        flush()
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.predictor.classes)), np.float32)
        return p, tags, reports, refused


def evaluate_model(model_path, data_paths, *, split: str = "test", seed: int = 0,
                   split_fractions=DEFAULT_SPLIT_FRACTIONS, plots_dir=None, robust_maps: int = 0,
                   rotation_angles=ROTATION_ANGLES_DEG, zoom_factors=ZOOM_FACTORS, progress: bool = True,
                   batch: int = 32) -> dict:
    """All metrics of one model on one split of one or more data files (module docstring)."""
    from defectscope.model.predictor import Predictor

    t_start = time.perf_counter()
    predictor = Predictor(model_path, provider="cpu", warmup=False)
    classes = list(predictor.classes)
    paths = [Path(p) for p in ([data_paths] if isinstance(data_paths, (str, Path)) else data_paths)]
    files = [open_map_file(p, seed=seed, split_fractions=split_fractions) for p in paths]
    try:
        label_space, collapse_model = _label_space(files, classes)
        scorer = _Scorer(predictor, batch)
        meta = []  # (file index, map index, label in label_space, group keys) per map of the split
        for f_index, mf in enumerate(files):
            idx = mf.indices(split)
            mapping = label_map(mf.classes, label_space)
            params = mf.parameters()
            for i in idx:
                meta.append((f_index, int(i), int(mapping[mf.labels[i]]), _group_keys(params, int(i))))
        if not meta:
            raise BadMessage(f"the {split!r} split of {', '.join(str(p) for p in paths)} holds no maps")

        def stream():
            bar = _bar(len(meta), f"evaluating {split}", progress)
            for m, (f_index, i, _, _) in enumerate(meta):
                volume, mask = files[f_index].read(i)
                bar.update(1)
                yield volume, mask, files[f_index].frame(i), m
            bar.close()

        probs, tags, reports, refused = scorer.run(stream())
        labels = np.array([meta[t][2] for t in tags], dtype=np.int64)
        if collapse_model:
            probs, _ = collapse_two_class(probs, np.zeros(len(probs), np.int64), classes)
        metrics = classification_metrics(probs, labels, label_space)
        correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
        p = np.asarray(probs, dtype=np.float64)
        metrics["calibration"] = {
            **expected_calibration_error(p, labels),
            "nll": _f(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean()) if len(labels) else None,
            "brier": _f(((p - np.eye(len(label_space))[labels]) ** 2).sum(axis=1).mean()) if len(labels) else None,
        }
        if len(label_space) == 3:
            p2, l2 = collapse_two_class(probs, labels, label_space)
            metrics["two_class"] = classification_metrics(p2, l2, TWO_CLASSES)
            metrics["two_class"]["rule"] = "defective when p_screw + p_edge > p_defect_free"
        metrics["by_group"] = _by_group(correct, [meta[t][3] for t in tags], reports)
        metrics["refused"] = refused
        result = {
            "model": {**predictor.describe(), "path": str(model_path), "classes": classes},
            "data": [{"path": str(mf.path), "layout": mf.layout, "split_source": mf.split_source} for mf in files],
            "split": split, "label_space": list(label_space),
            "model_collapsed_to_data_classes": collapse_model,
            "n": metrics.pop("n"), **metrics,
        }
        if robust_maps > 0:
            result["robustness"] = _robustness(scorer, files, meta, tags, reports, label_space, collapse_model,
                                               robust_maps, seed, rotation_angles, zoom_factors, progress)
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        if plots_dir is not None:
            result["plots"] = write_plots(result, Path(plots_dir))
        return result
    finally:
        for mf in files:
            mf.close()


def _label_space(files, model_classes) -> tuple[list, bool]:
    """The classes scores are computed in: the model's, or (3-class model on 2-class labels) the data's."""
    try:
        for mf in files:
            label_map(mf.classes, model_classes)
        return list(model_classes), False
    except BadMessage:
        if len(model_classes) == 3 and all(list(mf.classes) == list(TWO_CLASSES) for mf in files):
            return list(TWO_CLASSES), True
        raise


OFFSET_BINS = (0.25, 0.5, 0.75)  # distance of the line from the centroid / half the mean crystal extent


def _offset_key(params: dict, i: int) -> str | None:
    """'screw 0.50-0.75' etc.: the dislocation's character and its distance from the centroid relative to
    half the crystal's mean extent (0 at the centre, ~1 at the surface); None for defect-free maps."""
    if not all(k in params for k in ("dislocation_offset_angstrom", "crystal_extent_angstrom", "line_direction",
                                     "burgers_vector_angstrom")):
        return None
    offset = float(params["dislocation_offset_angstrom"][i])
    b = np.asarray(params["burgers_vector_angstrom"][i], dtype=float)
    if not np.isfinite(offset) or not np.any(b):
        return None
    t = np.asarray(params["line_direction"][i], dtype=float)
    kind = "screw" if abs(t @ b) > 0.99 * np.linalg.norm(b) * np.linalg.norm(t) else "edge"
    r = offset / (0.5 * float(np.mean(params["crystal_extent_angstrom"][i])))
    edges = (0.0, *OFFSET_BINS, None)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi is None or r < hi:
            return f"{kind} {lo:.2f}-{hi:.2f}" if hi is not None else f"{kind} >{lo:.2f}"
    return None  # unreachable


def _group_keys(params: dict, i: int) -> dict:
    keys = {}
    for name in ("element", "position_mode", "size"):
        if name in params:
            v = params[name][i]
            keys[name] = v.decode() if isinstance(v, bytes) else str(v)
    offset = _offset_key(params, i)
    if offset is not None:
        keys["dislocation_offset"] = offset
    return keys


def _by_group(correct: np.ndarray, keys: list[dict], reports: list[dict]) -> dict:
    out = {}
    for name in ("element", "position_mode", "size"):
        if keys and all(name in k for k in keys):
            out[name] = group_accuracy(correct, [k[name] for k in keys])
    defective = [j for j, k in enumerate(keys) if "dislocation_offset" in k]
    if defective:  # defective maps only, by character and distance of the line from the centroid
        out["dislocation_offset"] = group_accuracy(correct[defective], [keys[j]["dislocation_offset"] for j in defective])
    if reports:
        out["peak_counts_decade"] = group_accuracy(correct, [_decade(r["peak_counts"]) for r in reports])
        out["oversampling_estimated"] = group_accuracy(correct, [_oversampling_bin(r["oversampling"]) for r in reports])
    return out


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


def _robustness(scorer, files, meta, tags, reports, label_space, collapse_model, n, seed, angles, zooms, progress):
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
        bar = _bar(len(cases), "robustness", progress)
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
            "accuracy": [_f(np.mean(series[(kind, a)])) if series[(kind, a)] else None for a in range(len(angles))],
            "n": [len(series[(kind, a)]) for a in range(len(angles))]}
    result["zoom"].update({
        "accuracy": [_f(np.mean(series[("zoom", z)])) if series[("zoom", z)] else None for z in range(len(zooms))],
        "n": [len(series[("zoom", z)]) for z in range(len(zooms))],
        "oversampling_estimated_median": [_f(np.median(oversampling[z][0])) if oversampling[z][0] else None for z in range(len(zooms))],
        "oversampling_after_resampling_median": [_f(np.median(oversampling[z][1])) if oversampling[z][1] else None for z in range(len(zooms))],
    })
    return result


def summary_metrics(metrics: dict) -> dict:
    """The part of an evaluation that goes into a model card."""
    out = {k: metrics[k] for k in ("split", "n", "accuracy", "per_class", "refused") if k in metrics}
    out["confusion_matrix_normalised"] = metrics["confusion_matrix"]["normalised"]
    if "two_class" in metrics:
        out["two_class_accuracy"] = metrics["two_class"]["accuracy"]
    out["ece"] = metrics["calibration"]["ece"]
    out["by_group"] = {g: {k: v["accuracy"] for k, v in d.items()} for g, d in metrics.get("by_group", {}).items()}
    out["data"] = [d["path"] for d in metrics.get("data", [])]
    out["evaluated_with"] = "defectscope evaluate (Predictor + prepare, the serving path)"
    return out


def _bar(total: int, desc: str, enabled: bool):
    from defectscope.training.data import _progress

    return _progress(total, desc, enabled)


# -- plots ------------------------------------------------------------------------------------------------
def write_plots(result: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    title = f"{result['model']['name']} {result['model']['version']} - {result['split']} split"

    matrices = [("", result["confusion_matrix"])]
    if "two_class" in result:
        matrices.append(("2-class collapse", result["two_class"]["confusion_matrix"]))
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.2), squeeze=False)
    for ax, (label, cm) in zip(axes[0], matrices):
        m = np.asarray(cm["normalised"])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.3f}\n({cm['counts'][r][c]})", ha="center", va="center",
                    color="white" if v > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(len(cm["classes"])), cm["classes"], rotation=20)
        ax.set_yticks(range(len(cm["classes"])), cm["classes"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label or f"accuracy {result['accuracy']:.4f}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, directory / "confusion.png", plt))

    cal = result["calibration"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    if cal["bins"]:
        conf = [b["confidence"] for b in cal["bins"]]
        acc = [b["accuracy"] for b in cal["bins"]]
        size = [20 + 200 * b["count"] / result["n"] for b in cal["bins"]]
        ax.scatter(conf, acc, s=size)
        ax.plot(conf, acc)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ece = cal["ece"]
    ax.set_title(f"reliability, ECE {ece:.4f}" if ece is not None else "reliability")
    fig.tight_layout()
    written.append(_save(fig, directory / "reliability.png", plt))

    groups = result.get("by_group", {})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.6), squeeze=False)
        for ax, (name, d) in zip(axes[0], groups.items()):
            keys = list(d)
            ax.bar(range(len(keys)), [d[k]["accuracy"] or 0 for k in keys])
            ax.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
            for j, k in enumerate(keys):
                ax.text(j, 0.02, str(d[k]["n"]), ha="center", fontsize=7, color="white")
            ax.set_ylim(0, 1)
            ax.set_title(name.replace("_", " "), fontsize=9)
        axes[0][0].set_ylabel("accuracy")
        fig.tight_layout()
        written.append(_save(fig, directory / "accuracy-by-group.png", plt))

    rob = result.get("robustness")
    if rob:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        angles = rob["rotation"]["angles_deg"]
        a.plot(angles, rob["rotation"]["random_axis"]["accuracy"], "o-", label="random axis (Q tilted)")
        a.plot(angles, rob["rotation"]["about_q"]["accuracy"], "s--", label="about Q")
        a.set_xlabel("rotation angle (deg)")
        a.set_ylabel("accuracy")
        a.set_ylim(0, 1.02)
        a.legend()
        a.set_title(f"random 3D rotations of {rob['maps']} maps")
        b.plot(rob["zoom"]["factors"], rob["zoom"]["accuracy"], "o-")
        b.set_xscale("log")
        b.set_xticks(rob["zoom"]["factors"], [f"{f:g}" for f in rob["zoom"]["factors"]])
        b.set_xlabel("zoom factor (voxel size / f, oversampling x f)")
        b.set_ylim(0, 1.02)
        b.set_title("voxel size / oversampling sweep")
        for f, acc, os_ in zip(rob["zoom"]["factors"], rob["zoom"]["accuracy"], rob["zoom"]["oversampling_estimated_median"]):
            if acc is not None and os_ is not None:
                b.annotate(f"{os_:.1f}", (f, acc), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, directory / "robustness.png", plt))
    return written


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
