"""How good a sampled estimator is on a batch: gradient cosine and ESS.

A sampled step trains on an estimate of the full-softmax distillation
gradient. Two numbers say how good that estimate is for a batch, for any
`keras_dis.DISLoss` (proposal, `k`, `exact_top`, temperature):

- the cosine between the *expected* sampled gradient with respect to the
  student's logits (averaged over many independent subsets, scattered back
  to all `C` classes) and the exact full-KD gradient: its bias. 1 means the
  estimator points, on average, where full KD does;
- the same cosine for the gradient of a single subset, averaged over
  subsets: the noise of one step on top of the bias;
- the effective sample size of the self-normalised importance weights over
  one subset, `1 / sum(w_j ** 2)` for weights `w` summing to 1, as a
  fraction of the subset size `1 + k`, for the teacher's weights
  (`softmax(t / T - log r)`) and the student's (`softmax(s / T - log r)`):
  near 1 when every entry counts, near `1 / (1 + k)` when one entry carries
  all the weight (the subset teaches about one class).

They need the student's full logits, so they are for monitoring a few
batches, not for the training step.
"""

import keras
import numpy as np
from keras import ops

from keras_dis.src import sampled_softmax
from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.sampled_step import SAMPLED_PROPOSALS


def exact_logit_gradient(student_logits, targets, temperature, distillation_weight):
    """The full-softmax distillation gradient with respect to the logits.

    `lambda / T * (softmax(s / T) - softmax(t / T)) + (1 - lambda) *
    (softmax(s) - onehot(y))`, per sample (not divided by the batch size).

    Args:
        student_logits: float `(batch, C)`.
        targets: `(labels, tail_logits, top_classes, top_logits)`.
        temperature: float, `T`.
        distillation_weight: float, `lambda`.

    Returns:
        float32 tensor `(batch, C)`.
    """
    student_logits = ops.cast(student_logits, "float32")
    num_classes = student_logits.shape[-1]
    teacher_logits = targets_module.dense_teacher_logits(targets, num_classes)
    gradient = (distillation_weight / temperature) * (
        ops.softmax(student_logits / temperature, axis=-1)
        - ops.softmax(teacher_logits / temperature, axis=-1)
    )
    if distillation_weight < 1:
        gradient = gradient + (1.0 - distillation_weight) * (
            ops.softmax(student_logits, axis=-1)
            - ops.one_hot(ops.cast(targets[0], "int32"), num_classes)
        )
    return gradient


def _repeat_rows(tensor, repeats):
    return ops.concatenate([tensor] * repeats, axis=0)


def _cosine(a, b):
    return ops.sum(a * b, axis=-1) / (
        ops.norm(a, axis=-1) * ops.norm(b, axis=-1) + 1e-30
    )


def _sparse_cosine(gradient, classes, dense_at_classes, dense_norm):
    """Cosine between each row's sparse vector (`gradient` at `classes`,
    repeated classes summed) and a dense vector, given the dense vector's
    values at `classes` and its norm, without forming the sparse vectors.

    Args:
        gradient, classes, dense_at_classes: `(n, m)`.
        dense_norm: `(n,)`.

    Returns:
        `(n,)`.
    """
    dot = ops.sum(gradient * dense_at_classes, axis=-1)
    same_class = ops.cast(classes[:, :, None] == classes[:, None, :], "float32")
    squared_norm = ops.sum(
        gradient[:, :, None] * gradient[:, None, :] * same_class, axis=(1, 2)
    )
    return dot / (ops.sqrt(ops.maximum(squared_norm, 0.0)) * dense_norm + 1e-30)


def _effective_sample_fraction(logits, log_weights, repeats):
    """ESS / (1 + k) of each subset, summed over the `repeats` copies of
    the batch: `(batch,)`."""
    weights = ops.softmax(logits - log_weights, axis=-1)
    fraction = 1.0 / ops.sum(weights * weights, axis=-1) / logits.shape[-1]
    return ops.sum(ops.reshape(fraction, (repeats, -1)), axis=0)


