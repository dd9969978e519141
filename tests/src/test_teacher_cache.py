import json
import os
import pickle

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
            os.path.join(cache.path, cache_module.TARGETS_FILE),
            path / cache_module.TARGETS_FILE,
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
    replaced = build(path, teacher, x, labels, overwrite=True)
    np.testing.assert_array_equal(replaced.targets, cache.targets)
    assert sorted(os.listdir(tmp_path)) == ["train"]
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a teacher cache"):
        build(tmp_path / "other", teacher, x, labels, overwrite=True)


def test_build_from_batches(built, tmp_path):
    x, labels, teacher, cache = built
    # (x, labels) batches, count unknown up front: spilled, then copied.
    from_pairs = build(tmp_path / "pairs", teacher, batches_of(x, labels), None)
    np.testing.assert_array_equal(from_pairs.targets, cache.targets)
    assert from_pairs.labels_fingerprint == cache.labels_fingerprint
    assert not os.path.exists(
        os.path.join(from_pairs.path, cache_module._SPILL_FILE)
    )
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
