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


def packed_problem(batch_size=4, num_classes=30, top_r=30, seed=8):
    rng = np.random.default_rng(seed)
    teacher_logits = (3 * rng.normal(size=(batch_size, num_classes))).astype(
        "float32"
    )
    order = np.argsort(-teacher_logits, axis=-1)
    # Labels at the top rank, inside the top 3 and outside the top 10.
    labels = order[np.arange(batch_size), [0, 2, 15, 25][:batch_size]]
    top_classes = order[:, :top_r].astype("int32")
    top_logits = np.take_along_axis(teacher_logits, top_classes, -1)
    tail_logits = np.zeros((batch_size,), "float32")
    if top_r < num_classes:
        tail = np.take_along_axis(teacher_logits, order[:, top_r:], -1)
        tail_logits = np.log(np.exp(tail).mean(-1)).astype("float32")
    targets = (labels.astype("int32"), tail_logits, top_classes, top_logits)
    return targets, teacher_logits


def test_tail_log_bins_drop_the_exact_ranks_and_renormalise():
    log_bins = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], "float32"))
    tail = np.exp(
        ops.convert_to_numpy(sampled_softmax.tail_log_bins(log_bins, 2))
    )
    np.testing.assert_allclose(tail, [[0.0, 0.0, 2 / 3, 1 / 3]], rtol=1e-6)


@pytest.mark.parametrize("top_r", [30, 12])
def test_exact_top_subset_layout_and_weights(top_r):
    num_classes, k, exact_top = 30, 9, 3
    targets, _ = packed_problem(num_classes=num_classes, top_r=top_r)
    labels, _, top_classes, top_logits = targets
    probabilities = np.linspace(2.0, 1.0, top_r + 1)
    if top_r == num_classes:
        probabilities[-1] = 0.0
    probabilities /= probabilities.sum()
    log_bins = np.log(probabilities)[None].astype("float32")
    classes, teacher, log_weights = (
        ops.convert_to_numpy(t)
        for t in sampled_softmax.sample_subset(
            log_bins, targets, num_classes, k, exact_top,
            keras.random.SeedGenerator(9),
        )
    )
    assert classes.shape == (4, 1 + k)
    masked = np.float32(sampled_softmax.MASKED_LOG_WEIGHT)
    tail_probabilities = probabilities[exact_top:] / probabilities[exact_top:].sum()
    for row in range(4):
        label = labels[row]
        assert classes[row, 0] == label and log_weights[row, 0] == 0
        exact = classes[row, 1 : 1 + exact_top]
        assert exact.tolist() == top_classes[row, :exact_top].tolist()
        np.testing.assert_array_equal(teacher[row, 1 : 1 + exact_top], top_logits[row, :exact_top])
        # The label counts once: its copy among the exact classes is masked.
        np.testing.assert_array_equal(
            log_weights[row, 1 : 1 + exact_top], np.where(exact == label, masked, np.float32(0.0))
        )
        for cls, log_weight in zip(classes[row, 1 + exact_top :], log_weights[row, 1 + exact_top :]):
            assert cls not in exact  # drawn from ranks >= exact_top only
            if cls == label:
                assert log_weight == masked
                continue
            ranked = list(top_classes[row])
            if cls in ranked:
                r = tail_probabilities[ranked.index(cls) - exact_top]
            else:
                r = tail_probabilities[-1] / (num_classes - top_r)
            np.testing.assert_allclose(log_weight, np.log((k - exact_top) * r), rtol=1e-5)


