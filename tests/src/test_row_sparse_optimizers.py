import keras
import numpy as np
import pytest
from keras import ops

import keras_dis
from keras_dis.src import row_sparse_optimizers
from tests.src.test_distiller import make_teacher
from tests.src.test_losses import make_student
from tests.src.test_losses import synthetic_problem

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01, beta_1=0.9, beta_2=0.99),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "rmsprop_momentum_centered": lambda: keras.optimizers.RMSprop(
        0.01, momentum=0.9, centered=True
    ),
}


def test_group_and_sum_duplicate_rows():
    indices = np.array([4, 1, 4, 7, 1, 4], "int32")
    values = np.arange(12, dtype="float32").reshape(6, 2)
    scratch = keras.Variable(np.full((9,), 5, "int32"), trainable=False)  # stale
    leaders = ops.convert_to_numpy(
        row_sparse_optimizers.group_leaders(ops.convert_to_tensor(indices), scratch)
    )
    for index in np.unique(indices):
        group = np.flatnonzero(indices == index)
        assert len(set(leaders[group])) == 1 and leaders[group[0]] in group
    summed = ops.convert_to_numpy(row_sparse_optimizers.sum_groups(values, leaders))
    for index, row in zip(indices, summed):
        np.testing.assert_allclose(row, values[indices == index].sum(axis=0))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_row_updates_follow_the_keras_optimizer(name):
    """Three steps on rows that are all touched equal Keras's own update."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 3)).astype("float32")
    gradients = [rng.normal(size=(5, 3)).astype("float32") for _ in range(3)]
    optimizer = OPTIMIZERS[name]()
    variable = keras.Variable(rows)
    optimizer.build([variable])
    slots = {
        slot: ops.zeros(rows.shape)
        for slot in row_sparse_optimizers._slot_names(optimizer)
    }
    sparse_rows = ops.convert_to_tensor(rows)
    for step, gradient in enumerate(gradients, start=1):
        optimizer.apply([ops.convert_to_tensor(gradient)], [variable])
        sparse_rows, slots = row_sparse_optimizers.update_rows(
            optimizer, sparse_rows, ops.convert_to_tensor(gradient), slots,
            ops.convert_to_tensor(float(step)), float(optimizer.learning_rate),
        )
    np.testing.assert_allclose(
        ops.convert_to_numpy(sparse_rows),
        ops.convert_to_numpy(variable),
        rtol=1e-5,
        atol=1e-6,
    )


def distill(row_sparse_updates, optimizer, num_examples=256, batch_size=64, k=5,
            proposal="dis"):
    x, labels, teacher_logits = synthetic_problem(num_examples)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=20)
    )
    keras.utils.set_random_seed(0)
    distiller = keras_dis.Distiller(
        make_teacher(x, teacher_logits), make_student(),
        row_sparse_updates=row_sparse_updates,
    )
    distiller.compile(optimizer=optimizer, loss=keras_dis.DISLoss(k=k, proposal=proposal))
    distiller.fit(x, targets, epochs=1, batch_size=batch_size, shuffle=False, verbose=0)
    return distiller


def test_row_sparse_sgd_equals_dense_sgd():
    sparse = distill(True, keras.optimizers.SGD(0.1))
    dense = distill(False, keras.optimizers.SGD(0.1))
    assert not sparse.head.kernel.trainable and dense.head.kernel.trainable
    for sparse_weight, dense_weight in zip(
        sparse.student.get_weights(), dense.student.get_weights()
    ):
        np.testing.assert_allclose(sparse_weight, dense_weight, rtol=1e-5, atol=1e-6)
    assert sparse.head.kernel.shape == (40, 32)
    # The head did move.
    initial = distill(True, keras.optimizers.SGD(0.0))
    assert np.abs(
        ops.convert_to_numpy(sparse.head.kernel)
        - ops.convert_to_numpy(initial.head.kernel)
    ).max() > 1e-3


@pytest.mark.parametrize(
    "row_sparse_updates, optimizer",
    # Dense updates with SGD: on TensorFlow, Keras's Adam squares the
    # gradient of gathered rows per entry (`tf.IndexedSlices`), not per row.
    [(True, "adam"), (False, "sgd")],
)
def test_every_class_path_takes_the_same_steps_as_gathered_rows(
    monkeypatch, row_sparse_updates, optimizer
):
    """40 classes, subsets of 6: the step computes all logits and a dense
    head gradient; forcing it to gather rows trains the same weights."""
    from keras_dis.src import sampled_softmax

    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    assert sampled_softmax.computes_every_class(40, (64, 6))
    every_class = distill(row_sparse_updates, optimizers[optimizer](0.05))
    monkeypatch.setattr(sampled_softmax, "EVERY_CLASS_MAX_CLASSES_PER_ENTRY", 0)
    assert not sampled_softmax.computes_every_class(40, (64, 6))
    gathered = distill(row_sparse_updates, optimizers[optimizer](0.05))
    for every_class_weight, gathered_weight in zip(
        every_class.student.get_weights(), gathered.student.get_weights()
    ):
        np.testing.assert_allclose(
            every_class_weight, gathered_weight, rtol=1e-4, atol=1e-5
        )


def test_lazy_adam_leaves_untouched_rows_and_state_alone():
    # 16 samples, one step, 1 uniform draw each: at most 32 of 40 classes.
    before = distill(True, keras.optimizers.Adam(0.0), num_examples=16,
                     batch_size=16, k=1, proposal="uniform")
    after = distill(True, keras.optimizers.Adam(0.01), num_examples=16,
                    batch_size=16, k=1, proposal="uniform")
    kernel_before = ops.convert_to_numpy(before.head.kernel)
    kernel_after = ops.convert_to_numpy(after.head.kernel)
    moved = np.abs(kernel_after - kernel_before).max(axis=-1) > 0
    slots = ops.convert_to_numpy(
        after.head.row_sparse_slot("kernel_momentum_velocity", None)
    )
    assert slots.shape == (40, 2, 32)
    has_state = np.abs(slots).max(axis=(1, 2)) > 0
    assert 0 < moved.sum() < 40
    np.testing.assert_array_equal(moved, has_state)
    # A moved row moved by about the learning rate (Adam's first step).
    np.testing.assert_allclose(
        np.abs(kernel_after - kernel_before)[moved].max(), 0.01, rtol=1e-3
    )
    assert float(ops.convert_to_numpy(after.head.row_sparse_slot("row_sparse_step", None))) == 1.0
    # The distiller holds none of the head's state.
    assert not after._trainable_variables + after._non_trainable_variables


@pytest.mark.parametrize(
    "optimizer, argument",
    [
        (keras.optimizers.AdamW(0.01), "weight_decay"),
        (keras.optimizers.Adam(0.01, amsgrad=True), "amsgrad"),
        (keras.optimizers.SGD(0.01, clipnorm=1.0), "clipnorm"),
        (keras.optimizers.Adagrad(0.01), "optimizer"),
    ],
)
def test_unsupported_optimizers(optimizer, argument):
    x, labels, teacher_logits = synthetic_problem(16)
    distiller = keras_dis.Distiller(make_teacher(x, teacher_logits), make_student())
    with pytest.raises(ValueError, match=argument):
        distiller.compile(optimizer=optimizer)
    # Dense training of the head accepts any optimizer.
    dense = keras_dis.Distiller(
        make_teacher(x, teacher_logits), make_student(), row_sparse_updates=False
    )
    dense.compile(optimizer=optimizer)


def test_full_softmax_methods_train_the_head_densely():
    distiller = distill(True, keras.optimizers.Adam(0.01), proposal="pdbs")
    assert distiller.head.kernel.trainable
    assert distiller.head.row_sparse_optimizer is None


NUM_STEP_CLASSES = 1009  # appears in no other shape of the step


def trained_step_problem(mode="distiller"):
    """A model after one epoch, and one batch: a `"distiller"` with row-sparse
    updates, a plain student whose head has its own optimizer
    (`"own_optimizer"`), or a distiller training the head densely
    (`"dense"`)."""
    features_dim, batch_size = 24, 32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 8)).astype("float32")
    teacher_logits = rng.normal(size=(batch_size, NUM_STEP_CLASSES)).astype(
        "float32"
    )
    labels = teacher_logits.argmax(-1)
    targets = np.asarray(
        keras_dis.pack_teacher_targets(labels, teacher_logits, top_r=16)
    )
    inputs = keras.Input((8,))
    features = keras.layers.Dense(features_dim)(inputs)
    head = keras_dis.SampledDistillationHead(
        NUM_STEP_CLASSES,
        optimizer="adam" if mode == "own_optimizer" else None,
    )
    model = keras.Model(inputs, head(features))
    if mode != "own_optimizer":
        model = keras_dis.Distiller(
            None, model, row_sparse_updates=mode == "distiller"
        )
    model.compile(optimizer="adam", loss=keras_dis.DISLoss(k=10))
    model.fit(x, targets, batch_size=batch_size, epochs=1, verbose=0)
    return model, x, targets


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="inspects the JAX program"
)
@pytest.mark.parametrize("mode", ["distiller", "own_optimizer", "dense"])
def test_jax_step_has_no_dense_class_tensor(mode):
    """No (C, d) gradient or update and no (B, C) tensor in the train step
    (the dense baseline, for contrast, has them)."""
    import jax

    model, x, targets = trained_step_problem(mode)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    jaxpr = jax.make_jaxpr(model.train_step)(state, (x, targets))

    def equations(closed):
        for equation in closed.eqns:
            yield equation
            for param in equation.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from equations(inner)

    full_size = []
    for equation in equations(jaxpr.jaxpr):
        for var in equation.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if NUM_STEP_CLASSES in shape and equation.primitive.name not in (
                "scatter", "pjit", "jit",
            ):
                full_size.append((equation.primitive.name, shape))
    # Only the in-place row writes (scatter) produce class-sized arrays.
    assert (full_size == []) == (mode != "dense"), full_size


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="inspects the XLA program"
)
def test_tensorflow_xla_step_has_no_dense_class_tensor():
    """The XLA-optimised HLO of the step writes class-sized arrays only in
    the row scatters; the dense baseline computes whole `C x d` updates."""
    import re

    import tensorflow as tf

    def class_sized_instructions(mode):
        model, x, targets = trained_step_problem(mode)
        step = tf.function(model.train_step, jit_compile=True)
        hlo = step.experimental_get_compiler_ir(
            (tf.constant(x), tf.constant(targets))
        )(stage="optimized_hlo")
        found = []
        for line in hlo.splitlines():
            match = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([\w-]+)\(", line)
            if not match:
                continue
            name, shape, opcode = match.groups()
            structural = opcode in ("parameter", "tuple", "get-tuple-element", "bitcast")
            row_write = opcode == "scatter" or (
                opcode == "fusion" and "scatter" in name
            )
            if re.search(rf"\b{NUM_STEP_CLASSES}\b", shape) and not (
                structural or row_write
            ):
                found.append((name, opcode, shape))
        return found

    assert class_sized_instructions("distiller") == []
    assert class_sized_instructions("own_optimizer") == []
    assert len(class_sized_instructions("dense")) > 0


def test_keras_optimizer_holds_no_class_sized_state():
    """The compiled optimizer neither sees nor keeps state for the head."""
    distiller = distill(True, keras.optimizers.Adam(0.01))
    head = distiller.head
    assert not any(
        variable is head.kernel or variable is head.bias
        for variable in distiller.trainable_variables
    )
    class_sized = [
        variable.path
        for variable in distiller.optimizer.variables
        if 40 in tuple(variable.shape)
    ]
    assert class_sized == []
    # The dense baseline, for contrast, keeps Adam moments of the kernel.
    dense = distill(False, keras.optimizers.Adam(0.01))
    assert any(40 in tuple(v.shape) for v in dense.optimizer.variables)


@pytest.mark.parametrize(
    "num_classes, batch_size",
    [
        (6, 2),  # every row at once, the kernel gradient by a matmul
        (100, 20),  # every row at once, from per-entry gradients
        (40, 2),  # each entry's row
    ],
)
def test_lazy_adam_matches_numpy_with_fewer_or_more_classes_than_entries(
    num_classes, batch_size
):
    """Subsets of 5 entries: with at most as many classes as entries every
    row is updated at once (masked), else each entry's row; each is the
    same lazy Adam step."""
    from keras_dis.src.head import SampledDistillationHead
    from keras_dis.src.sampled_softmax import computes_every_class

    rng = np.random.default_rng(0)
    head = SampledDistillationHead(num_classes)
    head.build((None, 3))
    head.enable_row_sparse_updates(keras.optimizers.Adam(0.1))
    classes = rng.integers(0, min(num_classes, 12), (batch_size, 5)).astype("int32")
    classes[0, :2] = classes[0, 2]  # a repeat within a sample
    logit_gradients = rng.normal(size=(batch_size, 5)).astype("float32")
    features = rng.normal(size=(batch_size, 3)).astype("float32")
    assert computes_every_class(num_classes, classes.shape) == (num_classes == 6)
    kernel = np.array(head.kernel)
    bias = np.array(head.bias)
    tensors = [ops.convert_to_tensor(a) for a in (classes, logit_gradients, features)]
    rows = head.gather_rows(tensors[0])
    head.row_sparse_optimizer.apply(*tensors, rows)
    kernel_gradient = np.zeros_like(kernel)
    bias_gradient = np.zeros_like(bias)
    np.add.at(
        kernel_gradient, classes.ravel(),
        (logit_gradients[:, :, None] * features[:, None, :]).reshape(-1, 3),
    )
    np.add.at(bias_gradient, classes.ravel(), logit_gradients.ravel())
    touched = np.isin(np.arange(num_classes), classes)
    for value, gradient, variable in (
        (kernel, kernel_gradient, head.kernel),
        (bias, bias_gradient, head.bias),
    ):
        m = 0.1 * gradient
        v = 0.001 * gradient**2
        alpha = 0.1 * np.sqrt(1 - 0.999) / (1 - 0.9)
        expected = value - alpha * m / (np.sqrt(v) + 1e-7)
        expected[~touched] = value[~touched]
        np.testing.assert_allclose(
            np.array(variable), expected, rtol=1e-5, atol=1e-6
        )
