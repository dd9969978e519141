import os

import numpy as np
import pytest
from PIL import Image

from examples.market1501.data import Market1501FileName
from examples.market1501.data import load_market1501
from examples.market1501.data import load_market1501_images
from examples.market1501.data import parse_market1501_filename
from examples.market1501.data import write_market1501_folder
from examples.market1501.evaluation import evaluate_ranking

NUM_IDS = 6
IMAGES_PER_ID = 7


@pytest.fixture(scope="module")
def market_root(tmp_path_factory):
    return write_market1501_folder(
        str(tmp_path_factory.mktemp("market1501")),
        num_ids=NUM_IDS,
        images_per_id=IMAGES_PER_ID,
        seed=5,
    )


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 1, 1, 451, 3)),
        ("1501_c6s4_001902_01.jpg", (1501, 6, 4, 1902, 1)),
        ("0000_c3s2_000100_07.jpg", (0, 3, 2, 100, 7)),
        ("-1_c5s3_015620_02.jpg", (-1, 5, 3, 15620, 2)),
        (os.path.join("query", "0002_c2s1_000301_01.jpg"), (2, 2, 1, 301, 1)),
    ],
)
def test_parse_filename(filename, expected):
    name = parse_market1501_filename(filename)
    assert name == Market1501FileName(*expected)
    assert name.format() == os.path.basename(filename)


@pytest.mark.parametrize(
    "filename",
    [
        "Thumbs.db",
        "0002_c1s1_000451_03.png",
        "2_c1s1_000451_03.jpg",  # person id not 4 digits
        "-2_c1s1_000451_03.jpg",  # the only negative id is -1
        "0002_c7s1_000451_03.jpg",  # camera 7
        "0002_c0s1_000451_03.jpg",  # camera 0
        "0002_c1s1_451_03.jpg",  # frame not 6 digits
        "0002_c1s1_000451_3.jpg",  # box not 2 digits
        "0002_c1_000451_03.jpg",  # no sequence
    ],
)
def test_parse_rejects_malformed_names(filename):
    with pytest.raises(ValueError, match=f"filename='{filename}'"):
        parse_market1501_filename(filename)


def test_generated_folder_has_the_official_layout(market_root):
    assert sorted(os.listdir(market_root)) == [
        "bounding_box_test",
        "bounding_box_train",
        "query",
    ]
    for folder in os.listdir(market_root):
        for filename in os.listdir(os.path.join(market_root, folder)):
            if filename == "Thumbs.db":
                continue
            parse_market1501_filename(filename)
            path = os.path.join(market_root, folder, filename)
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (64, 128)  # (width, height)


def test_load_splits(market_root):
    market = load_market1501(market_root)
    train, gallery, query = market.train, market.gallery, market.query

    assert len(train) == NUM_IDS * IMAGES_PER_ID
    assert train.num_ids == NUM_IDS
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(NUM_IDS))
    np.testing.assert_array_equal(
        train.label_person_ids[train.labels], train.person_ids
    )
    # Labels follow increasing person ids.
    assert np.all(np.diff(train.label_person_ids) > 0)
    assert np.all(train.person_ids > 0)

    # Thumbs.db is skipped; the paths are sorted and name real files.
    for split in (train, gallery, query):
        assert all(path.endswith(".jpg") for path in split.image_paths)
        assert split.image_paths == sorted(split.image_paths)
        assert all(os.path.isfile(path) for path in split.image_paths)
        assert split.person_ids.dtype == split.camera_ids.dtype == np.int64
        assert len(split.person_ids) == len(split.camera_ids) == len(split)
        assert set(split.camera_ids) <= set(range(1, 7))
        for path, person_id, camera_id in zip(
            split.image_paths, split.person_ids, split.camera_ids
        ):
            name = parse_market1501_filename(path)
            assert (name.person_id, name.camera_id) == (person_id, camera_id)

    # The gallery: IMAGES_PER_ID images of each test identity, NUM_IDS junk
    # and NUM_IDS distractors; test identities are not training identities.
    test_ids = set(query.person_ids)
    assert len(query) == len(test_ids) == NUM_IDS
    assert not test_ids & set(train.person_ids)
    assert np.sum(gallery.person_ids == -1) == NUM_IDS
    assert np.sum(gallery.person_ids == 0) == NUM_IDS
    assert len(gallery) == (IMAGES_PER_ID + 2) * NUM_IDS
    for person_id, camera_id in zip(query.person_ids, query.camera_ids):
        gallery_cameras = gallery.camera_ids[gallery.person_ids == person_id]
        assert len(gallery_cameras) == IMAGES_PER_ID
        # With 7 images per identity, every camera, the query's included.
        assert set(gallery_cameras) == set(range(1, 7))
        assert np.sum(gallery_cameras != camera_id) >= 1


