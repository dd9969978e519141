import os

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_dis.src import proposals
from keras_dis.src.head import SampledDistillationHead
from keras_dis.src import sampled_step


class SampledDistillationHeadLayerTest(testing.TestCase):
    @pytest.mark.requires_trainable_backend
    def test_layer_conformance(self):
        # The training check of the harness fits the layer's output to
        # targets of the inference shape; in training this head passes its
        # features to `DISLoss` instead, which test_losses.py trains.
        self.run_layer_test(
            SampledDistillationHead,
            init_kwargs={"num_classes": 5, "seed": 1},
            input_shape=(2, 3),
            expected_output_shape=(2, 5),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=4,
            expected_num_seed_generators=1,
            supports_masking=False,
            run_training_check=False,
        )

    def test_layer_conformance_without_bias(self):
        self.run_layer_test(
            SampledDistillationHead,
            init_kwargs={"num_classes": 4, "use_bias": False},
            input_shape=(3, 6),
            expected_output_shape=(3, 4),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=4,
            supports_masking=False,
            run_training_check=False,
        )


def build_head(num_classes=7, features_dim=4, **kwargs):
    head = SampledDistillationHead(
        num_classes, bias_initializer="random_normal", **kwargs
    )
    head.build((None, features_dim))
    return head


def test_full_logits_are_a_dense_layer():
    head = build_head()
    features = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    kernel = ops.convert_to_numpy(head.kernel)
    bias = ops.convert_to_numpy(head.bias)
    assert kernel.shape == (7, 4)  # class-major rows
    np.testing.assert_allclose(
        ops.convert_to_numpy(head(features)), features @ kernel.T + bias, rtol=1e-5
    )


def test_sampled_logits_equal_gathered_full_logits():
    head = build_head()
    features = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    classes = np.array([[0, 6, 6], [2, 3, 1], [5, 5, 0]], "int32")
    full = ops.convert_to_numpy(head(features))
    sampled = ops.convert_to_numpy(head.sampled_logits(features, classes))
    np.testing.assert_allclose(
        sampled, np.take_along_axis(full, classes, axis=-1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_subset_logits_equal_gathered_full_logits(batch_size):
    # 7 classes: from all logits with 4 samples of 3 entries, from gathered
    # rows with one sample.
    head = build_head()
    rng = np.random.default_rng(2)
    features = rng.normal(size=(batch_size, 4)).astype("float32")
    classes = rng.integers(0, 7, (batch_size, 3)).astype("int32")
    logits, rows = head.subset_logits(features, classes)
    assert (rows is None) == (batch_size == 4)
    full = ops.convert_to_numpy(head(features))
    np.testing.assert_allclose(
        ops.convert_to_numpy(logits),
        np.take_along_axis(full, classes, axis=-1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_training_call_passes_features_tagged_with_the_head():
    head, other = build_head(), build_head()
    features = np.ones((2, 4), "float32")
    output = head(features, training=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(output), features)
    assert sampled_step.training_head(output) is head
    assert not other.claim_training_output(output)
    assert head.claim_training_output(output)
    # The tag belongs to that tensor only: nothing else carries a head.
    assert sampled_step.training_head(head(features)) is None
    other_output = other(features, training=True)
    assert sampled_step.training_head(other_output) is other
    assert sampled_step.training_head(features) is None


def test_an_unused_training_output_raises_at_the_next_call():
    """Features returned in training and used by no DISLoss (code outside
    `fit` taking them for logits) raise, saying what to do."""
    head = build_head()
    features = np.ones((2, 4), "float32")
    head(features, training=True)
    with pytest.raises(ValueError, match="not used by a keras_dis.DISLoss"):
        head(features)
    # Raised once: the head works again.
    assert head(features).shape == (2, 7)


def test_initial_rank_proposal_and_set_right_scale():
    proposal = proposals.LaplaceMixtureProposal(left_scale=2.0, right_scale=4.0)
    head = build_head(num_classes=50, rank_proposal=proposal)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.rank_proposal), proposal.rank_probabilities(50)
    )
    assert float(ops.convert_to_numpy(head.right_scale)) == 4.0
    head.set_right_scale(30.0)
    assert float(ops.convert_to_numpy(head.right_scale)) == 30.0
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.rank_proposal),
        proposal.rank_probabilities(50, right_scale=30.0),
    )


