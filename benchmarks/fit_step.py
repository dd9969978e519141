"""Benchmark: one `fit()` step of a whole student, per distillation method.

Times what a user runs: `fit(x, y, batch_size=B, epochs=E, verbose=0)` of a
student with a trainable body and Adam (learning rate 1e-3), per method:

- `full_kd`: `keras_dis.Distiller(None, student)` compiled with
  `keras_dis.losses.get("full_kd")`, the full softmax over the `C` classes
  (the head's logits `B x C`, a dense `C x d` gradient, Keras's Adam);
- `keras_distiller`: the Keras reference, `keras.distillation.Distiller(
  teacher, student, LogitsDistillation())` with its defaults (KL divergence
  at temperature 3, half the sparse cross-entropy on the labels), the
  student ending in a plain `keras.layers.Dense(C)`. Its API has no cached
  targets: `y` is the labels and the teacher (a frozen copy of the
  student's architecture, random weights) runs on every batch, inside the
  timed step (column `teacher_online`);
- `online`: the default `keras_dis.DISLoss(k=k)` on `keras_dis.Distiller(
  teacher, student)` fed labels, so the same teacher as `keras_distiller`
  runs on every batch (inference mode, its top `min(100, C)` classes
  ranked, `Distiller.ranked_classes`), inside the timed step; its ratio is
  also printed against `keras_distiller` (column
  `keras_distiller_over_method`);
- `uniform`, `ftis`, `dis`: the paper's sampled methods
  (`keras_dis.losses.get(method, k=k)`) on `keras_dis.Distiller(None,
  student)` with packed teacher targets; the head's touched rows are
  updated row-sparse (lazy Adam), the body by Keras's Adam;
- `default`: the same with `keras_dis.DISLoss(k=k)`, the estimator that
  runs by default (`keras_dis.losses.DEFAULT_METHOD`, column `estimator`);
- `dis_dense`: DIS on `keras_dis.Distiller(None, student,
  row_sparse_updates=False)`: the sampled loss, but the compiled Adam
  updates the whole head (a dense `C x d` gradient and update);
- `head_optimizer`: no Distiller, the plain path:
  `SampledDistillationHead(C, optimizer="adam")`, `student.compile(
  optimizer="adam", loss=keras_dis.DISLoss(k=k))`, `student.fit(x,
  packed_targets)`; the head updates its own rows.

Students (`--students`):

- `mlp`: `Input(512) -> Dense(512, relu) -> head` (head features `d = 512`);
- `cnn`: `Input(32, 32, 3) -> Conv2D(32, 3, relu) -> MaxPooling2D ->
  Conv2D(64, 3, relu) -> GlobalAveragePooling2D -> Dense(256, relu) -> head`
  (`d = 256`).

The head is `keras_dis.SampledDistillationHead(C)`, or `Dense(C)` for
`keras_distiller`. Data: `N = num_batches * B` random inputs and packed
teacher targets built directly in their documented format
(`keras_dis/src/teacher_targets.py`): `R` distinct random classes per
sample, the first of them the label, descending random logits and a tail
logit below them; no `N x C` array is formed, so `C = 1,000,000` fits.

Each (student, method, C) runs in a fresh process, with a timeout, one
at a time (`--jobs N` runs N at once: quicker, but they compete for the
cores, so only for smoke runs such as `--quick`). A
callback times every batch (`on_train_batch_begin` to
`on_train_batch_end`, which waits for the step's logs); the first
`--warmup` batches (tracing and compiling) are dropped and the median of the
next `--repeats` is reported. "peak RSS" is the peak resident memory of the
whole process during the timed batches (the peak is restarted at the first
of them, as in `head_step.py`); `baseline_rss_mb` is the process after
imports, data and backend start-up, before the model. On JAX, glibc is told
to keep freed memory (see `head_step.py`; `--default-malloc` turns it off).
XLA: by default every model compiles with its own default (`--xla
default`): `keras_dis.Distiller` with XLA on TensorFlow, `keras.Model` and
`keras.distillation.Distiller` without XLA on a TensorFlow machine without
GPU; always `jax.jit` on JAX; eager on PyTorch. `--xla on` / `off` forces
`jit_compile` (column `xla`, what the model resolved). A configuration whose
estimated memory (`estimated_memory_gb`) exceeds `--max-memory-gb` is not
run ("skipped (memory)").

Traffic floor: the run first measures this machine's copy bandwidth
(`copy_bandwidth_gb_per_s`, a STREAM-like copy, bytes read plus written),
and each configuration counts the bytes its step must move at the least
(`traffic_floor_bytes`: the updated parameters with their gradients' Adam
moments read and written once, for a sampled head only the `B * (k + 1)`
touched rows; the inputs and features; a full softmax's logits); `floor_ms`
is their ratio. Memory: `state_mb` is the student's parameters with their
two Adam moments plus an online teacher's parameters; the tables print the
peak RSS growth over the process before the model against it.

`--backends` runs the same configurations on several Keras backends (each
in its own process) in one run, and adds a table of each backend's default
step against the fastest full-KD step of any backend.

Prints, per backend and student, markdown tables of ms/step and the ratio
full KD / method at each C (same backend, same run), of the traffic floor
and of peak RSS; writes one CSV row per configuration.

    python benchmarks/fit_step.py --backends tensorflow jax torch \\
        --classes 100000 1000000 --methods full_kd online default
    KERAS_BACKEND=tensorflow python benchmarks/fit_step.py --students cnn \\
        --classes 1000 100000 --methods full_kd keras_distiller default
    KERAS_BACKEND=torch python benchmarks/fit_step.py --quick --output /tmp/f.csv

`--quick` is a toy run for tests (the values in `QUICK_DEFAULTS`, for the
arguments not given on the command line).
"""

