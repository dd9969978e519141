"""Benchmark: does sampled distillation keep full KD's accuracy gain?

Trains the same small student on a synthetic many-class task with the
methods of the paper's tables (hard labels, full KD, PDBS, uniform, FTIS,
DIS; `--methods` picks any name in `keras_dis.losses.METHODS` at run time,
`--methods all` runs them all), over a grid of
subset sizes `k`, temperatures `T` and seeds, and reports the student's
top-1 accuracy on a held-out test set from a shifted domain, next to the
cost of its last layer.

The task (NumPy, from the seed; nothing is downloaded):

- Classes: `C` class means in a `latent_dim`-dimensional latent space
  (24 by default), grouped into superclasses of `classes_per_superclass`
  (20): superclass centres are `N(0, I)`, the means of their classes are
  the centre plus `N(0, 0.25^2 I)`. Classes of one superclass are close, so
  the teacher's soft targets carry the "dark knowledge" of which classes
  are confusable.
- Examples: a latent `z = mean[y] + N(0, noise^2 I)` (`noise` 0.3), observed
  through a fixed random nonlinear map `x = tanh(z A + b) B` to
  `input_dim` (64) features. The map is injective, so `x` carries exactly
  the information of `z`.
- Training set: `examples_per_class` (10) labelled examples per class, so
  hard labels alone leave the student data-starved and distillation matters.
- Test set: `test_examples_per_class` (5) per class from a shifted domain,
  never seen in training: the latent noise is `test_noise_scale` (1.15)
  times larger.
- Teacher: the generative model's exact posterior, `log p(y | x) =
  -|z - mean[y]|^2 / (2 noise^2) + const` (the Bayes-optimal classifier of
  the training domain; on the test domain its argmax is still the
  Bayes-optimal one, nearest mean). No student can beat it. Its test top-1
  (about 88% at the defaults) is printed per seed. Its logits on the
  training set are packed with `keras_dis.pack_teacher_targets(labels,
  teacher_logits, top_r=R)`, `R = C` by default (every method sees the
  exact teacher; `--top-r` truncates the ranking).
- Student: `Input(64) -> Dense(256, relu) -> Dense(128, relu) ->
  keras_dis.SampledDistillationHead(C)`, trained by
  `keras_dis.Distiller(None, student)` with `Adam(2e-3)`, 30 epochs, batch
  size 128, the loss `keras_dis.losses.get(method, k=k, temperature=T,
  **extra)` and, for a run with `scheduler` on (the default for methods
  that sample from the DIS proposal), `keras_dis.ProposalScheduler(epochs=E)`.
  Test accuracy is the argmax of `student.predict(x_test)` (full logits).

The data and teacher are generated once per seed and shared by all runs of
that seed. Each run is a dict `{"method", "k", "temperature", "scheduler",
**extra_loss_kwargs}`. `hard_labels` runs once per seed, `full_kd` once per
seed and temperature; every other method once per `k` and temperature. By
default the run `dis` without scheduler (`--variant dis:scheduler=false`, the
paper's annealing switched off) is added, so the schedule is measured
rather than assumed; `--variant` adds more, e.g. `dis:exact_top=5`
(`name:key=value,...`, values int, float, bool or str; `k=` or
`temperature=` pin those, other keys are `DISLoss` arguments).

Reported per run: the last layer's rows per sample (`C` for `hard_labels`,
`full_kd` and `pdbs`, which compute every logit; `1 + k` for the sampled
methods), its forward FLOPs per step (`2 * B * rows * d`, `d` the features
size; the backward pass costs about twice that again), the test top-1 per
seed and their mean, and the training ms per step (the median of the epoch
times divided by the steps per epoch, so the compiling first epoch does not
count). One CSV row per run and seed.

    KERAS_BACKEND=jax python benchmarks/accuracy.py
    KERAS_BACKEND=jax python benchmarks/accuracy.py --methods full_kd dis \\
        --k 10 50 --temperatures 4 --seeds 0 --variant dis:exact_top=5
    KERAS_BACKEND=jax python benchmarks/accuracy.py --quick --output /tmp/a.csv

`--quick` is a toy run (200 classes, 2 epochs, 3 methods, one seed) for
tests. The default grid (6 methods and the no-scheduler variant, k in
5, 10, 20, 50, 100, T in 1 and 4, seeds 0 and 1: 106 runs) takes about
29 minutes on 2 CPU cores with JAX (1730 s, shared machine).
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np

import keras_dis

# The rows of the paper's tables and the candidate estimators;
# `--methods all` runs every name in `keras_dis.losses.METHODS`.
PAPER_METHODS = keras_dis.losses.PAPER_METHODS
DEFAULT_METHODS = PAPER_METHODS + (
    "teacher_uniform",
    "exact_top_dis",
    "exact_top_uniform",
    "exact_top_teacher_uniform",
)
DEFAULT_VARIANTS = ("dis:scheduler=false",)
# Applied by `--quick` to the arguments not given on the command line.
QUICK_DEFAULTS = {
    "classes": 200,
    "examples_per_class": 2,
    "test_examples_per_class": 1,
    "epochs": 2,
    "batch_size": 64,
    "methods": ["hard_labels", "full_kd", "dis"],
    "k": [5],
    "temperatures": [4.0],
    "seeds": [0],
}
# Keys of a run that are not `DISLoss` arguments.
RUN_KEYS = ("method", "k", "temperature", "scheduler")
CSV_FIELDS = (
    "backend", "machine", "method", "k", "temperature", "scheduler", "extra",
    "seed", "num_classes", "top_r", "features_dim", "batch_size", "epochs",
    "learning_rate", "train_examples", "test_examples", "rows_per_sample",
    "last_layer_flops_per_step", "test_top1", "teacher_test_top1",
    "ms_per_step", "wall_s",
)


def make_task(
    seed,
    num_classes=1000,
    classes_per_superclass=20,
    latent_dim=24,
    input_dim=64,
    examples_per_class=10,
    test_examples_per_class=5,
    noise=0.3,
    test_noise_scale=1.15,
):
    """Generates the synthetic task and its teacher from `seed`.

    Args:
        seed: int, seeds every random draw.
        num_classes: int, `C`.
        classes_per_superclass: int, classes sharing a superclass centre.
        latent_dim: int, dimension of the latent space of the class means.
        input_dim: int, number of observed features.
        examples_per_class: int, labelled training examples per class.
        test_examples_per_class: int, test examples per class.
        noise: float, standard deviation of the latent noise in training.
        test_noise_scale: float, the test domain's latent noise relative to
            `noise`.

    Returns:
        A dict with `x_train` `(N, input_dim)` float32, `y_train` `(N,)`,
        `teacher_train_logits` `(N, C)` float32, `x_test`, `y_test` and
        `teacher_test_logits` likewise.
    """
    rng = np.random.default_rng(seed)
    num_superclasses = max(1, num_classes // classes_per_superclass)
    superclass_centres = rng.normal(size=(num_superclasses, latent_dim))
    superclass_of_class = rng.integers(0, num_superclasses, size=num_classes)
    class_means = superclass_centres[superclass_of_class] + 0.25 * rng.normal(
        size=(num_classes, latent_dim)
    )
    mixing_in = 1.5 * rng.normal(size=(latent_dim, input_dim)) / np.sqrt(latent_dim)
    mixing_bias = 0.5 * rng.normal(size=input_dim)
    mixing_out = rng.normal(size=(input_dim, input_dim)) / np.sqrt(input_dim)

    def sample(examples_per_class, latent_noise):
        labels = np.repeat(np.arange(num_classes), examples_per_class)
        latents = class_means[labels] + latent_noise * rng.normal(
            size=(len(labels), latent_dim)
        )
        features = np.tanh(latents @ mixing_in + mixing_bias) @ mixing_out
        squared_distances = (
            np.sum(latents**2, axis=1, keepdims=True)
            - 2 * latents @ class_means.T
            + np.sum(class_means**2, axis=1)
        )  # (examples, C)
        posterior_logits = -squared_distances / (2 * noise**2)
        return (
            features.astype("float32"),
            labels,
            posterior_logits.astype("float32"),
        )

    x_train, y_train, teacher_train_logits = sample(examples_per_class, noise)
    x_test, y_test, teacher_test_logits = sample(
        test_examples_per_class, noise * test_noise_scale
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "teacher_train_logits": teacher_train_logits,
        "x_test": x_test,
        "y_test": y_test,
        "teacher_test_logits": teacher_test_logits,
    }


def parse_value(text):
    """`"5"` -> 5, `"0.5"` -> 0.5, `"true"` -> True, anything else a str."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_variant(text):
    """Parses a `--variant`, `"name:key=value,key=value"`.

    Args:
        text: str, a method name, optionally followed by `:` and
            comma-separated `key=value` pairs.

    Returns:
        A dict with `"method"` and the parsed pairs.

    Example:

    >>> parse_variant("dis:exact_top=5,scheduler=false")
    {'method': 'dis', 'exact_top': 5, 'scheduler': False}
    """
    method, _, pairs = text.partition(":")
    variant = {"method": method}
    for pair in filter(None, pairs.split(",")):
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(
                f"`--variant` must look like name:key=value,key=value. "
                f"Received: {text!r}"
            )
        variant[key] = parse_value(value)
    return variant


