"""Which resampling policy the bundled models are served with: the model's trained range (only axes outside it
move) or a fixed target on every axis, scored on the same simulated maps.

    python -m defectscope.training.sampling_policy DATA.h5 [DATA.h5 ...] [--split all] [--target 3.0]
        [--out docs/eval/sampling_policy.json]

Each bundled model is evaluated (``defectscope evaluate``'s ``evaluate_model``, the serving path) from temporary
copies: its own answer (decision rule without ``sampling_mean``), the same with ``oversampling_target`` in its
pipeline, and the mean over the sampling variants (``sampling_mean``). A fixed target makes the prepared map
independent of the grid the data came on (docs/measured-data.md), but a model trained on maps left where they
were sampled loses accuracy when every map is moved to one sampling; the numbers decide.
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


def with_changes(model_path: Path, out: Path, *, target: float | None = None, sampling_mean: bool = False) -> Path:
    """A copy of an ONNX model with ``oversampling_target = target`` in its pipeline and its decision rule's
    ``sampling_mean`` set (card and thresholds unchanged)."""
    import onnx

    from defectscope.model.decision import DECISION_KEY, parse_decision
    from defectscope.model.metadata import CARD_KEY, parse_metadata
    from defectscope.training.export import set_metadata

    proto = onnx.load(str(model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    contract = parse_metadata(props, source=str(model_path))
    rule = dataclasses.replace(parse_decision(props), sampling_mean=sampling_mean)
    if not rule.calibrated:  # a model without a rule: one that decides nothing, for its sampling_mean alone
        rule = dataclasses.replace(rule, risk=0.0, threshold=0.0)
    extra = {DECISION_KEY: rule.to_json()} if DECISION_KEY in props or sampling_mean else None
    set_metadata(proto, dataclasses.replace(contract.pipeline, oversampling_target=target),
                 json.loads(props[CARD_KEY]), extra=extra)
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
    policies = {"own_answer_trained_range": {}, f"own_answer_target_{args.target:g}": {"target": args.target},
                "sampling_mean_trained_range": {"sampling_mean": True}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = Path(resolve_model(name))
            out["models"][name] = {}
            for policy, changes in policies.items():
                copy = with_changes(path, Path(tmp) / f"{policy}-{path.name}", **changes)
                result = evaluate_model(copy, args.data, split=args.split, progress=False)
                out["models"][name][policy] = summary(result)
                out["models"][name]["model"] = {**result["model"], "path": str(path)}
                print(name, policy, result["accuracy"])
    write_json(out, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
