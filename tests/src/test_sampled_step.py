"""The sampled step: one path, one owner of its state, no silent failure.

Every misuse listed in issue 9 either trains correctly or raises an error
that names the problem, on the plain path (`student.compile(loss=DISLoss)`)
and the `Distiller`, for every way of feeding data.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_dis
from keras_dis.src import sampled_step

NUM_CLASSES = 10
FEATURES_DIM = 16
NUM_EXAMPLES = 64


def problem(seed=0, top_r=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, 8)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES)
    teacher_logits = 3 * rng.normal(size=(NUM_EXAMPLES, NUM_CLASSES))
    targets = np.array(
        keras_dis.pack_teacher_targets(
            labels, teacher_logits.astype("float32"), top_r=top_r
        )
    )
    return x, labels, targets


def make_student(head_optimizer=None, seed=1):
    inputs = keras.Input((8,))
    features = keras.layers.Dense(
        FEATURES_DIM,
        activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        name="body",
    )(inputs)
    head = keras_dis.SampledDistillationHead(
        NUM_CLASSES,
        optimizer=head_optimizer,
        seed=seed,
        kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
        name="head",
    )
    return keras.Model(inputs, head(features))


def plain_student():
    student = make_student(head_optimizer="adam")
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    return student, student


def distiller_student():
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    return distiller, distiller.student


PATHS = {"plain": plain_student, "distiller": distiller_student}


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size=16):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[batch], self.y[batch]


def feed(kind, x, y):
    """`fit` arguments that give `(x, y)` through one input path."""
    if kind == "numpy":
        return {"x": x, "y": y, "batch_size": 16}
    if kind == "tf_data":
        return {"x": tf.data.Dataset.from_tensor_slices((x, y)).batch(16)}
    if kind == "generator":

        def generator():
            for start in range(0, len(x), 16):
                yield x[start : start + 16], y[start : start + 16]

        return {"x": generator()}
    return {"x": Batches(x, y)}


INPUT_PATHS = ("numpy", "tf_data", "generator", "py_dataset")


def weights_of(model):
    # The group-leader scratch of the row update holds no state.
    return [
        np.array(w) for w in model.weights if "group_leaders" not in w.path
    ]


def assert_fit_raises(model, student, arguments, match):
    """`fit` on one batch with a bad sample raises and trains nothing."""
    before = weights_of(student)
    with pytest.raises(Exception, match=match):
        model.fit(**arguments, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(before, weights_of(student)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("input_path", INPUT_PATHS)
@pytest.mark.parametrize(
    "column, value, match",
    [
        (0, NUM_CLASSES + 3, r"label=13"),
        (0, -1, r"label=-1"),
        (2, NUM_CLASSES, r"class id=10"),
        (7, np.nan, r"teacher logit=nan"),
        (1, np.inf, r"teacher logit=inf"),
    ],
)
def test_bad_packed_targets_raise_on_every_input_path(
    path, input_path, column, value, match
):
    model, student = PATHS[path]()
    x, _, targets = problem()
    targets[2, column] = value
    assert_fit_raises(
        model, student, feed(input_path, x[:16], targets[:16]), match
    )


@pytest.mark.parametrize("input_path", ("tf_data", "generator", "py_dataset"))
def test_online_labels_out_of_range_raise(input_path):
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(NUM_CLASSES)])
    distiller = keras_dis.Distiller(teacher, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    x, labels, _ = problem()
    labels[5] = NUM_CLASSES
    assert_fit_raises(
        distiller,
        distiller.student,
        feed(input_path, x[:16], labels[:16]),
        r"label=10",
    )


def test_non_finite_online_teacher_logits_raise():
    teacher = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(NUM_CLASSES),
            keras.layers.Lambda(lambda logits: logits / 0.0),
        ]
    )
    distiller = keras_dis.Distiller(teacher, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    x, labels, _ = problem()
    assert_fit_raises(
        distiller, distiller.student, feed("numpy", x[:16], labels[:16]),
        "teacher logit",
    )


def test_one_hot_labels_are_refused():
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(NUM_CLASSES)])
    distiller = keras_dis.Distiller(teacher, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    x, labels, _ = problem()
    one_hot = np.eye(NUM_CLASSES, dtype="float32")[labels]
    assert_fit_raises(
        distiller, distiller.student, feed("tf_data", x[:16], one_hot[:16]),
        "one-hot",
    )


@pytest.mark.parametrize("path", sorted(PATHS))
def test_labels_or_no_y_on_the_plain_path_say_what_is_needed(path):
    model, _ = PATHS[path]()
    x, labels, _ = problem()
    if path == "plain":
        with pytest.raises(ValueError, match="packed teacher targets"):
            model.evaluate(x, labels, verbose=0)
    with pytest.raises(ValueError, match="`y`"):
        model.fit(x, epochs=1, verbose=0)


def test_teacher_cache_with_more_classes_than_the_student_raises(tmp_path):
    x, labels, _ = problem()
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(20)])
    cache = keras_dis.TeacherCache.build(
        os.path.join(tmp_path, "cache"), teacher, x, labels % 20, top_r=4,
        verbose=0,
    )
    model, student = distiller_student()
    dataset = keras_dis.TeacherCacheDataset(x, cache, batch_size=16)
    with pytest.raises(Exception, match="class id"):
        model.fit(dataset, epochs=1, verbose=0)


def test_a_teacher_with_its_own_head_distils_into_a_student():
    """A student distilled earlier is the teacher of the next stage."""
    x, labels, _ = problem()
    teacher = make_student(seed=3)
    student = make_student()
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(0.02), loss=keras_dis.DISLoss(k=3))
    teacher_before = weights_of(teacher)
    packed = keras_dis.pack_teacher_targets(labels, teacher.predict(x, verbose=0))
    loss_before = distiller.evaluate(x, np.asarray(packed), verbose=0)
    kernel_before = np.array(distiller.head.kernel)
    distiller.fit(x, labels, epochs=5, batch_size=16, verbose=0)
    assert not np.allclose(np.array(distiller.head.kernel), kernel_before)
    assert distiller.evaluate(x, np.asarray(packed), verbose=0) < loss_before
    for a, b in zip(teacher_before, weights_of(teacher)):
        np.testing.assert_array_equal(a, b)


def test_a_standard_loss_on_the_head_raises():
    student = make_student()
    student.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, labels, _ = problem()
    # FEATURES_DIM > NUM_CLASSES: the loss itself would accept the features.
    with pytest.raises(ValueError, match="not used by a keras_dis.DISLoss"):
        student.fit(x, labels, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "layer", [keras.layers.Softmax, lambda: keras.layers.Dense(NUM_CLASSES)]
)
def test_a_layer_after_the_head_raises(layer):
    inputs = keras.Input((8,))
    head = keras_dis.SampledDistillationHead(NUM_CLASSES, name="my_head")
    student = keras.Model(inputs, layer()(head(inputs)))
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    x, _, targets = problem(top_r=NUM_CLASSES)
    with pytest.raises(ValueError, match="'my_head' feeds"):
        student.fit(x, targets, epochs=1, verbose=0)


def test_the_distiller_step_reads_no_handoff():
    """`Distiller.compute_loss` runs the step with its own head: features
    that are not its head's training output are not taken for it."""
    distiller, student = distiller_student()
    x, _, targets = problem()
    features = np.zeros((4, NUM_CLASSES), "float32")  # full logits
    full = distiller.compute_loss(x[:4], targets[:4], features)
    expected = keras_dis.DISLoss(k=3)(targets[:4], features)
    np.testing.assert_allclose(np.array(full), np.array(expected), rtol=1e-6)
    output = student(x[:4], training=True)
    assert sampled_step.training_head(output) is distiller.head
    sampled = distiller.compute_loss(x[:4], targets[:4], output)
    assert np.isfinite(float(sampled))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_overflowing_fp16_features_leave_the_head_untouched(path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, student = PATHS[path]()
    finally:
        keras.config.set_dtype_policy(previous)
    head = student.layers[-1]
    x, _, targets = problem()
    huge = np.full_like(x, 1e6)  # beyond float16 (65504): inf features
    state = [v for v in head.weights if "group_leaders" not in v.path]
    before = [np.array(v) for v in state]
    model.fit(huge[:16], targets[:16], batch_size=16, epochs=1, verbose=0)
    for variable, value in zip(state, before):
        after = np.array(variable)
        assert np.all(np.isfinite(after)), variable.name
        np.testing.assert_array_equal(after, value, err_msg=variable.name)
    # A finite batch then trains the head.
    model.fit(x[:16], targets[:16], batch_size=16, epochs=1, verbose=0)
    assert not np.array_equal(np.array(head.kernel), before[0])
    assert float(np.array(head.row_sparse_optimizer.step)) == 1.0


def test_the_learning_rate_follows_callbacks_in_the_same_epoch():
    """LearningRateScheduler sets lr = 0 from the second epoch: the head's
    rows stop moving in that epoch, not one later."""
    distiller, student = distiller_student()
    x, _, targets = problem()
    initial = np.array(distiller.head.kernel)
    kernels = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: kernels.append(
            np.array(distiller.head.kernel)
        )
    )
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 0.01 if epoch == 0 else 0.0
    )
    distiller.fit(
        x, targets, batch_size=16, epochs=3, verbose=0,
        callbacks=[schedule, record],
    )
    assert not np.array_equal(kernels[0], initial)
    np.testing.assert_array_equal(kernels[1], kernels[0])
    np.testing.assert_array_equal(kernels[2], kernels[0])


