"""One measured crystal, one answer: the same data gridded, binned, cropped and masked differently must
give the same label and probabilities (issue: sampling-invariant preparation of measured data).

    python -m defectscope.training.invariance [--model NAME|PATH ...] [--out docs/eval/invariance.json]

For each dataset, variants of the same measurement, each prepared by the model's own pipeline and
classified by every model given (default: both bundled models):

- ``aps34idc`` (the measured 34-ID-C Au(111) raw scan): gridded by the product's orthonormaliser at 1x, 2x
  and 3x the server's voxel; cropped to 128^3 and 96^3 around the peak and to an off-centre 96^3 box;
  and the raw scan as sent to a server (which grids it itself), with its own mask and with a detector chip-gap
  mask (6-pixel rows and columns, as Maxipix / Timepix quads) added to it: through the middle of the frames
  (through the peak, the worst case) and ``GAP_OFFSET`` pixels from the peak (where a beamline's gaps are);
- ``sixs`` (the measured SixS Pt scan, detector-frame CXI with its mask): orthonormalised with the
  ``soleil-sixs`` preset and the author's angles, at 1x, 2x, 3x, the same crops;
- ``cdinn`` (the 3D-CDI-NN 64^3 counts, in the orientation of its amplitude ``.npy``): summed 1x, 2x, 3x
  per axis, cropped, with a gap plane masked;
- ``simulated`` (the demo's simulated maps, seed 2021): summed 1x, 2x, 3x, cropped.

Per dataset: the labels seen, and the largest spread of any class probability across its variants
(target: one label, spread <= 0.1); and the 2-class P(defective) against 1 - P(defect_free) of the 3-class
model (target: within 0.3). Measured data are read from ``../shared/data`` (skipped when absent).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from defectscope.model.decision import UNRELIABLE  # the warnings with which a reply says its answer is not reliable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "docs" / "eval" / "invariance.json"
FACTORS = (1, 2, 3)

# The SixS scan's geometry, from its author's bcdi scripts (../shared/data/sixs_pt_s1398/README.md).
SIXS_GEOMETRY = {"preset": "soleil-sixs", "energy_eV": 8300.0, "distance_m": 1.21, "pixel_size_m": [55e-6, 55e-6],
                 "angles": {"beta": 2.0, "mu": 0.0, "gamma": 35.3365, "delta": 11.4084},
                 "rocking": {"motor": "mu", "start_deg": -0.704, "step_deg": 0.011}}


# -- variants ---------------------------------------------------------------------------------------
class RawScan(NamedTuple):
    """A variant sent as a raw scan (``classify_scan``): the server grids it and knows which voxels its mask
    left unmeasured."""

    frames: np.ndarray
    geometry: dict
    mask: np.ndarray | None


def binned(volume: np.ndarray, k: int) -> np.ndarray:
    """Sum k x k x k blocks (a map gridded at k times the voxel size)."""
    if k == 1:
        return volume
    s = [n // k * k for n in volume.shape]
    v = volume[: s[0], : s[1], : s[2]]
    return v.reshape(s[0] // k, k, s[1] // k, k, s[2] // k, k).sum(axis=(1, 3, 5))


def box(volume: np.ndarray, size: int, shift=(0, 0, 0)) -> np.ndarray:
    """A ``size``^3 crop around the maximum (moved by ``shift``), zero-padded where it leaves the map."""
    from defectscope.preprocessing.centring import crop_pad

    peak = np.array(np.unravel_index(int(np.argmax(volume)), volume.shape)) + np.array(shift)
    return crop_pad(volume, peak, (size,) * 3)


def map_variants(volume: np.ndarray, voxel, crops=((128, (0, 0, 0)), (96, (0, 0, 0)), (96, (8, -6, 5)))):
    """(name, map, voxel size) of a gridded map: summed 1x/2x/3x, then the crops of the 1x map."""
    out = []
    for k in FACTORS:
        v = binned(volume, k)
        out.append((f"x{k}", v, None if voxel is None else [k * float(x) for x in voxel]))
    for size, shift in crops:
        if all(size < n for n in volume.shape) or any(shift):
            out.append((f"crop {size}" + (f" shifted {list(shift)}" if any(shift) else ""), box(volume, size, shift), voxel))
    return out


# Where the chip gaps of the "off the peak" variant lie: this many pixels from the peak's brightest pixel, on
# both detector axes. A beamline puts the Bragg peak on a chip, away from its gaps; its outer fringes still cross them.
GAP_OFFSET = 20


def gap_mask(shape, width: int = 6, centre=None) -> np.ndarray:
    """Detector chip gaps: ``width``-pixel rows and columns through ``centre`` (row, column) of every frame,
    the middle of the frame by default."""
    mask = np.zeros(shape, bool)
    r, c = (shape[-2] // 2, shape[-1] // 2) if centre is None else centre
    mask[..., max(r - width // 2, 0) : r + width // 2, :] = True
    mask[..., :, max(c - width // 2, 0) : c + width // 2] = True
    return mask


def gaps_off_the_peak(frames, mask, offset: int = GAP_OFFSET) -> np.ndarray:
    """``gap_mask`` with its gaps ``offset`` pixels from the brightest pixel of the scan's summed (unmasked)
    frames, on both axes (towards the larger side of the frame)."""
    summed = np.where(mask, 0, frames).sum(axis=0) if mask is not None else frames.sum(axis=0)
    peak = np.unravel_index(int(np.argmax(summed)), summed.shape)
    centre = [p + offset if p + offset < n - 1 else p - offset for p, n in zip(peak, summed.shape)]
    return gap_mask(frames.shape, centre=centre)


def scan_variants(frames, geometry: dict, mask, name: str):
    """A raw scan gridded by the product's orthonormaliser at 1x/2x/3x its voxel, crops, and sent raw with gap masks."""
    from defectscope.preprocessing.geometry import geometry_from_dict
    from defectscope.preprocessing.orthonormalise import Orthonormaliser
    from defectscope.preprocessing.qspace import Grid, natural_grid

    geom = geometry_from_dict(geometry, n_frames=len(frames), frame_shape=frames.shape[1:])
    ortho = Orthonormaliser()
    g0 = natural_grid(geom)  # the server's own grid (1x)
    span = (np.array(g0.shape) - 1) * g0.voxel_size
    out = []
    for k, offset in [(k, 0.0) for k in FACTORS] + [(1, 0.5)]:
        d = k * g0.voxel_size
        shape = tuple(int(np.ceil(s / d)) + 1 for s in span)
        grid = Grid(shape=shape, origin=tuple(np.array(g0.origin) + offset * d), voxel_size=d)
        q = ortho(frames, geom, mask=mask, grid=grid)
        label = f"{name} gridded x{k}" + (f", shifted {offset:g} voxel" if offset else "")
        out.append((label, q.volume.astype(np.float32), [float(v) for v in q.voxel_size]))
        if k == 1 and not offset:
            base, voxel = q.volume.astype(np.float32), [float(v) for v in q.voxel_size]
    for size, shift in ((128, (0, 0, 0)), (96, (0, 0, 0)), (96, (8, -6, 5))):
        out.append((f"{name} crop {size}" + (f" shifted {list(shift)}" if any(shift) else ""), box(base, size, shift), voxel))
    out.append((f"{name} sent raw", RawScan(frames, geometry, mask), None))
    for label, gaps in (("chip gaps masked", gap_mask(frames.shape)),
                        (f"chip gaps {GAP_OFFSET} pixels from the peak", gaps_off_the_peak(frames, mask))):
        out.append((f"{name} sent raw, {label}",
                    RawScan(frames, geometry, gaps if mask is None else (gaps | np.asarray(mask, bool))), None))
    return out


