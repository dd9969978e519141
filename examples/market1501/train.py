"""Table 3 of the DIS paper: distilling ResNet152 into ResNet18 on Market-1501.

Run `python -m examples.market1501.train --help` for the options, and
`python -m examples.market1501.train --smoke` for a check in under a minute.
"""

import functools
import os
import sys

import keras
import numpy as np

from examples import common
from examples.market1501 import models
from examples.market1501.data import IMAGE_SIZE
from examples.market1501.data import load_market1501
from examples.market1501.data import load_market1501_images
from examples.market1501.data import write_market1501_folder
from examples.market1501.evaluation import AP_FORMULAS
from examples.market1501.evaluation import evaluate_ranking

# Table 3 of the paper, by (method, k). It reports no rank-1.
PAPER_NUMBERS = {
    ("teacher", None): {"mAP": 0.637, "accuracy": 0.842},
    ("hard_labels", None): {"mAP": 0.555, "accuracy": 0.793},
    ("full_kd", None): {"mAP": 0.617, "accuracy": 0.826},
    ("pdbs", 20): {"mAP": 0.595, "accuracy": 0.819},
    ("pdbs", 120): {"mAP": 0.620, "accuracy": 0.827},
    ("uniform", 20): {"mAP": 0.528, "accuracy": 0.739},
    ("uniform", 120): {"mAP": 0.595, "accuracy": 0.798},
    ("ftis", 20): {"mAP": 0.521, "accuracy": 0.779},
    ("ftis", 120): {"mAP": 0.593, "accuracy": 0.821},
    ("dis", 20): {"mAP": 0.589, "accuracy": 0.796},
    ("dis", 120): {"mAP": 0.612, "accuracy": 0.819},
}
METRICS = [("mAP", "meanAP"), ("rank1", "rank-1"), ("accuracy", "Accuracy")]
PAPER_LAST_LAYER_NOTE = (
    'The paper reports "the time of computing the last softmax activation '
    'per iteration" falling from 60.68 s (distillation) to 46.01 s (DIS) on '
    "a Tesla M60 GPU; compare the ratio column, not the seconds."
)

FULL_DEFAULTS = {
    "output_dir": os.path.join("results", "market1501"),
    "teacher_epochs": 60,
    "teacher_learning_rate": 0.05,
    "epochs": 180,
    "learning_rate": 0.01,
    "batch_size": 64,
    "k": [20, 120],
    "image_size": list(IMAGE_SIZE),
}
SMOKE_DEFAULTS = {
    "teacher_epochs": 1,
    "teacher_learning_rate": 0.01,
    "epochs": 1,
    "learning_rate": 0.001,
    "batch_size": 30,
    "k": [3],
    "image_size": [64, 32],
}
# 12 identities of 6 images, one of each held out: 60 training images, two
# smoke batches of 30 (a smaller last batch would be compiled again).
SMOKE_NUM_IDS = 12
SMOKE_IMAGES_PER_ID = 6

_DESCRIPTION = """\
Reproduces Table 3 of "Accelerating Large Scale Knowledge Distillation via
Dynamic Importance Sampling" (Li et al., 2018) on Market-1501, and its Fig. 7.

1. Trains the teacher, ResNet152 (keras-cv ResNetBackbone, v1, built from its
   configuration: random initialisation, or --teacher-weights) with global
   average pooling and a dense classifier over the 751 training identities,
   with random horizontal flips; or loads one (--teacher).
2. Relabels the training images with it once (keras_dis.pack_teacher_targets),
   saved as OUTPUT_DIR/teacher_targets_{train,holdout}.npy.
3. Trains the student, ResNet18 (random initialisation or --student-weights),
   global pooling, dropout and keras_dis.SampledDistillationHead, once per
   method: hard labels, full distillation, and PDBS, uniform, FTIS and DIS
   for every --k, with RMSProp (learning rate 0.01, momentum 0.9) for 180
   epochs and no augmentation, as the paper does. Every row starts from the
   same initial weights.
4. Prints Table 3 with the paper's numbers beside ours (n/a where the paper
   has none) and writes OUTPUT_DIR/table3_resnet18.txt, .csv, and for
   meanAP, rank-1 and top-1 accuracy (METRIC = mAP, rank1, accuracy)
   table3_resnet18_METRIC_vs_k.png (as paper Fig. 6, the paper's numbers
   as hollow squares and dotted lines) and
   table3_resnet18_METRIC_vs_last_layer_time.png (paper Fig. 7).
"""

