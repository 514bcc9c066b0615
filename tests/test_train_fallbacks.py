"""Training never falls back silently (issue #14, point 9).

- ``--init X.keras`` without the ``X.onnx`` beside it used to train with the default pipeline config,
  whatever the model was trained with: now refused, in one line from the CLI and as ``BadMessage`` from
  ``Run``.
- The prepared-map cache was keyed on the data and the pipeline config but not on the code that
  prepares: ``--resume`` or a shared ``--cache-dir`` reused maps prepared by older code. Now the key
  holds ``preparation_code()`` (package and schema versions, sha256 of the preparation sources).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from conftest import REPO, bragg_map  # noqa: E402

import defectscope.preprocessing  # noqa: E402
from defectscope.preprocessing.config import PipelineConfig  # noqa: E402
from defectscope.training import data  # noqa: E402

from defectscope.errors import BadMessage  # noqa: E402

CLASSES = ("defect_free", "screw", "edge")
ZOO_KERAS = REPO / "model" / "zoo" / "defectscope-3class.keras"
QUIET = {"progress": False, "log": lambda *a: None}


@pytest.fixture(scope="module")
def maps_file(tmp_path_factory):
    maps = np.stack([bragg_map(seed=k, centre=(30.3 + k, 34.1, 29.2 - k)) for k in range(4)])
    path = tmp_path_factory.mktemp("maps") / "measured.h5"
    return data.write_labelled_maps(path, maps, np.array([0, 1, 2, 0]), CLASSES, split=[0, 0, 1, 2])


@pytest.fixture
def lone_keras(tmp_path) -> Path:
    """A real shipped model copied without its .onnx (as a user copying only the .keras file would)."""
    path = tmp_path / "model" / "mine.keras"
    path.parent.mkdir()
    shutil.copyfile(ZOO_KERAS, path)
    return path


# -- --init without its pipeline config ------------------------------------------------------------------
def test_run_refuses_an_init_model_without_its_onnx(tmp_path, maps_file, lone_keras):
    from defectscope.training.train import Run, TrainConfig

    out = tmp_path / "run"
    run = Run([maps_file], out, TrainConfig(epochs=1), init=lone_keras, **QUIET)
    with pytest.raises(BadMessage, match=r"has no mine\.onnx beside it.*pipeline config"):
        run.execute()
    assert not out.exists()  # refused before anything was written


def test_refused_init_leaves_the_previous_run_in_place_under_force(tmp_path, maps_file, lone_keras):
    from defectscope.training.train import CHECKPOINT_DIR, STATE_FILE, Run, TrainConfig

    checkpoints = tmp_path / "run" / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True)
    previous = [checkpoints / STATE_FILE, checkpoints / "epoch-0003.keras", checkpoints / "best-0002.weights.h5"]
    for path in previous:
        path.write_text("{}")
    run = Run([maps_file], tmp_path / "run", TrainConfig(epochs=1), init=lone_keras, force=True, **QUIET)
    with pytest.raises(BadMessage, match="mine.onnx"):
        run.execute()
    assert all(path.is_file() for path in previous)  # --force discards a run only for one that can start


def test_run_refuses_an_init_model_whose_onnx_is_not_onnx(tmp_path, maps_file, lone_keras):
    pytest.importorskip("onnx")
    from defectscope.training.train import Run, TrainConfig

    lone_keras.with_suffix(".onnx").write_bytes(b"not a protobuf \xff\xfe" * 8)
    run = Run([maps_file], tmp_path / "run", TrainConfig(epochs=1), init=lone_keras, **QUIET)
    with pytest.raises(BadMessage, match=r"mine\.onnx' is not a readable ONNX file"):
        run.execute()


def test_cli_init_without_its_onnx_is_one_error_line(tmp_path, maps_file, lone_keras):
    pytest.importorskip("tensorflow")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "defectscope.server.cli", "train", "--data", str(maps_file),
                             "--out", str(out), "--init", str(lone_keras), "--epochs", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "BAD_MESSAGE" in lines[0] and "mine.onnx" in lines[0] and "[pipeline]" in lines[0]
    assert not out.exists()


# -- the prepared-map cache key --------------------------------------------------------------------------
def test_cache_key_holds_the_whole_pipeline_config_and_the_preparation_code(tmp_path, maps_file):
    config = PipelineConfig(intensity_transform="sqrt")
    with data.open_map_file(maps_file) as mf:
        cache = data.PreparedCache(tmp_path, "all", data.select([mf], "all", CLASSES), config)
    assert cache.key["pipeline"] == config.to_dict()
    code = cache.key["code"]
    assert code == data.preparation_code()
    from defectscope import __version__
    from defectscope.preprocessing.config import SCHEMA_VERSION

    assert code["defectscope"] == __version__ and code["pipeline_schema"] == SCHEMA_VERSION
    sources = Path(defectscope.preprocessing.__file__).parent
    assert code["preprocessing_sha256"] == data.source_sha256(sources)


def test_source_digest_changes_with_any_preparation_source(tmp_path):
    sources = Path(defectscope.preprocessing.__file__).parent
    copy = tmp_path / "preprocessing"
    shutil.copytree(sources, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert data.source_sha256(copy) == data.source_sha256(sources)
    pipeline = copy / "pipeline.py"
    pipeline.write_text(pipeline.read_text().replace("def prepare(", "def prepare(  ", 1))
    edited = data.source_sha256(copy)
    assert edited != data.source_sha256(sources)
    (copy / "extra_step.py").write_text("")  # a new module counts too, even an empty one
    assert data.source_sha256(copy) not in (edited, data.source_sha256(sources))


def test_maps_cached_by_other_preparation_code_are_prepared_again(tmp_path, maps_file, monkeypatch):
    config = PipelineConfig()
    with data.open_map_file(maps_file) as mf:
        examples = data.select([mf], "all", CLASSES)
        old = data.PreparedCache(tmp_path, "all", examples, config).build(log=lambda *a: None)
        # What older code left in the shared cache: other numbers under the same data and config.
        stale = np.lib.format.open_memmap(old.array_path, mode="r+")
        stale[:] = 0.5
        stale.flush()
        del stale, old

        # The same tree after an edit of the preparation code: its sources hash differently.
        copy = tmp_path / "edited"
        shutil.copytree(Path(defectscope.preprocessing.__file__).parent, copy,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (copy / "pipeline.py").write_text((copy / "pipeline.py").read_text() + "\n# edited\n")
        edited_code = {**data.preparation_code(), "preprocessing_sha256": data.source_sha256(copy)}
        monkeypatch.setattr(data, "preparation_code", lambda: edited_code)

        fresh = data.PreparedCache(tmp_path, "all", examples, config)
        assert not fresh.ready()
        fresh.build(log=lambda *a: None)
        assert fresh.valid.all()
        for k in range(examples.n):
            np.testing.assert_array_equal(fresh.array[k], mf.prepare(k, config).array)
        assert json.loads(fresh.meta_path.read_text())["key"]["code"] == edited_code
