"""Proposal distributions over the teacher's ranking of the classes.

Every proposal is expressed over *rank bins*: rank 0 is the teacher's top
class of a sample. With a teacher ranking truncated to its top `R` classes
(see `keras_dis.pack_teacher_targets`), there are `R + 1` bins: one per
ranked class, then one "tail" bin that stands for the `C - R` remaining
classes, drawn uniformly when the tail bin is sampled. With `R == C` the tail
bin is empty and has probability zero.

A proposal returns log-probabilities of those bins, of shape `(1, R + 1)`
when the proposal is shared by the whole batch (uniform, DIS) or
`(batch, R + 1)` when it is per sample (FTIS). `keras_dis.DISLoss` samples
from them and applies the log-proposal correction.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_dis.src import backend

RANKS = "ranks"
FRACTION = "fraction"


def _tail_size(num_classes, top_r):
    return num_classes - top_r


class Proposal:
    """Base of the proposals: a `name` and a config made of the constructor
    arguments (none by default).

    A sampling proposal implements `log_bin_probabilities(teacher_logits,
    num_classes, temperature, tail_logits=None, rank_proposal=None)`: from
    the cached top-`R` teacher logits `(batch, R)`, the tail logits
    `(batch,)` and the head's `rank_proposal` `(C,)`, the log-probabilities
    of the `R + 1` rank bins, `(1 or batch, R + 1)`.
    """

    name = None

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_dis")
class UniformProposal(Proposal):
    """Uniform proposal: every class has probability `1 / C`.

    The paper's "uniform sampling" baseline. The proposal is shared by the
    batch and needs nothing from the teacher.

    Example:

    >>> proposal = UniformProposal()
    >>> log_bins = proposal.log_bin_probabilities(
    ...     teacher_logits=np.zeros((2, 3)), num_classes=10, temperature=1.0)
    >>> np.round(np.exp(keras.ops.convert_to_numpy(log_bins)), 2)
    array([[0.1, 0.1, 0.1, 0.7]], dtype=float32)
    """

    name = "uniform"

    def log_bin_probabilities(
        self,
        teacher_logits,
        num_classes,
        temperature,
        tail_logits=None,
        rank_proposal=None,
    ):
        top_r = teacher_logits.shape[-1]
        bins = np.full((1, top_r + 1), 1.0 / num_classes, dtype="float64")
        bins[0, top_r] = _tail_size(num_classes, top_r) / num_classes
        with np.errstate(divide="ignore"):
            return ops.convert_to_tensor(np.log(bins), dtype="float32")



@keras.saving.register_keras_serializable(package="keras_dis")
class TeacherProposal(Proposal):
    """Fixed teacher importance sampling (FTIS): sample from the teacher.

    The proposal of a sample is the teacher's own prediction
    `softmax(t / T)` of that sample, so it differs per sample. Classes past
    the cached top `R` all carry the cached tail logit (see
    `keras_dis.pack_teacher_targets`).

    Example:

    >>> proposal = TeacherProposal()
    >>> log_bins = proposal.log_bin_probabilities(
    ...     teacher_logits=np.log([[0.5, 0.3]]), num_classes=3,
    ...     temperature=1.0, tail_logits=np.log([0.2]))
    >>> np.round(np.exp(keras.ops.convert_to_numpy(log_bins)), 2)
    array([[0.5, 0.3, 0.2]], dtype=float32)
    """

    name = "ftis"

    def log_bin_probabilities(
        self,
        teacher_logits,
        num_classes,
        temperature,
        tail_logits=None,
        rank_proposal=None,
    ):
        teacher_logits = ops.cast(teacher_logits, "float32") / temperature
        top_r = teacher_logits.shape[-1]
        tail_size = _tail_size(num_classes, top_r)
        if tail_size > 0:
            tail_bin = (
                ops.cast(tail_logits, "float32")[:, None] / temperature
                + math.log(tail_size)
            )
        else:
            tail_bin = ops.full_like(teacher_logits[:, :1], -np.inf)
        logits = ops.concatenate([teacher_logits, tail_bin], axis=-1)
        return ops.log_softmax(logits, axis=-1)



@keras.saving.register_keras_serializable(package="keras_dis")
class TeacherUniformProposal(Proposal):
    """The teacher's tempered prediction mixed with the uniform proposal.

    `r = teacher_weight * softmax(t / T) + (1 - teacher_weight) / C` per
    sample: draws follow the teacher at the loss's temperature, where the
    distillation target puts its mass, while the uniform part keeps every
    class possible, bounds the importance weights by
    `C / (1 - teacher_weight)` and keeps negatives in the subset when the
    teacher is peaked (plain FTIS then draws the label over and over).

    Args:
        teacher_weight: float in (0, 1), the weight of the teacher.

    Example:

    >>> proposal = TeacherUniformProposal(teacher_weight=0.5)
    >>> log_bins = proposal.log_bin_probabilities(
    ...     teacher_logits=np.log([[0.5, 0.3]]), num_classes=3,
    ...     temperature=1.0, tail_logits=np.log([0.2]))
    >>> np.round(np.exp(keras.ops.convert_to_numpy(log_bins)), 3)
    array([[0.417, 0.317, 0.267]], dtype=float32)
    """

    name = "teacher_uniform"

    def __init__(self, teacher_weight=0.5):
        if not 0 < teacher_weight < 1:
            raise ValueError(
                "`teacher_weight` must be in the open interval (0, 1). "
                f"Received: teacher_weight={teacher_weight}"
            )
        self.teacher_weight = float(teacher_weight)

    def log_bin_probabilities(
        self,
        teacher_logits,
        num_classes,
        temperature,
        tail_logits=None,
        rank_proposal=None,
    ):
        teacher = TeacherProposal().log_bin_probabilities(
            teacher_logits, num_classes, temperature, tail_logits
        )
        uniform = UniformProposal().log_bin_probabilities(
            teacher_logits, num_classes, temperature
        )
        return ops.logaddexp(
            teacher + math.log(self.teacher_weight),
            uniform + math.log(1.0 - self.teacher_weight),
        )

    def get_config(self):
        return {"teacher_weight": self.teacher_weight}


@keras.saving.register_keras_serializable(package="keras_dis")
class LaplaceMixtureProposal(Proposal):
    """Dynamic importance sampling (DIS): a two-Laplace mixture over ranks.

    The left component sits on the teacher's top rank, the right one on the
    last rank; their mixture is discretised into one bin per rank (the
    difference of the mixture's CDF at the bin edges, from
    tensorflow-probability) and normalised over `[0, C]`. During training
    `keras_dis.ProposalScheduler` raises the right scale every epoch so the
    right component flattens towards uniform, as in the paper.

    Units: with `scale_units="ranks"` (the default) the scales are numbers
    of ranks, so `left_scale=3, right_scale=5` reproduces the pointy ends of
    the paper's Fig. 3 on CIFAR-100 (the left tip is about 1.6x the right one
    at `C = 100`) and keeps the left component on the top handful of ranks at
    any `C`. With `scale_units="fraction"` they are fractions of the rank
    axis `[0, 1]`, the paper's literal reading (almost flat for 3 and 5).

    The proposal is computed on the host with tensorflow-probability's NumPy
    substrate, once per epoch, and stored in the head's `rank_proposal`
    weight, so training steps only read it.

    Args:
        left_scale: float > 0, scale of the component at rank 0.
        right_scale: float > 0, scale of the component at the last rank at
            the start of training.
        left_weight: float in (0, 1), the mixture weight of the left
            component (the paper gives none; 0.5 by default).
        scale_units: `"ranks"` or `"fraction"`.

    Example:

    >>> proposal = LaplaceMixtureProposal()
    >>> probs = proposal.rank_probabilities(num_classes=100)
    >>> float(probs.sum())
    1.0
    >>> bool(probs[0] > probs[-1] > probs[50])
    True
    """

    name = "dis"

    def __init__(
        self,
        left_scale=3.0,
        right_scale=5.0,
        left_weight=0.5,
        scale_units=RANKS,
    ):
        for arg_name, value in (
            ("left_scale", left_scale),
            ("right_scale", right_scale),
        ):
            if not value > 0:
                raise ValueError(
                    f"`{arg_name}` must be a positive number. "
                    f"Received: {arg_name}={value}"
                )
        if not 0 < left_weight < 1:
            raise ValueError(
                "`left_weight` must be in the open interval (0, 1). "
                f"Received: left_weight={left_weight}"
            )
        if scale_units not in (RANKS, FRACTION):
            raise ValueError(
                f"`scale_units` must be '{RANKS}' or '{FRACTION}'. "
                f"Received: scale_units={scale_units!r}"
            )
        self.left_scale = float(left_scale)
        self.right_scale = float(right_scale)
        self.left_weight = float(left_weight)
        self.scale_units = scale_units

    def mixture(self, num_classes, right_scale=None):
        """The continuous mixture over the rank axis `[0, C]`.

        Args:
            num_classes: int, `C`.
            right_scale: optional float, overrides `self.right_scale` (the
                annealed value during training).

        Returns:
            A tensorflow-probability (NumPy substrate) distribution.
        """
        with backend.tensorflow_probability_numpy() as tfp:
            return self._mixture(tfp, num_classes, right_scale)

    def _mixture(self, tfp, num_classes, right_scale):
        right_scale = self.right_scale if right_scale is None else right_scale
        if not right_scale > 0:
            raise ValueError(
                "`right_scale` must be a positive number. "
                f"Received: right_scale={right_scale}"
            )
        unit = 1.0 if self.scale_units == RANKS else float(num_classes)
        distributions = tfp.distributions
        return distributions.MixtureSameFamily(
            mixture_distribution=distributions.Categorical(
                probs=np.array([self.left_weight, 1.0 - self.left_weight])
            ),
            components_distribution=distributions.Laplace(
                loc=np.array([0.0, float(num_classes)]),
                scale=np.array([self.left_scale, right_scale]) * unit,
            ),
        )

    def rank_probabilities(self, num_classes, right_scale=None):
        """Probability of each rank, from the mixture's CDF per rank bin.

        Args:
            num_classes: int, `C`.
            right_scale: optional float, the annealed right scale.

        Returns:
            A float32 NumPy array of shape `(num_classes,)` summing to 1.
        """
        edges = np.arange(num_classes + 1, dtype="float64")
        lower, upper = edges[:-1, None], edges[1:, None]
        with backend.tensorflow_probability_numpy() as tfp:
            mixture = self._mixture(tfp, num_classes, right_scale)
            components = mixture.components_distribution
            locations = components.loc[None, :]
            # A bin's mass as a CDF difference below a component's location
            # and a survival difference above it: both stay accurate far in
            # the tails, where a CDF difference would round to zero.
            masses = np.where(
                upper <= locations,
                components.cdf(upper) - components.cdf(lower),
                components.survival_function(lower)
                - components.survival_function(upper),
            )
            weights = mixture.mixture_distribution.probs_parameter()
        probabilities = masses @ weights
        probabilities = probabilities / probabilities.sum()
        return probabilities.astype("float32")

    def log_bin_probabilities(
        self,
        teacher_logits,
        num_classes,
        temperature,
        tail_logits=None,
        rank_proposal=None,
    ):
        top_r = teacher_logits.shape[-1]
        top_probabilities = rank_proposal[:top_r]
        if _tail_size(num_classes, top_r) > 0:
            tail_probability = ops.maximum(
                1.0 - ops.sum(top_probabilities), 0.0
            )
            bins = ops.concatenate(
                [top_probabilities, ops.reshape(tail_probability, (1,))]
            )
        else:
            bins = ops.concatenate([top_probabilities, ops.zeros((1,))])
        return ops.log(bins)[None, :]

    def get_config(self):
        return {
            "left_scale": self.left_scale,
            "right_scale": self.right_scale,
            "left_weight": self.left_weight,
            "scale_units": self.scale_units,
        }


@keras.saving.register_keras_serializable(package="keras_dis")
class PredictionDifferenceSelection(Proposal):
    """PDBS: deterministic top-k of `|p - q|`, the paper's selection baseline.

    Selects, per sample, the `k` classes with the largest absolute
    difference between the teacher's and the student's predictions, with no
    importance correction. It needs the student's full softmax (a
    `batch x C` tensor), so it is a baseline, not a fast path.

    Example:

    >>> selection = PredictionDifferenceSelection()
    >>> classes = selection.select(
    ...     teacher_probabilities=np.array([[0.7, 0.2, 0.1]]),
    ...     student_probabilities=np.array([[0.3, 0.3, 0.4]]), k=2)
    >>> keras.ops.convert_to_numpy(classes).tolist()
    [[0, 2]]
    """

    name = "pdbs"

    def select(self, teacher_probabilities, student_probabilities, k):
        """Classes of the `k` largest `|p - q|`, shape `(batch, k)`."""
        difference = ops.abs(
            ops.cast(teacher_probabilities, "float32")
            - ops.cast(student_probabilities, "float32")
        )
        _, classes = ops.top_k(difference, k=k)
        return classes



PROPOSALS = {
    "dis": LaplaceMixtureProposal,
    "ftis": TeacherProposal,
    "uniform": UniformProposal,
    "teacher_uniform": TeacherUniformProposal,
    "pdbs": PredictionDifferenceSelection,
}


def get(identifier):
    """Returns a proposal from its name (`"dis"`, `"ftis"`, `"uniform"`,
    `"teacher_uniform"`, `"pdbs"`) or passes an instance through.

    Example:

    >>> type(get("ftis")).__name__
    'TeacherProposal'
    """
    if isinstance(identifier, Proposal):
        return identifier
    if isinstance(identifier, str) and identifier in PROPOSALS:
        return PROPOSALS[identifier]()
    raise ValueError(
        f"`proposal` must be one of {sorted(PROPOSALS)} or a proposal "
        f"instance. Received: proposal={identifier!r}"
    )
