import os

import keras
import numpy as np
import pytest

import keras_dis
from keras_dis.src.head import SampledDistillationHead
from tests.src.test_losses import make_student
from tests.src.test_losses import numpy_full_kd
from tests.src.test_losses import synthetic_problem

NUM_CLASSES = 40
JIT_COMPILE = keras.backend.backend() != "torch"  # XLA on TF and JAX


class Batches(keras.utils.PyDataset):
    """A plain Keras data set of `(x, labels)` batches."""

    def __init__(self, x, labels, batch_size=64, **kwargs):
        super().__init__(**kwargs)
        self.x, self.labels, self.batch_size = x, labels, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[batch], self.labels[batch]


def make_teacher(x, teacher_logits):
    """A linear teacher that reproduces `teacher_logits` on `x`."""
    inputs = keras.Input((x.shape[-1],))
    dense = keras.layers.Dense(teacher_logits.shape[-1])
    teacher = keras.Model(inputs, dense(inputs))
    kernel, *_ = np.linalg.lstsq(x, teacher_logits, rcond=None)
    dense.set_weights([kernel.astype("float32"), np.zeros(teacher_logits.shape[-1])])
    return teacher


class RaisingTeacher(keras.Model):
    def call(self, inputs):
        raise AssertionError("the teacher must not run on cached targets")


def test_usage_line_trains_the_student():
    x, labels, teacher_logits = synthetic_problem()
    teacher = make_teacher(x, teacher_logits)
    student = make_student()

    def agreement():
        return (student.predict(x, verbose=0).argmax(-1) == labels).mean()

    agreement_before = agreement()
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01), jit_compile=JIT_COMPILE
    )
    loss_before = distiller.evaluate(x, labels, verbose=0)
    history = distiller.fit(
        Batches(x, labels), epochs=4, callbacks=[keras_dis.ProposalScheduler()],
        verbose=0,
    )
    loss_after = distiller.evaluate(x, labels, verbose=0)
    # Measured: the full loss ~3.8 -> ~2.0, agreement ~0.03 -> ~0.5.
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert agreement() > agreement_before + 0.2
    assert history.history["right_scale"] == pytest.approx(
        [5.0, 5.0 + 35.0 / 3, 5.0 + 70.0 / 3, 40.0]
    )


def test_default_compile_is_dis():
    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    distiller = keras_dis.Distiller(make_teacher(x, teacher_logits), make_student())
    distiller.fit(x, labels, epochs=1, verbose=0)
    assert isinstance(distiller.loss, keras_dis.DISLoss)
    assert distiller.loss.proposal_name == "dis"
    assert isinstance(distiller.optimizer, keras.optimizers.Adam)


def test_cached_targets_do_not_run_the_teacher():
    x, labels, teacher_logits = synthetic_problem(num_examples=256)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=10)
    )
    distiller = keras_dis.Distiller(RaisingTeacher(), make_student())
    distiller.compile(optimizer="adam", jit_compile=JIT_COMPILE)
    history = distiller.fit(x, targets, epochs=2, batch_size=64, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    with pytest.raises(AssertionError, match="must not run"):
        distiller.fit(x, labels, epochs=1, batch_size=64, verbose=0)


def test_no_teacher_trains_on_cached_targets_and_saves(tmp_path):
    x, labels, teacher_logits = synthetic_problem(num_examples=256)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=10)
    )
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01), jit_compile=JIT_COMPILE
    )
    loss_before = distiller.evaluate(x, targets, verbose=0)
    distiller.fit(x, targets, epochs=3, batch_size=64, verbose=0)
    assert distiller.evaluate(x, targets, verbose=0) < 0.9 * loss_before
    assert distiller.head.row_sparse_optimizer is not None
    with pytest.raises(ValueError, match="teacher=None"):
        distiller.fit(x, labels, epochs=1, batch_size=64, verbose=0)
    path = os.path.join(tmp_path, "no_teacher.keras")
    distiller.save(path)
    restored = keras.saving.load_model(path)
    assert restored.teacher is None
    np.testing.assert_allclose(
        restored.student.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        rtol=1e-6,
    )


