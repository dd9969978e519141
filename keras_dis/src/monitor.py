"""`DistillationMonitor`: how distillation is going, on a fixed probe set.

The loss that a sampled step prints is the loss of its subset under the
current proposal: it is not comparable across epochs (the proposal changes
every epoch under `ProposalScheduler`) nor across methods. The monitor
measures, on a small probe set held in memory, quantities that are:

- `full_kd_loss`: the exact full-softmax distillation loss of the compiled
  `DISLoss` (its temperature and `distillation_weight`), over all `C`
  classes (teacher logits outside the packed top `R` are the tail logit);
- `teacher_agreement`: how often the student's top class is the teacher's;
- `accuracy`: how often the student's top class is the label;
- for a sampled proposal, the quality of the estimator with the head's
  current proposal and the loss's `k` (`keras_dis.diagnostics`):
  `gradient_cosine`, the cosine between the expected sampled gradient with
  respect to the logits and the exact one, and `effective_sample_size`,
  the effective sample size of the student-side importance weights of one
  subset as a fraction of its `1 + k` entries; both are means over the
  probe samples.
"""

import keras
import numpy as np
from keras import ops

from keras_dis.src import backend
from keras_dis.src import diagnostics
from keras_dis.src import input_checks
from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.callbacks import find_heads
from keras_dis.src.losses import DISLoss
from keras_dis.src.sampled_step import SAMPLED_PROPOSALS

MONITOR_METRICS = (
    "full_kd_loss",
    "teacher_agreement",
    "accuracy",
    "gradient_cosine",
    "effective_sample_size",
)