def weighted_subset_reference(student, teacher, log_weights, temperature):
    """Loss and logit gradient of the weighted subset, one sample, by loops:
    masked entries are left out, the others weigh `exp(logit / T) / w`."""
    kept = [j for j in range(len(student)) if log_weights[j] < 1e29]
    u = {j: np.exp(teacher[j] / temperature - log_weights[j]) for j in kept}
    v = {j: np.exp(student[j] / temperature - log_weights[j]) for j in kept}
    u_sum, v_sum = sum(u.values()), sum(v.values())
    loss = -sum(u[j] / u_sum * np.log(v[j] / v_sum) for j in kept)
    gradient = np.zeros(len(student))
    for j in kept:
        gradient[j] = (v[j] / v_sum - u[j] / u_sum) / temperature
    return loss, gradient


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_exact_top_loss_and_gradient_match_numpy(temperature):
    num_classes, k, exact_top = 30, 8, 4
    targets, teacher_logits = packed_problem(num_classes=num_classes)
    rng = np.random.default_rng(10)
    student_logits = (2 * rng.normal(size=(4, num_classes))).astype("float32")
    log_bins = np.log(np.full((1, num_classes + 1), 1 / num_classes))
    log_bins[0, -1] = -np.inf
    classes, teacher, log_weights = sampled_softmax.sample_subset(
        log_bins.astype("float32"), targets, num_classes, k, exact_top,
        keras.random.SeedGenerator(11),
    )
    classes = ops.convert_to_numpy(classes)
    subset_logits = np.take_along_axis(student_logits, classes, -1)

    def total_loss(logits):
        return ops.sum(
            sampled_softmax.distillation_cross_entropy(
                logits, teacher, temperature=temperature, log_proposal=log_weights
            )
        )

    loss, gradient = value_and_gradient(total_loss, subset_logits)
    closed_form = ops.convert_to_numpy(
        sampled_softmax.distillation_cross_entropy_gradient(
            subset_logits, teacher, temperature=temperature, log_proposal=log_weights
        )
    )
    teacher, log_weights = ops.convert_to_numpy(teacher), ops.convert_to_numpy(log_weights)
    expected = [
        weighted_subset_reference(
            subset_logits[b], teacher[b], log_weights[b], temperature
        )
        for b in range(4)
    ]
    np.testing.assert_allclose(loss, sum(e[0] for e in expected), rtol=1e-5)
    expected_gradient = np.stack([e[1] for e in expected])
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(closed_form, expected_gradient, rtol=1e-4, atol=1e-6)
    assert np.isfinite(gradient).all()


def test_exact_top_estimates_the_normaliser_without_bias():
    """The mean over subsets of sum(exp(s_j) / w_j) is sum_c exp(s_c)."""
    num_classes, k, exact_top, repeats = 30, 6, 3, 10000
    targets, _ = packed_problem(num_classes=num_classes, top_r=12)
    rng = np.random.default_rng(12)
    student_logits = rng.normal(size=(4, num_classes)).astype("float32")
    # The 12 ranked classes, then the tail bin of 18 classes.
    probabilities = np.append(np.linspace(3.0, 1.0, 12), 18.0)
    probabilities /= probabilities.sum()
    log_bins = np.log(probabilities)[None].astype("float32")
    repeated = tuple(np.concatenate([np.asarray(t)] * repeats) for t in targets)
    classes, _, log_weights = (
        ops.convert_to_numpy(t)
        for t in sampled_softmax.sample_subset(
            log_bins, repeated, num_classes, k, exact_top,
            keras.random.SeedGenerator(13),
        )
    )
    logits = np.concatenate([student_logits] * repeats)
    estimates = np.where(
        log_weights < 1e29,
        np.exp(np.take_along_axis(logits, classes, -1) - log_weights),
        0.0,
    ).sum(-1)
    mean_estimate = estimates.reshape(repeats, 4).mean(0)
    # Measured: within 1% on every backend (the standard error is ~0.5%).
    np.testing.assert_allclose(
        mean_estimate, np.exp(student_logits).sum(-1), rtol=0.02
    )


def test_computes_every_class_with_few_classes_only():
    # 16 classes per subset entry at most, and no more than the batch's
    # entries; an unknown batch size always gathers rows.
    assert sampled_softmax.computes_every_class(100, (256, 11))
    assert sampled_softmax.computes_every_class(176, (256, 11))
    assert not sampled_softmax.computes_every_class(177, (256, 11))
    assert not sampled_softmax.computes_every_class(100, (8, 11))
    assert not sampled_softmax.computes_every_class(10, (None, 11))
