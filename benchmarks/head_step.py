"""Benchmark: one training step of the student's last layer, per method.

Times forward + backward + optimizer update of the classification head of a
student (features `(batch, d)` -> `C` classes, Adam) for:

- `full_kd`: full-softmax distillation, the dense head trained by Keras's
  Adam (what `keras.distillation.Distiller` does in its last layer);
- `tf_sampled_softmax` (TensorFlow only): `tf.nn.sampled_softmax_loss` with
  `k` sampled classes (hard labels), trained by Keras's Adam;
- `uniform`, `ftis`, `dis`: `keras_dis.Distiller` on cached teacher
  targets, `DISLoss(k)`, row-sparse lazy Adam on the head;
- `dis_head_optimizer`: the plain path, `student.compile(loss=DISLoss(k))`
  with `SampledDistillationHead(C, optimizer=Adam)` training its own rows.

Each (method, C) runs in a fresh process. On JAX, glibc's allocator is told
to keep freed memory (`ALLOCATOR_ENV`; `--default-malloc` turns it off):
JAX on CPU allocates a step's temporaries with `malloc`, and by default glibc
hands them back to the system after each step, so every step page-faults
them in again (26 ms instead of 10 ms for DIS at C = 100k; no change for
full KD). TensorFlow has its own allocator and gains nothing. The median
step time after
warm-up, and the peak resident memory added by building and training the
model (over the process after imports and data), next to the size of the
head's parameters plus optimizer state. Prints a table with the ratio against
full KD and writes a CSV.

    KERAS_BACKEND=tensorflow python benchmarks/head_step.py \
        --num-classes 1000 10000 100000 1000000 --output results/head_step.csv

The cost of the in-step input checks and of XLA, measured within one
process: `--input-checks both` and/or `--xla both` build one model per
variant in the same worker and time their steps interleaved (A, B, A, B,
...), so that the ratio is not drowned by process-to-process noise; the
summary prints each variant's time against the checked, XLA-compiled one.
`--input-checks off` replaces, in the worker only,
`keras_dis.src.input_checks.check_teacher_targets` by an unchecked unpack
of the targets (error code 0) and `keras_dis.src.backend.raise_input_error`
by a no-op (no `tf.py_function`, nothing recorded in the head), so the
step is today's minus its input checks. The finiteness gate of the row
update (`RowSparseOptimizer.apply`) stays in both. `--rounds N` repeats
the whole set of processes N times (column `run`).

    KERAS_BACKEND=tensorflow python benchmarks/head_step.py \
        --num-classes 1000 100000 --methods dis dis_head_optimizer \
        --input-checks both --xla both --repeats 30 --rounds 2 \
        --output benchmarks/results/head_step_checks_tensorflow_cpu.csv
"""

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time

METHODS = (
    "full_kd", "tf_sampled_softmax", "uniform", "ftis", "dis", "dis_head_optimizer",
)
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**31),
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
}


