"""``MapStream``: the (map, one-hot) pairs of one split for ``tf.data``, from a ``PreparedCache`` or prepared
as they are read, reshuffled and augmented per epoch from the seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from defectscope.preprocessing.config import PipelineConfig
from defectscope.training.augment import augment_mirror

from defectscope.errors import DefectscopeError

if TYPE_CHECKING:
    from defectscope.training.data import Examples, PreparedCache


class MapStream:
    """A generator of (map[..., None], one-hot) over one split: from a ``PreparedCache``, or preparing
    each map as it is read (``cache=None``). Index order reshuffled every epoch from (seed, epoch)."""

    def __init__(self, examples: Examples, config: PipelineConfig, *, cache: PreparedCache | None = None,
                 shuffle: bool = False, augment: bool = False, seed: int = 0, repeats: np.ndarray | None = None):
        self.examples, self.config, self.cache = examples, config, cache
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.epoch = 0  # the next epoch's number; set by the trainer when it resumes
        self.refused = 0
        eye = np.eye(examples.n_classes, dtype=np.float32)
        self.onehot = eye[examples.labels] if examples.n else np.zeros((0, examples.n_classes), np.float32)
        self.indices = np.arange(examples.n) if cache is None else np.flatnonzero(cache.valid)
        if repeats is not None:  # oversampling: an example appears repeats[k] times per epoch
            self.indices = np.repeat(self.indices, np.asarray(repeats)[self.indices])

    def __len__(self) -> int:
        return int(self.indices.size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.indices.size)]

    def __call__(self):
        epoch = self.epoch
        self.epoch += 1
        rng = np.random.default_rng([self.seed, epoch, 1])
        for k in self.order(epoch):
            if self.cache is not None:
                x = np.asarray(self.cache.array[k])
            else:
                mf, i = self.examples.locate(k)
                try:
                    x = mf.prepare(i, self.config).array
                except DefectscopeError:
                    self.refused += 1
                    continue
            if self.augment:
                x = augment_mirror(x, rng)
            yield x[..., None], self.onehot[k]

    def dataset(self, batch: int, prefetch: int = 2):
        import tensorflow as tf

        signature = (tf.TensorSpec((*self.config.shape, 1), tf.float32),
                     tf.TensorSpec((self.examples.n_classes,), tf.float32))
        ds = tf.data.Dataset.from_generator(self, output_signature=signature)
        if self.cache is not None:  # the number of maps is known: Keras then sizes its epochs and progress bar
            ds = ds.apply(tf.data.experimental.assert_cardinality(len(self)))
        return ds.batch(batch).prefetch(prefetch)

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``limit`` maps (in order) and their labels as arrays (small sets: calibration, parity)."""
        maps, labels = [], []
        saved = (self.shuffle, self.augment, self.epoch)
        self.shuffle = self.augment = False
        try:
            for x, y in self():
                maps.append(x)
                labels.append(int(np.argmax(y)))
                if limit is not None and len(maps) >= limit:
                    break
        finally:
            self.shuffle, self.augment, self.epoch = saved
        shape = (0, *self.config.shape, 1)
        return (np.stack(maps) if maps else np.zeros(shape, np.float32)), np.asarray(labels, dtype=np.int64)
