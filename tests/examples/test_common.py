"""Tests of `examples/common.py`, the parts both programs share."""

import argparse

import numpy as np
import pytest

from examples import common
from examples.cifar100 import train as cifar100_train
from examples.market1501 import train as market1501_train


def test_method_runs_one_row_per_method_and_k_in_table_order():
    runs = common.method_runs(["dis", "full_kd", "pdbs"], [20, 5, 20])
    assert runs == [
        ("full_kd", None),
        ("pdbs", 5),
        ("pdbs", 20),
        ("dis", 5),
        ("dis", 20),
    ]


def test_check_subset_sizes_is_a_usage_error():
    parser = argparse.ArgumentParser()
    common.check_subset_sizes([1, 99], 100, parser)
    with pytest.raises(SystemExit):
        common.check_subset_sizes([5, 100], 100, parser)


def test_row_labels_follow_the_paper():
    assert common.row_label("teacher", None, "ResNet32") == "teacher (ResNet32)"
    assert common.row_label("hard_labels", None, "LeNet") == "student (LeNet)"
    assert common.row_label("full_kd", None, "LeNet") == "distillation"
    assert common.row_label("dis", 10, "LeNet") == "DIS (k=10)"


def test_channel_statistics_match_numpy():
    images = np.random.default_rng(0).integers(
        0, 256, (50, 4, 3, 3), dtype=np.uint8
    )
    mean, variance = common.channel_statistics(images, chunk_size=7)
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(variance, pixels.var(axis=0), rtol=1e-9)


def test_augmented_batches_flip_and_shift_within_bounds():
    # Image i is constant i + 1, so a shifted image shows i + 1 and the
    # zero padding only.
    images = np.arange(1, 11, dtype=np.uint8)[:, None, None, None] * np.ones(
        (10, 8, 6, 3), dtype=np.uint8
    )
    labels = np.arange(10)
    batches = common.AugmentedBatches(
        images, labels, batch_size=4, max_shift=2, seed=0
    )
    assert len(batches) == 3
    seen = []
    for index in range(len(batches)):
        batch_images, batch_labels = batches[index]
        assert batch_images.shape[1:] == (8, 6, 3)
        for image, label in zip(batch_images, batch_labels):
            assert set(np.unique(image)) <= {0, label + 1}
            # At most 2 rows and 2 columns of padding.
            assert np.count_nonzero(image[:, :, 0]) >= (8 - 2) * (6 - 2)
        seen.extend(batch_labels.tolist())
    assert sorted(seen) == list(range(10))

    flipped = common.AugmentedBatches(
        np.arange(6, dtype=np.uint8).reshape(1, 1, 6, 1),
        np.zeros(1),
        batch_size=1,
        seed=1,
    )
    rows = {tuple(flipped[0][0].ravel()) for _ in range(20)}
    assert rows == {(0, 1, 2, 3, 4, 5), (5, 4, 3, 2, 1, 0)}


def fake_rows():
    rows = [{"method": "teacher", "k": None, "accuracy": 0.7}]
    for method, k in common.method_runs(common.STUDENT_METHODS, [2, 10]):
        rows.append(
            {
                "method": method,
                "k": k,
                "accuracy": 0.4 + 0.001 * (k or 0),
                "train_seconds_per_epoch": 2.0,
                "last_layer_seconds_per_epoch": 0.5 if k else 1.0,
            }
        )
    for row in rows:
        row["label"] = common.row_label(row["method"], row["k"], "LeNet")
    return common.add_paper_numbers(
        rows, {("dis", 10): {"accuracy": 0.473}}, ["accuracy"]
    )


def test_write_results_one_csv_row_per_method_and_k(tmp_path, capsys):
    metrics = [("accuracy", "Accuracy")]
    paths = common.write_results(
        fake_rows(),
        output_dir=str(tmp_path),
        name="table",
        title="Table 2",
        metrics=metrics,
        plot_metrics=[("accuracy", "top-1 accuracy")],
        note="A note.",
    )
    printed = capsys.readouterr().out
    rows = common.read_csv(paths["csv"])
    assert [(row["method"], row["k"]) for row in rows] == [
        ("teacher", ""),
        ("hard_labels", ""),
        ("full_kd", ""),
    ] + [(method, k) for method in common.SUBSET_METHODS for k in ("2", "10")]
    dis_10 = next(row for row in rows if row["label"] == "DIS (k=10)")
    assert dis_10["paper_accuracy"] == "0.473"
    assert rows[0]["last_layer_seconds_per_epoch"] == "n/a"
    # The table: every label, the paper's number, the ratio to full KD.
    table = open(paths["table"]).read()
    assert table in printed and "A note." in table
    for row in rows:
        assert row["label"] in table
    dis_line = next(
        line for line in table.splitlines() if line.startswith("DIS (k=10)")
    )
    assert "47.30%" in dis_line and dis_line.endswith("0.50")
    for key in ("accuracy_vs_k", "accuracy_vs_time"):
        with open(paths[key], "rb") as png:
            assert png.read().startswith(b"\x89PNG")


@pytest.mark.parametrize("train", [cifar100_train, market1501_train])
def test_help_explains_every_option(train, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for action in train.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert option in help_text


def test_plots_draw_paper_numbers_legends_and_apart_labels(tmp_path):
    rows = [row for row in fake_rows() if row["method"] != common.TEACHER]
    for i, row in enumerate(rows):  # every point at the same place
        row["last_layer_seconds_per_epoch"] = 1.0
        row["accuracy"] = 0.5
    paper = {("dis", 10): {"accuracy": 0.473}, ("full_kd", None): {"accuracy": 0.6}}
    figure = common.plot_accuracy_vs_k(
        rows, str(tmp_path / "k.png"), "accuracy", "top-1", "T", paper_numbers=paper
    )
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "DIS, paper" in labels and "distillation, paper" in labels
    figure = common.plot_accuracy_vs_time(
        rows, str(tmp_path / "t.png"), "accuracy", "top-1", "T"
    )
    axes = figure.axes[0]
    legend = axes.get_legend_handles_labels()[1]
    assert len(legend) == len(set(legend)) == len({r["method"] for r in rows})
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert len(boxes) == len(rows)
    for i, box in enumerate(boxes):
        for other in boxes[i + 1 :]:
            assert not box.overlaps(other), (box, other)