def peak_rss_mb():
    """Peak resident memory since the last `reset_peak_rss` (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Restarts the peak (`VmHWM`) at the current resident size, after
    handing memory freed since start-up back to the system."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def current_rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _variants(choice):
    return {"on": [True], "off": [False], "both": [True, False]}[choice]


class _InputChecks:
    """Turns the step's input checks off and on again (worker only).

    Off: `input_checks.check_teacher_targets` returns OK and the targets
    unpacked, unchecked; `backend.raise_input_error` does nothing and says
    it raised, so the head records nothing. The traced steps (TensorFlow,
    JAX) keep what they were traced with; PyTorch runs eagerly, so the
    state is set again before each of its steps.
    """

    def __init__(self):
        from keras_dis.src import backend as dis_backend
        from keras_dis.src import input_checks

        self._modules = {"check": input_checks, "raise": dis_backend}
        self._checked = {
            "check": input_checks.check_teacher_targets,
            "raise": dis_backend.raise_input_error,
        }

    def set(self, on):
        from keras import ops

        from keras_dis.src.teacher_targets import unpack_teacher_targets

        def unchecked(packed_targets, num_classes):
            del num_classes
            return (
                ops.convert_to_tensor(0, "int32"),
                ops.convert_to_tensor(0.0),
                unpack_teacher_targets(packed_targets),
            )

        def raise_nothing(error_code, error_value, num_classes):
            del error_code, error_value, num_classes
            return True

        self._modules["check"].check_teacher_targets = (
            self._checked["check"] if on else unchecked
        )
        self._modules["raise"].raise_input_error = (
            self._checked["raise"] if on else raise_nothing
        )


def run_worker(args):
    """Builds one model per variant (input checks, XLA), times their steps
    interleaved, prints one JSON line per variant."""
    import keras
    import numpy as np

    import keras_dis

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    batch, dim, classes, k = args.batch_size, args.dim, args.num_classes, args.k
    features = rng.normal(size=(batch, dim)).astype("float32")
    labels = rng.integers(0, classes, size=batch)
    # Cached teacher targets: a top-R ranking per sample plus the tail.
    top_classes = np.stack([rng.choice(classes, args.top_r, replace=False) for _ in range(batch)])
    top_classes[:, 0] = labels
    top_logits = -np.sort(-rng.normal(size=(batch, args.top_r)) * 3, axis=-1)
    targets = np.concatenate(
        [labels[:, None], np.full((batch, 1), -5.0), top_classes, top_logits], axis=-1
    ).astype("float32")
    # Start the backend's runtime (thread pools, compiler) and import
    # tensorflow-probability's NumPy substrate (the DIS proposal's; about
    # 0.5 GB resident on JAX and PyTorch) before the baseline, so that the
    # peak counts what the model and its steps use.
    keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.ones((8, 8))))
    keras_dis.proposals.LaplaceMixtureProposal().rank_probabilities(2)
    rss_before = current_rss_mb()
    input_checks = _InputChecks()
    variants = []
    for xla in _variants(args.xla):
        # tf.nn.sampled_softmax_loss has no keras_dis input checks.
        for checks in _variants("on" if args.method == "tf_sampled_softmax" else args.input_checks):
            jit_compile = backend != "torch" and xla
            if args.method == "tf_sampled_softmax":
                jit_compile = False  # its candidate sampler has no XLA kernel
            if (checks, jit_compile) not in variants:
                variants.append((checks, jit_compile))
    steps = []
    for checks, jit_compile in variants:
        input_checks.set(checks)
        if args.method == "tf_sampled_softmax":
            step, parameters = _tf_sampled_softmax_step(args, features, labels)
        else:
            step, parameters = _keras_step(
                args, jit_compile, features, targets
            )
        for _ in range(args.warmup):  # the first step traces: checks as set
            step()
        steps.append(step)
    # The peak of the timed steps: model state, optimizer state and the
    # step's own buffers, not the one-off cost of initialising and compiling
    # (of all the variants' models together when there are several).
    reset_peak_rss()
    times = [[] for _ in variants]
    for repeat in range(args.repeats):
        # Interleaved, the order rotated each time.
        for i in range(len(variants)):
            index = (i + repeat) % len(variants)
            input_checks.set(variants[index][0])
            start = time.perf_counter()
            steps[index]()
            times[index].append(time.perf_counter() - start)
    input_checks.set(True)
    peak_mb = peak_rss_mb() - rss_before
    for (checks, jit_compile), variant_times in zip(variants, times):
        print(
            json.dumps(
                {
                    "backend": backend,
                    "method": args.method,
                    "num_classes": classes,
                    "dim": dim,
                    "batch_size": batch,
                    "k": k,
                    "xla": jit_compile,
                    "input_checks": checks,
                    "ms_per_step": 1000 * float(np.median(variant_times)),
                    "peak_mb": peak_mb,
                    "state_mb": parameters * 4 / 2**20,
                }
            )
        )


def _keras_step(args, jit_compile, features, targets):
    import keras

    import keras_dis

    classes, dim, k = args.num_classes, args.dim, args.k
    plain = args.method == "dis_head_optimizer"
    inputs = keras.Input((dim,))
    head = keras_dis.SampledDistillationHead(
        classes, seed=0, optimizer=keras.optimizers.Adam(1e-3) if plain else None
    )
    student = keras.Model(inputs, head(inputs))
    proposal = {"full_kd": "full", "dis_head_optimizer": "dis"}.get(
        args.method, args.method
    )
    # Cached targets: a plain student, or a Distiller without teacher.
    model = student if plain else keras_dis.Distiller(None, student)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras_dis.DISLoss(k=k, proposal=proposal),
        jit_compile=jit_compile,
    )
    parameters = (classes * dim + classes) * 3  # weights, m, v

    def step():
        model.train_on_batch(features, targets)

    return step, parameters


def _tf_sampled_softmax_step(args, features, labels):
    import keras
    import tensorflow as tf

    classes, dim = args.num_classes, args.dim
    weights = keras.Variable(
        keras.initializers.GlorotUniform(seed=0)((classes, dim)), name="kernel"
    )
    biases = keras.Variable(tf.zeros((classes,)), name="bias")
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build([weights, biases])
    features = tf.constant(features)
    labels = tf.constant(labels[:, None], dtype=tf.int64)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sampled_softmax_loss(
                    weights=weights.value,
                    biases=biases.value,
                    labels=labels,
                    inputs=features,
                    num_sampled=args.k,
                    num_classes=classes,
                )
            )
        gradients = tape.gradient(loss, [weights.value, biases.value])
        optimizer.apply(gradients, [weights, biases])
        return loss

    def step():
        train_step().numpy()

    return step, (classes * dim + classes) * 3


def run_all(args):
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    methods = [m for m in args.methods if backend == "tensorflow" or m != "tf_sampled_softmax"]
    rows = []
    for run in range(args.rounds):
        for num_classes in args.num_classes:
            for method in methods:
                rows.extend(_run_worker_process(args, backend, method, num_classes, run))
    # Against full KD at the same C, XLA setting and run where measured.
    full = {}
    for r in rows:
        if r["method"] == "full_kd" and r["input_checks"]:
            full.setdefault((r["num_classes"], r["xla"], r["run"]), r["ms_per_step"])
            full.setdefault((r["num_classes"], r["xla"]), r["ms_per_step"])
            full.setdefault(r["num_classes"], r["ms_per_step"])
    for row in rows:
        keys = ((row["num_classes"], row["xla"], row["run"]),
                (row["num_classes"], row["xla"]), row["num_classes"])
        full_ms = next((full[key] for key in keys if key in full), float("nan"))
        row["speedup_vs_full_kd"] = full_ms / row["ms_per_step"]
        row["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = (f"{'method':>20} {'C':>9} {'XLA':>5} {'checks':>6} {'run':>3} {'ms/step':>10} "
              f"{'x full KD':>10} {'peak MB':>9} {'state MB':>9}")
    print(f"\nBackend {backend}, d={args.dim}, batch={args.batch_size}, k={args.k}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()})")
    print(header)
    for row in rows:
        print(
            f"{row['method']:>20} {row['num_classes']:>9} {str(row['xla']):>5} "
            f"{str(row['input_checks']):>6} {row['run']:>3} {row['ms_per_step']:>10.1f} "
            f"{row['speedup_vs_full_kd']:>10.1f} {row['peak_mb']:>9.0f} {row['state_mb']:>9.0f}"
        )
    _print_variant_ratios(rows)
    if args.output and rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nWrote {args.output}")


def _run_worker_process(args, backend, method, num_classes, run):
    repeats = args.repeats
    if method == "full_kd" and args.full_kd_repeats:
        repeats = args.full_kd_repeats
    if method == "full_kd" and num_classes >= 10**6:
        repeats = args.full_repeats_at_1m
    command = [
        sys.executable, __file__, "--worker", "--method", method,
        "--num-classes", str(num_classes), "--dim", str(args.dim),
        "--batch-size", str(args.batch_size), "--k", str(args.k),
        "--top-r", str(args.top_r), "--warmup", str(args.warmup),
        "--repeats", str(repeats), "--input-checks", args.input_checks,
        "--xla", args.xla,
    ]
    env = dict(os.environ)
    if backend == "jax" and not args.default_malloc:
        env.update(ALLOCATOR_ENV)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode != 0 or not lines:
        print(f"{method} C={num_classes} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return []
    rows = [dict(json.loads(line), run=run) for line in lines]
    for row in rows:
        print(
            f"  {method:>20} C={num_classes:>8} xla={row['xla']!s:>5} "
            f"checks={row['input_checks']!s:>5} run={run}: "
            f"{row['ms_per_step']:9.1f} ms/step",
            flush=True,
        )
    return rows


def _print_variant_ratios(rows):
    """Ratios between the variants of one process (method, C, run): the
    cost of the input checks (checked / unchecked - 1, same XLA setting)
    and the speed-up of XLA (not compiled / compiled, same checks)."""
    times = {
        (r["method"], r["num_classes"], r["run"], r["xla"], r["input_checks"]): r["ms_per_step"]
        for r in rows
    }
    lines = []
    for (method, classes, run, xla, checks), ms in times.items():
        if checks and (method, classes, run, xla, False) in times:
            overhead = ms / times[(method, classes, run, xla, False)] - 1
            lines.append(f"{method:>20} {classes:>9} {run:>3}   input checks cost "
                         f"{100 * overhead:+6.1f}% (xla={xla})")
        if xla and (method, classes, run, False, checks) in times:
            speedup = times[(method, classes, run, False, checks)] / ms
            lines.append(f"{method:>20} {classes:>9} {run:>3}   XLA step {speedup:.2f}x "
                         f"as fast as without (checks={checks})")
    if lines:
        print("\nWithin each process (steps interleaved):")
        print(f"{'method':>20} {'C':>9} {'run':>3}")
        print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-classes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dim", type=int, default=512, help="features dimension d")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=20, help="sampled classes")
    parser.add_argument("--top-r", type=int, default=100, help="cached teacher ranks")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--full-repeats-at-1m", type=int, default=3,
                        help="repeats of full KD at C >= 1M (seconds per step)")
    parser.add_argument("--full-kd-repeats", type=int, default=None,
                        help="repeats of full KD below 1M (default: --repeats)")
    parser.add_argument("--no-xla", action="store_true",
                        help="no jit_compile (same as --xla off)")
    parser.add_argument("--xla", choices=("on", "off", "both"), default="on",
                        help="jit_compile on TensorFlow and JAX; both: one model "
                             "of each in the same worker, steps interleaved")
    parser.add_argument("--input-checks", choices=("on", "off", "both"), default="on",
                        help="the step's input checks of the teacher targets; "
                             "off: replaced in the worker by an unchecked unpack; "
                             "both: one model of each in the same worker, steps "
                             "interleaved")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every worker process this many times (column run)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator settings as they are")
    parser.add_argument("--output", default="benchmarks/results/head_step.csv")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.no_xla:
        args.xla = "off"
    if args.worker:
        args.num_classes = args.num_classes[0]
        run_worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
