"""What the shipped models get wrong on realistic data: accuracy by stratum of the simulator's parameters.

    python -m defectscope.training.realistic_eval --model model/zoo/defectscope-3class.onnx \\
        --model model/zoo/defectscope-2class.onnx --data /work/data/realistic_1x.h5 \\
        --twin /work/data/realistic_1x_twin.h5 --data /work/data/realistic_1x_nuisance.h5 \\
        --out docs/eval/realistic_1x.json

Every map is prepared by the model's own pipeline and classified by ONNX Runtime, as ``defectscope evaluate``
and the server do (``preprocessing.pipeline.prepare``, ``model.predictor.Predictor``), on every split of each
file (the shipped models were trained on other data), or of one ``--split``. Labels are what the crystal is after relaxation
(``/labels``). A 3-class model is also scored collapsed to defect-free / defective (probabilities summed).

Strata, from ``/parameters``: relaxed or not, relaxation state, element, position mode by the line's distance
from the centroid (``dislocation_offset_angstrom``), every strain field and nuisance on or off, detector-frame
sampling, peak-count decade. With ``--twin``, the same patterns of the unrelaxed twin file, paired.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OFFSET_BANDS_ANGSTROM = ((0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 1e9))


SPLITS = {"train": 0, "validation": 1, "test": 2}


def predict(model_path, data_path, batch: int = 32, split: str | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Probabilities of every map of ``data_path`` (refused maps: NaN rows), the model's classes, parameters;
    with ``split`` (train, validation, test) only that split's maps, in file order."""
    from defectscope.errors import DefectscopeError
    from defectscope.model.predictor import Predictor
    from defectscope.preprocessing.pipeline import prepare
    from defectscope.training.map_files import open_map_file

    predictor = Predictor(model_path, provider="cpu", warmup=False)
    mf = open_map_file(Path(data_path))
    try:
        chosen = np.arange(len(mf.labels)) if split is None else np.flatnonzero(mf.split == SPLITS[split])
        probs = np.full((len(chosen), len(predictor.classes)), np.nan, dtype=np.float64)
        xs, where = [], []
        for row, i in enumerate(chosen):
            volume, mask = mf.read(int(i))
            try:
                xs.append(prepare(volume, predictor.pipeline, mask=mask, **mf.frame(int(i))).array)
                where.append(row)
            except DefectscopeError:
                continue
            if len(xs) == batch:
                probs[where] = predictor.predict(np.stack(xs))
                xs, where = [], []
        if xs:
            probs[where] = predictor.predict(np.stack(xs))
        params = {k: np.asarray(v)[chosen] for k, v in mf.parameters().items()}
        params["label"] = np.asarray(mf.labels).astype(int)[chosen]  # what the crystal is (the file's /labels)
        return probs, list(predictor.classes), params
    finally:
        mf.close()


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def strata(p: dict) -> dict[str, np.ndarray]:
    """Name -> boolean selection of the patterns in that stratum."""
    n = len(p["label"])
    out = {"all": np.ones(n, bool)}
    for name, values in (("element", _text(p["element"])), ("relax_state", _text(p["relax_state"])),
                         ("position_mode", _text(p["position_mode"]))):
        for v in sorted(set(values)):
            out[f"{name}={v}"] = values == v
    out["relaxed=yes"], out["relaxed=no"] = p["relaxed"].astype(bool), ~p["relaxed"].astype(bool)
    mode, offset = _text(p["position_mode"]), p["dislocation_offset_angstrom"]
    for m in ("CD", "RPD"):
        for lo, hi in OFFSET_BANDS_ANGSTROM:
            out[f"{m} offset {lo:g}-{hi:g} A"] = (mode == m) & (offset >= lo) & (offset < hi)
    switches = {
        "interface_strain": p["interface_strain"].astype(bool), "smooth_strain": p["smooth_strain"].astype(bool),
        "partial_coherence": p["fringe_visibility"].min(axis=1) < 1.0, "psf": p["psf_sigma_voxels"] > 0,
        "hot_pixels": p["n_hot_pixels"] > 0, "dead_lines": p["n_dead_lines"] > 0, "aliens": p["n_aliens"] > 0,
        "gaps": p["n_gap_stripes"] > 0, "background": p["background_counts_per_voxel"] > 0.1,
        "detector_defects_masked": p["detector_defects_masked"].astype(bool),
    }
    if "detector_frame" in p:
        switches["detector_frame"] = p["detector_frame"].astype(bool)
    for name, on in switches.items():
        out[f"{name}=on"], out[f"{name}=off"] = on, ~on
    decade = np.floor(np.log10(p["peak_counts_target"])).astype(int)
    for d in sorted(set(decade)):
        out[f"peak_counts=1e{d}"] = decade == d
    return out


