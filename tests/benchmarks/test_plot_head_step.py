"""The benchmark plot reads head_step.py's CSV and writes a PNG."""

import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_head_step  # noqa: E402


def test_plot_reads_the_csv_and_writes_a_png(tmp_path):
    path = os.path.join(tmp_path, "head_step.csv")
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(
            file, fieldnames=["backend", "method", "num_classes", "ms_per_step"]
        )
        writer.writeheader()
        for num_classes, full_ms in ((1000, 4.0), (100000, 200.0)):
            writer.writerow({"backend": "jax", "method": "full_kd",
                             "num_classes": num_classes, "ms_per_step": full_ms})
            writer.writerow({"backend": "jax", "method": "dis",
                             "num_classes": num_classes, "ms_per_step": 10.0})
    series, backend = plot_head_step.read_rows(path)
    assert backend == "jax"
    assert sorted(series["full_kd"]) == [(1000, 4.0), (100000, 200.0)]
    output = os.path.join(tmp_path, "plot.png")
    plot_head_step.main([path, path, "--output", output])
    with open(output, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