class DistillationMonitor(keras.callbacks.Callback):
    """Measures the student against the teacher on a fixed probe set.

    Every `every_n_steps` training steps and at the end of every epoch it
    runs the student in inference mode on the probe set and writes
    `full_kd_loss`, `teacher_agreement` and `accuracy`, and for a sampled
    proposal (DIS, FTIS, uniform) `gradient_cosine` and
    `effective_sample_size` (see the module docstring), into the logs, so
    `History`, `CSVLogger`, TensorBoard and the progress bar show them.
    Every measurement is also appended to `monitor.history` (a list of
    dicts with the step, the epoch and the proposal's `right_scale`), which
    `History` lacks between epochs.

    Works with a `keras_dis.Distiller` and with a plain student compiled
    with a `keras_dis.DISLoss` (its head is the model's
    `SampledDistillationHead`).

    Args:
        x: the probe inputs, a NumPy array (or a structure of them), a few
            hundred examples: the student's full logits on them are formed
            (`N x C` floats).
        y: the probe targets: packed teacher targets `(N, 2 + 2R)`, or
            labels `(N,)` with a `Distiller` that has a teacher (which then
            ranks its classes once, at the first measurement).
        every_n_steps: int >= 1 or None (the default): also measure every
            that many training steps, not only at the end of each epoch.
        num_subsets: int >= 1, the subsets averaged for the expected
            sampled gradient.
        batch_size: int >= 1, the examples per forward pass.
        seed: int, the seed of the subsets (the same at every measurement,
            so changes come from the model and the proposal).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 8)).astype("float32")
    >>> teacher_logits = 3 * rng.normal(size=(64, 20)).astype("float32")
    >>> targets = keras_dis.pack_teacher_targets(
    ...     teacher_logits.argmax(-1), teacher_logits)
    >>> student = keras.Sequential(
    ...     [keras.Input((8,)), keras_dis.SampledDistillationHead(20)])
    >>> distiller = keras_dis.Distiller(None, student)
    >>> distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    >>> monitor = keras_dis.DistillationMonitor(x[:32], targets[:32])
    >>> history = distiller.fit(
    ...     x, targets, epochs=2, batch_size=16, callbacks=[monitor], verbose=0)
    >>> sorted(key for key in history.history if key != "loss")
    ['accuracy', 'effective_sample_size', 'full_kd_loss', 'gradient_cosine', 'teacher_agreement']
    """

    def __init__(
        self,
        x,
        y,
        every_n_steps=None,
        num_subsets=64,
        batch_size=256,
        seed=0,
    ):
        super().__init__()
        input_checks.check_positive_integer("num_subsets", num_subsets)
        input_checks.check_positive_integer("batch_size", batch_size)
        if every_n_steps is not None:
            input_checks.check_positive_integer("every_n_steps", every_n_steps)
        y = np.asarray(y)
        num_examples = len(keras.tree.flatten(x)[0])
        if y.shape[0] != num_examples:
            raise ValueError(
                "`x` and `y` must hold the same number of probe examples. "
                f"Received: {num_examples} inputs and y.shape={y.shape}"
            )
        self.x = x
        self.y = y
        self.every_n_steps = every_n_steps
        self.num_subsets = int(num_subsets)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.history = []
        self._steps = 0
        self._targets = None

    def _parts(self):
        """`(student, head, loss)` of the model being trained."""
        model = self.model
        student = getattr(model, "student", model)
        heads = find_heads(student)
        if len(heads) != 1:
            raise ValueError(
                "DistillationMonitor needs a model with exactly one "
                f"SampledDistillationHead. Received: {len(heads)} in "
                f"{student.name!r}"
            )
        loss = getattr(model, "loss", None)
        if not isinstance(loss, DISLoss):
            raise ValueError(
                "DistillationMonitor needs a model compiled with a "
                f"keras_dis.DISLoss. Received: loss={loss!r}"
            )
        return student, heads[0], loss

    def _teacher_targets(self):
        """The probe set's packed teacher targets, formed once."""
        if self._targets is None:
            y = self.y
            if y.ndim == 2 and y.shape[-1] != 1:
                self._targets = ops.convert_to_tensor(y, "float32")
            else:
                teacher = getattr(self.model, "teacher", None)
                if teacher is None:
                    raise ValueError(
                        "DistillationMonitor got labels `y` (shape "
                        f"{y.shape}) but the model has no teacher to rank "
                        "the classes: pass packed teacher targets "
                        "(keras_dis.pack_teacher_targets), or train a "
                        "keras_dis.Distiller with a teacher."
                    )
                self._targets = ops.concatenate(
                    [
                        self.model.teacher_targets(x, ops.convert_to_tensor(labels))
                        for x, labels in self._batches(y)
                    ],
                    axis=0,
                )
        return self._targets

    def _batches(self, y=None):
        num_examples = len(keras.tree.flatten(self.x)[0])
        for start in range(0, num_examples, self.batch_size):
            end = start + self.batch_size
            x = keras.tree.map_structure(lambda a: a[start:end], self.x)
            yield (x, None) if y is None else (x, y[start:end])

    def measure(self):
        """Measures the model now.

        Returns:
            A dict of Python floats, keyed by the names in the class
            docstring (the last two for sampled proposals only).
        """
        head, loss, targets, logits = self._probe()
        unpacked = targets_module.unpack_teacher_targets(targets)
        labels, _, top_classes, _ = unpacked
        predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
        values = {
            "full_kd_loss": ops.mean(loss.losses_from_logits(unpacked, logits)),
            "teacher_agreement": ops.mean(
                ops.cast(predicted == top_classes[:, 0], "float32")
            ),
            "accuracy": ops.mean(ops.cast(predicted == labels, "float32")),
        }
        if loss.proposal_name in SAMPLED_PROPOSALS:
            result = diagnostics.estimator_diagnostics(
                loss,
                logits,
                targets,
                rank_proposal=head.rank_proposal,
                num_subsets=self.num_subsets,
                seed=self.seed,
            )
            values["gradient_cosine"] = np.mean(result["gradient_cosine"])
            values["effective_sample_size"] = np.mean(result["student_ess"])
        return {
            name: float(ops.convert_to_numpy(value)) for name, value in values.items()
        }

    def suggest_k(self, ks=(5, 10, 20, 50, 100), target_cosine=0.95):
        """The smallest `k` whose estimator reaches a gradient cosine.

        Measures, on the probe set with the model as it is now and the
        head's current proposal, the gradient cosine (see the class
        docstring) of the compiled loss with each `k` in `ks` (every other
        setting kept, `exact_top` by its rule), and returns the smallest
        `k` that reaches `target_cosine`.

        Args:
            ks: increasing ints, the candidates; those not below `C` are
                skipped.
            target_cosine: float in (0, 1].

        Returns:
            A tuple `(k, cosines)`: the smallest `k` reaching the target (or
            None when none does), and a dict of `k` to its mean cosine.
        """
        if not 0 < target_cosine <= 1:
            raise ValueError(
                "`target_cosine` must be in (0, 1]. "
                f"Received: target_cosine={target_cosine!r}"
            )
        loss = self._parts()[2]
        if loss.proposal_name not in SAMPLED_PROPOSALS:
            raise ValueError(
                "suggest_k needs a sampled proposal "
                f"({sorted(SAMPLED_PROPOSALS)}). Received: "
                f"proposal={loss.proposal_name!r}"
            )
        head, loss, targets, logits = self._probe()
        cosines = {}
        for k in sorted(ks):
            if k >= head.num_classes:
                continue
            config = loss.get_config()
            config["k"] = int(k)
            if config["exact_top"] is not None:
                config["exact_top"] = min(config["exact_top"], int(k))
            result = diagnostics.estimator_diagnostics(
                DISLoss.from_config(config),
                logits,
                targets,
                rank_proposal=head.rank_proposal,
                num_subsets=self.num_subsets,
                seed=self.seed,
            )
            cosines[int(k)] = float(np.mean(result["gradient_cosine"]))
        reached = [k for k, cosine in cosines.items() if cosine >= target_cosine]
        return (min(reached) if reached else None), cosines

    def _probe(self):
        """`(head, loss, targets, logits)`: the model's head and loss, and
        the probe set's packed teacher targets and the student's full
        logits on it now (in inference mode)."""
        student, head, loss = self._parts()
        backend.sync_training_state(self.model)
        targets = self._teacher_targets()
        logits = ops.concatenate(
            [
                ops.cast(student(x, training=False), "float32")
                for x, _ in self._batches()
            ],
            axis=0,
        )
        return head, loss, targets, logits

    def _record(self, logs, epoch):
        values = self.measure()
        _, head, _ = self._parts()
        self.history.append(
            {
                "step": self._steps,
                "epoch": epoch,
                "right_scale": float(ops.convert_to_numpy(head.right_scale)),
                **values,
            }
        )
        if logs is not None:
            logs.update(values)

    def on_train_begin(self, logs=None):
        self._parts()  # a model the monitor cannot read fails before training
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.every_n_steps and self._steps % self.every_n_steps == 0:
            self._record(logs, self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._record(logs, epoch)
