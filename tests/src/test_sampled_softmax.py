import keras
import numpy as np
import pytest
from keras import ops

from keras_dis.src import sampled_softmax
from tests.backend_utils import value_and_gradient


def algorithm_1(student_logits, teacher_logits, proposal, temperature):
    """Alg. 1 of the DIS paper, one sample, written as its loop.

    Energies are minus logits, so `grad_theta E_k = -grad_theta s_k`; the
    returned gradient is with respect to the student logits of the subset,
    entry by entry (repeated classes are separate entries).
    """
    subset_size = len(student_logits)
    student_weight_sum, teacher_weight_sum = 0.0, 0.0  # V, U
    g = np.zeros(subset_size)  # sum_k v_k * grad E_k^s
    h = np.zeros(subset_size)  # sum_k u_k * grad E_k^s
    student_weights, teacher_weights = [], []
    for j in range(subset_size):
        v = np.exp(student_logits[j] / temperature) / proposal[j]
        u = np.exp(teacher_logits[j] / temperature) / proposal[j]
        energy_gradient = np.zeros(subset_size)
        energy_gradient[j] = -1.0 / temperature
        g += v * energy_gradient
        h += u * energy_gradient
        student_weight_sum += v
        teacher_weight_sum += u
        student_weights.append(v)
        teacher_weights.append(u)
    gradient = h / teacher_weight_sum - g / student_weight_sum
    loss = -sum(
        (u / teacher_weight_sum) * np.log(v / student_weight_sum)
        for u, v in zip(teacher_weights, student_weights)
    )
    return loss, gradient


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_and_gradient_match_algorithm_1(temperature):
    rng = np.random.default_rng(0)
    batch_size, subset_size = 3, 6
    student_logits = rng.normal(size=(batch_size, subset_size)) * 3
    teacher_logits = rng.normal(size=(batch_size, subset_size)) * 3
    proposal = rng.uniform(0.01, 0.3, size=(batch_size, subset_size))
    proposal[:, 0] = 1.0  # the target, r_y := 1
    # A class drawn twice is two entries with the same logits and proposal.
    student_logits[:, 5] = student_logits[:, 4]
    teacher_logits[:, 5] = teacher_logits[:, 4]
    proposal[:, 5] = proposal[:, 4]

    def total_loss(logits):
        return ops.sum(
            sampled_softmax.distillation_cross_entropy(
                logits,
                teacher_logits.astype("float32"),
                temperature=temperature,
                log_proposal=np.log(proposal).astype("float32"),
            )
        )

    loss, gradient = value_and_gradient(total_loss, student_logits)
    expected = [
        algorithm_1(student_logits[b], teacher_logits[b], proposal[b], temperature)
        for b in range(batch_size)
    ]
    # float32 against float64: 1e-5 relative.
    np.testing.assert_allclose(loss, sum(e[0] for e in expected), rtol=1e-5)
    np.testing.assert_allclose(
        gradient, np.stack([e[1] for e in expected]), rtol=1e-4, atol=1e-6
    )


def test_hard_label_term_is_sampled_cross_entropy():
    rng = np.random.default_rng(1)
    student_logits = rng.normal(size=(2, 5)).astype("float32")
    log_proposal = np.log(rng.uniform(0.1, 0.5, size=(2, 5))).astype("float32")
    log_proposal[:, 0] = 0.0
    loss = sampled_softmax.distillation_cross_entropy(
        student_logits,
        np.zeros_like(student_logits),
        log_proposal=log_proposal,
        distillation_weight=0.0,
        label_position=0,
    )
    corrected = student_logits - log_proposal
    expected = -(
        corrected[:, 0] - np.log(np.exp(corrected).sum(axis=-1))
    )
    np.testing.assert_allclose(ops.convert_to_numpy(loss), expected, rtol=1e-5)


def full_kd_gradient(student_logits, teacher_logits, temperature):
    p = np.exp(teacher_logits / temperature)
    p /= p.sum()
    q = np.exp(student_logits / temperature)
    q /= q.sum()
    return (q - p) / temperature


def test_uniform_sampling_gradient_converges_to_full_kd():
    """With a uniform proposal the sampled gradient tends to the full one."""
    num_classes, temperature = 50, 2.0
    rng = np.random.default_rng(2)
    student_logits = rng.normal(size=(1, num_classes)).astype("float32")
    teacher_logits = (3 * rng.normal(size=(1, num_classes))).astype("float32")
    label = int(np.argmax(teacher_logits))
    top_classes = np.argsort(-teacher_logits, axis=-1).astype("int32")
    top_logits = np.take_along_axis(teacher_logits, top_classes, axis=-1)
    log_bins = np.log(np.full((1, num_classes + 1), 1.0 / num_classes))
    log_bins[0, -1] = -np.inf  # no tail: the ranking is complete
    full_gradient = full_kd_gradient(student_logits[0], teacher_logits[0], temperature)
    cosines, errors = [], []
    for num_samples in (10, 100, 1000, 10000):
        classes, sampled_teacher, log_proposal = sampled_softmax.sample_classes(
            log_bins.astype("float32"),
            top_classes,
            top_logits,
            np.zeros((1,), "float32"),
            num_classes=num_classes,
            num_samples=num_samples,
            seed_generator=keras.random.SeedGenerator(num_samples),
        )
        subset = ops.concatenate([ops.full((1, 1), label, "int32"), classes], -1)
        teacher_subset = ops.concatenate(
            [teacher_logits[:, label : label + 1], sampled_teacher], -1
        )
        log_proposal = ops.pad(log_proposal, ((0, 0), (1, 0)))

        def loss(logits):
            return ops.sum(
                sampled_softmax.distillation_cross_entropy(
                    ops.take_along_axis(logits, subset, axis=-1),
                    teacher_subset,
                    temperature=temperature,
                    log_proposal=log_proposal,
                )
            )

        _, gradient = value_and_gradient(loss, student_logits)
        gradient = gradient[0]
        cosines.append(
            gradient @ full_gradient
            / (np.linalg.norm(gradient) * np.linalg.norm(full_gradient))
        )
        errors.append(np.linalg.norm(gradient - full_gradient))
    # Measured (TF, seed as above): cosine 0.6 -> 0.9 -> 0.99 -> 0.999.
    assert cosines[-1] > 0.995, cosines
    assert errors[-1] < errors[0] / 5, errors
    assert cosines[-1] > cosines[0], cosines


