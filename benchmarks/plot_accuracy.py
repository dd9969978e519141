"""Plots the accuracy benchmark: test top-1 against last-layer rows.

    python benchmarks/plot_accuracy.py benchmarks/results/accuracy_jax_cpu.csv \
        --output docs/accuracy.png

Reads the CSV of `benchmarks/accuracy.py` and plots the test top-1 (mean
over seeds) against the last layer's work per sample (log x axis), one
panel per temperature: one series per method, scheduler setting and extra
loss arguments, and `full_kd` and `hard_labels` as horizontal lines. The
work counts `d`-long dot products of the forward and backward passes:
`3 C` for the full softmax, `3 (1 + k)` for a sampled subset, and
`C + 2 (1 + k)` for PDBS (full forward logits to select its subset, then
the subset's backward pass).
"""

import argparse
import csv
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Methods drawn as horizontal lines: the full softmax, one point each.
REFERENCE_METHODS = ("hard_labels", "full_kd")


def series_label(method, temperature, scheduler, extra):
    """`"dis T=4 no scheduler exact_top=5"`: the legend of a series."""
    words = [method]
    if method != "hard_labels":
        words.append(f"T={float(temperature):g}")
    if method.startswith("dis") and scheduler != "True":
        words.append("no scheduler")
    if extra:
        words.append(extra)
    return " ".join(words)


def work_per_sample(method, rows_per_sample, k, num_classes):
    """Forward and backward dot products of the last layer per sample."""
    if method == "pdbs":
        return num_classes + 2 * (1 + int(k))
    return 3 * rows_per_sample


def read_rows(path):
    """Mean test top-1 over seeds, grouped by series.

    Args:
        path: a CSV written by `benchmarks/accuracy.py`.

    Returns:
        `{label: [(work_per_sample, mean_top1), ...]}` sorted by work (see
        `work_per_sample`), and the backend name.
    """
    top1_by_run, backend = defaultdict(list), None
    with open(path) as file:
        for row in csv.DictReader(file):
            backend = row["backend"]
            label = series_label(
                row["method"], row["temperature"], row["scheduler"], row["extra"]
            )
            rows = int(row["rows_per_sample"])
            work = work_per_sample(
                row["method"], rows, row["k"], int(row.get("num_classes") or rows)
            )
            top1_by_run[(label, work)].append(
                float(row["test_top1"])
            )
    series = defaultdict(list)
    for (label, rows), top1 in top1_by_run.items():
        series[label].append((rows, statistics.mean(top1)))
    return {label: sorted(points) for label, points in series.items()}, backend


def summary_table(path):
    """Markdown tables of the CSV, one per temperature: one row per method
    (and scheduler setting), a column for the methods that compute all `C`
    logits and one per `k`; cells `mean (seed a/seed b/...)`, in percent.
    `hard_labels` (no temperature) appears in every table.

    Args:
        path: a CSV written by `benchmarks/accuracy.py`.

    Returns:
        The tables as a string.
    """
    cells, temperatures, k_values, methods = defaultdict(list), set(), set(), []
    with open(path) as file:
        for row in csv.DictReader(file):
            method = row["method"]
            if method.startswith("dis") and row["scheduler"] != "True":
                method += " (no scheduler)"
            if row["extra"]:
                method += f" ({row['extra']})"
            if method not in methods:
                methods.append(method)
            temperature = (
                None if method == "hard_labels" else float(row["temperature"])
            )
            k = int(row["k"]) if row["k"] else None
            if temperature is not None:
                temperatures.add(temperature)
            if k is not None:
                k_values.add(k)
            cells[(method, temperature, k)].append(100 * float(row["test_top1"]))
    k_values = sorted(k_values)
    tables = []
    for temperature in sorted(temperatures):
        header = [f"T = {temperature:g}", "all C"] + [f"k = {k}" for k in k_values]
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for method in methods:
            keys = [None] + k_values
            row_temperature = None if method == "hard_labels" else temperature
            values = [cells.get((method, row_temperature, k)) for k in keys]
            if not any(values):
                continue
            lines.append(
                "| " + " | ".join(
                    [method]
                    + [
                        "" if not v else f"{statistics.mean(v):.1f} ("
                        + "/".join(f"{x:.1f}" for x in v) + ")"
                        for v in values
                    ]
                ) + " |"
            )
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="accuracy.py result file")
    parser.add_argument("--output", default="docs/accuracy.png")
    parser.add_argument(
        "--table", action="store_true",
        help="also print the markdown summary table (mean (seeds), percent)",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(summary_table(args.csv))

    series, backend = read_rows(args.csv)
    temperatures = sorted(
        {label.split("T=")[1].split()[0] for label in series if "T=" in label},
        key=float,
    )
    figure, axes = plt.subplots(
        1, len(temperatures), figsize=(6.5 * len(temperatures), 5.5),
        squeeze=False, sharey=True,
    )
    for axis, temperature in zip(axes[0], temperatures):
        colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
        for label, points in series.items():
            if "T=" in label and label.split("T=")[1].split()[0] != temperature:
                continue
            color = next(colors)
            if label.split()[0] in REFERENCE_METHODS:
                axis.axhline(
                    points[0][1], color=color, linestyle="--", label=label
                )
                continue
            axis.plot(
                [work for work, _ in points],
                [top1 for _, top1 in points],
                marker="o",
                linestyle=":" if "no scheduler" in label else "-",
                color=color,
                label=label,
            )
        axis.set(
            xscale="log",
            xlabel="last-layer work per sample (d-long dot products, "
            "forward + backward)",
            title=f"T = {temperature} ({backend})",
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("student test top-1 (mean over seeds)")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
