"""Synchronisation for the tests: wait for states and events, never for a length of time.

On a shared 2-core machine any "sleep, then expect" or "it took less than X s" flakes with the neighbours'
load. The tests here instead hold a worker inside a real classification until they let it go (``Gate``,
``gated``), poll a state with a deadline that only bounds a hang (``wait_until``), and let the OS pick ports.

- ``Gate``: a thread that passes a closed gate waits there until the test opens it; the test can wait for
  the n-th arrival, so it knows a worker is inside a classification.
- ``gated(Classifier, gate)``: a subclass of the real ``server.core.Classifier`` whose ``classify`` and
  ``classify_many`` pass the gate, then run the real method. Synchronisation, not a mock: the real
  preparation and inference still run, only later.
- ``FileGate``: the same across processes (a Tango device server): closed until a file exists.
- ``GATED_SERVE``: ``defectscope serve`` (the real ``server.cli`` entry point) with that subclass in place and
  a ``TokenGate`` on its standard input: each classification first reads one byte of stdin, so a test holds
  the subprocess's worker until it writes a byte, and end of file (stdin closed) opens the gate for good.
  Run as ``[*GATED_SERVE, "serve", ...]``.

This module imports neither numpy nor defectscope at import time: ``python tests/sync.py serve`` must let
``server.cli.main`` set its thread variables before numpy loads, as ``defectscope serve`` does.
"""

from __future__ import annotations

import os
import sys
import threading
import time

HANG_S = 60  # bounds a wait that should end at once: reached only when something is broken

GATED_SERVE = [sys.executable, os.path.abspath(__file__)]


def wait_until(predicate, timeout: float = 30.0, what=None, interval: float = 0.005):
    """Poll ``predicate()`` until it returns something true, and return that; fail with ``what`` (a string,
    or a function giving one, e.g. the last state seen) after ``timeout`` s. The timeout only bounds a
    hang: no correct run gets near it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = (what() if callable(what) else what) or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"still waiting after {timeout:g} s until {name} (last value: {value!r})")
        time.sleep(interval)


class Gate:
    """Threads calling ``passing()`` wait while the gate is closed; the test counts who arrived."""

    def __init__(self, closed: bool = False):
        self._cond = threading.Condition()
        self._open = not closed
        self.arrived = 0

    def close(self) -> None:
        with self._cond:
            self._open = False

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def passing(self, timeout: float = HANG_S) -> None:
        with self._cond:
            self.arrived += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._open, timeout):
                raise AssertionError(f"a thread waited {timeout:g} s at a gate nobody opened")

    def wait_arrived(self, n: int, timeout: float = 30.0) -> None:
        """Return once ``n`` threads in all have reached the gate (passed it, or waiting at it)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.arrived >= n, timeout)
            arrived = self.arrived
        assert ok, f"{arrived} arrivals at the gate after {timeout:g} s, expected {n}"


class TokenGate:
    """A gate across processes: each pass takes one byte from ``fd``; end of file opens it for good."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self._lock = threading.Lock()
        self._eof = False

    def passing(self) -> None:
        with self._lock:
            if not self._eof and os.read(self.fd, 1) == b"":
                self._eof = True


class FileGate:
    """A gate across processes that share a file system: closed until ``path`` exists (the test creates
    it to open the gate); after ``timeout`` s a pass fails, so a forgotten gate cannot hang a process."""

    def __init__(self, path, timeout: float = HANG_S):
        self.path, self.timeout = str(path), timeout

    def passing(self) -> None:
        wait_until(lambda: os.path.exists(self.path), self.timeout, f"{self.path} to exist (a gate)", 0.01)


def gated(classifier_cls, gate):
    """A subclass of ``classifier_cls`` whose classifications pass ``gate`` before the real method runs."""

    class Gated(classifier_cls):
        def classify(self, *args, **kwargs):
            gate.passing()
            return super().classify(*args, **kwargs)

        def classify_many(self, *args, **kwargs):
            gate.passing()
            return super().classify_many(*args, **kwargs)

    Gated.__name__ = Gated.__qualname__ = f"Gated{classifier_cls.__name__}"
    return Gated


def _gated_cli(argv) -> int:
    """``defectscope`` with every ``Classifier`` that ``serve`` makes gated on stdin tokens."""
    from defectscope.server import cli

    real_serve = cli.cmd_serve

    def cmd_serve(args):
        from defectscope.server import core

        core.Classifier = gated(core.Classifier, TokenGate(sys.stdin.fileno()))
        return real_serve(args)

    cli.cmd_serve = cmd_serve  # build_parser() binds it when main() runs
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_gated_cli(sys.argv[1:]))


def reap(proc, timeout: float) -> None:
    """A child process that is still running is killed, then waited for and its pipes closed (a test's
    ``finally``: nothing it started outlives it)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
