"""Plots the head-step benchmark: ms per step against the number of classes.

    python benchmarks/plot_head_step.py \
        benchmarks/results/head_step_tensorflow_cpu.csv \
        benchmarks/results/head_step_jax_cpu.csv \
        benchmarks/results/head_step_torch_cpu.csv --output docs/head_step.png

One panel per CSV written by `benchmarks/head_step.py` (one backend each),
log-log, one line per method.
"""

import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path):
    """`{method: [(num_classes, ms_per_step), ...]}` and the backend name."""
    series, backend = defaultdict(list), None
    with open(path) as file:
        for row in csv.DictReader(file):
            backend = row["backend"]
            series[row["method"]].append(
                (int(row["num_classes"]), float(row["ms_per_step"]))
            )
    return series, backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="head_step.py result files")
    parser.add_argument("--output", default="docs/head_step.png")
    args = parser.parse_args(argv)

    figure, axes = plt.subplots(
        1, len(args.csv), figsize=(4.5 * len(args.csv), 4), squeeze=False
    )
    for axis, path in zip(axes[0], args.csv):
        series, backend = read_rows(path)
        for method, points in series.items():
            points.sort()
            axis.plot(
                [c for c, _ in points],
                [ms for _, ms in points],
                marker="o",
                linestyle="--" if method == "full_kd" else "-",
                label=method,
            )
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="classes C",
            ylabel="ms per step",
            title=f"{backend} (d=512, batch 256, k=20)",
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