def proposal_of(method):
    """The proposal name of the `DISLoss` of `method`: `"full"` for
    `hard_labels` and `full_kd`, `"pdbs"`, `"dis"`, ..."""
    return keras_dis.losses.get(method).proposal_name


def extra_loss_kwargs(run):
    """The `DISLoss` arguments of `run` beyond method, k and temperature."""
    return {key: value for key, value in run.items() if key not in RUN_KEYS}


def expand_runs(variant, k_values, temperatures):
    """The runs of one method or variant over the grid.

    Args:
        variant: dict from `parse_variant`; a `k` or `temperature` in it
            pins that value, `scheduler` defaults to whether the method's
            loss samples from the DIS proposal (the one it anneals).
        k_values: list of ints, the `k` grid.
        temperatures: list of floats, the temperature grid.

    Returns:
        A list of run dicts `{"method", "k", "temperature", "scheduler",
        **extra_loss_kwargs}`; `k` is None for methods that ignore it, and
        `hard_labels` runs once, at temperature 1.
    """
    method = variant["method"]
    if "k" in variant:
        k_grid = [variant["k"]]
    else:
        k_grid = [None] if proposal_of(method) == keras_dis.losses.FULL else k_values
    if "temperature" in variant:
        temperature_grid = [float(variant["temperature"])]
    else:
        temperature_grid = [1.0] if method == "hard_labels" else temperatures
    scheduler = variant.get("scheduler", proposal_of(method) == "dis")
    return [
        {"method": method, "k": k, "temperature": temperature,
         "scheduler": scheduler, **extra_loss_kwargs(variant)}
        for temperature in temperature_grid
        for k in k_grid
    ]


