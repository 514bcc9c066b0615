"""``defectscope`` command line (SPEC §6). Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from defectscope import __version__
from defectscope.errors import DefectscopeError

EXIT_ERROR = 1


def _fail(message: str) -> int:
    print(f"defectscope: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# -- serve -------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from defectscope.server.zmq_server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.reload_token_file:  # checked before the model loads: an unprotected secret is refused at once
        from defectscope.server.reload import ReloadTokenError, read_token_file

        try:
            read_token_file(args.reload_token_file)
        except ReloadTokenError as exc:
            return _fail(str(exc))
    start_metrics = None
    if args.metrics_port is not None:  # before the model loads: a missing [metrics] extra is refused at once
        try:
            from defectscope.server.metrics import start_metrics
        except ImportError as exc:
            return _fail(f"--metrics-port needs prometheus-client (pip install 'defectscope[metrics]'): {exc}")
    models = served_classifiers(args)
    predictor = next(iter(models.values())).predictor
    results = None
    if args.results:
        from defectscope.server.results import ResultsLog, ResultsLogError

        try:
            results = ResultsLog(args.results, server="zmq", replay_window=args.replay_window)
        except ResultsLogError as exc:
            return _fail(str(exc))
    server = Server(models, args.bind, workers=args.workers, batch_max=args.batch_max, drain_s=args.drain_s,
                    results=results,
                    curve_secret_file=args.curve_secret, curve_allow_dir=args.curve_allow,
                    reload_token_file=args.reload_token_file)
    server.start()
    try:  # Prometheus (server.metrics, docs/prometheus.md)
        metrics = start_metrics(server, args.metrics_port, args.metrics_addr) if start_metrics else None
    except OSError as exc:
        server.stop(drain=False)
        if results is not None:
            results.close()
        return _fail(f"cannot serve metrics on {args.metrics_addr} port {args.metrics_port}: {exc}")

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    # The readiness line: scripts and tests wait for it (it names the real port when binding to :*).
    ident = predictor.describe()
    print(f"defectscope serving on {server.endpoint} model={ident['name']}:{ident['version']} "
          f"provider={predictor.provider}", flush=True)
    if metrics is not None:
        print(f"defectscope metrics on {metrics.url}", flush=True)
    while not stopping.wait(0.5):
        pass
    server.stop(drain=True)
    if metrics is not None:
        metrics.stop()
    if results is not None:
        results.close()
    print("defectscope stopped", flush=True)
    return 0


def served_classifiers(args) -> dict:
    """name -> ``Classifier`` of every model ``serve`` serves, each with its cross-check (the first: the default)."""
    from defectscope.model.predictor import Predictor
    from defectscope.model.registry import resolve_model
    from defectscope.preprocessing.config import Limits
    from defectscope.server.core import Classifier

    def load(model):
        return Predictor(resolve_model(model), provider=args.provider, on_missing_cuda=args.on_missing_cuda,
                         intra_op_threads=args.threads)

    predictors = served_models(args, load)
    limits = Limits(queue_length=args.queue)
    return {name: Classifier(p, limits=limits, data_root=args.data_root, sampling_check=not args.no_sampling_check,
                             cross_check=cross_checker(args, name, p, predictors, load))
            for name, p in predictors.items()}


def served_models(args, load) -> dict:
    """The models ``serve`` loads, by the name requests give them (their card's): ``--model`` and every
    ``--also-model``; without ``--model``, the bundled models (3-class first: the default)."""
    from defectscope.model.registry import DEFAULT_MODEL, bundled_models

    if args.model is None:
        names = [DEFAULT_MODEL, *(n for n in bundled_models() if n != DEFAULT_MODEL)]
    else:
        names = [args.model]
    predictors: dict = {}
    for model in [*names, *(args.also_model or [])]:
        predictor = load(model)
        name = predictor.describe()["name"]
        if name in predictors:
            raise DefectscopeError(f"two models are named {name!r} (their cards' name): serve one of them")
        predictors[name] = predictor
    return predictors


def cross_checker(args, name: str, predictor, served: dict, load):
    """The model that cross-checks ``name`` (``Classifier(cross_check=...)``): ``--cross-check MODEL``, or
    with ``auto`` a served model of the other kind (3-class for 2-class and back), else the other bundled
    one; None with ``none`` or when there is none with the same preparation."""
    from defectscope.model.registry import cross_check_for, resolve_model

    if args.cross_check == "none":
        return None
    if args.cross_check != "auto":
        other = load(resolve_model(args.cross_check))
    else:
        other = next((p for n, p in served.items() if n != name and len(p.classes) != len(predictor.classes)
                      and p.pipeline == predictor.pipeline), None)
        if other is None:
            path = cross_check_for(predictor.path)
            other = load(path) if path is not None else None
    return other if other is not None and other.pipeline == predictor.pipeline else None


# -- classify ----------------------------------------------------------------------------------------
def _load_input(args):
    """(kind, payload): ('map', array) or ('scan', (frames, geometry_dict, mask))."""
    from defectscope.preprocessing import loaders

    path = Path(args.input)
    if args.preset or args.geometry or args.spec:
        from defectscope.preprocessing import scans

        geometry = {}
        if args.geometry:
            try:
                geometry = json.loads(Path(args.geometry).read_text())
            except (OSError, ValueError) as exc:
                raise DefectscopeError(f"cannot read geometry file {args.geometry!r}: {exc}") from None
        if args.preset:
            geometry["preset"] = args.preset
        if args.spec:
            frames, geom, mask = scans.load_spec_tiff_scan(args.spec, args.scan, path, preset=geometry.get("preset", "aps-34idc"),
                                                           dark=args.dark, whitefield=args.whitefield)
            geom = geom.to_dict() if hasattr(geom, "to_dict") else dict(geom)
            geom.update({k: v for k, v in geometry.items() if k != "preset"})
            return "scan", (frames, geom, mask)
        frames, _, mask = scans.load_hdf5_scan(path, args.dataset, mask_dataset=args.mask_dataset)
        return "scan", (frames, geometry, mask)
    return "map", loaders.load_map(path, args.dataset)


def cmd_classify(args) -> int:
    import numpy as np

    kind, payload = _load_input(args)
    from defectscope.preprocessing.frames import CANONICAL_AXES

    axes = args.axes.split(",") if args.axes else list(CANONICAL_AXES)
    if args.server:
        from defectscope.server.client import Client

        with Client(args.server, timeout_s=args.timeout) as client:
            if kind == "map":
                reply = client.classify(payload, axes=axes, intensity=args.intensity, return_prepared=bool(args.plot))
            else:
                frames, geometry, mask = payload
                reply = client.classify_scan(frames, geometry, mask=mask, intensity=args.intensity,
                                             return_prepared=bool(args.plot))
        prepared = reply.pop("prepared", None)
    else:
        from defectscope.model.predictor import Predictor
        from defectscope.model.registry import resolve_model
        from defectscope.server.core import Classifier
        classifier = Classifier(Predictor(resolve_model(args.model), provider=args.provider))
        options = dict(intensity=args.intensity, request_id=Path(args.input).name, return_prepared=bool(args.plot))
        if kind == "map":
            outcome = classifier.classify_map(np.asarray(payload), axes=axes, **options)
        else:
            frames, geometry, mask = payload
            outcome = classifier.classify_scan(np.asarray(frames), geometry, mask=mask, **options)
        reply = outcome.reply
        prepared = np.frombuffer(outcome.frames[0], "<f4").reshape(reply.pop("prepared")["shape"]) if args.plot else None
    if args.plot and prepared is not None:
        from defectscope.server.plots import plot_prepared

        plot_prepared(np.asarray(prepared), reply, args.plot, title=Path(args.input).name)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        probs = ", ".join(f"{c}={p:.3f}" for c, p in zip(reply["classes"], reply["probabilities"]))
        print(f"{args.input}: {reply['label']}  ({probs})  {reply['timings_ms']['total']:.1f} ms on {reply['provider']}")
        for w in reply.get("warnings", []):
            print(f"  warning {w['reason']}: {w['message']}")
    return 0


# -- info / health -----------------------------------------------------------------------------------
def cmd_info(args) -> int:
    if args.server:
        from defectscope.server.client import Client

        with Client(args.server, timeout_s=args.timeout) as client:
            info = client.info()
    else:
        from defectscope.model.predictor import Predictor
        from defectscope.model.registry import resolve_model
        from defectscope.server.core import Classifier

        info = Classifier(Predictor(resolve_model(args.model), provider=args.provider)).info()
    print(json.dumps(info, indent=2))
    return 0


def cmd_health(args) -> int:
    from defectscope.server.client import Client

    with Client(args.server, timeout_s=args.timeout, retries=0) as client:
        print(json.dumps(client.health(), indent=2))
    return 0


# -- parser ------------------------------------------------------------------------------------------
def _model_options(p) -> None:
    p.add_argument("--model", help="ONNX model file or bundled model name (default: defectscope-3class)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the ZeroMQ server")
    _model_options(p)
    p.add_argument("--also-model", action="append", metavar="MODEL",
                   help="serve this model too (repeatable); requests name it with \"model\": its card's name. "
                        "Without --model the bundled models are served, defectscope-3class the default")
    p.add_argument("--bind", default="tcp://127.0.0.1:5557", help="ZeroMQ endpoint (tcp://127.0.0.1:* picks a free port)")
    p.add_argument("--data-root", help="directory that 'file' requests may read (off when absent)")
    p.add_argument("--results", help="HDF5 results log: one row per reply, flushed, readable while serving (SWMR)")
    p.add_argument("--curve-secret", help="CURVE: the server's zmq.auth .key_secret file (with --curve-allow)")
    p.add_argument("--curve-allow", help="CURVE: directory of allowed client public .key files")
    p.add_argument("--reload-token-file", help="enable the 'reload' op for requests carrying the secret in this "
                   "file (chmod 600; at least 16 characters)")
    p.add_argument("--replay-window", type=int, default=100_000,
                   help="with --results: request ids whose ok reply is replayed to a retry (0: off)")
    p.add_argument("--cross-check", default="auto", metavar="MODEL|auto|none",
                   help="a second model asked on every map; where the two disagree on defect-free vs defective the "
                        "reply warns MODELS_DISAGREE (auto: the other bundled model when serving a bundled one)")
    p.add_argument("--no-sampling-check", action="store_true",
                   help="do not classify each map again at other samplings of the trained range "
                        "(SAMPLING_SENSITIVE warnings; three more maps per inference)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--queue", type=int, default=16, help="requests waiting before BUSY")
    p.add_argument("--batch-max", type=int, default=1, metavar="N",
                   help="infer up to N queued single-map requests in one call (default 1: no batching; "
                        "see docs/performance.md for what it gains)")
    p.add_argument("--drain-s", type=float, default=10.0, help="seconds to finish queued work on SIGTERM")
    p.add_argument("--on-missing-cuda", choices=("degrade", "refuse"), default="degrade",
                   help="with --provider cuda and no GPU: serve on CPU (degraded) or refuse to start")
    p.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve Prometheus metrics on http://ADDR:N/metrics (0: a free port, printed at start; "
                        "needs the [metrics] extra; docs/prometheus.md)")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address of the metrics endpoint (default loopback; 0.0.0.0 for a remote Prometheus)")
    p.set_defaults(func=cmd_serve)



def _add_classify(sub, intensities) -> None:
    p = sub.add_parser("classify", help="classify a map or a raw scan, locally or through a server")
    _model_options(p)
    p.add_argument("input", help="map file (.h5/.cxi/.nxs/.npy/.npz/.tif) or raw scan (file, or frames directory with --spec)")
    p.add_argument("--dataset", help="HDF5 dataset path or .npz key")
    p.add_argument("--axes", help="axis names of the map, comma separated (default q_par,q_perp1,q_perp2)")
    p.add_argument("--geometry", help="JSON file with the beamline geometry of a raw scan")
    p.add_argument("--preset", help="beamline geometry preset of a raw scan (aps-34idc, esrf-id01, petra-p10, soleil-sixs)")
    p.add_argument("--spec", help="SPEC file of a TIFF-frame scan (34-ID-C); INPUT is then the frames directory")
    p.add_argument("--scan", type=int, help="scan number in the SPEC file")
    p.add_argument("--dark", help="dark-field TIFF (pixels with dark > 1 are masked)")
    p.add_argument("--whitefield", help="white-field TIFF")
    p.add_argument("--mask-dataset", help="HDF5 dataset of the detector mask of a raw scan")
    p.add_argument("--intensity", choices=intensities, default="counts",
                   help="what the numbers are: photon counts (default; count-based checks apply), relative "
                        "(scaled, e.g. maximum 1) or amplitude (sqrt(I), as phase-retrieval tools store maps)")
    p.add_argument("--server", help="classify through a running server, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--plot", help="write a PNG of three log-scale slices of the prepared map")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    p.set_defaults(func=cmd_classify)



def build_parser() -> argparse.ArgumentParser:
    from defectscope.preprocessing.validate import INTENSITIES  # after main() pinned BLAS (numpy loads here)

    parser = argparse.ArgumentParser(prog="defectscope", description="Defect classification of BCDI patterns")
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_classify(sub, INTENSITIES)
    p = sub.add_parser("info", help="model card, pipeline and provider (of a model file or a server)")
    _model_options(p)
    p.add_argument("--server")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("health", help="state, queue and latency of a running server")
    p.add_argument("--server", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("demo", help="the main job: serve the bundled model and classify example patterns")
    p.add_argument("--model", help="ONNX model (default: the bundled defectscope-3class)")
    p.add_argument("--out", default="demo_out", help="directory for the table and the figure")
    p.add_argument("--no-measured", action="store_true", help="skip the measured 34-ID-C scan")
    p.set_defaults(func=lambda a: __import__("defectscope.server.demo", fromlist=["cmd_demo"]).cmd_demo(a))

    # `watch SYSTEM`: adapters that follow a control system's scans (SPEC §8); each registers its own parser.
    watchers = sub.add_parser("watch", help="classify the scans of a control system as they run").add_subparsers(
        dest="system", required=True)
    from defectscope.server.bliss_config import add_watch_bliss

    add_watch_bliss(watchers)

    from defectscope.server.epics_config import add_watch_epics

    add_watch_epics(watchers)

    # simulate / train / evaluate live in training/ and import their heavy dependencies lazily.
    from defectscope.training import cli as training_cli

    training_cli.register(sub)
    return parser


# Serving does small matrix products on a machine that is busy with other work: multi-threaded
# OpenBLAS spin-waits there (measured: a 128^3 map took 1.3-4 s instead of 25-35 ms). ONNX Runtime has
# its own thread pool, so the serving commands run numpy's BLAS on one thread. Set before numpy loads.
SERVING_COMMANDS = ("serve", "classify", "info", "health", "demo")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in SERVING_COMMANDS for a in argv[:1]) and "numpy" not in sys.modules:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DefectscopeError as exc:
        return _fail(f"{exc.reason}: {exc.message}")
    except TimeoutError as exc:
        return _fail(str(exc))
    except (OSError, ValueError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
