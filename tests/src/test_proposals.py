import keras
import numpy as np
import pytest
from keras import ops

from keras_dis.src import proposals
from keras_dis.src import sampled_softmax


def laplace_cdf(x, loc, scale):
    """Closed-form Laplace CDF, independent of tensorflow-probability."""
    z = (x - loc) / scale
    return np.where(z < 0, 0.5 * np.exp(z), 1 - 0.5 * np.exp(-z))


@pytest.mark.parametrize("num_classes", [10, 100, 1000, 1_000_000])
def test_laplace_mixture_sums_to_one_and_matches_closed_form(num_classes):
    proposal = proposals.LaplaceMixtureProposal()
    probabilities = proposal.rank_probabilities(num_classes)
    assert probabilities.shape == (num_classes,)
    # Middle ranks of a large C underflow float32: they are never sampled.
    assert probabilities.min() >= 0
    assert probabilities[:10].min() > 0 and probabilities[-10:].min() > 0
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)
    edges = np.arange(num_classes + 1, dtype="float64")
    cdf = 0.5 * laplace_cdf(edges, 0.0, 3.0) + 0.5 * laplace_cdf(
        edges, num_classes, 5.0
    )
    expected = np.diff(cdf) / (cdf[-1] - cdf[0])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("num_classes", [10, 100, 1000, 1_000_000])
def test_laplace_mixture_start_shape_has_two_tips(num_classes):
    """Fig. 3 of the paper: the left tip about 1.5-2x the right tip."""
    probabilities = proposals.LaplaceMixtureProposal().rank_probabilities(
        num_classes
    )
    tip_ratio = probabilities[0] / probabilities[-1]
    assert 1.5 <= tip_ratio <= 2.0, tip_ratio
    middle = probabilities[num_classes // 2]
    assert probabilities[-1] > middle
    assert np.argmax(probabilities) == 0


def test_laplace_mixture_flattens_as_right_scale_grows():
    num_classes = 100
    proposal = proposals.LaplaceMixtureProposal()
    tip_heights = []
    right_tips = []
    for right_scale in (5.0, 20.0, 50.0, 100.0):
        probabilities = proposal.rank_probabilities(num_classes, right_scale)
        right_half = probabilities[num_classes // 2 :]
        tip_heights.append(probabilities[-1])
        right_tips.append(right_half.max() / right_half.min())
    assert all(a > b for a, b in zip(tip_heights, tip_heights[1:])), tip_heights
    assert all(a > b for a, b in zip(right_tips, right_tips[1:])), right_tips
    # Nearly flat on the right half at the end of the default schedule.
    assert right_tips[-1] < 1.7


def test_fraction_units_are_nearly_flat():
    """The paper's literal reading (scales 3 and 5 on [0, 1]) is flat."""
    probabilities = proposals.LaplaceMixtureProposal(
        scale_units="fraction"
    ).rank_probabilities(100)
    # Measured: max / min = 1.13 over 100 ranks.
    assert probabilities.max() / probabilities.min() < 1.2


def dis_rank_bins(num_classes, top_r, batch_size):
    """The default mixture's rank probabilities and its log rank bins."""
    rank_probabilities = proposals.LaplaceMixtureProposal().rank_probabilities(
        num_classes
    )
    log_bins = proposals.LaplaceMixtureProposal().log_bin_probabilities(
        np.zeros((batch_size, top_r), "float32"),
        num_classes=num_classes,
        temperature=1.0,
        rank_proposal=ops.convert_to_tensor(rank_probabilities),
    )
    return rank_probabilities, log_bins


def test_dis_bins_sample_with_proposal_frequencies():
    """Chi-square of sampled ranks against the mixture, fixed seed."""
    num_classes, top_r = 30, 30
    rank_probabilities, log_bins = dis_rank_bins(num_classes, top_r, 1)
    bins = ops.convert_to_numpy(
        sampled_softmax.sample_rank_bins(
            log_bins, 200, 250, keras.random.SeedGenerator(7)
        )
    )
    counts = np.bincount(bins.ravel(), minlength=top_r + 1)
    assert counts[top_r] == 0  # no tail bin when R == C
    expected = rank_probabilities * bins.size
    chi_square = ((counts[:top_r] - expected) ** 2 / expected).sum()
    # 99.9% quantile of chi-square with 29 degrees of freedom: 58.30.
    assert chi_square < 58.30, chi_square


def test_dis_tail_bin_holds_the_rest_of_the_mass():
    num_classes, top_r = 100, 10
    rank_probabilities, log_bins = dis_rank_bins(num_classes, top_r, 2)
    bins = np.exp(ops.convert_to_numpy(log_bins))
    assert bins.shape == (1, top_r + 1)
    np.testing.assert_allclose(bins[0, :top_r], rank_probabilities[:top_r], rtol=1e-6)
    np.testing.assert_allclose(
        bins[0, top_r], rank_probabilities[top_r:].sum(), rtol=1e-4
    )


def test_uniform_bins():
    bins = np.exp(
        ops.convert_to_numpy(
            proposals.UniformProposal().log_bin_probabilities(
                np.zeros((3, 4)), num_classes=10, temperature=2.0
            )
        )
    )
    np.testing.assert_allclose(bins, [[0.1, 0.1, 0.1, 0.1, 0.6]], rtol=1e-6)


def test_teacher_bins_are_the_teacher_softmax_with_tail():
    rng = np.random.default_rng(8)
    num_classes, top_r, temperature = 12, 5, 3.0
    logits = rng.normal(size=(2, num_classes)) * 4
    order = np.argsort(-logits, axis=-1)
    top_logits = np.take_along_axis(logits, order[:, :top_r], axis=-1)
    tail = np.take_along_axis(logits, order[:, top_r:], axis=-1)
    tail_logits = np.log(np.exp(tail).mean(axis=-1))
    bins = np.exp(
        ops.convert_to_numpy(
            proposals.TeacherProposal().log_bin_probabilities(
                top_logits.astype("float32"),
                num_classes=num_classes,
                temperature=temperature,
                tail_logits=tail_logits.astype("float32"),
            )
        )
    )
    weights = np.exp(top_logits / temperature)
    tail_weight = (num_classes - top_r) * np.exp(tail_logits / temperature)
    total = weights.sum(-1) + tail_weight
    np.testing.assert_allclose(bins[:, :top_r], weights / total[:, None], rtol=1e-5)
    np.testing.assert_allclose(bins[:, top_r], tail_weight / total, rtol=1e-5)
    # At temperature 1 the tail bin is exactly the teacher's tail mass.
    bins_t1 = np.exp(
        ops.convert_to_numpy(
            proposals.TeacherProposal().log_bin_probabilities(
                top_logits.astype("float32"), num_classes, 1.0,
                tail_logits=tail_logits.astype("float32"),
            )
        )
    )
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        bins_t1[:, top_r],
        np.take_along_axis(softmax, order[:, top_r:], -1).sum(-1),
        rtol=1e-5,
    )


def test_pdbs_selects_largest_prediction_differences():
    rng = np.random.default_rng(9)
    teacher = rng.dirichlet(np.ones(20), size=4)
    student = rng.dirichlet(np.ones(20), size=4)
    selected = ops.convert_to_numpy(
        proposals.PredictionDifferenceSelection().select(teacher, student, 5)
    )
    expected = np.argsort(-np.abs(teacher - student), axis=-1)[:, :5]
    np.testing.assert_array_equal(np.sort(selected, -1), np.sort(expected, -1))


def test_get_by_name_and_errors():
    for name, cls in proposals.PROPOSALS.items():
        assert isinstance(proposals.get(name), cls)
    instance = proposals.UniformProposal()
    assert proposals.get(instance) is instance
    with pytest.raises(ValueError, match="proposal"):
        proposals.get("softmax")


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"left_scale": 0.0}, "left_scale"),
        ({"right_scale": -1.0}, "right_scale"),
        ({"left_weight": 1.0}, "left_weight"),
        ({"scale_units": "bins"}, "scale_units"),
    ],
)
def test_laplace_mixture_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        proposals.LaplaceMixtureProposal(**kwargs)