_EPILOG = (
    """\
Metrics. meanAP and rank-1 follow the Market-1501 protocol (query against
gallery, junk images and same-camera matches removed; examples/market1501/
evaluation.py) on the pooled features (the input of the last layer) compared
by Euclidean distance; --ap-formula picks the average precision. Accuracy is
top-1 identity classification on a held-out part of the training images
(--holdout-fraction of each identity's images, never trained on by teacher or
student): the test identities differ from the training ones, so the paper's
"Accuracy" cannot be measured on the test set, and the paper does not say
which images it used.

"""
    + common.EPILOG
)


def build_parser():
    parser = common.new_parser(
        "python -m examples.market1501.train", _DESCRIPTION, _EPILOG
    )
    common.add_common_arguments(
        parser,
        FULL_DEFAULTS,
        SMOKE_DEFAULTS,
        data_help="The Market-1501 folder (e.g. Market-1501-v15.09.15/) "
        "holding bounding_box_train/, bounding_box_test/ and query/; "
        "required.",
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("HEIGHT", "WIDTH"),
        help="Size the images are resized to (default: 128 64, the size of "
        "the Market-1501 images; 64 32 with --smoke).",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.1,
        help="Fraction of each training identity's images held out from "
        "training (at least one image of every identity with two or more) "
        "to measure the classification accuracy (default: 0.1).",
    )
    parser.add_argument(
        "--ap-formula",
        choices=AP_FORMULAS,
        default="average_precision",
        help="Average precision of the meanAP: average_precision, the mean "
        "precision at each correct match (open-source re-ID toolkits: "
        "torchreid, open-reid), or trapezoid, the official Market-1501 MATLAB "
        "toolkit's (default: average_precision).",
    )
    parser.add_argument(
        "--teacher-weights",
        metavar="PATH",
        help="Initial weights of the teacher's backbone: a .weights.h5 file "
        "saved from a keras_cv.models.ResNetBackbone with the ResNet152 "
        "configuration (default: random initialisation).",
    )
    parser.add_argument(
        "--student-weights",
        metavar="PATH",
        help="Initial weights of every student's backbone: a .weights.h5 "
        "file saved from a keras_cv.models.ResNetBackbone with the ResNet18 "
        "configuration (default: random initialisation).",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.5,
        help="Dropout rate on the student's pooled features; the paper "
        "trains its student with dropout without giving the rate. Used for "
        "every student row, so that they share one architecture "
        "(default: 0.5).",
    )
    return parser


def holdout_split(labels, fraction, seed):
    """Splits training images into training and held-out ones, per identity.

    Holds out `round(fraction * n)` of the `n` images of each identity, at
    least one and at most `n - 1` (an identity with a single image stays in
    training).

    Returns:
        `(train_indices, holdout_indices)`, sorted int arrays.
    """
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        count = min(len(indices) - 1, max(1, round(fraction * len(indices))))
        held_out.extend(rng.choice(indices, size=count, replace=False))
    is_held_out = np.zeros(len(labels), dtype=bool)
    is_held_out[np.asarray(held_out, dtype=np.int64)] = True
    return np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)


def euclidean_distances(query_features, gallery_features):
    """Pairwise Euclidean distances `(num_queries, num_gallery)`, float64.

    Finite features give finite distances: both sets are divided by their
    largest magnitude before squaring (features around `1e20` overflow
    float32's squares to infinity, and `inf - inf` is NaN), and the
    distances are scaled back. Non-finite features raise a `ValueError`.
    """
    query_features = np.asarray(query_features, np.float64)
    gallery_features = np.asarray(gallery_features, np.float64)
    for name, features in (
        ("query_features", query_features),
        ("gallery_features", gallery_features),
    ):
        if not np.isfinite(features).all():
            raise ValueError(
                f"`{name}` must be finite to rank images by distance. "
                f"Received: {int((~np.isfinite(features)).sum())} non-finite "
                "values (the student diverged?)"
            )
    scale = max(
        np.abs(query_features).max(initial=0.0),
        np.abs(gallery_features).max(initial=0.0),
    ) or 1.0
    query_features = query_features / scale
    gallery_features = gallery_features / scale
    squared = (
        np.sum(np.square(query_features), axis=1)[:, None]
        + np.sum(np.square(gallery_features), axis=1)[None, :]
        - 2.0 * query_features @ gallery_features.T
    )
    return np.sqrt(np.maximum(squared, 0.0)) * scale


