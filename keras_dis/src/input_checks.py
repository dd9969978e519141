"""Checks of teacher targets inside a training step, as `keras.ops`.

NumPy inputs are checked on the host before training
(`keras_dis.pack_teacher_targets`, `keras_dis.Distiller.fit`); data that
arrives batch by batch (`tf.data`, generators, `keras.utils.PyDataset`,
`keras_dis.TeacherCacheDataset`) or comes from an online teacher is only
seen inside the compiled step. `check_teacher_targets` looks at a batch
there, in `O(batch * R)`: it returns the first problem found as an error
code and the offending value, and the targets made safe to compute with,
so that a bad batch produces no NaN anywhere: the step then trains on
nothing (its loss is NaN, its gradients are zero and the head's rows are
left alone) and the error is raised with `error_message` (see
`keras_dis.src.backend.raise_input_error`).
"""

import numpy as np
from keras import ops

from keras_dis.src import teacher_targets as targets_module

# Error codes, in the order they are looked for; 0 means no error.
OK = 0
LABEL_OUT_OF_RANGE = 1
CLASS_ID_OUT_OF_RANGE = 2
NON_FINITE_TEACHER_LOGIT = 3
ONE_HOT_TARGETS = 4
ERROR_CODES = (
    LABEL_OUT_OF_RANGE,
    CLASS_ID_OUT_OF_RANGE,
    NON_FINITE_TEACHER_LOGIT,
    ONE_HOT_TARGETS,
)


