import numpy as np
import pytest
from keras import ops

from keras_dis.src import input_checks
from keras_dis.src.teacher_targets import pack_teacher_targets

NUM_CLASSES = 6


def packed(top_r=3):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, NUM_CLASSES)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, 5)
    return np.array(pack_teacher_targets(labels, logits, top_r=top_r))


def check(targets, num_classes=NUM_CLASSES):
    code, value, safe = input_checks.check_teacher_targets(targets, num_classes)
    return int(code), float(value), [ops.convert_to_numpy(t) for t in safe]


def test_valid_targets_pass():
    code, _, safe = check(packed())
    assert code == input_checks.OK
    assert all(np.all(np.isfinite(part)) for part in safe)


@pytest.mark.parametrize(
    "row, column, value, expected_code",
    [
        (1, 0, NUM_CLASSES, input_checks.LABEL_OUT_OF_RANGE),
        (2, 0, -1.0, input_checks.LABEL_OUT_OF_RANGE),
        (0, 0, 2.5, input_checks.LABEL_OUT_OF_RANGE),
        (4, 0, np.nan, input_checks.LABEL_OUT_OF_RANGE),
        (3, 3, 7.0, input_checks.CLASS_ID_OUT_OF_RANGE),
        (3, 4, 1.5, input_checks.CLASS_ID_OUT_OF_RANGE),
        (0, 1, np.inf, input_checks.NON_FINITE_TEACHER_LOGIT),
        (2, 6, np.nan, input_checks.NON_FINITE_TEACHER_LOGIT),
        (2, 7, -np.inf, input_checks.NON_FINITE_TEACHER_LOGIT),
    ],
)
def test_bad_values_are_found_and_made_safe(row, column, value, expected_code):
    targets = packed()
    targets[row, column] = value
    code, found, (labels, tail, classes, logits) = check(targets)
    assert code == expected_code
    np.testing.assert_equal(found, np.float32(value))
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert classes.min() >= 0 and classes.max() < NUM_CLASSES
    assert np.all(np.isfinite(tail)) and np.all(np.isfinite(logits))
    message = input_checks.error_message(code, found, NUM_CLASSES)
    assert "`y`" in message or "teacher logit" in message
    assert str(int(value) if np.isfinite(value) and value == int(value) else value) in message


def test_the_first_problem_wins():
    targets = packed()
    targets[0, 6] = np.nan
    targets[4, 0] = 99
    assert check(targets)[:2] == (input_checks.LABEL_OUT_OF_RANGE, 99.0)


def test_one_hot_labels_are_recognised():
    labels = np.eye(NUM_CLASSES, dtype="float32")[[1, 0, 5]]
    code, _, _ = check(labels)
    assert code == input_checks.ONE_HOT_TARGETS
    assert "one-hot" in input_checks.error_message(code, 1.0, NUM_CLASSES)
    # Packed targets of the same width are not one-hot.
    assert check(packed(top_r=2))[0] == input_checks.OK


def test_keep_if_valid_gives_nan_without_gradient_for_bad_batches():
    losses = ops.convert_to_tensor(np.array([1.0, 2.0], "float32"))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(input_checks.keep_if_valid(0, losses)), [1.0, 2.0]
    )
    assert np.all(np.isnan(ops.convert_to_numpy(input_checks.keep_if_valid(1, losses))))
