"""The sampled-softmax distillation math, as pure `keras.ops` functions.

Notation follows `METHOD.md` (Alg. 1 of the DIS paper): for one sample with
target `y`, proposal `r` and sampled classes `S` (the target, with `r_y := 1`,
then `m` draws with replacement from `r`):

    s'_k = s_k / T - log r_k        t'_k = t_k / T - log r_k
    L    = CE(softmax(t'), softmax(s'))     over the entries of S

whose gradient with respect to `s_k` is `(softmax(s')_k - softmax(t')_k) / T`.
Nothing here is larger than `(batch, m + 1)` apart from the rank bins
`(batch or 1, R + 1)`.
"""

import math

from keras import ops

from keras_dis.src import backend


# A sampled step computes every class's logit (one `(batch, C)` matmul, the
# subset's logits picked from it) and the head's gradient as a matmul of the
# `(batch, C)` logit gradients with the features while `C` is at most this
# many times the subset size `n` (and `C <= batch * n`). Gathering and
# scattering `batch * n` rows of `d` does `C / n` times less arithmetic but
# costs about as much per element as that many multiply-adds: JAX on CPU,
# `B = 256`, `d = 512`, `n = 11`, the kernel's gradient 0.3 ms by matmul vs
# 1.8 ms by per-entry sums at `C = 100`, and 1.4 vs 2.0 ms at `C = 1000`,
# where the whole `fit()` step was slower with the matmul.
EVERY_CLASS_MAX_CLASSES_PER_ENTRY = 16


def computes_every_class(num_classes, subset_shape):
    """Whether a sampled step over subsets of `subset_shape` `(batch, n)`
    computes all `num_classes` logits and a dense head gradient (few
    classes; see `EVERY_CLASS_MAX_CLASSES_PER_ENTRY`) instead of gathering
    the rows of the subset's classes.

    The estimator is the same either way; only how its logits and their
    gradient are computed differs. Needs a static batch size.
    """
    batch_size, subset_size = subset_shape
    if batch_size is None or subset_size is None:
        return False
    return num_classes <= subset_size * min(
        EVERY_CLASS_MAX_CLASSES_PER_ENTRY, batch_size
    )


def sample_class_indices(classes, num_classes, batch_size):
    """Each entry's index in a flattened `(batch_size, C)` array.

    Args:
        classes: int tensor `(rows, n)` of class ids; row `r` belongs to
            sample `r % batch_size` (a batch, or the batch repeated).
        num_classes: int, `C`.
        batch_size: int, the number of samples.

    Returns:
        int32 tensor `(rows, n)`.
    """
    classes = ops.cast(classes, "int32")
    samples = ops.arange(ops.shape(classes)[0], dtype="int32") % batch_size
    return samples[:, None] * num_classes + classes


def sum_per_sample_and_class(values, flat_indices, num_classes, batch_size):
    """The values summed per sample and class, `(batch_size, C)`.

    Args:
        values: float tensor `(rows, n)`.
        flat_indices: their `sample_class_indices`.
        num_classes: int, `C`.
        batch_size: int, the number of samples.
    """
    return ops.reshape(
        backend.segment_sum(
            ops.reshape(values, (-1,)),
            ops.reshape(flat_indices, (-1,)),
            batch_size * num_classes,
        ),
        (batch_size, num_classes),
    )


def _bin_cdf(log_bins):
    """Normalised CDF of rank bins; its last entry is exactly 1."""
    log_bins = log_bins - ops.max(log_bins, axis=-1, keepdims=True)
    cumulative = ops.cumsum(ops.exp(log_bins), axis=-1)
    return cumulative / cumulative[:, -1:]


def sample_rank_bins(log_bins, batch_size, num_samples, seed_generator):
    """Draws rank bins with replacement from their log-probabilities.

    Inverse-CDF sampling: one uniform number per draw, located in the CDF.
    A bin of probability zero is never drawn.

    Args:
        log_bins: float tensor `(1, R + 1)` (a proposal shared by the batch)
            or `(batch, R + 1)` (one per sample).
        batch_size: int or scalar tensor, the batch size.
        num_samples: int, `m`, draws per sample.
        seed_generator: a `keras.random.SeedGenerator`.

    Returns:
        int32 tensor of shape `(batch, num_samples)` of bin indices.
    """
    cdf = _bin_cdf(ops.cast(log_bins, "float32"))
    uniform = backend.uniform((batch_size, num_samples), seed_generator)
    if log_bins.shape[0] == 1:
        bins = ops.reshape(
            ops.searchsorted(cdf[0], ops.reshape(uniform, (-1,)), side="right"),
            (batch_size, num_samples),
        )
    else:
        bins = ops.sum(
            ops.cast(cdf[:, None, :] <= uniform[:, :, None], "int32"), axis=-1
        )
    return ops.minimum(ops.cast(bins, "int32"), log_bins.shape[-1] - 1)


