"""The teacher targets: what a sampled distillation loss receives as `y_true`.

A batch of teacher targets is one float32 tensor of shape
`(batch, 2 + 2 * R)`, the teacher's ranking truncated to its top `R` classes:

| columns          | content                                               |
|------------------|-------------------------------------------------------|
| `0`              | the ground-truth label `y` (an integer stored exactly) |
| `1`              | the tail logit: log-mean-exp of the teacher's logits   |
|                  | over the `C - R` classes outside the top `R` (0 if     |
|                  | `R == C`)                                             |
| `2 : 2 + R`      | the teacher's top `R` classes, best first              |
| `2 + R : 2 + 2R` | their teacher logits (before the temperature)          |

Class ids are stored as float32, exact below `2**24` (16.7 million classes).
The tail logit keeps the teacher's normaliser exact at temperature 1: the
`C - R` tail classes together carry the same mass as in the full softmax.
"""

import keras
import numpy as np
from keras import ops

MAX_EXACT_CLASS_ID = 2**24

LABEL_COLUMN = 0
TAIL_LOGIT_COLUMN = 1
HEADER_COLUMNS = 2


def targets_width(top_r):
    """Number of columns of packed teacher targets for a top-`R` ranking."""
    return HEADER_COLUMNS + 2 * top_r


def top_r_of(teacher_targets):
    """The `R` of packed teacher targets, from their static width."""
    width = teacher_targets.shape[-1]
    if width is None or width < HEADER_COLUMNS + 2 or (width % 2) != 0:
        raise ValueError(
            "Teacher targets must have 2 + 2 * R columns (label, tail logit, "
            "R classes, R logits); see `keras_dis.pack_teacher_targets`. "
            f"Received: y_true with shape {teacher_targets.shape}"
        )
    return (width - HEADER_COLUMNS) // 2


def unpack_teacher_targets(teacher_targets):
    """Splits packed teacher targets into their parts.

    Args:
        teacher_targets: tensor of shape `(batch, 2 + 2 * R)`.

    Returns:
        A tuple `(labels, tail_logits, top_classes, top_logits)` of shapes
        `(batch,)` int32, `(batch,)` float32, `(batch, R)` int32 and
        `(batch, R)` float32.
    """
    top_r = top_r_of(teacher_targets)
    teacher_targets = ops.cast(teacher_targets, "float32")
    labels = ops.cast(teacher_targets[:, LABEL_COLUMN], "int32")
    tail_logits = teacher_targets[:, TAIL_LOGIT_COLUMN]
    top_classes = ops.cast(
        teacher_targets[:, HEADER_COLUMNS : HEADER_COLUMNS + top_r], "int32"
    )
    top_logits = teacher_targets[:, HEADER_COLUMNS + top_r :]
    return labels, tail_logits, top_classes, top_logits


def scatter_rows(base, classes, values):
    """Writes `values` at `classes` in each row of `base`.

    Args:
        base: tensor of shape `(batch, C)`.
        classes: int tensor of shape `(batch, R)`, distinct within a row.
        values: tensor of shape `(batch, R)`.

    Returns:
        A tensor like `base` with `result[b, classes[b, j]] = values[b, j]`.
    """
    batch_size, top_r = ops.shape(classes)[0], classes.shape[-1]
    rows = ops.repeat(ops.arange(batch_size, dtype="int32"), top_r)
    positions = ops.stack(
        [rows, ops.cast(ops.reshape(classes, (-1,)), "int32")], axis=1
    )
    return ops.scatter_update(
        base, positions, ops.cast(ops.reshape(values, (-1,)), base.dtype)
    )


def dense_teacher_logits(labels_and_ranking, num_classes):
    """Rebuilds `(batch, C)` teacher logits from packed teacher targets.

    Classes outside the cached top `R` get the tail logit. Used only by the
    baselines that need every class (full KD, PDBS).

    Args:
        labels_and_ranking: the tuple returned by `unpack_teacher_targets`.
        num_classes: int, `C`.

    Returns:
        A float32 tensor of shape `(batch, num_classes)`.
    """
    _, tail_logits, top_classes, top_logits = labels_and_ranking
    base = ops.broadcast_to(
        tail_logits[:, None], (ops.shape(tail_logits)[0], num_classes)
    )
    return scatter_rows(base, top_classes, top_logits)


