import numpy as np
import pytest
from keras import ops

import keras_dis
from keras_dis.src import diagnostics
from keras_dis.src import losses


def problem(num_classes=40, batch_size=6, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    teacher_logits = (spread * rng.normal(size=(batch_size, num_classes))).astype(
        "float32"
    )
    labels = teacher_logits.argmax(-1)
    targets = keras_dis.pack_teacher_targets(labels, teacher_logits)
    student_logits = rng.normal(size=(batch_size, num_classes)).astype("float32")
    return student_logits, np.asarray(targets), teacher_logits


def test_exact_gradient_matches_numpy():
    student_logits, targets, teacher_logits = problem()
    temperature = 2.0
    p = np.exp(teacher_logits / temperature)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(student_logits / temperature)
    q /= q.sum(-1, keepdims=True)
    from keras_dis.src import teacher_targets

    gradient = diagnostics.exact_logit_gradient(
        student_logits,
        teacher_targets.unpack_teacher_targets(targets),
        temperature,
        1.0,
    )
    np.testing.assert_allclose(
        np.asarray(gradient), (q - p) / temperature, rtol=1e-4, atol=1e-7
    )


def test_cosine_rises_to_one_with_k():
    """Near all classes in every subset, the expected gradient is exact."""
    student_logits, targets, _ = problem()
    cosines = [
        diagnostics.estimator_diagnostics(
            losses.get("teacher_uniform", k=k), student_logits, targets,
            num_subsets=256,
        )["gradient_cosine"].mean()
        for k in (2, 39)
    ]
    assert cosines[1] > 0.99, cosines
    assert cosines[1] > cosines[0], cosines


def test_effective_sample_size_of_known_weights():
    """Uniform proposal, equal student logits: the label weighs 1 (`r_y :=
    1`) and each of the `k` draws `1 / r = C`, so the ESS is known."""
    _, targets, _ = problem()
    k, num_classes = 10, 40
    result = diagnostics.estimator_diagnostics(
        losses.get("uniform", k=k),
        np.zeros((6, num_classes), "float32"),
        targets,
        num_subsets=8,
    )
    weights = np.array([1.0] + [num_classes] * k)
    expected = weights.sum() ** 2 / (weights**2).sum() / (k + 1)
    np.testing.assert_allclose(result["student_ess"], expected, rtol=1e-5)
    assert (result["teacher_ess"] < expected).all()


def test_a_biased_subset_scores_below_an_unbiased_one():
    """The teacher's top classes alone (no tail) miss a broad teacher's mass."""
    student_logits, targets, _ = problem(num_classes=200, spread=1.0)
    top_k, sampled = (
        diagnostics.estimator_diagnostics(
            losses.get(method, k=20, temperature=4.0), student_logits, targets,
            num_subsets=512,
        )["gradient_cosine"].mean()
        for method in ("top_k", "teacher_uniform")
    )
    assert sampled > top_k + 0.1, (sampled, top_k)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"loss": losses.get("full_kd")}, "proposal"),
        ({"num_subsets": 0}, "num_subsets"),
    ],
)
def test_bad_arguments(kwargs, argument):
    student_logits, targets, _ = problem()
    arguments = {
        "loss": losses.get("dis", k=5),
        "student_logits": student_logits,
        "teacher_targets": targets,
        **kwargs,
    }
    with pytest.raises(ValueError, match=argument):
        diagnostics.estimator_diagnostics(**arguments)


def test_sparse_cosine_equals_the_dense_cosine_with_repeated_classes():
    from keras_dis.src.diagnostics import _sparse_cosine

    rng = np.random.default_rng(3)
    classes = np.array([[0, 3, 3, 5], [1, 1, 1, 2]], "int32")
    gradient = rng.normal(size=(2, 4)).astype("float32")
    dense = rng.normal(size=(2, 7)).astype("float32")
    sparse = np.zeros((2, 7), "float32")
    for row in range(2):
        np.add.at(sparse[row], classes[row], gradient[row])
    expected = (sparse * dense).sum(-1) / (
        np.linalg.norm(sparse, axis=-1) * np.linalg.norm(dense, axis=-1)
    )
    cosine = _sparse_cosine(
        ops.convert_to_tensor(gradient),
        ops.convert_to_tensor(classes),
        ops.convert_to_tensor(np.take_along_axis(dense, classes, axis=-1)),
        ops.convert_to_tensor(np.linalg.norm(dense, axis=-1)),
    )
    np.testing.assert_allclose(ops.convert_to_numpy(cosine), expected, rtol=1e-5)
