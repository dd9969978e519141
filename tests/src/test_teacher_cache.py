import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_dis
from keras_dis.src import teacher_cache as cache_module
from keras_dis.src.teacher_cache import TeacherCache
from keras_dis.src.teacher_cache import TeacherCacheDataset
from keras_dis.src.teacher_targets import pack_teacher_targets

NUM_EXAMPLES, FEATURES, NUM_CLASSES, TOP_R, BATCH_SIZE = 50, 6, 12, 4, 16


class SwitchableTeacher(keras.Model):
    """A dense teacher that raises once switched off, to prove it is unused."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.logits = keras.layers.Dense(num_classes)
        self.enabled = True

    def call(self, x):
        if not self.enabled:
            raise RuntimeError("The teacher ran although targets are cached.")
        return self.logits(x)


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, FEATURES)).astype("float32")
    x[:, 0] = np.arange(NUM_EXAMPLES)  # each sample carries its index
    labels = rng.integers(0, NUM_CLASSES, size=NUM_EXAMPLES)
    return x, labels


def make_teacher():
    keras.utils.set_random_seed(0)
    teacher = SwitchableTeacher(NUM_CLASSES)
    teacher(np.zeros((1, FEATURES), "float32"))
    return teacher


def build(path, teacher, inputs, labels, **kwargs):
    return TeacherCache.build(
        path,
        teacher,
        inputs,
        labels,
        top_r=TOP_R,
        batch_size=BATCH_SIZE,
        verbose=0,
        **kwargs,
    )


def batches_of(x, labels=None):
    for start in range(0, len(x), BATCH_SIZE):
        stop = start + BATCH_SIZE
        if labels is None:
            yield x[start:stop]
        else:
            yield x[start:stop], labels[start:stop]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    x, labels = make_data()
    teacher = make_teacher()
    path = tmp_path_factory.mktemp("cache") / "train"
    return x, labels, teacher, build(path, teacher, x, labels)


def test_targets_are_the_packed_teacher_logits(built):
    x, labels, teacher, cache = built
    teacher_logits = teacher.predict(x, batch_size=BATCH_SIZE, verbose=0)
    expected = keras.ops.convert_to_numpy(
        pack_teacher_targets(labels, teacher_logits, TOP_R)
    )
    # Same compiled teacher, same batches, same packing: exactly equal.
    np.testing.assert_array_equal(cache.targets, expected)
    np.testing.assert_array_equal(cache[:], expected)
    np.testing.assert_array_equal(cache[[3, 1, 7]], expected[[3, 1, 7]])
    assert cache[5:9].dtype == "float32" and type(cache[5:9]) is np.ndarray
    assert len(cache) == cache.num_examples == NUM_EXAMPLES
    assert (cache.num_classes, cache.top_r) == (NUM_CLASSES, TOP_R)
    assert cache.targets.shape == (NUM_EXAMPLES, 2 + 2 * TOP_R)


def test_round_trip_and_read_only(built):
    _, labels, _, cache = built
    reopened = TeacherCache(cache.path)
    np.testing.assert_array_equal(reopened.targets, cache.targets)
    assert reopened.metadata == cache.metadata
    assert isinstance(reopened.targets, np.memmap)
    assert not reopened.targets.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        reopened.targets[0, 0] = 1.0
    unpickled = pickle.loads(pickle.dumps(reopened))
    np.testing.assert_array_equal(unpickled.targets, cache.targets)
    assert repr(reopened) == (
        f"TeacherCache(path={cache.path!r}, num_examples={NUM_EXAMPLES}, "
        f"num_classes={NUM_CLASSES}, top_r={TOP_R})"
    )
    reopened.validate(labels=labels, num_examples=NUM_EXAMPLES)


def test_validate_rejects_another_data_set(built):
    _, labels, _, cache = built
    with pytest.raises(ValueError, match="num_examples=51"):
        cache.validate(num_examples=NUM_EXAMPLES + 1)
    with pytest.raises(ValueError, match="num_classes=13"):
        cache.validate(num_classes=NUM_CLASSES + 1)
    with pytest.raises(ValueError, match=r"len\(labels\)=49"):
        cache.validate(labels=labels[:-1])
    with pytest.raises(ValueError, match="fingerprint"):
        cache.validate(labels=labels[::-1])
    with pytest.raises(ValueError, match="integer class ids"):
        cache.validate(labels=labels.astype("float32"))


def test_open_rejects_bad_metadata(built, tmp_path):
    _, _, _, cache = built
    with pytest.raises(ValueError, match="No teacher cache"):
        TeacherCache(tmp_path / "missing")

    def corrupt(name, **changes):
        path = tmp_path / name
        os.makedirs(path)
        os.link(
            os.path.join(cache.path, cache.targets_file),
            path / cache.targets_file,
        )
        metadata = {**cache.metadata, **changes}
        (path / cache_module.METADATA_FILE).write_text(json.dumps(metadata))
        return path

    with pytest.raises(ValueError, match="format version 99"):
        TeacherCache(corrupt("version", format_version=99))
    with pytest.raises(ValueError, match="format version None"):
        TeacherCache(corrupt("no_version", format_version=None))
    with pytest.raises(ValueError, match="shape"):
        TeacherCache(corrupt("count", num_examples=NUM_EXAMPLES + 1))
    with pytest.raises(ValueError, match="shape"):
        TeacherCache(corrupt("top_r", top_r=TOP_R + 1))
    garbled = corrupt("garbled")
    (garbled / cache_module.METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        TeacherCache(garbled)
    with pytest.raises(ValueError, match=r"targets_file='\.\./x\.npy'"):
        TeacherCache(corrupt("escape", targets_file="../x.npy"))
    with pytest.raises(ValueError, match="unreadable targets-"):
        TeacherCache(corrupt("renamed", targets_file=f"targets-{'0' * 32}.npy"))
    with pytest.raises(ValueError, match="num_classes='12'"):
        TeacherCache(corrupt("classes", num_classes="12"))
    no_checksum = corrupt("no_checksum")
    metadata = dict(cache.metadata)
    del metadata["targets_sha256"]
    (no_checksum / cache_module.METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="lacks \\['targets_sha256'\\]"):
        TeacherCache(no_checksum)


def test_interrupted_build_leaves_no_cache(tmp_path):
    x, labels = make_data()
    model = make_teacher()
    calls = []

    def failing_teacher(x_batch):
        calls.append(len(x_batch))
        if len(calls) > 2:
            raise RuntimeError("Teacher crashed.")
        return model(x_batch)

    path = tmp_path / "train"
    with pytest.raises(RuntimeError, match="crashed"):
        build(path, failing_teacher, x, labels)
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []  # no cache, no staging directory
    with pytest.raises(ValueError, match="No teacher cache"):
        TeacherCache(path)


def test_overwrite(built, tmp_path):
    x, labels, teacher, cache = built
    path = tmp_path / "train"
    build(path, teacher, x[:20], labels[:20])
    with pytest.raises(ValueError, match="already exists"):
        build(path, teacher, x, labels)
    first_targets_file = TeacherCache(path).targets_file
    replaced = build(path, teacher, x, labels, overwrite=True)
    np.testing.assert_array_equal(replaced.targets, cache.targets)
    assert sorted(os.listdir(tmp_path)) == ["train"]
    # The new targets came under a new name; the old file is gone.
    assert replaced.targets_file != first_targets_file
    assert sorted(os.listdir(path)) == sorted(
        [cache_module.METADATA_FILE, replaced.targets_file]
    )
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a teacher cache"):
        build(tmp_path / "other", teacher, x, labels, overwrite=True)


def test_build_from_batches(built, tmp_path):
    x, labels, teacher, cache = built
    # (x, labels) batches, count unknown up front: spilled, then copied.
    from_pairs = build(tmp_path / "pairs", teacher, batches_of(x, labels), None)
    np.testing.assert_array_equal(from_pairs.targets, cache.targets)
    assert from_pairs.labels_fingerprint == cache.labels_fingerprint
    assert from_pairs.inputs_fingerprint == cache.inputs_fingerprint
    assert from_pairs.targets_checksum == cache.targets_checksum
    assert sorted(os.listdir(from_pairs.path)) == sorted(
        [cache_module.METADATA_FILE, from_pairs.targets_file]
    )  # no spill file left
    # x batches with the labels given apart.
    from_x = build(tmp_path / "x", teacher, batches_of(x), labels)
    np.testing.assert_array_equal(from_x.targets, cache.targets)
    # A shuffled iterable does not match the labels.
    permutation = np.random.default_rng(0).permutation(NUM_EXAMPLES)
    shuffled = batches_of(x[permutation], labels[permutation])
    with pytest.raises(ValueError, match="no shuffling"):
        build(tmp_path / "shuffled", teacher, shuffled, labels)
    with pytest.raises(ValueError, match="without labels"):
        build(tmp_path / "unlabelled", teacher, batches_of(x), None)
    with pytest.raises(ValueError, match="yielded 48 samples"):
        build(tmp_path / "short", teacher, batches_of(x[:48]), labels)
    assert sorted(os.listdir(tmp_path)) == ["pairs", "x"]


def test_build_from_tf_data(built, tmp_path):
    tf = pytest.importorskip("tensorflow")
    x, labels, teacher, cache = built
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(BATCH_SIZE)
    from_dataset = build(tmp_path / "tf_data", teacher, dataset, None)
    np.testing.assert_array_equal(from_dataset.targets, cache.targets)
    assert from_dataset.inputs_fingerprint == cache.inputs_fingerprint
    TeacherCacheDataset(x, from_dataset)  # its inputs: accepted
    cache.validate(inputs=dataset)


def test_build_rejects_bad_arguments(built, tmp_path):
    x, labels, teacher, _ = built
    with pytest.raises(ValueError, match="one label per sample"):
        build(tmp_path / "a", teacher, x, labels[:-1])
    with pytest.raises(ValueError, match="one label per sample"):
        build(tmp_path / "b", teacher, x, None)
    with pytest.raises(ValueError, match="batch_size=0"):
        TeacherCache.build(tmp_path / "c", teacher, x, labels, batch_size=0)
    with pytest.raises(ValueError, match="top_r=13"):
        TeacherCache.build(tmp_path / "d", teacher, x, labels, top_r=13)
    with pytest.raises(ValueError, match="teacher="):
        TeacherCache.build(tmp_path / "e", "teacher", x, labels)
    assert os.listdir(tmp_path) == []


def test_progress_bar(built, tmp_path, capsys):
    x, labels, teacher, _ = built
    TeacherCache.build(
        tmp_path / "train", teacher, x, labels, top_r=TOP_R, verbose=1
    )
    assert f"{NUM_EXAMPLES}/{NUM_EXAMPLES}" in capsys.readouterr().out


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataset_pairs_inputs_with_their_targets(built, shuffle):
    x, _, _, cache = built
    dataset = TeacherCacheDataset(
        x, cache.path, batch_size=BATCH_SIZE, shuffle=shuffle, seed=1
    )
    assert len(dataset) == 4
    for _ in range(2):  # epochs
        seen = []
        for index in range(len(dataset)):
            x_batch, targets_batch = dataset[index]
            sample_ids = x_batch[:, 0].astype("int64")
            np.testing.assert_array_equal(targets_batch, cache[sample_ids])
            seen.append(sample_ids)
        seen = np.concatenate(seen)
        np.testing.assert_array_equal(np.sort(seen), np.arange(NUM_EXAMPLES))
        assert shuffle == (not np.array_equal(seen, np.arange(NUM_EXAMPLES)))
        dataset.on_epoch_end()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_rejects_another_data_set(built):
    x, _, _, cache = built
    with pytest.raises(ValueError, match="49 samples"):
        TeacherCacheDataset(x[:-1], cache)
    with pytest.raises(ValueError, match="NumPy array"):
        TeacherCacheDataset(list(x), cache)
    with pytest.raises(ValueError, match="batch_size=-1"):
        TeacherCacheDataset(x, cache, batch_size=-1)


@pytest.mark.requires_trainable_backend
def test_distiller_trains_from_the_cache_without_the_teacher(tmp_path):
    x, labels = make_data()
    teacher = make_teacher()
    cache = build(tmp_path / "train", teacher, x, labels)
    teacher.enabled = False
    student = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="relu"),
            keras_dis.SampledDistillationHead(num_classes=NUM_CLASSES, seed=0),
        ]
    )
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(optimizer="sgd", loss=keras_dis.DISLoss(k=4))
    history = distiller.fit(
        TeacherCacheDataset(x, cache, batch_size=BATCH_SIZE, shuffle=True),
        epochs=1,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(RuntimeError, match="cached"):
        teacher(x)


# Atomic writes.


def as_format_1(cache, path):
    """A copy of `cache` as the previous format wrote it (`targets.npy`)."""
    shutil.copytree(cache.path, path)
    os.rename(
        path / cache.targets_file, path / cache_module.LEGACY_TARGETS_FILE
    )
    metadata = {
        key: value
        for key, value in cache.metadata.items()
        if key not in cache_module.CHECKED_METADATA_KEYS
    }
    metadata["format_version"] = 1
    (path / cache_module.METADATA_FILE).write_text(json.dumps(metadata))
    return path


def test_metadata_records_checksum_and_fingerprint(built):
    x, _, _, cache = built
    assert cache.metadata["format_version"] == cache_module.FORMAT_VERSION == 2
    assert re.fullmatch(r"targets-[0-9a-f]{32}\.npy", cache.targets_file)
    assert cache.metadata["targets_file"] == cache.targets_file
    assert sorted(os.listdir(cache.path)) == sorted(
        [cache_module.METADATA_FILE, cache.targets_file]
    )
    assert (
        cache.targets_checksum
        == hashlib.sha256(np.asarray(cache.targets).tobytes()).hexdigest()
    )
    assert cache.inputs_fingerprint == cache_module._array_fingerprint(x)
    cache.verify()
    cache.validate(inputs=x, check_contents=True)


def test_format_1_cache_still_opens_and_is_replaced(built, tmp_path):
    x, labels, teacher, cache = built
    path = as_format_1(cache, tmp_path / "train")
    old = TeacherCache(path)
    assert old.targets_file == "targets.npy"
    assert old.targets_checksum is None and old.inputs_fingerprint is None
    np.testing.assert_array_equal(old[:], cache.targets)
    old.validate(labels=labels, num_examples=NUM_EXAMPLES)
    with pytest.warns(UserWarning, match="no fingerprint"):
        dataset = TeacherCacheDataset(x, old, batch_size=BATCH_SIZE)
    np.testing.assert_array_equal(dataset[1][1], cache.targets[16:32])
    with pytest.warns(UserWarning, match="no checksum"):
        old.verify()  # value ranges only
    replaced = build(path, teacher, x, labels, overwrite=True)
    assert replaced.metadata["format_version"] == 2
    assert sorted(os.listdir(path)) == sorted(
        [cache_module.METADATA_FILE, replaced.targets_file]
    )


class Snapshots:
    """Copies a directory tree before every file-system change under test.

    A process killed at any instant leaves what one of these copies holds:
    the copy is taken just before each rename, removal, fsync or mkdir (the
    steps of a build), and whenever `take()` is called.
    """

    HOOKED = [
        (os, "replace"),
        (os, "rename"),
        (os, "remove"),
        (os, "unlink"),
        (os, "fsync"),
        (os, "mkdir"),
        (os, "rmdir"),
        (shutil, "rmtree"),
    ]

    def __init__(self, root, destination, monkeypatch):
        self.root, self.destination, self.taken = root, destination, []
        self._busy = False
        for module, name in self.HOOKED:
            original = getattr(module, name)

            def hooked(*args, _original=original, **kwargs):
                self.take()
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, hooked)

    def take(self):
        if self._busy:  # copytree's own mkdir calls
            return
        self._busy = True
        try:
            copy = self.destination / f"{len(self.taken):03d}"
            shutil.copytree(self.root, copy, symlinks=True)
            self.taken.append(copy)
        finally:
            self._busy = False


@pytest.mark.parametrize("before", ["absent", "format_1", "format_2"])
def test_build_is_atomic_at_every_step(built, tmp_path, monkeypatch, before):
    x, labels, teacher, cache = built
    root = tmp_path / "root"
    root.mkdir()
    path = root / "train"
    old_targets = None
    if before != "absent":
        old = build(path, teacher, x[:30], labels[:30])
        if before == "format_1":
            as_format_1(old, tmp_path / "format_1")
            shutil.rmtree(path)
            os.rename(tmp_path / "format_1", path)
        old_targets = TeacherCache(path)[:]
    new_targets = np.asarray(cache.targets)
    snapshots = Snapshots(root, tmp_path / "snapshots", monkeypatch)
    calls, mid_relabel = [], []

    def teacher_taking_snapshots(x_batch):
        calls.append(len(x_batch))
        if len(calls) == 2:  # mid-relabel: new targets partly written
            mid_relabel.append(len(snapshots.taken))
            snapshots.take()
        return teacher.predict_on_batch(x_batch)

    TeacherCache.build(
        path,
        teacher_taking_snapshots,
        x,
        labels,
        top_r=TOP_R,
        batch_size=BATCH_SIZE,
        verbose=0,
        overwrite=True,
    )
    snapshots.take()
    monkeypatch.undo()
    states = []
    for copy in snapshots.taken:
        try:
            reopened = TeacherCache(copy / "train")
        except ValueError as error:
            assert "No teacher cache" in str(error)
            states.append("none")
            continue
        read = reopened[:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # format 1: no checksum
            reopened.verify()
        if old_targets is not None and read.shape == old_targets.shape:
            np.testing.assert_array_equal(read, old_targets)
            states.append("old")
        else:
            np.testing.assert_array_equal(read, new_targets)
            states.append("new")
    assert len(snapshots.taken) >= 5
    switches = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert switches == ["none" if before == "absent" else "old", "new"]
    final = TeacherCache(path)
    assert sorted(os.listdir(path)) == sorted(
        [cache_module.METADATA_FILE, final.targets_file]
    )
    if before == "absent":  # mid-relabel: only the hidden staging directory
        staging = os.listdir(snapshots.taken[mid_relabel[0]])
        assert len(staging) == 1 and staging[0].startswith(".train.")
    else:
        # Killed mid-relabel: the old cache plus a stray, partial file,
        # which the next build at `path` deletes.
        stray = snapshots.taken[mid_relabel[0]] / "train"
        assert states[mid_relabel[0]] == "old"
        assert len(os.listdir(stray)) == 3, os.listdir(stray)
        rebuilt = build(stray, teacher, x, labels, overwrite=True)
        assert sorted(os.listdir(stray)) == sorted(
            [cache_module.METADATA_FILE, rebuilt.targets_file]
        )


KILLED_BUILD = """
import os, signal, sys
import numpy as np
from keras_dis.src.teacher_cache import TeacherCache

