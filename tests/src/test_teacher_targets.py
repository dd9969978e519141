import numpy as np
import pytest
from keras import ops

from keras_dis.src import teacher_targets


def reference_pack(labels, logits, top_r):
    order = np.argsort(-logits, axis=-1, kind="stable")
    top = order[:, :top_r]
    tail = order[:, top_r:]
    top_logits = np.take_along_axis(logits, top, -1)
    if tail.shape[1]:
        tail_values = np.take_along_axis(logits.astype("float64"), tail, -1)
        tail_logits = np.log(np.exp(tail_values).mean(-1))
    else:
        tail_logits = np.zeros(len(labels))
    return np.concatenate(
        [labels[:, None], tail_logits[:, None], top, top_logits], axis=-1
    )


@pytest.mark.parametrize("top_r", [1, 4, 16])
def test_pack_matches_reference(top_r):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 16)) * 5).astype("float32")
    labels = rng.integers(0, 16, size=5)
    packed = ops.convert_to_numpy(
        teacher_targets.pack_teacher_targets(labels, logits, top_r=top_r)
    )
    assert packed.shape == (5, teacher_targets.targets_width(top_r))
    np.testing.assert_allclose(
        packed, reference_pack(labels, logits, top_r), rtol=1e-5, atol=1e-5
    )


def test_tail_is_exact_for_a_tiny_tail():
    """The tail is summed directly, not as a difference of large sums."""
    logits = np.array([[60.0, 0.0, -1.0, -2.0]], "float32")
    packed = ops.convert_to_numpy(
        teacher_targets.pack_teacher_targets(np.array([0]), logits, top_r=1)
    )
    expected = np.log(np.exp([0.0, -1.0, -2.0]).mean())
    np.testing.assert_allclose(packed[0, 1], expected, rtol=1e-6)


def test_unpack_and_dense_round_trip():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 9)).astype("float32")
    labels = np.array([1, 8, 0])
    packed = teacher_targets.pack_teacher_targets(labels, logits)
    unpacked = teacher_targets.unpack_teacher_targets(packed)
    assert ops.convert_to_numpy(unpacked[0]).tolist() == labels.tolist()
    dense = ops.convert_to_numpy(teacher_targets.dense_teacher_logits(unpacked, 9))
    np.testing.assert_allclose(dense, logits, rtol=1e-6)


def test_dense_logits_fill_the_tail():
    logits = np.array([[3.0, 1.0, 2.0, 0.0]], "float32")
    packed = teacher_targets.pack_teacher_targets(np.array([2]), logits, top_r=2)
    dense = ops.convert_to_numpy(
        teacher_targets.dense_teacher_logits(
            teacher_targets.unpack_teacher_targets(packed), 4
        )
    )
    tail = np.log(np.exp([1.0, 0.0]).mean())
    np.testing.assert_allclose(dense, [[3.0, tail, 2.0, tail]], rtol=1e-6)


@pytest.mark.parametrize(
    "labels, logits, top_r, argument",
    [
        (np.array([0, 5]), np.zeros((2, 5)), None, "labels"),
        (np.array([-1, 0]), np.zeros((2, 5)), None, "labels"),
        (np.array([0, 1]), np.array([[0, np.nan, 0], [0, 0, 0]]), None, "teacher_logits"),
        (np.array([0, 1]), np.array([[0, np.inf, 0], [0, 0, 0]]), None, "teacher_logits"),
        (np.array([0, 1]), np.zeros((2, 5)), 0, "top_r"),
        (np.array([0, 1]), np.zeros((2, 5)), 6, "top_r"),
        (np.array([0, 1]), np.zeros((2, 5, 1)), None, "teacher_logits"),
    ],
)
def test_bad_input(labels, logits, top_r, argument):
    with pytest.raises(ValueError, match=argument):
        teacher_targets.pack_teacher_targets(labels, logits, top_r=top_r)


def test_bad_width():
    with pytest.raises(ValueError, match="2 \\+ 2 \\* R"):
        teacher_targets.unpack_teacher_targets(np.zeros((2, 5), "float32"))
