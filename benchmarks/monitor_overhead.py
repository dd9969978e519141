"""Benchmark: what a `DistillationMonitor` adds to training time.

Trains the `fit_step.py` MLP student (`Input(512) -> Dense(512, relu) ->
SampledDistillationHead(C)`) with `keras_dis.Distiller(None, student)` and
the default `DISLoss(k=10)` on packed top-100 targets, batch 256, Adam, and
times, in one process:

- one `fit()` epoch of `--steps` steps without a monitor and one with a
  `DistillationMonitor(x_probe, targets_probe)` at its default frequency
  (once, at the epoch's end), after a warm-up epoch of each (alternating,
  `--repeats` times, medians);
- one `monitor.measure()` (the probe set's `(N, C)` logits, the exact loss,
  the agreement and accuracy, and the gradient cosine over `num_subsets`
  subsets), median of `--repeats`.

Prints a markdown table per C: ms per step, seconds per measurement, the
overhead of the monitored epoch over the plain one, and the fewest steps
per epoch for which one measurement per epoch costs at most 5% of the
epoch; writes one CSV row per C.

    KERAS_BACKEND=jax python benchmarks/monitor_overhead.py --classes 100000
"""

import argparse
import os
import platform
import sys
import time

CSV_FIELDS = (
    "backend", "machine", "num_classes", "steps", "probe_size", "num_subsets",
    "ms_per_step", "epoch_seconds", "monitored_epoch_seconds", "overhead",
    "measure_seconds", "steps_for_5_percent",
)


def measure_one(num_classes, args):
    """Times plain and monitored epochs and one measurement at `C`."""
    import keras
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras_dis
    from fit_step import build_model
    from fit_step import make_data

    x, _, targets = make_data(
        "mlp", args.steps * args.batch_size, num_classes, min(100, num_classes)
    )
    keras.utils.set_random_seed(0)
    model, _ = build_model("default", "mlp", num_classes, args.k, "auto")
    monitor = keras_dis.DistillationMonitor(
        x[: args.probe_size], targets[: args.probe_size],
        num_subsets=args.num_subsets,
    )

    def epoch(callbacks):
        start = time.perf_counter()
        model.fit(x, targets, batch_size=args.batch_size, epochs=1, verbose=0,
                  callbacks=callbacks)
        return time.perf_counter() - start

    epoch([]), epoch([monitor])  # compile and warm up both
    plain, monitored, measures = [], [], []
    for _ in range(args.repeats):
        plain.append(epoch([]))
        monitored.append(epoch([monitor]))
        start = time.perf_counter()
        monitor.measure()
        measures.append(time.perf_counter() - start)
    plain, monitored = float(np.median(plain)), float(np.median(monitored))
    measure_seconds = float(np.median(measures))
    ms_per_step = 1000 * plain / args.steps
    return {
        "num_classes": num_classes,
        "steps": args.steps,
        "probe_size": args.probe_size,
        "num_subsets": args.num_subsets,
        "ms_per_step": ms_per_step,
        "epoch_seconds": plain,
        "monitored_epoch_seconds": monitored,
        "overhead": monitored / plain - 1,
        "measure_seconds": measure_seconds,
        "steps_for_5_percent": int(np.ceil(measure_seconds / (0.05 * plain / args.steps))),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100000])
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--num-subsets", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None,
                        help="CSV path (default benchmarks/results/"
                             "monitor_overhead_<backend>_cpu.csv)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "k", "probe_size", "num_subsets", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1. "
                         f"Received: {name}={getattr(args, name)}")
    import keras

    backend = keras.backend.backend()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    rows = []
    for num_classes in args.classes:
        row = {"backend": backend, "machine": machine, **measure_one(num_classes, args)}
        rows.append(row)
    print(f"\nBackend {backend}, {machine}. Batch {args.batch_size}, k={args.k}, "
          f"{args.steps} steps an epoch, probe set {args.probe_size}, "
          f"{args.num_subsets} subsets; medians of {args.repeats}.\n")
    print("| C | ms/step | epoch s | monitored epoch s | overhead | one "
          "measurement s | steps/epoch for <= 5% |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['num_classes']:,} | {row['ms_per_step']:.1f} | "
              f"{row['epoch_seconds']:.2f} | {row['monitored_epoch_seconds']:.2f} | "
              f"{100 * row['overhead']:.1f}% | {row['measure_seconds']:.3f} | "
              f"{row['steps_for_5_percent']:,} |")
    from fit_step import write_rows

    write_rows(rows, CSV_FIELDS, args.output, f"monitor_overhead_{backend}_cpu.csv")
    return rows


if __name__ == "__main__":
    main()
