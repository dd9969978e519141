"""The accuracy plot reads accuracy.py's CSV and writes a PNG."""

import csv
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_accuracy  # noqa: E402


def test_plot_reads_the_csv_and_writes_a_png(tmp_path):
    path = os.path.join(tmp_path, "accuracy.csv")
    fields = ["backend", "method", "k", "temperature", "scheduler", "extra",
              "seed", "rows_per_sample", "test_top1"]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for seed, offset in ((0, 0.0), (1, 0.1)):
            writer.writerow({"backend": "jax", "method": "hard_labels", "k": "",
                             "temperature": 1.0, "scheduler": False, "extra": "",
                             "seed": seed, "rows_per_sample": 1000,
                             "test_top1": 0.5 + offset})
            writer.writerow({"backend": "jax", "method": "full_kd", "k": "",
                             "temperature": 4.0, "scheduler": False, "extra": "",
                             "seed": seed, "rows_per_sample": 1000,
                             "test_top1": 0.7 + offset})
            for k in (5, 50):
                writer.writerow({"backend": "jax", "method": "dis", "k": k,
                                 "temperature": 4.0, "scheduler": True,
                                 "extra": "", "seed": seed,
                                 "rows_per_sample": 1 + k,
                                 "test_top1": 0.6 + offset})
    series, backend = plot_accuracy.read_rows(path)
    assert backend == "jax"
    # Means over the two seeds, to float rounding.
    # Work per sample: 3 dot products per row (forward and backward).
    assert series["dis T=4"] == [(18, pytest.approx(0.65)), (153, pytest.approx(0.65))]
    assert series["full_kd T=4"] == [(3000, pytest.approx(0.75))]
    assert plot_accuracy.work_per_sample("pdbs", 1000, "10", 1000) == 1022
    output = os.path.join(tmp_path, "plot.png")
    plot_accuracy.main([path, "--output", output])
    with open(output, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
