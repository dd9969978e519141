"""End-to-end test of the CIFAR-100 program in its `--smoke` mode."""


import keras
import numpy as np
import pytest

import keras_dis
from examples.cifar100 import models
from examples import common
from examples.cifar100 import train

# The rows of Table 1 with the smoke subset size, k = 5.
EXPECTED_ROWS = [
    ("teacher", ""),
    ("hard_labels", ""),
    ("full_kd", ""),
    ("pdbs", "5"),
    ("uniform", "5"),
    ("ftis", "5"),
    ("dis", "5"),
    (keras_dis.losses.DEFAULT_METHOD, "5"),
]


def test_k_must_be_smaller_than_the_number_of_classes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--smoke", "--output-dir", str(tmp_path), "--k", "100"])
    assert exit_info.value.code == 2
    assert "--k" in capsys.readouterr().err


@pytest.mark.parametrize(
    "build_student",
    [
        models.lenet,
        lambda *args, **kwargs: models.shallow_cnn(
            *args, conv_filters=4, bottleneck_units=8, hidden_units=16, **kwargs
        ),
    ],
    ids=["lenet", "shallow_cnn"],
)
def test_students_end_in_the_head_and_predict_logits(build_student):
    student = build_student(100, [120.0] * 3, [4000.0] * 3, seed=0)
    assert isinstance(student.layers[-1], keras_dis.SampledDistillationHead)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3))
    logits = student.predict(images.astype("uint8"), verbose=0)
    assert logits.shape == (2, 100) and np.all(np.isfinite(logits))


def test_resnet32_has_32_weighted_layers():
    teacher = models.resnet32(100, [120.0] * 3, [4000.0] * 3)
    weighted = [
        layer
        for layer in teacher.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
        and not layer.name.endswith("_proj")
    ]
    assert len(weighted) == 32 and teacher.name == "ResNet32"


def test_smoke_run_writes_table_csv_and_plots(tmp_path, capsys):
    # One student keeps the test short on every backend; the other is
    # covered above, and the smoke run's default trains both.
    results = train.main(
        [
            "--smoke",
            "--output-dir",
            str(tmp_path),
            "--students",
            "shallow_cnn",
            "--verbose",
            "2",
        ]
    )
    printed = capsys.readouterr().out

    assert list(results) == ["table1_shallow_cnn"]
    rows = common.read_csv(tmp_path / "table1_shallow_cnn.csv")
    assert [(row["method"], row["k"]) for row in rows] == EXPECTED_ROWS
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
    for row in rows[1:]:
        assert float(row["train_seconds_per_epoch"]) > 0
        assert float(row["last_layer_seconds_per_epoch"]) > 0
    # The paper's Table 1 reports k = 10 only.
    assert rows[0]["paper_accuracy"] == "0.6942"
    assert rows[1]["paper_accuracy"] == "0.3739"
    assert all(row["paper_accuracy"] == "n/a" for row in rows[3:])

    table = (tmp_path / "table1_shallow_cnn.txt").read_text()
    labels = [row["label"] for row in rows]
    assert labels[:3] == [
        "teacher (ResNet8)",
        "student (shallow CNN)",
        "distillation",
    ]
    for label in labels:
        assert label in table
        assert label in printed
    assert "SMOKE RUN" in table
    for plot in ("accuracy_vs_k", "accuracy_vs_last_layer_time"):
        png = (tmp_path / f"table1_shallow_cnn_{plot}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert (tmp_path / "teacher.keras").stat().st_size > 0
    assert (tmp_path / "teacher_targets_train.npy").stat().st_size > 0
    assert (tmp_path / "smoke_data" / "cifar-100-python.tar.gz").exists()
    # Each student's DistillationMonitor curves.
    assert (tmp_path / "monitor_full_kd.png").stat().st_size > 1000
