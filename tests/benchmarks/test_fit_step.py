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
    for row in rows:
        assert float(row["copy_gb_per_s"]) > 0
        assert 0 < float(row["floor_ms"]) < float(row["ms_per_step"])
        assert float(row["state_mb"]) > 0
    # The head's traffic: all C rows for full KD, B * (k + 1) = 352 rows
    # for the sampled step (C = 1000).
    floors = {
        (row["method"], int(row["num_classes"])): float(row["traffic_floor_mb"])
        for row in rows
    }
    assert floors[("full_kd", 1000)] > floors[("default", 1000)]
    # Tables of times, traffic floors and memory, a line per C.
    assert "| C | full_kd | default | head_optimizer |" in stdout
    assert stdout.count("| 1,000 |") == 3


def test_fit_step_compares_backends_in_one_run(tmp_path):
    output = os.path.join(tmp_path, "fit_step_backends.csv")
    rows, stdout = run_benchmark(
        "--quick", "--backends", "jax", "torch", "--methods", "full_kd",
        "online", "default", "--classes", "100", "--output", output,
    )
    assert sorted((r["backend"], r["method"]) for r in rows) == sorted(
        (b, m) for b in ("jax", "torch") for m in ("full_kd", "online", "default")
    )
    online = [r for r in rows if r["method"] == "online"]
    assert all(r["teacher_online"] == "True" for r in online)
    assert all(float(r["keras_distiller_over_method"] or 0) == 0 for r in online)
    assert "Across backends" in stdout
    assert stdout.count("| 100 | jax |") == 1 and stdout.count("| 100 | torch |") == 1


def test_fit_step_skips_configurations_over_the_memory_limit(tmp_path):
    output = os.path.join(tmp_path, "fit_step_skipped.csv")
    rows, stdout = run_benchmark(
        "--quick", "--methods", "full_kd", "--classes", "1000000",
        "--max-memory-gb", "1", "--output", output,
    )
    assert [row["status"] for row in rows] == ["skipped (memory)"]
    assert rows[0]["ms_per_step"] == ""
    assert "skipped (memory)" in stdout
