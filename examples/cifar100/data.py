"""CIFAR-100 from the official archive, and a generated archive for tests.

The official `cifar-100-python.tar.gz` holds a `cifar-100-python/` folder with
three Python pickles, `train`, `test` and `meta`, written by Python 2. Each
batch is a dict with `bytes` keys: `b"data"` is a `uint8` array of shape
`(num_images, 3072)` holding every image as its red, green and blue 32x32
planes one after another (row-major, channels first); `b"fine_labels"` and
`b"coarse_labels"` are lists of ints; `b"filenames"` and `b"batch_label"` are
`bytes`. `meta` holds `b"fine_label_names"` (100) and `b"coarse_label_names"`
(20).
"""

import io
import os
import pickle
import tarfile

import numpy as np

ARCHIVE_FOLDER = "cifar-100-python"
NUM_FINE_CLASSES = 100
NUM_COARSE_CLASSES = 20
IMAGE_SIZE = 32
NUM_CHANNELS = 3

_LABEL_MODES = ("fine", "coarse")
_BATCH_NAMES = ("train", "test")
_PATH_REQUIREMENT = (
    "`path` must be a `cifar-100-python.tar.gz` archive holding "
    f"`{ARCHIVE_FOLDER}/train` and `{ARCHIVE_FOLDER}/test`, or the extracted "
    f"`{ARCHIVE_FOLDER}/` folder holding `train` and `test`."
)

# Globals that unpickling the official batches, or the ones written by
# `write_cifar100_archive`, needs: numpy array reconstruction, plus
# `_codecs.encode`, which Python 3 uses to pickle `bytes` under protocol 2.
# Anything else is refused so that a tampered file cannot run code on load.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds the objects a CIFAR batch contains."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"Refusing to unpickle `{module}.{name}` from a CIFAR-100 file. "
            "The file may be corrupted or malicious."
        )


def load_cifar100(path=None, label_mode="fine"):
    """Loads CIFAR-100 from a local copy of the official archive.

    Reads the `train` and `test` batches either straight out of
    `cifar-100-python.tar.gz` (nothing is extracted to disk) or from the
    extracted `cifar-100-python/` folder. Without a `path`, falls back to
    `keras.datasets.cifar100.load_data`, which downloads the archive.

    Args:
        path: Path to `cifar-100-python.tar.gz`, or to the extracted
            `cifar-100-python/` folder holding `train` and `test`. `None`
            downloads the data set with Keras.
        label_mode: `"fine"` for the 100 classes or `"coarse"` for the 20
            superclasses.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: images as `uint8` arrays of
        shape `(num_images, 32, 32, 3)` and labels as `int64` arrays of shape
        `(num_images,)`.

    Example:

    ```python
    import os
    import tempfile

    from examples.cifar100.data import load_cifar100, write_cifar100_archive

    archive_path = os.path.join(tempfile.mkdtemp(), "cifar-100-python.tar.gz")
    write_cifar100_archive(archive_path, num_train=200, num_test=50)
    (x_train, y_train), (x_test, y_test) = load_cifar100(archive_path)
    assert x_train.shape == (200, 32, 32, 3) and y_test.shape == (50,)
    ```
    """
    if label_mode not in _LABEL_MODES:
        raise ValueError(
            f"`label_mode` must be one of {_LABEL_MODES}. "
            f"Received: label_mode={label_mode!r}"
        )
    if path is None:
        return _load_with_keras(label_mode)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{_PATH_REQUIREMENT} Received: path={path!r}, which does not "
            "exist."
        )
    label_key = f"{label_mode}_labels".encode()
    train_batch, test_batch = _read_batches(path)
    return _batch_arrays(train_batch, label_key), _batch_arrays(
        test_batch, label_key
    )


