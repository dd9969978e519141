"""The fit() benchmark runs end to end at toy sizes and writes its tables."""

import os

import keras

from tests.benchmarks import runner

import keras_dis



def run_benchmark(*arguments):
    """Runs benchmarks/fit_step.py; its CSV rows and stdout."""
    return runner.run_benchmark("fit_step.py", *arguments)


def test_fit_step_quick_writes_one_row_per_configuration(tmp_path):
    backend = keras.backend.backend()
    output = os.path.join(tmp_path, "fit_step.csv")
    rows, stdout = run_benchmark("--quick", "--output", output)
    methods = ["full_kd", "default", "head_optimizer"]
    configs = sorted((row["method"], int(row["num_classes"])) for row in rows)
    assert configs == sorted((m, c) for m in methods for c in (100, 1000))
    for row in rows:
        assert row["status"] == "ok", row
        assert row["backend"] == backend
        assert row["student"] == "mlp"
        assert row["batch_size"] == "32"
        assert float(row["ms_per_step"]) > 0
        assert float(row["peak_rss_mb"]) > 0
        assert float(row["full_kd_over_method"]) > 0
    for row in rows:
        if row["method"] == "full_kd":
            assert float(row["full_kd_over_method"]) == 1.0
        if row["method"] != "full_kd":
            assert row["estimator"] == keras_dis.losses.DEFAULT_METHOD
    # One markdown table of times and one of memory, a line per C.
    assert "| C | full_kd | default | head_optimizer |" in stdout
    assert stdout.count("| 1,000 |") == 2


def test_fit_step_skips_configurations_over_the_memory_limit(tmp_path):
    output = os.path.join(tmp_path, "fit_step_skipped.csv")
    rows, stdout = run_benchmark(
        "--quick", "--methods", "full_kd", "--classes", "1000000",
        "--max-memory-gb", "1", "--output", output,
    )
    assert [row["status"] for row in rows] == ["skipped (memory)"]
    assert rows[0]["ms_per_step"] == ""
    assert "skipped (memory)" in stdout