def _check_concrete_inputs(labels, teacher_logits, num_classes):
    labels = np.asarray(labels)
    teacher_logits = np.asarray(teacher_logits)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`labels` must be class ids in [0, {num_classes}). Received "
            f"labels in [{labels.min()}, {labels.max()}]"
        )
    if not np.all(np.isfinite(teacher_logits)):
        bad = int(np.sum(~np.isfinite(teacher_logits)))
        raise ValueError(
            "`teacher_logits` must be finite; "
            f"{bad} entries are NaN or infinite. Check the teacher's outputs "
            "(or lower the learning rate that trained it)."
        )


def pack_teacher_targets(labels, teacher_logits, top_r=None):
    """Packs labels and teacher logits into the targets `DISLoss` reads.

    Keeps the teacher's top `top_r` classes and logits per sample and the
    log-mean-exp of the remaining logits (the tail). Works on NumPy arrays
    (checked: labels in range, finite logits) and, unchecked, on backend
    tensors inside a compiled step (what `Distiller` does with an online
    teacher).

    Args:
        labels: int array of shape `(batch,)` or `(batch, 1)`.
        teacher_logits: float array of shape `(batch, C)`.
        top_r: int in `[1, C]`, how many ranked classes to keep. Defaults to
            `C` (the full ranking, exact).

    Returns:
        A float32 tensor of shape `(batch, 2 + 2 * top_r)`.

    Example:

    >>> targets = pack_teacher_targets(
    ...     labels=np.array([2]), teacher_logits=np.array([[0.0, 1.0, 3.0]]),
    ...     top_r=2)
    >>> keras.ops.convert_to_numpy(targets).tolist()
    [[2.0, 0.0, 2.0, 1.0, 3.0, 1.0]]
    """
    num_classes = teacher_logits.shape[-1]
    if len(teacher_logits.shape) != 2:
        raise ValueError(
            "`teacher_logits` must have shape (batch, num_classes). "
            f"Received: teacher_logits.shape={tuple(teacher_logits.shape)}"
        )
    if num_classes >= MAX_EXACT_CLASS_ID:
        raise ValueError(
            f"At most {MAX_EXACT_CLASS_ID - 1} classes are supported (class "
            "ids are stored exactly in float32). Received: "
            f"{num_classes} classes"
        )
    top_r = num_classes if top_r is None else top_r
    if not isinstance(top_r, (int, np.integer)) or not 1 <= top_r <= num_classes:
        raise ValueError(
            f"`top_r` must be an integer in [1, {num_classes}]. "
            f"Received: top_r={top_r}"
        )
    if isinstance(labels, np.ndarray) or isinstance(teacher_logits, np.ndarray):
        _check_concrete_inputs(labels, teacher_logits, num_classes)
    teacher_logits = ops.cast(teacher_logits, "float32")
    labels = ops.reshape(ops.cast(labels, "float32"), (-1, 1))
    top_logits, top_classes = ops.top_k(teacher_logits, k=top_r)
    tail_size = num_classes - top_r
    if tail_size > 0:
        in_top = scatter_rows(
            ops.zeros_like(teacher_logits), top_classes, ops.ones_like(top_logits)
        )
        tail_logsumexp = ops.logsumexp(
            ops.where(in_top > 0, -np.inf, teacher_logits), axis=-1
        )
        tail_logits = tail_logsumexp - float(np.log(tail_size))
    else:
        tail_logits = ops.zeros_like(teacher_logits[:, 0])
    return ops.concatenate(
        [
            labels,
            ops.reshape(tail_logits, (-1, 1)),
            ops.cast(top_classes, "float32"),
            top_logits,
        ],
        axis=-1,
    )
