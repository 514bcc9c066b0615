"""What ``defectscope watch bliss`` follows and how: a frozen, versioned ``BlissWatchConfig`` and its command line.

This module imports neither blissdata nor redis, so ``defectscope --help`` and a config check work on the
serving install; the watcher itself is ``server.bliss`` (the ``[bliss]`` extra). Names follow BLISS: a
*channel* is a stream of a scan (``axis:eta``, ``mpx1x4:image``), a *positioner* a motor whose position
at the start of the scan is in ``scan_info["positioners"]["positioners_start"]``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from defectscope.errors import BadMessage

SCHEMA_VERSION = 1

# Identity fields of a blissdata scan (ESRFIdentityModel); --filter keys are looked up here, then in scan_info.
IDENTITY_FIELDS = ("name", "number", "data_policy", "session", "proposal", "collection", "dataset", "path")


@dataclass(frozen=True)
class BlissWatchConfig:
    """Everything the BLISS watcher needs; checked once, at start. Keys of a config file are these fields."""

    schema_version: int = SCHEMA_VERSION
    redis_url: str = ""  # the BLISS data Redis (Beacon's "redis_data" URL), e.g. redis://id01-bliss:25002
    server: str = "tcp://127.0.0.1:5557"  # the `defectscope serve` that classifies
    # The 2-D detector channel; empty: the scan's only channel whose frames are 2-D.
    detector: str = ""
    preset: str = "esrf-id01"
    # The rocking motor by its preset name (empty: the preset's) and the channel that records it
    # (empty: "axis:<positioner of the rocking motor>"). A scan is a rocking scan when it scans that
    # channel and no other axis.
    rocking_motor: str = ""
    rocking_channel: str = ""
    # Preset motor name -> BLISS positioner name, where they differ (e.g. {"nu": "nu_det"}).
    motors: Mapping[str, str] = field(default_factory=dict)
    # Fixed SPEC §4 geometry fields: energy_eV, distance_m, pixel_size_m, direct_beam, and angles of
    # motors BLISS does not know (these win over positioners).
    geometry: Mapping[str, Any] = field(default_factory=dict)
    # Without geometry.energy_eV: this positioner's start value, in keV (the ESRF convention), is the energy.
    energy_positioner: str = "energy"
    # Only scans whose identity field or scan_info key matches each glob, e.g. {"session": "id01", "type": "*scan"}.
    filters: Mapping[str, str] = field(default_factory=dict)
    model: str = ""
    intensity: str = ""
    results: str = ""  # HDF5 results log of this watcher: one row per scan, errors included
    publish_prefix: str = "defectscope"  # Redis keys <prefix>:result:<scan key> and stream <prefix>:results
    result_ttl_s: int = 7 * 24 * 3600
    results_stream_maxlen: int = 10_000
    frame_timeout_s: float = 60.0  # a scan that sends nothing for this long is an error
    server_timeout_s: float = 60.0  # the server's answer after the last frame
    reconnect_s: float = 2.0  # wait between two tries to reach a Redis that went away

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise BadMessage(f"bliss watch config schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise BadMessage(f"redis_url must be redis://HOST:PORT (or rediss://, unix://), got {self.redis_url!r}")
        from defectscope.preprocessing.beamline_presets import PRESETS

        if self.preset not in PRESETS:
            raise BadMessage(f"unknown geometry preset {self.preset!r} (known: {', '.join(PRESETS)})")
        motors = self.preset_motors()
        if self.rocking_motor and self.rocking_motor not in motors:
            raise BadMessage(f"rocking motor {self.rocking_motor!r} is not a motor of {self.preset} ({', '.join(motors)})")
        for name in set(self.motors) - set(motors):
            raise BadMessage(f"motors: {name!r} is not a motor of {self.preset} ({', '.join(motors)})")
        for key in ("rocking", "preset"):
            if key in self.geometry:
                raise BadMessage(f"geometry.{key} comes from the scan and the preset, not from the config")
        for name, value in (("frame_timeout_s", self.frame_timeout_s), ("server_timeout_s", self.server_timeout_s),
                            ("reconnect_s", self.reconnect_s), ("result_ttl_s", self.result_ttl_s),
                            ("results_stream_maxlen", self.results_stream_maxlen)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise BadMessage(f"{name} must be a positive number, got {value!r}")

    # -- derived names -------------------------------------------------------------------------------------
    def preset_motors(self) -> tuple[str, ...]:
        from defectscope.preprocessing.beamline_presets import PRESETS

        p = PRESETS[self.preset]
        return tuple(dict.fromkeys((*p.sample_motors, *p.detector_motors)))

    def rocking(self) -> str:
        """The rocking motor's preset name."""
        from defectscope.preprocessing.beamline_presets import PRESETS

        return self.rocking_motor or PRESETS[self.preset].rocking_motor

    def positioner(self, motor: str) -> str:
        """The BLISS positioner of a preset motor."""
        return self.motors.get(motor, motor)

    def rocking_stream(self) -> str:
        return self.rocking_channel or f"axis:{self.positioner(self.rocking())}"

    def selects(self, identity: Mapping[str, Any], info: Mapping[str, Any]) -> bool:
        """True when the scan matches every filter (a key it lacks does not match)."""
        for key, glob in self.filters.items():
            value = identity.get(key) if key in IDENTITY_FIELDS else info.get(key)
            if value is None or not fnmatch.fnmatchcase(str(value), str(glob)):
                return False
        return True

    # -- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlissWatchConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadMessage(f"bliss watch config has unknown fields {unknown} (known: {sorted(names)})")
        for key in ("motors", "geometry", "filters"):
            if key in d and not isinstance(d[key], Mapping):
                raise BadMessage(f"{key} must be a table (mapping), got {type(d[key]).__name__}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in dataclasses.fields(self)}


# -- the command line --------------------------------------------------------------------------------------
def add_watch_bliss(watchers) -> None:
    """``defectscope watch bliss``: registered by ``server.cli`` on its ``watch`` sub-commands."""
    p = watchers.add_parser("bliss", help="classify BLISS rocking scans from blissdata (Redis) as they run",
                            description="Follow new scans in a blissdata store, stream the frames of each rocking "
                                        "scan to a defectscope server, and publish the answers (docs/bliss.md).")
    p.add_argument("--config", help="TOML or JSON file of BlissWatchConfig fields (flags below override it)")
    p.add_argument("--redis", dest="redis_url", help="the BLISS data Redis, e.g. redis://id01-bliss:25002")
    p.add_argument("--server", help="defectscope server (default tcp://127.0.0.1:5557)")
    p.add_argument("--filter", action="append", metavar="KEY=GLOB",
                   help="only scans whose identity field (session, proposal, name, ...) or scan_info key "
                        "(type, title, ...) matches GLOB; repeatable (all must match)")
    p.add_argument("--detector", help="2-D detector channel, e.g. mpx1x4:image (default: the scan's only 2-D one)")
    p.add_argument("--preset", help="geometry preset (default esrf-id01)")
    p.add_argument("--rocking-motor", help="rocking motor by its preset name (default: the preset's)")
    p.add_argument("--rocking-channel", help="channel of the rocking motor (default axis:<its positioner>)")
    p.add_argument("--motor", action="append", metavar="NAME=POSITIONER",
                   help="BLISS positioner of a preset motor where the names differ; repeatable")
    p.add_argument("--geometry", help="JSON file of fixed geometry fields (energy_eV, distance_m, direct_beam, ...)")
    p.add_argument("--results", help="HDF5 results log of the watcher (one row per scan, errors included)")
    p.add_argument("--model", help="the server's model to ask (default: its first)")
    p.add_argument("--publish-prefix", help="Redis key prefix of the published answers (default defectscope)")
    p.add_argument("--frame-timeout", dest="frame_timeout_s", type=float,
                   help="seconds without data after which a running scan is an error (default 60)")
    p.add_argument("--max-scans", type=int, help="stop after this many rocking scans (default: run until SIGTERM)")
    p.set_defaults(func=cmd_watch_bliss)


def _pairs(items, what: str) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadMessage(f"{what} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args) -> BlissWatchConfig:
    """The config file (if any) with the flags given on the command line laid over it."""
    from defectscope.preprocessing.config import read_config_file

    d = dict(read_config_file(args.config, "bliss watch config")) if args.config else {}
    for key in ("redis_url", "server", "detector", "preset", "rocking_motor", "rocking_channel", "results",
                "model", "publish_prefix", "frame_timeout_s"):
        if getattr(args, key, None) is not None:
            d[key] = getattr(args, key)
    if args.filter:
        d["filters"] = {**d.get("filters", {}), **_pairs(args.filter, "--filter")}
    if args.motor:
        d["motors"] = {**d.get("motors", {}), **_pairs(args.motor, "--motor")}
    if args.geometry:
        d["geometry"] = {**d.get("geometry", {}), **read_config_file(args.geometry, "geometry file")}
    return BlissWatchConfig.from_dict(d)


def cmd_watch_bliss(args) -> int:
    import logging
    import signal
    import threading

    config = config_from_args(args)
    try:
        from defectscope.server.bliss import BlissWatcher
    except ImportError as exc:
        raise BadMessage(f"watch bliss needs blissdata (pip install 'defectscope[bliss]'): {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def ready(watcher):  # the readiness line: scripts and tests wait for it
        print(f"defectscope watching {config.redis_url} for rocking scans ({config.rocking_stream()}, "
              f"detector {config.detector or 'the only 2-D channel'}), server {config.server}", flush=True)

    with BlissWatcher(config) as watcher:
        watcher.run(stop, max_scans=args.max_scans, on_ready=ready)
        print(f"defectscope watch stopped: {watcher.classified} classified, {watcher.failed} failed", flush=True)
    return 0
