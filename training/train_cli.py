"""``defectscope train`` and ``defectscope evaluate`` (SPEC §6): argument parsing only.

TensorFlow, tf2onnx and matplotlib are imported when a command runs, so the serving install's CLI
still starts without them; a missing one is one error line naming the ``[train]`` extra.
"""

from __future__ import annotations

import shlex


def register_train(sub) -> None:
    """Add ``train`` and ``evaluate`` to the ``defectscope`` sub-command parser."""
    p = sub.add_parser(
        "train", help="train (or fine-tune) a classifier and export it as ONNX with its card",
        description="Train the 3D CNN on datasets from `defectscope simulate` (and/or labelled measured maps), "
                    "prepared by the serving pipeline; keep the weights of the validation-accuracy maximum, "
                    "calibrate the probabilities on the validation split, export MODEL_DIR/NAME.onnx "
                    "(+ .card.json, .keras) and score the test split. Checkpoints every epoch (--resume).")
    p.add_argument("--data", action="append", required=True, metavar="DATA.h5",
                   help="training data (repeat to combine files: e.g. a simulated dataset and measured maps)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output directory (model, checkpoints, cache)")
    p.add_argument("--classes", type=int, choices=(3, 2), default=None,
                   help="3: defect_free/screw/edge (default); 2: defect_free/defective")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML with optional [train] and [pipeline] tables; "
                                                   "flags given here win")
    p.add_argument("--epochs", type=int, help="maximum number of epochs (default 150); with --resume a larger "
                   "value extends the run, a smaller one ends it there and exports its best weights")
    p.add_argument("--batch", type=int, help="batch size (default: 64 for 3 classes, 32 for 2, as the paper)")
    p.add_argument("--lr", type=float, help="initial learning rate (default: paper's; a tenth with --init)")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order, dropout, augmentation (default 0)")
    p.add_argument("--init", metavar="MODEL.keras", help="fine-tune from this model (e.g. a shipped one); its "
                   "MODEL.onnx must lie beside it (the pipeline config it was trained with) unless --config gives one")
    p.add_argument("--resume", action="store_true", help="continue the run in MODEL_DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over even if MODEL_DIR holds a run")
    p.add_argument("--name", help="model name (default defectscope-3class / defectscope-2class)")
    p.add_argument("--model-version", default="1.0", help="version written in the card (default 1.0)")
    p.add_argument("--no-augment", action="store_true", help="no random mirrors through planes containing Q")
    p.add_argument("--no-cache", action="store_true", help="prepare maps every epoch instead of caching them")
    p.add_argument("--cache-dir", metavar="DIR", help="where prepared maps are cached (default MODEL_DIR/cache; "
                                                      "1 MiB per map, reused while data and pipeline are unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="score a model file on a dataset through the serving path; JSON + PNGs",
        description="Prepare each map of a split with the model's own pipeline config and classify it with "
                    "ONNX Runtime (as the server does): accuracy, per-class precision/recall, confusion "
                    "matrices, 2-class collapse, accuracy by element / CD-RPD / peak counts, calibration (ECE), "
                    "and robustness to rotations and voxel-size changes.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("data", nargs="+", metavar="DATA.h5", help="simulated dataset(s) or labelled maps")
    p.add_argument("--split", default="test", choices=("train", "validation", "test", "all"),
                   help="split to score (default test)")
    p.add_argument("--plots", metavar="DIR", help="write PNGs (and metrics.json unless --out) here")
    p.add_argument("--out", metavar="METRICS.json", help="write all numbers here")
    p.add_argument("--robust-maps", type=int, default=None,
                   help="maps for the rotation / voxel-size robustness curves (default 60 with --plots or --out, "
                        "else 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the robustness draws and of random splits")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def _need_training_extra(*modules) -> None:
    import importlib

    from defectscope.errors import BadMessage

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise BadMessage(f"this command needs the training extra: pip install 'defectscope[train]' "
                             f"({exc.name or name} missing)") from None


def cmd_train(args) -> int:
    import os

    from defectscope.errors import BadMessage

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ info lines
    _need_training_extra("onnx")  # reads an --init model's pipeline config
    from defectscope.preprocessing.config import PipelineConfig
    from defectscope.training.train import Run, TrainConfig, load_run_config

    train_opts, pipeline_opts = load_run_config(args.config) if args.config else ({}, {})
    flags = {"classes": args.classes, "epochs": args.epochs, "batch": args.batch, "learning_rate": args.lr,
             "seed": args.seed}
    train_opts.update({k: v for k, v in flags.items() if v is not None})
    if args.no_augment:
        train_opts["augment"] = False
    if args.no_cache:
        train_opts["cache"] = False
    config = TrainConfig.from_dict(train_opts)
    pipeline = PipelineConfig.from_dict({"schema_version": 1, **pipeline_opts}) if pipeline_opts else None
    if args.resume and args.force:
        raise BadMessage("--resume and --force exclude each other")
    command = train_command_line(args)
    run = Run(args.data, args.out, config, pipeline=pipeline, init=args.init, resume=args.resume, force=args.force,
              name=args.name, model_version=args.model_version, command=command, progress=not args.no_progress,
              cache_dir=args.cache_dir, epochs_given=args.epochs is not None)
    run.check()  # a bad --init or MODEL_DIR is one error line, before TensorFlow's start-up chatter
    _need_training_extra("tensorflow", "tf2onnx", "matplotlib")
    result = run.execute()
    acc = result["test_metrics"].get("accuracy") if result["test_metrics"] else None
    print(f"wrote {result['onnx']} (T = {result['temperature']:.3f}"
          + (f", test accuracy {acc:.4f}" if acc is not None else ", no test split") + ")")
    return 0


def train_command_line(args) -> str:
    """The command that reproduces this run, rebuilt from the parsed arguments (for the model card)."""
    parts = ["defectscope", "train"]
    for path in args.data:
        parts += ["--data", path]
    parts += ["--out", args.out]
    for flag, value in (("--classes", args.classes), ("--config", args.config), ("--epochs", args.epochs),
                        ("--batch", args.batch), ("--lr", args.lr), ("--seed", args.seed), ("--init", args.init),
                        ("--name", args.name)):
        if value is not None:
            parts += [flag, str(value)]
    if args.model_version != "1.0":
        parts += ["--model-version", args.model_version]
    for flag, on in (("--no-augment", args.no_augment), ("--no-cache", args.no_cache)):
        if on:
            parts.append(flag)
    return " ".join(shlex.quote(p) for p in parts)


def cmd_evaluate(args) -> int:
    if args.plots:
        _need_training_extra("matplotlib")
    from pathlib import Path

    from defectscope.training.evaluate import evaluate_model, write_json

    robust = args.robust_maps if args.robust_maps is not None else (60 if (args.plots or args.out) else 0)
    result = evaluate_model(args.model, args.data, split=args.split, seed=args.seed, plots_dir=args.plots,
                            robust_maps=robust, progress=not args.no_progress)
    out = args.out or (str(Path(args.plots) / "metrics.json") if args.plots else None)
    if out:
        write_json(result, out)
    print(format_summary(result))
    if out:
        print(f"wrote {out}")
    return 0


def format_summary(result: dict) -> str:
    lines = [f"{result['model']['name']} {result['model']['version']} on {result['n']} {result['split']} maps: "
             f"accuracy {result['accuracy']:.4f}"]
    for name, d in result["per_class"].items():
        p, r = d["precision"], d["recall"]
        lines.append(f"  {name:12s} precision {p if p is None else f'{p:.4f}'}  recall {r if r is None else f'{r:.4f}'}  "
                     f"(n={d['support']})")
    if "two_class" in result:
        lines.append(f"  2-class collapse accuracy {result['two_class']['accuracy']:.4f}")
    ece = result["calibration"]["ece"]
    if ece is not None:
        lines.append(f"  ECE {ece:.4f}  NLL {result['calibration']['nll']:.4f}")
    if result.get("refused"):
        lines.append(f"  refused by the pipeline: {result['refused']}")
    rob = result.get("robustness")
    if rob:
        lines.append(f"  rotations (random axis) {dict(zip(rob['rotation']['angles_deg'], rob['rotation']['random_axis']['accuracy']))}")
        lines.append(f"  zoom {dict(zip(rob['zoom']['factors'], rob['zoom']['accuracy']))}")
    return "\n".join(lines)