def nth_class_outside(classes, positions):
    """The `n`-th class id (0-based) that is not in a set, per row.

    Maps a uniform draw over the `C - R` tail classes to a class id without
    materialising the tail: with the set sorted, the answer is
    `n + #{i : sorted[i] - i <= n}`. The offsets `sorted[i] - i` come from
    a sort, or on TensorFlow for small sets from pairwise comparisons,
    `class - #{smaller classes in the set}` (under XLA on CPU a third of
    the sort's time at `R = 100`; see `backend.PAIRWISE_RANK_MAX_SIZE`).

    Args:
        classes: int tensor `(batch, R)`, distinct per row, in any order.
        positions: int tensor `(batch, m)` with values in `[0, C - R)`.

    Returns:
        int32 tensor `(batch, m)` of class ids outside `classes`.
    """
    classes = ops.cast(classes, "int32")
    positions = ops.cast(positions, "int32")
    top_r = classes.shape[-1]
    if top_r <= backend.PAIRWISE_RANK_MAX_SIZE:
        smaller = ops.sum(
            ops.cast(classes[:, None, :] < classes[:, :, None], "int32"),
            axis=-1,
        )
        offsets = classes - smaller
    else:
        offsets = ops.sort(classes, axis=-1) - ops.arange(top_r, dtype="int32")
    skipped = ops.sum(
        ops.cast(offsets[:, None, :] <= positions[:, :, None], "int32"),
        axis=-1,
    )
    return positions + skipped


def sample_classes(
    log_bins,
    top_classes,
    top_logits,
    tail_logits,
    num_classes,
    num_samples,
    seed_generator,
):
    """Samples classes by teacher rank and looks up what the loss needs.

    Args:
        log_bins: `(1 or batch, R + 1)` log-probabilities of the rank bins.
        top_classes: int `(batch, R)`, the teacher's top classes per sample.
        top_logits: float `(batch, R)`, their teacher logits.
        tail_logits: float `(batch,)`, the teacher logit of tail classes.
        num_classes: int, `C`.
        num_samples: int, `m`.
        seed_generator: a `keras.random.SeedGenerator`.

    Returns:
        A tuple `(classes, teacher_logits, log_proposal)`, each of shape
        `(batch, num_samples)`: the sampled class ids, their teacher logits
        and the log-probability of drawing each class.
    """
    top_classes = ops.cast(top_classes, "int32")
    top_logits = ops.cast(top_logits, "float32")
    tail_logits = ops.cast(tail_logits, "float32")
    batch_size = ops.shape(top_classes)[0]
    top_r = top_classes.shape[-1]
    tail_size = num_classes - top_r
    bins = sample_rank_bins(log_bins, batch_size, num_samples, seed_generator)
    in_top = bins < top_r
    top_position = ops.minimum(bins, top_r - 1)
    classes = ops.take_along_axis(top_classes, top_position, axis=-1)
    teacher_logits = ops.take_along_axis(top_logits, top_position, axis=-1)
    log_bins = ops.broadcast_to(log_bins, (batch_size, top_r + 1))
    log_proposal = ops.take_along_axis(log_bins, bins, axis=-1)
    if tail_size > 0:
        tail_position = backend.randint(
            (batch_size, num_samples), tail_size, seed_generator
        )
        tail_classes = nth_class_outside(top_classes, tail_position)
        classes = ops.where(in_top, classes, tail_classes)
        teacher_logits = ops.where(
            in_top, teacher_logits, tail_logits[:, None]
        )
        log_proposal = ops.where(
            in_top, log_proposal, log_proposal - math.log(tail_size)
        )
    return classes, teacher_logits, log_proposal


# The log-weight of a subset entry that must not count (a second copy of
# the label): its corrected logits are about -1e30, so its softmax weight is
# exactly 0 and no infinity enters the arithmetic.
MASKED_LOG_WEIGHT = 1e30


