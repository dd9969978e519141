"""The accuracy benchmark runs end to end in `--quick` mode."""

import os
import sys

import keras

from tests.benchmarks import runner

sys.path.insert(0, os.path.join(runner.ROOT, "benchmarks"))

import accuracy  # noqa: E402


def test_accuracy_quick_writes_one_row_per_run(tmp_path):
    output = os.path.join(tmp_path, "accuracy.csv")
    rows, stdout = runner.run_benchmark("accuracy.py", "--quick", "--output", output)
    # hard_labels, full_kd at T=4, dis at k=5 with and without scheduler.
    runs = sorted((row["method"], row["k"], row["scheduler"]) for row in rows)
    assert runs == [
        ("dis", "5", "False"), ("dis", "5", "True"),
        ("full_kd", "", "False"), ("hard_labels", "", "False"),
    ]
    assert set(rows[0]) == set(accuracy.CSV_FIELDS)
    for row in rows:
        assert row["backend"] == keras.backend.backend()
        assert 0.0 <= float(row["test_top1"]) <= 1.0
        assert 0.0 <= float(row["teacher_test_top1"]) <= 1.0
        assert float(row["ms_per_step"]) > 0
        expected_rows = 1 + int(row["k"]) if row["method"] == "dis" else 200
        assert int(row["rows_per_sample"]) == expected_rows
        assert int(row["last_layer_flops_per_step"]) == 2 * 64 * expected_rows * 128
    assert "| method | k | T | scheduler |" in stdout
    assert "top-1 mean" in stdout


def test_variants_add_runs_with_their_loss_arguments():
    variant = accuracy.parse_variant("dis:k=7,scheduler=false,exact_top=2")
    assert variant == {"method": "dis", "k": 7, "scheduler": False, "exact_top": 2}
    runs = accuracy.build_runs(
        ["hard_labels", "full_kd", "uniform"], [variant], [5, 10], [1.0, 4.0]
    )
    assert {"method": "hard_labels", "k": None, "temperature": 1.0,
            "scheduler": False} in runs
    assert sum(run["method"] == "full_kd" for run in runs) == 2
    assert sum(run["method"] == "uniform" for run in runs) == 4
    assert [run for run in runs if run["method"] == "dis"] == [
        {"method": "dis", "k": 7, "temperature": t, "scheduler": False,
         "exact_top": 2}
        for t in (1.0, 4.0)
    ]
    assert accuracy.describe_extra(runs[-1]) == "exact_top=2"
    assert accuracy.parse_value("0.5") == 0.5
    assert accuracy.parse_value("top") == "top"
