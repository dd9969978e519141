"""Benchmark: bias and noise of each sampled estimator on a real student.

Trains the student of `benchmarks/accuracy.py` with full KD for a few
epochs (a student halfway through training), then, on a batch of training
examples, measures every sampled method of `keras_dis.losses.METHODS` at
each `k` and temperature with `keras_dis.diagnostics.estimator_diagnostics`:

- `gradient_cosine`: the cosine between the expected sampled logit gradient
  (averaged over `--subsets` subsets) and the exact full-KD one (the bias);
- `subset_gradient_cosine`: the same for the gradient of one subset, i.e.
  of one step (bias and noise);
- `teacher_ess`, `student_ess`: the effective sample size of the importance
  weights as a fraction of `1 + k`.

    KERAS_BACKEND=jax python benchmarks/estimator_quality.py
    KERAS_BACKEND=jax python benchmarks/estimator_quality.py --quick --output /tmp/q.csv

Prints a markdown table and writes one CSV row per method, `k` and `T` to
`benchmarks/results/estimator_quality_<backend>_cpu.csv` by default.
"""

import argparse
import csv
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy  # noqa: E402

import keras_dis  # noqa: E402

FIELDS = (
    "backend", "method", "k", "temperature", "exact_top", "num_classes",
    "batch", "subsets", "gradient_cosine", "subset_gradient_cosine",
    "teacher_ess", "student_ess",
)


def sampled_methods():
    """The names in `METHODS` whose loss samples its classes."""
    return [
        name
        for name, options in keras_dis.losses.METHODS.items()
        if options["proposal"] not in (keras_dis.losses.FULL, "pdbs")
    ]


def half_trained_student(task, args):
    """The accuracy benchmark's student after `args.epochs` of full KD."""
    keras.utils.set_random_seed(args.seed)
    student = accuracy.build_student(
        task["x_train"].shape[1], args.hidden_units, args.classes, args.seed
    )
    targets = keras.ops.convert_to_numpy(
        keras_dis.pack_teacher_targets(
            task["y_train"], task["teacher_train_logits"]
        )
    )
    distiller = keras_dis.Distiller(None, student)
    distiller.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras_dis.losses.get("full_kd", temperature=4.0),
    )
    distiller.fit(
        task["x_train"], targets, epochs=args.epochs, batch_size=128, verbose=0
    )
    return student, targets


def measure(args):
    """Every row of the table: a dict per method, `k` and temperature."""
    task = accuracy.make_task(
        args.seed,
        num_classes=args.classes,
        examples_per_class=args.examples_per_class,
    )
    student, targets = half_trained_student(task, args)
    rng = np.random.default_rng(args.seed)
    batch = rng.choice(len(task["x_train"]), args.batch, replace=False)
    student_logits = student.predict(task["x_train"][batch], verbose=0)
    rows = []
    for temperature in args.temperatures:
        for method in args.methods:
            for k in args.k:
                loss = keras_dis.losses.get(method, k=k, temperature=temperature)
                result = keras_dis.diagnostics.estimator_diagnostics(
                    loss,
                    student_logits,
                    targets[batch],
                    num_subsets=args.subsets,
                    seed=args.seed,
                )
                rows.append({
                    "backend": keras.backend.backend(),
                    "method": method,
                    "k": k,
                    "temperature": temperature,
                    "exact_top": loss.exact_top_count,
                    "num_classes": args.classes,
                    "batch": args.batch,
                    "subsets": args.subsets,
                    **{name: float(np.mean(v)) for name, v in result.items()},
                })
                print(
                    f"T={temperature:g} {method} k={k}: cosine "
                    f"{rows[-1]['gradient_cosine']:.3f}, one subset "
                    f"{rows[-1]['subset_gradient_cosine']:.3f}",
                    flush=True,
                )
    return rows


def print_table(rows):
    print(
        "\n| T | method | k | exact top | E[gradient] cosine | one-subset "
        "cosine | teacher ESS | student ESS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['temperature']:g} | {row['method']} | {row['k']} | "
            f"{row['exact_top']} | {row['gradient_cosine']:.3f} | "
            f"{row['subset_gradient_cosine']:.3f} | {row['teacher_ess']:.2f} | "
            f"{row['student_ess']:.2f} |"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--examples-per-class", type=int, default=10)
    parser.add_argument("--hidden-units", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs of full KD before measuring")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="sampled methods (default: all of them)")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 49])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--subsets", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes for tests")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.examples_per_class, args.epochs = 100, 2, 1
        args.k, args.temperatures, args.batch, args.subsets = [5], [4.0], 8, 16
        args.methods = args.methods or ["dis", keras_dis.losses.DEFAULT_METHOD]
    args.methods = args.methods or sampled_methods()
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = measure(args)
    print_table(rows)
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"estimator_quality_{keras.backend.backend()}_cpu.csv",
    )
    with open(output, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
