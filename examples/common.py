"""What the paper-reproduction programs share.

`examples/cifar100/train.py` (Tables 1 and 2) and
`examples/market1501/train.py` (Table 3) both train or load a teacher,
relabel the training set with it, train one student per row of the paper's
table, time the student's last layer for every method, then print and save
the table, a CSV and two plots (Fig. 6: accuracy against the subset size
`k`; Fig. 7: accuracy against the time spent in the last layer). Those
steps live here; each program only knows its data, its models and its
metrics.

A results row is a dict:

| key                            | content                                 |
|--------------------------------|-----------------------------------------|
| `method`                       | `"teacher"` or a name of                |
|                                | `keras_dis.losses.METHODS`              |
| `k`                            | the subset size, or `None`              |
| `label`                        | the row's name in the paper's table     |
| metric names (`accuracy`, ...) | fractions in [0, 1]                     |
| `paper_<metric>`               | the paper's number, or `None` if absent |
| `train_seconds_per_epoch`      | wall-clock seconds of a training epoch  |
| `last_layer_seconds_per_epoch` | seconds per epoch in the last layer     |
"""

import argparse
import csv
import math
import os
import statistics
import tempfile
import textwrap
import time

import keras
import numpy as np

import keras_dis

# Every student row, in the order of the paper's tables, then the other
# estimators of `keras_dis.losses.METHODS`.
STUDENT_METHODS = tuple(keras_dis.losses.METHODS)
# The rows trained by default: the paper's, then the package's default loss.
DEFAULT_METHODS = keras_dis.losses.PAPER_METHODS + (
    keras_dis.losses.DEFAULT_METHOD,
)
# The methods that use a subset of `k` classes (one row per `k`).
SUBSET_METHODS = tuple(
    method for method in STUDENT_METHODS if method not in ("hard_labels", "full_kd")
)
TEACHER = "teacher"
NOT_AVAILABLE = "n/a"

_METHOD_TITLES = {
    "full_kd": "distillation",
    "pdbs": "PDBS",
    "uniform": "uniform",
    "ftis": "FTIS",
    "dis": "DIS",
    "teacher_uniform": "teacher+uniform",
    "exact_top_dis": "exact top + DIS tail",
    "exact_top_uniform": "exact top + uniform tail",
    "exact_top_teacher_uniform": "exact top + teacher+uniform tail",
    "top_k": "teacher top-k",
}
_TIMING_COLUMNS = (
    ("train_seconds_per_epoch", "train s/epoch"),
    ("last_layer_seconds_per_epoch", "last layer s/epoch"),
)
# The end of both programs' --help.
EPILOG = """\
Training. Each row is a keras_dis.Distiller fitted on the relabelled data
(the teacher is not run), with the method's keras_dis.DISLoss
(keras_dis.losses.get) and, for DIS, keras_dis.ProposalScheduler.

Timing. "train s/epoch" is the wall-clock time of a training epoch of the
student, validation left out (median over epochs after the first, which
compiles). "last layer s/epoch" is measured after training: a
keras_dis.Distiller whose student is the trained head alone is fitted for
--timing-epochs epochs (after one warm-up epoch) on the student's features of
the training images, with the method's loss and the run's optimizer; so each
step is the head's and the loss's forward pass, the backward pass to the
head's weights and the head's update, with the same batching and per-step
overhead for every method. "last layer / full KD" divides by the full
distillation row of the same run. Small heads are dominated by that per-step
overhead, so expect ratios near 1 there.

The paper picks each method's hyperparameters by grid search; this program
trains each row once with the options given.
"""

_PLOT_COLORS = {
    "pdbs": "tab:orange",
    "uniform": "tab:green",
    "ftis": "tab:purple",
    "dis": "tab:red",
    "teacher_uniform": "tab:olive",
    "exact_top_dis": "tab:brown",
    "exact_top_uniform": "tab:cyan",
    "exact_top_teacher_uniform": "tab:pink",
    "top_k": "black",
    "full_kd": "tab:blue",
    "hard_labels": "tab:gray",
}


