"""`defectscope demo` end to end: a real server process, simulated examples, the client, table and figure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from defectscope.model.registry import bundled_models

pytest.importorskip("finufft")


def test_demo_runs_and_stops_the_server_cleanly(tmp_path, fixture_model):
    # The bundled 3-class model when it is there (the shipped demo), else the fixture model (plumbing).
    model = bundled_models().get("defectscope-3class", fixture_model)
    out = subprocess.run([sys.executable, "-m", "defectscope.server.cli", "demo", "--model", str(model),
                          "--out", str(tmp_path), "--no-measured"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "defectscope serving on tcp://127.0.0.1:" in out.stdout
    table = (tmp_path / "demo_table.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["example", "true", "predicted"]
    rows = table[2:]
    assert len(rows) == 6 and {r.split()[-7] for r in rows} <= {"defect_free", "screw", "edge"}
    assert sorted(r.split()[-8] for r in rows) == sorted(["defect_free", "screw", "edge"] * 2)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "server stopped cleanly (exit code 0)" in out.stdout
