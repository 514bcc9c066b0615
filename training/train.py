"""Training: Adam + categorical cross-entropy, best validation accuracy kept, resumable, calibrated, exported.

``train(files, out_dir, config)`` is what ``defectscope train`` runs:

1. prepare the train and validation splits with the ``PipelineConfig`` (cached, ``training.data``);
2. fit with Adam at ``learning_rate``; after ``plateau_patience`` epochs without a new validation-accuracy
   maximum the rate drops once to ``final_learning_rate`` (the paper lowered 1e-3 to 5e-4 at the end);
   after ``stop_patience`` more epochs without a maximum, or at ``epochs``, training stops. The weights of
   the validation-accuracy maximum are kept (the paper stopped there);
3. every epoch writes a checkpoint (model with optimizer state, best weights, the loop's state), so an
   interrupted run continues with ``resume=True`` from where it was, and, data order and dropout being
   seeded per epoch, ends with the weights an uninterrupted run would have;
4. fits the temperature on the validation split (``training.calibration``) and folds it into the model;
5. exports ONNX + card + ``.keras`` (``training.export``), checks ONNX/Keras parity on test maps, and
   scores the test split through the serving path (``training.evaluate``) into the card.

Fine-tuning (``init=MODEL.keras``) starts from a trained model's weights, by default at a tenth of the
learning rates, and prepares maps with the pipeline config of the ``MODEL.onnx`` beside it (refused when
that file is missing and no pipeline is given); add labelled measured maps as another data file
(``training.map_files`` layout 2).

The parts: ``train_config`` (``TrainConfig``), ``checkpoints`` (the loop's state and what a resumed run
reads), ``train_finish`` (temperature, export parity, curves); their names used here are importable from
this module too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from defectscope.preprocessing.config import PipelineConfig, read_config_file
from defectscope.training import data as data_mod
from defectscope.training.checkpoints import (
    CHECKPOINT_DIR,
    STATE_FILE,
    STATE_VERSION,
    LoopState,
    load_model_compiled,
    reseed,
    write_json_atomic,
)
from defectscope.training.model import CLASS_SETS, Architecture
from defectscope.training.train_config import FINE_TUNE_LR_FACTOR, TrainConfig
from defectscope.training.train_finish import export_parity, fit_validation_temperature, plot_history

from defectscope.errors import BadMessage

__all__ = [
    "CHECKPOINT_DIR", "FINE_TUNE_LR_FACTOR", "STATE_FILE", "STATE_VERSION", "LoopState", "Run", "TrainConfig",
    "init_pipeline", "load_model_compiled", "load_run_config", "reseed",
]


def load_run_config(path) -> tuple[dict, dict]:
    """A run config file: JSON or TOML with optional ``train`` and ``pipeline`` tables.

    Returns (train options, pipeline options) as plain dicts; the caller lets command-line flags win.
    """
    d = read_config_file(path, "config", tables=("train", "pipeline"))
    return dict(d.get("train", {})), dict(d.get("pipeline", {}))


# -- the run -------------------------------------------------------------------------------------------
class Run:
    """One training run in ``out_dir``: data, model, loop, export. ``execute()`` does it all."""

    def __init__(self, data_paths, out_dir, config: TrainConfig, *, pipeline: PipelineConfig | None = None,
                 init=None, resume: bool = False, force: bool = False, name: str | None = None,
                 model_version: str = "1.0", command: str = "", progress: bool = True, log=print, cache_dir=None,
                 epochs_given: bool = True):
        """``epochs_given``: whether ``config.epochs`` was asked for (the CLI passes whether --epochs was
        on the command line); on ``resume`` only an asked-for epoch count changes the saved run's."""
        self.data_paths = [Path(p) for p in ([data_paths] if isinstance(data_paths, (str, Path)) else data_paths)]
        if not self.data_paths:
            raise BadMessage("no training data given")
        self.out = Path(out_dir)
        self.ckpt = self.out / CHECKPOINT_DIR
        self.init = Path(init) if init else None
        self.resume, self.force = resume, force
        self._epochs_given = epochs_given
        self.name = name or f"defectscope-{config.classes}class"
        self.model_version, self.command = model_version, command
        self.progress, self.log = progress, log
        self.pipeline = pipeline
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "cache"
        self.classes = CLASS_SETS[config.classes]
        self.state = LoopState()
        self._checked = False
        self._stale: list[Path] = []

    # ------------------------------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        state_path = self.ckpt / STATE_FILE
        if self.resume:
            if not state_path.is_file():
                raise BadMessage(f"nothing to resume: {str(state_path)!r} does not exist")
            saved = json.loads(state_path.read_text())
            if saved.get("version") != STATE_VERSION:
                raise BadMessage(f"{str(state_path)!r} was written by another version of defectscope train")
            # The saved run's settings win, except --epochs: a longer one extends the run, a shorter one
            # ends it there (at once if it is already past), calibrating and exporting its best weights.
            epochs = self.config.epochs if self._epochs_given else None
            self.config = TrainConfig.from_dict(saved["config"])
            extended = epochs is not None and epochs > self.config.epochs
            if epochs is not None and epochs != self.config.epochs:
                self.config = dataclasses.replace(self.config, epochs=epochs)
            self.pipeline = PipelineConfig.from_dict(saved["pipeline"])
            self.name, self.model_version = saved["name"], saved["model_version"]
            self.init = Path(saved["init"]) if saved.get("init") else None
            self.classes = CLASS_SETS[self.config.classes]
            loop = {k: v for k, v in saved["loop"].items() if k in {f.name for f in dataclasses.fields(LoopState)}}
            self.state = LoopState(**loop)
            if extended:  # more epochs asked for: an early stop of the saved run no longer holds
                self.state.stopped = ""
            self._saved_data = saved["data"]
            self._saved_command = saved.get("command", "")
        elif state_path.is_file():
            if not self.force:
                raise BadMessage(f"{str(self.out)!r} holds a run's checkpoints: --resume to continue it, --force to start over")
            # Deleted by execute(), once every input has been checked.
            self._stale = [*self.ckpt.glob("epoch-*.keras"), *self.ckpt.glob("best-*.weights.h5"), state_path]

    def _resolve_pipeline(self) -> PipelineConfig:
        if self.pipeline is not None:
            return self.pipeline
        if self.init is None:
            return PipelineConfig()
        # Fine-tuning keeps the preparation the model was trained with. It is recorded only in the ONNX
        # file exported beside the .keras one; without it the default config could differ from the
        # model's (shape, intensity transform, ...) and the run would train on maps prepared otherwise.
        if not self.init.is_file():
            raise BadMessage(f"--init model {str(self.init)!r} does not exist")
        sibling = self.init.with_suffix(".onnx")
        if not sibling.is_file():
            raise BadMessage(f"--init model {str(self.init)!r} has no {sibling.name} beside it, which holds the "
                             f"pipeline config it was trained with: put it there, or give the pipeline "
                             f"explicitly (a [pipeline] table in --config)")
        return init_pipeline(sibling)

    def _open_data(self):
        files = [data_mod.open_map_file(p, seed=self.config.seed, split_fractions=self.config.split_fractions)
                 for p in self.data_paths]
        identity = [mf.identity() for mf in files]
        if self.resume and [{k: d[k] for k in ("bytes", "n")} for d in self._saved_data] != \
                [{k: d[k] for k in ("bytes", "n")} for d in identity]:
            for mf in files:
                mf.close()
            raise BadMessage("the data files differ from those of the run being resumed")
        return files

    def _build(self):
        import keras
        from defectscope.training.model import architecture_of, build_model, load_model, set_temperature

        cfg = self.config
        arch = Architecture.from_dict(cfg.architecture)
        if self.resume and self.state.model_file:
            model = load_model_compiled(self.ckpt / self.state.model_file)
            model.optimizer.learning_rate.assign(self.state.learning_rate)
            return model
        if self.init is not None:
            if not self.init.is_file():
                raise BadMessage(f"--init model {str(self.init)!r} does not exist")
            model = load_model(self.init)
            n_out = int(model.output.shape[-1])
            if n_out != cfg.classes:
                raise BadMessage(f"--init model has {n_out} classes, this run trains {cfg.classes} (use --classes {n_out})")
            self.config = cfg = dataclasses.replace(cfg, architecture=architecture_of(model).to_dict())
            set_temperature(model, 1.0)  # calibrated again at the end
        else:
            model = build_model(cfg.classes, arch, shape=self.pipeline.shape, seed=cfg.seed)
        model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        self.state.learning_rate = cfg.learning_rate
        return model

    # ------------------------------------------------------------------------------------------------
    def check(self) -> "Run":
        """Refuse bad inputs (MODEL_DIR's state, --init, --resume) before TensorFlow loads or MODEL_DIR is made."""
        if not self._checked:
            self._check_out_dir()
            self.config = self.config.resolved(fine_tune=self.init is not None) if not self.resume else self.config
            self.pipeline = self._resolve_pipeline()
            self._checked = True
        return self

    def execute(self) -> dict:
        self.check()
        import keras

        cfg = self.config
        keras.utils.set_random_seed(cfg.seed)
        for stale in self._stale:  # --force: the previous run's checkpoints
            stale.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        files = self._open_data()
        try:
            return self._execute(files)
        finally:
            for mf in files:
                mf.close()

    def _streams(self, files):
        cfg = self.config
        streams = {}
        for split in data_mod.SPLIT_NAMES:
            examples = data_mod.select(files, split, self.classes)
            cache = None
            if cfg.cache and examples.n:
                cache = data_mod.PreparedCache(self.cache_dir, split, examples, self.pipeline)
                if not cache.ready():
                    self.log(f"preparing {examples.n} {split} maps (cached in {cache.array_path.parent})")
                cache.build(progress=self.progress, log=self.log)
            repeats = data_mod.repeat_factors(examples, cfg.oversample) if split == "train" and cfg.oversample else None
            streams[split] = data_mod.MapStream(examples, self.pipeline, cache=cache, shuffle=split == "train",
                                                augment=cfg.augment and split == "train", seed=cfg.seed,
                                                repeats=repeats)
        return streams

    def _execute(self, files) -> dict:
        streams = self._streams(files)
        train, val = streams["train"], streams["validation"]
        if len(train) == 0:
            raise BadMessage("the training split is empty")
        self._split_sizes = {split: len(stream) for split, stream in streams.items()}
        self.log(f"data: {len(train)} train / {len(val)} validation / {len(streams['test'])} test maps, "
                 f"classes {list(self.classes)}")
        model = self._build()
        self._data_identity = [mf.identity() for mf in files]
        self._data_summary = [mf.summary() for mf in files]
        if not self.resume:
            self._save_state()
        self._loop(model, train, val)

        best = self.ckpt / self.state.best_file
        if self.state.best_file and best.is_file():
            model.load_weights(best)
        result = self._finish(model, streams)
        return result

    def _loop(self, model, train, val) -> None:
        cfg, st = self.config, self.state
        train_ds = train.dataset(cfg.batch)
        val_ds = val.dataset(cfg.batch) if len(val) else None
        verbose = 1 if self.progress and sys.stdout.isatty() else 0
        while st.epoch < cfg.epochs and not st.stopped:
            epoch = st.epoch
            train.epoch = epoch
            reseed(model, cfg.seed, epoch)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                # Without the cache the number of maps per epoch is unknown in advance (refusals): expected.
                warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
                h = model.fit(train_ds, epochs=1, verbose=verbose, shuffle=False).history
            seconds = time.perf_counter() - t0
            if val_ds is not None:
                val.epoch = 0
                val_loss, val_acc = model.evaluate(val_ds, verbose=0)
            else:  # no validation split: judge on the training numbers (reported as such)
                val_loss, val_acc = h["loss"][-1], h["accuracy"][-1]
            record = {"epoch": epoch + 1, "loss": float(h["loss"][-1]), "accuracy": float(h["accuracy"][-1]),
                      "val_loss": float(val_loss), "val_accuracy": float(val_acc),
                      "learning_rate": float(st.learning_rate), "seconds": round(seconds, 2),
                      "samples_per_s": round(len(train) / seconds, 1)}
            st.history.append(record)
            st.epoch = epoch + 1
            if st.improved(val_acc, val_loss):
                st.best_val_accuracy, st.best_val_loss, st.best_epoch, st.since_best = float(val_acc), float(val_loss), st.epoch, 0
                self._save_best(model)
            else:
                st.since_best += 1
            if not st.lowered and st.since_best >= cfg.plateau_patience and cfg.final_learning_rate < st.learning_rate:
                st.lowered, st.since_best = True, 0
                st.learning_rate = cfg.final_learning_rate
                model.optimizer.learning_rate.assign(st.learning_rate)
                self.log(f"  validation accuracy flat for {cfg.plateau_patience} epochs: learning rate -> {st.learning_rate:g}")
            elif st.lowered and cfg.stop_patience and st.since_best >= cfg.stop_patience:
                st.stopped = f"no new validation-accuracy maximum for {cfg.stop_patience} epochs after lowering the rate"
            self._save_checkpoint(model)
            self.log(f"epoch {st.epoch}/{cfg.epochs}  loss {record['loss']:.4f}  acc {record['accuracy']:.4f}  "
                     f"val_loss {record['val_loss']:.4f}  val_acc {record['val_accuracy']:.4f}  "
                     f"({record['samples_per_s']:.0f} maps/s){'  *best' if st.best_epoch == st.epoch else ''}")
        if st.stopped:
            self.log(f"stopped: {st.stopped}")

    # ------------------------------------------------------------------------------------------------
    def _save_best(self, model) -> None:
        name = f"best-{self.state.epoch:04d}.weights.h5"
        model.save_weights(self.ckpt / name)
        old, self.state.best_file = self.state.best_file, name
        self._pending_delete = [old] if old and old != name else []

    def _save_checkpoint(self, model) -> None:
        name = f"epoch-{self.state.epoch:04d}.keras"
        tmp = self.ckpt / f"epoch-{self.state.epoch:04d}.partial.keras"
        model.save(tmp)
        os.replace(tmp, self.ckpt / name)
        old, self.state.model_file = self.state.model_file, name
        self._save_state()  # the state names the new files only once they are complete
        for stale in [old, *getattr(self, "_pending_delete", [])]:
            if stale and stale not in (self.state.model_file, self.state.best_file):
                (self.ckpt / stale).unlink(missing_ok=True)
        self._pending_delete = []

    def _save_state(self) -> None:
        write_json_atomic(self.ckpt / STATE_FILE, {
            "version": STATE_VERSION, "name": self.name, "model_version": self.model_version,
            "config": self.config.to_dict(), "pipeline": self.pipeline.to_dict(),
            "init": str(self.init) if self.init else None, "data": self._data_identity,
            "command": self.command if not self.resume else getattr(self, "_saved_command", self.command),
            "loop": dataclasses.asdict(self.state),
        })

    # ------------------------------------------------------------------------------------------------
    def _finish(self, model, streams) -> dict:
        from defectscope.training import export
        from defectscope.training.evaluate import evaluate_model, summary_metrics

        cfg, st = self.config, self.state
        temperature, calib = fit_validation_temperature(model, streams["validation"], cfg.batch)
        self.log(f"temperature {temperature:.4f} (validation NLL {calib.get('nll_before')} -> {calib.get('nll_after')})")

        onnx_path = self.out / f"{self.name}.onnx"
        card = self._card(temperature, calib, test_metrics={})
        export.export_model(model, onnx_path, pipeline=self.pipeline, card=card)
        worst, n_parity = export_parity(model, onnx_path, streams, cfg.parity_maps)
        self.log(f"exported {onnx_path} (ONNX vs Keras max |diff| {worst:.2e} on {n_parity} maps)")

        metrics = {}
        if len(streams["test"]):
            metrics = evaluate_model(onnx_path, self.data_paths, split="test", seed=cfg.seed,
                                     split_fractions=cfg.split_fractions, progress=self.progress)
            write_json_atomic(self.out / f"{self.name}.test-metrics.json", metrics)
            self.log(f"test accuracy {metrics['accuracy']:.4f} on {metrics['n']} maps")
        card = self._card(temperature, calib, test_metrics=summary_metrics(metrics) if metrics else {},
                          parity=worst, n_parity=n_parity)
        export.update_card(onnx_path, card)
        write_json_atomic(self.out / "history.json", st.history)
        plot_history(st.history, self.out / "training-curves.png", st.best_epoch)
        return {"onnx": str(onnx_path), "keras": str(onnx_path.with_suffix(".keras")), "card": card,
                "temperature": temperature, "parity_max_abs": worst, "test_metrics": metrics}

    def _card(self, temperature, calib, test_metrics, parity=None, n_parity=None) -> dict:
        import keras
        import tensorflow as tf
        from defectscope.training.export import changes_from_paper, utc_now

        from defectscope import __version__

        cfg, st = self.config, self.state
        card = {
            "name": self.name, "version": self.model_version, "classes": list(self.classes), "created": utc_now(),
            "training_data": {"files": self._data_summary, "seed": cfg.seed, "maps_used": self._split_sizes},
            "test_metrics": test_metrics,
            # A resumed run's card names the command that started it, and the one that resumed it.
            "training_command": (getattr(self, "_saved_command", "") or self.command) if self.resume else self.command,
            **({"resumed_with": self.command} if self.resume else {}),
            "changes_from_paper": changes_from_paper(cfg.architecture, augment=cfg.augment, classes=cfg.classes),
            "architecture": cfg.architecture,
            "training": {"config": cfg.to_dict(), "epochs_run": st.epoch, "best_epoch": st.best_epoch,
                         "best_val_accuracy": st.best_val_accuracy, "stopped": st.stopped or "epoch limit",
                         "fine_tuned_from": str(self.init) if self.init else None,
                         "temperature": temperature, "calibration": calib,
                         "onnx_keras_parity_max_abs": parity, "parity_maps": n_parity,
                         "software": {"defectscope": __version__, "tensorflow": tf.__version__,
                                      "keras": keras.__version__, "python": platform.python_version()}},
        }
        return card


def init_pipeline(onnx_path: Path) -> PipelineConfig:
    """The pipeline config recorded in a defectscope ONNX file (the one an --init model was trained with)."""
    import onnx
    from defectscope.model.metadata import parse_metadata

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise BadMessage(f"{str(onnx_path)!r} is not a readable ONNX file ({type(exc).__name__}); "
                         f"it should hold the --init model's pipeline config") from None
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, str(onnx_path)).pipeline


