"""`TeacherCache`: a data set relabelled once by the teacher, kept on disk.

The DIS paper relabels the training set with the teacher once, before
training. A full ranking per sample (`N x C`) does not fit for many classes,
so the cache keeps each sample's packed teacher targets (see
`keras_dis.pack_teacher_targets`): the label, the tail logit and the top-`R`
classes and logits, `N x (2 + 2R)` float32 in all.

A cache is a directory:

| file            | content                                              |
|-----------------|------------------------------------------------------|
| `targets.npy`   | the packed targets, `(N, 2 + 2R)` float32, read as a |
|                 | read-only memory map (the data set may exceed memory) |
| `metadata.json` | format version, `num_examples`, `num_classes`,       |
|                 | `top_r`, the sha256 of the labels, creation time     |

`TeacherCache.build` writes into a hidden sibling directory and renames it
to `path` only once complete, so an interrupted build never leaves a cache
that reads as valid.
"""

import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np

from keras_dis.src import teacher_targets as targets_module

FORMAT_VERSION = 1
TARGETS_FILE = "targets.npy"
METADATA_FILE = "metadata.json"
METADATA_KEYS = (
    "format_version",
    "num_examples",
    "num_classes",
    "top_r",
    "labels_sha256",
    "created",
)
# Targets are spilled here when the number of samples is not known up front.
_SPILL_FILE = "targets.spill"
_COPY_ROWS = 65536
_REBUILD = (
    "Rebuild it with `keras_dis.TeacherCache.build(path, teacher, inputs, "
    "labels, top_r, overwrite=True)`."
)


def _as_labels(labels, arg_name="labels"):
    """Integer labels as a flat little-endian int64 array (hashed as is)."""
    labels = np.asarray(labels)
    if (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.ndim not in (1, 2)
        or (labels.ndim == 2 and labels.shape[1] != 1)
    ):
        raise ValueError(
            f"`{arg_name}` must be integer class ids of shape (num_examples,) "
            f"or (num_examples, 1). Received: {arg_name} with dtype "
            f"{labels.dtype} and shape {labels.shape}"
        )
    return labels.reshape(-1).astype("<i8")


def _check_batch_size(batch_size):
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            "`batch_size` must be an integer >= 1. "
            f"Received: batch_size={batch_size!r}"
        )


def _is_array_inputs(inputs):
    """Whether `inputs` are whole arrays (indexed by sample), not batches."""
    if isinstance(inputs, dict):
        return bool(inputs) and all(
            isinstance(array, np.ndarray) for array in inputs.values()
        )
    return isinstance(inputs, np.ndarray)


def _num_samples(inputs):
    sizes = {len(array) for array in keras.tree.flatten(inputs)}
    if len(sizes) != 1:
        raise ValueError(
            "All input arrays must have the same number of samples. "
            f"Received arrays with {sorted(sizes)} samples"
        )
    return sizes.pop()


def _take(inputs, index):
    return keras.tree.map_structure(lambda array: array[index], inputs)


def _labelled_batches(inputs, labels, batch_size):
    """Yields `(x, labels)` batches, labels as from `_as_labels`."""
    if _is_array_inputs(inputs):
        num_samples = _num_samples(inputs)
        if labels is None or num_samples != len(labels):
            raise ValueError(
                "With array `inputs`, `labels` must give one label per "
                f"sample ({num_samples}). Received: "
                f"{'None' if labels is None else len(labels)} labels"
            )
        for start in range(0, len(labels), batch_size):
            index = slice(start, start + batch_size)
            yield _take(inputs, index), labels[index]
        return
    start = 0
    for batch in inputs:
        x, batch_labels, _ = keras.utils.unpack_x_y_sample_weight(batch)
        x = keras.tree.map_structure(np.asarray, x)
        stop = start + _num_samples(x)
        if labels is None:
            if batch_labels is None:
                raise ValueError(
                    "`inputs` yields batches without labels: pass `labels`, "
                    "or make `inputs` yield `(x, labels)` batches."
                )
            batch_labels = _as_labels(batch_labels)
        else:
            if stop > len(labels):
                raise ValueError(
                    f"`inputs` yields more samples than `labels` has "
                    f"({len(labels)})."
                )
            expected = labels[start:stop]
            if batch_labels is not None and not np.array_equal(
                _as_labels(batch_labels), expected
            ):
                raise ValueError(
                    f"The labels that `inputs` yields for samples [{start}, "
                    f"{stop}) differ from `labels`. Iterate `inputs` in the "
                    "order of `labels` (no shuffling)."
                )
            batch_labels = expected
        yield x, batch_labels
        start = stop


