"""`TeacherCache`: a data set relabelled once by the teacher, kept on disk.

The DIS paper relabels the training set with the teacher once, before
training. A full ranking per sample (`N x C`) does not fit for many classes,
so the cache keeps each sample's packed teacher targets (see
`keras_dis.pack_teacher_targets`): the label, the tail logit and the top-`R`
classes and logits, `N x (2 + 2R)` float32 in all.

A cache is a directory:

| file                   | content                                        |
|------------------------|------------------------------------------------|
| `targets-<hex>.npy`    | the packed targets, `(N, 2 + 2R)` float32, read |
|                        | as a read-only memory map (the data set may     |
|                        | exceed memory); the name is unique per build    |
| `metadata.json`        | format version, `num_examples`, `num_classes`,  |
|                        | `top_r`, `targets_file` (the name above), the   |
|                        | sha256 of the targets (`targets_sha256`) and of |
|                        | the labels, the inputs' fingerprint, creation   |
|                        | time                                            |

Caches of format version 1 (`targets.npy`, no checksum, no fingerprint)
still open; their inputs and contents are checked only by value range.

Writes are atomic: `metadata.json` names the targets file, so at every
instant `path` holds a complete cache, the old one or the new one.

- A new cache is written into a hidden sibling directory, renamed to `path`
  once complete.
- `overwrite=True` writes the new targets beside the old ones under a new
  name, then replaces `metadata.json` with one `os.replace` (the switch),
  then deletes the old targets file. A build killed before the switch
  leaves the old cache readable (plus a stray targets file, deleted by the
  next build); killed after it, the new one.

Reads are checked: every row read through `TeacherCache.__getitem__` (so
every batch of `TeacherCacheDataset`) must hold integer labels and class ids
in `[0, num_classes)` and finite logits, and `TeacherCache.verify()` compares
the whole file against its sha256. `TeacherCacheDataset` checks that its
inputs are those the cache was built from, by a fingerprint of at most 64
evenly spaced sample rows.
"""

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings

import keras
import numpy as np

from keras_dis.src import input_checks
from keras_dis.src import teacher_targets as targets_module

FORMAT_VERSION = 2
# Versions this module reads: 1 had `targets.npy` and no checksum.
READABLE_FORMAT_VERSIONS = (1, 2)
METADATA_FILE = "metadata.json"
# The targets file of format version 1 caches.
LEGACY_TARGETS_FILE = "targets.npy"
METADATA_KEYS = (
    "format_version",
    "num_examples",
    "num_classes",
    "top_r",
    "labels_sha256",
    "created",
)
# Keys added by format version 2.
CHECKED_METADATA_KEYS = ("targets_file", "targets_sha256", "inputs_fingerprint")
# How many sample rows of the inputs the fingerprint covers, at most.
FINGERPRINT_ROWS = 64
_TARGETS_NAME = re.compile(r"targets(-[0-9a-f]{32})?\.npy\Z")
# Files a build writes (or wrote, when killed): deleted once not in use.
_BUILD_FILE_NAME = re.compile(
    r"(targets(-[0-9a-f]{32})?\.(npy|spill)|\.metadata-[0-9a-f]{32}\.tmp)\Z"
)
# Bytes of targets read at once when copying or verifying.
_CHUNK_BYTES = 32 * 2**20
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
    input_checks.check_positive_integer("batch_size", batch_size)


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


