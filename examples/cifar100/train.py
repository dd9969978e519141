"""Tables 1 and 2 of the DIS paper: distilling ResNet32 on CIFAR-100.

Run `python -m examples.cifar100.train --help` for the options, and
`python -m examples.cifar100.train --smoke` for a check in under a minute.
"""

import functools
import os
import sys

import keras

from examples import common
from examples.cifar100 import models
from examples.cifar100.data import NUM_FINE_CLASSES
from examples.cifar100.data import load_cifar100
from examples.cifar100.data import write_cifar100_archive

# Top-1 accuracies of Tables 1 and 2 of the paper, by (method, k).
_TEACHER_ACCURACY = {("teacher", None): {"accuracy": 0.6942}}
PAPER_NUMBERS = {
    "shallow_cnn": {
        **_TEACHER_ACCURACY,
        ("hard_labels", None): {"accuracy": 0.3739},
        ("full_kd", None): {"accuracy": 0.4428},
        ("pdbs", 10): {"accuracy": 0.4461},
        ("uniform", 10): {"accuracy": 0.4279},
        ("ftis", 10): {"accuracy": 0.4484},
        ("dis", 10): {"accuracy": 0.4516},
    },
    "lenet": {
        **_TEACHER_ACCURACY,
        ("hard_labels", None): {"accuracy": 0.3963},
        ("full_kd", None): {"accuracy": 0.4635},
        ("pdbs", 10): {"accuracy": 0.4690},
        ("uniform", 10): {"accuracy": 0.4627},
        ("ftis", 10): {"accuracy": 0.4648},
        ("dis", 10): {"accuracy": 0.4730},
    },
}
# Student name: (table of the paper, name in the table, results file stem).
STUDENTS = {
    "shallow_cnn": ("Table 1", "shallow CNN", "table1_shallow_cnn"),
    "lenet": ("Table 2", "LeNet", "table2_lenet"),
}
METRICS = [("accuracy", "Accuracy")]

FULL_DEFAULTS = {
    "output_dir": os.path.join("results", "cifar100"),
    "teacher_epochs": 160,
    "teacher_learning_rate": 0.1,
    "epochs": 30,
    "learning_rate": 0.01,
    "batch_size": 128,
    "k": [10],
}
SMOKE_DEFAULTS = {
    "teacher_epochs": 1,
    "teacher_learning_rate": 0.05,
    "epochs": 1,
    "learning_rate": 0.01,
    "batch_size": 128,
    "k": [5],
}
# Multiples of the smoke batch size: a smaller last batch would be compiled
# again (JAX, TensorFlow), which takes longer than the smoke run's training.
SMOKE_NUM_TRAIN = 512
SMOKE_NUM_TEST = 256

_DESCRIPTION = """\
Reproduces Tables 1 and 2 of "Accelerating Large Scale Knowledge Distillation
via Dynamic Importance Sampling" (Li et al., 2018) on CIFAR-100.

1. Trains the teacher, a CIFAR ResNet32 (3 stages x 5 basic blocks, 16/32/64
   filters) with random flips and shifts of up to 4 pixels, or loads one
   (--teacher).
2. Relabels the training and test sets with it once (keras_dis.
   pack_teacher_targets), saved as OUTPUT_DIR/teacher_targets_{train,test}.npy.
3. Trains each student (the paper's shallow CNN: Table 1; LeNet: Table 2)
   once per method: hard labels, full distillation, and PDBS, uniform, FTIS
   and DIS for every --k, with Adam (learning rate 0.01, beta_1 0.9,
   beta_2 0.99) for 30 epochs, as the paper does. Every row starts from the
   same initial weights.
4. Prints each table in the paper's layout with the paper's numbers beside
   ours (n/a where the paper has none), and writes OUTPUT_DIR/<table>.txt,
   <table>.csv, <table>_accuracy_vs_k.png (paper Fig. 6) and
   <table>_accuracy_vs_last_layer_time.png (paper Fig. 7).
"""

_EPILOG = "Accuracy is top-1 on the 10,000 test images.\n\n" + common.EPILOG


def build_parser():
    parser = common.new_parser(
        "python -m examples.cifar100.train", _DESCRIPTION, _EPILOG
    )
    common.add_common_arguments(
        parser,
        FULL_DEFAULTS,
        SMOKE_DEFAULTS,
        data_help="cifar-100-python.tar.gz (the official archive) or the "
        "cifar-100-python/ folder extracted from it (default: download it "
        "with keras.datasets.cifar100).",
    )
    parser.add_argument(
        "--students",
        nargs="+",
        choices=tuple(STUDENTS),
        default=list(STUDENTS),
        help="Students to train: shallow_cnn (Table 1), lenet (Table 2) "
        "(default: both).",
    )
    return parser


def main(argv=None):
    """Runs the program; returns `{table file stem: results rows}`."""
    parser = build_parser()
    args = common.resolve_defaults(
        parser.parse_args(argv), FULL_DEFAULTS, SMOKE_DEFAULTS
    )
    common.check_data_arguments(args, parser)
    common.check_subset_sizes(args.k, NUM_FINE_CLASSES, parser)
    keras.utils.set_random_seed(args.seed)

    data_path = args.data
    if args.smoke:
        smoke_folder = os.path.join(args.output_dir, "smoke_data")
        os.makedirs(smoke_folder, exist_ok=True)
        data_path = write_cifar100_archive(
            os.path.join(smoke_folder, "cifar-100-python.tar.gz"),
            num_train=SMOKE_NUM_TRAIN,
            num_test=SMOKE_NUM_TEST,
            seed=args.seed,
        )
    (x_train, y_train), (x_test, y_test) = load_cifar100(data_path)
    mean, variance = common.channel_statistics(x_train)

    if args.smoke:
        build_teacher = functools.partial(
            models.resnet32, filters=(4, 8, 16), blocks_per_stage=1
        )
        student_builders = {
            "shallow_cnn": functools.partial(
                models.shallow_cnn,
                conv_filters=8,
                bottleneck_units=32,
                hidden_units=64,
            ),
            "lenet": models.lenet,
        }
    else:
        build_teacher = models.resnet32
        student_builders = {
            "shallow_cnn": models.shallow_cnn,
            "lenet": models.lenet,
        }
    teacher, train_targets, test_targets = common.teacher_and_targets(
        args,
        lambda: build_teacher(NUM_FINE_CLASSES, mean, variance),
        (x_train, y_train),
        (x_test, y_test),
        max_shift=4,
        validation_name="test",
    )

    def evaluate(model):
        return {
            "accuracy": common.top1_accuracy(
                model, x_test, y_test, args.batch_size
            )
        }

    teacher_metrics = evaluate(teacher)
    results = {}
    for student in args.students:
        table, student_name, stem = STUDENTS[student]
        results[stem] = common.run_table(
            args,
            teacher,
            teacher_metrics,
            functools.partial(
                student_builders[student],
                NUM_FINE_CLASSES,
                mean,
                variance,
                seed=args.seed,
            ),
            lambda: keras.optimizers.Adam(
                learning_rate=args.learning_rate, beta_1=0.9, beta_2=0.99
            ),
            evaluate,
            (x_train, train_targets),
            (x_test, test_targets),
            student_name=student_name,
            paper_numbers=PAPER_NUMBERS[student],
            name=stem,
            title=f"{table}: top-1 accuracy of the {student_name} on CIFAR-100",
            metrics=METRICS,
            plot_metrics=[("accuracy", "top-1 accuracy")],
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
