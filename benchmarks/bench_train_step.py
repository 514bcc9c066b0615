"""Training speed of the 3D CNN on this machine: samples per second of one Adam step, per architecture.

    python -m defectscope.benchmarks.bench_train_step [--batch 32] [--steps 6] [--only NAME ...] [--out FILE]

Times ``model.train_on_batch`` on random 64³ maps held in memory (the model alone, no data path), after
two warm-up steps, median of ``--steps`` steps (wall and process CPU time: the CPU-time rate is less
sensitive to other jobs sharing the machine); also the forward pass alone (inference batch). The
candidates are the paper's reading (stride 1, widths doubling) and cheaper variants; the chosen defaults
(``training.model.ARCHITECTURES``) must train at >= ~100 samples/s on a 2-core CPU. Results go to
``benchmarks/train_step.json`` (kept in the repository: docs/experiments.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "train_step.json"  # kept: docs/experiments.md quotes it


def candidates():
    from defectscope.training.model import ARCHITECTURES, Architecture

    return {
        "paper-3class (16-32-64-128-256, stride 1)": (3, ARCHITECTURES["paper-3class"]),
        "3class 16-32-64-128-128, stride 2": (3, Architecture(filters=(16, 32, 64, 128, 128), first_stride=2)),
        "3class 32-64-128-128-128, stride 2": (3, Architecture(filters=(32, 64, 128, 128, 128), first_stride=2)),
        "3class 8-16-32-64-128, stride 1": (3, Architecture(filters=(8, 16, 32, 64, 128), first_stride=1)),
        "3class 8-16-32-64-128, stride 2": (3, Architecture(filters=(8, 16, 32, 64, 128), first_stride=2)),
        "paper-2class (16-32-64, stride 1)": (2, ARCHITECTURES["paper-2class"]),
        "2class 16-32-64, stride 2": (2, Architecture(filters=(16, 32, 64), first_stride=2)),
        "2class 32-64-128, stride 2": (2, Architecture(filters=(32, 64, 128), first_stride=2)),
    }


def measure(n_classes, arch, batch: int, steps: int) -> dict:
    import keras
    import numpy as np
    from defectscope.training.model import build_model

    model = build_model(n_classes, arch, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.random((batch, 64, 64, 64, 1), dtype=np.float32)
    y = np.eye(n_classes, dtype=np.float32)[rng.integers(0, n_classes, batch)]
    for _ in range(2):
        model.train_on_batch(x, y)
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    step, cpu_step = float(np.median(times)), float(np.median(cpu))
    predict = model.make_predict_function()  # noqa: F841  (warm the inference graph)
    model.predict_on_batch(x)
    t0 = time.perf_counter()
    model.predict_on_batch(x)
    infer = time.perf_counter() - t0
    return {
        "n_classes": n_classes, "architecture": arch.to_dict(), "parameters": int(model.count_params()),
        "batch": batch, "step_s": round(step, 4), "train_samples_per_s": round(batch / step, 1),
        # CPU seconds (all threads) per step: less sensitive to other jobs on the machine than wall time.
        "cpu_s_per_step": round(cpu_step, 4), "train_samples_per_cpu_s": round(batch / cpu_step, 1),
        "inference_samples_per_s": round(batch / infer, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="substrings of candidate names to run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = []
    for name, (n_classes, arch) in candidates().items():
        if args.only and not any(s in name for s in args.only):
            continue
        r = {"name": name, **measure(n_classes, arch, args.batch, args.steps)}
        print(f"{name:45s} params {r['parameters']:>9d}  train {r['train_samples_per_s']:7.1f}/s "
              f"({r['train_samples_per_cpu_s']:6.1f}/cpu-s)  "
              f"infer {r['inference_samples_per_s']:7.1f}/s", flush=True)
        results.append(r)
    import tensorflow as tf

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
                          "load_average_1min": os.getloadavg()[0]}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