def test_save_and_load_keras_format(tmp_path):
    inputs = keras.Input((6,))
    features = keras.layers.Dense(4, activation="relu")(inputs)
    outputs = SampledDistillationHead(
        9,
        rank_proposal=proposals.LaplaceMixtureProposal(scale_units="fraction"),
        seed=3,
    )(features)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_right_scale(0.5)
    x = np.random.default_rng(2).normal(size=(5, 6)).astype("float32")
    path = os.path.join(tmp_path, "student.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    head = restored.layers[-1]
    assert isinstance(head, SampledDistillationHead)
    assert head.rank_proposal_config.scale_units == "fraction"
    assert float(ops.convert_to_numpy(head.right_scale)) == 0.5
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.rank_proposal),
        ops.convert_to_numpy(model.layers[-1].rank_proposal),
    )


@pytest.mark.parametrize("num_classes", [1, 0, 2.5, "10"])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        SampledDistillationHead(num_classes)


def test_bad_rank_proposal():
    with pytest.raises(ValueError, match="rank_proposal"):
        SampledDistillationHead(10, rank_proposal=proposals.UniformProposal())


@pytest.mark.parametrize("shape", [(2, 3, 4), (5,)])
def test_features_of_the_wrong_rank(shape):
    head = SampledDistillationHead(10)
    with pytest.raises(ValueError, match="features|ndim|input"):
        head(np.zeros(shape, "float32"))


def test_small_kernel_initialises_like_a_transposed_dense_kernel():
    head = SampledDistillationHead(
        30, kernel_initializer=keras.initializers.GlorotUniform(seed=3)
    )
    head.build((None, 8))
    expected = keras.initializers.GlorotUniform(seed=3)((8, 30))
    np.testing.assert_allclose(
        ops.convert_to_numpy(head.kernel), ops.convert_to_numpy(expected).T
    )


@pytest.mark.parametrize(
    "initializer, expected_std",
    [
        # Dense-layout fans: fan_in = d = 256, fan_out = C = 70000.
        ("glorot_uniform", np.sqrt(2.0 / (256 + 70000))),
        ("he_normal", np.sqrt(2.0 / 256)),
        ("lecun_uniform", np.sqrt(1.0 / 256)),
    ],
)
def test_large_kernel_initialises_blockwise_with_dense_statistics(
    initializer, expected_std
):
    head = SampledDistillationHead(70000, kernel_initializer=initializer)
    head.build((None, 256))  # 17.9M entries: generated in row blocks
    kernel = ops.convert_to_numpy(head.kernel)
    assert kernel.shape == (70000, 256)
    # 17.9M samples: the standard deviation is within 0.5%.
    np.testing.assert_allclose(kernel.std(), expected_std, rtol=5e-3)
    assert abs(kernel.mean()) < 1e-3 * expected_std * 10


def copy_student_weights(source, target):
    """Copies kernels and biases layer by layer (the heads' optimizer
    slots differ between the two)."""
    for source_layer, target_layer in zip(source.layers, target.layers):
        for name in ("kernel", "bias"):
            if getattr(source_layer, name, None) is not None:
                # Through NumPy: on JAX the two must not share a buffer
                # that training donates.
                getattr(target_layer, name).assign(
                    ops.convert_to_numpy(getattr(source_layer, name))
                )


