"""The sampled training step of a `SampledDistillationHead`, in one place.

In training the head returns its input features (not `B x C` logits) and
the loss of the step computes the student's logits only for the classes it
needs. For a sampled proposal (DIS, FTIS, uniform) one step is, in order:

1. check the batch of packed teacher targets (`input_checks`): labels and
   class ids in `[0, C)`, finite teacher logits, no one-hot labels; a bad
   batch raises a `ValueError` and trains on nothing;
2. draw `k` classes per sample by teacher rank from the proposal
   (`proposal.log_bin_probabilities`, `sampled_softmax.sample_classes`);
3. gather the kernel rows and biases of the target and the drawn classes
   (`head.gather_rows`), `B x (k + 1)` rows, and compute their logits
   (with few classes, all `C` logits by one matmul instead:
   `head.subset_logits`);
4. the self-normalised importance-sampling estimator of the loss
   (`sampled_softmax.distillation_cross_entropy`) and, in closed form, its
   gradient with respect to those logits;
5. the head's row update (`head.row_sparse_optimizer`, when the head has
   one): only the gathered rows and their optimizer state are written.

`keras_dis.Distiller` calls `distillation_losses` with its own head. The
plain path, `student.compile(loss=keras_dis.DISLoss(k=10))`, finds the head
through its output: `mark_training_output` tags the tensor the head returns
in training with the head (a Keras tensor attribute, as Keras tags masks),
and `training_head(y_pred)` reads it, so a loss takes only the head whose
output is its own `y_pred`, and nothing is shared across models, steps or
threads. A head output that no `DISLoss` consumes is an error (see
`SampledDistillationHead.metrics`).
"""

from keras import ops
from keras.src.backend.common import tensor_attributes

from keras_dis.src import backend
from keras_dis.src import input_checks
from keras_dis.src import sampled_softmax
from keras_dis.src import teacher_targets as targets_module

_HEAD_ATTRIBUTE = "_keras_dis_head"
_LOGITS_HEAD_ATTRIBUTE = "_keras_dis_logits_head"
SAMPLED_PROPOSALS = ("dis", "ftis", "uniform", "teacher_uniform")


def mark_training_output(head, features):
    """The head's training output: its features, tagged with the head."""
    outputs = ops.multiply(features, ops.ones((), features.dtype))
    tensor_attributes.set_tensor_attr(outputs, _HEAD_ATTRIBUTE, head)
    return outputs


def training_head(y_pred):
    """The head whose training output `y_pred` is, or None."""
    return tensor_attributes.get_tensor_attr(y_pred, _HEAD_ATTRIBUTE)


def mark_logits(head, logits):
    """The head's inference output, tagged: input errors found by the loss
    of these logits are recorded in the head (for the host to raise)."""
    tensor_attributes.set_tensor_attr(logits, _LOGITS_HEAD_ATTRIBUTE, head)
    return logits


def logits_head(y_pred):
    """The head whose full logits `y_pred` are, or None."""
    return tensor_attributes.get_tensor_attr(y_pred, _LOGITS_HEAD_ATTRIBUTE)


def validated_teacher_targets(packed_targets, num_classes, head=None):
    """Checks a batch of packed teacher targets inside the step.

    Raises the `ValueError` of the first problem found from inside the
    step where the backend can (see `backend.raise_input_error`), else
    records it in `head` for the host to raise, and returns targets that
    are safe to compute with either way.

    Args:
        packed_targets: float tensor `(batch, 2 + 2R)`.
        num_classes: int, `C`.
        head: optional `SampledDistillationHead` that records the error
            when the step cannot raise it.

    Returns:
        A tuple `(error_code, error_value, targets)`: the int32 error code
        (0 when the batch is valid), the offending value, and `(labels,
        tail_logits, top_classes, top_logits)`.
    """
    error_code, error_value, targets = input_checks.check_teacher_targets(
        packed_targets, num_classes
    )
    raised = backend.raise_input_error(error_code, error_value, num_classes)
    if head is not None and not raised:
        head.record_input_error(error_code, error_value)
    return error_code, error_value, targets