@pytest.mark.parametrize("num_classes, top_r", [(30, 7), (700, 300)])
def test_nth_class_outside_matches_brute_force(num_classes, top_r):
    """Small sets (pairwise ranks on TensorFlow) and large ones (sorted)."""
    rng = np.random.default_rng(3)
    # In rank order, not sorted; the last row is a run of consecutive ids.
    classes = np.stack(
        [rng.choice(num_classes, top_r, replace=False) for _ in range(3)]
        + [np.arange(top_r)[::-1] + 5]
    ).astype("int32")
    positions = rng.integers(0, num_classes - top_r, size=(4, 9)).astype("int32")
    positions[:, 0] = [0, 0, num_classes - top_r - 1, 4]
    result = ops.convert_to_numpy(
        sampled_softmax.nth_class_outside(classes, positions)
    )
    for row in range(4):
        outside = [c for c in range(num_classes) if c not in classes[row]]
        assert result[row].tolist() == [outside[p] for p in positions[row]]


def test_sampled_bins_follow_the_proposal():
    """Chi-square goodness of fit, fixed seed, 9 degrees of freedom."""
    probabilities = np.array([0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    batch_size, num_samples = 100, 200
    for shared in (True, False):
        log_bins = np.log(probabilities)[None, :].astype("float32")
        if not shared:
            log_bins = np.repeat(log_bins, batch_size, axis=0)
        bins = ops.convert_to_numpy(
            sampled_softmax.sample_rank_bins(
                log_bins, batch_size, num_samples, keras.random.SeedGenerator(4)
            )
        )
        counts = np.bincount(bins.ravel(), minlength=len(probabilities))
        expected = probabilities * bins.size
        chi_square = ((counts - expected) ** 2 / expected).sum()
        # 99.9% quantile of chi-square with 9 degrees of freedom: 27.88.
        assert chi_square < 27.88, (shared, counts)


def test_zero_probability_bins_are_never_sampled():
    log_bins = np.log(np.array([[0.5, 0.0, 0.5, 0.0]], "float32"))
    bins = ops.convert_to_numpy(
        sampled_softmax.sample_rank_bins(
            log_bins, 64, 64, keras.random.SeedGenerator(5)
        )
    )
    assert set(np.unique(bins)) == {0, 2}


def test_sample_classes_maps_ranks_and_tail():
    num_classes = 20
    top_classes = np.array([[7, 3, 11], [0, 19, 5]], "int32")
    top_logits = np.array([[5.0, 4.0, 3.0], [6.0, 2.0, 1.0]], "float32")
    tail_logits = np.array([-1.0, -2.0], "float32")
    log_bins = np.log(np.array([[0.2, 0.2, 0.2, 0.4]], "float32"))
    classes, teacher, log_proposal = (
        ops.convert_to_numpy(t)
        for t in sampled_softmax.sample_classes(
            log_bins, top_classes, top_logits, tail_logits,
            num_classes=num_classes, num_samples=400,
            seed_generator=keras.random.SeedGenerator(6),
        )
    )
    for row in range(2):
        for cls, logit, log_r in zip(classes[row], teacher[row], log_proposal[row]):
            if cls in top_classes[row]:
                position = list(top_classes[row]).index(cls)
                assert logit == top_logits[row, position]
                np.testing.assert_allclose(log_r, np.log(0.2), rtol=1e-6)
            else:
                assert 0 <= cls < num_classes
                assert logit == tail_logits[row]
                np.testing.assert_allclose(log_r, np.log(0.4 / 17), rtol=1e-6)
        # Every one of the 17 tail classes shows up in 400 draws.
        tail_seen = set(classes[row]) - set(top_classes[row])
        assert len(tail_seen) == 17


def test_label_teacher_logits():
    result = sampled_softmax.label_teacher_logits(
        np.array([3, 9], "int32"),
        np.array([[7, 3], [1, 2]], "int32"),
        np.array([[5.0, 4.0], [6.0, 2.0]], "float32"),
        np.array([-1.0, -2.0], "float32"),
    )
    assert ops.convert_to_numpy(result).tolist() == [4.0, -2.0]