import argparse
import concurrent.futures
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time

from head_step import ALLOCATOR_ENV
from head_step import current_rss_mb
from head_step import peak_rss_mb
from head_step import reset_peak_rss

METHODS = (
    "full_kd",
    "keras_distiller",
    "online",
    "uniform",
    "ftis",
    "dis",
    "default",
    "dis_dense",
    "head_optimizer",
)
STUDENTS = ("mlp", "cnn")
# The width of the features the head sees, per student.
FEATURES_DIM = {"mlp": 512, "cnn": 256}
# Methods whose head is trained by the compiled (dense) Adam, and those
# that compute every logit.
DENSE_HEAD_METHODS = ("full_kd", "keras_distiller", "dis_dense")
FULL_SOFTMAX_METHODS = ("full_kd", "keras_distiller")
# Methods fed labels, whose teacher runs in the step.
TEACHER_ONLINE_METHODS = ("keras_distiller", "online")
# Applied by `--quick` to the arguments not given on the command line.
QUICK_DEFAULTS = {
    "students": ["mlp"],
    "methods": ["full_kd", "default", "head_optimizer"],
    "classes": [100, 1000],
    "batch_size": 32,
    "warmup": 2,
    "repeats": 3,
    "jobs": 2,
}
CSV_FIELDS = (
    "backend", "machine", "student", "method", "estimator", "teacher_online",
    "num_classes", "features_dim", "k", "top_r", "batch_size", "xla",
    "warmup", "repeats", "ms_per_step", "full_kd_over_method",
    "keras_distiller_over_method", "peak_rss_mb", "baseline_rss_mb",
    "state_mb", "estimated_memory_gb", "traffic_floor_mb", "copy_gb_per_s",
    "floor_ms", "status",
)


def estimated_memory_gb(method, num_classes, features_dim, batch_size):
    """A rough bound on the memory a configuration needs, for `--max-memory-gb`.

    Counts the head only (the bodies are small): its weights and the two
    Adam moments (dense, or the row-sparse optimizer's per-row state), a
    dense `C x d` gradient and as much again for the update's temporaries
    where the compiled Adam trains the head (full KD at `C = 10^6`, `d =
    512` peaked at 12.1 GiB in `head_step.py` on TensorFlow), the
    `B x C` logits, softmaxes and their gradient of a full softmax, and
    the teacher's head and logits of `keras.distillation.Distiller`.

    Args:
        method: one of `METHODS`.
        num_classes: int, `C`.
        features_dim: int, `d`, the width of the head's input.
        batch_size: int, `B`.

    Returns:
        The estimate in GiB, a float.
    """
    head_bytes = num_classes * (features_dim + 1) * 4
    logits_bytes = batch_size * num_classes * 4
    total = 3 * head_bytes
    if method in DENSE_HEAD_METHODS:
        total += 2 * head_bytes
    if method in FULL_SOFTMAX_METHODS:
        total += 4 * logits_bytes
    if method in TEACHER_ONLINE_METHODS:
        total += head_bytes + 2 * logits_bytes
    return total / 2**30


