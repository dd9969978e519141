"""The estimator-quality benchmark runs end to end in `--quick` mode."""

import os

import keras_dis
from tests.benchmarks import runner


def test_estimator_quality_quick_writes_one_row_per_method(tmp_path):
    output = os.path.join(tmp_path, "quality.csv")
    rows, stdout = runner.run_benchmark(
        "estimator_quality.py", "--quick", "--output", output
    )
    assert [row["method"] for row in rows] == [
        "dis", keras_dis.losses.DEFAULT_METHOD
    ]
    for row in rows:
        assert -1.0 <= float(row["gradient_cosine"]) <= 1.0
        # The mean of many subsets is closer to the exact gradient than one.
        assert float(row["gradient_cosine"]) >= float(
            row["subset_gradient_cosine"]
        )
        assert 0.0 < float(row["teacher_ess"]) <= 1.0
    assert "one-subset cosine" in stdout