def add_common_arguments(parser, full_defaults, smoke_defaults, data_help):
    """Adds the options both programs share to an `argparse` parser.

    The options whose default depends on `--smoke` default to `None` here;
    `resolve_defaults` fills them in after parsing.

    Args:
        parser: an `argparse.ArgumentParser`.
        full_defaults: dict, option destination to its default, with
            `output_dir` among them.
        smoke_defaults: dict, option destination to its default with
            `--smoke` (`output_dir` excepted: a new temporary folder).
        data_help: help of `--data`: what to give and the layout.
    """

    def default(name):
        return (
            f"(default: {_format_default(full_defaults[name])}; "
            f"{_format_default(smoke_defaults[name])} with --smoke)"
        )

    parser.add_argument("--data", help=f"{data_help} Not needed with --smoke.")
    parser.add_argument(
        "--output-dir",
        help="Folder for everything the run writes: the teacher (.keras), "
        "the relabelled data (teacher_targets_*.npy), the results tables "
        "(.txt, .csv) and the plots (.png); created if missing (default: "
        f"{full_defaults['output_dir']}; a new temporary folder with "
        "--smoke).",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="Check the program end to end in well under a minute on a CPU: "
        "writes a tiny generated data set in the official on-disk format "
        "under OUTPUT_DIR/smoke_data, builds narrow and shallow variants of "
        "the models and trains 1 epoch with a small k. The numbers it prints "
        "are not results.",
    )
    parser.add_argument(
        "--teacher",
        metavar="PATH",
        help="A trained teacher saved as .keras (e.g. OUTPUT_DIR/teacher.keras "
        "of an earlier run): skips training the teacher. It must return "
        "logits over the training classes and take raw pixel values (the "
        "teachers this program saves normalise their inputs themselves).",
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        help="Epochs of teacher training, SGD with Nesterov momentum 0.9, "
        "weight decay 5e-4 and a cosine learning-rate decay (our recipe; the "
        f"paper does not give one) {default('teacher_epochs')}.",
    )
    parser.add_argument(
        "--teacher-learning-rate",
        type=float,
        help="Initial learning rate of the teacher "
        f"{default('teacher_learning_rate')}.",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"Epochs of every student {default('epochs')}.",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="Initial learning rate of the students' optimizer "
        f"{default('learning_rate')}.",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="Batch size of the teacher and the students; the paper does not "
        f"give one {default('batch_size')}.",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=STUDENT_METHODS,
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help="Student rows to train, any of: hard_labels (the plain student, "
        "one-hot labels), full_kd (distillation over every class), pdbs "
        "(prediction-difference based selection of k classes), uniform, "
        "ftis (fixed teacher importance sampling), dis (dynamic importance "
        "sampling), and the other estimators of keras_dis.losses.METHODS "
        f"(default: the paper's rows and {keras_dis.losses.DEFAULT_METHOD}, "
        "the estimator of keras_dis.DISLoss()).",
    )
    parser.add_argument(
        "--k",
        nargs="+",
        type=int,
        help="Subset sizes of pdbs, uniform, ftis and dis: one row per value "
        "and method; give several for the accuracy-vs-k plot (paper Fig. 6) "
        f"{default('k')}.",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="Distillation temperature T; the paper does not give it "
        "(default: 1.0).",
    )
    parser.add_argument(
        "--distillation-weight",
        type=float,
        default=1.0,
        help="lambda in lambda * KD + (1 - lambda) * CE(labels) for every "
        "distillation row; the paper uses 1 (default: 1.0).",
    )
    parser.add_argument(
        "--dense-head-updates",
        action="store_true",
        help="Train the head of the uniform, FTIS and DIS rows with the "
        "optimizer's ordinary dense update of every class. By default "
        "keras_dis.Distiller updates only the rows of the classes a step "
        "sampled (lazy Adam/RMSProp: untouched rows keep their weights and "
        "optimizer state), which is what makes those rows cheap; the paper "
        "does not say which it used.",
    )
    parser.add_argument(
        "--top-r",
        type=int,
        help="Keep the teacher's top R classes per image when relabelling; "
        "the other classes share one tail logit (default: every class, "
        "exact).",
    )
    parser.add_argument(
        "--timing-epochs",
        type=int,
        default=1,
        help="Epochs over which the last layer is timed, after one warm-up "
        "epoch (default: 1). See --help of the program for what is timed.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the generated data, the initial weights (the same for "
        "every student row) and the class samplers (default: 0).",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras verbosity of training: 1 progress bars, 2 one line per "
        "epoch, 0 silent (default: 1).",
    )


