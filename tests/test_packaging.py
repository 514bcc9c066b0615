"""The serving install stays small: no TensorFlow in its requirements or its imports (SPEC §1)."""

import subprocess
import sys
from importlib import metadata


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
