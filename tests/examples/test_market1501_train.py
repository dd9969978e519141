"""End-to-end test of the Market-1501 program in its `--smoke` mode."""


import numpy as np
import pytest

import keras_dis

from examples import common
from examples.market1501 import train

# The rows of Table 3 with the smoke subset size, k = 3.
EXPECTED_ROWS = [
    ("teacher", ""),
    ("hard_labels", ""),
    ("full_kd", ""),
    ("pdbs", "3"),
    ("uniform", "3"),
    ("ftis", "3"),
    ("dis", "3"),
    (keras_dis.losses.DEFAULT_METHOD, "3"),
]
METRICS = ("mAP", "rank1", "accuracy")


def test_holdout_split_keeps_every_identity_in_training():
    labels = np.repeat(np.arange(5), [1, 2, 6, 10, 20])
    train_indices, holdout_indices = train.holdout_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train_indices, holdout_indices])) == list(
        range(len(labels))
    )
    # round(0.1 * n) held out, at least one, never an identity's last image.
    assert np.bincount(labels[holdout_indices], minlength=5).tolist() == [
        0,
        1,
        1,
        1,
        2,
    ]


def test_euclidean_distances_match_numpy():
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    expected = np.linalg.norm(query[:, None] - gallery[None], axis=-1)
    np.testing.assert_allclose(
        train.euclidean_distances(query, gallery), expected, atol=1e-5
    )


def test_euclidean_distances_of_huge_finite_features_are_finite():
    rng = np.random.default_rng(1)
    query, gallery = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    expected = np.linalg.norm(query[:, None] - gallery[None], axis=-1)
    # Squares of 1e20 overflow float32: the old float32 formula gave NaN.
    distances = train.euclidean_distances(query * 1e20, gallery * 1e20)
    assert np.isfinite(distances).all()
    np.testing.assert_allclose(distances, expected * 1e20, rtol=1e-6)
    with pytest.raises(ValueError, match="query_features.*1 non-finite"):
        train.euclidean_distances(
            np.where(np.arange(12).reshape(3, 4) == 5, np.inf, query), gallery
        )


@pytest.mark.parametrize("program", ["market1501", "cifar100"])
def test_smoke_refuses_data(program, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"examples.{program}.train")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--smoke", "--data", str(tmp_path), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "cannot be combined with --data" in capsys.readouterr().err


def test_k_must_be_smaller_than_the_number_of_identities(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--smoke", "--output-dir", str(tmp_path), "--k", "12"])
    assert exit_info.value.code == 2
    assert "--k" in capsys.readouterr().err


def test_smoke_run_writes_table_csv_and_plots(tmp_path, capsys):
    results = train.main(
        ["--smoke", "--output-dir", str(tmp_path), "--verbose", "2"]
    )
    printed = capsys.readouterr().out

    rows = common.read_csv(tmp_path / "table3_resnet18.csv")
    assert [(row["method"], row["k"]) for row in rows] == EXPECTED_ROWS
    assert len(results["table3_resnet18"]) == len(EXPECTED_ROWS)
    for row in rows:
        for metric in METRICS:
            assert 0.0 <= float(row[metric]) <= 1.0
        # The paper reports no rank-1, and no row with a smoke k.
        assert row["paper_rank1"] == "n/a"
    for row in rows[1:]:
        assert float(row["train_seconds_per_epoch"]) > 0
        assert float(row["last_layer_seconds_per_epoch"]) > 0
    assert (rows[0]["paper_mAP"], rows[0]["paper_accuracy"]) == (
        "0.637",
        "0.842",
    )
    assert all(row["paper_mAP"] == "n/a" for row in rows[3:])

    table = (tmp_path / "table3_resnet18.txt").read_text()
    for row in rows:
        assert row["label"] in table
        assert row["label"] in printed
    assert "SMOKE RUN" in table and "60.68 s" in table
    # meanAP (the paper's headline), rank-1 and top-1, each against k and
    # against the last layer's time.
    for metric in ("mAP", "rank1", "accuracy"):
        for plot in ("vs_k", "vs_last_layer_time"):
            png = (tmp_path / f"table3_resnet18_{metric}_{plot}.png").read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (tmp_path / "teacher.keras").stat().st_size > 0
    # Each student's DistillationMonitor curves.
    monitor_plots = sorted(p.name for p in tmp_path.glob("monitor_*.png"))
    assert "monitor_full_kd.png" in monitor_plots and "monitor_dis_k3.png" in monitor_plots
    assert (tmp_path / "teacher_targets_train.npy").stat().st_size > 0
    assert (tmp_path / "smoke_data" / "Market-1501" / "query").is_dir()
