"""`Distiller`: a frozen teacher and a student with a sampled head."""

import warnings

import keras
import numpy as np
from keras import ops

from keras.src.losses.loss import reduce_weighted_values
from keras.src.trainers.trainer import model_supports_jit

from keras_dis.src import backend
from keras_dis.src import input_checks
from keras_dis.src import sampled_step
from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.callbacks import find_heads
from keras_dis.src.export import export_student
from keras_dis.src.losses import DISLoss
from keras_dis.src.sampled_step import SAMPLED_PROPOSALS


# Teacher-ranked classes kept per sample by an online teacher, by default.
DEFAULT_TOP_R = 100


@keras.saving.register_keras_serializable(package="keras_dis")
class Distiller(keras.Model):
    """Trains a student to match a frozen teacher with sampled softmaxes.

    The student's output layer must be a `keras_dis.SampledDistillationHead`.
    Each training step turns `(x, y)` into packed teacher targets and hands
    them, with the student's output, to the sampled step of its head
    (`keras_dis.src.sampled_step`), configured by the compiled loss (a
    `keras_dis.DISLoss`, DIS with `k=10` by default):

    - `y` of shape `(batch,)` or `(batch, 1)`: ground-truth labels. The
      teacher runs on `x` (inference mode, no gradient) and its top `top_r`
      classes are packed with the labels.
    - `y` of shape `(batch, 2 + 2R)`: targets packed ahead of time
      (`keras_dis.pack_teacher_targets` or a `keras_dis.TeacherCache`); the
      teacher is not run at all, which is what makes very many classes
      cheap. With only such targets, pass `teacher=None`.

    In training the student's head emits its features and the loss computes
    logits for the target plus `k` sampled classes only. At evaluation and
    prediction the student returns full logits, and `evaluate()` reports the
    exact full-softmax loss.

    Row-sparse updates (`row_sparse_updates=True`, the default): with a
    sampled proposal (DIS, FTIS, uniform) and an SGD, Adam or RMSprop
    optimizer, the head's kernel and bias are not trained by the compiled
    optimizer but updated lazily, row by row, for the classes a step
    touched, with that optimizer's hyperparameters (see
    `keras_dis.src.row_sparse_optimizers` for how lazy Adam differs from
    dense Adam). No `C x d` gradient or optimizer update is formed, so a
    step costs `O(B * k * d)` in the head on every backend. Their optimizer
    state is kept in weights of the head (saved with it; the distiller holds
    none), and the learning rate is the optimizer's at every step. The rest of
    the student is trained by the compiled optimizer as usual. A head built
    with its own `optimizer=` keeps training its rows with that one.

    Relation to `keras.distillation.Distiller` (Keras >= 3.12): same
    argument names (`teacher`, `student`) and the same contract (the
    teacher is frozen, `call` runs the student, the trained student is
    `distiller.student`), but that class runs the teacher and the student's
    full logits every step and its distillation losses see neither labels
    nor a random generator, which sampling by teacher rank needs. This class
    writes its own `compute_loss` instead.

    Args:
        teacher: a trained `keras.Model` returning logits `(batch, C)`, or
            `None` when `y` is always packed teacher targets (a
            `TeacherCache`); the distiller then holds no teacher.
        student: a `keras.Model` whose output layer is a
            `SampledDistillationHead` with `num_classes == C`.
        top_r: int in `[1, C]` or None, how many teacher-ranked classes to
            keep per sample when the teacher runs online. None (the
            default) keeps `min(DEFAULT_TOP_R, C)` = `min(100, C)`: the
            ranking is a top-`k` selection, not a sort of all `C` classes,
            and the sampled step's cost does not grow with `C`. Pass
            `top_r=C` for the full ranking.
        row_sparse_updates: bool, update the head's rows lazily (see above)
            when the loss samples classes.
        name: model name.
        **kwargs: base `keras.Model` arguments.

    Example:

    ```python
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=10))
    distiller.fit(x, labels, epochs=30,
                  callbacks=[keras_dis.ProposalScheduler()])
    predictions = distiller.student.predict(x)  # full logits

    # The data set relabelled once, no teacher in the training process:
    targets = keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=100)
    keras_dis.Distiller(None, student).fit(x, targets, epochs=30)
    ```
    """

    def __init__(
        self,
        teacher,
        student,
        top_r=None,
        row_sparse_updates=True,
        name="distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        for arg_name, model in (("teacher", teacher), ("student", student)):
            if model is None and arg_name == "teacher":
                continue
            if not isinstance(model, keras.Model):
                raise ValueError(
                    f"`{arg_name}` must be a keras.Model. "
                    f"Received: {arg_name}={model!r}"
                )
        heads = find_heads(student)
        if len(heads) != 1:
            raise ValueError(
                "`student` must have exactly one "
                "keras_dis.SampledDistillationHead as its output layer. "
                f"Found {len(heads)} in {student.name!r}."
            )
        self.head = heads[0]
        teacher_classes = (
            None if teacher is None else self._teacher_num_classes(teacher)
        )
        if teacher_classes is not None:
            self._check_teacher_classes(teacher_classes)
        if top_r is not None and not 1 <= top_r <= self.head.num_classes:
            raise ValueError(
                f"`top_r` must be in [1, {self.head.num_classes}] or None. "
                f"Received: top_r={top_r}"
            )
        if teacher is not None:
            teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.top_r = top_r
        self.row_sparse_updates = row_sparse_updates
        # Calling the distiller only calls the student: built with it (which
        # callbacks such as BackupAndRestore require before `fit`).
        self.built = student.built

    @property
    def ranked_classes(self):
        """Teacher-ranked classes packed per sample by an online teacher:
        `top_r`, or `min(DEFAULT_TOP_R, C)`."""
        if self.top_r is None:
            return min(DEFAULT_TOP_R, self.head.num_classes)
        return self.top_r

    def _check_teacher_classes(self, teacher_classes):
        if teacher_classes != self.head.num_classes:
            raise ValueError(
                "The teacher and the student must predict the same classes. "
                f"Received: teacher with {teacher_classes} outputs, student "
                f"head with num_classes={self.head.num_classes}"
            )

    @staticmethod
    def _teacher_num_classes(teacher):
        try:
            return teacher.outputs[0].shape[-1]
        except (AttributeError, IndexError, TypeError, ValueError):
            return None

    def compile(
        self,
        optimizer="adam",
        loss=None,
        metrics=None,
        jit_compile="auto",
        **kwargs,
    ):
        """Configures training; `loss` defaults to `keras_dis.DISLoss()`.

        `fit` compiles with these defaults when `compile` was not called.
        `jit_compile="auto"` compiles the step with XLA wherever its layers
        support it, on TensorFlow also on a machine without a GPU (where
        Keras's own default is no XLA): the sampled step measured 2.1-2.5x
        faster with XLA on a 2-core CPU (`benchmarks/head_step.py`). JAX
        always compiles with XLA; PyTorch runs eagerly.
        """
        loss = DISLoss() if loss is None else loss
        if jit_compile == "auto" and keras.backend.backend() == "tensorflow":
            jit_compile = not self._distribute_strategy and model_supports_jit(
                self
            )
        super().compile(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            jit_compile=jit_compile,
            **kwargs,
        )
        if not isinstance(self.loss, DISLoss):
            raise ValueError(
                "The Distiller's loss must be a keras_dis.DISLoss (any "
                "method of the paper: `keras_dis.losses.get(name)`). "
                f"Received: loss={loss!r}"
            )
        if self.head.optimizer is not None:
            return  # the head updates its own rows
        row_sparse = (
            self.row_sparse_updates and loss.proposal_name in SAMPLED_PROPOSALS
        )
        if not row_sparse:
            self.head.disable_row_sparse_updates()
            return
        if not self.head.built:
            raise ValueError(
                "Row-sparse updates need a built student: give it an "
                "Input (or call `student.build(input_shape)`) before "
                "compiling the Distiller."
            )
        if kwargs.get("loss_weights") is not None:
            raise ValueError(
                "Row-sparse head updates do not support `loss_weights`. "
                f"Received: loss_weights={kwargs['loss_weights']!r}"
            )
        self.head.enable_row_sparse_updates(self.optimizer)

    def compile_from_config(self, config):
        """Recompiles a loaded distiller, row-sparse state included."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def load_weights(self, filepath, *args, **kwargs):
        """As `keras.Model.load_weights`. Weights saved after `compile`
        include the head's row-sparse optimizer state, which `compile`
        creates: compile with the same optimizer before loading them."""
        try:
            return super().load_weights(filepath, *args, **kwargs)
        except ValueError as error:
            if self.compiled:
                raise
            raise ValueError(
                f"Could not load the weights in {filepath!r} into an "
                "uncompiled Distiller. Weights saved after `compile` hold "
                "the optimizer state of the head's row-sparse updates, which "
                "`compile` creates: call `distiller.compile(optimizer=..., "
                "loss=...)` with the optimizer of the saved run first. "
                f"({error})"
            ) from error

    def load_own_variables(self, store):
        # keras_dis 0.1 kept the row-sparse optimizer state here; it is the
        # head's now. Such a file still loads, with that state reset.
        if len(store.keys()) and not (
            self._trainable_variables + self._non_trainable_variables
        ):
            warnings.warn(
                f"Ignoring {len(store.keys())} saved variables of the "
                "Distiller itself (row-sparse optimizer state saved by "
                "keras_dis 0.1); the head's optimizer state starts afresh."
            )
            return
        super().load_own_variables(store)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def teacher_targets(self, x, y):
        """Packed teacher targets for a batch: `y` itself if already packed,
        else the online teacher's ranking packed with the labels `y`."""
        if y is None:
            raise ValueError(
                "The Distiller needs `y`: labels (batch,) with a teacher, or "
                "packed teacher targets (batch, 2 + 2R). Received: y=None"
            )
        if len(y.shape) == 2 and y.shape[-1] != 1:
            return y
        if self.teacher is None:
            raise ValueError(self._needs_packed_targets(y.shape))
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        self._check_teacher_classes(teacher_logits.shape[-1])
        return targets_module.pack_teacher_targets(
            ops.reshape(y, (-1,)), teacher_logits, self.ranked_classes
        )

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        targets = self.teacher_targets(x, y)
        if not self.head.claim_training_output(y_pred):
            # Full logits (evaluation): the exact loss, as compiled.
            return super().compute_loss(
                x=x,
                y=targets,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=training,
            )
        # Training: the head's sampled step, called directly.
        losses = sampled_step.distillation_losses(
            self.head, y_pred, targets, self.loss, sample_weight=sample_weight
        )
        total = reduce_weighted_values(
            losses,
            sample_weight=sample_weight,
            reduction=self.loss.reduction,
            dtype=self.loss.dtype,
        )
        for extra_loss in self.losses:  # add_loss and regularizers
            total = total + self._aggregate_additional_loss(extra_loss)
        return total

    def fit(self, x=None, y=None, *args, **kwargs):
        """As `keras.Model.fit`; array labels are checked to be in range, and
        an uncompiled distiller is compiled with the defaults."""
        self._compile_if_needed()
        kwargs["callbacks"] = self._with_step_callback(kwargs.get("callbacks"))
        if isinstance(y, np.ndarray) and (y.ndim == 1 or y.shape[-1] == 1):
            if self.teacher is None:
                raise ValueError(self._needs_packed_targets(y.shape))
            num_classes = self.head.num_classes
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(
                    f"`y` must hold class ids in [0, {num_classes}). "
                    f"Received labels in [{y.min()}, {y.max()}]"
                )
        return super().fit(x, y, *args, **kwargs)

    @staticmethod
    def _needs_packed_targets(y_shape):
        return (
            "Without a teacher (`teacher=None`), `y` must be packed teacher "
            "targets of shape (batch, 2 + 2R) (`keras_dis.pack_teacher_targets`"
            f" or a `keras_dis.TeacherCache`). Received: y.shape={y_shape}"
        )

    def export_student(self):
        """The trained student as a plain Keras model (see
        `keras_dis.export_student`): its head becomes a `Dense` layer."""
        return export_student(self.student)

    def evaluate(self, *args, **kwargs):
        """As `keras.Model.evaluate`; compiles with the defaults if needed."""
        self._compile_if_needed()
        kwargs["callbacks"] = self._with_step_callback(kwargs.get("callbacks"))
        return super().evaluate(*args, **kwargs)

    def _with_step_callback(self, callbacks):
        # Last, so that it sees the learning rate other callbacks set.
        step_callback = _HeadStepCallback(self.head)
        if isinstance(callbacks, keras.callbacks.CallbackList):
            step_callback.set_model(self)
            callbacks.callbacks.append(step_callback)
            return callbacks
        return list(callbacks or []) + [step_callback]

    def _compile_if_needed(self):
        if not self.compiled:
            self.compile()

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "top_r": self.top_r,
            "row_sparse_updates": self.row_sparse_updates,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


class _HeadStepCallback(keras.callbacks.Callback):
    """Host-side work around each step of the head.

    At the start of an epoch, after the other callbacks (it is the last
    one), the head's learning-rate mirror takes the optimizer's learning
    rate: the JAX step reads the mirror, and reads its state at the start
    of an epoch, as it does the optimizer's. After a batch: raises the
    input error the step recorded (an XLA-compiled TensorFlow step cannot
    raise it itself; elsewhere the step has raised already).
    """

    def __init__(self, head):
        super().__init__()
        self.head = head

    def on_epoch_begin(self, epoch, logs=None):
        if self.head.row_sparse_optimizer is not None:
            self.head.row_sparse_optimizer.sync_learning_rate()

    def on_train_batch_end(self, batch, logs=None):
        self._raise_input_error()

    def on_test_batch_end(self, batch, logs=None):
        self._raise_input_error()

    def _raise_input_error(self):
        if not backend.MAY_DEFER_INPUT_ERRORS:
            return
        code = backend.training_value(self.model, self.head.input_error_code)
        if int(keras.ops.convert_to_numpy(code)) != input_checks.OK:
            backend.sync_training_state(self.model)
            self.head.raise_recorded_input_error()
