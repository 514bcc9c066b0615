"""Sub-commands of ``defectscope`` that belong to the offline pipeline (simulate, train, evaluate).

This module must stay light: it only declares arguments; each command imports its heavy dependencies
(finufft, dask, tensorflow) when it runs, so the serving install's CLI works without them.
"""

from __future__ import annotations

import os


def register(sub) -> None:
    """Add the training-side sub-commands to the ``defectscope`` argument parser."""
    p = sub.add_parser("simulate", help="simulate a training dataset (HDF5) of BCDI patterns of fcc nanocrystals",
                       description="Simulate kinematic Bragg CDI patterns of fcc nanocrystals (defect-free, screw, "
                                   "edge dislocation) into one HDF5 dataset. Bit-reproducible from --seed, "
                                   "whatever the number of workers.")
    p.add_argument("--n", type=int, required=True, help="number of patterns")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--config", help="simulator config file (JSON, or TOML with a [simulate] table); "
                                    "options not given keep their defaults")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help=f"local worker processes (default: the {os.cpu_count()} cores of this machine)")
    where.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--relax-cache-dir", help="cached relaxations (config relax_cache_dir; relaxed_fraction > 0 uses them, "
                                            "relaxing what is missing): keep it outside the repository")
    p.add_argument("--unrelaxed-twin", action="store_true",
                   help="build the configurations the config relaxes unrelaxed instead (same plan, same draws, the "
                        "potential's lattice constant): the twin dataset for a relaxed-vs-unrelaxed evaluation")
    p.add_argument("--only-split", choices=("train", "validation", "test"), default=None,
                   help="only the configurations of this split of the --n run, the same patterns in the same order "
                        "(e.g. with --unrelaxed-twin: the twin of a test split)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out if it exists, and start over rather than resume an interrupted run "
                        "(<out>.partial)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)
    from defectscope.training.train_cli import register_train  # train, evaluate (training/train_cli.py)
    register_train(sub)


def _stop_cleanly() -> None:
    """SIGTERM (a session's or a scheduler's end) and SIGINT stop a simulation as ^C does, between two
    writes: the partial file is closed with the configurations so far, and the same command resumes it.
    (A job started in the background by a shell ignores SIGINT unless told otherwise: it is told here.)"""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_simulate(args) -> int:
    from pathlib import Path

    from defectscope.errors import BadMessage

    out = Path(args.out)
    if args.n < 1:
        raise BadMessage("--n must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise BadMessage("--workers must be at least 1")
    if args.seed < 0:
        raise BadMessage("--seed must be a non-negative integer")
    if out.exists() and not args.force:
        raise BadMessage(f"{str(out)!r} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise BadMessage(f"directory {str(out.parent)!r} does not exist")
    try:
        import distributed  # noqa: F401
        import finufft  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        raise BadMessage(f"simulate needs the training extra: pip install 'defectscope[train]' ({exc.name} missing)") from None

    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig, load_config

    cfg = load_config(args.config) if args.config else SimulationConfig()
    if args.relax_cache_dir:
        cfg = cfg.replace(relax_cache_dir=str(Path(args.relax_cache_dir).resolve()))
    if args.unrelaxed_twin:
        cfg = cfg.replace(relaxed_twin=True)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not args.force:
        print(f"resuming the interrupted run in {partial}", flush=True)
    _stop_cleanly()
    path = simulate_dataset(args.n, out, cfg, seed=args.seed, workers=workers, scheduler=args.scheduler,
                            progress=not args.no_progress, resume=not args.force, only_split=args.only_split)
    print(f"wrote {'the ' + args.only_split + ' split of ' if args.only_split else ''}{args.n} patterns to {path}")
    return 0
