"""The Keras 3D CNNs of Lim et al. (2021): 3-class (5 Conv3D) and 2-class (3 Conv3D) classifiers.

The paper (Fig. 2, Supplementary Fig. 10) gives the layer counts -- 5 Conv3D + ReLU, 2 dense, softmax,
dropout 0.2 in every layer for 3 classes; 3 Conv3D + 2 dense for 2 classes -- but not the widths. Its
plain reading, "paper" below (3x3x3 kernels, stride 1, widths doubling from 16, 2x2x2 max-pooling after
each convolution, dense 128), trains too slowly on a CPU, so sizes were chosen by measurement
(``python -m defectscope.benchmarks.bench_train_step``, Adam step on 64^3 maps in memory, TF 2.21 CPU,
2-core Intel Xeon VM, otherwise idle; batch 32, samples/s; ``benchmarks/out/train_step.json``):

    3 classes                                     params   train/s   inference/s
    paper: 16-32-64-128-256, stride 1            1.44 M      37        127
    16-32-64-128-128, first stride 2 (chosen)    0.87 M     242        633   (batch 64: 235/s)
    32-64-128-128-128, first stride 2            1.29 M     101        295
    8-16-32-64-128, stride 1                     0.43 M      78        260
    8-16-32-64-128, first stride 2               0.43 M     421        912
    2 classes
    paper: 16-32-64, stride 1                    4.26 M      41        141
    16-32-64, first stride 2 (chosen)            0.59 M     283        691   (batch 64: 273/s)
    32-64-128, first stride 2                    1.33 M     107        320

(With another job holding one of the two cores the chosen 3-class net measured 102-134/s.)
Where the time goes: the stride-1 network spends most of it in the first two convolutions at 64^3 and
32^3. A stride-2 first convolution (3x3x3 kernel: it still reads every voxel, so one-voxel fringe
periods at oversampling 2 stay visible to it) followed by the usual pooling cuts that ~6x; the widths
after it are kept at the paper reading (the last capped at 128: at 2^3 voxels the 256-wide layer only
adds parameters, and the paper notes bigger models overfit). Halving every width as well (8-16-...)
is faster still but leaves half the filters for the first, most informative layers. So: 3 classes
16-32-64-128-128 with first stride 2 (~6.5x the paper reading, ~240 maps/s), 2 classes 16-32-64 with
first stride 2 (~7x). Both are arguments (``Architecture``): ``ARCHITECTURES["paper-3class"]`` etc.
reproduce the plain reading for a GPU.

The network ends in a ``logits`` Dense layer, then a ``temperature`` layer (logits / T, a non-trainable
weight, 1 until calibration) and a softmax named ``probabilities``. Temperature scaling is therefore an
exact part of the graph: the exported ONNX model computes softmax(logits / T), and the ``.keras`` file
carries T with its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from defectscope.model.metadata import INPUT_NAME, OUTPUT_NAME

LOGITS_LAYER = "logits"
TEMPERATURE_LAYER = "temperature"
CLASS_SETS = {3: ("defect_free", "screw", "edge"), 2: ("defect_free", "defective")}


@dataclass(frozen=True)
class Architecture:
    """Sizes of one network; JSON-ready (``asdict``) so the model card records exactly what was trained.

    Each convolution block is Conv3D(k, stride) + ReLU, then MaxPool3D(2) while the map is larger than
    ``min_spatial`` voxels, then dropout. ``first_stride`` 2 makes the first convolution read the 64^3
    map at half resolution on its output grid: the dominant cost of the paper-width network on a CPU.
    """

    filters: tuple[int, ...] = (16, 32, 64, 128, 128)
    kernel_size: int = 3
    first_stride: int = 2
    dense_units: int = 128
    dropout: float = 0.2
    min_spatial: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        d = dict(d)
        d["filters"] = tuple(d["filters"])
        return cls(**d)


# Chosen defaults (see the measurements above). The paper does not give its widths; "paper" is the
# plain reading of its Fig. 2 (stride 1, doubling widths), kept for comparison and for GPU training.
ARCHITECTURES: dict[str, Architecture] = {
    "3class": Architecture(filters=(16, 32, 64, 128, 128), first_stride=2),
    "2class": Architecture(filters=(16, 32, 64), first_stride=2),
    "paper-3class": Architecture(filters=(16, 32, 64, 128, 256), first_stride=1),
    "paper-2class": Architecture(filters=(16, 32, 64), first_stride=1),
}


def default_architecture(n_classes: int) -> Architecture:
    return ARCHITECTURES[f"{n_classes}class"]


def _keras():
    import keras

    return keras


def _temperature_layer_class():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="defectscope")
    class TemperatureScaling(keras.layers.Layer):
        """logits / T with T a non-trainable scalar weight (1 = uncalibrated)."""

        def build(self, input_shape):
            self.temperature = self.add_weight(shape=(), initializer="ones", trainable=False, name="temperature")

        def call(self, logits):
            return logits / self.temperature

    return TemperatureScaling


_TEMPERATURE_CLASS = None


def temperature_scaling_class():
    """The registered ``TemperatureScaling`` layer class (created on first use: keras is imported lazily)."""
    global _TEMPERATURE_CLASS
    if _TEMPERATURE_CLASS is None:
        _TEMPERATURE_CLASS = _temperature_layer_class()
    return _TEMPERATURE_CLASS


def build_model(n_classes: int = 3, architecture: Architecture | None = None, *, shape=(64, 64, 64), seed: int | None = None):
    """A compiled-free Keras model: input ``cxdp`` (batch, *shape, 1) -> softmax ``probabilities``."""
    keras = _keras()
    layers = keras.layers
    arch = architecture or default_architecture(n_classes)
    if n_classes not in CLASS_SETS:
        raise ValueError(f"n_classes must be 2 or 3, got {n_classes}")
    if seed is not None:
        keras.utils.set_random_seed(seed)

    inputs = keras.Input(shape=(*shape, 1), name=INPUT_NAME)
    x = inputs
    size = min(shape)
    for i, f in enumerate(arch.filters):
        stride = arch.first_stride if i == 0 else 1
        x = layers.Conv3D(f, arch.kernel_size, strides=stride, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        size = -(-size // stride)
        if size > arch.min_spatial:
            x = layers.MaxPooling3D(2, name=f"pool{i + 1}")(x)
            size //= 2
        x = layers.Dropout(arch.dropout, name=f"dropout{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(arch.dense_units, activation="relu", name="dense1")(x)
    x = layers.Dropout(arch.dropout, name="dropout_dense")(x)
    logits = layers.Dense(n_classes, name=LOGITS_LAYER)(x)
    scaled = temperature_scaling_class()(name=TEMPERATURE_LAYER)(logits)
    outputs = layers.Softmax(name=OUTPUT_NAME)(scaled)
    return keras.Model(inputs, outputs, name=f"defectscope_{n_classes}class")


def architecture_of(model) -> Architecture:
    """The ``Architecture`` of a model built by ``build_model`` (e.g. loaded with ``--init``), read from its layers."""
    convs = [layer for layer in model.layers if layer.name.startswith("conv")]
    dense = model.get_layer("dense1")
    final = int(model.get_layer("flatten").input.shape[1])  # spatial size left after the last pooling
    return Architecture(
        filters=tuple(int(c.filters) for c in convs), kernel_size=int(convs[0].kernel_size[0]),
        first_stride=int(convs[0].strides[0]), dense_units=int(dense.units),
        dropout=float(model.get_layer("dropout1").rate), min_spatial=final,
    )


def logits_model(model):
    """The same network up to the (uncalibrated) logits, sharing the weights."""
    keras = _keras()
    return keras.Model(model.input, model.get_layer(LOGITS_LAYER).output)


def get_temperature(model) -> float:
    return float(model.get_layer(TEMPERATURE_LAYER).temperature.numpy())


def set_temperature(model, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    model.get_layer(TEMPERATURE_LAYER).temperature.assign(float(temperature))


def load_model(path):
    """Load a ``.keras`` file written by ``defectscope train`` (registers the temperature layer first)."""
    keras = _keras()
    temperature_scaling_class()
    return keras.models.load_model(path, compile=False)
