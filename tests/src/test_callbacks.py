import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_dis
from keras_dis.src import proposals
from tests.src.test_losses import make_student
from tests.src.test_losses import synthetic_problem


def fit_student(callback, epochs=5, initial_epoch=0, student=None):
    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    student = student or make_student()
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    history = student.fit(
        x, targets, epochs=epochs, initial_epoch=initial_epoch, batch_size=64,
        callbacks=[callback], verbose=0,
    )
    return student, history


def test_linear_schedule_reaches_num_classes():
    student, history = fit_student(keras_dis.ProposalScheduler())
    expected = np.linspace(5.0, 40.0, 5)
    np.testing.assert_allclose(history.history["right_scale"], expected, rtol=1e-6)
    head = student.layers[-1]
    assert float(ops.convert_to_numpy(head.right_scale)) == pytest.approx(40.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.rank_proposal),
        proposals.LaplaceMixtureProposal().rank_probabilities(40, right_scale=40.0),
    )


def test_geometric_schedule_with_start_and_end():
    _, history = fit_student(
        keras_dis.ProposalScheduler(start=2.0, end=32.0, schedule="geometric")
    )
    np.testing.assert_allclose(
        history.history["right_scale"], [2.0, 4.0, 8.0, 16.0, 32.0], rtol=1e-6
    )


def test_resumed_run_continues_the_schedule():
    _, full = fit_student(keras_dis.ProposalScheduler(), epochs=5)
    _, resumed = fit_student(keras_dis.ProposalScheduler(), epochs=5, initial_epoch=3)
    np.testing.assert_allclose(
        resumed.history["right_scale"], full.history["right_scale"][3:]
    )


def test_the_proposal_used_in_training_changes_each_epoch():
    """The annealed proposal reaches the compiled step (not frozen in it)."""
    student = make_student()
    fit_student(keras_dis.ProposalScheduler(start=5.0, end=6.0), epochs=2, student=student)
    first = ops.convert_to_numpy(student.layers[-1].rank_proposal).copy()
    fit_student(keras_dis.ProposalScheduler(start=40.0, end=40.0), epochs=1, student=student)
    second = ops.convert_to_numpy(student.layers[-1].rank_proposal)
    assert np.abs(first - second).max() > 1e-3


def test_model_without_head():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="SampledDistillationHead"):
        model.fit(
            np.zeros((8, 8)), np.zeros((8, 4)), epochs=1, verbose=0,
            callbacks=[keras_dis.ProposalScheduler()],
        )


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"start": 0.0}, "start"), ({"end": -2.0}, "end"), ({"schedule": "cosine"}, "schedule")],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        keras_dis.ProposalScheduler(**kwargs)


def test_config_round_trip():
    scheduler = keras_dis.ProposalScheduler(start=3.0, end=9.0, schedule="geometric")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(scheduler)
    )
    assert restored.get_config() == scheduler.get_config()


def compiled_student(num_classes=100, num_examples=128):
    x, labels, teacher_logits = synthetic_problem(
        num_examples=num_examples, num_classes=num_classes
    )
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    student = make_student(num_classes=num_classes)
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    return student, x, targets


def fit_one_epoch(student, x, targets, epoch, callback):
    history = student.fit(
        x, targets, initial_epoch=epoch, epochs=epoch + 1, batch_size=64,
        callbacks=[callback], verbose=0,
    )
    return history.history["right_scale"]


@pytest.mark.parametrize("same_instance", [True, False], ids=["same", "fresh"])
def test_one_epoch_per_fit_call_follows_the_run(same_instance):
    """`epochs=` makes the schedule span the run, not each fit call."""
    student, x, targets = compiled_student(num_classes=100)
    scheduler = keras_dis.ProposalScheduler(epochs=5)
    values = []
    for epoch in range(5):
        callback = scheduler if same_instance else keras_dis.ProposalScheduler(epochs=5)
        values += fit_one_epoch(student, x, targets, epoch, callback)
    np.testing.assert_allclose(values, [5.0, 28.75, 52.5, 76.25, 100.0], rtol=1e-6)
    head = student.layers[-1]
    assert float(ops.convert_to_numpy(head.right_scale)) == pytest.approx(100.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.rank_proposal),
        proposals.LaplaceMixtureProposal().rank_probabilities(100, right_scale=100.0),
    )


def test_one_fit_call_with_epochs_equals_the_default():
    _, default = fit_student(keras_dis.ProposalScheduler(), epochs=5)
    _, explicit = fit_student(keras_dis.ProposalScheduler(epochs=5), epochs=5)
    np.testing.assert_allclose(explicit.history["right_scale"], default.history["right_scale"])


def test_epochs_past_the_run_hold_the_end_value():
    _, history = fit_student(keras_dis.ProposalScheduler(epochs=3), epochs=5)
    np.testing.assert_allclose(
        history.history["right_scale"], [5.0, 22.5, 40.0, 40.0, 40.0], rtol=1e-6
    )