def test_load_images(market_root):
    query = load_market1501(market_root).query
    images = load_market1501_images(query.image_paths)
    assert images.shape == (NUM_IDS, 128, 64, 3)
    assert images.dtype == np.uint8
    with Image.open(query.image_paths[2]) as image:
        np.testing.assert_array_equal(images[2], np.asarray(image))

    resized = load_market1501_images(query.image_paths, image_size=(32, 16))
    assert resized.shape == (NUM_IDS, 32, 16, 3)
    # Bilinear resizing keeps the mean colour within a few grey levels.
    np.testing.assert_allclose(
        resized.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=4
    )


def test_generated_identities_are_learnable(market_root):
    # Mean colours of the upper and lower body stand in for a learned
    # embedding; with seed 5 they retrieve every query's identity first.
    market = load_market1501(market_root)

    def body_colors(split):
        images = load_market1501_images(split.image_paths).astype(float)
        upper = images[:, 8:64, 16:48].mean(axis=(1, 2))
        lower = images[:, 64:120, 16:48].mean(axis=(1, 2))
        return np.concatenate([upper, lower], axis=1)

    query_features = body_colors(market.query)
    gallery_features = body_colors(market.gallery)
    distances = np.linalg.norm(
        query_features[:, None] - gallery_features[None], axis=-1
    )
    metrics = evaluate_ranking(
        distances,
        market.query.person_ids,
        market.query.camera_ids,
        market.gallery.person_ids,
        market.gallery.camera_ids,
        max_rank=5,
    )
    assert metrics["rank1"] == 1.0
    assert metrics["mAP"] == 1.0
    assert metrics["num_skipped_queries"] == 0


def test_same_seed_writes_the_same_names(tmp_path):
    roots = [
        write_market1501_folder(str(tmp_path / name), num_ids=2, seed=9)
        for name in ("first", "second")
    ]
    first, second = (load_market1501(root) for root in roots)
    for split in ("train", "gallery", "query"):
        assert [
            os.path.basename(path) for path in getattr(first, split).image_paths
        ] == [
            os.path.basename(path)
            for path in getattr(second, split).image_paths
        ]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="`root` must be .*absent"):
        load_market1501(tmp_path / "absent")


def test_missing_split_folder(tmp_path):
    os.makedirs(tmp_path / "bounding_box_train")
    os.makedirs(tmp_path / "bounding_box_test")
    with pytest.raises(FileNotFoundError, match="no `query` folder"):
        load_market1501(tmp_path)


def test_malformed_jpg_name_in_a_split(tmp_path):
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(tmp_path / folder)
    (tmp_path / "query" / "person_2.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="person_2.jpg"):
        load_market1501(tmp_path)


def test_junk_in_training_split(tmp_path):
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(tmp_path / folder)
    junk_path = tmp_path / "bounding_box_train" / "-1_c1s1_000001_01.jpg"
    junk_path.write_bytes(b"")
    with pytest.raises(ValueError, match="`bounding_box_train` must only"):
        load_market1501(tmp_path)


@pytest.mark.parametrize("image_size", [(128,), (128, 0), (128.0, 64), 128])
def test_load_images_rejects_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size="):
        load_market1501_images([], image_size=image_size)


@pytest.mark.parametrize(
    "argument, value", [("num_ids", 0), ("num_ids", 751), ("images_per_id", 0)]
)
def test_writer_rejects_bad_sizes(tmp_path, argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value}"):
        write_market1501_folder(str(tmp_path), **{argument: value})
