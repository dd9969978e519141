import numpy as np
import pytest

from examples.market1501.evaluation import evaluate_ranking


def evaluate_one_query(
    distances, gallery_ids, gallery_cameras, ap_formula, max_rank=None
):
    """Evaluates query person 1 from camera 1 against one gallery."""
    return evaluate_ranking(
        [distances],
        query_ids=[1],
        query_cameras=[1],
        gallery_ids=gallery_ids,
        gallery_cameras=gallery_cameras,
        ap_formula=ap_formula,
        max_rank=max_rank or len(distances),
    )


def test_the_two_ap_formulas_differ():
    # Ranked gallery (already in distance order), query person 1, camera 1:
    #   rank 1: person 2   wrong
    #   rank 2: person 1   match 1
    #   rank 3: person 3   wrong
    #   rank 4: person 4   wrong
    #   rank 5: person 1   match 2
    # "average_precision": (1/2 + 2/5) / 2 = 0.45.
    # "trapezoid": match 1: ((0/1) + (1/2)) / 2 = 0.25;
    #              match 2: ((1/4) + (2/5)) / 2 = 0.325;
    #              AP = (0.25 + 0.325) / 2 = 0.2875.
    # CMC: first match at rank 2 -> [0, 1, 1, 1, 1].
    distances = [0.1, 0.2, 0.3, 0.4, 0.5]
    gallery_ids = [2, 1, 3, 4, 1]
    gallery_cameras = [2, 2, 2, 2, 3]
    mean_precision = evaluate_one_query(
        distances, gallery_ids, gallery_cameras, "average_precision"
    )
    trapezoid = evaluate_one_query(
        distances, gallery_ids, gallery_cameras, "trapezoid"
    )
    assert mean_precision["mAP"] == pytest.approx(0.45, abs=1e-12)
    assert trapezoid["mAP"] == pytest.approx(0.2875, abs=1e-12)
    for metrics in (mean_precision, trapezoid):
        np.testing.assert_array_equal(metrics["cmc"], [0, 1, 1, 1, 1])
        assert metrics["rank1"] == 0.0
        assert metrics["num_evaluated_queries"] == 1
        assert metrics["num_skipped_queries"] == 0


def test_trapezoid_starts_from_precision_one():
    # Matches at ranks 1 and 3.
    # "average_precision": (1/1 + 2/3) / 2 = 5/6.
    # "trapezoid": match 1 at rank 1: (1 + 1/1) / 2 = 1;
    #              match 2: ((1/2) + (2/3)) / 2 = 7/12;
    #              AP = (1 + 7/12) / 2 = 19/24.
    distances = [0.1, 0.2, 0.3]
    gallery_ids = [1, 5, 1]
    gallery_cameras = [2, 2, 4]
    assert evaluate_one_query(
        distances, gallery_ids, gallery_cameras, "average_precision"
    )["mAP"] == pytest.approx(5 / 6, abs=1e-12)
    assert evaluate_one_query(
        distances, gallery_ids, gallery_cameras, "trapezoid"
    )["mAP"] == pytest.approx(19 / 24, abs=1e-12)


@pytest.mark.parametrize("ap_formula", ["average_precision", "trapezoid"])
def test_same_person_same_camera_is_removed(ap_formula):
    # Gallery by distance, query person 1, camera 1:
    #   index 0: person 1, camera 1  same person, same camera -> removed
    #   index 1: person 2, camera 1  other person, same camera -> kept, wrong
    #   index 2: person 1, camera 2  match at rank 2 after the removal
    # average_precision: 1/2; trapezoid: (0/1 + 1/2) / 2 = 1/4.
    # CMC over max_rank 3: [0, 1, 1]. Without the removal it would be rank 1.
    metrics = evaluate_one_query(
        [0.1, 0.2, 0.3], [1, 2, 1], [1, 1, 2], ap_formula
    )
    expected_ap = {"average_precision": 0.5, "trapezoid": 0.25}[ap_formula]
    assert metrics["mAP"] == pytest.approx(expected_ap, abs=1e-12)
    np.testing.assert_array_equal(metrics["cmc"], [0, 1, 1])


@pytest.mark.parametrize("ap_formula", ["average_precision", "trapezoid"])
def test_junk_is_removed(ap_formula):
    # index 0: junk (-1) -> removed; index 1: person 1, camera 2 -> rank 1.
    # Both formulas: AP = 1; CMC = [1, 1].
    metrics = evaluate_one_query([0.1, 0.2], [-1, 1], [2, 2], ap_formula)
    assert metrics["mAP"] == 1.0
    np.testing.assert_array_equal(metrics["cmc"], [1, 1])


