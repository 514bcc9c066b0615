"""`defectscope demo` end to end: a real server process, the bundled examples, the client, table and figure;
the demo needs only the serving install, and the bundled examples are what their recorded command makes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from defectscope.model.registry import bundled_models
from defectscope.server.demo import DEMO_SEED, EXAMPLES_FILE, WRITE_COMMAND, load_examples

# Installed only by the training and test extras: the demo (and the server it starts) must not import them.
TRAINING_ONLY = ("tensorflow", "keras", "tf2onnx", "finufft", "dask")
SIMULATOR = ("defectscope.training.simulator", "defectscope.training.runner", "defectscope.training.dataset")


def _blocking_env(tmp_path) -> dict:
    """PYTHONPATH with stand-ins that fail to import for the training-only packages, in this process's
    children and in theirs (the server the demo starts)."""
    blocked = tmp_path / "blocked"
    for name in TRAINING_ONLY:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is blocked: the demo needs only the serving install')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_demo_runs_and_stops_the_server_cleanly(tmp_path, fixture_model):
    # The bundled 3-class model when it is there (the shipped demo), else the fixture model (plumbing).
    model = bundled_models().get("defectscope-3class", fixture_model)
    out_dir = tmp_path / "out"
    # TensorFlow, finufft, Dask and the simulator's modules cannot be imported here, as in `make demo`'s .venv.
    script = (f"import sys; sys.modules.update(dict.fromkeys({SIMULATOR!r})); "
              "from defectscope.server.cli import main; "
              f"sys.exit(main(['demo', '--model', {str(model)!r}, '--out', {str(out_dir)!r}, '--no-measured']))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=_blocking_env(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"bundled example patterns (simulated once, seed {DEMO_SEED}: {WRITE_COMMAND})" in out.stdout
    assert "defectscope serving on tcp://127.0.0.1:" in out.stdout
    table = (out_dir / "demo_table.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["example", "true", "predicted"]
    rows = table[2:]
    assert len(rows) == 6 and {r.split()[-8] for r in rows} <= {"defect_free", "screw", "edge"}  # predicted
    assert {r.split()[-7] for r in rows} <= {"confident", "uncertain"}  # decision
    assert sorted(r.split()[-9] for r in rows) == sorted(["defect_free", "screw", "edge"] * 2)  # true
    assert (out_dir / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "server stopped cleanly (exit code 0)" in out.stdout


def test_the_bundled_examples_are_small_plain_arrays():
    assert EXAMPLES_FILE.stat().st_size < 2e6
    with np.load(EXAMPLES_FILE, allow_pickle=False) as z:  # no object arrays: loads without pickle
        assert z["counts"].dtype == np.uint32 and z["counts"].shape == (6, 64, 64, 64)
        assert int(z["seed"]) == DEMO_SEED and str(z["command"]) == WRITE_COMMAND
    counts, rows, classes = load_examples()
    assert classes == ["defect_free", "screw", "edge"]
    assert [r["label"] for r in rows] == ["defect_free"] * 2 + ["screw"] * 2 + ["edge"] * 2
    assert all(c.max() > 0 for c in counts)


def test_the_bundled_examples_are_what_the_recorded_command_makes(tmp_path):
    pytest.importorskip("finufft")  # the simulator: the training install
    path = tmp_path / "examples.npz"
    cmd = WRITE_COMMAND.split()[1:] + ["--path", str(path)]
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    with np.load(path, allow_pickle=False) as made, np.load(EXAMPLES_FILE, allow_pickle=False) as shipped:
        assert sorted(made.files) == sorted(shipped.files)
        for key in made.files:
            np.testing.assert_array_equal(made[key], shipped[key], err_msg=key)