def datasets() -> dict:
    """name -> list of (variant, map, voxel size or None)."""
    from defectscope.server.demo import load_measured_scan, make_examples

    out = {}
    measured = load_measured_scan()
    if measured is not None:
        frames, geometry, mask = measured
        out["aps34idc"] = scan_variants(frames, geometry, mask, "aps34idc")
    sixs = SHARED / "sixs_pt_s1398" / "S1398_pynx_norm_128_300_294_1_1_1.cxi"
    if sixs.is_file():
        from defectscope.preprocessing.scans import load_hdf5_scan

        frames, _, mask = load_hdf5_scan(sixs, "entry_1/instrument_1/detector_1/data",
                                         mask_dataset="entry_1/instrument_1/detector_1/mask")
        frames, mask = frames[1:], mask[1:]  # frame 0 is an artefact (its README)
        geometry = {**SIXS_GEOMETRY, "direct_beam": [frames.shape[1] / 2, frames.shape[2] / 2]}
        out["sixs"] = scan_variants(np.ascontiguousarray(frames), geometry, mask, "sixs")
    cdinn = SHARED / "cdinn_example_64" / "ft_crop_64.tif"
    if cdinn.is_file():
        import tifffile

        counts = tifffile.imread(cdinn).astype(np.float32)
        counts = np.ascontiguousarray(np.rot90(counts[:, :, ::-1], 1, axes=(0, 2)))  # the .npy's orientation
        variants = map_variants(counts, None, crops=((48, (0, 0, 0)), (48, (4, -3, 2))))
        gapped = counts.copy()
        gapped[:, 30:33, :] = 0
        variants.append(("gap plane zeroed", gapped, None))
        out["cdinn"] = variants
    maps, rows, _ = make_examples(n_per_class=1)
    for m, row in zip(maps, rows):
        out[f"simulated {row['label']}"] = map_variants(np.asarray(m, np.float32), None, crops=((48, (0, 0, 0)), (48, (4, -3, 2))))
    return out


