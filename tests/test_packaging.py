"""The serving install stays small (no TensorFlow, SPEC §1), has one ONNX Runtime, and runs on the Pythons it admits."""

import ast
import itertools
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name


def test_base_requirements_have_no_tensorflow():
    base = [r for r in metadata.requires("defectscope") if "extra ==" not in r]
    assert base, "the distribution declares its serving requirements"
    assert not [r for r in base if r.lower().startswith(("tensorflow", "tf2onnx", "keras"))]
    train = [r for r in metadata.requires("defectscope") if 'extra == "train"' in r]
    assert any(r.lower().startswith("tensorflow") for r in train)


def test_serving_modules_import_without_tensorflow():
    code = (
        "import sys, defectscope.server.zmq_server, defectscope.server.client, defectscope.server.cli, "
        "defectscope.model.predictor, defectscope.preprocessing.pipeline;"
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_folders_install_under_one_import_name():
    import defectscope.model as model
    import defectscope.preprocessing as preprocessing
    import defectscope.server as server

    for pkg, folder in ((server, "server"), (model, "model"), (preprocessing, "preprocessing")):
        assert pkg.__name__.startswith("defectscope.")
        assert pkg.__file__.replace("\\", "/").endswith(f"{folder}/__init__.py")


# -- one ONNX Runtime per install (issue #14, point 10) ---------------------------------------------------
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: with both, the one unpacked last
# wins (GPU installs that silently ran on CPU). Each is in its own extra, [cpu] or [gpu], and the tests
# below resolve every install the docs give, on each platform the markers tell apart.
REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
PLATFORMS = {  # the marker variables the requirements use, for the machines defectscope is installed on
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "windows-amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}


def resolve(extras, platform: dict) -> set[str]:
    """Names of the direct requirements of `pip install "defectscope[extras]"` on one platform (as pip
    evaluates markers: the base with extra == "", each extra with its own name; self-references expanded)."""
    names, todo, seen = set(), [""], set()
    todo += list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra and extra not in PROJECT["optional-dependencies"]:
            raise AssertionError(f"extra [{extra}] is not declared in pyproject.toml")
        for line in PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**platform, "extra": extra}):
                continue
            if canonicalize_name(req.name) == "defectscope":
                todo += list(req.extras)
            else:
                names.add(canonicalize_name(req.name))
    return names


def documented_installs() -> dict[str, set[frozenset]]:
    """Every extra combination an install command in the docs, the Makefile or the Containerfile names."""
    found = {}
    command = re.compile(r"pip install[^\n]*?[\"']?(?:-e )?(?:\.|/opt/defectscope/src|defectscope)\[([a-z0-9_,-]+)\]")
    for name in ("Makefile", "README.md", "deploy/README.md"):
        found[name] = {frozenset(m.split(",")) for m in command.findall((REPO / name).read_text())}
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    found["deploy/Containerfile"] = {frozenset(m.split(",")) for m in re.findall(r"extras=([a-z0-9_,-]+)", containerfile)}
    return found


def test_every_documented_install_has_exactly_one_onnx_runtime():
    installs = documented_installs()
    assert installs["Makefile"] == {frozenset({"cpu", "test", "train"}), frozenset({"cpu", "demo"})}
    assert installs["deploy/Containerfile"] == {frozenset({"cpu", "tango"}), frozenset({"gpu", "tango"})}
    assert {"cpu", "gpu"} <= {e for combos in installs.values() for combo in combos for e in combo}
    for where, combos in installs.items():
        for combo in combos:
            for platform_name, platform in PLATFORMS.items():
                runtimes = resolve(combo, platform) & RUNTIMES
                assert len(runtimes) == 1, f"{where}: [{','.join(sorted(combo))}] on {platform_name}: {runtimes}"


def test_no_extra_combination_asks_for_both_runtimes():
    """Whatever is added to [train], [test] or [tango], only [cpu] and [gpu] choose a runtime."""
    extras = sorted(PROJECT["optional-dependencies"])
    for n in range(len(extras) + 1):
        for combo in itertools.combinations(extras, n):
            if {"cpu", "gpu"} <= set(combo):  # asking for both by name is the one way to get both
                continue
            for platform_name, platform in PLATFORMS.items():
                runtimes = resolve(combo, platform) & RUNTIMES
                assert runtimes != RUNTIMES, f"[{','.join(combo)}] on {platform_name} asks for both runtimes"
    for platform in PLATFORMS.values():
        assert resolve(["cpu"], platform) & RUNTIMES == {"onnxruntime"}
        assert resolve(["gpu"], platform) & RUNTIMES == {"onnxruntime-gpu"}
        assert resolve([], platform) & RUNTIMES == set()  # the runtime is chosen, never implied


