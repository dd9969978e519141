"""The Market-1501 re-identification protocol: CMC and mean average precision.

For each query the gallery is ranked by distance, after removing the images
that must not count: junk images (person id `-1`) and the images of the
query's person taken by the query's camera (finding those needs no
re-identification across cameras). Distractors (person id `0`) stay in the
gallery as wrong answers. This is the protocol of the official MATLAB toolkit
and of open-source re-ID toolkits such as torchreid and open-reid.
"""

import numpy as np

from examples.market1501.data import JUNK_PERSON_ID

AP_FORMULAS = ("average_precision", "trapezoid")


def evaluate_ranking(
    distances,
    query_ids,
    query_cameras,
    gallery_ids,
    gallery_cameras,
    ap_formula="average_precision",
    max_rank=50,
):
    """Computes the CMC curve and mAP of a query-gallery distance matrix.

    Each query's gallery is sorted by increasing distance with a stable sort,
    so equal distances keep the gallery order: the lower gallery index ranks
    first (as MATLAB's `sort` in the official toolkit does). Junk images and
    images of the query's person from the query's camera are then removed,
    and the correct matches are the remaining images of the query's person.
    Queries left with no correct match are skipped and counted.

    Two forms of average precision (AP) are offered. With `n` correct
    matches, the `i`-th of them (`i = 1..n`) at rank `r_i` (1-based, after
    the removal) has precision `p_i = i / r_i`.

    - `"average_precision"`: `AP = (1 / n) * sum_i p_i`, the mean precision
      at the correct matches, as torchreid and open-reid compute it.
    - `"trapezoid"`: the official Market-1501 toolkit (`compute_AP.m`), which
      integrates precision over recall with the trapezoid rule:
      `AP = (1 / n) * sum_i (q_i + p_i) / 2`, where `q_i` is the precision
      one rank earlier, `(i - 1) / (r_i - 1)`, or `1` when `r_i = 1`. It is
      lower than `"average_precision"` whenever a match is preceded by a
      wrong answer.

    Args:
        distances: Array of shape `(num_queries, num_gallery)`; smaller means
            more similar. Must not contain NaN.
        query_ids: Person ids of the queries, shape `(num_queries,)`.
        query_cameras: Camera ids of the queries, shape `(num_queries,)`.
        gallery_ids: Person ids of the gallery, shape `(num_gallery,)`;
            `-1` marks junk and `0` distractors.
        gallery_cameras: Camera ids of the gallery, shape `(num_gallery,)`.
        ap_formula: `"average_precision"` or `"trapezoid"`, see above.
        max_rank: Length of the returned CMC curve, a positive integer.

    Returns:
        A dict with
        - `"cmc"`: `float64` array of shape `(max_rank,)`; `cmc[k]` is the
          fraction of the evaluated queries whose first correct match has
          rank `k + 1` or better.
        - `"rank1"`: `cmc[0]`, a float.
        - `"mAP"`: The mean AP over the evaluated queries, a float.
        - `"num_evaluated_queries"`: The number of queries with a correct
          match, over which the metrics are averaged.
        - `"num_skipped_queries"`: The number of queries without a correct
          match in the gallery, which are left out of every metric.

    Example:

    ```python
    from examples.market1501.evaluation import evaluate_ranking

    metrics = evaluate_ranking(
        distances=[[0.1, 0.2, 0.3]],
        query_ids=[7],
        query_cameras=[1],
        gallery_ids=[3, 7, 7],
        gallery_cameras=[2, 2, 3],
        max_rank=3,
    )
    # Matches at ranks 2 and 3: AP = (1/2 + 2/3) / 2.
    assert metrics["rank1"] == 0.0 and abs(metrics["mAP"] - 7 / 12) < 1e-12
    ```
    """
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2:
        raise ValueError(
            "`distances` must have shape `(num_queries, num_gallery)`. "
            f"Received: distances.shape={distances.shape}"
        )
    if np.isnan(distances).any():
        raise ValueError(
            "`distances` must not contain NaN, which has no place in a "
            "ranking. Received: distances with "
            f"{int(np.isnan(distances).sum())} NaN values"
        )
    num_queries, num_gallery = distances.shape
    query_ids = _as_labels("query_ids", query_ids, num_queries, "num_queries")
    query_cameras = _as_labels(
        "query_cameras", query_cameras, num_queries, "num_queries"
    )
    gallery_ids = _as_labels(
        "gallery_ids", gallery_ids, num_gallery, "num_gallery"
    )
    gallery_cameras = _as_labels(
        "gallery_cameras", gallery_cameras, num_gallery, "num_gallery"
    )
    if ap_formula not in AP_FORMULAS:
        raise ValueError(
            f"`ap_formula` must be one of {AP_FORMULAS}. "
            f"Received: ap_formula={ap_formula!r}"
        )
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(
            "`max_rank` must be a positive integer. "
            f"Received: max_rank={max_rank!r}"
        )

    # Stable, so that ties keep the gallery order.
    rankings = np.argsort(distances, axis=1, kind="stable")
    first_match_counts = np.zeros(max_rank)
    average_precisions = []
    for query, ranking in enumerate(rankings):
        ranked_ids = gallery_ids[ranking]
        ranked_cameras = gallery_cameras[ranking]
        same_person = ranked_ids == query_ids[query]
        kept = (ranked_ids != JUNK_PERSON_ID) & ~(
            same_person & (ranked_cameras == query_cameras[query])
        )
        # 1-based ranks of the correct matches among the kept images.
        match_ranks = np.flatnonzero(same_person[kept]) + 1
        if match_ranks.size == 0:
            continue
        if match_ranks[0] <= max_rank:
            first_match_counts[match_ranks[0] - 1] += 1
        average_precisions.append(_average_precision(match_ranks, ap_formula))

    if not average_precisions:
        raise ValueError(
            "No query has a correct match in the gallery: an image of the "
            "same person from another camera. Check `query_ids`, "
            "`query_cameras`, `gallery_ids` and `gallery_cameras`."
        )
    num_evaluated = len(average_precisions)
    cmc = np.cumsum(first_match_counts) / num_evaluated
    return {
        "cmc": cmc,
        "rank1": float(cmc[0]),
        "mAP": float(np.mean(average_precisions)),
        "num_evaluated_queries": num_evaluated,
        "num_skipped_queries": num_queries - num_evaluated,
    }


def _as_labels(name, values, expected_length, expected_length_name):
    """Returns `values` as a 1D integer array after checking its length."""
    labels = np.asarray(values)
    if labels.shape != (expected_length,):
        raise ValueError(
            f"`{name}` must have shape `({expected_length_name},)` = "
            f"`({expected_length},)`, from `distances`. "
            f"Received: {name}.shape={labels.shape}"
        )
    return labels.astype(np.int64)


def _average_precision(match_ranks, ap_formula):
    """Returns the AP of one query from the 1-based ranks of its matches."""
    match_counts = np.arange(1, match_ranks.size + 1)
    precisions = match_counts / match_ranks
    if ap_formula == "average_precision":
        return float(np.mean(precisions))
    # The precision one rank before each match; 1 before the first rank.
    previous_precisions = np.where(
        match_ranks > 1,
        (match_counts - 1) / np.maximum(match_ranks - 1, 1),
        1.0,
    )
    return float(np.mean((previous_precisions + precisions) / 2))
