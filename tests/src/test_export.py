"""`keras_dis.export_student`: the student as a plain Keras model."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_dis
from keras_dis.src.head import SampledDistillationHead
from tests.src.test_robustness import cached_problem
from tests.src.test_robustness import train_once

NUM_CLASSES = 40


def perturb_head(head, seed):
    """Distinct kernel and bias values, so a transposed or missed copy shows."""
    rng = np.random.default_rng(seed)
    head.kernel.assign(rng.normal(size=tuple(head.kernel.shape)).astype("float32"))
    if head.use_bias:
        head.bias.assign(rng.normal(size=(head.num_classes,)).astype("float32"))


def heads_of(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, SampledDistillationHead)
    ]


def nested_functional_student(use_bias=True):
    """`Model(inp, Model(... head ...)(body(inp)))`, the head two levels down."""
    inputs = keras.Input((8,))
    body = keras.layers.Dense(32, activation="relu", name="body")
    inner_inputs = keras.Input((32,))
    inner_features = keras.layers.Dense(16, activation="tanh")(inner_inputs)
    head = SampledDistillationHead(NUM_CLASSES, use_bias=use_bias, seed=1)
    inner = keras.Model(inner_inputs, head(inner_features), name="inner")
    return keras.Model(inputs, inner(body(inputs)), name="student")


def sequential_in_functional_student():
    inputs = keras.Input((8,))
    classifier = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(16, activation="relu"),
            SampledDistillationHead(NUM_CLASSES, seed=2),
        ],
        name="classifier",
    )
    features = keras.layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, classifier(features))


def functional_in_sequential_student():
    """A Sequential student whose last layer is a functional sub-model, itself
    holding a Sequential with the head: three levels."""
    innermost = keras.Sequential(
        [keras.Input((16,)), SampledDistillationHead(NUM_CLASSES, seed=3)],
        name="innermost",
    )
    middle_inputs = keras.Input((32,))
    middle = keras.Model(
        middle_inputs,
        innermost(keras.layers.Dense(16)(middle_inputs)),
        name="middle",
    )
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), middle]
    )


def unbuilt_input_sequential_student():
    """A Sequential without `Input`, built by calling it."""
    student = keras.Sequential(
        [keras.layers.Dense(32, activation="relu"), SampledDistillationHead(NUM_CLASSES)]
    )
    student(np.zeros((1, 8), "float32"))
    return student


STUDENTS = {
    "nested_functional": nested_functional_student,
    "nested_functional_no_bias": lambda: nested_functional_student(use_bias=False),
    "sequential_in_functional": sequential_in_functional_student,
    "functional_in_sequential": functional_in_sequential_student,
    "sequential_without_input": unbuilt_input_sequential_student,
}


@pytest.mark.parametrize("build_student", STUDENTS.values(), ids=STUDENTS.keys())
def test_export_replaces_every_head_and_predicts_the_same(build_student, tmp_path):
    student = build_student()
    heads = heads_of(student)
    assert heads
    for seed, head in enumerate(heads):
        perturb_head(head, seed)
    exported = keras_dis.export_student(student)

    assert not heads_of(exported)
    dense_layers = [
        layer
        for layer in exported._flatten_layers(include_self=False, recursive=True)
        if layer.name in {head.name for head in heads}
    ]
    assert len(dense_layers) == len(heads)
    for head, dense in zip(heads, dense_layers):
        assert type(dense) is keras.layers.Dense
        assert tuple(dense.kernel.shape) == tuple(head.kernel.shape)[::-1]
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(dense.kernel),
            keras.ops.convert_to_numpy(head.kernel).T,
        )
        assert dense.use_bias == head.use_bias

    x = cached_problem(32)[0]
    expected = student.predict(x, verbose=0)
    assert expected.shape == (32, NUM_CLASSES)
    np.testing.assert_allclose(
        exported.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )

    model_path = os.path.join(tmp_path, "exported.keras")
    exported.save(model_path)
    restored = keras.saving.load_model(model_path)
    assert not heads_of(restored)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )


def test_export_shares_no_state_with_the_student():
    student = nested_functional_student()
    exported = keras_dis.export_student(student)
    x = cached_problem(8)[0]
    before = exported.predict(x, verbose=0)
    for weight in student.weights:
        weight.assign(np.zeros(tuple(weight.shape), weight.dtype))
    np.testing.assert_array_equal(exported.predict(x, verbose=0), before)
    assert {id(w) for w in exported.weights}.isdisjoint(id(w) for w in student.weights)


def test_shared_layers_stay_shared():
    inputs = keras.Input((8,))
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    head = SampledDistillationHead(NUM_CLASSES)
    student = keras.Model(inputs, head(shared(shared(inputs))))
    exported = keras_dis.export_student(student)
    assert len(exported.layers) == len(student.layers)
    x = cached_problem(8)[0]
    np.testing.assert_allclose(
        exported.predict(x, verbose=0), student.predict(x, verbose=0),
        rtol=1e-5, atol=1e-6,
    )


@keras.saving.register_keras_serializable(package="keras_dis_tests")
class HeadWrapper(keras.layers.Layer):
    """A custom layer holding a head: not a functional or Sequential model."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.head = SampledDistillationHead(num_classes)

    def call(self, inputs, training=None):
        return self.head(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def test_head_inside_a_custom_layer_is_an_error():
    inputs = keras.Input((8,))
    student = keras.Model(inputs, HeadWrapper(NUM_CLASSES)(inputs))
    with pytest.raises(ValueError, match="cannot be cloned layer by layer"):
        keras_dis.export_student(student)


def test_subclassed_student_is_an_error():
    class Student(keras.Model):
        def __init__(self):
            super().__init__()
            self.head = SampledDistillationHead(NUM_CLASSES)

        def call(self, inputs):
            return self.head(inputs)

    with pytest.raises(ValueError, match="`student` must be a functional"):
        keras_dis.export_student(Student())


def test_distiller_export_student_is_plain_keras(tmp_path):
    distiller = train_once(seed=7, epochs=1)
    exported = distiller.export_student()
    assert isinstance(exported.layers[-1], keras.layers.Dense)
    x = cached_problem(32)[0]
    expected = distiller.student.predict(x, verbose=0)
    np.testing.assert_allclose(exported.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    model_path = os.path.join(tmp_path, "exported.keras")
    exported.save(model_path)
    np.save(os.path.join(tmp_path, "x.npy"), x)
    # A process that cannot import keras_dis loads and runs it.
    script = (
        "import sys; sys.modules['keras_dis'] = None\n"
        "import numpy as np, keras\n"
        f"model = keras.saving.load_model({model_path!r})\n"
        f"x = np.load({os.path.join(tmp_path, 'x.npy')!r})\n"
        f"np.save({os.path.join(tmp_path, 'out.npy')!r}, model.predict(x, verbose=0))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ))
    np.testing.assert_allclose(
        np.load(os.path.join(tmp_path, "out.npy")), expected, rtol=1e-5, atol=1e-6
    )