def _rows_per_chunk(width):
    return max(1, _CHUNK_BYTES // (4 * width))


# The inputs' fingerprint: sha256 over the sample rows at multiples of a
# power-of-two stride, the smallest that keeps at most FINGERPRINT_ROWS rows.
# The rows depend only on the number of samples, so the fingerprint can be
# taken while batches stream by (the stride doubles as samples arrive) or
# read directly from arrays, with the same result.


def _fingerprint_stride(num_samples):
    stride = 1
    while math.ceil(num_samples / stride) > FINGERPRINT_ROWS:
        stride *= 2
    return stride


def _canonical_row(row):
    """A row in a dtype that does not depend on how the data was loaded.

    Floats become float32 (so float64 data and its float32 copy fed to the
    teacher agree), integers and booleans int64, little-endian.
    """
    row = np.asarray(row)
    kind = row.dtype.kind
    if kind in "iub":
        return np.ascontiguousarray(row, dtype="<i8")
    if kind == "c":
        return np.ascontiguousarray(row, dtype="<c8")
    if kind in "US":
        return np.ascontiguousarray(row)
    try:  # floats, and float types NumPy sees as "V" (bfloat16)
        return np.ascontiguousarray(row, dtype="<f4")
    except (TypeError, ValueError):
        return np.frombuffer(repr(row.tolist()).encode(), dtype="u1")


def _row_digest(arrays, position, sample_index):
    """sha256 of sample `sample_index`, at `position` of the batch `arrays`."""
    digest = hashlib.sha256(np.array(sample_index, dtype="<i8").tobytes())
    for array in arrays:
        row = _canonical_row(array[position])
        digest.update(f"{row.dtype.str}{row.shape}".encode())
        digest.update(row.tobytes())
    return digest.digest()


def _combine_row_digests(row_digests):
    digest = hashlib.sha256(b"keras_dis inputs fingerprint 1")
    for row_digest in row_digests:
        digest.update(row_digest)
    return digest.hexdigest()


class _StreamingFingerprint:
    """The inputs' fingerprint, taken batch by batch."""

    def __init__(self):
        self.num_samples = 0
        self._stride = 1
        self._row_digests = {}

    def update(self, x):
        arrays = keras.tree.flatten(x)
        start, stop = self.num_samples, self.num_samples + _num_samples(x)
        stride = _fingerprint_stride(stop)
        if stride != self._stride:
            self._stride = stride
            self._row_digests = {
                index: row_digest
                for index, row_digest in self._row_digests.items()
                if index % stride == 0
            }
        for index in range(-(-start // stride) * stride, stop, stride):
            self._row_digests[index] = _row_digest(arrays, index - start, index)
        self.num_samples = stop

    def hexdigest(self):
        return _combine_row_digests(
            self._row_digests[index] for index in sorted(self._row_digests)
        )


def _array_fingerprint(inputs):
    """The fingerprint of array inputs; reads only the rows it covers."""
    num_samples = _num_samples(inputs)
    indices = np.arange(0, num_samples, _fingerprint_stride(num_samples))
    arrays = keras.tree.flatten(_take(inputs, indices))
    return _combine_row_digests(
        _row_digest(arrays, position, index)
        for position, index in enumerate(indices)
    )


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


def _are_class_ids(values, num_classes):
    """Whether finite `values` are all integers in `[0, num_classes)`."""
    return (
        values.size == 0
        or values.min() >= 0
        and values.max() < num_classes
        and np.array_equal(np.floor(values), values)
    )


def _fsync_file(file_path):
    with open(file_path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_directory(directory):
    """Makes renames inside `directory` durable (POSIX only)."""
    if os.name != "posix":
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_build_files(directory, keep):
    """Deletes targets, spill and temporary files not named in `keep`."""
    for name in os.listdir(directory):
        if _BUILD_FILE_NAME.match(name) and name not in keep:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass  # e.g. still memory-mapped on Windows: next build


def _npy_from_spill(spill_file, targets_file, width):
    """Copies raw float32 rows into a new `.npy` file; removes the spill."""
    spilled = np.memmap(spill_file, dtype="<f4", mode="r")
    spilled = spilled.reshape(-1, width)
    targets = np.lib.format.open_memmap(
        targets_file, mode="w+", dtype="<f4", shape=spilled.shape
    )
    chunk = _rows_per_chunk(width)
    for start in range(0, len(spilled), chunk):
        rows = slice(start, start + chunk)
        targets[rows] = spilled[rows]
    del spilled
    os.remove(spill_file)
    return targets


def _relabel(directory, token, predict, batches, num_examples, top_r, progbar):
    """Runs the teacher over `batches`; writes the targets into `directory`.

    The targets go to `targets-<token>.npy` (through `targets-<token>.spill`
    when `num_examples` is `None`), flushed to disk.

    Returns:
        The metadata dict of the cache.
    """
    targets_name = f"targets-{token}.npy"
    targets_file = os.path.join(directory, targets_name)
    spill_file = os.path.join(directory, f"targets-{token}.spill")
    labels_digest, targets_digest = hashlib.sha256(), hashlib.sha256()
    fingerprint = _StreamingFingerprint()
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
        packed = np.ascontiguousarray(
            keras.ops.convert_to_numpy(
                targets_module.pack_teacher_targets(
                    labels, teacher_logits, top_r
                )
            ),
            dtype="<f4",
        )  # (batch, 2 + 2R)
        if num_examples is None:
            with open(spill_file, "ab") as spill:
                spill.write(packed.tobytes())
        else:
            if targets is None:
                targets = np.lib.format.open_memmap(
                    targets_file,
                    mode="w+",
                    dtype="<f4",
                    shape=(num_examples, packed.shape[1]),
                )
            targets[written : written + len(packed)] = packed
        fingerprint.update(x)
        labels_digest.update(labels.tobytes())
        targets_digest.update(packed.tobytes())
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
    del targets
    _fsync_file(targets_file)
    return {
        "format_version": FORMAT_VERSION,
        "num_examples": written,
        "num_classes": int(num_classes),
        "top_r": targets_module.top_r_of(packed),
        "targets_file": targets_name,
        "targets_sha256": targets_digest.hexdigest(),
        "labels_sha256": labels_digest.hexdigest(),
        "inputs_fingerprint": fingerprint.hexdigest(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


def _write_metadata(directory, token, metadata):
    """Writes `metadata.json` atomically: a temporary file, then a rename."""
    temporary = os.path.join(directory, f".metadata-{token}.tmp")
    with open(temporary, "w") as file:
        json.dump(metadata, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, os.path.join(directory, METADATA_FILE))


def _read_metadata(path):
    """The checked metadata of the cache at `path`, with its targets file."""
    metadata_file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(metadata_file):
        raise ValueError(
            f"No teacher cache at {path!r}: {METADATA_FILE} is missing. "
            "Build one with `keras_dis.TeacherCache.build(path, teacher, "
            "inputs, labels, top_r)`; an interrupted build leaves nothing "
            "at `path`."
        )
    try:
        with open(metadata_file) as file:
            metadata = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The teacher cache at {path!r} has an unreadable "
            f"{METADATA_FILE} ({error}). {_REBUILD}"
        ) from error
    if not isinstance(metadata, dict):
        raise ValueError(
            f"The teacher cache at {path!r} has an unreadable "
            f"{METADATA_FILE} (not a JSON object). {_REBUILD}"
        )
    version = metadata.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"The teacher cache at {path!r} has format version {version!r}; "
            f"this keras_dis reads versions {list(READABLE_FORMAT_VERSIONS)}. "
            f"{_REBUILD}"
        )
    required = METADATA_KEYS + (CHECKED_METADATA_KEYS if version >= 2 else ())
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ValueError(
            f"The teacher cache at {path!r} lacks {missing} in its "
            f"{METADATA_FILE}. {_REBUILD}"
        )
    for key in ("num_examples", "num_classes", "top_r"):
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"The teacher cache at {path!r} has a corrupt "
                f"{METADATA_FILE}: {key} must be an integer >= 1. Received: "
                f"{key}={value!r}. {_REBUILD}"
            )
    targets_name = metadata.get("targets_file", LEGACY_TARGETS_FILE)
    if not isinstance(targets_name, str) or not _TARGETS_NAME.match(
        targets_name
    ):
        raise ValueError(
            f"The teacher cache at {path!r} has a corrupt {METADATA_FILE}: "
            "targets_file must name a `targets-<hex>.npy` file in the cache. "
            f"Received: targets_file={targets_name!r}. {_REBUILD}"
        )
    return metadata, targets_name


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
    batch. Every row read is checked (labels and class ids integers in
    `[0, num_classes)`, logits finite), so a damaged file raises instead of
    training on garbage; `verify()` checks the whole file against the
    sha256 written at build. `validate()` checks that the cache belongs to
    a data set.

    Args:
        path: the cache's directory.

    Example:

    ```python
    cache = keras_dis.TeacherCache.build(
        "cache/train", teacher, x_train, y_train, top_r=100
    )
    cache = keras_dis.TeacherCache("cache/train")  # later runs
    cache.validate(inputs=x_train, labels=y_train, num_classes=1000)
    distiller.fit(keras_dis.TeacherCacheDataset(x_train, cache, 256))
    ```
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        # An overwrite may switch the metadata between our reading it and
        # opening the targets file it names (then deleted): read it again.
        for attempt in range(3):
            metadata, targets_name = _read_metadata(self.path)
            try:
                targets = np.load(
                    os.path.join(self.path, targets_name), mmap_mode="r"
                )
                break
            except FileNotFoundError as error:
                if attempt < 2 and _read_metadata(self.path)[0] != metadata:
                    continue
                failure = error
            except (OSError, ValueError) as error:
                failure = error
            raise ValueError(
                f"The teacher cache at {self.path!r} has an unreadable "
                f"{targets_name} ({failure}). {_REBUILD}"
            ) from failure
        self.metadata = metadata
        self.targets_file = targets_name
        self.targets = targets
        expected_shape = (
            self.num_examples,
            targets_module.targets_width(self.top_r),
        )
        if (
            self.targets.ndim != 2
            or self.targets.shape != expected_shape
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
        done. The metadata records the sha256 of the targets (see
        `verify()`) and a fingerprint of the inputs (see `validate()`).

        The build is atomic: at every instant `path` holds either no cache
        or a complete one, the old one until the new one is complete. A new
        cache is written into a hidden temporary directory beside `path`
        and renamed to `path` once complete (a hard kill may leave that
        `.<name>.*.partial` directory behind, never read as a cache). With
        `overwrite=True` the new targets are written into `path` under a new
        name, then `metadata.json` is replaced by a single rename, and only
        then is the old targets file deleted; a hard kill before the rename
        leaves the old cache and a stray targets file, which the next build
        at `path` deletes. Concurrent builds to one `path` are not
        supported.

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
        in_place = os.path.lexists(path)
        if in_place:
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
        token = uuid.uuid4().hex
        relabel_args = (
            predict,
            _labelled_batches(inputs, labels, batch_size),
            num_examples,
            top_r,
            keras.utils.Progbar(
                num_examples, verbose=verbose, unit_name="sample"
            ),
        )
        if in_place:
            cls._overwrite(path, token, relabel_args)
        else:
            cls._create(path, token, relabel_args)
        return cls(path)

    @staticmethod
    def _create(path, token, relabel_args):
        """Builds in a hidden sibling directory, then renamed to `path`."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(
            prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent
        )
        try:
            metadata = _relabel(staging, token, *relabel_args)
            _write_metadata(staging, token, metadata)
            _fsync_directory(staging)
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_directory(parent)

    @staticmethod
    def _overwrite(path, token, relabel_args):
        """Builds beside the cache at `path`; one rename switches to it."""

        def live_targets_file():
            try:
                return _read_metadata(path)[1]
            except ValueError:
                return None

        live = live_targets_file()
        if live is not None:  # Free the space of killed builds first.
            _remove_build_files(path, keep={live})
        ours = {
            f"targets-{token}.npy",
            f"targets-{token}.spill",
            f".metadata-{token}.tmp",
        }
        try:
            metadata = _relabel(path, token, *relabel_args)
            _write_metadata(path, token, metadata)  # the switch
        except BaseException:
            # Interrupted, perhaps just after the switch: keep what the
            # metadata names.
            live = live_targets_file()
            for name in ours - {live}:
                try:
                    os.remove(os.path.join(path, name))
                except OSError:
                    pass
            raise
        _fsync_directory(path)
        _remove_build_files(path, keep={metadata["targets_file"]})

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

    @property
    def inputs_fingerprint(self):
        """sha256 hex digest of sampled input rows (`None`: old format).

        It covers the rows at multiples of the smallest power-of-two stride
        that leaves at most 64 of them (all rows up to 64 samples), with
        their indices; floats are hashed as float32 and integers as int64,
        every array of a dict in sorted key order.
        """
        return self.metadata.get("inputs_fingerprint")

    @property
    def targets_checksum(self):
        """sha256 hex digest of the targets' data (`None`: old format)."""
        return self.metadata.get("targets_sha256")

    def validate(
        self,
        labels=None,
        num_examples=None,
        num_classes=None,
        inputs=None,
        check_contents=False,
    ):
        """Checks that this cache belongs to a data set, and is intact.

        Args:
            labels: optional int array, the data set's labels in order;
                compared by count and by sha256 fingerprint.
            num_examples: optional int, the data set's number of samples.
            num_classes: optional int, the student's number of classes.
            inputs: optional, the data set's inputs in order: a NumPy array
                or a dict of NumPy arrays (only the fingerprinted rows are
                read), or an iterable of `x` or `(x, labels)` batches (read
                through once). Compared by count and by fingerprint (see
                `inputs_fingerprint`), unless the cache predates
                fingerprints (then with a warning).
            check_contents: bool, whether to also run `verify()`, which
                reads the whole targets file.

        Raises:
            ValueError: if any given value does not match the cache, or
                the contents are corrupt.

        Example:

        ```python
        cache.validate(inputs=x_train, labels=y_train, num_classes=1000,
                       check_contents=True)
        ```
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
        if inputs is not None:
            self._check_inputs(inputs)
        if check_contents:
            self.verify()

    def _check_inputs(self, inputs):
        """Raises unless `inputs` are those the cache was built from."""
        if _is_array_inputs(inputs):
            num_samples = _num_samples(inputs)
            fingerprint = None
            if num_samples == self.num_examples:
                fingerprint = _array_fingerprint(inputs)
        else:
            streaming = _StreamingFingerprint()
            for batch in inputs:
                x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
                streaming.update(keras.tree.map_structure(np.asarray, x))
            num_samples, fingerprint = (
                streaming.num_samples,
                streaming.hexdigest(),
            )
        if num_samples != self.num_examples:
            raise ValueError(
                f"`inputs` has {num_samples} samples but the teacher cache at "
                f"{self.path!r} has {self.num_examples}: it belongs to "
                f"another data set. {_REBUILD}"
            )
        if self.inputs_fingerprint is None:
            warnings.warn(
                f"The teacher cache at {self.path!r} has format version "
                f"{self.metadata['format_version']} and records no "
                "fingerprint of its inputs: `inputs` are not checked against "
                "it. Rebuild it to have them checked.",
                stacklevel=3,
            )
        elif fingerprint != self.inputs_fingerprint:
            num_rows = math.ceil(num_samples / _fingerprint_stride(num_samples))
            raise ValueError(
                f"`inputs` must be the inputs the teacher cache at "
                f"{self.path!r} was built from, in the same order; their "
                f"fingerprint (sha256 of {num_rows} sample rows) differs. "
                f"Received: inputs with fingerprint {fingerprint[:16]}..., "
                f"expected {self.inputs_fingerprint[:16]}... Pass the same "
                "inputs, or rebuild the cache from these inputs with "
                "`keras_dis.TeacherCache.build(path, teacher, inputs, labels, "
                "top_r, overwrite=True)`."
            )

    def verify(self):
        """Reads the whole targets file and checks it against its sha256.

        Every row is range-checked as in indexing; then the sha256 of the
        data is compared with the one written at build, which also catches
        damage that leaves plausible values. Caches of format version 1
        have no checksum: only the ranges are checked, with a warning.

        Raises:
            ValueError: naming the first bad row and value, or the checksum
                mismatch.

        Example:

        ```python
        keras_dis.TeacherCache("cache/train").verify()
        ```
        """
        digest = hashlib.sha256()
        chunk = _rows_per_chunk(self.targets.shape[1])
        for start in range(0, self.num_examples, chunk):
            rows = self[start : start + chunk]
            digest.update(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        if self.targets_checksum is None:
            warnings.warn(
                f"The teacher cache at {self.path!r} has format version "
                f"{self.metadata['format_version']} and records no checksum:"
                " only the value ranges of its targets were checked. "
                "Rebuild it to have them checked in full.",
                stacklevel=2,
            )
        elif digest.hexdigest() != self.targets_checksum:
            raise ValueError(
                f"The teacher cache at {self.path!r} is corrupt: the sha256 "
                f"of {self.targets_file} is {digest.hexdigest()}, but "
                f"{METADATA_FILE} says {self.targets_checksum}; the file "
                f"changed after the build. {_REBUILD}"
            )

    def _column_name(self, column):
        if column == targets_module.LABEL_COLUMN:
            return "the label"
        if column == targets_module.TAIL_LOGIT_COLUMN:
            return "the tail logit"
        rank = column - targets_module.HEADER_COLUMNS
        if rank < self.top_r:
            return f"teacher class id {rank}"
        return f"teacher logit {rank - self.top_r}"

    def _row_of(self, index, position):
        """Row of the cache at `position` of the rows `index` selects."""
        num_examples = self.num_examples
        if isinstance(index, slice):
            start, _, step = index.indices(num_examples)
            return start + position * step
        if isinstance(index, (int, np.integer)) and not isinstance(
            index, (bool, np.bool_)
        ):
            return int(index) % num_examples
        index = np.asarray(index)
        if index.dtype == bool:
            return int(np.flatnonzero(index)[position])
        if np.issubdtype(index.dtype, np.integer):
            return int(index.reshape(-1)[position]) % num_examples
        return int(np.arange(num_examples)[index].reshape(-1)[position])

    def _check_rows(self, rows, index):
        """Raises if `rows` (selected by `index`) hold impossible values."""
        rows = rows.reshape(-1, rows.shape[-1])
        header, top_r = targets_module.HEADER_COLUMNS, self.top_r
        label = targets_module.LABEL_COLUMN
        id_columns = ((label, label + 1), (header, header + top_r))
        finite = np.isfinite(rows)
        if finite.all() and all(
            _are_class_ids(rows[:, start:stop], self.num_classes)
            for start, stop in id_columns
        ):
            return  # the common case: a few passes over the batch
        bad = ~finite
        for start, stop in id_columns:
            ids = rows[:, start:stop]
            bad[:, start:stop] |= (
                (ids < 0) | (ids >= self.num_classes) | (np.floor(ids) != ids)
            )
        if not bad.any():
            return
        position, column = (int(i) for i in np.argwhere(bad)[0])
        value = rows[position, column]  # np.float32: printed as stored
        exact = value.is_integer() and abs(value) < 2**24
        shown = int(value) if exact else str(value)
        raise ValueError(
            f"The teacher cache at {self.path!r} is corrupt: row "
            f"{self._row_of(index, position)} holds {shown} as "
            f"{self._column_name(column)} (column {column}), but labels and "
            f"class ids must be integers in [0, {self.num_classes}) and "
            f"logits finite. {self.targets_file} was damaged after the "
            f"build. {_REBUILD}"
        )

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index):
        if isinstance(index, tuple):
            # Rows and columns: check the whole rows, then pick the columns.
            self[index[0] if index else slice(None)]
            return np.array(self.targets[index], dtype="float32")
        rows = np.array(self.targets[index], dtype="float32")
        self._check_rows(rows, index)
        return rows

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

    The inputs must be those the cache was built from: besides their
    number, their fingerprint (see `TeacherCache.inputs_fingerprint`, at
    most 64 sample rows read) is compared with the cache's. Every batch of
    targets is range-checked as it is read (see `TeacherCache`).

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
        _check_batch_size(batch_size)
        cache._check_inputs(inputs)
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