@pytest.mark.parametrize("ap_formula", ["average_precision", "trapezoid"])
def test_distractor_is_kept_as_a_wrong_answer(ap_formula):
    # index 0: distractor (0) -> kept, wrong at rank 1;
    # index 1: person 1, camera 2 -> match at rank 2.
    # average_precision: 1/2; trapezoid: (0/1 + 1/2) / 2 = 1/4; CMC [0, 1].
    metrics = evaluate_one_query([0.1, 0.2], [0, 1], [2, 2], ap_formula)
    expected_ap = {"average_precision": 0.5, "trapezoid": 0.25}[ap_formula]
    assert metrics["mAP"] == pytest.approx(expected_ap, abs=1e-12)
    np.testing.assert_array_equal(metrics["cmc"], [0, 1])


def test_ties_rank_the_lower_gallery_index_first():
    # Equal distances: the wrong answer at index 0 ranks before the match at
    # index 1 (AP 1/2); swapping them in the gallery puts the match first.
    wrong_first = evaluate_one_query(
        [0.5, 0.5], [2, 1], [2, 2], "average_precision"
    )
    match_first = evaluate_one_query(
        [0.5, 0.5], [1, 2], [2, 2], "average_precision"
    )
    assert wrong_first["mAP"] == 0.5 and wrong_first["rank1"] == 0.0
    assert match_first["mAP"] == 1.0 and match_first["rank1"] == 1.0


def test_ties_keep_the_gallery_order_in_long_galleries():
    # 200 equal distances (beyond any small-array special case of the sort)
    # with the only match at index 137 -> rank 138: AP = 1/138.
    gallery_ids = np.full(200, 2)
    gallery_ids[137] = 1
    metrics = evaluate_one_query(
        np.zeros(200), gallery_ids, np.full(200, 2), "average_precision"
    )
    assert metrics["mAP"] == pytest.approx(1 / 138, abs=1e-12)
    assert metrics["cmc"][136] == 0.0 and metrics["cmc"][137] == 1.0


def test_queries_without_a_valid_match_are_skipped():
    # Query 0 (person 1, camera 1): its only image of person 1 is from camera
    # 1 -> no valid match -> skipped.
    # Query 1 (person 2, camera 1), distances [0.3, 0.1, 0.2]:
    #   index 1: person 2, camera 3 -> match, rank 1
    #   index 2: person 3, camera 2 -> wrong, rank 2
    #   index 0: person 1, camera 1 -> wrong, rank 3
    # Query 2 (person 3, camera 4): distances [0.1, 0.2, 0.3]:
    #   index 0: wrong (rank 1); index 1: wrong (rank 2); index 2: match
    #   (rank 3) -> AP 1/3.
    # mAP over the evaluated queries 1 and 2: (1 + 1/3) / 2 = 2/3;
    # CMC: [1/2, 1/2, 1].
    metrics = evaluate_ranking(
        distances=[[0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.1, 0.2, 0.3]],
        query_ids=[1, 2, 3],
        query_cameras=[1, 1, 4],
        gallery_ids=[1, 2, 3],
        gallery_cameras=[1, 3, 2],
        max_rank=3,
    )
    assert metrics["num_evaluated_queries"] == 2
    assert metrics["num_skipped_queries"] == 1
    assert metrics["mAP"] == pytest.approx(2 / 3, abs=1e-12)
    np.testing.assert_allclose(metrics["cmc"], [0.5, 0.5, 1.0], atol=1e-12)
    assert metrics["rank1"] == 0.5


def test_no_query_with_a_valid_match():
    with pytest.raises(ValueError, match="No query has a correct match"):
        evaluate_one_query([0.1, 0.2], [1, -1], [1, 2], "average_precision")


def test_cmc_is_cut_at_max_rank():
    # The match is at rank 5, beyond max_rank 3: the CMC stays 0, the AP
    # still counts it: 1/5.
    metrics = evaluate_one_query(
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [2, 3, 4, 5, 1],
        [2, 2, 2, 2, 2],
        "average_precision",
        max_rank=3,
    )
    np.testing.assert_array_equal(metrics["cmc"], [0, 0, 0])
    assert metrics["mAP"] == pytest.approx(1 / 5, abs=1e-12)


