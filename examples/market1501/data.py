"""Market-1501 file names, splits and images, and a generated data set.

The official Market-1501 folder holds the splits `bounding_box_train` (12,936
images of 751 identities), `bounding_box_test` (the gallery: 19,732 images of
750 other identities, distractors and junk) and `query` (3,368 images). Every
image is a 128x64 JPEG named like `0002_c1s1_000451_03.jpg`: person id `0002`,
camera `1`, sequence `1`, frame `000451` and bounding box `03` of that frame.
Person id `-1` marks junk images (bad detections) and `0000` distractors
(people that are in no query); both only occur in the gallery.
"""

import dataclasses
import os
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

JUNK_PERSON_ID = -1
DISTRACTOR_PERSON_ID = 0
NUM_CAMERAS = 6
IMAGE_SIZE = (128, 64)
TRAIN_FOLDER = "bounding_box_train"
GALLERY_FOLDER = "bounding_box_test"
QUERY_FOLDER = "query"

_FILENAME_PATTERN = re.compile(r"(-1|\d{4})_c([1-6])s(\d)_(\d{6})_(\d{2})\.jpg")
# The real data set has 1,501 identities; the generated one draws from them.
_MAX_PERSON_ID = 1501


class Market1501FileName(NamedTuple):
    """The fields of a Market-1501 image file name.

    Attributes:
        person_id: The identity, `-1` for junk and `0` for distractors.
        camera_id: The camera, 1 to 6.
        sequence_id: The video sequence of that camera.
        frame_index: The frame of that sequence.
        box_index: The bounding box within that frame.
    """

    person_id: int
    camera_id: int
    sequence_id: int
    frame_index: int
    box_index: int

    def format(self):
        """Returns the file name, e.g. `"0002_c1s1_000451_03.jpg"`."""
        if self.person_id == JUNK_PERSON_ID:
            person = str(JUNK_PERSON_ID)
        else:
            person = f"{self.person_id:04d}"
        return (
            f"{person}_c{self.camera_id}s{self.sequence_id}_"
            f"{self.frame_index:06d}_{self.box_index:02d}.jpg"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Market1501Split:
    """The images of one Market-1501 split, sorted by file name.

    Attributes:
        image_paths: List of the image file paths.
        person_ids: `int64` array of shape `(num_images,)`.
        camera_ids: `int64` array of shape `(num_images,)`.
    """

    image_paths: list
    person_ids: np.ndarray
    camera_ids: np.ndarray

    def __len__(self):
        return len(self.image_paths)


@dataclasses.dataclass(frozen=True, eq=False)
class Market1501TrainSplit(Market1501Split):
    """The training split, with person ids relabelled as class indices.

    Attributes:
        labels: `int64` array of shape `(num_images,)`, the class index of
            each image, from 0 to `num_ids - 1` in increasing person id order.
        label_person_ids: `int64` array of shape `(num_ids,)`:
            `label_person_ids[label]` is the person id of class `label`.
    """

    labels: np.ndarray
    label_person_ids: np.ndarray

    @property
    def num_ids(self):
        """The number of identities (751 in the real data set)."""
        return len(self.label_person_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class Market1501:
    """The three Market-1501 splits.

    Attributes:
        train: `Market1501TrainSplit`, from `bounding_box_train`.
        gallery: `Market1501Split`, from `bounding_box_test`.
        query: `Market1501Split`, from `query`.
    """

    train: Market1501TrainSplit
    gallery: Market1501Split
    query: Market1501Split


def parse_market1501_filename(filename):
    """Parses a Market-1501 image file name.

    Args:
        filename: A file name such as `"0002_c1s1_000451_03.jpg"`; a leading
            folder path is ignored.

    Returns:
        A `Market1501FileName`.

    Example:

    ```python
    from examples.market1501.data import parse_market1501_filename

    name = parse_market1501_filename("0002_c1s1_000451_03.jpg")
    assert (name.person_id, name.camera_id, name.frame_index) == (2, 1, 451)
    ```
    """
    match = _FILENAME_PATTERN.fullmatch(os.path.basename(filename))
    if match is None:
        raise ValueError(
            "`filename` must be a Market-1501 image name such as "
            "`0002_c1s1_000451_03.jpg`: a person id of 4 digits or `-1`, "
            "`c` and a camera from 1 to 6, `s` and a sequence digit, a "
            "6-digit frame and a 2-digit box index, ending in `.jpg`. "
            f"Received: filename={filename!r}"
        )
    return Market1501FileName(*(int(field) for field in match.groups()))


def load_market1501(root):
    """Lists the images, identities and cameras of the Market-1501 splits.

    Reads the file names in `bounding_box_train`, `bounding_box_test` and
    `query` under `root`; files that are not `.jpg` (the official release
    contains `Thumbs.db` files) are skipped. The training person ids are
    relabelled as class indices `0` to `num_ids - 1`. Load the pixels with
    `load_market1501_images`.

    Args:
        root: The Market-1501 folder, e.g. `"Market-1501-v15.09.15"`.

    Returns:
        A `Market1501` with the `train`, `gallery` and `query` splits.

    Example:

    ```python
    import tempfile

    from examples.market1501.data import load_market1501
    from examples.market1501.data import write_market1501_folder

    root = write_market1501_folder(tempfile.mkdtemp(), num_ids=4)
    market = load_market1501(root)
    assert market.train.num_ids == 4
    ```
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            "`root` must be the Market-1501 folder holding "
            f"`{TRAIN_FOLDER}`, `{GALLERY_FOLDER}` and `{QUERY_FOLDER}`. "
            f"Received: root={root!r}, which is not a folder."
        )
    image_paths, person_ids, camera_ids = _read_split(root, TRAIN_FOLDER)
    if np.any(person_ids <= DISTRACTOR_PERSON_ID):
        raise ValueError(
            f"`{TRAIN_FOLDER}` must only hold real identities, but holds "
            "junk (`-1`) or distractor (`0000`) images. "
            f"Received: root={root!r}"
        )
    label_person_ids, labels = np.unique(person_ids, return_inverse=True)
    return Market1501(
        train=Market1501TrainSplit(
            image_paths=image_paths,
            person_ids=person_ids,
            camera_ids=camera_ids,
            labels=labels,
            label_person_ids=label_person_ids,
        ),
        gallery=Market1501Split(*_read_split(root, GALLERY_FOLDER)),
        query=Market1501Split(*_read_split(root, QUERY_FOLDER)),
    )


def load_market1501_images(image_paths, image_size=IMAGE_SIZE):
    """Loads images as one RGB array, resized with Pillow.

    Args:
        image_paths: Sequence of image file paths, e.g. a split's
            `image_paths`.
        image_size: `(height, width)` to resize to (bilinear). The
            Market-1501 images are 128x64 already.

    Returns:
        A `uint8` array of shape `(len(image_paths), height, width, 3)`.

    Example:

    ```python
    import tempfile

    from examples.market1501.data import load_market1501
    from examples.market1501.data import load_market1501_images
    from examples.market1501.data import write_market1501_folder

    market = load_market1501(write_market1501_folder(tempfile.mkdtemp()))
    images = load_market1501_images(market.query.image_paths, (64, 32))
    assert images.shape == (len(market.query), 64, 32, 3)
    ```
    """
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(size, int) and size > 0 for size in image_size)
    ):
        raise ValueError(
            "`image_size` must be a `(height, width)` pair of positive "
            f"integers. Received: image_size={image_size!r}"
        )
    height, width = image_size
    images = np.empty((len(image_paths), height, width, 3), dtype=np.uint8)
    for index, image_path in enumerate(image_paths):
        with Image.open(image_path) as image:
            images[index] = np.asarray(
                image.convert("RGB").resize(
                    (width, height), Image.Resampling.BILINEAR
                )
            )
    return images


def write_market1501_folder(root, num_ids=8, images_per_id=6, seed=0):
    """Writes a small generated data set in the Market-1501 layout.

    Creates `bounding_box_train`, `bounding_box_test` and `query` under
    `root`, with 128x64 JPEG images named in the official format and an
    empty `Thumbs.db` file in each folder, like those the official release
    contains. The training and test identities are distinct person ids
    drawn from 1 to 1501. Each test identity has one query image from a
    random camera and `images_per_id` gallery images from the cameras that
    follow it in turn, so the gallery always has a match under another
    camera and, once `images_per_id >= 6`, one under the query's own camera
    too. The gallery also holds `num_ids` junk (`-1`) and `num_ids`
    distractor (`0000`) images.

    Each identity wears its own upper and lower clothing colours in front of
    a background coloured by the camera, plus noise, so a small model can
    learn the identities and carry them over to unseen ones. Distractors are
    people in colours of their own; junk images show background only.

    Args:
        root: The folder to write into; created if missing.
        num_ids: Number of training identities, and of test identities,
            from 1 to 750.
        images_per_id: Number of images of each training identity and of
            each test identity in the gallery, a positive integer.
        seed: Seed of the person ids, colours, cameras and noise.

    Returns:
        `root`.

    Example:

    ```python
    import tempfile

    from examples.market1501.data import write_market1501_folder

    root = write_market1501_folder(tempfile.mkdtemp(), num_ids=4, seed=1)
    ```
    """
    if not isinstance(num_ids, int) or not 1 <= num_ids <= _MAX_PERSON_ID // 2:
        raise ValueError(
            "`num_ids` must be an integer from 1 to "
            f"{_MAX_PERSON_ID // 2}. Received: num_ids={num_ids!r}"
        )
    if not isinstance(images_per_id, int) or images_per_id < 1:
        raise ValueError(
            "`images_per_id` must be a positive integer. "
            f"Received: images_per_id={images_per_id!r}"
        )
    rng = np.random.default_rng(seed)
    person_ids = rng.choice(
        np.arange(1, _MAX_PERSON_ID + 1), size=2 * num_ids, replace=False
    ).tolist()
    train_person_ids = person_ids[:num_ids]
    test_person_ids = person_ids[num_ids:]
    clothing_colors = {
        person_id: rng.integers(0, 256, size=(2, 3)) for person_id in person_ids
    }
    background_colors = rng.integers(0, 256, size=(NUM_CAMERAS, 3))

    # (folder, person id, camera id, clothing colours or None for junk)
    images = []
    for person_id in train_person_ids:
        colors = clothing_colors[person_id]
        for _ in range(images_per_id):
            camera_id = _random_camera_id(rng)
            images.append((TRAIN_FOLDER, person_id, camera_id, colors))
    for person_id in test_person_ids:
        colors = clothing_colors[person_id]
        query_camera_id = _random_camera_id(rng)
        images.append((QUERY_FOLDER, person_id, query_camera_id, colors))
        for offset in range(images_per_id):
            # The cameras after the query's, wrapping around from 6 to 1.
            camera_id = (query_camera_id + offset) % NUM_CAMERAS + 1
            images.append((GALLERY_FOLDER, person_id, camera_id, colors))
    for _ in range(num_ids):
        distractor_colors = rng.integers(0, 256, size=(2, 3))
        images.append(
            (
                GALLERY_FOLDER,
                DISTRACTOR_PERSON_ID,
                _random_camera_id(rng),
                distractor_colors,
            )
        )
        images.append(
            (GALLERY_FOLDER, JUNK_PERSON_ID, _random_camera_id(rng), None)
        )

    for folder in (TRAIN_FOLDER, GALLERY_FOLDER, QUERY_FOLDER):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        with open(os.path.join(root, folder, "Thumbs.db"), "wb"):
            pass
    # A running frame index keeps every file name unique.
    for frame_index, (folder, person_id, camera_id, colors) in enumerate(
        images, start=1
    ):
        filename = Market1501FileName(
            person_id=person_id,
            camera_id=camera_id,
            sequence_id=1,
            frame_index=frame_index,
            box_index=1,
        ).format()
        pixels = _render_pedestrian(
            rng, background_colors[camera_id - 1], colors
        )
        Image.fromarray(pixels).save(
            os.path.join(root, folder, filename), quality=95
        )
    return root


def _read_split(root, folder):
    """Returns the image paths, person ids and camera ids in one folder."""
    folder_path = os.path.join(root, folder)
    if not os.path.isdir(folder_path):
        raise FileNotFoundError(
            f"`root` must be the Market-1501 folder holding `{folder}`. "
            f"Received: root={root!r}, which has no `{folder}` folder."
        )
    filenames = sorted(
        name for name in os.listdir(folder_path) if name.endswith(".jpg")
    )
    names = [parse_market1501_filename(filename) for filename in filenames]
    return (
        [os.path.join(folder_path, filename) for filename in filenames],
        np.array([name.person_id for name in names], dtype=np.int64),
        np.array([name.camera_id for name in names], dtype=np.int64),
    )


def _random_camera_id(rng):
    return int(rng.integers(1, NUM_CAMERAS + 1))


def _render_pedestrian(rng, background_color, clothing_colors):
    """Returns a `(128, 64, 3)` `uint8` image of a person-shaped block.

    `clothing_colors` holds the upper and lower body colours, shape `(2, 3)`;
    `None` draws the background only.
    """
    height, width = IMAGE_SIZE
    pixels = np.empty((height, width, 3))
    pixels[:] = background_color
    if clothing_colors is not None:
        body_columns = slice(width // 4, 3 * width // 4)
        pixels[8 : height // 2, body_columns] = clothing_colors[0]
        pixels[height // 2 : height - 8, body_columns] = clothing_colors[1]
    pixels += rng.normal(0.0, 16.0, size=pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