def test_the_distiller_holds_no_state_and_loads_weights_after_compile(tmp_path):
    distiller, _ = distiller_student()
    x, _, targets = problem()
    distiller.fit(x, targets, batch_size=16, epochs=1, verbose=0)
    assert not distiller._trainable_variables + distiller._non_trainable_variables
    path = os.path.join(tmp_path, "distiller.weights.h5")
    distiller.save_weights(path)
    fresh = keras_dis.Distiller(None, make_student(seed=7))
    with pytest.raises(ValueError, match="compile"):
        fresh.load_weights(path)
    fresh = keras_dis.Distiller(None, make_student(seed=7))
    fresh.compile(optimizer="adam", loss=keras_dis.DISLoss(k=3))
    fresh.load_weights(path)
    for a, b in zip(distiller.head.weights, fresh.head.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA step"
)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_an_xla_compiled_step_raises_after_the_batch(path):
    model, student = PATHS[path]()
    model.compile(
        optimizer="adam", loss=keras_dis.DISLoss(k=3), jit_compile=True
    )
    x, _, targets = problem()
    targets[0, 0] = 99
    assert_fit_raises(
        model, student, feed("tf_data", x[:16], targets[:16]), "label=99"
    )


def test_checks_pass_a_valid_batch_unchanged():
    x, labels, targets = problem()
    code, value, (checked_labels, tail, classes, logits) = (
        sampled_step.validated_teacher_targets(targets, NUM_CLASSES)
    )
    assert int(code) == 0
    np.testing.assert_array_equal(np.array(checked_labels), labels)
    np.testing.assert_array_equal(np.array(classes), targets[:, 2:6])
    np.testing.assert_array_equal(np.array(logits), targets[:, 6:])
    np.testing.assert_array_equal(np.array(tail), targets[:, 1])


