"""The accuracy plot reads accuracy.py's CSV and writes a PNG."""

import csv
import os
import sys

import pytest

from tests.benchmarks import runner

sys.path.insert(0, os.path.join(runner.ROOT, "benchmarks"))

import plot_accuracy  # noqa: E402

FIELDS = ["backend", "method", "k", "temperature", "scheduler", "extra",
          "seed", "rows_per_sample", "test_top1"]


def write_rows(path, runs):
    """Writes CSV rows of `(method, k, temperature, scheduler, seed,
    rows_per_sample, test_top1)` in accuracy.py's format."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        for method, k, temperature, scheduler, seed, rows, top1 in runs:
            writer.writerow({
                "backend": "jax", "method": method, "k": k,
                "temperature": temperature, "scheduler": scheduler,
                "extra": "", "seed": seed, "rows_per_sample": rows,
                "test_top1": top1,
            })


def test_plot_reads_the_csv_and_writes_a_png(tmp_path):
    path = os.path.join(tmp_path, "accuracy.csv")
    runs = []
    for seed, offset in ((0, 0.0), (1, 0.1)):
        runs.append(("hard_labels", "", 1.0, False, seed, 1000, 0.5 + offset))
        runs.append(("full_kd", "", 4.0, False, seed, 1000, 0.7 + offset))
        for k in (5, 50):
            runs.append(("dis", k, 4.0, True, seed, 1 + k, 0.6 + offset))
    write_rows(path, runs)
    series, backend = plot_accuracy.read_rows(path)
    assert backend == "jax"
    # Work per sample: 3 dot products per row (forward and backward).
    assert series["dis T=4"] == [(18, pytest.approx(0.65)), (153, pytest.approx(0.65))]
    assert series["full_kd T=4"] == [(3000, pytest.approx(0.75))]
    assert plot_accuracy.work_per_sample("pdbs", 1000, "10", 1000) == 1022
    output = os.path.join(tmp_path, "plot.png")
    plot_accuracy.main([path, "--output", output])
    with open(output, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_table_has_one_row_per_method_and_the_seeds(tmp_path):
    path = os.path.join(tmp_path, "accuracy.csv")
    write_rows(path, [
        ("full_kd", "", 4.0, False, 0, 100, 0.5),
        ("dis", 10, 4.0, True, 0, 11, 0.4),
        ("full_kd", "", 4.0, False, 1, 100, 0.6),
        ("dis", 10, 4.0, True, 1, 11, 0.5),
    ])
    lines = plot_accuracy.summary_table(path).splitlines()
    assert lines[0] == "| T = 4 | all C | k = 10 |"
    assert lines[2] == "| full_kd | 55.0 (50.0/60.0) |  |"
    assert lines[3] == "| dis |  | 45.0 (40.0/50.0) |"