def matlab_compute_ap(good_image, junk_image, index):
    """A line-by-line transcription of the official toolkit's compute_AP.m.

    `good_image` and `junk_image` are sets of gallery indices; `index` is the
    gallery sorted by distance. Returns `(ap, cmc)`.
    """
    cmc = np.zeros(len(index))
    ngood = len(good_image)
    old_recall = 0.0
    old_precision = 1.0
    ap = 0.0
    intersect_size = 0
    j = 0
    good_now = 0
    njunk = 0
    for n, gallery_index in enumerate(index):  # n is 0-based here
        flag = False
        if gallery_index in good_image:
            cmc[n - njunk :] = 1
            flag = True
            good_now += 1
        if gallery_index in junk_image:
            njunk += 1
            continue
        if flag:
            intersect_size += 1
        recall = intersect_size / ngood
        precision = intersect_size / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall = recall
        old_precision = precision
        j += 1
        if good_now == ngood:
            return ap, cmc
    return ap, cmc


def reference_metrics(
    distances, query_ids, query_cameras, gallery_ids, gallery_cameras, max_rank
):
    """The official toolkit's loop, plus torchreid's mean precision."""
    trapezoid_aps, mean_precisions, cmcs = [], [], []
    for query in range(len(query_ids)):
        same_person = gallery_ids == query_ids[query]
        same_camera = gallery_cameras == query_cameras[query]
        good_image = set(np.flatnonzero(same_person & ~same_camera))
        junk_image = set(
            np.flatnonzero((gallery_ids == -1) | (same_person & same_camera))
        )
        if not good_image:
            continue
        index = np.argsort(distances[query], kind="stable")
        ap, cmc = matlab_compute_ap(good_image, junk_image, index)
        trapezoid_aps.append(ap)
        cmcs.append(cmc[:max_rank])
        # torchreid: precision at every kept rank, summed where it matches.
        kept = [i for i in index if i not in junk_image]
        is_match = np.array([i in good_image for i in kept], dtype=float)
        precision_at_rank = np.cumsum(is_match) / np.arange(1, len(kept) + 1)
        mean_precisions.append(
            np.sum(precision_at_rank * is_match) / len(good_image)
        )
    return (
        np.mean(trapezoid_aps),
        np.mean(mean_precisions),
        np.mean(cmcs, axis=0),
    )


def test_matches_the_official_toolkit_on_random_data():
    # Few distinct distances, so ties occur; few people and cameras, so every
    # kind of removal occurs; some queries have no valid match.
    rng = np.random.default_rng(0)
    num_queries, num_gallery, max_rank = 40, 60, 10
    distances = rng.integers(0, 8, size=(num_queries, num_gallery)) / 8
    query_ids = rng.integers(1, 10, size=num_queries)
    query_cameras = rng.integers(1, 4, size=num_queries)
    gallery_ids = rng.integers(-1, 10, size=num_gallery)
    gallery_cameras = rng.integers(1, 4, size=num_gallery)
    labels = (query_ids, query_cameras, gallery_ids, gallery_cameras)
    expected_trapezoid, expected_mean_precision, expected_cmc = (
        reference_metrics(distances, *labels, max_rank)
    )
    trapezoid = evaluate_ranking(
        distances, *labels, ap_formula="trapezoid", max_rank=max_rank
    )
    mean_precision = evaluate_ranking(
        distances, *labels, ap_formula="average_precision", max_rank=max_rank
    )
    assert trapezoid["num_skipped_queries"] > 0
    assert trapezoid["mAP"] < mean_precision["mAP"]
    assert trapezoid["mAP"] == pytest.approx(expected_trapezoid, abs=1e-12)
    assert mean_precision["mAP"] == pytest.approx(
        expected_mean_precision, abs=1e-12
    )
    np.testing.assert_allclose(trapezoid["cmc"], expected_cmc, atol=1e-12)
    np.testing.assert_allclose(mean_precision["cmc"], expected_cmc, atol=1e-12)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"distances": [0.1, 0.2]}, "distances.shape=\\(2,\\)"),
        ({"distances": [[np.nan, 0.2]]}, "must not contain NaN"),
        ({"query_ids": [1, 2]}, "query_ids.shape=\\(2,\\)"),
        ({"query_cameras": []}, "query_cameras.shape=\\(0,\\)"),
        ({"gallery_ids": [1]}, "gallery_ids.shape=\\(1,\\)"),
        ({"gallery_cameras": [[1, 2]]}, "gallery_cameras.shape=\\(1, 2\\)"),
        ({"ap_formula": "area"}, "ap_formula='area'"),
        ({"max_rank": 0}, "max_rank=0"),
    ],
)
def test_rejects_bad_arguments(arguments, message):
    valid_arguments = {
        "distances": [[0.1, 0.2]],
        "query_ids": [1],
        "query_cameras": [1],
        "gallery_ids": [1, 2],
        "gallery_cameras": [2, 2],
    }
    with pytest.raises(ValueError, match=message):
        evaluate_ranking(**{**valid_arguments, **arguments})
