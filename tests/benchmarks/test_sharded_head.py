"""The sharded-head benchmark runs end to end at toy sizes (JAX)."""

import os

import keras
import pytest

from tests.benchmarks import runner


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on JAX only in Keras 3.15",
)
def test_sharded_head_writes_the_step_and_capacity_tables(tmp_path):
    output = os.path.join(tmp_path, "sharded.csv")
    rows, stdout = runner.run_benchmark(
        "sharded_head.py", "--classes", "4096", "4097", "--shards", "2",
        "--steps", "2", "--repeats", "1", "--batch-size", "32",
        "--budgets-gib", "1", "80", "--output", output,
    )
    trained, indivisible = rows
    assert trained["status"] == "trained"
    assert float(trained["ms_per_step"]) > 0
    # Each of the 2 devices holds half of the head and its Adam state:
    # 4096 x 512 float32 x (kernel + 2 moments) / 2 = 12 MiB, and more.
    assert 12.0 <= float(trained["head_mib_per_device"]) < 12.1
    assert int(trained["class_sized_collectives"]) == 0
    assert 0 < float(trained["largest_collective_kib"]) < 4096 * 512 * 4 / 2 / 1024
    assert indivisible["status"] == "classes not divisible"
    with open(os.path.join(tmp_path, "sharded_capacity.csv")) as file:
        capacity = file.read().splitlines()
    assert len(capacity) == 3  # a header and one row per budget
    assert "| 4,096 | 2 |" in stdout and "80 GiB/device" in stdout