def copy_bandwidth_gb_per_s(size_mb=256, repeats=5):
    """This machine's memory bandwidth as a STREAM-like copy measures it.

    Copies a `size_mb` float32 array into another (both touched first),
    `repeats` times, and counts the bytes read plus the bytes written of the
    fastest copy.

    Returns:
        GB/s (1e9 bytes per second), a float.
    """
    import numpy as np

    source = np.ones(size_mb * 2**20 // 4, "float32")
    target = np.zeros_like(source)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def traffic_floor_bytes(
    method, num_classes, features_dim, batch_size, k, body_parameters,
    teacher_parameters, input_size,
):
    """The bytes one training step must move at the least, fused perfectly.

    Counts each parameter the step updates, with its gradient applied and
    its two Adam moments, read and written once (the head's rows: all `C`
    for a dense head update, else the `B * (k + 1)` rows of the sampled
    entries); the teacher's parameters read once (teacher online); the
    inputs and the head's features read, the features written; and for a
    full softmax the `B x C` logits written and read back.

    Args:
        method: one of `METHODS`.
        num_classes, features_dim, batch_size, k: ints, `C`, `d`, `B`, `k`.
        body_parameters: int, the student's trainable parameters besides
            its head's kernel and bias.
        teacher_parameters: int, 0 without an online teacher.
        input_size: int, the numbers in one example's input.

    Returns:
        An int.
    """
    rows = (
        num_classes
        if method in DENSE_HEAD_METHODS
        else min(batch_size * (k + 1), num_classes)
    )
    updated = rows * (features_dim + 1) + body_parameters
    total = updated * 4 * 3 * 2 + teacher_parameters * 4
    total += batch_size * (input_size + 2 * features_dim) * 4
    if method in FULL_SOFTMAX_METHODS:
        total += 2 * batch_size * num_classes * 4
    return total


def make_data(student, num_examples, num_classes, top_r, seed=0):
    """Random inputs, labels and packed teacher targets.

    The targets are built directly in the packed format of
    `keras_dis.pack_teacher_targets` (label, tail logit, `R` distinct
    classes best first, their logits descending), without an
    `N x C` array of teacher logits.

    Args:
        student: one of `STUDENTS`, which sets the input shape.
        num_examples: int, `N`.
        num_classes: int, `C`.
        top_r: int in `[1, C]`, `R`.
        seed: int, seeds the NumPy generator.

    Returns:
        A tuple `(x, labels, targets)` of shapes `(N, ...)` float32, `(N,)`
        int32 and `(N, 2 + 2R)` float32.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    input_shape = (512,) if student == "mlp" else (32, 32, 3)
    x = rng.normal(size=(num_examples, *input_shape)).astype("float32")
    top_classes = np.stack(
        [rng.choice(num_classes, top_r, replace=False) for _ in range(num_examples)]
    )
    labels = top_classes[:, 0].astype("int32")  # the teacher's top class
    top_logits = -np.sort(-3 * rng.normal(size=(num_examples, top_r)), axis=-1)
    tail_logits = top_logits[:, -1] - 2.0 if top_r < num_classes else 0.0
    targets = np.concatenate(
        [
            labels[:, None],
            np.broadcast_to(tail_logits, (num_examples,))[:, None],
            top_classes,
            top_logits,
        ],
        axis=-1,
    ).astype("float32")
    return x, labels, targets


def build_student(student, head):
    """The student network `student` ending in the layer `head`.

    Args:
        student: one of `STUDENTS`.
        head: the output layer, a `SampledDistillationHead` or a `Dense`.

    Returns:
        A functional `keras.Model`.
    """
    import keras

    if student == "mlp":
        inputs = keras.Input((512,))
        features = keras.layers.Dense(512, activation="relu")(inputs)
    else:
        inputs = keras.Input((32, 32, 3))
        hidden = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
        hidden = keras.layers.MaxPooling2D()(hidden)
        hidden = keras.layers.Conv2D(64, 3, activation="relu")(hidden)
        hidden = keras.layers.GlobalAveragePooling2D()(hidden)
        features = keras.layers.Dense(256, activation="relu")(hidden)
    return keras.Model(inputs, head(features), name=f"{student}_student")


def build_model(method, student, num_classes, k, jit_compile):
    """The compiled model `fit` runs for a method, and its estimator.

    Args:
        method: one of `METHODS`.
        student: one of `STUDENTS`.
        num_classes: int, `C`.
        k: int, the sampled classes of the sampled methods.
        jit_compile: `"auto"` (the model's default) or a bool.

    Returns:
        A tuple `(model, estimator)`: the model to `fit`, and the name in
        `keras_dis.losses.METHODS` of its loss (`"keras"` for
        `keras_distiller`).
    """
    import keras

    import keras_dis

    if method == "keras_distiller":
        teacher = build_student(student, keras.layers.Dense(num_classes))
        model = keras.distillation.Distiller(
            teacher,
            build_student(student, keras.layers.Dense(num_classes)),
            distillation_losses=keras.distillation.LogitsDistillation(),
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        return model, "keras"
    if method == "online":
        model = keras_dis.Distiller(
            build_student(student, keras.layers.Dense(num_classes)),
            build_student(student, keras_dis.SampledDistillationHead(num_classes, seed=0)),
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras_dis.DISLoss(k=k),
            jit_compile=jit_compile,
        )
        return model, keras_dis.losses.DEFAULT_METHOD
    if method == "head_optimizer":
        model = build_student(
            student,
            keras_dis.SampledDistillationHead(num_classes, seed=0, optimizer="adam"),
        )
        model.compile(
            optimizer="adam", loss=keras_dis.DISLoss(k=k), jit_compile=jit_compile
        )
        return model, keras_dis.losses.DEFAULT_METHOD
    estimator = {
        "default": keras_dis.losses.DEFAULT_METHOD, "dis_dense": "dis"
    }.get(method, method)
    model = keras_dis.Distiller(
        None,
        build_student(student, keras_dis.SampledDistillationHead(num_classes, seed=0)),
        row_sparse_updates=method != "dis_dense",
    )
    loss = (
        keras_dis.DISLoss(k=k)
        if method == "default"
        else keras_dis.losses.get(estimator, k=k)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=jit_compile
    )
    return model, estimator


def _step_timer(warmup):
    """A callback recording each batch's time; restarts the peak resident
    memory at the first timed batch (after `warmup` batches)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self._start = None

        def on_train_batch_begin(self, batch, logs=None):
            if len(self.times) == warmup:
                reset_peak_rss()
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def run_worker(args):
    """Builds, compiles and fits one configuration; prints one JSON line."""
    import keras
    import numpy as np

    import keras_dis

    backend = keras.backend.backend()
    classes, batch = args.classes[0], args.batch_size
    student, method = args.students[0], args.methods[0]
    top_r = min(args.top_r, classes)
    x, labels, targets = make_data(student, args.num_batches * batch, classes, top_r)
    y = labels if method in TEACHER_ONLINE_METHODS else targets
    # Start the backend's runtime and import tensorflow-probability's NumPy
    # substrate (the DIS proposal's) before the baseline, as head_step.py.
    keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.ones((8, 8))))
    keras_dis.proposals.LaplaceMixtureProposal().rank_probabilities(2)
    baseline_mb = current_rss_mb()
    jit_compile = {"default": "auto", "on": True, "off": False}[args.xla]
    if backend == "torch" and jit_compile is True:
        jit_compile = False  # it would mean torch.compile, not XLA
    model, estimator = build_model(method, student, classes, args.k, jit_compile)
    timer = _step_timer(args.warmup)
    steps = args.warmup + args.repeats
    model.fit(
        x, y, batch_size=batch, epochs=math.ceil(steps / args.num_batches),
        verbose=0, callbacks=[timer],
    )
    timed = timer.times[args.warmup : steps]
    student_model = getattr(model, "student", model)
    head_weights = {id(w) for w in student_model.layers[-1].weights}
    body_parameters = sum(
        int(np.prod(w.shape))
        for w in student_model.trainable_weights
        if id(w) not in head_weights
    )
    head_parameters = classes * (FEATURES_DIM[student] + 1)
    teacher = getattr(model, "teacher", None)
    teacher_parameters = 0 if teacher is None else teacher.count_params()
    floor_bytes = traffic_floor_bytes(
        method, classes, FEATURES_DIM[student], batch, args.k, body_parameters,
        teacher_parameters, int(np.prod(x.shape[1:])),
    )
    print(
        json.dumps(
            {
                "estimator": estimator,
                "traffic_floor_mb": floor_bytes / 2**20,
                # The student's parameters with their two Adam moments,
                # and the teacher's.
                "state_mb": (
                    3 * (body_parameters + head_parameters) + teacher_parameters
                ) * 4 / 2**20,
                "xla": bool(model.jit_compile),
                "ms_per_step": 1000 * float(np.median(timed)),
                "peak_rss_mb": peak_rss_mb(),
                "baseline_rss_mb": baseline_mb,
            }
        )
    )