def check_data_arguments(args, parser):
    """`--data` without `--smoke`, or `--smoke` without `--data`: `--smoke`
    writes its own small data set and would silently ignore `--data`."""
    if args.smoke and args.data:
        parser.error(
            "--smoke writes and trains on its own small data set; it cannot "
            f"be combined with --data. Received: --data {args.data}"
        )
    if not args.smoke and not args.data:
        parser.error("--data is required unless --smoke is given.")


def resolve_defaults(args, full_defaults, smoke_defaults):
    """Fills the options left unset with their full or `--smoke` default."""
    defaults = smoke_defaults if args.smoke else full_defaults
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="keras_dis_smoke_")
    os.makedirs(args.output_dir, exist_ok=True)
    return args


def _format_default(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return str(value)


def method_runs(methods, ks):
    """The student rows to train: `(method, k)` pairs in table order.

    Args:
        methods: method names from `keras_dis.losses.METHODS`.
        ks: subset sizes; each subset method gets one row per size, the
            others (`hard_labels`, `full_kd`) one row with `k=None`.

    Returns:
        A list of `(method, k)`.
    """
    runs = []
    for method in STUDENT_METHODS:
        if method not in methods:
            continue
        if method in SUBSET_METHODS:
            runs.extend((method, k) for k in sorted(set(ks)))
        else:
            runs.append((method, None))
    return runs


def check_subset_sizes(ks, num_classes, parser):
    """Stops with a usage error when a `k` is not in `[1, num_classes)`."""
    bad = [k for k in ks if not 1 <= k < num_classes]
    if bad:
        parser.error(
            f"--k must be between 1 and the number of classes minus one "
            f"({num_classes - 1}). Received: {bad}"
        )


def row_label(method, k, model_name):
    """The name of a row in the paper's tables, e.g. `"DIS (k=10)"`."""
    if method == TEACHER:
        return f"teacher ({model_name})"
    if method == "hard_labels":
        return f"student ({model_name})"
    title = _METHOD_TITLES[method]
    return title if k is None else f"{title} (k={k})"


def channel_statistics(images, chunk_size=1024):
    """Per-channel mean and variance of `uint8` images `(N, H, W, 3)`.

    Accumulated in float64 over chunks, so that no float copy of the data
    set is made.
    """
    total = np.zeros(images.shape[-1])
    total_squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk_size):
        chunk = images[start : start + chunk_size].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_squares += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.size // images.shape[-1]
    mean = total / count
    variance = np.maximum(total_squares / count - np.square(mean), 1e-6)
    return mean.tolist(), variance.tolist()


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled training batches with random flips and shifts, in NumPy.

    Every epoch visits the images in a new random order. Each image is
    flipped left to right with probability 1/2 and, when `max_shift > 0`,
    shifted by up to `max_shift` pixels along each axis with zero (black)
    padding: the pad-and-crop augmentation of He et al. (2016). It runs on
    the host, so it is the same on every backend and the saved teacher
    holds no random layers.

    Args:
        images: array `(N, H, W, C)`.
        labels: array `(N,)`.
        batch_size: int.
        max_shift: int >= 0, the largest shift in pixels.
        seed: seed of the order, flips and shifts.
        **kwargs: `keras.utils.PyDataset` arguments.
    """

    def __init__(
        self, images, labels, batch_size, max_shift=0, seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.max_shift = max_shift
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(images))

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index):
        batch = self._order[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
        images = self.images[batch]
        flipped = self._rng.random(len(batch)) < 0.5
        images = np.where(
            flipped[:, None, None, None], images[:, :, ::-1], images
        )
        if self.max_shift:
            shift = self.max_shift
            height, width = images.shape[1:3]
            padded = np.pad(
                images, ((0, 0), (shift, shift), (shift, shift), (0, 0))
            )
            offsets = self._rng.integers(0, 2 * shift + 1, size=(len(batch), 2))
            images = np.stack(
                [
                    padded[i, top : top + height, left : left + width]
                    for i, (top, left) in enumerate(offsets)
                ]
            )
        return images, self.labels[batch]

    def on_epoch_end(self):
        self._order = self._rng.permutation(len(self.images))


def train_or_load_teacher(args, build_teacher, train_batches, validation_data):
    """Loads the `--teacher` model, or trains a new teacher and saves it.

    A new teacher is trained with cross-entropy on the labels for
    `args.teacher_epochs`, by SGD with Nesterov momentum 0.9, decoupled
    weight decay 5e-4 and a cosine decay of the learning rate from
    `args.teacher_learning_rate` to 0, then saved as
    `args.output_dir/teacher.keras`.

    Args:
        args: the parsed options.
        build_teacher: function returning a new teacher `keras.Model`
            (logits out).
        train_batches: an `AugmentedBatches` of the training images and
            labels.
        validation_data: `(images, labels)`, reported during training.

    Returns:
        The teacher `keras.Model`.
    """
    if args.teacher:
        print(f"Loading the teacher from {args.teacher}")
        return keras.saving.load_model(args.teacher)
    teacher = build_teacher()
    teacher.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=keras.optimizers.schedules.CosineDecay(
                args.teacher_learning_rate,
                decay_steps=args.teacher_epochs * len(train_batches),
            ),
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(
        f"Training the teacher {teacher.name} for {args.teacher_epochs} epochs"
    )
    teacher.fit(
        train_batches,
        epochs=args.teacher_epochs,
        validation_data=validation_data,
        verbose=args.verbose,
    )
    path = os.path.join(args.output_dir, "teacher.keras")
    teacher.save(path)
    print(f"Saved the teacher to {path}")
    return teacher


def relabel(teacher, images, labels, *, top_r, batch_size, path):
    """Relabels a data set with the teacher, once, as the paper does.

    Runs `teacher.predict` and packs the labels with the teacher's ranking
    (`keras_dis.pack_teacher_targets`), then saves the packed array with
    `np.save`.

    Returns:
        float32 array `(N, 2 + 2R)`, the packed teacher targets.
    """
    teacher_logits = teacher.predict(images, batch_size=batch_size, verbose=0)
    targets = keras.ops.convert_to_numpy(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=top_r)
    )
    np.save(path, targets)
    return targets


def teacher_and_targets(
    args,
    build_teacher,
    train_data,
    validation_data,
    *,
    max_shift,
    validation_name,
):
    """The teacher (trained or loaded) and the data sets it relabelled.

    Args:
        args: the parsed options.
        build_teacher: function returning a new teacher.
        train_data: `(images, labels)` to train on.
        validation_data: `(images, labels)` held out.
        max_shift: the teacher's shift augmentation, see `AugmentedBatches`.
        validation_name: name of the held-out set in the file
            `teacher_targets_<name>.npy`.

    Returns:
        `(teacher, train_targets, validation_targets)`, the targets packed
        (and saved in `args.output_dir`).
    """
    teacher = train_or_load_teacher(
        args,
        build_teacher,
        AugmentedBatches(
            *train_data, args.batch_size, max_shift=max_shift, seed=args.seed
        ),
        validation_data,
    )
    targets = [
        relabel(
            teacher,
            *data,
            top_r=args.top_r,
            batch_size=args.batch_size,
            path=os.path.join(args.output_dir, f"teacher_targets_{name}.npy"),
        )
        for data, name in (
            (train_data, "train"),
            (validation_data, validation_name),
        )
    ]
    return teacher, *targets


def head_of(model):
    """The `keras_dis.SampledDistillationHead` that is `model`'s output."""
    head = model.layers[-1]
    if not isinstance(head, keras_dis.SampledDistillationHead):
        raise ValueError(
            "The student's last layer must be a "
            f"keras_dis.SampledDistillationHead. Received: {head!r}"
        )
    return head