def test_proposals_serialize():
    for proposal in (
        proposals.LaplaceMixtureProposal(left_scale=2.0, scale_units="fraction"),
        proposals.TeacherProposal(),
        proposals.UniformProposal(),
        proposals.TeacherUniformProposal(teacher_weight=0.3),
        proposals.PredictionDifferenceSelection(),
    ):
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(proposal)
        )
        assert type(restored) is type(proposal)
        assert restored.get_config() == proposal.get_config()


@pytest.mark.parametrize("top_r", [5, 12])
def test_teacher_uniform_mixes_the_tempered_teacher_with_uniform(top_r):
    """NumPy: `w * softmax(t / T) + (1 - w) / C` per class, summed per bin."""
    num_classes, temperature, weight = 12, 3.0, 0.3
    rng = np.random.default_rng(7)
    teacher_logits = -np.sort(-5 * rng.normal(size=(2, num_classes)), axis=-1)
    top_logits = teacher_logits[:, :top_r]
    tail = teacher_logits[:, top_r:]
    tail_logits = (
        np.log(np.exp(tail).mean(-1)) if top_r < num_classes else np.zeros(2)
    )
    log_bins = proposals.TeacherUniformProposal(weight).log_bin_probabilities(
        top_logits.astype("float32"),
        num_classes=num_classes,
        temperature=temperature,
        tail_logits=tail_logits.astype("float32"),
    )
    bins = np.exp(ops.convert_to_numpy(log_bins))
    dense = np.concatenate(
        [top_logits, np.repeat(tail_logits[:, None], num_classes - top_r, -1)],
        axis=-1,
    )
    teacher = np.exp(dense / temperature)
    teacher /= teacher.sum(-1, keepdims=True)
    per_class = weight * teacher + (1 - weight) / num_classes
    expected = np.concatenate(
        [per_class[:, :top_r], per_class[:, top_r:].sum(-1, keepdims=True)], -1
    )
    np.testing.assert_allclose(bins, expected, rtol=1e-5, atol=1e-7)
    # Every class keeps at least the uniform share.
    assert bins[:, :top_r].min() >= (1 - weight) / num_classes * (1 - 1e-6)


def test_teacher_uniform_bad_weight():
    with pytest.raises(ValueError, match="teacher_weight"):
        proposals.TeacherUniformProposal(teacher_weight=1.0)


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="TensorFlow is the backend"
)
def test_the_laplace_proposal_does_not_import_tensorflow():
    """tensorflow-probability's NumPy substrate without TensorFlow: the
    first head build on JAX or PyTorch does not pay TensorFlow's import."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, keras_dis\n"
        "head = keras_dis.SampledDistillationHead(50)\n"
        "head(np.zeros((2, 4), 'float32'))\n"
        "probabilities = keras_dis.proposals.LaplaceMixtureProposal()"
        ".rank_probabilities(50)\n"
        "assert abs(probabilities.sum() - 1) < 1e-5\n"
        "print('tensorflow' in sys.modules)\n"
        "import tensorflow\n"
        "print(tensorflow.constant(1.0).numpy())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "1.0"], result.stdout