@pytest.mark.parametrize("path", sorted(PATHS))
def test_targets_packed_for_more_classes_raise(path):
    model, _ = PATHS[path]()
    x = np.zeros((16, 8), "float32")
    rng = np.random.default_rng(0)
    targets = np.array(
        keras_dis.pack_teacher_targets(
            rng.integers(0, 12, 16), rng.normal(size=(16, 12)).astype("float32")
        )
    )
    with pytest.raises(ValueError, match="ranks 12 classes"):
        model.fit(x, targets, epochs=1, verbose=0)


SAMPLED_METHODS = [
    name
    for name, options in keras_dis.losses.METHODS.items()
    if options["proposal"] in sampled_step.SAMPLED_PROPOSALS
]


@pytest.mark.parametrize("method", SAMPLED_METHODS)
def test_every_sampled_estimator_trains_rows_and_checks_its_batch(method):
    """Each estimator runs the same step: a bad batch raises and trains
    nothing, and valid ones train the head by row-sparse updates."""
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.losses.get(method, k=3))
    x, _, targets = problem()
    bad_targets = targets.copy()
    bad_targets[2, 0] = NUM_CLASSES + 3
    assert_fit_raises(
        distiller, distiller.student, feed("numpy", x[:16], bad_targets[:16]),
        r"label=13",
    )
    head = distiller.student.get_layer("head")
    kernel = np.array(head.kernel)
    history = distiller.fit(x, targets, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert head.row_sparse_optimizer is not None
    assert not np.allclose(kernel, head.kernel)