def _npy_from_spill(spill_file, targets_file, width):
    """Copies raw float32 rows into a new `.npy` file; removes the spill."""
    spilled = np.memmap(spill_file, dtype="float32", mode="r")
    spilled = spilled.reshape(-1, width)
    targets = np.lib.format.open_memmap(
        targets_file, mode="w+", dtype="float32", shape=spilled.shape
    )
    for start in range(0, len(spilled), _COPY_ROWS):
        rows = slice(start, start + _COPY_ROWS)
        targets[rows] = spilled[rows]
    del spilled
    os.remove(spill_file)
    return targets


def _relabel(directory, predict, batches, num_examples, top_r, progbar):
    """Runs the teacher over `batches` and writes the cache into `directory`.

    Returns:
        The metadata dict of the cache.
    """
    targets_file = os.path.join(directory, TARGETS_FILE)
    spill_file = os.path.join(directory, _SPILL_FILE)
    digest = hashlib.sha256()
    targets, num_classes, written = None, None, 0
    for x, labels in batches:
        teacher_logits = keras.ops.convert_to_numpy(predict(x))
        if num_classes is None:
            num_classes = teacher_logits.shape[-1]
        elif teacher_logits.shape[-1] != num_classes:
            raise ValueError(
                "The teacher must return the same number of classes for "
                f"every batch. Received: {teacher_logits.shape[-1]} after "
                f"{num_classes}"
            )
        packed = keras.ops.convert_to_numpy(
            targets_module.pack_teacher_targets(labels, teacher_logits, top_r)
        )  # (batch, 2 + 2R)
        if num_examples is None:
            with open(spill_file, "ab") as spill:
                spill.write(packed.tobytes())
        else:
            if targets is None:
                targets = np.lib.format.open_memmap(
                    targets_file,
                    mode="w+",
                    dtype="float32",
                    shape=(num_examples, packed.shape[1]),
                )
            targets[written : written + len(packed)] = packed
        digest.update(labels.tobytes())
        written += len(packed)
        progbar.update(written)
    if written == 0:
        raise ValueError("`inputs` yielded no samples.")
    if num_examples is None:
        targets = _npy_from_spill(spill_file, targets_file, packed.shape[1])
    elif written != num_examples:
        raise ValueError(
            f"`inputs` yielded {written} samples, but `labels` has "
            f"{num_examples}."
        )
    targets.flush()
    return {
        "format_version": FORMAT_VERSION,
        "num_examples": written,
        "num_classes": int(num_classes),
        "top_r": targets_module.top_r_of(packed),
        "labels_sha256": digest.hexdigest(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


class TeacherCache:
    """The teacher's top-`R` ranking of every sample of a data set, on disk.

    Opens a cache written by `TeacherCache.build`: the packed teacher
    targets of `N` samples, `(N, 2 + 2R)` float32 (label, tail logit,
    top-`R` classes, top-`R` logits; see `keras_dis.pack_teacher_targets`),
    as a read-only memory map, so a data set larger than memory works and
    only the rows read are loaded. Row `i` belongs to sample `i` of the
    inputs the cache was built from, in that order.

    Indexing returns packed targets as float32 NumPy arrays, ready to be
    `y` of `keras_dis.Distiller.fit` (the teacher is then not run);
    `keras_dis.TeacherCacheDataset` pairs them with the inputs batch by
    batch. `validate()` checks that the cache belongs to a data set.

    Args:
        path: the cache's directory.

    Example:

    ```python
    cache = keras_dis.TeacherCache.build(
        "cache/train", teacher, x_train, y_train, top_r=100
    )
    cache = keras_dis.TeacherCache("cache/train")  # later runs
    cache.validate(labels=y_train, num_classes=1000)
    distiller.fit(keras_dis.TeacherCacheDataset(x_train, cache, 256))
    ```
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        metadata_file = os.path.join(self.path, METADATA_FILE)
        if not os.path.isfile(metadata_file):
            raise ValueError(
                f"No teacher cache at {self.path!r}: {METADATA_FILE} is "
                "missing. Build one with `keras_dis.TeacherCache.build(path, "
                "teacher, inputs, labels, top_r)`; an interrupted build "
                "leaves nothing at `path`."
            )
        try:
            with open(metadata_file) as file:
                metadata = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The teacher cache at {self.path!r} has an unreadable "
                f"{METADATA_FILE} ({error}). {_REBUILD}"
            ) from error
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"The teacher cache at {self.path!r} has format version "
                f"{version!r}; this keras_dis reads version {FORMAT_VERSION}. "
                f"{_REBUILD}"
            )
        missing = [key for key in METADATA_KEYS if key not in metadata]
        if missing:
            raise ValueError(
                f"The teacher cache at {self.path!r} lacks {missing} in its "
                f"{METADATA_FILE}. {_REBUILD}"
            )
        self.metadata = metadata
        try:
            self.targets = np.load(
                os.path.join(self.path, TARGETS_FILE), mmap_mode="r"
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"The teacher cache at {self.path!r} has an unreadable "
                f"{TARGETS_FILE} ({error}). {_REBUILD}"
            ) from error
        expected_shape = (
            self.num_examples,
            targets_module.targets_width(self.top_r),
        )
        if (
            self.targets.shape != expected_shape
            or self.targets.dtype != "float32"
        ):
            raise ValueError(
                f"The teacher cache at {self.path!r} holds targets of shape "
                f"{self.targets.shape} and dtype {self.targets.dtype}, but "
                f"its {METADATA_FILE} says {expected_shape} float32: the "
                f"cache was modified or is corrupt. {_REBUILD}"
            )

    @classmethod
    def build(
        cls,
        path,
        teacher,
        inputs,
        labels=None,
        top_r=None,
        batch_size=256,
        overwrite=False,
        verbose=1,
    ):
        """Relabels a data set with the teacher and writes a cache to `path`.

        Runs the teacher in inference mode over `inputs`, batch by batch
        (`teacher.predict_on_batch(x)` for a Keras model, else
        `teacher(x)`), packs each batch with `keras_dis.pack_teacher_targets`
        and writes the rows to disk as they come, so neither the inputs nor
        the targets need to fit in memory. A progress bar shows the samples
        done.

        The cache is written into a hidden temporary directory beside `path`
        and renamed to `path` once complete: if the build is interrupted,
        nothing is left at `path` (a hard kill may leave the hidden
        `.<name>.*.partial` directory behind, never read as a cache).

        Args:
            path: directory to create. It must not exist, unless it holds a
                teacher cache and `overwrite=True`.
            teacher: a trained `keras.Model` returning logits
                `(batch, num_classes)`, or any callable mapping a batch of
                inputs to such logits.
            inputs: the data set, in a fixed order (row `i` of the cache
                belongs to its sample `i`): a NumPy array or a dict of NumPy
                arrays (`np.memmap` for data larger than memory), batched by
                `batch_size`; or an iterable of batches (a generator, a
                non-shuffled `tf.data.Dataset`, ...) yielding `x` or
                `(x, labels)`, whose elements `np.asarray` accepts.
            labels: int array `(num_examples,)`, the ground-truth labels.
                Required with array inputs. With an iterable of `(x, labels)`
                batches it may be left `None`; when given, the batches'
                labels are checked against it, which catches a shuffled
                iterable (and the targets go straight to their final file
                instead of through a spill file copied at the end).
            top_r: int in `[1, num_classes]`, how many teacher-ranked classes
                to keep per sample. Defaults to all (`num_classes`).
            batch_size: int, batch size of the teacher for array inputs
                (iterables keep their own batches).
            overwrite: bool, whether to replace an existing cache at `path`.
            verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end).

        Returns:
            The new `TeacherCache`, opened from `path`.

        Example:

        ```python
        teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(20)])
        x = np.random.rand(1000, 8).astype("float32")
        labels = np.random.randint(0, 20, size=1000)
        cache = keras_dis.TeacherCache.build(
            "/tmp/teacher_cache", teacher, x, labels, top_r=5, overwrite=True
        )
        cache.targets.shape  # (1000, 12)
        ```
        """
        path = os.fspath(path)
        if os.path.lexists(path):
            if not overwrite:
                raise ValueError(
                    f"`path` already exists: {path!r}. Pass overwrite=True to "
                    "replace a teacher cache, or choose another path."
                )
            if not os.path.isfile(os.path.join(path, METADATA_FILE)):
                raise ValueError(
                    f"`path` exists and is not a teacher cache: {path!r}. "
                    "overwrite=True only replaces a teacher cache; choose "
                    "another path."
                )
        _check_batch_size(batch_size)
        predict = getattr(teacher, "predict_on_batch", teacher)
        if not callable(predict):
            raise ValueError(
                "`teacher` must be a keras.Model or a callable returning "
                f"logits. Received: teacher={teacher!r}"
            )
        labels = None if labels is None else _as_labels(labels)
        num_examples = None if labels is None else len(labels)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(
            prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent
        )
        try:
            metadata = _relabel(
                staging,
                predict,
                _labelled_batches(inputs, labels, batch_size),
                num_examples,
                top_r,
                keras.utils.Progbar(
                    num_examples, verbose=verbose, unit_name="sample"
                ),
            )
            with open(os.path.join(staging, METADATA_FILE), "w") as file:
                json.dump(metadata, file, indent=2)
                file.flush()
                os.fsync(file.fileno())
            if os.path.lexists(path):
                retired = staging + ".old"
                os.replace(path, retired)
                os.replace(staging, path)
                shutil.rmtree(retired)
            else:
                os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(path)

    @property
    def num_examples(self):
        """Number of samples `N`."""
        return self.metadata["num_examples"]

    @property
    def num_classes(self):
        """Number of classes `C` of the teacher."""
        return self.metadata["num_classes"]

    @property
    def top_r(self):
        """Number of teacher-ranked classes `R` kept per sample."""
        return self.metadata["top_r"]

    @property
    def labels_fingerprint(self):
        """sha256 hex digest of the labels (as little-endian int64)."""
        return self.metadata["labels_sha256"]

    def validate(self, labels=None, num_examples=None, num_classes=None):
        """Checks that this cache belongs to a data set.

        Args:
            labels: optional int array, the data set's labels in order;
                compared by count and by sha256 fingerprint.
            num_examples: optional int, the data set's number of samples.
            num_classes: optional int, the student's number of classes.

        Raises:
            ValueError: if any given value does not match the cache.
        """
        labels = None if labels is None else _as_labels(labels)
        for arg_name, received, expected, unit in (
            (
                "len(labels)",
                None if labels is None else len(labels),
                self.num_examples,
                "samples",
            ),
            ("num_examples", num_examples, self.num_examples, "samples"),
            ("num_classes", num_classes, self.num_classes, "classes"),
        ):
            if received is not None and received != expected:
                raise ValueError(
                    f"The teacher cache at {self.path!r} does not match the "
                    f"data set: it was built with {expected} {unit}. "
                    f"Received: {arg_name}={received}. {_REBUILD}"
                )
        if (
            labels is not None
            and hashlib.sha256(labels.tobytes()).hexdigest()
            != self.labels_fingerprint
        ):
            raise ValueError(
                f"The teacher cache at {self.path!r} does not match the data "
                "set: `labels` differ from the labels it was built with "
                "(sha256 fingerprint mismatch), so the data set changed or "
                f"is in another order. {_REBUILD}"
            )

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index):
        return np.array(self.targets[index], dtype="float32")

    def __reduce__(self):
        # Pickles (e.g. to worker processes) as its path, not its contents.
        return (type(self), (self.path,))

    def __repr__(self):
        return (
            f"TeacherCache(path={self.path!r}, num_examples="
            f"{self.num_examples}, num_classes={self.num_classes}, "
            f"top_r={self.top_r})"
        )


class TeacherCacheDataset(keras.utils.PyDataset):
    """Batches of inputs paired with their cached teacher targets.

    A `keras.utils.PyDataset` yielding `(x_batch, targets_batch)`, where
    `targets_batch` are the packed targets `(batch, 2 + 2R)` read from a
    `TeacherCache`, so `keras_dis.Distiller.fit` trains without running the
    teacher, on every backend, reading only one batch at a time from disk
    (`np.memmap` inputs stay on disk too).

    With `shuffle=True` the samples are permuted anew every epoch (the
    indices of a batch are sorted, so reads from memory maps stay
    sequential). `fit()`'s own `shuffle` argument only reorders whole
    batches of a `PyDataset`.

    Args:
        inputs: a NumPy array or a dict of NumPy arrays, the inputs the
            cache was built from, in the same order.
        cache: a `TeacherCache`, or the path of one.
        batch_size: int >= 1.
        shuffle: bool, whether to permute the samples every epoch.
        seed: optional int, seed of the permutation.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    Example:

    ```python
    cache = keras_dis.TeacherCache("cache/train")
    distiller.fit(
        keras_dis.TeacherCacheDataset(x_train, cache, 256, shuffle=True),
        epochs=30,
    )
    ```
    """

    def __init__(
        self, inputs, cache, batch_size=32, shuffle=False, seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        if not isinstance(cache, TeacherCache):
            cache = TeacherCache(cache)
        if not _is_array_inputs(inputs):
            raise ValueError(
                "`inputs` must be a NumPy array or a dict of NumPy arrays. "
                f"Received: inputs of type {type(inputs).__name__}"
            )
        if _num_samples(inputs) != len(cache):
            raise ValueError(
                f"`inputs` has {_num_samples(inputs)} samples but the teacher "
                f"cache at {cache.path!r} has {len(cache)}: it belongs to "
                "another data set."
            )
        _check_batch_size(batch_size)
        self.inputs = inputs
        self.cache = cache
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(len(cache))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.cache) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(
                f"Batch index {index} out of range [0, {len(self)})"
            )
        start = index * self.batch_size
        indices = self._order[start : start + self.batch_size]
        if self.shuffle:
            indices = np.sort(indices)
        return _take(self.inputs, indices), self.cache[indices]

    def on_epoch_end(self):
        if self.shuffle:
            self._rng.shuffle(self._order)
