"""`DISLoss`: distillation over a sampled subset of classes."""

import keras
from keras import ops
from keras.src.losses.loss import reduce_weighted_values

from keras_dis.src import input_checks
from keras_dis.src import proposals as proposals_module
from keras_dis.src import sampled_softmax
from keras_dis.src import sampled_step
from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.sampled_step import SAMPLED_PROPOSALS

FULL = "full"
PROPOSAL_NAMES = SAMPLED_PROPOSALS + ("pdbs", FULL)

# Every row of the paper's tables, by name, then the estimators that keep
# the teacher's top classes exact (`exact_top`; `None` is the default share,
# `TOP_K` all `k` entries) and sample only the rest.
TOP_K = "k"
METHODS = {
    "hard_labels": {"proposal": FULL, "distillation_weight": 0.0},
    "full_kd": {"proposal": FULL},
    "pdbs": {"proposal": "pdbs"},
    "uniform": {"proposal": "uniform", "exact_top": 0},
    "ftis": {"proposal": "ftis", "exact_top": 0},
    "dis": {"proposal": "dis", "exact_top": 0},
    "teacher_uniform": {"proposal": "teacher_uniform", "exact_top": 0},
    "exact_top_dis": {"proposal": "dis", "exact_top": None},
    "exact_top_uniform": {"proposal": "uniform", "exact_top": None},
    "exact_top_teacher_uniform": {
        "proposal": "teacher_uniform",
        "exact_top": None,
    },
    "top_k": {"proposal": "uniform", "exact_top": TOP_K},
}
# The rows of the paper's tables, and the method `DISLoss()` runs.
PAPER_METHODS = ("hard_labels", "full_kd", "pdbs", "uniform", "ftis", "dis")
DEFAULT_METHOD = "exact_top_dis"