def tail_log_bins(log_bins, exact_top):
    """A proposal restricted to the ranks from `exact_top` on, renormalised.

    Args:
        log_bins: `(1 or batch, R + 1)` log-probabilities of the rank bins.
        exact_top: int in `[0, R]`, the number of top ranks to exclude.

    Returns:
        A tensor like `log_bins` whose first `exact_top` bins have
        probability 0 and whose other bins sum to 1.
    """
    if exact_top == 0:
        return log_bins
    log_bins = ops.cast(log_bins, "float32")
    kept = ops.arange(log_bins.shape[-1]) >= exact_top
    log_bins = ops.where(kept[None, :], log_bins, -math.inf)
    return log_bins - ops.logsumexp(log_bins, axis=-1, keepdims=True)


def sample_subset(
    log_bins,
    targets,
    num_classes,
    k,
    exact_top,
    seed_generator,
):
    """The classes of one sampled step and their importance log-weights.

    Two estimators share this layout, `(batch, 1 + k)`, label first:

    - `exact_top == 0`: Alg. 1 of the DIS paper. The label (log-weight 0,
      `r_y := 1`), then `k` draws with replacement from the proposal, each
      with log-weight `log r_j`.
    - `exact_top == m > 0`: the teacher's top `m` classes enter exactly
      (log-weight 0) and only the rest is sampled: `k - m` draws from the
      proposal restricted to ranks `>= m`, with log-weight
      `log((k - m) * r_j)`, so `exp(s_j) / ((k - m) r_j)` summed over the
      draws is an unbiased estimate of the tail's part of the softmax
      normaliser. The label is exact too: a top-`m` entry or a draw equal
      to the label is masked (`MASKED_LOG_WEIGHT`) so that it counts once.

    Args:
        log_bins: `(1 or batch, R + 1)` log-probabilities of the proposal's
            rank bins (see `keras_dis.proposals`).
        targets: `(labels, tail_logits, top_classes, top_logits)`, as from
            `keras_dis.src.teacher_targets.unpack_teacher_targets`.
        num_classes: int, `C`.
        k: int, the number of entries besides the label.
        exact_top: int in `[0, min(k, R)]`.
        seed_generator: a `keras.random.SeedGenerator`.

    Returns:
        A tuple `(classes, teacher_logits, log_weights)` of shape
        `(batch, 1 + k)`: class ids (the label in column 0), their teacher
        logits, and the log-weights to subtract from the tempered logits
        (`log_proposal` of `distillation_cross_entropy`).
    """
    labels, tail_logits, top_classes, top_logits = targets
    labels = ops.cast(labels, "int32")[:, None]
    label_logits = label_teacher_logits(
        labels[:, 0], top_classes, top_logits, tail_logits
    )
    classes = [labels]
    teacher_logits = [label_logits[:, None]]
    log_weights = [ops.zeros_like(label_logits[:, None])]
    if exact_top > 0:
        exact_classes = ops.cast(top_classes[:, :exact_top], "int32")
        classes.append(exact_classes)
        teacher_logits.append(ops.cast(top_logits[:, :exact_top], "float32"))
        log_weights.append(
            ops.where(exact_classes == labels, MASKED_LOG_WEIGHT, 0.0)
        )
    num_draws = k - exact_top
    if num_draws > 0:
        drawn, drawn_logits, log_proposal = sample_classes(
            tail_log_bins(log_bins, exact_top),
            top_classes,
            top_logits,
            tail_logits,
            num_classes=num_classes,
            num_samples=num_draws,
            seed_generator=seed_generator,
        )
        if exact_top > 0:
            log_proposal = ops.where(
                drawn == labels,
                MASKED_LOG_WEIGHT,
                log_proposal + math.log(num_draws),
            )
        classes.append(drawn)
        teacher_logits.append(drawn_logits)
        log_weights.append(log_proposal)
    return (
        ops.concatenate(classes, axis=-1),
        ops.concatenate(teacher_logits, axis=-1),
        ops.concatenate(log_weights, axis=-1),
    )


def label_teacher_logits(labels, top_classes, top_logits, tail_logits):
    """The teacher logit of each sample's label, `(batch,)`.

    The label's logit from the cached ranking, or the tail logit when the
    label is outside the top `R`.
    """
    labels = ops.cast(labels, "int32")
    top_classes = ops.cast(top_classes, "int32")
    top_logits = ops.cast(top_logits, "float32")
    tail_logits = ops.cast(tail_logits, "float32")
    is_label = ops.cast(top_classes == labels[:, None], "float32")
    in_top = ops.sum(is_label, axis=-1) > 0
    return ops.where(in_top, ops.sum(is_label * top_logits, axis=-1), tail_logits)