def reduction_weights(reduction, batch_size, sample_weight=None):
    """d (reduced loss) / d (loss of each sample), `(batch,)`.

    Args:
        reduction: `"sum_over_batch_size"` or `"sum"`.
        batch_size: int or scalar tensor.
        sample_weight: optional `(batch,)` or `(batch, 1)` weights.
    """
    weights = ops.ones((batch_size,), "float32")
    if sample_weight is not None:
        weights = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    if reduction == "sum":
        return weights
    if reduction == "sum_over_batch_size":
        return weights / ops.cast(batch_size, "float32")
    raise ValueError(
        "Row-sparse head updates need `reduction` 'sum_over_batch_size' "
        f"or 'sum'. Received: reduction={reduction!r}"
    )


def distillation_losses(head, features, packed_targets, loss, sample_weight=None):
    """Per-sample losses of one training step of `head`, rows updated.

    Args:
        head: the `SampledDistillationHead` that returned `features`.
        features: float tensor `(batch, d)`, the head's input.
        packed_targets: float tensor `(batch, 2 + 2R)`.
        loss: the `keras_dis.DISLoss` that says what to compute (`k`,
            `proposal`, `temperature`, `distillation_weight`, `reduction`).
        sample_weight: optional `(batch,)` weights, which the row update
            applies as the loss's reduction will.

    Returns:
        float32 tensor `(batch,)`; NaN (with no gradient) for a batch that
        failed its input checks.
    """
    loss.check_num_classes(head.num_classes)
    top_r = targets_module.top_r_of(packed_targets)
    if top_r > head.num_classes:
        raise ValueError(
            f"`y` ranks {top_r} classes but the SampledDistillationHead has "
            f"num_classes={head.num_classes}: the targets were packed for "
            f"another number of classes. Received: y.shape="
            f"{tuple(packed_targets.shape)}"
        )
    # 1. Check the batch.
    error_code, _, targets = validated_teacher_targets(
        packed_targets, head.num_classes, head
    )
    features = ops.cast(features, "float32")
    if loss.proposal_name in SAMPLED_PROPOSALS:
        losses = _sampled_losses(
            head, features, targets, loss, error_code, sample_weight
        )
    elif head.optimizer is not None:
        raise ValueError(
            "A SampledDistillationHead with its own `optimizer` trains "
            "its rows from sampled classes only: use proposal 'dis', "
            "'ftis' or 'uniform', or build the head without `optimizer`. "
            f"Received: proposal={loss.proposal_name!r}"
        )
    else:
        losses = loss.losses_from_logits(targets, head.full_logits(features))
    return input_checks.keep_if_valid(error_code, losses)


def _sampled_losses(head, features, targets, loss, error_code, sample_weight):
    _, tail_logits, top_classes, top_logits = targets
    num_classes = head.num_classes
    exact_top = loss.exact_top_count
    if exact_top > top_classes.shape[-1]:
        raise ValueError(
            f"`exact_top={exact_top}` needs the teacher's top {exact_top} "
            f"classes in `y`, but `y` ranks {top_classes.shape[-1]}: pack "
            f"the targets with a larger `top_r` or lower `exact_top`. "
            f"Received: exact_top={exact_top}"
        )
    # 2. Draw the classes by teacher rank.
    log_bins = loss.proposal.log_bin_probabilities(
        top_logits,
        num_classes=num_classes,
        temperature=loss.temperature,
        tail_logits=tail_logits,
        rank_proposal=head.rank_proposal,
    )
    subset, teacher_logits, log_weights = sampled_softmax.sample_subset(
        log_bins,
        targets,
        num_classes=num_classes,
        k=loss.k,
        exact_top=exact_top,
        seed_generator=head.seed_generator,
    )
    # 3. The logits of the target and the drawn classes, from their
    # gathered rows (or, with few classes, from all logits).
    student_logits, rows = head.subset_logits(features, subset)
    # 4. The importance-sampling estimator over the subset.
    estimator_inputs = {
        "student_logits": student_logits,
        "teacher_logits": teacher_logits,
        "temperature": loss.temperature,
        "log_proposal": log_weights,
        "distillation_weight": loss.distillation_weight,
        "label_position": 0,
    }
    # 5. The head's row update, from the closed-form logit gradients.
    if head.row_sparse_optimizer is not None:
        logit_gradients = sampled_softmax.distillation_cross_entropy_gradient(
            **estimator_inputs
        )
        weights = reduction_weights(
            loss.reduction, ops.shape(features)[0], sample_weight
        )
        head.row_sparse_optimizer.apply(
            subset,
            logit_gradients * weights[:, None],
            features,
            rows,
            valid=error_code == input_checks.OK,
        )
    return sampled_softmax.distillation_cross_entropy(**estimator_inputs)
