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