def scores(probs: np.ndarray, classes: list[str], labels: np.ndarray, select: np.ndarray) -> dict:
    """Accuracy (in the model's classes), per-class recall, and the defect-free / defective errors."""
    ok = select & np.isfinite(probs).all(axis=1)
    out = {"n": int(select.sum()), "refused": int((select & ~ok).sum())}
    if not ok.any():
        return out
    predicted = probs[ok].argmax(axis=1)
    truth = labels[ok] if len(classes) == 3 else (labels[ok] > 0).astype(int)
    out["accuracy"] = round(float((predicted == truth).mean()), 4)
    defective_called = predicted > 0
    free = truth == 0
    if free.any():
        out["defect_free_called_defective"] = round(float(defective_called[free].mean()), 4)
    if (~free).any():
        out["defective_called_defect_free"] = round(float((~defective_called[~free]).mean()), 4)
    if len(classes) == 3:
        out["recall"] = {c: round(float((predicted[truth == k] == k).mean()), 4) for k, c in enumerate(classes) if (truth == k).any()}
    return out


def evaluate_file(model_path, data_path, split: str | None = None) -> tuple[dict, np.ndarray, dict]:
    probs, classes, p = predict(model_path, data_path, split=split)
    labels = p["label"].astype(int)
    table = {name: scores(probs, classes, labels, sel) for name, sel in strata(p).items() if sel.any()}
    return table, probs, p


def paired_twin(probs: np.ndarray, twin_probs: np.ndarray, p: dict, classes: list[str]) -> dict:
    """Relaxed patterns against the same patterns of the unrelaxed twin file, per class."""
    relaxed = p["relaxed"].astype(bool)
    labels = p["label"].astype(int)
    out = {}
    for k, name in enumerate(("defect_free", "screw", "edge")):
        sel = relaxed & (labels == k)
        if sel.any():
            out[name] = {"relaxed": scores(probs, classes, labels, sel), "unrelaxed_twin": scores(twin_probs, classes, labels, sel)}
    out["all"] = {"relaxed": scores(probs, classes, labels, relaxed), "unrelaxed_twin": scores(twin_probs, classes, labels, relaxed)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m defectscope.training.realistic_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--data", action="append", required=True, help="simulated datasets (the first is paired with --twin)")
    ap.add_argument("--twin", default=None, help="the unrelaxed twin of the first --data file")
    ap.add_argument("--commands", default=None, help="JSON list of the commands that made the data (recorded)")
    ap.add_argument("--split", choices=sorted(SPLITS), default=None,
                    help="score only this split of every file (default: every map)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from defectscope.model.predictor import Predictor

    result = {"command": " ".join(["python -m defectscope.training.realistic_eval", *(argv or sys.argv[1:])]),
              "data_commands": json.loads(args.commands) if args.commands else None, "models": {}}
    for model in args.model:
        classes = list(Predictor(model, provider="cpu", warmup=False).classes)
        import hashlib

        entry = {"classes": classes, "path": str(model), "sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest(),
                 "files": {}}
        for k, data in enumerate(args.data):
            table, probs, p = evaluate_file(model, data, args.split)
            entry["files"][Path(data).name] = table
            if k == 0 and args.twin:
                twin_probs, _, twin_p = predict(model, args.twin, split=args.split)
                if not np.array_equal(twin_p["configuration_index"], p["configuration_index"]):
                    raise SystemExit(f"{args.twin} is not the twin of {data}{' ' + args.split + ' split' if args.split else ''}: "
                                     "its patterns are of other configurations")
                entry["relaxed_vs_unrelaxed_twin"] = paired_twin(probs, twin_probs, p, classes)
            print(f"{Path(model).name} {Path(data).name}: {table['all']}", flush=True)
        result["models"][Path(model).stem] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