def run_config(args, backend, student, method, num_classes):
    """Runs one configuration in a fresh process, unless too large.

    Args:
        args: the parsed arguments of the whole run.
        backend: the Keras backend name.
        student: one of `STUDENTS`.
        method: one of `METHODS`.
        num_classes: int, `C`.

    Returns:
        A dict, the CSV row of the configuration (`status` `"ok"`,
        `"skipped (memory)"`, `"timeout"` or `"failed"`).
    """
    memory_gb = estimated_memory_gb(
        method, num_classes, FEATURES_DIM[student], args.batch_size
    )
    row = {
        "backend": backend,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPU cores",
        "student": student,
        "method": method,
        "estimator": "",
        "teacher_online": method in TEACHER_ONLINE_METHODS,
        "num_classes": num_classes,
        "features_dim": FEATURES_DIM[student],
        "k": args.k,
        "top_r": min(args.top_r, num_classes),
        "batch_size": args.batch_size,
        "xla": "",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ms_per_step": "",
        "full_kd_over_method": "",
        "keras_distiller_over_method": "",
        "peak_rss_mb": "",
        "baseline_rss_mb": "",
        "estimated_memory_gb": round(memory_gb, 3),
        "traffic_floor_mb": "",
        "copy_gb_per_s": args.copy_gb_per_s,
        "floor_ms": "",
        "state_mb": "",
        "status": "ok",
    }
    if memory_gb > args.max_memory_gb:
        row["status"] = "skipped (memory)"
        print(f"  {student} {method:>16} C={num_classes:>8}: skipped (memory, "
              f"~{memory_gb:.1f} GiB)", flush=True)
        return row
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--students", student, "--methods", method,
        "--classes", str(num_classes), "--batch-size", str(args.batch_size),
        "--num-batches", str(args.num_batches), "--k", str(args.k),
        "--top-r", str(args.top_r), "--warmup", str(args.warmup),
        "--repeats", str(args.repeats), "--xla", args.xla,
    ]
    env = dict(os.environ, KERAS_BACKEND=backend)
    if backend == "jax" and not args.default_malloc:
        env.update(ALLOCATOR_ENV)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        row["status"] = "timeout"
        print(f"  {student} {method:>16} C={num_classes:>8}: timeout "
              f"({args.timeout} s)", flush=True)
        return row
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        row["status"] = "failed"
        print(f"  {student} {method:>16} C={num_classes:>8}: failed\n"
              f"{result.stderr[-2000:]}", file=sys.stderr, flush=True)
        return row
    row.update(json.loads(lines[-1]))
    print(f"  {student} {method:>16} C={num_classes:>8}: "
          f"{row['ms_per_step']:9.1f} ms/step, peak RSS {row['peak_rss_mb']:.0f} MB",
          flush=True)
    return row