def estimator_diagnostics(
    loss,
    student_logits,
    teacher_targets,
    rank_proposal=None,
    num_subsets=256,
    seed=0,
):
    """Bias and effective sample size of a sampled `DISLoss` on one batch.

    Args:
        loss: a `keras_dis.DISLoss` with a sampled proposal (`"dis"`,
            `"ftis"`, `"uniform"`, `"teacher_uniform"` or an instance).
        student_logits: float `(batch, C)`, the student's full logits (for
            example `student.predict(x)`).
        teacher_targets: packed teacher targets `(batch, 2 + 2R)`
            (`keras_dis.pack_teacher_targets`).
        rank_proposal: optional float `(C,)`, the head's rank proposal for
            DIS (`head.rank_proposal`, which `ProposalScheduler` anneals);
            by default the proposal's own before any annealing.
        num_subsets: int, the number of independent subsets averaged for
            the expected gradient.
        seed: int, seed of the draws.

    Returns:
        A dict of float32 NumPy arrays of shape `(batch,)`:
        `"gradient_cosine"` (expected sampled vs exact logit gradient: the
        bias), `"subset_gradient_cosine"` (one subset's gradient vs the
        exact one, averaged: bias and variance together), `"teacher_ess"`
        and `"student_ess"` (mean effective sample size of the subsets as
        a fraction of `1 + k`).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> teacher_logits = 3 * rng.normal(size=(4, 50)).astype("float32")
    >>> targets = keras_dis.pack_teacher_targets(
    ...     teacher_logits.argmax(-1), teacher_logits)
    >>> student_logits = rng.normal(size=(4, 50)).astype("float32")
    >>> result = estimator_diagnostics(
    ...     keras_dis.DISLoss(k=10), student_logits, targets, num_subsets=32)
    >>> sorted(result)
    ['gradient_cosine', 'student_ess', 'subset_gradient_cosine', 'teacher_ess']
    >>> bool((result["gradient_cosine"] > 0.5).all())
    True
    """
    if loss.proposal_name not in SAMPLED_PROPOSALS:
        raise ValueError(
            "`estimator_diagnostics` needs a sampled proposal "
            f"({sorted(SAMPLED_PROPOSALS)}). Received: "
            f"proposal={loss.proposal_name!r}"
        )
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or (
        num_subsets < 1
    ):
        raise ValueError(
            "`num_subsets` must be an integer >= 1. "
            f"Received: num_subsets={num_subsets!r}"
        )
    student_logits = ops.convert_to_tensor(student_logits, "float32")
    num_classes = student_logits.shape[-1]
    loss.check_num_classes(num_classes)
    targets = targets_module.unpack_teacher_targets(
        ops.convert_to_tensor(teacher_targets, "float32")
    )
    if rank_proposal is None and hasattr(loss.proposal, "rank_probabilities"):
        rank_proposal = loss.proposal.rank_probabilities(num_classes)
    if rank_proposal is not None:
        rank_proposal = ops.convert_to_tensor(rank_proposal, "float32")
    _, tail_logits, _, top_logits = targets
    log_bins = loss.proposal.log_bin_probabilities(
        top_logits,
        num_classes=num_classes,
        temperature=loss.temperature,
        tail_logits=tail_logits,
        rank_proposal=rank_proposal,
    )
    exact = exact_logit_gradient(
        student_logits, targets, loss.temperature, loss.distillation_weight
    )
    batch_size = student_logits.shape[0]
    # Draw many subsets per sample at once: the batch repeated, in chunks of
    # about a million subset entries.
    repeats = max(1, min(num_subsets, 2**20 // (batch_size * (loss.k + 1))))
    repeated = [_repeat_rows(part, repeats) for part in targets]
    repeated_log_bins = (
        log_bins
        if log_bins.shape[0] == 1
        else _repeat_rows(log_bins, repeats)
    )
    # Row `r * B + b` of the repeated batch is sample `b` again: its
    # entries are read from the `(B, C)` arrays through flat indices.
    flat_logits = ops.reshape(student_logits, (-1,))
    flat_exact = ops.reshape(exact, (-1,))
    exact_norm = _repeat_rows(ops.norm(exact, axis=-1), repeats)
    seed_generator = keras.random.SeedGenerator(seed)
    gradient_sum = ops.zeros((batch_size, num_classes), "float32")
    subset_cosine, teacher_ess, student_ess = 0.0, 0.0, 0.0
    drawn = 0
    while drawn < num_subsets:
        subset, teacher_logits, log_weights = sampled_softmax.sample_subset(
            repeated_log_bins,
            repeated,
            num_classes=num_classes,
            k=loss.k,
            exact_top=loss.exact_top_count,
            seed_generator=seed_generator,
        )
        flat_subset = sampled_softmax.sample_class_indices(
            subset, num_classes, batch_size
        )
        subset_logits = ops.take(flat_logits, flat_subset)
        gradient = sampled_softmax.distillation_cross_entropy_gradient(
            subset_logits,
            teacher_logits,
            temperature=loss.temperature,
            log_proposal=log_weights,
            distillation_weight=loss.distillation_weight,
        )
        # The subsets' gradients summed per sample and class, `(B, C)`.
        gradient_sum = gradient_sum + sampled_softmax.sum_per_sample_and_class(
            gradient, flat_subset, num_classes, batch_size
        )
        subset_cosine = subset_cosine + ops.sum(
            ops.reshape(
                _sparse_cosine(
                    gradient, subset, ops.take(flat_exact, flat_subset), exact_norm
                ),
                (repeats, -1),
            ),
            axis=0,
        )
        teacher_ess = teacher_ess + _effective_sample_fraction(
            teacher_logits / loss.temperature, log_weights, repeats
        )
        student_ess = student_ess + _effective_sample_fraction(
            subset_logits / loss.temperature, log_weights, repeats
        )
        drawn += repeats
    cosine = _cosine(gradient_sum, exact)
    return {
        "gradient_cosine": np.asarray(ops.convert_to_numpy(cosine)),
        "subset_gradient_cosine": np.asarray(
            ops.convert_to_numpy(subset_cosine / drawn)
        ),
        "teacher_ess": np.asarray(
            ops.convert_to_numpy(teacher_ess / drawn)
        ),
        "student_ess": np.asarray(
            ops.convert_to_numpy(student_ess / drawn)
        ),
    }