def build_runs(methods, variants, k_values, temperatures):
    """Every run of the grid: each method, then each variant, without
    duplicates.

    Args:
        methods: list of names in `keras_dis.losses.METHODS`.
        variants: list of dicts from `parse_variant`.
        k_values: list of ints, the `k` grid.
        temperatures: list of floats, the temperature grid.

    Returns:
        A list of run dicts (see `expand_runs`).
    """
    runs = []
    for variant in [{"method": m} for m in methods] + variants:
        if variant["method"] not in keras_dis.losses.METHODS:
            raise ValueError(
                f"Unknown method {variant['method']!r}; keras_dis.losses."
                f"METHODS has {list(keras_dis.losses.METHODS)}"
            )
        for run in expand_runs(variant, k_values, temperatures):
            if run not in runs:
                runs.append(run)
    return runs


def describe_extra(run):
    """`"key=value,..."` of the extra loss arguments, sorted; `""` if none."""
    return ",".join(f"{key}={value}" for key, value in sorted(extra_loss_kwargs(run).items()))


def build_student(input_dim, hidden_units, num_classes, seed):
    """A small MLP ending in a `keras_dis.SampledDistillationHead`.

    Args:
        input_dim: int, number of input features.
        hidden_units: list of ints, the `Dense(relu)` layers; the last one
            is the head's features size `d`.
        num_classes: int, `C`.
        seed: int, seeds the head's sampler.

    Returns:
        A `keras.Model` from features to logits `(batch, C)`.
    """

    inputs = keras.Input((input_dim,))
    features = inputs
    for units in hidden_units:
        features = keras.layers.Dense(units, activation="relu")(features)
    outputs = keras_dis.SampledDistillationHead(num_classes, seed=seed)(features)
    return keras.Model(inputs, outputs)


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch of `fit` in `epoch_seconds`."""

    def __init__(self):
        super().__init__()
        self.epoch_seconds = []
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)


def train_and_evaluate(run, task, packed_targets, seed, args):
    """Trains a fresh student with the method of `run` and tests it.

    Args:
        run: a run dict (see `expand_runs`).
        task: the dict of `make_task`.
        packed_targets: the packed teacher targets of `task["x_train"]`.
        seed: int, seeds the student's initial weights and sampler.
        args: the parsed command line (sizes, epochs, optimizer).

    Returns:
        A dict: `test_top1` (float in [0, 1]), `ms_per_step` (median epoch
        time over steps per epoch) and `wall_s` (the whole run).
    """

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    student = build_student(
        task["x_train"].shape[1], args.hidden_units, args.classes, seed
    )
    loss_kwargs = {"temperature": run["temperature"], **extra_loss_kwargs(run)}
    if run["k"] is not None:
        loss_kwargs["k"] = run["k"]
    distiller = keras_dis.Distiller(None, student)
    distiller.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras_dis.losses.get(run["method"], **loss_kwargs),
    )
    timer = EpochTimer()
    callbacks = [timer]
    if run["scheduler"]:
        callbacks.append(keras_dis.ProposalScheduler(epochs=args.epochs))
    distiller.fit(
        task["x_train"],
        packed_targets,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=callbacks,
        verbose=0,
    )
    logits = student.predict(task["x_test"], batch_size=1024, verbose=0)
    steps_per_epoch = -(-len(task["x_train"]) // args.batch_size)
    return {
        "test_top1": float(np.mean(np.argmax(logits, axis=-1) == task["y_test"])),
        "ms_per_step": 1000 * statistics.median(timer.epoch_seconds) / steps_per_epoch,
        "wall_s": time.perf_counter() - start,
    }


def rows_per_sample(run, num_classes):
    """Logits the last layer computes per sample in training: `C` for the
    full softmax and PDBS (which selects from all of them), `1 + k` for a
    sampled method."""
    if proposal_of(run["method"]) in (keras_dis.losses.FULL, "pdbs"):
        return num_classes
    return 1 + run["k"]


def run_grid(args):
    """Runs every seed and run of the grid; returns the CSV rows."""

    backend = keras.backend.backend()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    default_variants = [parse_variant(text) for text in DEFAULT_VARIANTS]
    variants = [v for v in default_variants if v["method"] in args.methods]
    variants += [parse_variant(text) for text in args.variant or []]
    runs = build_runs(args.methods, variants, args.k, args.temperatures)
    features_dim = args.hidden_units[-1]
    print(
        f"Backend {backend}, {machine}. C={args.classes}, "
        f"{args.examples_per_class} train / {args.test_examples_per_class} test "
        f"examples per class, student {args.hidden_units} (d={features_dim}), "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam({args.learning_rate}), "
        f"top_r={args.top_r or args.classes}. {len(runs)} runs x "
        f"{len(args.seeds)} seeds.",
        flush=True,
    )
    rows = []
    total = len(runs) * len(args.seeds)
    for seed in args.seeds:
        task = make_task(
            seed,
            num_classes=args.classes,
            examples_per_class=args.examples_per_class,
            test_examples_per_class=args.test_examples_per_class,
        )
        teacher_top1 = float(
            np.mean(np.argmax(task["teacher_test_logits"], axis=-1) == task["y_test"])
        )
        print(f"seed {seed}: teacher test top-1 {teacher_top1:.4f}", flush=True)
        packed_targets = keras.ops.convert_to_numpy(
            keras_dis.pack_teacher_targets(
                task["y_train"], task["teacher_train_logits"],
                top_r=args.top_r or args.classes,
            )
        )
        for run in runs:
            result = train_and_evaluate(run, task, packed_targets, seed, args)
            rows_of_run = rows_per_sample(run, args.classes)
            rows.append({
                "backend": backend,
                "machine": machine,
                "method": run["method"],
                "k": "" if run["k"] is None else run["k"],
                "temperature": run["temperature"],
                "scheduler": run["scheduler"],
                "extra": describe_extra(run),
                "seed": seed,
                "num_classes": args.classes,
                "top_r": args.top_r or args.classes,
                "features_dim": features_dim,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "learning_rate": args.learning_rate,
                "train_examples": len(task["x_train"]),
                "test_examples": len(task["x_test"]),
                "rows_per_sample": rows_of_run,
                "last_layer_flops_per_step": 2 * args.batch_size * rows_of_run * features_dim,
                "teacher_test_top1": teacher_top1,
                **result,
            })
            print(
                f"  [{len(rows)}/{total}] seed {seed} {run_label(rows[-1])}: "
                f"top-1 {result['test_top1']:.4f}, {result['ms_per_step']:.1f} "
                f"ms/step, {result['wall_s']:.1f} s",
                flush=True,
            )
    return rows


def run_label(row):
    """`"dis k=10 T=4 sched exact_top=5"`: a run, in a few words."""
    words = [row["method"]]
    if row["k"] != "":
        words.append(f"k={row['k']}")
    words.append(f"T={float(row['temperature']):g}")
    if str(row["scheduler"]) == "True":
        words.append("sched")
    if row["extra"]:
        words.append(row["extra"])
    return " ".join(words)


def print_table(rows, seeds):
    """Prints one markdown row per run: its cost and test top-1 per seed."""
    runs = {}
    for row in rows:
        key = tuple(str(row[name]) for name in (
            "method", "k", "temperature", "scheduler", "extra"))
        runs.setdefault(key, []).append(row)
    header = ["method", "k", "T", "scheduler", "extra", "rows/sample",
              "last-layer fwd MFLOP/step"]
    header += [f"top-1 seed {seed}" for seed in seeds]
    header += ["top-1 mean", "ms/step"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (method, k, temperature, scheduler, extra), group in runs.items():
        by_seed = {row["seed"]: row["test_top1"] for row in group}
        cells = [method, k or "-", f"{float(temperature):g}", scheduler, extra or "-",
                 str(group[0]["rows_per_sample"]),
                 f"{group[0]['last_layer_flops_per_step'] / 1e6:.1f}"]
        cells += [f"{by_seed[seed]:.4f}" if seed in by_seed else "-" for seed in seeds]
        cells.append(f"{statistics.mean(by_seed.values()):.4f}")
        cells.append(f"{statistics.median(row['ms_per_step'] for row in group):.1f}")
        print("| " + " | ".join(cells) + " |")
    print("\nFLOPs: forward pass of the last layer, 2 * batch * rows * d; "
          "ms/step: median over seeds of the median epoch time / steps.")


def write_csv(rows, path):
    """Writes `rows` to `path`, one per run and seed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nWrote {path}")