def add_ratios(rows):
    """Sets `full_kd_over_method`, full KD's ms/step over the row's at the
    same student and C (empty where either was not measured), the same
    against `keras_distiller` for the methods whose teacher runs online,
    and `floor_ms`, the traffic floor at the measured copy bandwidth."""
    full_kd = {
        (row["backend"], row["student"], row["num_classes"]): row["ms_per_step"]
        for row in rows
        if row["method"] == "full_kd" and row["status"] == "ok"
    }
    keras_distiller = {
        (row["backend"], row["student"], row["num_classes"]): row["ms_per_step"]
        for row in rows
        if row["method"] == "keras_distiller" and row["status"] == "ok"
    }
    for row in rows:
        if row["status"] != "ok":
            continue
        key = (row["backend"], row["student"], row["num_classes"])
        if key in full_kd:
            row["full_kd_over_method"] = full_kd[key] / row["ms_per_step"]
        if key in keras_distiller and row["method"] in TEACHER_ONLINE_METHODS:
            row["keras_distiller_over_method"] = (
                keras_distiller[key] / row["ms_per_step"]
            )
        row["floor_ms"] = (
            row["traffic_floor_mb"] * 2**20 / (row["copy_gb_per_s"] * 1e9) * 1e3
        )


def print_tables(rows, args, backend):
    """Prints, per student, markdown tables of ms/step (with the ratio full
    KD / method), of each step against its traffic floor, and of peak RSS
    against the parameters and optimizer state, one line per C and one
    column per method."""
    import keras

    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    default = next(
        (r["estimator"] for r in rows if r["method"] == "default" and r["estimator"]),
        "DISLoss(k)",
    )
    print(f"\nBackend {backend} (Keras {keras.__version__}), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"cores. Batch {args.batch_size}, k={args.k}, top_r={args.top_r}, "
          f"Adam; median of {args.repeats} fit() steps after {args.warmup}; "
          f"xla={args.xla}. default = {default}; keras_distiller and online "
          "run their teacher in the step. Copy bandwidth "
          f"{args.copy_gb_per_s:.1f} GB/s.")
    for student in args.students:
        by_key = {
            (r["method"], r["num_classes"]): r for r in rows if r["student"] == student
        }

        def lines(cell):
            return [
                (f"{c:,}", [cell(by_key.get((m, c))) for m in methods])
                for c in args.classes
            ]

        xla = [_xla_cell([r for (m, _), r in by_key.items() if m == method])
               for method in methods]
        name = f"{student} (d={FEATURES_DIM[student]})"
        _print_markdown_table(
            f"{name}, ms per fit() step (x full KD: full_kd ms / method ms; "
            "teacher online: also x keras_distiller)",
            methods, lines(_time_cell) + [("XLA", xla)],
        )
        _print_markdown_table(
            f"{name}, traffic floor ms of a step (bytes it must move / copy "
            "bandwidth) and the measured step over it",
            methods, lines(_floor_cell),
        )
        _print_markdown_table(
            f"{name}, peak RSS MB of the timed steps, and its growth over the "
            "process before the model (x the parameters with their Adam "
            "state, and the teacher's parameters)",
            methods, lines(_memory_cell),
        )


