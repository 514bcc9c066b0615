#!/usr/bin/env python3
"""Register the ``DefectClassifier`` device in a Tango database, with its properties (SPEC §5).

    TANGO_HOST=tango-db:10000 deploy/register_tango.py --config deploy/beamlines/esrf-id01.toml
    deploy/register_tango.py --server DefectClassifier/test --device test/defectscope/1 \\
        --set ModelPath=/opt/models/defectscope-3class.onnx --set Provider=cpu
    deploy/register_tango.py --config deploy/beamlines/petra-p10.toml --dry-run     # check, print, change nothing
    deploy/register_tango.py --config ... --serve-env     # the ZeroMQ server's systemd environment line

Safe to run again: the server and device are (re-)added, properties with a value are written, and
properties left empty are deleted so the device falls back to its default. Needs PyTango only (not
defectscope), so it can run from any machine that reaches the Tango host.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DEVICE_CLASS = "DefectClassifier"
PROPERTIES = ("ModelPath", "Provider", "DataRoot", "ResultsFile", "GeometryPreset")
PROVIDERS = ("auto", "cpu", "cuda")
# The presets defectscope ships (preprocessing/geometry.py); checked here without importing defectscope.
PRESETS = ("aps-34idc", "esrf-id01", "petra-p10", "soleil-sixs")
_DEVICE_NAME = re.compile(r"^[\w.\-]+/[\w.\-]+/[\w.\-]+$")
_SERVER_NAME = re.compile(rf"^{DEVICE_CLASS}/[\w.\-]+$")


class ConfigError(ValueError):
    pass


def load_config(path: Path | None) -> dict:
    """The ``[tango]`` (and ``[zmq]``) tables of a beamline config file; empty without one."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = sorted(set(config) - {"beamline", "tango", "zmq"})
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; expected [beamline], [tango], [zmq]")
    return config


def plan(config: dict, server: str | None, device: str | None, overrides: list[str]) -> tuple[str, str, dict]:
    """(server, device, properties) from the config and the command line, checked."""
    tango_cfg = config.get("tango", {})
    server = server or tango_cfg.get("server")
    device = device or tango_cfg.get("device")
    props = {k: str(v) for k, v in (tango_cfg.get("properties") or {}).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes Property=Value, got {item!r}")
        props[key.strip()] = value.strip()
    if not server or not _SERVER_NAME.match(server):
        raise ConfigError(f"server must be '{DEVICE_CLASS}/<instance>', got {server!r}")
    if not device or not _DEVICE_NAME.match(device):
        raise ConfigError(f"device must be 'domain/family/member', got {device!r}")
    unknown = sorted(set(props) - set(PROPERTIES))
    if unknown:
        raise ConfigError(f"unknown properties {unknown}; {DEVICE_CLASS} has {', '.join(PROPERTIES)}")
    if props.get("Provider") and props["Provider"] not in PROVIDERS:
        raise ConfigError(f"Provider must be one of {', '.join(PROVIDERS)}, got {props['Provider']!r}")
    if props.get("GeometryPreset") and props["GeometryPreset"] not in PRESETS:
        raise ConfigError(f"GeometryPreset must be one of {', '.join(PRESETS)}, got {props['GeometryPreset']!r}")
    for key in ("DataRoot", "ResultsFile"):
        if props.get(key) and not props[key].startswith("/"):
            raise ConfigError(f"{key} must be an absolute path (the device server's working directory is not yours)")
    return server, device, props


def register(server: str, device: str, props: dict) -> None:
    import tango

    db = tango.Database()  # TANGO_HOST says which
    info = tango.DbDevInfo()
    info.name, info._class, info.server = device, DEVICE_CLASS, server
    db.add_server(server, [info], with_dserver=True)
    values = {k: [v] for k, v in props.items() if v}
    if values:
        db.put_device_property(device, values)
    empty = [k for k in PROPERTIES if not props.get(k)]
    if empty:
        db.delete_device_property(device, empty)  # back to the device's defaults


def serve_env(config: dict) -> str:
    """``DEFECTSCOPE_SERVE_ARGS=...`` for /etc/defectscope/zmq.env, from the ``[zmq]`` table."""
    zmq_cfg = config.get("zmq", {})
    args = []
    for key, value in zmq_cfg.items():
        if value in ("", None, False):
            continue
        flag = "--" + key.replace("_", "-")
        args.append(flag if value is True else f"{flag} {value}")
    return "DEFECTSCOPE_SERVE_ARGS=" + " ".join(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="beamline config (TOML), e.g. deploy/beamlines/esrf-id01.toml")
    parser.add_argument("--server", help=f"{DEVICE_CLASS}/<instance> (default: from the config)")
    parser.add_argument("--device", help="domain/family/member (default: from the config)")
    parser.add_argument("--set", action="append", default=[], metavar="Property=Value",
                        help=f"set or override a property ({', '.join(PROPERTIES)}); empty value = default")
    parser.add_argument("--dry-run", action="store_true", help="check and print; do not touch the database")
    parser.add_argument("--serve-env", action="store_true", help="print the ZeroMQ server's environment line and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.serve_env:
            print(serve_env(config))
            return 0
        server, device, props = plan(config, args.server, args.device, args.set)
    except ConfigError as exc:
        print(f"register_tango: error: {exc}", file=sys.stderr)
        return 2
    print(f"server {server}, device {device} (class {DEVICE_CLASS})")
    for key in PROPERTIES:
        print(f"  {key} = {props.get(key) or '(default)'}")
    if args.dry_run:
        return 0
    try:
        register(server, device, props)
    except Exception as exc:  # DevFailed: no TANGO_HOST, database down, ...
        text = exc.args[0].desc if getattr(exc, "args", None) and hasattr(exc.args[0], "desc") else str(exc)
        print(f"register_tango: error: cannot register in the Tango database: {text.strip()}", file=sys.stderr)
        return 1
    print(f"registered; start it with: DefectClassifier {server.split('/', 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
