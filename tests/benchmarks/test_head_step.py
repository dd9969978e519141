"""The benchmark runs end to end at toy sizes and writes its table."""

import os

import keras

from tests.benchmarks import runner

TOY_SIZES = ["--batch-size", "4", "--k", "2", "--top-r", "5", "--warmup", "1",
             "--repeats", "2"]


def run_benchmark(*arguments):
    """Runs benchmarks/head_step.py at toy sizes; its CSV rows and stdout."""
    return runner.run_benchmark("head_step.py", *TOY_SIZES, *arguments)


def test_head_step_writes_one_row_per_method(tmp_path):
    backend = keras.backend.backend()
    methods = ["full_kd", "dis", "dis_head_optimizer"]
    if backend == "tensorflow":
        methods.append("tf_sampled_softmax")
    output = os.path.join(tmp_path, "head_step.csv")
    num_classes, dim = 50, 8
    rows, stdout = run_benchmark(
        "--num-classes", str(num_classes), "--dim", str(dim),
        "--methods", *methods, "--output", output,
    )
    assert "x full KD" in stdout
    assert sorted(row["method"] for row in rows) == sorted(methods)
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
    output = os.path.join(tmp_path, "head_step_checks.csv")
    rows, stdout = run_benchmark(
        "--num-classes", "50", "--dim", "8", "--methods", "dis",
        "--input-checks", "both", "--output", output,
    )
    assert "input checks cost" in stdout
    assert sorted(row["input_checks"] for row in rows) == ["False", "True"]
    assert all(row["method"] == "dis" and float(row["ms_per_step"]) > 0 for row in rows)