@keras.saving.register_keras_serializable(package="keras_dis")
class DISLoss(keras.losses.Loss):
    """Knowledge distillation over the target plus `k` sampled classes.

    Implements the self-normalised importance-sampling estimator of the DIS
    paper (Alg. 1): the subset is the target class `y` (with proposal 1)
    plus `k` classes drawn with replacement by teacher rank from a proposal
    `r`; teacher and student logits are corrected by `- log r` and the
    cross-entropy between their softmaxes over the subset is the loss.
    With `exact_top=m`, the teacher's top `m` classes enter every step
    exactly and only `k - m` classes are drawn, from the ranks below them
    (see `keras_dis.src.sampled_softmax.sample_subset`). `proposal` picks
    the row of the paper's tables, or another proposal:

    | proposal            | subset                                | cost per step |
    |---------------------|---------------------------------------|---------------|
    | `"dis"`             | Laplace mixture over ranks (annealed) | `B*k*d`       |
    | `"ftis"`            | the teacher's own prediction          | `B*k*d`       |
    | `"uniform"`         | uniform over classes                  | `B*k*d`       |
    | `"teacher_uniform"` | half teacher (at `T`), half uniform   | `B*k*d`       |
    | `"pdbs"`            | top-k of `abs(p - q)`, no correction  | `B*C*d`       |
    | `"full"`            | every class: full KD                  | `B*C*d`       |

    Hard-label training is `DISLoss(proposal="full",
    distillation_weight=0.0)`; `keras_dis.losses.get("hard_labels")` and
    the other names in `METHODS` build each row (`get("dis")` is the
    paper's DIS, with `exact_top=0`).

    Targets (`y_true`): packed teacher targets, `(batch, 2 + 2R)` -- the
    label, the teacher's top-`R` classes and logits and a tail logit; see
    `keras_dis.pack_teacher_targets` and `keras_dis.TeacherCache`.

    Predictions (`y_pred`): the output of a `keras_dis.SampledDistillationHead`.
    In training the head returns its features, tagged with the head, and
    this loss runs the head's sampled step (`keras_dis.src.sampled_step`):
    it gathers the rows of the sampled classes only and, when the head has
    a row-sparse optimizer, updates those rows. Given full logits `(batch, C)` instead
    (the head at evaluation, or any other classifier), the loss is the exact
    full-softmax loss for every proposal, so validation losses compare across
    methods.

    Args:
        k: int >= 1, the number of sampled (or, for PDBS, selected) classes
            besides the target; must be smaller than the number of classes.
        proposal: one of `"dis"`, `"ftis"`, `"uniform"`, `"pdbs"`, `"full"`
            or a proposal instance from `keras_dis.proposals`. The shape of
            the DIS mixture is set on the head (`rank_proposal=`).
        temperature: float > 0, the distillation temperature `T`.
        distillation_weight: float in [0, 1], `lambda` of
            `lambda * KD + (1 - lambda) * CE(y)`; the paper uses 1.
        exact_top: None or int in `[0, k]`: how many of the `k` classes
            are the teacher's top classes, taken exactly rather than
            sampled (0: the paper's Alg. 1; `k`: the top `k` only, no
            sampling, biased). None: `default_exact_top(k)`. Needs targets
            packed with `top_r >= exact_top`.
        reduction: as for any Keras loss.
        name: name of the loss.
        dtype: dtype of the loss computation (float32 by default, also under
            mixed precision).

    Example:

    ```python
    features = keras.Input((64,))
    # `optimizer=` on the head: only the sampled rows are updated.
    head = keras_dis.SampledDistillationHead(num_classes=1000, optimizer="adam")
    student = keras.Model(features, head(features))
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=10))
    targets = keras_dis.pack_teacher_targets(labels, teacher_logits)
    student.fit(x, targets, epochs=3, callbacks=[keras_dis.ProposalScheduler()])
    ```
    """

    def __init__(
        self,
        k=10,
        proposal="dis",
        temperature=1.0,
        distillation_weight=1.0,
        exact_top=None,
        reduction="sum_over_batch_size",
        name="dis_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"`k` must be an integer >= 1. Received: k={k!r}"
            )
        if exact_top is not None and (
            isinstance(exact_top, bool)
            or not isinstance(exact_top, int)
            or not 0 <= exact_top <= k
        ):
            raise ValueError(
                f"`exact_top` must be None or an integer in [0, k={k}]. "
                f"Received: exact_top={exact_top!r}"
            )
        if not temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={temperature}"
            )
        if not 0.0 <= distillation_weight <= 1.0:
            raise ValueError(
                "`distillation_weight` must be in [0, 1]. "
                f"Received: distillation_weight={distillation_weight}"
            )
        if isinstance(proposal, dict):
            proposal = keras.saving.deserialize_keras_object(proposal)
        if proposal != FULL:
            proposal = proposals_module.get(proposal)
        self.k = k
        self.proposal = proposal
        self.temperature = float(temperature)
        self.distillation_weight = float(distillation_weight)
        self.exact_top = exact_top

    @property
    def proposal_name(self):
        return FULL if self.proposal == FULL else self.proposal.name

    @property
    def exact_top_count(self):
        """How many of the `k` entries are the teacher's exact top classes
        (`exact_top`, or by default `default_exact_top(k)`)."""
        if self.exact_top is None:
            return default_exact_top(self.k)
        return self.exact_top

    def check_num_classes(self, num_classes):
        """Raises a `ValueError` if `k` does not fit `num_classes`."""
        if self.proposal_name != FULL and self.k >= num_classes:
            raise ValueError(
                f"`k` must be smaller than the number of classes "
                f"({num_classes}) for proposal '{self.proposal_name}'. "
                f"Received: k={self.k}"
            )

    def __call__(self, y_true, y_pred, sample_weight=None):
        check_packed_targets_shape(y_true)
        head = sampled_step.training_head(y_pred)
        if head is None:
            logits_head = sampled_step.logits_head(y_pred)
            if logits_head is not None and y_pred.shape[-1] is not None:
                # Full logits of a head: input errors that the step cannot
                # raise are recorded in the head (see `input_checks`).
                sampled_step.validated_teacher_targets(
                    y_true, y_pred.shape[-1], logits_head
                )
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        # The training output of a SampledDistillationHead: its features.
        head.claim_training_output(y_pred)
        with keras.name_scope(self.name):
            losses = sampled_step.distillation_losses(
                head,
                y_pred,
                ops.convert_to_tensor(y_true, "float32"),
                self,
                sample_weight=sample_weight,
            )
            return reduce_weighted_values(
                losses,
                sample_weight=sample_weight,
                reduction=self.reduction,
                dtype=self.dtype,
            )

    def call(self, y_true, y_pred):
        """The loss of full logits `y_pred`, `(batch, C)`, per sample."""
        num_classes = y_pred.shape[-1]
        top_r = targets_module.top_r_of(y_true)
        if num_classes is not None and top_r > num_classes:
            raise ValueError(
                f"`y_true` ranks {top_r} classes but `y_pred` has "
                f"{num_classes}: the targets were packed for another number "
                f"of classes. Received: y_true.shape={tuple(y_true.shape)}, "
                f"y_pred.shape={tuple(y_pred.shape)}"
            )
        error_code, _, targets = sampled_step.validated_teacher_targets(
            y_true, num_classes
        )
        return input_checks.keep_if_valid(
            error_code, self.losses_from_logits(targets, y_pred)
        )

    def losses_from_logits(self, targets, student_logits):
        """Per-sample losses of full student logits.

        The exact full-softmax loss, or PDBS's selected subset.

        Args:
            targets: `(labels, tail_logits, top_classes, top_logits)`, as
                from `keras_dis.src.teacher_targets.unpack_teacher_targets`.
            student_logits: float tensor `(batch, C)`.

        Returns:
            float32 tensor `(batch,)`.
        """
        self.check_num_classes(student_logits.shape[-1])
        if self.proposal_name == "pdbs":
            return self._selected_loss(targets, student_logits)
        return sampled_softmax.distillation_cross_entropy(
            student_logits,
            targets_module.dense_teacher_logits(
                targets, student_logits.shape[-1]
            ),
            temperature=self.temperature,
            distillation_weight=self.distillation_weight,
            labels=targets[0],
        )

    def _selected_loss(self, targets, student_logits):
        labels = targets[0]
        teacher_logits = targets_module.dense_teacher_logits(
            targets, student_logits.shape[-1]
        )
        selected = self.proposal.select(
            ops.softmax(teacher_logits / self.temperature),
            ops.softmax(student_logits / self.temperature),
            self.k,
        )
        subset = ops.concatenate([labels[:, None], selected], axis=-1)
        return sampled_softmax.distillation_cross_entropy(
            ops.take_along_axis(student_logits, subset, axis=-1),
            ops.take_along_axis(teacher_logits, subset, axis=-1),
            temperature=self.temperature,
            distillation_weight=self.distillation_weight,
            label_position=0,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "proposal": (
                    FULL
                    if self.proposal == FULL
                    else keras.saving.serialize_keras_object(self.proposal)
                ),
                "temperature": self.temperature,
                "distillation_weight": self.distillation_weight,
                "exact_top": self.exact_top,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Losses saved before `exact_top` existed ran the paper's Alg. 1.
        config = {"exact_top": 0, **config}
        return cls(**config)


def default_exact_top(k):
    """The number of exact top classes `DISLoss(k=k)` uses by default."""
    return k // 2


def check_packed_targets_shape(y_true):
    """Raises a `ValueError` unless `y_true` has the shape of packed teacher
    targets, `(batch, 2 + 2R)`."""
    shape = None if y_true is None else tuple(y_true.shape)
    if shape is not None and len(shape) == 2 and shape[-1] != 1:
        targets_module.top_r_of(y_true)
        return
    raise ValueError(
        "keras_dis.DISLoss needs `y`: packed teacher targets of shape "
        "(batch, 2 + 2R) from `keras_dis.pack_teacher_targets` or a "
        "`keras_dis.TeacherCache`. Integer labels need the teacher: train "
        "with `keras_dis.Distiller(teacher, student)`. Received: y "
        f"{'None' if shape is None else f'with shape {shape}'}"
    )


def get(method, k=10, **kwargs):
    """The loss of a row of the paper's tables, or of another estimator, by
    name.

    Args:
        method: one of `METHODS`: the paper's `"hard_labels"`, `"full_kd"`,
            `"pdbs"`, `"uniform"`, `"ftis"`, `"dis"`, and `"teacher_uniform"`,
            `"exact_top_dis"`, `"exact_top_uniform"`,
            `"exact_top_teacher_uniform"`, `"top_k"` (the teacher's top `k`
            classes only, no sampling: biased).
        k: int, the subset size of the sampled and selected methods.
        **kwargs: other `DISLoss` arguments (`temperature`, ...).

    Returns:
        A `DISLoss`.

    Example:

    >>> get("ftis", k=5).proposal_name
    'ftis'
    >>> get("top_k", k=5).exact_top
    5
    """
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {list(METHODS)}. Received: method={method!r}"
        )
    options = {**METHODS[method], **kwargs}
    if options.get("exact_top") == TOP_K:
        options["exact_top"] = k
    return DISLoss(k=k, **options)
