"""ONNX Runtime inference of a defectscope model file.

The execution provider is chosen once at load (``auto``: CUDA when onnxruntime-gpu sees a GPU, else CPU)
and the provider *actually in use* is read back from the ``InferenceSession``: asking for CUDA does not
mean getting it, and every reply names the truth.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np

from defectscope.errors import ModelUnavailable, ShapeMismatch
from defectscope.model.decision import OOD_OUTPUT, DecisionRule, parse_decision
from defectscope.model.metadata import INPUT_NAME, OUTPUT_NAME, ModelContract, parse_metadata

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
MISSING_CUDA_POLICIES = ("degrade", "refuse")


def _read_model(path: Path) -> bytes:
    """The model file's bytes, read once: they are hashed and the session is built from them, so the
    sha256 every reply names is that of the model serving, whatever happens to the file afterwards."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelUnavailable(f"model file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ModelUnavailable(f"model file {str(path)!r} cannot be read: {exc.strerror or exc}") from None


class Predictor:
    """A loaded, checked and warmed-up model; ``predict`` is safe to call from several threads."""

    def __init__(
        self,
        path: str | Path,
        *,
        provider: str = "auto",
        on_missing_cuda: str = "degrade",
        intra_op_threads: int | None = None,
        warmup: bool = True,
    ):
        try:
            import onnxruntime as ort
        except ImportError:  # the runtime is an extra (pyproject.toml): one of two, never both
            raise ModelUnavailable("ONNX Runtime is not installed: pip install 'defectscope[cpu]' "
                                   "(or 'defectscope[gpu]' on a CUDA machine)") from None

        if provider not in PROVIDER_CHOICES:
            raise ValueError(f"provider must be one of {PROVIDER_CHOICES}, got {provider!r}")
        if on_missing_cuda not in MISSING_CUDA_POLICIES:
            raise ValueError(f"on_missing_cuda must be one of {MISSING_CUDA_POLICIES}, got {on_missing_cuda!r}")
        self.path = Path(path)
        model = _read_model(self.path)
        self.requested_provider = provider
        # What a reload of another model file needs to load it the same way (server.reload).
        self.load_options = {"provider": provider, "on_missing_cuda": on_missing_cuda,
                             "intra_op_threads": intra_op_threads}
        self.sha256 = hashlib.sha256(model).hexdigest()

        available = ort.get_available_providers()
        cuda_seen = PROVIDERS["cuda"] in available
        if provider == "cuda" and not cuda_seen and on_missing_cuda == "refuse":
            raise ModelUnavailable(
                f"CUDA execution provider requested but onnxruntime offers only {available}"
            )
        wanted = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if provider in ("auto", "cuda") and cuda_seen else [PROVIDERS["cpu"]]

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own types for corrupt or foreign files
            raise ModelUnavailable(f"model file {str(self.path)!r} cannot be loaded: {exc}".splitlines()[0]) from None

        props = self._session.get_modelmeta().custom_metadata_map
        self.contract: ModelContract = parse_metadata(props, source=str(self.path))
        self.decision: DecisionRule = parse_decision(props, source=str(self.path))
        self._check_signature()
        self.provider = self._session.get_providers()[0]
        # Degraded: the operator asked for a GPU and is not getting one (Tango ALARM, health "degraded").
        self.degraded = provider == "cuda" and self.provider != PROVIDERS["cuda"]
        if self.degraded:
            log.warning("CUDA requested for %s but running on %s", self.path.name, self.provider)
        self._lock = threading.Lock()  # guards counters only; InferenceSession.run is thread-safe
        self.warmup_ms = self._warm_up() if warmup else None

    # --------------------------------------------------------------------------------------------
    def _check_signature(self) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        names_in, names_out = [i.name for i in inputs], [o.name for o in outputs]
        if names_in != [INPUT_NAME] or OUTPUT_NAME not in names_out:
            raise ModelUnavailable(
                f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found inputs {names_in} and outputs {names_out}"
            )
        shape = inputs[0].shape
        expected = [*self.contract.pipeline.shape, 1]
        if len(shape) != 5 or [int(s) if isinstance(s, int) else s for s in shape[1:]] != expected:
            raise ModelUnavailable(f"{self.path}: input {INPUT_NAME} has shape {shape}, expected [batch, {expected}]")
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None
        # The out-of-distribution score, when the model file computes one (model.decision).
        self._outputs = [OUTPUT_NAME, OOD_OUTPUT] if OOD_OUTPUT in names_out else [OUTPUT_NAME]
        n_out = outputs[names_out.index(OUTPUT_NAME)].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.contract.classes):
            raise ModelUnavailable(f"{self.path}: {n_out} outputs but card lists {len(self.contract.classes)} classes")

    def _warm_up(self) -> float:
        t0 = time.perf_counter()
        self.predict(np.zeros((1, *self.contract.pipeline.shape), dtype=np.float32))
        return (time.perf_counter() - t0) * 1e3

    # --------------------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        return self.contract.classes

    @property
    def pipeline(self):
        return self.contract.pipeline

    @property
    def card(self) -> dict:
        return self.contract.card

    def describe(self) -> dict:
        """The model identity every reply carries (SPEC §4 ``model``)."""
        return {"name": self.contract.name, "version": self.contract.version, "sha256": self.sha256}

    @property
    def has_ood(self) -> bool:
        return len(self._outputs) > 1

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[B, n_classes]`` (float32) for prepared maps ``[B, *shape]`` or ``[B, *shape, 1]``."""
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, when the model computes it, the out-of-distribution score ``[B]`` (else None),
        from one inference call."""
        shape = self.contract.pipeline.shape
        if batch.ndim == 4:
            batch = batch[..., np.newaxis]
        if batch.ndim != 5 or tuple(batch.shape[1:4]) != shape or batch.shape[4] != 1:
            raise ShapeMismatch(f"prepared batch has shape {batch.shape}, expected [B, {shape}]")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        # Subnormal floats (far from the peak of a max-normalised map) make ONNX Runtime's CPU kernels
        # ~50x slower; they are zeroed here, in the input only. ONNX Runtime's set_denormal_as_zero
        # option is not used: it switches the calling thread's CPU to flush-to-zero, changing floating
        # point for everything else in the process.
        subnormal = (batch != 0) & (np.abs(batch) < np.finfo(np.float32).tiny)
        if subnormal.any():
            batch = np.where(subnormal, np.float32(0), batch)
        if self._fixed_batch and batch.shape[0] != self._fixed_batch:
            parts = [self._run(batch[i : i + 1]) for i in range(batch.shape[0])]
            ood = [p[1] for p in parts]
            return (np.concatenate([p[0] for p in parts], axis=0),
                    None if ood[0] is None else np.concatenate(ood, axis=0))
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._session.run(self._outputs, {INPUT_NAME: batch})
        ood = np.asarray(out[1], dtype=np.float32).reshape(-1) if len(out) > 1 else None
        return np.asarray(out[0], dtype=np.float32), ood