def parse_args(argv=None):
    """The command line, with `--quick`'s sizes where not given."""
    methods = list(keras_dis.losses.METHODS)
    default_methods = list(DEFAULT_METHODS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000, help="C")
    parser.add_argument("--examples-per-class", type=int, default=10)
    parser.add_argument("--test-examples-per-class", type=int, default=5)
    parser.add_argument("--hidden-units", type=int, nargs="+", default=[256, 128],
                        help="the student's Dense(relu) layers; the last is d")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--top-r", type=int, default=None,
                        help="teacher ranks kept in the packed targets (default C)")
    parser.add_argument("--methods", nargs="+", default=default_methods,
                        choices=methods + ["all"],
                        help="names in keras_dis.losses.METHODS, or all "
                             f"(default: {' '.join(default_methods)})")
    parser.add_argument("--variant", nargs="+", action="extend",
                        help="extra runs, name:key=value,...; e.g. "
                             "dis:exact_top=5 (added to the default "
                             f"{', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 49])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes for tests: " + ", ".join(
                            f"{key}={value}" for key, value in QUICK_DEFAULTS.items()))
    parser.add_argument("--output", default=None,
                        help="CSV path (default benchmarks/results/"
                             "accuracy_<backend>_cpu.csv)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    if "all" in args.methods:
        args.methods = methods
    return args


def main(argv=None):
    args = parse_args(argv)
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"accuracy_{keras.backend.backend()}_cpu.csv",
    )
    start = time.perf_counter()
    rows = run_grid(args)
    print_table(rows, args.seeds)
    print(f"\nWall time {time.perf_counter() - start:.0f} s")
    write_csv(rows, output)


if __name__ == "__main__":
    main()