def _print_markdown_table(title, methods, lines):
    print(f"\n{title}:\n")
    print("| C | " + " | ".join(methods) + " |")
    print("|---:|" + "---:|" * len(methods))
    for label, cells in lines:
        print(f"| {label} | " + " | ".join(cells) + " |")


def _time_cell(row):
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    cell = f"{row['ms_per_step']:.1f}"
    ratios = [
        f"{row[column]:.1f}x{suffix}"
        for column, suffix in (
            ("full_kd_over_method", ""),
            ("keras_distiller_over_method", " keras"),
        )
        if row[column] != ""
    ]
    return cell + (f" ({', '.join(ratios)})" if ratios else "")


def _floor_cell(row):
    if row is None or row["status"] != "ok":
        return "" if row is None else row["status"]
    return f"{row['floor_ms']:.2f} ({row['ms_per_step'] / row['floor_ms']:.1f}x)"


def _xla_cell(rows):
    """Whether a method's steps compiled with XLA: "on", "off" or both."""
    settings = sorted({"on" if r["xla"] else "off" for r in rows if r["status"] == "ok"})
    return "/".join(settings)


def _memory_cell(row):
    if row is None or row["status"] != "ok":
        return "" if row is None else row["status"]
    growth = row["peak_rss_mb"] - row["baseline_rss_mb"]
    return f"{row['peak_rss_mb']:.0f}, +{growth:.0f} ({growth / row['state_mb']:.2f}x)"