# -- classification ---------------------------------------------------------------------------------
def classify(classifier, volume, voxel) -> dict:
    """The serving path's answer (``server.core.Classifier``, sampling check on) for one map or raw scan."""
    from defectscope.errors import DefectscopeError

    try:
        if isinstance(volume, RawScan):
            reply = classifier.classify_scan(volume.frames, volume.geometry, mask=volume.mask, request_id="invariance").reply
        else:
            reply = classifier.classify_map(np.ascontiguousarray(volume), voxel_size=voxel, request_id="invariance").reply
    except DefectscopeError as exc:
        return {"error": f"{exc.reason}: {exc.message}"}
    prep = reply["preparation"]
    return {"label": reply["label"], "probabilities": [round(float(x), 4) for x in reply["probabilities"]],
            "oversampling_per_axis": prep["oversampling_per_axis"], "resample_factor": prep["resample_factor"],
            "crystal_extent_nm": prep.get("crystal_extent_nm"), "oversampling_confidence": prep.get("oversampling_confidence"),
            "sampling_check": prep.get("sampling_check"), "decision": reply.get("decision"), "verdict": reply.get("verdict"),
            "warnings": [w["reason"] for w in reply["warnings"]]}



def defective(r: dict) -> bool:
    return r["label"] != "defect_free"


def spread_of(rows: list[dict]) -> dict:
    """Labels and largest class-probability spread of the answered rows (``invariant``: one label, spread <= 0.1)."""
    if not rows:
        return {"labels": [], "spread": None, "invariant": False}
    probs = np.array([r["probabilities"] for r in rows])
    spread = float((probs.max(0) - probs.min(0)).max())
    labels = sorted({r["label"] for r in rows})
    return {"labels": labels, "spread": round(spread, 4), "invariant": len(labels) == 1 and spread <= 0.1}


