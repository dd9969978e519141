"""The benchmark runs end to end at toy sizes and writes its table."""

import csv
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_head_step_writes_one_row_per_method(tmp_path):
    backend = keras.backend.backend()
    methods = ["full_kd", "dis", "dis_head_optimizer"]
    if backend == "tensorflow":
        methods.append("tf_sampled_softmax")
    output = os.path.join(tmp_path, "head_step.csv")
    num_classes, dim = 50, 8
    result = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "benchmarks", "head_step.py"),
            "--num-classes", str(num_classes), "--dim", str(dim),
            "--batch-size", "4", "--k", "2", "--top-r", "5",
            "--warmup", "1", "--repeats", "2", "--methods", *methods,
            "--output", output,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=backend),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x full KD" in result.stdout
    with open(output) as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["method"] for row in rows) == sorted(methods), result.stderr[-3000:]
    for row in rows:
        assert row["backend"] == backend
        assert float(row["ms_per_step"]) > 0
        # Kernel, bias and the two Adam moments of each, in MB.
        expected_state = (num_classes * dim + num_classes) * 3 * 4 / 2**20
        assert float(row["state_mb"]) == expected_state
    full_kd = [row for row in rows if row["method"] == "full_kd"][0]
    assert float(full_kd["speedup_vs_full_kd"]) == 1.0
    assert all(row["input_checks"] == "True" for row in rows)


def test_head_step_times_the_step_with_and_without_input_checks(tmp_path):
    """`--input-checks both`: two models in one worker, one row each."""
    backend = keras.backend.backend()
    output = os.path.join(tmp_path, "head_step_checks.csv")
    result = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "benchmarks", "head_step.py"),
            "--num-classes", "50", "--dim", "8", "--batch-size", "4",
            "--k", "2", "--top-r", "5", "--warmup", "1", "--repeats", "2",
            "--methods", "dis", "--input-checks", "both", "--output", output,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=backend),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "input checks cost" in result.stdout
    with open(output) as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["input_checks"] for row in rows) == ["False", "True"]
    assert all(row["method"] == "dis" and float(row["ms_per_step"]) > 0 for row in rows)