def write_cifar100_archive(path, num_train=1000, num_test=200, seed=0):
    """Writes a small generated archive in the official CIFAR-100 format.

    The archive has the layout, pickle protocol and dict keys of the official
    `cifar-100-python.tar.gz`, so that tests and smoke runs go through the
    same loader as the real data. Each fine class has its own colour and
    every image is that colour plus Gaussian noise, so a small model can
    learn the classes. Fine class `c` belongs to coarse class `c // 5` (the
    real data set groups its classes differently). Labels are balanced: the
    fine classes are dealt out in turn, then shuffled.

    Args:
        path: Where to write the `.tar.gz` archive.
        num_train: Number of training images, a positive integer.
        num_test: Number of test images, a positive integer.
        seed: Seed of the random colours, noise and label order.

    Returns:
        `path`.

    Example:

    ```python
    import os
    import tempfile

    from examples.cifar100.data import write_cifar100_archive

    archive_path = os.path.join(tempfile.mkdtemp(), "cifar-100-python.tar.gz")
    write_cifar100_archive(archive_path, num_train=200, num_test=50, seed=1)
    ```
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. "
                f"Received: {name}={value!r}"
            )
    rng = np.random.default_rng(seed)
    class_colors = rng.integers(0, 256, size=(NUM_FINE_CLASSES, NUM_CHANNELS))
    members = {
        "train": _generated_batch(
            rng, class_colors, num_train, b"training batch 1 of 1"
        ),
        "test": _generated_batch(
            rng, class_colors, num_test, b"testing batch 1 of 1"
        ),
        "meta": {
            b"fine_label_names": [
                f"fine_class_{label:02d}".encode()
                for label in range(NUM_FINE_CLASSES)
            ],
            b"coarse_label_names": [
                f"coarse_class_{label:02d}".encode()
                for label in range(NUM_COARSE_CLASSES)
            ],
        },
    }
    with tarfile.open(path, "w:gz") as archive:
        folder_info = tarfile.TarInfo(ARCHIVE_FOLDER)
        folder_info.type = tarfile.DIRTYPE
        folder_info.mode = 0o755
        archive.addfile(folder_info)
        for name, content in members.items():
            data = pickle.dumps(content, protocol=2)
            member_info = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/{name}")
            member_info.size = len(data)
            archive.addfile(member_info, io.BytesIO(data))
    return path


def _load_with_keras(label_mode):
    # Imported here so that reading a local archive does not need Keras.
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar100.load_data(
        label_mode=label_mode
    )
    if keras.config.image_data_format() == "channels_first":
        x_train = x_train.transpose(0, 2, 3, 1)
        x_test = x_test.transpose(0, 2, 3, 1)
    # Keras returns labels of shape `(num_images, 1)`.
    return (x_train, y_train.reshape(-1).astype(np.int64)), (
        x_test,
        y_test.reshape(-1).astype(np.int64),
    )


def _read_batches(path):
    """Unpickles the `train` and `test` batches from a folder or archive."""
    if os.path.isdir(path):
        return [
            _unpickle(_open_folder_batch(path, name)) for name in _BATCH_NAMES
        ]
    try:
        archive = tarfile.open(path, "r:gz")
    except tarfile.ReadError as error:
        raise ValueError(
            f"{_PATH_REQUIREMENT} Received: path={path!r}, which is not a "
            "gzipped tar archive."
        ) from error
    with archive:
        return [
            _unpickle(_open_archive_batch(archive, path, name))
            for name in _BATCH_NAMES
        ]


def _open_folder_batch(folder, name):
    batch_path = os.path.join(folder, name)
    if not os.path.isfile(batch_path):
        raise ValueError(
            f"{_PATH_REQUIREMENT} Received: path={folder!r}, a folder with no "
            f"`{name}` file."
        )
    return open(batch_path, "rb")


def _open_archive_batch(archive, archive_path, name):
    member_name = f"{ARCHIVE_FOLDER}/{name}"
    try:
        batch_file = archive.extractfile(member_name)
    except KeyError:
        batch_file = None
    # `extractfile` also returns `None` for members that are not files.
    if batch_file is None:
        raise ValueError(
            f"{_PATH_REQUIREMENT} Received: path={archive_path!r}, an archive "
            f"with no `{member_name}` file."
        )
    return batch_file


def _unpickle(batch_file):
    with batch_file:
        return _RestrictedUnpickler(batch_file, encoding="bytes").load()


def _batch_arrays(batch, label_key):
    """Returns channels-last images and labels of one unpickled batch."""
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    images = images.reshape(-1, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    return images.transpose(0, 2, 3, 1), labels


def _generated_batch(rng, class_colors, num_images, batch_label):
    """Returns one batch dict of class-coloured noisy images."""
    fine_labels = rng.permutation(np.arange(num_images) % NUM_FINE_CLASSES)
    coarse_labels = fine_labels // (NUM_FINE_CLASSES // NUM_COARSE_CLASSES)
    noise = rng.normal(
        0.0, 24.0, size=(num_images, IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS)
    )
    images = class_colors[fine_labels][:, None, None, :] + noise
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    # The official layout: each image's three colour planes, one after another.
    data = images.transpose(0, 3, 1, 2).reshape(num_images, -1)
    return {
        b"filenames": [
            f"fine_class_{label:02d}_s_{index:06d}.png".encode()
            for index, label in enumerate(fine_labels)
        ],
        b"batch_label": batch_label,
        b"fine_labels": fine_labels.tolist(),
        b"coarse_labels": coarse_labels.tolist(),
        b"data": data,
    }