@pytest.mark.parametrize("same_instance", [True, False], ids=["same", "fresh"])
def test_one_epoch_per_fit_call_without_epochs_is_an_error(same_instance):
    """The silent jump of b2 to its end value cannot happen in a process."""
    student, x, targets = compiled_student(num_classes=100)
    scheduler = keras_dis.ProposalScheduler()
    assert fit_one_epoch(student, x, targets, 0, scheduler) == [5.0]
    callback = scheduler if same_instance else keras_dis.ProposalScheduler()
    with pytest.raises(ValueError, match=r"`epochs` must be given.*epochs=None"):
        fit_one_epoch(student, x, targets, 1, callback)
    head = student.layers[-1]
    assert float(ops.convert_to_numpy(head.right_scale)) == pytest.approx(5.0)


def test_one_epoch_per_fit_call_across_processes_warns(tmp_path):
    """A model saved and loaded between one-epoch calls (a new process, new
    heads): from the third call the head holds the end value too early."""
    student, x, targets = compiled_student(num_classes=40)
    path = str(tmp_path / "student.keras")
    values = []
    for epoch in range(3):
        if epoch == 2:
            with pytest.warns(UserWarning, match="already holds the end value"):
                values += fit_one_epoch(
                    student, x, targets, epoch, keras_dis.ProposalScheduler()
                )
        else:
            values += fit_one_epoch(
                student, x, targets, epoch, keras_dis.ProposalScheduler()
            )
        student.save(path)
        student = keras.saving.load_model(path)
    # Epochs 0 and 1 are indistinguishable from a two-epoch run.
    assert values == [5.0, 40.0, 40.0]


def test_extending_a_run_without_epochs_is_an_error():
    student = make_student()
    fit_student(keras_dis.ProposalScheduler(), epochs=3, student=student)
    with pytest.raises(ValueError, match="earlier fit call scheduled the head"):
        fit_student(
            keras_dis.ProposalScheduler(), epochs=6, initial_epoch=3, student=student
        )
    # With the run's length given, the schedule continues.
    _, history = fit_student(
        keras_dis.ProposalScheduler(epochs=6), epochs=6, initial_epoch=3, student=student
    )
    np.testing.assert_allclose(history.history["right_scale"], [26.0, 33.0, 40.0])


def test_a_new_run_from_epoch_zero_is_not_checked():
    student = make_student()
    fit_student(keras_dis.ProposalScheduler(), epochs=2, student=student)
    _, history = fit_student(keras_dis.ProposalScheduler(), epochs=3, student=student)
    np.testing.assert_allclose(history.history["right_scale"], [5.0, 22.5, 40.0])


class Interrupt(keras.callbacks.Callback):
    """Raises before batch `batch` of epoch `epoch`."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.stop_epoch, self.stop_batch, self.epoch = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == (self.stop_epoch, self.stop_batch):
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("same_instance", [True, False], ids=["same", "fresh"])
@pytest.mark.parametrize("save_freq", ["epoch", 1], ids=["per_epoch", "per_batch"])
@pytest.mark.parametrize("stop_epoch", [2, 4])
def test_backup_and_restore_resumes_without_error(
    tmp_path, stop_epoch, save_freq, same_instance
):
    """Resuming a run with its own `epochs` (from a backup taken after an
    epoch or within one, the last one too) neither raises nor warns, and
    continues the schedule."""
    student, x, targets = compiled_student(num_classes=40)
    scheduler = keras_dis.ProposalScheduler()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=save_freq)

    def run(callbacks):
        return student.fit(
            x, targets, epochs=5, batch_size=64, callbacks=callbacks, verbose=0
        )

    with pytest.raises(RuntimeError, match="interrupted"):
        run([scheduler, backup, Interrupt(stop_epoch, 1)])
    callback = scheduler if same_instance else keras_dis.ProposalScheduler()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        history = run([callback, backup])
    assert not [r for r in records if "ProposalScheduler" in str(r.message)]
    np.testing.assert_allclose(
        history.history["right_scale"], np.linspace(5.0, 40.0, 5)[stop_epoch:]
    )


@pytest.mark.parametrize("epochs", [0, -3, 2.5, True, "5"])
def test_bad_epochs(epochs):
    with pytest.raises(ValueError, match=r"`epochs` must be an integer >= 1"):
        keras_dis.ProposalScheduler(epochs=epochs)


def test_config_round_trip_with_epochs():
    scheduler = keras_dis.ProposalScheduler(end=50.0, epochs=12)
    assert scheduler.get_config()["epochs"] == 12
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(scheduler)
    )
    assert restored.epochs == 12
    assert restored.get_config() == scheduler.get_config()