def check_positive_integer(name, value):
    """Raises a `ValueError` naming the argument `name` unless `value` is
    an integer >= 1 (a Python or NumPy integer, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
        )


def error_message(code, value, num_classes):
    """The message of an input error found by `check_teacher_targets`.

    Args:
        code: int, one of `ERROR_CODES`.
        value: float, the offending value.
        num_classes: int, `C`.

    Returns:
        A string naming the argument, the bad value and what to do.

    Example:

    >>> error_message(LABEL_OUT_OF_RANGE, 12.0, 10)[:47]
    '`y` holds a label that is not a class id in [0,'
    """
    value = float(value)
    shown = int(value) if value.is_integer() else value
    if code == LABEL_OUT_OF_RANGE:
        return (
            f"`y` holds a label that is not a class id in [0, {num_classes}) "
            f"(an integer). Received: label={shown}. Check the labels of the "
            "data set (and that the model has as many classes as the data)."
        )
    if code == CLASS_ID_OUT_OF_RANGE:
        return (
            "`y` (packed teacher targets) holds a teacher class id that is "
            f"not an integer in [0, {num_classes}). Received: class id="
            f"{shown}. The targets were packed for another number of classes "
            "or are corrupt: repack them with `keras_dis.pack_teacher_targets`"
            " or rebuild the `keras_dis.TeacherCache`."
        )
    if code == NON_FINITE_TEACHER_LOGIT:
        return (
            "The teacher logits must be finite. Received: teacher logit="
            f"{shown} in `y` (packed teacher targets, or the output of the "
            "online teacher). Check the teacher (or the cache it filled)."
        )
    if code == ONE_HOT_TARGETS:
        return (
            f"`y` looks like one-hot labels of shape (batch, {num_classes}), "
            "not packed teacher targets (batch, 2 + 2R). Pass integer labels "
            "of shape (batch,) with a teacher, or targets from "
            "`keras_dis.pack_teacher_targets`."
        )
    raise ValueError(f"Unknown input error code: {code}")


def _not_a_class_id(values, num_classes):
    return ops.logical_or(
        ops.logical_or(values < 0, values >= num_classes),
        ops.logical_or(ops.floor(values) != values, ops.isnan(values)),
    )


def check_teacher_targets(packed_targets, num_classes):
    """Looks for bad values in a batch of packed teacher targets.

    Args:
        packed_targets: float tensor `(batch, 2 + 2R)`, see
            `keras_dis.pack_teacher_targets`.
        num_classes: int, `C`, the number of classes of the student.

    Returns:
        A tuple `(error_code, error_value, safe_targets)`: an int32 scalar
        (`OK` or one of `ERROR_CODES`, the first found), a float32 scalar
        (the offending value) and the tuple `(labels, tail_logits,
        top_classes, top_logits)` of `unpack_teacher_targets`, with class
        ids clipped into range and non-finite logits replaced by 0.

    Example:

    >>> targets = np.array([[1.0, 0.0, 1.0, 0.0, 2.0, 0.5]], "float32")
    >>> code, value, _ = check_teacher_targets(targets, num_classes=3)
    >>> int(code), float(value)
    (0, 0.0)
    >>> targets[0, 0] = 3.0  # a label outside [0, 3)
    >>> code, value, _ = check_teacher_targets(targets, num_classes=3)
    >>> int(code), float(value)
    (1, 3.0)
    """
    packed_targets = ops.cast(packed_targets, "float32")
    top_r = targets_module.top_r_of(packed_targets)
    header = targets_module.HEADER_COLUMNS
    # The error each column can hold, and then one pass over the batch: a
    # few fused element-wise ops and two reductions, whatever the checks.
    column_errors = np.full((packed_targets.shape[-1],), NON_FINITE_TEACHER_LOGIT)
    column_errors[targets_module.LABEL_COLUMN] = LABEL_OUT_OF_RANGE
    column_errors[header : header + top_r] = CLASS_ID_OUT_OF_RANGE
    holds_id = column_errors != NON_FINITE_TEACHER_LOGIT
    bad = ops.where(
        holds_id[None, :],
        _not_a_class_id(packed_targets, num_classes),
        ops.logical_not(ops.isfinite(packed_targets)),
    )
    errors = ops.where(bad, column_errors[None, :].astype("int32"), 0)
    if packed_targets.shape[-1] == num_classes:
        # One-hot rows (0/1, summing to 1) have the width of C classes.
        binary = ops.all(
            ops.logical_or(packed_targets == 0, packed_targets == 1), axis=-1
        )
        one_hot = ops.logical_and(binary, ops.sum(packed_targets, axis=-1) == 1)
        errors = ops.maximum(
            errors, ops.where(one_hot, ONE_HOT_TARGETS, 0)[:, None]
        )
    # The first error in the order of `ERROR_CODES`, and one of its values.
    error_code = ops.min(ops.where(errors > 0, errors, len(ERROR_CODES) + 1))
    error_code = ops.where(error_code > len(ERROR_CODES), OK, error_code)
    position = ops.argmax(ops.reshape(errors == error_code, (-1,)))
    error_value = ops.take(ops.reshape(packed_targets, (-1,)), position)
    error_value = ops.where(error_code == OK, 0.0, error_value)
    error_value = ops.where(error_code == ONE_HOT_TARGETS, 1.0, error_value)
    labels = packed_targets[:, targets_module.LABEL_COLUMN]
    top_classes = packed_targets[:, header : header + top_r]
    safe_targets = (
        ops.cast(ops.clip(ops.nan_to_num(labels), 0, num_classes - 1), "int32"),
        _finite_or_zero(packed_targets[:, targets_module.TAIL_LOGIT_COLUMN]),
        ops.cast(
            ops.clip(ops.nan_to_num(top_classes), 0, num_classes - 1), "int32"
        ),
        _finite_or_zero(packed_targets[:, header + top_r :]),
    )
    return ops.cast(error_code, "int32"), error_value, safe_targets


def _finite_or_zero(values):
    return ops.where(ops.isfinite(values), values, ops.zeros_like(values))


def keep_if_valid(error_code, values):
    """`values` where the batch passed its checks, else NaN (no gradient)."""
    nan = ops.stop_gradient(ops.full_like(values, float("nan")))
    return ops.where(error_code == OK, values, nan)