def distillation_cross_entropy(
    student_logits,
    teacher_logits,
    temperature=1.0,
    log_proposal=None,
    distillation_weight=1.0,
    label_position=None,
    labels=None,
):
    """`lambda * CE(softmax(t'), softmax(s')) + (1 - lambda) * CE(y, s)`.

    The one estimator behind every method: with `log_proposal` it is the
    self-normalised importance-sampling loss of Alg. 1 over sampled classes
    (entries may repeat, and repeats count); without it, over all classes,
    it is plain distillation.

    Args:
        student_logits: float `(batch, n)`, student logits of the classes.
        teacher_logits: float `(batch, n)`, teacher logits of the same
            classes (no gradient flows into them).
        temperature: float > 0, `T`.
        log_proposal: optional float `(batch, n)`, `log r_k` (0 for the
            target, whose `r_y` is 1).
        distillation_weight: float in [0, 1], `lambda`.
        label_position: optional int, column of the label in the logits
            (0 for sampled classes); the hard-label term needs it or
            `labels`.
        labels: optional int `(batch,)`, label columns (full logits).

    Returns:
        float32 tensor `(batch,)`, the loss per sample.
    """
    student_logits = ops.cast(student_logits, "float32")
    teacher_logits = ops.stop_gradient(ops.cast(teacher_logits, "float32"))
    correction = (
        0.0 if log_proposal is None else ops.cast(log_proposal, "float32")
    )
    loss = 0.0
    if distillation_weight > 0:
        teacher_probabilities = ops.softmax(
            teacher_logits / temperature - correction, axis=-1
        )
        student_log_probabilities = ops.log_softmax(
            student_logits / temperature - correction, axis=-1
        )
        # 0 * log(0) is 0: a class the teacher gives no mass adds nothing.
        loss = -ops.sum(
            ops.where(
                teacher_probabilities > 0,
                teacher_probabilities * student_log_probabilities,
                0.0,
            ),
            axis=-1,
        )
        loss = distillation_weight * loss
    if distillation_weight < 1:
        log_probabilities = ops.log_softmax(student_logits - correction, axis=-1)
        if labels is None:
            label_log_probability = log_probabilities[:, label_position]
        else:
            label_log_probability = ops.squeeze(
                ops.take_along_axis(
                    log_probabilities, ops.cast(labels, "int32")[:, None], axis=-1
                ),
                axis=-1,
            )
        loss = loss - (1.0 - distillation_weight) * label_log_probability
    return loss


def distillation_cross_entropy_gradient(
    student_logits,
    teacher_logits,
    temperature=1.0,
    log_proposal=None,
    distillation_weight=1.0,
    label_position=0,
):
    """Closed-form gradient of `distillation_cross_entropy` over a subset.

    `d L / d s_k = lambda * (softmax(s')_k - softmax(t')_k) / T
    + (1 - lambda) * (softmax(s - log r)_k - [k == label_position])`,
    which lets the row-sparse optimizer update the gathered kernel rows
    without differentiating through the `C x d` kernel.

    Args:
        Same as `distillation_cross_entropy`, with the label at column
        `label_position` of the subset.

    Returns:
        float32 tensor `(batch, n)`: the gradient of each sample's loss with
        respect to its student logits.
    """
    student_logits = ops.cast(student_logits, "float32")
    teacher_logits = ops.cast(teacher_logits, "float32")
    correction = (
        0.0 if log_proposal is None else ops.cast(log_proposal, "float32")
    )
    gradient = 0.0
    if distillation_weight > 0:
        gradient = (distillation_weight / temperature) * (
            ops.softmax(student_logits / temperature - correction, axis=-1)
            - ops.softmax(teacher_logits / temperature - correction, axis=-1)
        )
    if distillation_weight < 1:
        label = ops.one_hot(
            ops.full((ops.shape(student_logits)[0],), label_position, "int32"),
            student_logits.shape[-1],
        )
        gradient = gradient + (1.0 - distillation_weight) * (
            ops.softmax(student_logits - correction, axis=-1) - label
        )
    return gradient
