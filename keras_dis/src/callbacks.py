"""`ProposalScheduler`: anneals the second Laplace scale of the DIS proposal."""

import keras
from keras.src.utils import io_utils

from keras_dis.src import proposals as proposals_module
from keras_dis.src.head import SampledDistillationHead

SCHEDULES = ("linear", "geometric")


def find_heads(model):
    """All `SampledDistillationHead`s inside `model`, nested models too."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, SampledDistillationHead)
    ]


@keras.saving.register_keras_serializable(package="keras_dis")
class ProposalScheduler(keras.callbacks.Callback):
    """Anneals the right Laplace scale `b2` of the DIS proposal each epoch.

    At the start of every epoch it sets `b2` of every
    `keras_dis.SampledDistillationHead` in the model (the student of a
    `Distiller` too) from `start` at the first epoch to `end` at the last,
    and recomputes the head's rank proposal, so the right tip of the
    mixture flattens towards uniform as in the paper. The value is a
    function of the epoch index only and is stored in the head's
    `right_scale` weight, so a run resumed at `initial_epoch` (or from a
    saved model) continues on the same schedule. The value is also logged as
    `right_scale` in the epoch logs (and so in `History`).

    Args:
        start: float > 0, `b2` at the first epoch, in the units of the
            head's `rank_proposal` (ranks by default). Defaults to the
            proposal's own `right_scale` (5 ranks).
        end: float > 0, `b2` at the last epoch. Defaults to the number of
            classes in rank units (1.0 in fraction units): the right
            component is then nearly flat over all ranks.
        schedule: `"linear"` (the paper's) or `"geometric"` (equal ratios
            per epoch, for very many classes where a linear ramp leaves the
            first epochs almost unchanged).
        verbose: int, 1 to print the value at each epoch.

    Example:

    ```python
    distiller = keras_dis.Distiller(teacher, student)
    distiller.fit(ds, epochs=30, callbacks=[keras_dis.ProposalScheduler()])
    ```
    """

    def __init__(self, start=None, end=None, schedule="linear", verbose=0):
        super().__init__()
        for arg_name, value in (("start", start), ("end", end)):
            if value is not None and not value > 0:
                raise ValueError(
                    f"`{arg_name}` must be a positive number or None. "
                    f"Received: {arg_name}={value}"
                )
        if schedule not in SCHEDULES:
            raise ValueError(
                f"`schedule` must be one of {SCHEDULES}. "
                f"Received: schedule={schedule!r}"
            )
        self.start = start
        self.end = end
        self.schedule = schedule
        self.verbose = verbose
        self._current = None

    def right_scale_at(self, epoch, epochs, head):
        """The scheduled `b2` of `head` at `epoch` out of `epochs`."""
        proposal = head.rank_proposal_config
        start = proposal.right_scale if self.start is None else self.start
        if self.end is not None:
            end = self.end
        elif proposal.scale_units == proposals_module.RANKS:
            end = float(head.num_classes)
        else:
            end = 1.0
        progress = min(epoch / max(epochs - 1, 1), 1.0)
        if self.schedule == "linear":
            return start + (end - start) * progress
        return start * (end / start) ** progress

    def on_train_begin(self, logs=None):
        if not find_heads(self.model):
            raise ValueError(
                "ProposalScheduler found no keras_dis.SampledDistillationHead "
                f"in the model {self.model.name!r}: the DIS proposal lives in "
                "that layer, which must be the student's output layer."
            )

    def on_epoch_begin(self, epoch, logs=None):
        epochs = self.params.get("epochs") or epoch + 1
        for head in find_heads(self.model):
            self._current = self.right_scale_at(epoch, epochs, head)
            head.set_right_scale(self._current)
        if self.verbose:
            io_utils.print_msg(
                f"\nEpoch {epoch + 1}: ProposalScheduler set right_scale "
                f"to {self._current:.4g}."
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._current is not None:
            logs["right_scale"] = self._current

    def get_config(self):
        return {
            "start": self.start,
            "end": self.end,
            "schedule": self.schedule,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
