"""Robustness across the package: numerics, mixed precision, determinism,
checkpoints and resuming (export: `test_export.py`)."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_dis
from keras_dis.src import losses
from keras_dis.src.head import SampledDistillationHead
from tests.src.test_distiller import make_teacher
from tests.src.test_losses import make_student
from tests.src.test_losses import synthetic_problem

JIT_COMPILE = keras.backend.backend() != "torch"


def cached_problem(num_examples=256, top_r=20, scale=1.0):
    x, labels, teacher_logits = synthetic_problem(num_examples)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, scale * teacher_logits, top_r=top_r)
    )
    return x, labels, teacher_logits, targets


@pytest.mark.parametrize("method", list(losses.METHODS))
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_extreme_teacher_logits_give_finite_losses(method, magnitude):
    x, labels, teacher_logits, _ = cached_problem(64)
    teacher_logits = np.where(
        teacher_logits > np.median(teacher_logits), magnitude, -magnitude
    ).astype("float32")
    teacher_logits[:, 0] = 0.0
    targets = keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=10)
    head = SampledDistillationHead(40, seed=0)
    features = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    loss_fn = losses.get(method, k=10, temperature=2.0)
    training = float(loss_fn(targets, head(features, training=True)))
    evaluation = float(loss_fn(targets, head(features)))
    assert np.isfinite(training) and np.isfinite(evaluation), (training, evaluation)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_is_finite(policy):
    x, labels, teacher_logits, targets = cached_problem(256)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        student = make_student()
        teacher = make_teacher(x, teacher_logits)
        distiller = keras_dis.Distiller(teacher, student)
        distiller.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=JIT_COMPILE)
        history = distiller.fit(
            x, targets, epochs=3, batch_size=64, verbose=0,
            callbacks=[keras_dis.ProposalScheduler()],
        )
        predictions = student.predict(x, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    assert student.layers[-1].kernel.dtype == "float32"
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.isfinite(predictions.astype("float32")).all()


def train_once(seed, epochs=2, callbacks=(), x_targets=None):
    x, targets = x_targets or cached_problem(256)[::3]
    keras.utils.set_random_seed(seed)
    distiller = keras_dis.Distiller(
        make_teacher(x, np.zeros((len(x), 40), "float32")), make_student(seed=seed)
    )
    distiller.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=JIT_COMPILE)
    distiller.fit(
        x, targets, epochs=epochs, batch_size=64, shuffle=False, verbose=0,
        callbacks=[keras_dis.ProposalScheduler(), *callbacks],
    )
    return distiller


def test_same_seed_same_samples_and_weights():
    first = train_once(seed=3).student.get_weights()
    second = train_once(seed=3).student.get_weights()
    other = train_once(seed=4).student.get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - c).max() > 1e-3 for a, c in zip(first, other))


def test_same_head_seed_draws_the_same_classes():
    _, labels, teacher_logits, targets = cached_problem(16)
    features = np.ones((16, 6), "float32")
    draws = []
    for _ in range(2):
        head = SampledDistillationHead(
            40, seed=11, kernel_initializer=keras.initializers.GlorotUniform(1)
        )
        draws.append(
            float(losses.DISLoss(k=5)(targets, head(features, training=True)))
        )
    assert draws[0] == draws[1]


class StopAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_to_the_same_weights(tmp_path):
    """Stop during epoch 3 of 4, resume: same weights as an unbroken run."""
    x, labels, teacher_logits, targets = cached_problem(256)
    unbroken = train_once(seed=5, epochs=4, x_targets=(x, targets))
    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        train_once(seed=5, epochs=4, callbacks=[backup, StopAtEpoch(2)],
                   x_targets=(x, targets))
    resumed = train_once(seed=5, epochs=4, callbacks=[backup], x_targets=(x, targets))
    for a, b in zip(unbroken.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    head = resumed.head
    assert float(ops.convert_to_numpy(head.right_scale)) == pytest.approx(40.0)
    step = resumed.head.row_sparse_slot("row_sparse_step", None)
    assert float(ops.convert_to_numpy(step)) == 16.0  # 4 epochs x 4 steps


def test_model_checkpoint_saves_loadable_distillers(tmp_path):
    path = os.path.join(tmp_path, "distiller_{epoch}.keras")
    distiller = train_once(
        seed=6, callbacks=[keras.callbacks.ModelCheckpoint(path)]
    )
    restored = keras.saving.load_model(path.format(epoch=2))
    x = cached_problem(32)[0]
    np.testing.assert_allclose(
        restored.student.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        rtol=1e-5,
    )
    for a, b in zip(restored.get_weights(), distiller.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
