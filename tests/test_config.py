"""PipelineConfig: the one versioned source of preprocessing numbers (written into every ONNX model)."""

import json

import pytest

from defectscope.errors import BadMessage
from defectscope.preprocessing.config import SCHEMA_VERSION, Limits, PipelineConfig


def test_json_round_trip_default_and_custom():
    for config in (
        PipelineConfig(),
        PipelineConfig(shape=(48, 64, 32), oversampling_range=None, intensity_transform="log1p",
                       normalisation="sum", min_peak_counts=0.0, negative_clip_fraction=0.05, edge_margin=0),
    ):
        text = config.to_json()
        assert PipelineConfig.from_json(text) == config
        assert PipelineConfig.from_dict(json.loads(text)) == config
        assert json.loads(text)["schema_version"] == SCHEMA_VERSION


def test_json_keeps_types_that_compare_equal():
    # Guards a round trip that turns tuples into lists: a frozen config must hash and compare the same.
    config = PipelineConfig.from_json(PipelineConfig(oversampling_range=(2, 4)).to_json())
    assert config.shape == (64, 64, 64) and isinstance(config.shape, tuple)
    assert config.oversampling_range == (2.0, 4.0) and isinstance(config.oversampling_range, tuple)
    assert hash(config) == hash(PipelineConfig())


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, -1, "1", 1.0, True, None])
def test_unknown_or_malformed_schema_version_refused(version):
    d = PipelineConfig().to_dict()
    d["schema_version"] = version
    with pytest.raises(BadMessage, match="schema_version"):
        PipelineConfig.from_dict(d)


def test_missing_schema_version_refused():
    d = PipelineConfig().to_dict()
    del d["schema_version"]
    with pytest.raises(BadMessage, match="schema_version"):
        PipelineConfig.from_dict(d)


def test_newer_version_refused_by_constructor_too():
    with pytest.raises(BadMessage, match="schema_version"):
        PipelineConfig(schema_version=SCHEMA_VERSION + 1)


def test_unknown_field_refused():
    d = PipelineConfig().to_dict()
    d["median_size"] = 3
    with pytest.raises(BadMessage, match="unknown fields"):
        PipelineConfig.from_dict(d)


def test_fields_added_later_take_their_defaults():
    # A config written before the negative-clip, masked-fraction and isolated-voxel fields still loads.
    d = PipelineConfig().to_dict()
    for name in ("negative_clip_fraction", "masked_fraction_warn", "isolated_voxel_ratio", "isolated_voxel_floor"):
        del d[name]
    assert PipelineConfig.from_dict(d) == PipelineConfig()


@pytest.mark.parametrize("text", ["{", "[1, 2]", b"\xff\xfe", "null"])
def test_bad_json_refused(text):
    with pytest.raises(BadMessage):
        PipelineConfig.from_json(text)


@pytest.mark.parametrize("field, value", [
    ("shape", (64, 64)),
    ("shape", (4, 64, 64)),
    ("oversampling_range", (4.0, 2.0)),
    ("oversampling_range", (0.5, 2.0)),
    ("intensity_transform", "exp"),
    ("normalisation", "l2"),
    ("peak_median_size", 2),
    ("peak_median_size", 0),
    ("peak_median_size", True),
    ("peak_com_halfwidth", 0),
    ("peak_com_halfwidth", 2.5),
    ("edge_margin", -1),
    ("central_peak_ratio", 0.0),
    ("central_peak_ratio", 9.0),
    ("central_peak_ratio", float("nan")),
    ("oversampling_target", 5.0),
    ("oversampling_target", float("nan")),
    ("oversampling_target", True),
    ("min_peak_counts", -1.0),
    ("low_counts_peak", float("inf")),
    ("negative_clip_fraction", 1.5),
    ("masked_fraction_warn", "0.2"),
    ("isolated_voxel_ratio", 1.0),
    ("isolated_voxel_floor", -0.1),
])
def test_invalid_values_refused(field, value):
    with pytest.raises(BadMessage, match=field):
        PipelineConfig(**{field: value})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        PipelineConfig().shape = (32, 32, 32)


def test_limits_defaults_cover_the_protocol_dtypes():
    assert set(Limits().allowed_dtypes) == {"<f4", "<f8", "<u2", "<u4", "<i4"}


@pytest.mark.parametrize("name", ["sqrt.toml", "finetune_rpd.toml", "finetune.toml", "paper_width.toml"])
def test_the_run_configs_in_training_configs_load(name):
    """The run configs the README and cards name are valid: their commands must work as written."""
    from conftest import REPO
    from defectscope.training.train import TrainConfig, load_run_config

    train, pipeline = load_run_config(REPO / "training" / "configs" / name)
    TrainConfig.from_dict(train)
    PipelineConfig.from_dict({"schema_version": SCHEMA_VERSION, **pipeline})
    if name == "sqrt.toml":
        assert pipeline == {"intensity_transform": "sqrt"}
    if name == "paper_width.toml":  # the paper's plain reading (training.model ARCHITECTURES["paper-3class"])
        from defectscope.training.model import ARCHITECTURES, Architecture

        assert Architecture.from_dict(train["architecture"]) == ARCHITECTURES["paper-3class"]


def test_schema_1_is_patched_forward():
    # A v1 model file (autocorrelation estimate, one resampling factor) keeps its trained range, loses the
    # threshold of the estimate it no longer uses, and gets no fixed target.
    d = PipelineConfig().to_dict()
    d.update(schema_version=1, oversampling_threshold=0.02, oversampling_range=[2.0, 3.5])
    del d["oversampling_target"], d["central_peak_ratio"]
    config = PipelineConfig.from_dict(d)
    assert config.schema_version == SCHEMA_VERSION == 2
    assert config.oversampling_range == (2.0, 3.5) and config.oversampling_target is None


def test_target_needs_a_range():
    with pytest.raises(BadMessage, match="oversampling_target"):
        PipelineConfig(oversampling_range=None, oversampling_target=3.0)
