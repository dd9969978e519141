"""`ProposalScheduler`: anneals the second Laplace scale of the DIS proposal."""

import warnings
import weakref

import keras
import numpy as np
from keras import ops
from keras.src.utils import io_utils

from keras_dis.src import proposals as proposals_module
from keras_dis.src.head import SampledDistillationHead

SCHEDULES = ("linear", "geometric")
# The run length (`epochs`) each head was last scheduled over, to catch a run
# split into `fit` calls that each span a different number of epochs.
_RUN_EPOCHS = weakref.WeakKeyDictionary()


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
    `Distiller` too) from `start` at the first epoch to `end` at the last
    epoch of the run, and recomputes the head's rank proposal, so the right
    tip of the mixture flattens towards uniform as in the paper. The value
    is a function of the epoch index only and is stored in the head's
    `right_scale` weight, so a run resumed at `initial_epoch` (by hand, from
    a saved model or by `keras.callbacks.BackupAndRestore`) continues on the
    same schedule. Past the last epoch of the run it stays at `end`. The
    value is also logged as `right_scale` in the epoch logs (and so in
    `History`).

    The run lasts `epochs` epochs. Left to None, that is the `epochs` of
    each `fit` call: right for one `fit` call per run, and for resuming it
    with the same `epochs`. A run split into `fit` calls that each end at a
    different epoch (one epoch per call, `initial_epoch=e, epochs=e + 1`)
    must pass its total number of epochs, or `b2` would reach `end` in the
    second call. Without `epochs`, a `fit` call that continues a run (starts
    after epoch 0) raises a `ValueError` if an earlier call in this process
    scheduled the same heads over another number of epochs, and warns if
    the heads (loaded from a saved model, say) already hold the end value
    that the schedule reaches only later (as after a `BackupAndRestore`
    backup taken within the last epoch, resumed in a new process: pass
    `epochs` to silence it).

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
        epochs: optional int >= 1, the number of epochs of the whole run
            (epoch indices `0` to `epochs - 1`), however many `fit` calls
            train it. Defaults to the `epochs` argument of each `fit` call.
        verbose: int, 1 to print the value at each epoch.

    Example:

    ```python
    distiller = keras_dis.Distiller(teacher, student)
    distiller.fit(ds, epochs=30, callbacks=[keras_dis.ProposalScheduler()])
    ```

    One epoch per `fit` call (evaluating in between, say):

    ```python
    scheduler = keras_dis.ProposalScheduler(epochs=30)
    for epoch in range(30):
        distiller.fit(ds, initial_epoch=epoch, epochs=epoch + 1,
                      callbacks=[scheduler])
    ```
    """

    def __init__(
        self, start=None, end=None, schedule="linear", epochs=None, verbose=0
    ):
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
        if epochs is not None and (
            isinstance(epochs, bool)
            or not isinstance(epochs, (int, np.integer))
            or epochs < 1
        ):
            raise ValueError(
                "`epochs` must be an integer >= 1 (the number of epochs of "
                f"the run) or None. Received: epochs={epochs!r}"
            )
        self.start = start
        self.end = end
        self.schedule = schedule
        self.epochs = None if epochs is None else int(epochs)
        self.verbose = verbose
        self._current = None
        self._first_epoch_of_call = True

    def scale_range(self, head):
        """`(start, end)` of the schedule of `head`, in its proposal's units."""
        proposal = head.rank_proposal_config
        start = proposal.right_scale if self.start is None else self.start
        if self.end is not None:
            end = self.end
        elif proposal.scale_units == proposals_module.RANKS:
            end = float(head.num_classes)
        else:
            end = 1.0
        return start, end

    def right_scale_at(self, epoch, epochs, head):
        """The scheduled `b2` of `head` at `epoch` of a run of `epochs`.

        Args:
            epoch: int, the 0-based epoch index.
            epochs: int, the number of epochs of the run; epochs from
                `epochs - 1` on get the end value.
            head: the `SampledDistillationHead`.

        Returns:
            A float.

        Example:

        >>> head = keras_dis.SampledDistillationHead(num_classes=100)
        >>> scheduler = ProposalScheduler(epochs=5)
        >>> [scheduler.right_scale_at(epoch, 5, head) for epoch in range(6)]
        [5.0, 28.75, 52.5, 76.25, 100.0, 100.0]
        """
        start, end = self.scale_range(head)
        progress = min(epoch / max(epochs - 1, 1), 1.0)
        if self.schedule == "linear":
            return start + (end - start) * progress
        return start * (end / start) ** progress

    def run_epochs(self, epoch):
        """The number of epochs of the run that `epoch` belongs to."""
        if self.epochs is not None:
            return self.epochs
        return self.params.get("epochs") or epoch + 1

    def on_train_begin(self, logs=None):
        if not find_heads(self.model):
            raise ValueError(
                "ProposalScheduler found no keras_dis.SampledDistillationHead "
                f"in the model {self.model.name!r}: the DIS proposal lives in "
                "that layer, which must be the student's output layer."
            )
        self._first_epoch_of_call = True

    def _check_continued_run(self, epoch, epochs, heads):
        """Fails loudly where a run is split into `fit` calls of their own
        `epochs`: with `epochs=None`, `b2` would jump to `end`."""
        for head in heads:
            previous = _RUN_EPOCHS.get(head)
            if previous is not None and previous != epochs:
                raise ValueError(
                    "`epochs` must be given to ProposalScheduler when a run is "
                    "split into fit calls of different `epochs`: this fit "
                    f"call continues at epoch {epoch} with epochs={epochs}, "
                    "but an earlier fit call scheduled the head "
                    f"{head.name!r} over epochs={previous}, and the schedule "
                    "spans each call's `epochs` (training one epoch per call, "
                    "`b2` would reach its end value in the second call). "
                    "Pass the run's total number of epochs, "
                    "`ProposalScheduler(epochs=...)`, or start a new run at "
                    "epoch 0. Received: epochs=None"
                )
            if previous is not None:
                continue
            # Heads new to this process (a loaded model): only their state
            # tells. A head at its end value before the schedule's last
            # epoch comes from a run that ended sooner, as when a model is
            # saved and loaded between one-epoch fit calls. (A
            # `BackupAndRestore` backup taken within the last epoch and
            # resumed in a new process looks the same: it warns too.)
            _, end = self.scale_range(head)
            current = float(ops.convert_to_numpy(head.right_scale))
            previous_value = self.right_scale_at(epoch - 1, epochs, head)
            if np.isclose(current, end, rtol=1e-5) and not np.isclose(
                previous_value, end, rtol=1e-5
            ):
                warnings.warn(
                    f"ProposalScheduler: the head {head.name!r} already holds "
                    f"the end value right_scale={current:.4g} at the start "
                    f"of epoch {epoch}, but over epochs={epochs} the schedule "
                    f"gives {previous_value:.4g} at epoch {epoch - 1}: it "
                    "would step back. If the run is split into fit calls "
                    "(one epoch per call, say), pass its total number of "
                    "epochs, `ProposalScheduler(epochs=...)`.",
                    stacklevel=2,
                )

    def on_epoch_begin(self, epoch, logs=None):
        epochs = self.run_epochs(epoch)
        heads = find_heads(self.model)
        if self._first_epoch_of_call:
            # The first epoch of a call is known here, not in
            # `on_train_begin`: `BackupAndRestore` may move it there.
            self._first_epoch_of_call = False
            if (
                self.epochs is None
                and epoch > 0
                and self.params.get("epochs") is not None
            ):
                self._check_continued_run(epoch, epochs, heads)
            for head in heads:
                _RUN_EPOCHS[head] = epochs
        for head in heads:
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
            "epochs": self.epochs,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
