import collections
import pickle
import sys
import tarfile
import types

import numpy as np
import pytest

from examples.cifar100.data import load_cifar100
from examples.cifar100.data import write_cifar100_archive

NUM_TRAIN = 120
NUM_TEST = 40


@pytest.fixture(scope="module")
def archive_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar100") / "cifar-100-python.tar.gz"
    return write_cifar100_archive(
        str(path), num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3
    )


def read_raw_members(archive_path):
    """Reads the archive the plain way: every member, plain `pickle.load`."""
    with tarfile.open(archive_path, "r:gz") as archive:
        return {
            member.name: archive.extractfile(member).read()
            for member in archive.getmembers()
            if member.isfile()
        }


def test_archive_has_the_official_layout(archive_path):
    members = read_raw_members(archive_path)
    assert sorted(members) == [
        "cifar-100-python/meta",
        "cifar-100-python/test",
        "cifar-100-python/train",
    ]
    for content in members.values():
        assert content[:2] == b"\x80\x02"  # pickle protocol 2
    train = pickle.loads(members["cifar-100-python/train"], encoding="bytes")
    assert set(train) == {
        b"filenames",
        b"batch_label",
        b"fine_labels",
        b"coarse_labels",
        b"data",
    }
    assert train[b"data"].dtype == np.uint8
    assert train[b"data"].shape == (NUM_TRAIN, 3072)
    assert all(isinstance(name, bytes) for name in train[b"filenames"])
    meta = pickle.loads(members["cifar-100-python/meta"], encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100
    assert len(meta[b"coarse_label_names"]) == 20


@pytest.mark.parametrize("label_mode", ["fine", "coarse"])
def test_round_trip_from_archive(archive_path, label_mode):
    (x_train, y_train), (x_test, y_test) = load_cifar100(
        archive_path, label_mode=label_mode
    )
    members = read_raw_members(archive_path)
    for images, labels, member, num_images in (
        (x_train, y_train, "cifar-100-python/train", NUM_TRAIN),
        (x_test, y_test, "cifar-100-python/test", NUM_TEST),
    ):
        raw = pickle.loads(members[member], encoding="bytes")
        assert images.shape == (num_images, 32, 32, 3)
        assert images.dtype == np.uint8
        assert labels.shape == (num_images,)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(
            labels, raw[f"{label_mode}_labels".encode()]
        )
        # Every pixel, indexed the way the official row-major layout says:
        # image i, channel c, row r, column w is data[i, 1024 c + 32 r + w].
        index, channel, row, column = np.meshgrid(
            np.arange(num_images),
            np.arange(3),
            np.arange(32),
            np.arange(32),
            indexing="ij",
        )
        np.testing.assert_array_equal(
            images[index, row, column, channel],
            raw[b"data"][index, 1024 * channel + 32 * row + column],
        )
        # And one pixel spelled out: image 5, green channel, row 7, column 30.
        assert images[5, 7, 30, 1] == raw[b"data"][5, 1024 + 7 * 32 + 30]


def test_round_trip_from_extracted_folder(archive_path, tmp_path):
    with tarfile.open(archive_path, "r:gz") as archive:
        archive.extractall(tmp_path, filter="data")
    (x_train, y_train), (x_test, y_test) = load_cifar100(
        tmp_path / "cifar-100-python"
    )
    (x_train_expected, y_train_expected), (x_test_expected, y_test_expected) = (
        load_cifar100(archive_path)
    )
    np.testing.assert_array_equal(x_train, x_train_expected)
    np.testing.assert_array_equal(y_train, y_train_expected)
    np.testing.assert_array_equal(x_test, x_test_expected)
    np.testing.assert_array_equal(y_test, y_test_expected)


def test_generated_labels_are_balanced_and_coarse_matches_fine(archive_path):
    (_, fine_train), _ = load_cifar100(archive_path, label_mode="fine")
    (_, coarse_train), _ = load_cifar100(archive_path, label_mode="coarse")
    counts = np.bincount(fine_train, minlength=100)
    assert counts.min() == NUM_TRAIN // 100 and counts.max() == 2
    np.testing.assert_array_equal(coarse_train, fine_train // 5)


def test_generated_images_are_learnable(archive_path):
    # A nearest class-mean-colour classifier stands in for a tiny model.
    # Colours are drawn far apart relative to the noise averaged over 1024
    # pixels, so with seed 3 every test image is classified correctly.
    (x_train, y_train), (x_test, y_test) = load_cifar100(archive_path)
    train_colors = x_train.mean(axis=(1, 2))
    test_colors = x_test.mean(axis=(1, 2))
    class_colors = np.stack(
        [train_colors[y_train == label].mean(axis=0) for label in range(100)]
    )
    distances = np.linalg.norm(
        test_colors[:, None, :] - class_colors[None, :, :], axis=-1
    )
    accuracy = np.mean(distances.argmin(axis=1) == y_test)
    assert accuracy >= 0.95


def test_same_seed_writes_the_same_data(tmp_path):
    paths = [
        write_cifar100_archive(
            str(tmp_path / f"{name}.tar.gz"), num_train=5, num_test=5
        )
        for name in ("first", "second")
    ]
    (x_first, y_first), _ = load_cifar100(paths[0])
    (x_second, y_second), _ = load_cifar100(paths[1])
    np.testing.assert_array_equal(x_first, x_second)
    np.testing.assert_array_equal(y_first, y_second)


def test_path_none_uses_keras_and_returns_the_same_format(monkeypatch):
    # Stands in for Keras, which would download the data set: it returns
    # channels-first images, as Keras does under that data format, and
    # `(num_images, 1)` labels.
    images = np.arange(2 * 3 * 32 * 32, dtype=np.uint8).reshape(2, 3, 32, 32)
    labels = np.array([[4], [9]], dtype=np.uint8)
    received = {}

    def load_data(label_mode):
        received["label_mode"] = label_mode
        return (images, labels), (images, labels)

    fake_keras = types.SimpleNamespace(
        datasets=types.SimpleNamespace(
            cifar100=types.SimpleNamespace(load_data=load_data)
        ),
        config=types.SimpleNamespace(
            image_data_format=lambda: "channels_first"
        ),
    )
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    (x_train, y_train), (x_test, y_test) = load_cifar100(label_mode="coarse")
    assert received == {"label_mode": "coarse"}
    for x, y in ((x_train, y_train), (x_test, y_test)):
        np.testing.assert_array_equal(x, images.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(y, [4, 9])
        assert y.dtype == np.int64


def test_bad_label_mode(archive_path):
    with pytest.raises(ValueError, match="label_mode='medium'"):
        load_cifar100(archive_path, label_mode="medium")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="`path` must be .*nowhere"):
        load_cifar100(tmp_path / "nowhere.tar.gz")


def test_archive_without_the_expected_members(tmp_path):
    # The right files, but not under `cifar-100-python/`.
    path = tmp_path / "flat.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(__file__, arcname="train")
        archive.add(__file__, arcname="test")
    with pytest.raises(ValueError, match="no `cifar-100-python/train` file"):
        load_cifar100(path)


def test_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="`path` must be .*not a gzipped tar"):
        load_cifar100(path)


def test_folder_without_test_batch(archive_path, tmp_path):
    with tarfile.open(archive_path, "r:gz") as archive:
        archive.extractall(tmp_path, filter="data")
    folder = tmp_path / "cifar-100-python"
    (folder / "test").unlink()
    with pytest.raises(ValueError, match="`path` must be .*no `test` file"):
        load_cifar100(folder)


def test_refuses_pickles_that_rebuild_other_objects(tmp_path):
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as batch_file:
            pickle.dump(collections.OrderedDict(), batch_file, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize("argument", ["num_train", "num_test"])
@pytest.mark.parametrize("value", [0, 2.5])
def test_writer_rejects_bad_sizes(tmp_path, argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value}"):
        write_cifar100_archive(str(tmp_path / "x.tar.gz"), **{argument: value})