def print_comparison(rows, args):
    """Prints, per student and C, each backend's default step against full
    KD on the same backend and on the fastest backend, its traffic floor
    and its memory (the run's `--backends`, two or more)."""
    print("\nAcross backends (one run): the default DISLoss(k) against the "
          "fastest full-KD step of any backend at the same C.")
    columns = ["backend", "full KD ms", "default ms", "x same backend",
               "x fastest full KD", "floor ms (x)", "peak growth (x state)"]
    for student in args.students:
        print(f"\n{student} (d={FEATURES_DIM[student]}):\n")
        print("| C | " + " | ".join(columns) + " |")
        print("|---:|" + "---|" * len(columns))
        for num_classes in args.classes:
            ok = [
                r for r in rows
                if r["student"] == student and r["num_classes"] == num_classes
                and r["status"] == "ok"
            ]
            full_kd = {r["backend"]: r for r in ok if r["method"] == "full_kd"}
            fastest = min((r["ms_per_step"] for r in full_kd.values()), default=None)
            for backend in args.backends:
                default = next(
                    (r for r in ok if r["backend"] == backend and r["method"] == "default"),
                    None,
                )
                if default is None:
                    continue
                full = full_kd.get(backend)
                cells = [
                    backend,
                    f"{full['ms_per_step']:.1f}" if full else "not run",
                    f"{default['ms_per_step']:.1f}",
                    f"{full['ms_per_step'] / default['ms_per_step']:.1f}x" if full else "",
                    f"{fastest / default['ms_per_step']:.1f}x" if fastest else "",
                    _floor_cell(default),
                    _memory_cell(default).split(", ", 1)[1],
                ]
                print(f"| {num_classes:,} | " + " | ".join(cells) + " |")


def run_all(args):
    """Runs every configuration, prints the tables and writes the CSV."""
    start = time.perf_counter()
    args.copy_gb_per_s = copy_bandwidth_gb_per_s()
    print(f"Copy bandwidth (read + write): {args.copy_gb_per_s:.1f} GB/s", flush=True)
    configs = [
        (backend, student, method, num_classes)
        for backend in args.backends
        for student in args.students
        for num_classes in args.classes
        for method in args.methods
    ]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as executor:
        rows = list(executor.map(lambda config: run_config(args, *config), configs))
    add_ratios(rows)
    for backend in args.backends:
        print_tables([r for r in rows if r["backend"] == backend], args, backend)
    if len(args.backends) > 1:
        print_comparison(rows, args)
    print(f"\nWall time {time.perf_counter() - start:.0f} s")
    write_rows(rows, CSV_FIELDS, args.output,
               f"fit_step_{'_'.join(args.backends)}_cpu.csv")


def write_rows(rows, fields, output, default_name):
    """Writes the CSV rows to `output`, or to `benchmarks/results/
    <default_name>` when `output` is None, and says where."""
    output = output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", default_name
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"Wrote {output}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=("tensorflow", "jax", "torch"),
                        default=[os.environ.get("KERAS_BACKEND", "tensorflow")],
                        help="Keras backends, each configuration in its own "
                             "process (default: KERAS_BACKEND)")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--classes", type=int, nargs="+",
                        default=[100, 751, 1000, 10000, 100000, 1000000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-batches", type=int, default=8,
                        help="examples in the data set, in batches")
    parser.add_argument("--k", type=int, default=10, help="sampled classes")
    parser.add_argument("--top-r", type=int, default=100,
                        help="teacher classes in the packed targets (>= k; "
                             "at most C)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="first batches not timed (tracing, compiling)")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches")
    parser.add_argument("--xla", choices=("default", "on", "off"), default="default",
                        help="jit_compile: each model's default, or forced "
                             "(PyTorch: always eager)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0,
                        help="skip configurations estimated to need more")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per configuration")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations run at once; above 1 they compete "
                             "for the cores, for smoke runs only")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator settings as they are (JAX)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes for tests: " + ", ".join(
                            f"{key}={value}" for key, value in QUICK_DEFAULTS.items()))
    parser.add_argument("--output", default=None,
                        help="CSV path (default benchmarks/results/"
                             "fit_step_<backends>_cpu.csv)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    if args.top_r < args.k:
        parser.error(f"--top-r must be >= --k. Received: top_r={args.top_r}, k={args.k}")
    for name in ("batch_size", "num_batches", "repeats", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1. "
                         f"Received: {name}={getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0. Received: warmup={args.warmup}")
    if args.k >= min(args.classes):
        parser.error(f"--k must be smaller than every C. Received: k={args.k}, "
                     f"classes={args.classes}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