def test_no_installed_dependency_brings_a_runtime_of_its_own():
    """Transitively: nothing that [test,train,tango] pull in (as installed here) asks for a runtime, so
    [gpu,train] gets onnxruntime-gpu alone."""
    def requires(dist_name: str, extras=()) -> list[Requirement]:
        out = []
        for line in metadata.requires(dist_name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                out.append(req)
        return out

    seen, todo, asking = set(), [(req, "defectscope") for req in requires("defectscope", ("test", "train", "tango"))], []
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if name in RUNTIMES:
            asking.append(f"{parent} -> {req}")
        key = (name, frozenset(req.extras))  # a package asked for with extras brings more
        if key in seen or name == "defectscope":
            continue
        seen.add(key)
        try:
            todo += [(r, name) for r in requires(name, tuple(req.extras))]
        except metadata.PackageNotFoundError:  # a marker for another platform, or an optional extra
            continue
    assert len(seen) > 20, "the test and training dependencies are installed here"
    assert asking == [], asking


# -- requires-python ------------------------------------------------------------------------------------------
STDLIB_SINCE = {"tomllib": (3, 11)}  # standard-library modules newer than some Pythons


def _unguarded_imports(path: Path) -> set[str]:
    """Top-level module names imported in a file, leaving out those inside a try that catches ImportError."""
    tree = ast.parse(path.read_text(), str(path))
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                      for n in ast.walk(h.type)) for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_requires_python_admits_no_python_without_the_stdlib_modules_the_code_imports():
    folders = ("defectscope", "server", "model", "preprocessing", "training", "benchmarks", "deploy")
    files = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    used = {m: v for p in files for m in _unguarded_imports(p) & set(STDLIB_SINCE) for v in [STDLIB_SINCE[m]]}
    assert "tomllib" in used, "the code imports tomllib (configs): this test would check nothing"
    major, minor = max(used.values())
    spec = SpecifierSet(PROJECT["requires-python"])
    too_old = [f"3.{m}.{patch}" for m in range(minor) for patch in (0, 99)]
    assert not [v for v in too_old if spec.contains(v)], f"requires-python {spec} admits Pythons without {sorted(used)}"
    assert spec.contains(f"{major}.{minor}.0")


@pytest.mark.parametrize("source", ["preprocessing/config.py"])  # the one reader of config files
def test_the_stdlib_check_sees_tomllib_where_it_is_imported(source):
    assert "tomllib" in _unguarded_imports(REPO / source)


def test_the_stdlib_check_leaves_out_imports_with_a_fallback(tmp_path):
    source = tmp_path / "guarded.py"
    source.write_text("try:\n    import tomllib\nexcept ImportError:\n    import tomli as tomllib\nimport json\n")
    assert _unguarded_imports(source) == {"tomli", "json"}  # the fallback itself is an import like any


def test_serving_without_a_runtime_says_which_extra_to_install(tmp_path):
    """The runtime is an extra ([cpu] or [gpu]): a plain install that lacks it gets one line, no traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['onnxruntime'] = None  # what an install without the extra has\n"
            "from defectscope.server.cli import main; sys.exit(main(['info']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "defectscope[cpu]" in lines[0] and "MODEL_UNAVAILABLE" in lines[0], out.stderr


# -- the shape of the code (a simpler core) ----------------------------------------------------------------------
SOURCE_FOLDERS = ("server", "model", "preprocessing", "training", "benchmarks", "defectscope")


def _sources():
    return sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_no_module_over_450_lines_and_no_function_over_60():
    too_long = []
    for path in _sources():
        text = path.read_text()
        if len(text.splitlines()) > 450:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_the_core_knows_no_wire_and_the_tango_device_is_small():
    core = ast.parse((REPO / "server" / "core.py").read_text())
    imported = {n.module for n in ast.walk(core) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(core) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m.endswith(".protocol") or m == "zmq" or m.startswith("zmq."))}
    assert len((REPO / "server" / "tango_device.py").read_text().splitlines()) <= 250
