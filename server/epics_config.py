"""Configuration and command line of the EPICS PV Access bridge (``server.epics``), without p4p.

``defectscope watch epics`` (alias ``watch pva``, SPEC §6) reads its settings from flags, or from a TOML /
JSON file (``--config``) whose keys are the fields of :class:`BridgeConfig`; flags given on the command
line win over the file. The geometry is the SPEC §4 scan geometry (``--geometry FILE`` and/or ``--preset``);
without ``rocking.start_deg``/``step_deg`` they come from the rocking motor's readings of the first two
frames. The config is checked once, at start: unknown keys and out-of-range numbers are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass, field

from defectscope.errors import BadMessage

SCHEMA_VERSION = 1
PV_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:.[]<>;{}$()")


@dataclass(frozen=True)
class BridgeConfig:
    """What the bridge follows and where it publishes (``docs/epics.md`` lists an IOC's real PV names).

    ``frames_pv``: the NTNDArray of the frames (areaDetector ``NDPluginPva``: ``$(P)Pva1:Image``).
    ``motor_pv``: the rocking motor's readback (``$(P)m1.RBV``; its value when a frame arrives, unless the
    frame carries ``motor_attribute``, an NDAttribute with the motor readback at exposure time).
    ``acquire_pv``: a scan runs while it is non-zero: it starts at its rise and ends with the ``n``-th
    frame (``cam1:Acquire`` with ``ImageMode`` Multiple, or an sscan record's ``EXSC``).
    ``num_images_pv`` or ``n_frames``: the frames per scan (``cam1:NumImages_RBV``, ``scan1.NPTS``).
    ``prefix``: the result PVs are ``<prefix>label``, ``<prefix>probabilities``, ...
    ``frame_timeout_s``: a scan that gets no frame for this long fails; ``end_grace_s``: after
    ``acquire_pv`` falls, how long frames still on their way are waited for.
    """

    frames_pv: str
    motor_pv: str
    acquire_pv: str
    prefix: str
    geometry: dict = field(default_factory=dict)
    num_images_pv: str | None = None
    n_frames: int | None = None
    motor_attribute: str | None = None
    model: str | None = None
    intensity: str | None = None
    frame_timeout_s: float = 30.0
    end_grace_s: float = 5.0
    monitor_queue: int = 1000
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        for name in ("frames_pv", "motor_pv", "acquire_pv", "prefix", "num_images_pv"):
            value = getattr(self, name)
            if value is None and name == "num_images_pv":
                continue
            if not isinstance(value, str) or not value or set(value) - PV_NAME_CHARS:
                raise BadMessage(f"epics bridge: {name} must be a PV name (letters, digits, _-:.[]<>;{{}}$()), "
                                 f"got {value!r}")
        if (self.num_images_pv is None) == (self.n_frames is None):
            raise BadMessage("epics bridge: give exactly one of num_images_pv (e.g. $(P)cam1:NumImages_RBV) "
                             "and n_frames")
        if self.n_frames is not None and (not isinstance(self.n_frames, int) or self.n_frames < 2):
            raise BadMessage(f"epics bridge: n_frames must be an integer >= 2, got {self.n_frames!r}")
        for name in ("frame_timeout_s", "end_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 3600:
                raise BadMessage(f"epics bridge: {name} must be in (0, 3600] s, got {value!r}")
        if not isinstance(self.monitor_queue, int) or not 2 <= self.monitor_queue <= 100_000:
            raise BadMessage(f"epics bridge: monitor_queue must be in [2, 100000], got {self.monitor_queue!r}")
        if not isinstance(self.geometry, dict):
            raise BadMessage("epics bridge: geometry must be a table (SPEC §4 scan geometry)")
        if self.schema_version != SCHEMA_VERSION:
            raise BadMessage(f"epics bridge: schema_version {self.schema_version!r} unknown (this is {SCHEMA_VERSION})")
        object.__setattr__(self, "geometry", copy.deepcopy(self.geometry))

    @classmethod
    def from_dict(cls, d: dict) -> "BridgeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadMessage(f"epics bridge config has unknown fields {unknown} (known: {sorted(names)})")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise BadMessage(f"epics bridge config needs {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- command line ------------------------------------------------------------------------------------
_FLAGS = {  # flag dest -> config field
    "frames": "frames_pv", "motor": "motor_pv", "acquire": "acquire_pv", "prefix": "prefix",
    "num_images": "num_images_pv", "n_frames": "n_frames", "motor_attribute": "motor_attribute",
    "model": "model", "intensity": "intensity", "frame_timeout_s": "frame_timeout_s",
    "end_grace_s": "end_grace_s",
}


def add_watch_epics(watch_sub) -> None:
    """``watch epics`` (alias ``pva``) on the ``watch`` subcommand group."""
    p = watch_sub.add_parser("epics", aliases=["pva"], help="classify the rocking scans an EPICS areaDetector "
                             "publishes over PV Access; serve the results as PVs (docs/epics.md)")
    p.add_argument("--config", help="TOML or JSON file whose keys are the bridge's settings (flags win)")
    p.add_argument("--frames", metavar="PV", help="NTNDArray PV of the frames, e.g. 13SIM1:Pva1:Image")
    p.add_argument("--motor", "--rocking", dest="motor", metavar="PV", help="rocking motor readback, e.g. IOC:m1.RBV")
    p.add_argument("--acquire", metavar="PV", help="non-zero while a scan runs, e.g. 13SIM1:cam1:Acquire")
    p.add_argument("--num-images", metavar="PV", help="frames per scan, e.g. 13SIM1:cam1:NumImages_RBV")
    p.add_argument("--n-frames", type=int, help="frames per scan (instead of --num-images)")
    p.add_argument("--motor-attribute", metavar="NAME", help="NDAttribute of each frame holding the motor readback")
    p.add_argument("--prefix", help="prefix of the result PVs, e.g. 34idc:defectscope:")
    p.add_argument("--geometry", help="JSON/TOML file with the SPEC §4 scan geometry")
    p.add_argument("--preset", help="beamline geometry preset (aps-34idc, esrf-id01, petra-p10, soleil-sixs)")
    p.add_argument("--model", help="model the server should use (its card's name; default: the server's first)")
    p.add_argument("--intensity", choices=("counts", "relative", "amplitude"))
    p.add_argument("--frame-timeout-s", type=float)
    p.add_argument("--end-grace-s", type=float)
    p.add_argument("--server", default="tcp://127.0.0.1:5557", help="the defectscope serve endpoint")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server's answer")
    p.set_defaults(func=cmd_watch_epics)


def config_from_args(args) -> BridgeConfig:
    from defectscope.preprocessing.config import read_config_file

    d = read_config_file(args.config, "epics bridge config") if args.config else {}
    for dest, name in _FLAGS.items():
        if getattr(args, dest, None) is not None:
            d[name] = getattr(args, dest)
    geometry = dict(d.get("geometry") or {})
    if args.geometry:
        geometry.update(read_config_file(args.geometry, "geometry file"))
    if args.preset:
        geometry["preset"] = args.preset
    d["geometry"] = geometry
    return BridgeConfig.from_dict(d)


def cmd_watch_epics(args) -> int:
    """Run the bridge until SIGTERM / SIGINT; the readiness line names the result PVs' server."""
    config = config_from_args(args)  # checked before p4p loads: a bad flag is one line
    try:
        from defectscope.server.epics import EpicsBridge
    except ImportError as exc:
        print(f"defectscope: error: watch epics needs p4p (pip install 'defectscope[epics]'): {exc}", file=sys.stderr)
        return 1
    from defectscope.server.client import Client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with Client(args.server, timeout_s=args.timeout, retries=0) as client, EpicsBridge(client, config) as bridge:
        conf = bridge.server_conf
        print(f"defectscope watching {config.frames_pv} for {args.server}; results as {config.prefix}* on PVA "
              f"{conf['EPICS_PVAS_INTF_ADDR_LIST']} tcp {conf['EPICS_PVAS_SERVER_PORT']} "
              f"udp {conf['EPICS_PVAS_BROADCAST_PORT']}", flush=True)
        while not stopping.wait(0.5):
            pass
    print("defectscope stopped", flush=True)
    return 0

