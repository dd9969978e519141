"""`Distiller`: a frozen teacher and a student with a sampled head."""

import keras
import numpy as np
from keras import ops

from keras_dis.src import teacher_targets as targets_module
from keras_dis.src.callbacks import find_heads
from keras_dis.src.losses import DISLoss


@keras.saving.register_keras_serializable(package="keras_dis")
class Distiller(keras.Model):
    """Trains a student to match a frozen teacher with sampled softmaxes.

    The student's output layer must be a `keras_dis.SampledDistillationHead`.
    Each training step turns `(x, y)` into packed teacher targets and hands
    them, with the student's output, to the compiled loss (a
    `keras_dis.DISLoss`, DIS with `k=10` by default):

    - `y` of shape `(batch,)` or `(batch, 1)`: ground-truth labels. The
      teacher runs on `x` (inference mode, no gradient) and its top `top_r`
      classes are packed with the labels.
    - `y` of shape `(batch, 2 + 2R)`: targets packed ahead of time
      (`keras_dis.pack_teacher_targets` or a `keras_dis.TeacherCache`); the
      teacher is not run at all, which is what makes very many classes
      cheap.

    In training the student's head emits its features and the loss computes
    logits for the target plus `k` sampled classes only. At evaluation and
    prediction the student returns full logits, and `evaluate()` reports the
    exact full-softmax loss.

    Relation to `keras.distillation.Distiller` (Keras >= 3.12): same
    argument names (`teacher`, `student`) and the same contract (the
    teacher is frozen, `call` runs the student, the trained student is
    `distiller.student`), but that class runs the teacher and the student's
    full logits every step and its distillation losses see neither labels
    nor a random generator, which sampling by teacher rank needs. This class
    writes its own `compute_loss` instead.

    Args:
        teacher: a trained `keras.Model` returning logits `(batch, C)`.
        student: a `keras.Model` whose output layer is a
            `SampledDistillationHead` with `num_classes == C`.
        top_r: optional int, how many teacher-ranked classes to keep per
            sample when the teacher runs online (default: all `C`).
        name: model name.
        **kwargs: base `keras.Model` arguments.

    Example:

    ```python
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=10))
    distiller.fit(x, labels, epochs=30,
                  callbacks=[keras_dis.ProposalScheduler()])
    predictions = distiller.student.predict(x)  # full logits
    ```
    """

    def __init__(self, teacher, student, top_r=None, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for arg_name, model in (("teacher", teacher), ("student", student)):
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
        teacher_classes = self._teacher_num_classes(teacher)
        if teacher_classes is not None and teacher_classes != self.head.num_classes:
            raise ValueError(
                "The teacher and the student must predict the same classes. "
                f"Received: teacher with {teacher_classes} outputs, student "
                f"head with num_classes={self.head.num_classes}"
            )
        if top_r is not None and not 1 <= top_r <= self.head.num_classes:
            raise ValueError(
                f"`top_r` must be in [1, {self.head.num_classes}] or None. "
                f"Received: top_r={top_r}"
            )
        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.top_r = top_r
        self.compile()

    @staticmethod
    def _teacher_num_classes(teacher):
        try:
            return teacher.outputs[0].shape[-1]
        except (AttributeError, IndexError, TypeError, ValueError):
            return None

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Configures training; `loss` defaults to `keras_dis.DISLoss()`."""
        super().compile(
            optimizer=optimizer,
            loss=DISLoss() if loss is None else loss,
            metrics=metrics,
            **kwargs,
        )

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def teacher_targets(self, x, y):
        """Packed teacher targets for a batch: `y` itself if already packed,
        else the online teacher's ranking packed with the labels `y`."""
        if len(y.shape) == 2 and y.shape[-1] != 1:
            return y
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        if teacher_logits.shape[-1] != self.head.num_classes:
            raise ValueError(
                "The teacher and the student must predict the same classes. "
                f"Received: teacher logits of shape {teacher_logits.shape}, "
                f"student head with num_classes={self.head.num_classes}"
            )
        return targets_module.pack_teacher_targets(
            ops.reshape(y, (-1,)), teacher_logits, self.top_r
        )

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        return super().compute_loss(
            x=x,
            y=self.teacher_targets(x, y),
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )

    def fit(self, x=None, y=None, *args, **kwargs):
        """As `keras.Model.fit`; array labels are checked to be in range."""
        if isinstance(y, np.ndarray) and (y.ndim == 1 or y.shape[-1] == 1):
            num_classes = self.head.num_classes
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(
                    f"`y` must hold class ids in [0, {num_classes}). "
                    f"Received labels in [{y.min()}, {y.max()}]"
                )
        return super().fit(x, y, *args, **kwargs)

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "top_r": self.top_r,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