path, point, data = sys.argv[1:]
arrays = np.load(data)
calls = []

def teacher(x_batch):
    calls.append(len(x_batch))
    if point == "relabel" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return np.asarray(x_batch) @ arrays["kernel"]

if point == "switch":  # killed just after the rename onto metadata.json
    replace = os.replace

    def killing_replace(source, target):
        replace(source, target)
        if os.path.basename(target) == "metadata.json":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = killing_replace
TeacherCache.build(path, teacher, arrays["x"], arrays["labels"], top_r=4,
                   batch_size=16, overwrite=True, verbose=0)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
@pytest.mark.parametrize("point", ["relabel", "switch"])
def test_overwrite_killed_by_sigkill_leaves_a_complete_cache(tmp_path, point):
    x, labels = make_data()
    kernel = np.random.default_rng(3).normal(size=(FEATURES, NUM_CLASSES))
    kernel = kernel.astype("float32")
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=labels, kernel=kernel)
    path = tmp_path / "train"
    old = build(path, lambda x_batch: -(x_batch @ kernel), x, labels)[:]
    new = build(tmp_path / "new", lambda x_batch: x_batch @ kernel, x, labels)
    new = new[:]
    repository = os.path.dirname(os.path.dirname(keras_dis.__file__))
    env = dict(
        os.environ,
        KERAS_BACKEND=keras.backend.backend(),
        PYTHONPATH=os.pathsep.join(
            [repository] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )
    child = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(path), point, str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    survivor = TeacherCache(path)
    expected = old if point == "relabel" else new
    np.testing.assert_array_equal(survivor[:], expected)
    survivor.verify()
    # The killed build left a stray targets file (its own, or the old one).
    assert len(os.listdir(path)) == 3, os.listdir(path)
    rebuilt = build(
        path, lambda x_batch: x_batch @ kernel, x, labels, overwrite=True
    )
    np.testing.assert_array_equal(rebuilt[:], new)
    assert sorted(os.listdir(path)) == sorted(
        [cache_module.METADATA_FILE, rebuilt.targets_file]
    )


@pytest.mark.parametrize("known_count", [True, False])
def test_interrupted_overwrite_keeps_the_old_cache(
    built, tmp_path, known_count
):
    x, labels, teacher, _ = built
    path = tmp_path / "train"
    old = build(path, teacher, x[:30], labels[:30])
    listing = sorted(os.listdir(path))
    calls = []

    def failing_teacher(x_batch):
        calls.append(len(x_batch))
        if len(calls) > 2:
            raise RuntimeError("Teacher crashed.")
        return teacher.predict_on_batch(x_batch)

    inputs = x if known_count else batches_of(x, labels)
    with pytest.raises(RuntimeError, match="crashed"):
        build(
            path,
            failing_teacher,
            inputs,
            labels if known_count else None,
            overwrite=True,
        )
    assert sorted(os.listdir(path)) == listing  # no new file left behind
    np.testing.assert_array_equal(TeacherCache(path)[:], old.targets)


# Corrupted contents.


def damaged_copy(cache, path, row, column, values):
    """A copy of `cache` whose targets file has `values` at (row, column)."""
    shutil.copytree(cache.path, path)
    offset = cache.targets.offset + 4 * (row * cache.targets.shape[1] + column)
    with open(path / cache.targets_file, "r+b") as file:
        file.seek(offset)
        file.write(np.asarray(values, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize(
    "row, column, values, shown, part",
    [
        (20, 2, np.frombuffer(b"\xff" * 8, "<f4"), "nan", "teacher class id 0"),
        (33, 0, [1e30], "1e+30", "the label"),
        (21, 3, [3.5], "3.5", "teacher class id 1"),
        (17, 2, [NUM_CLASSES], str(NUM_CLASSES), "teacher class id 0"),
        (29, 0, [-1], "-1", "the label"),
        (40, 1, [np.inf], "inf", "the tail logit"),
        (45, 2 + TOP_R + 1, [np.nan], "nan", "teacher logit 1"),
    ],
)
def test_damaged_values_raise_on_read_and_verify(
    built, tmp_path, row, column, values, shown, part
):
    x, _, _, cache = built
    path = damaged_copy(cache, tmp_path / "train", row, column, values)
    dataset = TeacherCacheDataset(x, path, batch_size=BATCH_SIZE)
    message = (
        f"{re.escape(repr(str(path)))} is corrupt: row {row} holds "
        f"{re.escape(shown)} as {part} \\(column {column}\\).*Rebuild"
    )
    with pytest.raises(ValueError, match=message):
        dataset[row // BATCH_SIZE]
    for index in range(len(dataset)):
        if index != row // BATCH_SIZE:
            np.testing.assert_array_equal(
                dataset[index][1],
                cache.targets[index * BATCH_SIZE : (index + 1) * BATCH_SIZE],
            )
    with pytest.raises(ValueError, match=message):
        dataset.cache.verify()
    with pytest.raises(ValueError, match=message):
        dataset.cache.validate(check_contents=True)


def test_plausible_damage_is_caught_by_the_checksum(built, tmp_path):
    x, _, _, cache = built
    # A teacher logit nudged: in range, so reads pass; the sha256 differs.
    row, column = 45, 2 + TOP_R
    path = damaged_copy(
        cache, tmp_path / "train", row, column, cache.targets[row, column] + 1
    )
    damaged = TeacherCache(path)
    dataset = TeacherCacheDataset(x, damaged, batch_size=BATCH_SIZE)
    dataset[row // BATCH_SIZE]
    with pytest.raises(ValueError, match="corrupt: the sha256 of targets-"):
        damaged.verify()
    with pytest.raises(ValueError, match="changed after the build"):
        damaged.validate(check_contents=True)
    cache.validate(check_contents=True)


def test_errors_name_the_row_of_the_cache(built, tmp_path):
    _, _, _, cache = built
    path = damaged_copy(cache, tmp_path / "train", 20, 2, [np.nan])
    damaged = TeacherCache(path)
    mask = np.zeros(NUM_EXAMPLES, bool)
    mask[[5, 20]] = True
    for index in [
        20,
        np.int64(20),
        20 - NUM_EXAMPLES,
        [3, 20],
        np.array([[7], [20]]),
        slice(10, 30, 5),
        slice(None, None, -1),
        mask,
        (20, 0),
        (slice(18, 22), slice(0, 2)),
    ]:
        with pytest.raises(ValueError, match="row 20 holds nan"):
            damaged[index]
    np.testing.assert_array_equal(damaged[:20], cache.targets[:20])
    np.testing.assert_array_equal(damaged[21:], cache.targets[21:])
    np.testing.assert_array_equal(damaged[3, 0], cache.targets[3, 0])


# The inputs a cache belongs to.


def test_fingerprint_rows_do_not_depend_on_the_batches():
    rng = np.random.default_rng(0)
    num_samples = 1000
    inputs = {
        "x": rng.normal(size=(num_samples, 3)).astype("float32"),
        "ids": np.arange(num_samples),
    }
    stride = cache_module._fingerprint_stride
    sizes = (1, 64, 65, 128, 129, 1000)
    assert [stride(n) for n in sizes] == [1, 1, 2, 2, 4, 16]
    direct = cache_module._array_fingerprint(inputs)
    for batch_size in (1, 37, 64, 1000):
        streaming = cache_module._StreamingFingerprint()
        for start in range(0, num_samples, batch_size):
            streaming.update(
                cache_module._take(inputs, slice(start, start + batch_size))
            )
        assert streaming.hexdigest() == direct
    as_float64 = {**inputs, "x": inputs["x"].astype("float64")}
    assert cache_module._array_fingerprint(as_float64) == direct
    sampled, skipped = inputs["x"].copy(), inputs["x"].copy()
    sampled[16 * 7, 0] += 1  # a fingerprinted row
    skipped[16 * 7 + 1, 0] += 1  # a row the fingerprint does not read
    assert cache_module._array_fingerprint({**inputs, "x": sampled}) != direct
    assert cache_module._array_fingerprint({**inputs, "x": skipped}) == direct
    swapped = {"x": inputs["x"], "ids": inputs["ids"][::-1]}
    assert cache_module._array_fingerprint(swapped) != direct


def test_dataset_rejects_other_inputs_of_the_same_size(built):
    x, labels, _, cache = built
    other, _ = make_data(seed=1)
    one_row_changed = x.copy()
    one_row_changed[17, 3] += 1
    message = (
        "`inputs` must be the inputs the teacher cache at "
        f"{re.escape(repr(cache.path))} was built from"
    )
    for wrong in (other, x[::-1], one_row_changed):
        with pytest.raises(ValueError, match=message):
            TeacherCacheDataset(wrong, cache)
        with pytest.raises(ValueError, match=message):
            cache.validate(inputs=wrong)
        with pytest.raises(ValueError, match=message):
            cache.validate(inputs=batches_of(wrong, labels))
    with pytest.raises(ValueError, match="49 samples"):
        cache.validate(inputs=batches_of(x[:-1]))
    # The right inputs, also as float64 or as batches, pass.
    TeacherCacheDataset(x.astype("float64"), cache)
    cache.validate(inputs=x, labels=labels)
    cache.validate(inputs=batches_of(x))


def test_dict_inputs_fingerprint(tmp_path):
    x, labels = make_data()
    other, _ = make_data(seed=1)
    kernel = np.random.default_rng(3).normal(size=(FEATURES, NUM_CLASSES))

    def dict_teacher(inputs):
        return np.concatenate([inputs["a"], inputs["b"]], axis=1) @ kernel

    inputs = {"b": x[:, 2:], "a": x[:, :2]}
    cache = build(tmp_path / "train", dict_teacher, inputs, labels)
    # Every array counts, in sorted key order, whatever the dict's order.
    dataset = TeacherCacheDataset({"a": x[:, :2], "b": x[:, 2:]}, cache, 16)
    x_batch, targets_batch = dataset[0]
    np.testing.assert_array_equal(x_batch["b"], x[:16, 2:])
    np.testing.assert_array_equal(targets_batch, cache.targets[:16])
    message = "`inputs` must be the inputs"
    for wrong in (
        {"a": x[:, :2], "b": other[:, 2:]},
        {"a": other[:, :2], "b": x[:, 2:]},
        {"a": x[:, 2:4], "b": np.concatenate([x[:, :2], x[:, 4:]], 1)},
        x,
    ):
        with pytest.raises(ValueError, match=message):
            TeacherCacheDataset(wrong, cache)
    # Built from a generator of dict batches: the same fingerprint.
    from_batches = build(
        tmp_path / "batches",
        dict_teacher,
        (
            {"a": x[start : start + 7, :2], "b": x[start : start + 7, 2:]}
            for start in range(0, NUM_EXAMPLES, 7)
        ),
        labels,
    )
    assert from_batches.inputs_fingerprint == cache.inputs_fingerprint


def test_generator_built_cache_checks_array_inputs(built, tmp_path):
    x, labels, teacher, _ = built
    other, _ = make_data(seed=1)
    cache = build(tmp_path / "train", teacher, batches_of(x, labels), None)
    dataset = TeacherCacheDataset(x, cache, batch_size=BATCH_SIZE)
    np.testing.assert_array_equal(dataset[3][1], cache.targets[48:])
    with pytest.raises(ValueError, match="`inputs` must be the inputs"):
        TeacherCacheDataset(other, cache)
