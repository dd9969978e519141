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


def run_worker(args):
    """Builds one model, times its steps, prints one JSON line."""
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
    jit_compile = backend != "torch" and not args.no_xla

    if args.method == "tf_sampled_softmax":
        # Its candidate sampler has no XLA kernel.
        jit_compile = False
        step, parameters = _tf_sampled_softmax_step(args, features, labels)
    else:
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

    for _ in range(args.warmup):
        step()
    # The peak of the timed steps: model state, optimizer state and the
    # step's own buffers, not the one-off cost of initialising and compiling.
    reset_peak_rss()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
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
                "ms_per_step": 1000 * float(np.median(times)),
                "peak_mb": peak_rss_mb() - rss_before,
                "state_mb": parameters * 4 / 2**20,
            }
        )
    )


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
    for num_classes in args.num_classes:
        for method in methods:
            command = [
                sys.executable, __file__, "--worker", "--method", method,
                "--num-classes", str(num_classes), "--dim", str(args.dim),
                "--batch-size", str(args.batch_size), "--k", str(args.k),
                "--top-r", str(args.top_r), "--warmup", str(args.warmup),
                "--repeats", str(args.repeats if method != "full_kd" or num_classes < 10**6 else args.full_repeats_at_1m),
            ] + (["--no-xla"] if args.no_xla else [])
            env = dict(os.environ)
            if backend == "jax" and not args.default_malloc:
                env.update(ALLOCATOR_ENV)
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
            if result.returncode != 0 or not lines:
                print(f"{method} C={num_classes} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(lines[-1])
            rows.append(row)
            print(f"  {method:>20} C={num_classes:>8}: {row['ms_per_step']:9.1f} ms/step", flush=True)
    full = {r["num_classes"]: r["ms_per_step"] for r in rows if r["method"] == "full_kd"}
    for row in rows:
        row["speedup_vs_full_kd"] = full.get(row["num_classes"], float("nan")) / row["ms_per_step"]
        row["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = f"{'method':>20} {'C':>9} {'ms/step':>10} {'x full KD':>10} {'peak MB':>9} {'state MB':>9}"
    print(f"\nBackend {backend}, d={args.dim}, batch={args.batch_size}, k={args.k}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()})")
    print(header)
    for row in rows:
        print(
            f"{row['method']:>20} {row['num_classes']:>9} {row['ms_per_step']:>10.1f} "
            f"{row['speedup_vs_full_kd']:>10.1f} {row['peak_mb']:>9.0f} {row['state_mb']:>9.0f}"
        )
    if args.output and rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nWrote {args.output}")


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
    parser.add_argument("--no-xla", action="store_true", help="no jit_compile")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator settings as they are")
    parser.add_argument("--output", default="benchmarks/results/head_step.csv")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.num_classes = args.num_classes[0]
        run_worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