def summarise(rows: list[dict]) -> dict:
    """Labels and probability spread over the variants (``invariant``: one label, spread <= 0.1); the same
    without the variants whose data stop next to the peak (``PEAK_NEAR_EDGE``: a gap or edge across its core,
    where the answer is warned rather than kept); the same, moreover, without those whose sampling the
    preparation could not determine (``SAMPLING_UNDETERMINED``: the central peak under a voxel wide on some
    axis, a grid too coarse to hold the fringes the networks read); and the answers given without a warning
    that they are unreliable (``UNRELIABLE``): ``honest`` when those never contradict each other on defect-free
    vs defective."""
    ok = [r for r in rows if "label" in r]
    if not ok:
        return {"labels": [], "spread": None, "errors": len(rows)}
    unflagged = [r for r in ok if not set(r["warnings"]) & set(UNRELIABLE)]
    kept = [r for r in ok if "PEAK_NEAR_EDGE" not in r["warnings"]]
    return {**spread_of(ok), "peak_not_cut": spread_of(kept),
            "sampling_determined": spread_of([r for r in kept if "SAMPLING_UNDETERMINED" not in r["warnings"]]),
            "unflagged": len(unflagged), "unflagged_labels": sorted({r["label"] for r in unflagged}),
            "honest": len({defective(r) for r in unflagged}) <= 1, "errors": len(rows) - len(ok)}


def run(models) -> dict:
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model
    from defectscope.server.core import Classifier

    from defectscope.model.registry import cross_check_for

    predictors = {m: Predictor(resolve_model(m), provider="cpu") for m in models}
    classifiers = {}
    for m, p in predictors.items():
        other = cross_check_for(m)  # as `defectscope serve` does by default
        classifiers[m] = Classifier(p, overlap=False, cross_check=Predictor(other, provider="cpu") if other else None)
    result = {"models": {m: p.describe() for m, p in predictors.items()}, "datasets": {}}
    for name, variants in datasets().items():
        entry = {"variants": {}, "summary": {}}
        for variant, volume, voxel in variants:
            entry["variants"][variant] = {m: classify(c, volume, voxel) for m, c in classifiers.items()}
        for m in predictors:
            entry["summary"][m] = summarise([v[m] for v in entry["variants"].values()])
        entry["consistency"] = consistency(entry["variants"], predictors)
        answers = [r for v in entry["variants"].values() for r in v.values() if "label" in r]
        unflagged = [r for r in answers if not set(r["warnings"]) & set(UNRELIABLE)]
        entry["honest"] = len({defective(r) for r in unflagged}) <= 1  # across models and variants
        result["datasets"][name] = entry
    return result


def consistency(variants: dict, predictors: dict) -> dict | None:
    """Largest |P_2class(defective) - (1 - P_3class(defect_free))| over the variants both models answered."""
    three = [m for m, p in predictors.items() if len(p.classes) == 3]
    two = [m for m, p in predictors.items() if len(p.classes) == 2]
    if not (three and two):
        return None
    gaps = []
    for v in variants.values():
        a, b = v[three[0]], v[two[0]]
        if "probabilities" in a and "probabilities" in b:
            gaps.append(abs(b["probabilities"][1] - (1 - a["probabilities"][0])))
    return {"max_gap": round(max(gaps), 4) if gaps else None, "target": 0.3,
            "consistent": bool(gaps) and max(gaps) <= 0.3}


def table(result: dict) -> str:
    lines = []
    for name, entry in result["datasets"].items():
        for variant, by_model in entry["variants"].items():
            cells = []
            for m, r in by_model.items():
                if "error" in r:
                    cells.append(f"{m}: {r['error'][:40]}")
                else:
                    flag = "".join(f" {w}" for w in r["warnings"] if w in UNRELIABLE)
                    cells.append(f"{m}: {r['label']} {r['probabilities']} s={r['oversampling_per_axis']}{flag}")
            lines.append(f"{name:20s} {variant:34s} " + " | ".join(cells))
        summ = "; ".join(f"{m}: labels {s['labels']} spread {s['spread']}, unflagged {s.get('unflagged_labels')}"
                         for m, s in entry["summary"].items())
        lines.append(f"{name:20s} {'SUMMARY':34s} {summ}; consistency {entry['consistency']}; "
                     f"no contradicting unflagged answers: {entry['honest']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model name or path (repeatable; default: both bundled)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = run(args.model or ["defectscope-3class", "defectscope-2class"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