def feature_extractor(model):
    """A model from `model`'s input to the input of its last layer.

    For the students these are the features the head sees; for a
    classifier teacher, the features its last dense layer sees.
    """
    return keras.Model(model.inputs, model.layers[-1].input)


def top1_accuracy(model, images, labels, batch_size):
    """Top-1 accuracy, a fraction, of a model returning logits."""
    logits = model.predict(images, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock seconds of every training epoch.

    The validation pass that `fit` runs at the end of an epoch is left out.
    The optimizer's step counter is read before the clock stops, which waits
    for the backend to finish the epoch's last step (JAX, and TensorFlow and
    PyTorch on GPUs, dispatch asynchronously).
    """

    def __init__(self):
        super().__init__()
        self.epoch_seconds = []
        self._start = None
        self._validation_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._validation_start = None

    def _now(self):
        keras.ops.convert_to_numpy(self.model.optimizer.iterations)
        return time.perf_counter()

    def on_test_begin(self, logs=None):
        if self._start is not None:
            self._validation_start = self._now()

    def on_epoch_end(self, epoch, logs=None):
        end = self._validation_start or self._now()
        self.epoch_seconds.append(end - self._start)
        self._start = None

    def seconds_per_epoch(self):
        """Median epoch time, leaving out the first epoch (which traces and
        compiles) whenever there is more than one."""
        timed = self.epoch_seconds[1:] or self.epoch_seconds
        return statistics.median(timed)


def time_last_layer(
    teacher,
    student,
    features,
    targets,
    loss,
    optimizer,
    *,
    row_sparse_updates,
    batch_size,
    epochs,
):
    """Seconds per epoch spent in the student's last layer, for one method.

    Trains a `keras_dis.Distiller` whose student is the trained student's
    head alone, on the features the student computes for the training set,
    with the method's loss and a fresh optimizer of the run's kind, as the
    run trained the student (the teacher is not run: the targets are
    packed). Each step is then the forward pass of the head and the loss,
    their backward pass to the head's weights and the head's optimizer
    update, with the same batching, shuffling and Keras step overhead for
    every method. One warm-up epoch (tracing, compilation) is run first and
    left out. The head's weights change; time after evaluating.

    Args:
        teacher: the teacher (for the distiller's checks; never run).
        student: the trained student.
        features: array `(N, d)`, the student's features of the training
            images.
        targets: packed teacher targets `(N, 2 + 2R)`.
        loss: the method's `keras_dis.DISLoss`.
        optimizer: a new optimizer like the run's.
        row_sparse_updates: as for `keras_dis.Distiller`.
        batch_size: int.
        epochs: int, timed epochs.

    Returns:
        The median seconds of a timed epoch.
    """
    head = head_of(student)
    inputs = keras.Input((features.shape[-1],))
    head_distiller = keras_dis.Distiller(
        teacher,
        keras.Model(inputs, head(inputs)),
        row_sparse_updates=row_sparse_updates,
    )
    head_distiller.compile(optimizer=optimizer, loss=loss)
    timer = EpochTimer()
    head_distiller.fit(
        features,
        targets,
        batch_size=batch_size,
        epochs=epochs + 1,
        callbacks=[timer],
        verbose=0,
    )
    return timer.seconds_per_epoch()


# Validation examples the `DistillationMonitor` of each student measures.
MONITOR_PROBE_SIZE = 256


def train_students(
    args,
    teacher,
    build_student,
    build_optimizer,
    evaluate,
    train_data,
    validation_data,
):
    """Trains one student per row with `keras_dis.Distiller` and measures it.

    One row per `method_runs(args.methods, args.k)`. Every student starts
    from the same initial weights (the seed is reset before each) and learns
    from the same relabelled data, so the teacher is not run during
    training. DIS rows anneal their proposal with
    `keras_dis.ProposalScheduler`. A `keras_dis.DistillationMonitor` on the
    first `MONITOR_PROBE_SIZE` validation examples measures each student at
    every epoch's end, and `keras_dis.plot_monitor` saves its curves to
    `OUTPUT_DIR/monitor_<method>[_k<k>].png`.

    Args:
        args: the parsed options (epochs, batch size, temperature, ...).
        teacher: the teacher `keras.Model`.
        build_student: function returning a new student whose output layer
            is a `keras_dis.SampledDistillationHead`.
        build_optimizer: function returning a new optimizer.
        evaluate: function `(student) -> dict` of metrics (fractions).
        train_data: `(images, packed_teacher_targets)`.
        validation_data: `(images, packed_teacher_targets)`; the progress
            bar shows its exact full-softmax loss as `val_loss`.

    Returns:
        A list of rows (see the module docstring), without labels.
    """
    images, targets = train_data
    row_sparse_updates = not args.dense_head_updates
    rows = []
    for method, k in method_runs(args.methods, args.k):
        keras.utils.set_random_seed(args.seed)
        student = build_student()
        loss_arguments = {"k": k or 1, "temperature": args.temperature}
        if method != "hard_labels":
            loss_arguments["distillation_weight"] = args.distillation_weight
        distiller = keras_dis.Distiller(
            teacher, student, row_sparse_updates=row_sparse_updates
        )
        distiller.compile(
            optimizer=build_optimizer(),
            loss=keras_dis.losses.get(method, **loss_arguments),
        )
        timer = EpochTimer()
        # The exact loss, agreement and estimator quality on a probe of the
        # validation data, at every epoch's end (after the timer's epoch).
        monitor = keras_dis.DistillationMonitor(
            validation_data[0][:MONITOR_PROBE_SIZE],
            validation_data[1][:MONITOR_PROBE_SIZE],
            batch_size=args.batch_size,
        )
        callbacks = [timer, monitor]
        if method == "dis":
            callbacks.insert(0, keras_dis.ProposalScheduler())
        print(
            f"Training {student.name} with {method}"
            + ("" if k is None else f" (k={k})")
        )
        distiller.fit(
            images,
            targets,
            batch_size=args.batch_size,
            epochs=args.epochs,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=args.verbose,
        )
        keras_dis.plot_monitor(
            monitor,
            path=os.path.join(
                args.output_dir,
                f"monitor_{method}" + ("" if k is None else f"_k{k}") + ".png",
            ),
            title=f"{student.name}, {row_label(method, k, 'hard labels')}",
        )
        # Before timing, which calls the head on a second input.
        metrics = evaluate(student)
        features = feature_extractor(student).predict(
            images, batch_size=args.batch_size, verbose=0
        )
        last_layer_seconds = time_last_layer(
            teacher,
            student,
            features,
            targets,
            keras_dis.losses.get(method, **loss_arguments),
            build_optimizer(),
            row_sparse_updates=row_sparse_updates,
            batch_size=args.batch_size,
            epochs=args.timing_epochs,
        )
        rows.append(
            {
                "method": method,
                "k": k,
                **metrics,
                "train_seconds_per_epoch": timer.seconds_per_epoch(),
                "last_layer_seconds_per_epoch": last_layer_seconds,
            }
        )
    return rows


def run_table(
    args,
    teacher,
    teacher_metrics,
    build_student,
    build_optimizer,
    evaluate,
    train_data,
    validation_data,
    *,
    student_name,
    paper_numbers,
    name,
    title,
    metrics,
    plot_metrics,
    note=None,
):
    """Trains the students of one table of the paper and writes the table.

    Args:
        args: the parsed options.
        teacher: the teacher.
        teacher_metrics: dict, the teacher's metrics (its row).
        build_student, build_optimizer, evaluate, train_data,
            validation_data: see `train_students`.
        student_name: the student's name in the table, e.g. `"LeNet"`.
        paper_numbers: see `add_paper_numbers`.
        name, title, metrics, plot_metrics, note: see `write_results`; with
            `--smoke`, the title says that the numbers are not results.

    Returns:
        The rows of the table, the teacher first.
    """
    rows = [{"method": TEACHER, "k": None, **teacher_metrics}]
    rows += train_students(
        args,
        teacher,
        build_student,
        build_optimizer,
        evaluate,
        train_data,
        validation_data,
    )
    for row in rows:
        model_name = teacher.name if row["method"] == TEACHER else student_name
        row["label"] = row_label(row["method"], row["k"], model_name)
    add_paper_numbers(rows, paper_numbers, [key for key, _ in metrics])
    if args.smoke:
        title = (
            "SMOKE RUN (generated data, tiny models, 1 epoch): NOT results. "
            + title
        )
    write_results(
        rows,
        output_dir=args.output_dir,
        name=name,
        title=f"{title} ({keras.backend.backend()} backend)",
        metrics=metrics,
        plot_metrics=plot_metrics,
        paper_numbers=paper_numbers,
        note=note,
    )
    return rows


def add_paper_numbers(rows, paper_numbers, metrics):
    """Sets `paper_<metric>` of every row from the paper's table.

    Args:
        rows: results rows.
        paper_numbers: dict `(method, k) -> {metric: fraction}`; a row or
            metric that the paper does not report gets `None` ("n/a").
        metrics: metric names.
    """
    for row in rows:
        reported = paper_numbers.get((row["method"], row["k"]), {})
        for metric in metrics:
            row[f"paper_{metric}"] = reported.get(metric)
    return rows


def format_table(rows, metrics, title):
    """The results in the layout of the paper's tables, as text.

    One line per row, the paper's row names; our metrics, the paper's, the
    time per training epoch, the time per epoch in the last layer and its
    ratio to full distillation measured in the same run.

    Args:
        rows: results rows with labels.
        metrics: list of `(key, header)` of the metrics to show.
        title: first line of the table.
    """
    full_kd_time = next(
        (
            row["last_layer_seconds_per_epoch"]
            for row in rows
            if row["method"] == "full_kd"
        ),
        None,
    )
    headers = ["Methods"]
    headers += [header for _, header in metrics]
    headers += [f"paper {header}" for _, header in metrics]
    headers += [header for _, header in _TIMING_COLUMNS]
    headers.append("last layer / full KD")
    lines = []
    for row in rows:
        cells = [row["label"]]
        cells += [_percent(row.get(key)) for key, _ in metrics]
        cells += [_percent(row.get(f"paper_{key}")) for key, _ in metrics]
        cells += [_seconds(row.get(key)) for key, _ in _TIMING_COLUMNS]
        last_layer = row.get("last_layer_seconds_per_epoch")
        cells.append(
            f"{last_layer / full_kd_time:.2f}"
            if last_layer is not None and full_kd_time
            else NOT_AVAILABLE
        )
        lines.append(cells)
    widths = [
        max(len(line[column]) for line in [headers] + lines)
        for column in range(len(headers))
    ]

    def join(cells):
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        )

    rule = "-" * len(join(headers))
    return "\n".join(
        [title, rule, join(headers), rule]
        + [join(line) for line in lines]
        + [rule]
    )


def _percent(value):
    return NOT_AVAILABLE if value is None else f"{100 * value:.2f}%"


def _seconds(value):
    return NOT_AVAILABLE if value is None else f"{value:.3f}"


def read_csv(path):
    """The rows of a results CSV written by `write_csv`, as dicts of strings."""
    with open(path, newline="") as csv_file:
        return list(csv.DictReader(csv_file))


def write_csv(rows, path, metrics):
    """Writes the rows as CSV; missing numbers are written `n/a`.

    Columns: `method`, `k`, `label`, each metric and its `paper_` number
    (fractions), `train_seconds_per_epoch`, `last_layer_seconds_per_epoch`.
    """
    columns = ["method", "k", "label"]
    columns += [key for key, _ in metrics]
    columns += [f"paper_{key}" for key, _ in metrics]
    columns += [key for key, _ in _TIMING_COLUMNS]
    with open(path, "w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    column: (
                        NOT_AVAILABLE
                        if row.get(column) is None and column != "k"
                        else ("" if row.get(column) is None else row[column])
                    )
                    for column in columns
                }
            )


def plot_accuracy_vs_k(rows, path, metric, metric_name, title, paper_numbers=None):
    """Paper Fig. 6: the metric of each subset method against `k`.

    Full distillation and the plain student do not depend on `k` and are
    drawn as horizontal lines. The paper's numbers for the metric, when
    given, are drawn beside ours as hollow squares (subset methods, at the
    paper's `k`) and dotted lines.

    Returns:
        The matplotlib `Figure` (closed).
    """
    paper_numbers = paper_numbers or {}
    figure, axes = _new_axes()
    for method in STUDENT_METHODS:
        method_rows = sorted(
            (row for row in rows if row["method"] == method),
            key=lambda row: row["k"] or 0,
        )
        if not method_rows:
            continue
        name = row_label(method, None, "hard labels")
        color = _PLOT_COLORS[method]
        values = [100 * row[metric] for row in method_rows]
        paper = sorted(
            (k, 100 * numbers[metric])
            for (paper_method, k), numbers in paper_numbers.items()
            if paper_method == method and numbers.get(metric) is not None
        )
        if method in SUBSET_METHODS:
            axes.plot([row["k"] for row in method_rows], values, marker="o",
                      color=color, label=name)
            if paper:
                axes.scatter([k for k, _ in paper], [v for _, v in paper],
                             marker="s", facecolors="none", edgecolors=color,
                             s=50, label=f"{name}, paper")
        else:
            axes.axhline(values[0], linestyle="--", color=color, label=name)
            if paper:
                axes.axhline(paper[0][1], linestyle=":", color=color,
                             label=f"{name}, paper")
    axes.set_xlabel("subset size k")
    axes.set_ylabel(f"{metric_name} (%)")
    _save(figure, axes, path, title)
    return figure


def plot_accuracy_vs_time(rows, path, metric, metric_name, title):
    """Paper Fig. 7: the metric of every row against its last-layer time.

    One colour and legend entry per method; each point is labelled, and
    labels that would overlap are moved up until they do not.

    Returns:
        The matplotlib `Figure` (closed).
    """
    figure, axes = _new_axes()
    points = []
    for row in rows:
        if row["method"] == TEACHER:
            continue
        x = row["last_layer_seconds_per_epoch"]
        y = 100 * row[metric]
        name = row_label(row["method"], None, "hard labels")
        labelled = name in axes.get_legend_handles_labels()[1]
        axes.scatter([x], [y], color=_PLOT_COLORS[row["method"]],
                     label=None if labelled else name)
        points.append((x, y, row["label"]))
    axes.set_xlabel("time in the last layer per epoch (s)")
    axes.set_ylabel(f"{metric_name} (%)")
    figure.canvas.draw()  # fixes the axes' limits for the label layout
    for (x, y, label), offset in zip(points, _label_offsets(axes, points)):
        axes.annotate(label, (x, y), textcoords="offset points",
                      xytext=(4, offset), fontsize=7)
    _save(figure, axes, path, title)
    return figure


def _label_offsets(axes, points, height=9.0, width=70.0):
    """Vertical offsets (in points) of the labels of `points` so that no two
    labels within `width` points of each other horizontally are closer than
    `height` points vertically: labels are placed bottom to top, each moved
    up past the ones already placed."""
    scale = axes.figure.dpi / 72.0
    display = axes.transData.transform([(x, y) for x, y, _ in points]) / scale
    order = sorted(range(len(points)), key=lambda i: display[i][1])
    placed = []
    offsets = [4.0] * len(points)
    for i in order:
        x, y = display[i]
        label_y = y + 4.0
        for other_x, other_y in sorted(placed, key=lambda p: p[1]):
            if abs(other_x - x) < width and abs(other_y - label_y) < height:
                label_y = other_y + height
        placed.append((x, label_y))
        offsets[i] = label_y - y
    return offsets


def _new_axes():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(6.4, 4.8))


def _save(figure, axes, path, title):
    from matplotlib import pyplot

    axes.set_title(textwrap.fill(title, 70), fontsize=9)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_results(
    rows, *, output_dir, name, title, metrics, plot_metrics, paper_numbers=None,
    note=None,
):
    """Prints the table and writes `<name>.txt`, `<name>.csv` and the plots.

    Args:
        rows: results rows with labels, the teacher first.
        output_dir: folder to write into.
        name: file name stem, e.g. `"table1_shallow_cnn"`.
        title: table title (and plot titles).
        metrics: list of `(key, header)` of the metrics.
        plot_metrics: list of `(key, name)`, the metrics to plot, each on
            the y axis of its own pair of plots.
        paper_numbers: optional dict `(method, k) -> {metric: fraction}`,
            drawn beside ours on the plots against `k`.
        note: optional line printed under the table.

    Returns:
        The paths written, a dict with keys `"table"`, `"csv"`, and
        `"<metric>_vs_k"` and `"<metric>_vs_time"` per plotted metric. The
        plots of `accuracy` are `<name>_accuracy_vs_k.png` and
        `<name>_accuracy_vs_last_layer_time.png`, likewise for the others.
    """
    table = format_table(rows, metrics, title)
    if note:
        table += "\n" + note
    print(table)
    paths = {
        "table": os.path.join(output_dir, f"{name}.txt"),
        "csv": os.path.join(output_dir, f"{name}.csv"),
    }
    with open(paths["table"], "w") as table_file:
        table_file.write(table + "\n")
    write_csv(rows, paths["csv"], metrics)
    student_rows = [row for row in rows if row["method"] != TEACHER]
    for key, metric_name in plot_metrics:
        paths[f"{key}_vs_k"] = os.path.join(output_dir, f"{name}_{key}_vs_k.png")
        paths[f"{key}_vs_time"] = os.path.join(
            output_dir, f"{name}_{key}_vs_last_layer_time.png"
        )
        plot_accuracy_vs_k(student_rows, paths[f"{key}_vs_k"], key, metric_name,
                           title=title, paper_numbers=paper_numbers)
        plot_accuracy_vs_time(student_rows, paths[f"{key}_vs_time"], key,
                              metric_name, title=title)
    print("Wrote " + ", ".join(paths.values()))
    return paths


def new_parser(prog, description, epilog):
    """An `argparse` parser that keeps the line breaks of its texts."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
