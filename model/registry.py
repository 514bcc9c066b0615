"""Where models come from: a path, or the name of a bundled model in ``model/zoo/``."""

from __future__ import annotations

from pathlib import Path

from defectscope.errors import ModelUnavailable

ZOO = Path(__file__).resolve().parent / "zoo"
DEFAULT_MODEL = "defectscope-3class"


def bundled_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ZOO.glob("*.onnx"))}


def resolve_model(name_or_path: str | Path | None = None) -> Path:
    """A model file path from a path or a bundled name (default: the bundled 3-class model).

    Any path the process can read is accepted, not only the zoo: a name that comes from the network must
    come from an authenticated caller (the ZeroMQ ``reload`` op checks its token first, ``server.reload``)."""
    name = str(name_or_path) if name_or_path else DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.suffix == ".onnx" or path.exists():
        if not path.is_file():
            raise ModelUnavailable(f"model file {name!r} does not exist")
        return path
    zoo = bundled_models()
    if name in zoo:
        return zoo[name]
    have = ", ".join(zoo) or "none yet"
    raise ModelUnavailable(f"no model {name!r}: give a .onnx path or a bundled name (bundled: {have})")


# The bundled models ask each other (server.core.Classifier cross_check): where the 3-class and the 2-class
# model disagree on defect-free vs defective, the reply says so (MODELS_DISAGREE).
CROSS_CHECK = {"defectscope-3class": "defectscope-2class", "defectscope-2class": "defectscope-3class"}


def cross_check_for(model: str | Path) -> Path | None:
    """The bundled model that cross-checks ``model`` (a path or a name): the other bundled one; None for a
    model that is not bundled."""
    zoo = bundled_models()
    path = Path(resolve_model(model)).resolve()
    for name, other in CROSS_CHECK.items():
        if name in zoo and other in zoo and Path(zoo[name]).resolve() == path:
            return zoo[other]
    return None
