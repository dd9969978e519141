"""The monitor-overhead benchmark runs end to end at toy sizes."""

import os

from tests.benchmarks import runner


def test_monitor_overhead_writes_one_row_per_class_count(tmp_path):
    output = os.path.join(tmp_path, "monitor.csv")
    rows, stdout = runner.run_benchmark(
        "monitor_overhead.py", "--classes", "50", "200", "--steps", "4",
        "--batch-size", "16", "--probe-size", "16", "--num-subsets", "4",
        "--repeats", "1", "--output", output,
    )
    assert [int(row["num_classes"]) for row in rows] == [50, 200]
    for row in rows:
        assert float(row["ms_per_step"]) > 0
        assert float(row["measure_seconds"]) > 0
        assert float(row["monitored_epoch_seconds"]) > 0
        assert int(row["steps_for_5_percent"]) >= 1
    assert "| 200 |" in stdout and "steps/epoch for <= 5%" in stdout
