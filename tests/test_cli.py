"""The command line: a real `defectscope serve` process, classify/info/health, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import bragg_map
from sync import GATED_SERVE, HANG_S, wait_until

CLI = [sys.executable, "-m", "defectscope.server.cli"]


def run_cli(*args, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(fixture_model):
    """`defectscope serve` in a subprocess; ready when it prints its endpoint (no sleeps)."""
    proc = subprocess.Popen([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("defectscope serving on tcp://127.0.0.1:"), line + proc.stderr.read()
    endpoint = line.split()[3]
    yield proc, endpoint
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def test_serve_classify_info_health_and_sigterm(served, tmp_path):
    proc, endpoint = served
    path = tmp_path / "map.npy"
    np.save(path, bragg_map())
    out = run_cli("classify", path, "--server", endpoint, "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] and reply["label"] in reply["classes"]

    out = run_cli("info", "--server", endpoint)
    assert out.returncode == 0 and json.loads(out.stdout)["card"]["name"] == "defectscope-fixture"
    out = run_cli("health", "--server", endpoint)
    assert out.returncode == 0 and json.loads(out.stdout)["requests_total"] >= 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "defectscope stopped" in proc.stdout.read()


def test_local_classify_with_plot(fixture_model, tmp_path):
    path = tmp_path / "map.npy"
    np.save(path, bragg_map())
    png = tmp_path / "slices.png"
    out = run_cli("classify", path, "--model", fixture_model, "--plot", png)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: ") and "ms on CPUExecutionProvider" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_of_a_model_file(fixture_model):
    out = run_cli("info", "--model", fixture_model)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["pipeline"]["shape"] == [64, 64, 64] and info["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    "args, expect",
    [
        (("classify", "/nonexistent/map.npy", "--model", "{model}"), "no such file"),
        (("classify", "{bad}", "--model", "{model}"), "NON_FINITE"),
        (("info", "--model", "/nonexistent/model.onnx"), "MODEL_UNAVAILABLE"),
        (("health", "--server", "tcp://127.0.0.1:1", "--timeout", "0.2"), "no reply"),
    ],
)
def test_errors_are_one_line_and_nonzero(args, expect, fixture_model, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((64, 64, 64), np.nan, np.float32))
    args = [a.format(model=fixture_model, bad=bad) for a in args]
    out = run_cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("defectscope: error:"), out.stderr
    assert expect in lines[0]
    assert "Traceback" not in out.stderr


def test_serving_commands_run_blas_on_one_thread(fixture_model):
    """Regression: multi-threaded OpenBLAS spin-waiting on a busy machine made a 128^3 map take 1.3-4 s
    instead of 25-35 ms; the serving commands now pin numpy's BLAS to one thread before numpy loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([*CLI, "info", "--model", str(fixture_model)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["threads"] == {"openblas_num_threads": "1", "omp_num_threads": "1"}


def test_serve_asked_for_cuda_without_a_gpu_degrades_or_refuses(fixture_model, asym_map):
    """Provider truth over the wire: every reply names the provider really used; 'refuse' does not start."""
    import onnxruntime as ort

    from defectscope.server.client import Client

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime sees CUDA here: asking for it is not degraded")
    refused = run_cli("serve", "--model", fixture_model, "--bind", "tcp://127.0.0.1:*", "--provider", "cuda",
                      "--on-missing-cuda", "refuse")
    assert refused.returncode != 0 and "CUDA" in refused.stderr and "Traceback" not in refused.stderr
    proc = subprocess.Popen([*CLI, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*",
                             "--provider", "cuda", "--on-missing-cuda", "degrade"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "provider=CPUExecutionProvider" in line, line
        with Client(line.split()[3], timeout_s=30, retries=0) as client:
            reply = client.classify(asym_map)
            health = client.health()
        assert reply["provider"] == "CPUExecutionProvider"
        assert health["state"] == "DEGRADED" and health["provider"] == "CPUExecutionProvider"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()


def test_sigterm_answers_requests_in_flight_refuses_new_ones_and_exits_0(fixture_model):
    """SIGTERM with a queue of work: every queued request is answered, a request sent after the signal
    gets BUSY, and the process exits 0 as soon as that work is done (not at its drain limit).

    The server's worker is held (``sync.GATED_SERVE``: each classification waits for a byte on stdin) until
    the signal has been taken, so the work really is queued or in flight then, whatever the machine's load;
    the drain limit is set far above any run (it only bounds a hang), and exiting well before it is checked
    by waiting for the exit for less time than that limit."""
    import zmq

    from defectscope.server.client import Client

    N, DRAIN_S = 24, 600

    proc = subprocess.Popen([*GATED_SERVE, "serve", "--model", str(fixture_model), "--bind", "tcp://127.0.0.1:*",
                             "--drain-s", str(DRAIN_S), "--queue", "32"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        line = proc.stdout.readline()
        assert line.startswith("defectscope serving on"), line
        sock.connect(line.split()[3])
        volume = bragg_map(shape=(128, 128, 128), centre=(60.3, 66.1, 63.2)).astype("<f4")
        spec = {"kind": "map", "shape": list(volume.shape), "dtype": "<f4", "axes": ["q_par", "q_perp1", "q_perp2"]}

        def send(rid):
            header = {"protocol": "defectscope/1", "op": "classify", "request_id": rid, "input": spec}
            sock.send_multipart([b"", json.dumps(header).encode(), volume.tobytes()])

        for i in range(N):
            send(f"queued-{i}")
        with Client(line.split()[3], timeout_s=30, retries=0) as watcher:
            # The worker holds the first request; the other N - 1 wait in the queue.
            wait_until(lambda: watcher.health()["queue_depth"] == N, what=f"all {N} requests held by the server")
            proc.send_signal(signal.SIGTERM)
            # The signal has been taken: new work is refused.
            wait_until(lambda: watcher.health()["state"] == "DRAINING", what="the server draining")
            send("after-sigterm")
            busy = json.loads(sock.recv_multipart()[1]) if sock.poll(HANG_S * 1000) else None
            assert busy is not None and busy["request_id"] == "after-sigterm", busy  # answered while held
            assert watcher.health()["queue_depth"] == N  # nothing was answered or dropped meanwhile
        proc.stdin.close()  # let the worker go: every classification may run now
        replies = [busy]
        while len(replies) < N + 1 and sock.poll(HANG_S * 1000):
            replies.append(json.loads(sock.recv_multipart()[1]))
        code = proc.wait(HANG_S)  # TimeoutExpired: the server waited for its drain limit, not for the work
    finally:
        sock.close(0)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        if not proc.stdin.closed:
            proc.stdin.close()
    by_id = {r["request_id"]: r for r in replies}
    assert len(replies) == N + 1 and len(by_id) == N + 1
    assert all(by_id[f"queued-{i}"]["ok"] for i in range(N)), [r.get("error") for r in replies]
    assert by_id["after-sigterm"]["error"]["reason"] == "BUSY"
    assert code == 0
