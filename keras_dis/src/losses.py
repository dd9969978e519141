"""`DISLoss`: distillation over a sampled subset of classes."""

import keras
from keras import ops

from keras_dis.src import proposals as proposals_module
from keras_dis.src import sampled_softmax
from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.head import pop_training_head

FULL = "full"
SAMPLED_PROPOSALS = ("dis", "ftis", "uniform")
PROPOSAL_NAMES = SAMPLED_PROPOSALS + ("pdbs", FULL)

# Every row of the paper's tables, by name.
METHODS = {
    "hard_labels": {"proposal": FULL, "distillation_weight": 0.0},
    "full_kd": {"proposal": FULL},
    "pdbs": {"proposal": "pdbs"},
    "uniform": {"proposal": "uniform"},
    "ftis": {"proposal": "ftis"},
    "dis": {"proposal": "dis"},
}


@keras.saving.register_keras_serializable(package="keras_dis")
class DISLoss(keras.losses.Loss):
    """Knowledge distillation over the target plus `k` sampled classes.

    Implements the self-normalised importance-sampling estimator of the DIS
    paper (Alg. 1): the subset is the target class `y` (with proposal 1)
    plus `k` classes drawn with replacement by teacher rank from a proposal
    `r`; teacher and student logits are corrected by `- log r` and the
    cross-entropy between their softmaxes over the subset is the loss.
    `proposal` picks the row of the paper's tables:

    | proposal    | subset                                   | cost per step |
    |-------------|------------------------------------------|---------------|
    | `"dis"`     | Laplace mixture over ranks (annealed)    | `B*k*d`       |
    | `"ftis"`    | the teacher's own prediction             | `B*k*d`       |
    | `"uniform"` | uniform over classes                     | `B*k*d`       |
    | `"pdbs"`    | top-k of `abs(p - q)`, no correction     | `B*C*d`       |
    | `"full"`    | every class: full KD                     | `B*C*d`       |

    Hard-label training is `DISLoss(proposal="full",
    distillation_weight=0.0)`; `keras_dis.losses.get("hard_labels")` and
    the other names in `METHODS` build each row.

    Targets (`y_true`): packed teacher targets, `(batch, 2 + 2R)` -- the
    label, the teacher's top-`R` classes and logits and a tail logit; see
    `keras_dis.pack_teacher_targets` and `keras_dis.TeacherCache`.

    Predictions (`y_pred`): the output of a `keras_dis.SampledDistillationHead`.
    In training the head hands over its features and this loss gathers the
    rows of the sampled classes only. Given full logits `(batch, C)` instead
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
        reduction="sum_over_batch_size",
        name="dis_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"`k` must be an integer >= 1. Received: k={k!r}"
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
        self._sample_weight = None

    @property
    def proposal_name(self):
        return FULL if self.proposal == FULL else self.proposal.name

    def _check_num_classes(self, num_classes):
        if self.proposal_name != FULL and self.k >= num_classes:
            raise ValueError(
                f"`k` must be smaller than the number of classes "
                f"({num_classes}) for proposal '{self.proposal_name}'. "
                f"Received: k={self.k}"
            )

    def call(self, y_true, y_pred):
        targets = targets_module.unpack_teacher_targets(y_true)
        head = pop_training_head()
        if head is None:
            return self._full_softmax_loss(targets, y_pred)
        features = ops.cast(y_pred, "float32")
        if features.shape[-1] != head.kernel.shape[-1]:
            raise ValueError(
                "In training, `y_pred` must be the features that the "
                "SampledDistillationHead passes through, of shape (batch, "
                f"{head.kernel.shape[-1]}). Received: y_pred.shape="
                f"{y_pred.shape}. Make the head the model's output."
            )
        self._check_num_classes(head.num_classes)
        if self.proposal_name in SAMPLED_PROPOSALS:
            return self._sampled_loss(head, features, targets)
        if head.optimizer is not None:
            raise ValueError(
                "A SampledDistillationHead with its own `optimizer` trains "
                "its rows from sampled classes only: use proposal 'dis', "
                "'ftis' or 'uniform', or build the head without `optimizer`. "
                f"Received: proposal={self.proposal_name!r}"
            )
        if self.proposal_name == "pdbs":
            return self._selected_loss(targets, head.full_logits(features))
        return self._full_softmax_loss(targets, head.full_logits(features))

    def _sampled_loss(self, head, features, targets):
        labels, tail_logits, top_classes, top_logits = targets
        num_classes = head.num_classes
        log_bins = self.proposal.log_bin_probabilities(
            top_logits,
            num_classes=num_classes,
            temperature=self.temperature,
            tail_logits=tail_logits,
            rank_proposal=head.rank_proposal,
        )
        classes, teacher_logits, log_proposal = sampled_softmax.sample_classes(
            log_bins,
            top_classes,
            top_logits,
            tail_logits,
            num_classes=num_classes,
            num_samples=self.k,
            seed_generator=head.seed_generator,
        )
        label_logits = sampled_softmax.label_teacher_logits(
            labels, top_classes, top_logits, tail_logits
        )
        subset = ops.concatenate([labels[:, None], classes], axis=-1)
        rows = head.gather_rows(subset)
        estimator_inputs = {
            "student_logits": head.sampled_logits(features, subset, rows),
            "teacher_logits": ops.concatenate(
                [label_logits[:, None], teacher_logits], axis=-1
            ),
            "temperature": self.temperature,
            "log_proposal": ops.pad(log_proposal, ((0, 0), (1, 0))),
            "distillation_weight": self.distillation_weight,
            "label_position": 0,
        }
        if head.row_sparse_optimizer is not None:
            logit_gradients = sampled_softmax.distillation_cross_entropy_gradient(
                **estimator_inputs
            )
            head.row_sparse_optimizer.apply(
                subset,
                logit_gradients * self._reduction_weights(features)[:, None],
                features,
                rows,
            )
        return sampled_softmax.distillation_cross_entropy(**estimator_inputs)

    def _reduction_weights(self, features):
        """d (reduced loss) / d (loss of each sample), `(batch,)`."""
        batch_size = ops.shape(features)[0]
        weights = ops.ones((batch_size,), "float32")
        if self._sample_weight is not None:
            weights = ops.reshape(ops.cast(self._sample_weight, "float32"), (-1,))
        if self.reduction == "sum":
            return weights
        if self.reduction == "sum_over_batch_size":
            return weights / ops.cast(batch_size, "float32")
        raise ValueError(
            "Row-sparse head updates need `reduction` 'sum_over_batch_size' "
            f"or 'sum'. Received: reduction={self.reduction!r}"
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        # The row-sparse update needs the weights that the reduction applies.
        self._sample_weight = sample_weight
        try:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        finally:
            self._sample_weight = None

    def _full_softmax_loss(self, targets, student_logits):
        num_classes = student_logits.shape[-1]
        self._check_num_classes(num_classes)
        return sampled_softmax.distillation_cross_entropy(
            student_logits,
            targets_module.dense_teacher_logits(targets, num_classes),
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
            }
        )
        return config


def get(method, k=10, **kwargs):
    """The loss of a row of the paper's tables, by name.

    Args:
        method: one of `METHODS`: `"hard_labels"`, `"full_kd"`, `"pdbs"`,
            `"uniform"`, `"ftis"`, `"dis"`.
        k: int, the subset size of the sampled and selected methods.
        **kwargs: other `DISLoss` arguments (`temperature`, ...).

    Returns:
        A `DISLoss`.

    Example:

    >>> get("ftis", k=5).proposal_name
    'ftis'
    """
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {list(METHODS)}. Received: method={method!r}"
        )
    return DISLoss(k=k, **{**METHODS[method], **kwargs})
