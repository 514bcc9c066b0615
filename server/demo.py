"""``defectscope demo``: the whole product on this machine, in one command, with only the serving install.

Starts ``defectscope serve`` on the bundled 3-class model as a separate process, sends the bundled example
patterns of each class through the real ZeroMQ client, prints a table (true class, predicted class,
probabilities, latency), writes a figure in the style of the paper's Fig. 4 (three log-scale slices per
example with its probabilities; needs matplotlib, the ``[demo]`` extra), classifies the measured APS
34-ID-C scan when ``../shared/data`` is beside the project, and stops the server with SIGTERM.

The example patterns are simulated once, not on each run (the simulator needs the training install:
finufft, Dask), and shipped in the package as ``defectscope/examples/demo_examples.npz``. They were made,
and are remade after a change to the simulator, with::

    python -m defectscope.server.demo --write-examples

``tests/test_demo.py`` reruns that command and checks that the shipped file holds what it writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import defectscope
from defectscope.errors import Internal

DEMO_SEED = 2021
EXAMPLES_PER_CLASS = 2
REPO = Path(__file__).resolve().parents[1]
EXAMPLES_FILE = Path(defectscope.__file__).resolve().parent / "examples" / "demo_examples.npz"
WRITE_COMMAND = "python -m defectscope.server.demo --write-examples"


def make_examples(n_per_class: int = EXAMPLES_PER_CLASS, seed: int = DEMO_SEED):
    """Simulated patterns, ``n_per_class`` of each class: (counts list, parameter rows, class names)."""
    from defectscope.training.dataset import SimulatedDataset
    from defectscope.training.runner import simulate_dataset
    from defectscope.training.sim_config import SimulationConfig

    cfg = SimulationConfig(orientations_per_configuration=1, peak_counts_range=(1e4, 1e6))
    with tempfile.TemporaryDirectory() as tmp:
        path = simulate_dataset(3 * n_per_class, Path(tmp) / "examples.h5", cfg, seed=seed, progress=False)
        with SimulatedDataset(path) as ds:
            params = ds.parameters()
            order = np.argsort(ds.labels, kind="stable")
            counts = [ds.counts[i] for i in order]
            rows = [{"label": ds.classes[ds.labels[i]], "element": params["element"][i].decode(),
                     "position": params["position_mode"][i].decode()} for i in order]
            return counts, rows, ds.classes


def write_examples(path: str | Path = EXAMPLES_FILE, n_per_class: int = EXAMPLES_PER_CLASS,
                   seed: int = DEMO_SEED) -> Path:
    """Simulate the demo's examples (``make_examples``) into ``path``: an .npz of plain arrays (no pickled
    objects), counts as uint32, with the seed, the simulator version and the command that made it."""
    from defectscope.training.simulator import SIMULATOR_VERSION

    counts, rows, classes = make_examples(n_per_class, seed)
    arrays = {"counts": np.stack(counts).astype("<u4"),
              **{key: np.array([r[key] for r in rows]) for key in ("label", "element", "position")},
              "classes": np.array(classes), "seed": np.array(seed, dtype="<i8"),
              "simulator_version": np.array(SIMULATOR_VERSION), "command": np.array(WRITE_COMMAND)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # np.savez_compressed, but with a fixed date in the zip entries: rerunning the command on the same
    # machine rewrites the same bytes, so git shows a change only when the examples changed.
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return path


def load_examples(path: str | Path = EXAMPLES_FILE):
    """The shipped example patterns, as ``make_examples`` returns them; imports nothing from the simulator."""
    with np.load(path, allow_pickle=False) as z:
        counts = list(z["counts"])
        rows = [{"label": str(lab), "element": str(el), "position": str(pos)}
                for lab, el, pos in zip(z["label"], z["element"], z["position"])]
        return counts, rows, [str(c) for c in z["classes"]]


class ServedModel:
    """``defectscope serve`` in a child process, ready once it prints its endpoint."""

    def __init__(self, model: str | None, timeout_s: float = 120, args=(), bind: str = "tcp://127.0.0.1:*"):
        """``args``: more ``serve`` options. The log goes to a temporary file (a pipe nobody reads could
        fill and stall the server)."""
        cmd = [sys.executable, "-m", "defectscope.server.cli", "serve", "--bind", bind, *map(str, args)]
        if model:
            cmd += ["--model", str(model)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("defectscope serving on "):
            self.proc.wait(timeout_s)
            self.log.seek(0)
            err = self.log.read().strip().splitlines()
            self.log.close()
            raise Internal(f"server did not start: {err[-1] if err else line.strip()}")
        self.banner = line.strip()
        self.endpoint = line.split()[3]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc.stdout.close()
        self.log.close()
        return code


def load_measured_scan():
    """The APS 34-ID-C Au(111) scan from ``../shared/data`` when present, else None."""
    root = REPO.parent / "shared" / "data" / "aps34idc_au111_s54"
    if not (root / "example.spec").is_file():
        return None
    from defectscope.preprocessing.scans import load_spec_tiff_scan

    frames, geometry, mask = load_spec_tiff_scan(root / "example.spec", 54, root / "Staff20-1a_S0054",
                                                 dark=root / "dark.tif", whitefield=root / "whitefield.tif")
    return frames, geometry.to_dict(), mask


def format_table(rows: list[dict], classes: list[str]) -> str:
    head = f"{'example':<26} {'true':<12} {'predicted':<12} {'decision':<10} " + " ".join(f"{c:>11}" for c in classes) + \
        f" {'server ms':>10} {'round trip ms':>14}  warnings"
    lines = [head, "-" * len(head)]
    for r in rows:
        probs = " ".join(f"{p:>11.3f}" for p in r["probabilities"])
        lines.append(f"{r['name']:<26} {r['true']:<12} {r['predicted']:<12} {r.get('decision') or '-':<10} {probs} "
                     f"{r['server_ms']:>10.1f} {r['round_trip_ms']:>14.1f}  {','.join(r.get('warnings') or []) or '-'}")
    return "\n".join(lines)


def plot_examples(results: list[dict], out: Path) -> None:
    from defectscope.server.plots import _pyplot, slice_panel

    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 3, figsize=(8.4, 2.5 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        slice_panel(row, r["prepared"])
        probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(r["classes"], r["probabilities"]))
        row[0].set_title(f"{r['name']}: true {r['true']}", fontsize=8, loc="left")
        row[1].set_title(f"predicted {r['predicted']}", fontsize=8)
        row[2].set_title(probs, fontsize=7, loc="right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run_demo(model: str | None = None, out_dir: str | Path = "demo_out", measured: bool = True) -> int:
    from defectscope.server.client import Client

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"classifying the bundled example patterns (simulated once, seed {DEMO_SEED}: {WRITE_COMMAND})",
          flush=True)
    counts, params, _ = load_examples()
    server = ServedModel(model)
    print(server.banner, flush=True)
    results = []
    try:
        with Client(server.endpoint, timeout_s=60, retries=1) as client:
            for i, (volume, p) in enumerate(zip(counts, params)):
                t0 = time.perf_counter()
                reply = client.classify(volume, request_id=f"demo-{i}", return_prepared=True)
                results.append(_row(f"{p['element']} {p['position'] if p['label'] != 'defect_free' else ''} #{i}".replace("  ", " "),
                                    p["label"], reply, t0))
            scan = load_measured_scan() if measured else None
            if scan is not None:
                frames, geometry, mask = scan
                client.classify_scan(frames, geometry, mask=mask, request_id="warm-34idc")  # builds the mapping
                t0 = time.perf_counter()
                reply = client.classify_scan(frames, geometry, mask=mask, request_id="34idc-S0054",
                                             return_prepared=True)
                results.append(_row("APS 34-ID-C Au(111) S54", "unknown", reply, t0))
    finally:
        code = server.stop()
    classes = results[0]["classes"]
    table = format_table(results, classes)
    print(table)
    (out_dir / "demo_table.txt").write_text(table + "\n")
    if importlib.util.find_spec("matplotlib") is not None:
        png = out_dir / "demo.png"
        plot_examples(results, png)
        figure = f"figure: {png}"
    else:
        figure = "no figure (it needs matplotlib: pip install 'defectscope[cpu,demo]')"
    correct = sum(r["true"] == r["predicted"] for r in results if r["true"] != "unknown")
    simulated = sum(r["true"] != "unknown" for r in results)
    print(f"\n{correct}/{simulated} simulated examples classified correctly; {figure}; table: {out_dir / 'demo_table.txt'}")
    print(f"server stopped cleanly (exit code {code})" if code == 0 else f"server exit code {code}")
    return 0 if code == 0 else 1


def _row(name: str, true: str, reply: dict, t0: float) -> dict:
    return {"name": name, "true": true, "predicted": reply["label"], "probabilities": reply["probabilities"],
            "classes": reply["classes"], "server_ms": reply["timings_ms"]["total"],
            "round_trip_ms": (time.perf_counter() - t0) * 1e3, "prepared": np.asarray(reply["prepared"]),
            "warnings": [w["reason"] for w in reply.get("warnings", [])], "decision": reply.get("decision")}


def cmd_demo(args) -> int:
    return run_demo(args.model, args.out, measured=not args.no_measured)


def main(argv=None) -> int:
    """``python -m defectscope.server.demo --write-examples [--path P]``: remake the shipped examples."""
    parser = argparse.ArgumentParser(prog="python -m defectscope.server.demo", description=main.__doc__)
    parser.add_argument("--write-examples", action="store_true", required=True,
                        help=f"simulate {EXAMPLES_PER_CLASS} patterns per class (seed {DEMO_SEED}); needs the "
                             "training install")
    parser.add_argument("--path", default=str(EXAMPLES_FILE), help="where to write them (default: %(default)s)")
    args = parser.parse_args(argv)
    path = write_examples(args.path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