def main(argv=None):
    """Runs the program; returns `{"table3_resnet18": results rows}`."""
    parser = build_parser()
    args = common.resolve_defaults(
        parser.parse_args(argv), FULL_DEFAULTS, SMOKE_DEFAULTS
    )
    if not 0.0 < args.holdout_fraction < 1.0:
        parser.error(
            "--holdout-fraction must be between 0 and 1. "
            f"Received: {args.holdout_fraction}"
        )
    common.check_data_arguments(args, parser)
    keras.utils.set_random_seed(args.seed)

    root = args.data
    if args.smoke:
        root = write_market1501_folder(
            os.path.join(args.output_dir, "smoke_data", "Market-1501"),
            num_ids=SMOKE_NUM_IDS,
            images_per_id=SMOKE_IMAGES_PER_ID,
            seed=args.seed,
        )
    market = load_market1501(root)
    num_ids = market.train.num_ids
    common.check_subset_sizes(args.k, num_ids, parser)
    image_size = tuple(args.image_size)
    train_indices, holdout_indices = holdout_split(
        market.train.labels, args.holdout_fraction, args.seed
    )
    train_images = load_market1501_images(market.train.image_paths, image_size)
    x_train, y_train = (
        train_images[train_indices],
        market.train.labels[train_indices],
    )
    x_holdout, y_holdout = (
        train_images[holdout_indices],
        market.train.labels[holdout_indices],
    )
    del train_images
    # Queries first, then the gallery: one pass through the feature model.
    x_retrieval = np.concatenate(
        [
            load_market1501_images(market.query.image_paths, image_size),
            load_market1501_images(market.gallery.image_paths, image_size),
        ]
    )
    num_queries = len(market.query)
    mean, variance = common.channel_statistics(x_train)
    print(
        f"Market-1501: {num_ids} training identities, {len(x_train)} training "
        f"and {len(x_holdout)} held-out images, {num_queries} queries, "
        f"{len(market.gallery)} gallery images"
    )

    teacher_config = models.SMOKE_RESNET152 if args.smoke else models.RESNET152
    student_config = models.SMOKE_RESNET18 if args.smoke else models.RESNET18
    teacher, train_targets, holdout_targets = common.teacher_and_targets(
        args,
        lambda: models.teacher(
            teacher_config,
            num_ids,
            image_size,
            mean,
            variance,
            backbone_weights=args.teacher_weights,
        ),
        (x_train, y_train),
        (x_holdout, y_holdout),
        max_shift=0,
        validation_name="holdout",
    )

    def evaluate(model):
        features = common.feature_extractor(model).predict(
            x_retrieval, batch_size=args.batch_size, verbose=0
        )
        if np.all(np.isfinite(features)):
            ranking = evaluate_ranking(
                euclidean_distances(
                    features[:num_queries], features[num_queries:]
                ),
                market.query.person_ids,
                market.query.camera_ids,
                market.gallery.person_ids,
                market.gallery.camera_ids,
                ap_formula=args.ap_formula,
            )
        else:
            # A diverged row should not end a run of many hours.
            print(
                f"Warning: {model.name} gives non-finite features (did "
                "training diverge?); its meanAP and rank-1 are reported as nan."
            )
            ranking = {"mAP": float("nan"), "rank1": float("nan")}
        return {
            "mAP": ranking["mAP"],
            "rank1": ranking["rank1"],
            "accuracy": common.top1_accuracy(
                model, x_holdout, y_holdout, args.batch_size
            ),
        }

    rows = common.run_table(
        args,
        teacher,
        evaluate(teacher),
        functools.partial(
            models.student,
            student_config,
            num_ids,
            image_size,
            mean,
            variance,
            backbone_weights=args.student_weights,
            dropout_rate=args.dropout,
            seed=args.seed,
        ),
        lambda: keras.optimizers.RMSprop(
            learning_rate=args.learning_rate, momentum=0.9
        ),
        evaluate,
        (x_train, train_targets),
        (x_holdout, holdout_targets),
        student_name="ResNet18",
        paper_numbers=PAPER_NUMBERS,
        name="table3_resnet18",
        title="Table 3: meanAP, rank-1 and top-1 accuracy of ResNet18 on "
        f"Market-1501, {args.ap_formula} AP",
        metrics=METRICS,
        plot_metrics=[
            ("mAP", "meanAP"), ("rank1", "rank-1"), ("accuracy", "top-1 accuracy")
        ],
        note=PAPER_LAST_LAYER_NOTE,
    )
    return {"table3_resnet18": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