def test_own_optimizer_trains_rows_like_the_distiller():
    """`student.compile(loss=DISLoss)` with `optimizer=` on the head takes
    the same steps as the Distiller's row-sparse path."""
    import keras_dis
    from tests.src.test_losses import make_student
    from tests.src.test_losses import synthetic_problem

    x, labels, teacher_logits = synthetic_problem(num_examples=256)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=10)
    )
    student = make_student(head_optimizer=keras.optimizers.Adam(0.01))
    reference = make_student()
    copy_student_weights(student, reference)
    head = student.layers[-1]
    assert not head.kernel.trainable and head.row_sparse_optimizer is not None
    distiller = keras_dis.Distiller(None, reference)
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras_dis.DISLoss(k=5)
    )
    # The same compilation (XLA draws other random numbers on TensorFlow).
    student.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras_dis.DISLoss(k=5),
        jit_compile=distiller.jit_compile,
    )
    loss_before = student.evaluate(x, targets, verbose=0)
    for model in (student, distiller):
        model.fit(x, targets, epochs=2, batch_size=64, shuffle=False, verbose=0)
    assert student.evaluate(x, targets, verbose=0) < 0.9 * loss_before
    # The model's optimizer keeps no state for the head.
    assert not any(
        head.num_classes in tuple(v.shape) for v in student.optimizer.variables
    )
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            ops.convert_to_numpy(getattr(head, name)),
            ops.convert_to_numpy(getattr(reference.layers[-1], name)),
            rtol=1e-4,
            atol=1e-6,
        )


def test_own_optimizer_is_saved_and_resumes(tmp_path):
    import keras_dis
    from tests.src.test_losses import make_student
    from tests.src.test_losses import synthetic_problem

    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=10)
    )
    student = make_student(head_optimizer="rmsprop")
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    student.fit(x, targets, epochs=1, batch_size=64, verbose=0)
    path = os.path.join(tmp_path, "student.keras")
    student.save(path)
    restored = keras.saving.load_model(path)
    head, restored_head = student.layers[-1], restored.layers[-1]
    assert isinstance(restored_head.optimizer, keras.optimizers.RMSprop)
    for variable, restored_variable in zip(head.weights, restored_head.weights):
        assert variable.path == restored_variable.path
        np.testing.assert_array_equal(
            ops.convert_to_numpy(variable), ops.convert_to_numpy(restored_variable)
        )
    assert float(ops.convert_to_numpy(restored_head.row_sparse_optimizer.step.value)) == 2.0
    kernel_before = ops.convert_to_numpy(restored_head.kernel)
    restored.fit(x, targets, epochs=1, batch_size=64, verbose=0)
    assert not np.allclose(ops.convert_to_numpy(restored_head.kernel), kernel_before)


def test_own_optimizer_respects_freezing():
    import keras_dis
    from tests.src.test_losses import make_student
    from tests.src.test_losses import synthetic_problem

    x, labels, teacher_logits = synthetic_problem(num_examples=128)
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    student = make_student(head_optimizer="adam")
    head = student.layers[-1]

    def kernel_after_fit():
        student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
        student.fit(x, targets, epochs=1, batch_size=64, verbose=0)
        return ops.convert_to_numpy(head.kernel)

    head.trainable = False
    frozen = ops.convert_to_numpy(head.kernel)
    np.testing.assert_array_equal(kernel_after_fit(), frozen)
    head.trainable = True
    # Unfrozen, the rows are still the head optimizer's alone.
    assert not head.kernel.trainable and not head.bias.trainable
    assert not any(v is head.kernel for v in student.trainable_variables)
    assert not np.allclose(kernel_after_fit(), frozen)


def test_own_optimizer_needs_a_sampled_proposal():
    import keras_dis
    from tests.src.test_losses import make_student
    from tests.src.test_losses import synthetic_problem

    x, labels, teacher_logits = synthetic_problem(num_examples=64)
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    student = make_student(head_optimizer="adam")
    student.compile(
        optimizer="adam", loss=keras_dis.DISLoss(proposal="full")
    )
    with pytest.raises(ValueError, match="optimizer"):
        student.fit(x, targets, epochs=1, batch_size=64, verbose=0)


@pytest.mark.parametrize(
    "optimizer", ["adagrad", keras.optimizers.Adam(clipnorm=1.0)]
)
def test_bad_own_optimizer(optimizer):
    with pytest.raises(ValueError, match="optimizer=None"):
        SampledDistillationHead(10, optimizer=optimizer)