def test_online_teacher_matches_cached_targets_in_evaluation():
    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    teacher = make_teacher(x, teacher_logits)
    distiller = keras_dis.Distiller(teacher, make_student())
    online = distiller.evaluate(x, labels, verbose=0)
    cached = distiller.evaluate(
        x, np.asarray(keras_dis.pack_teacher_targets(labels, teacher.predict(x, verbose=0))),
        verbose=0,
    )
    student_logits = distiller.student.predict(x, verbose=0)
    expected = numpy_full_kd(
        student_logits, teacher.predict(x, verbose=0), 1.0
    ).mean()
    np.testing.assert_allclose(online, cached, rtol=1e-5)
    np.testing.assert_allclose(online, expected, rtol=1e-4)


def test_save_and_load(tmp_path):
    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    distiller = keras_dis.Distiller(
        make_teacher(x, teacher_logits), make_student(), top_r=12
    )
    distiller.fit(x, labels, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "distiller.keras")
    distiller.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, keras_dis.Distiller)
    assert restored.top_r == 12
    np.testing.assert_allclose(
        restored.student.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        rtol=1e-6,
    )
    assert not restored.teacher.trainable


def test_teacher_and_student_class_counts_must_match():
    x, labels, teacher_logits = synthetic_problem(num_examples=16)
    with pytest.raises(ValueError, match="same classes"):
        keras_dis.Distiller(
            make_teacher(x, teacher_logits), make_student(num_classes=30)
        )


def test_student_needs_a_head():
    x, labels, teacher_logits = synthetic_problem(num_examples=16)
    inputs = keras.Input((8,))
    plain = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(inputs))
    with pytest.raises(ValueError, match="SampledDistillationHead"):
        keras_dis.Distiller(make_teacher(x, teacher_logits), plain)


@pytest.mark.parametrize(
    "teacher, student, top_r, argument",
    [
        ("teacher", None, None, "teacher"),
        (None, "student", None, "student"),
        (None, None, 0, "top_r"),
        (None, None, NUM_CLASSES + 1, "top_r"),
    ],
)
def test_bad_arguments(teacher, student, top_r, argument):
    x, labels, teacher_logits = synthetic_problem(num_examples=16)
    with pytest.raises(ValueError, match=argument):
        keras_dis.Distiller(
            teacher or make_teacher(x, teacher_logits),
            student or make_student(),
            top_r=top_r,
        )


@pytest.mark.parametrize("bad_label", [-1, NUM_CLASSES])
def test_labels_out_of_range(bad_label):
    x, labels, teacher_logits = synthetic_problem(num_examples=16)
    labels = labels.copy()
    labels[3] = bad_label
    distiller = keras_dis.Distiller(make_teacher(x, teacher_logits), make_student())
    with pytest.raises(ValueError, match="`y`"):
        distiller.fit(x, labels, epochs=1, verbose=0)


def test_head_is_found_in_nested_students():
    x, labels, teacher_logits = synthetic_problem(num_examples=64)
    backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    student = keras.Sequential([backbone, SampledDistillationHead(NUM_CLASSES)])
    distiller = keras_dis.Distiller(make_teacher(x, teacher_logits), student)
    assert distiller.head is student.layers[-1]
    distiller.fit(x, labels, epochs=1, verbose=0)


@pytest.mark.parametrize("num_classes, expected", [(40, 40), (150, 100)])
def test_an_online_teacher_ranks_at_most_100_classes_by_default(
    num_classes, expected
):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 8)).astype("float32")
    teacher_logits = (x @ rng.normal(size=(8, num_classes))).astype("float32")
    labels = teacher_logits.argmax(-1)
    inputs = keras.Input((8,))
    student = keras.Model(
        inputs, keras_dis.SampledDistillationHead(num_classes)(inputs)
    )
    distiller = keras_dis.Distiller(make_teacher(x, teacher_logits), student)
    assert distiller.ranked_classes == expected
    targets = distiller.teacher_targets(x, labels)
    assert tuple(targets.shape) == (64, 2 + 2 * expected)
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    history = distiller.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    full = keras_dis.Distiller(None, student, top_r=num_classes)
    assert full.ranked_classes == num_classes
