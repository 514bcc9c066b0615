"""Which resampling policy the bundled models are served with: the model's trained range (only axes outside it
move) or a fixed target on every axis, scored on the same simulated maps.

    python -m defectscope.training.sampling_policy DATA.h5 [DATA.h5 ...] [--split all] [--target 3.0]
        [--out docs/eval/sampling_policy.json]

Each bundled model is evaluated (``defectscope evaluate``'s ``evaluate_model``, the serving path) twice: as
shipped, and from a temporary copy whose pipeline carries ``oversampling_target``. A fixed target makes the
prepared map independent of the grid the data came on (docs/measured-data.md), but a model trained on maps
left where they were sampled loses accuracy when every map is moved to one sampling; the numbers decide.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "eval" / "sampling_policy.json"
MODELS = ("defectscope-3class", "defectscope-2class")


def with_target(model_path: Path, target: float, out: Path) -> Path:
    """A copy of an ONNX model whose pipeline config has ``oversampling_target = target`` (card unchanged)."""
    import onnx
    from defectscope.model.metadata import CARD_KEY, parse_metadata
    from defectscope.training.export import set_metadata

    proto = onnx.load(str(model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    contract = parse_metadata(props, source=str(model_path))
    set_metadata(proto, dataclasses.replace(contract.pipeline, oversampling_target=target), json.loads(props[CARD_KEY]))
    onnx.save(proto, str(out))
    return out


def summary(result: dict) -> dict:
    groups = result.get("by_group", {})
    return {"accuracy": result["accuracy"], "n": result["n"],
            "by_position_mode": {k: v["accuracy"] for k, v in groups.get("position_mode", {}).items()},
            "by_class_recall": {k: v["recall"] for k, v in result.get("per_class", {}).items()}}


def main(argv=None) -> int:
    from defectscope.model.registry import resolve_model
    from defectscope.training.evaluate import evaluate_model, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--split", default="all")
    parser.add_argument("--target", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data-command", default=None, help="how DATA was made (recorded in the output)")
    args = parser.parse_args(argv)
    out = {"command": "python -m defectscope.training.sampling_policy " + " ".join(args.data)
                      + f" --split {args.split} --target {args.target:g}", "data_command": args.data_command,
           "split": args.split, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = Path(resolve_model(name))
            shipped = evaluate_model(path, args.data, split=args.split, progress=False)
            moved = evaluate_model(with_target(path, args.target, Path(tmp) / path.name), args.data, split=args.split,
                                   progress=False)
            out["models"][name] = {"model": shipped["model"], "trained_range": summary(shipped),
                                   f"target_{args.target:g}": summary(moved)}
            print(name, "trained range", shipped["accuracy"], f"| target {args.target:g}", moved["accuracy"])
    write_json(out, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
