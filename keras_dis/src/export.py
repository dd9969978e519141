"""`export_student`: a trained student as a plain Keras model."""

import keras
import numpy as np
from keras import ops

from keras_dis.src.head import SampledDistillationHead


def _is_functional_or_sequential(model):
    # `keras.Sequential` is a `Functional` subclass in some Keras releases
    # and not in others; a subclassed model has no graph to clone.
    if isinstance(model, keras.Sequential):
        return True
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Functional)


def _heads_in(model):
    """Names of the heads in `model`, at any depth."""
    return [
        layer.name
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, SampledDistillationHead)
    ]


def _dense_weights(head):
    """The weights of the `Dense` equivalent of `head`: `[kernel.T, bias]`."""
    weights = [np.transpose(ops.convert_to_numpy(head.kernel))]
    if head.use_bias:
        weights.append(ops.convert_to_numpy(head.bias))
    return weights


def export_student(student):
    """A copy of `student` whose `SampledDistillationHead`s are `Dense` layers.

    The copy predicts exactly what the student predicts (full logits), and
    needs no keras_dis to be saved, loaded or served: each
    `keras_dis.SampledDistillationHead` becomes a plain
    `keras.layers.Dense(num_classes)` of the same name and dtype policy
    with `kernel = head.kernel.T` (the head's kernel is class-major,
    `(num_classes, features_dim)`; a `Dense` kernel is
    `(features_dim, num_classes)`) and the same bias. The head's DIS state
    (`rank_proposal`, `right_scale`, the sampler's seed, a row-sparse
    optimizer's slots) is training state and is left out.

    Functional and `Sequential` models nested in `student`, at any depth,
    are cloned too, so a head inside a sub-model is replaced as well. Every
    other layer is cloned from its config and gets the student's weights.

    Args:
        student: a functional or `Sequential` `keras.Model` (a
            `keras_dis.Distiller`'s `student`), containing
            `SampledDistillationHead` layers at any depth.

    Returns:
        A new `keras.Model` of the same structure, sharing no state with
        `student` and containing no `SampledDistillationHead`.

    Raises:
        ValueError: if `student` is not a functional or `Sequential`
            model, or if a head sits inside a layer that cannot be cloned
            layer by layer (a subclassed model).

    Example:

    >>> features = keras.Input((4,))
    >>> body = keras.Sequential(
    ...     [keras.layers.Dense(8), keras_dis.SampledDistillationHead(10)])
    >>> student = keras.Model(features, body(features))
    >>> exported = export_student(student)
    >>> [layer.__class__.__name__ for layer in exported.layers[-1].layers]
    ['Dense', 'Dense']
    >>> x = np.ones((2, 4), "float32")
    >>> np.allclose(exported.predict(x, verbose=0),
    ...             student.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    True

    Then, with a trained `keras_dis.Distiller`:

    ```python
    deployable = keras_dis.export_student(distiller.student)
    deployable.save("student.keras")  # loads with plain Keras
    ```
    """
    if not _is_functional_or_sequential(student):
        raise ValueError(
            "`student` must be a functional or Sequential keras.Model. "
            f"Received: student={student!r} of type "
            f"{type(student).__name__}"
        )
    # Source and clone of every layer that clone_model does not clone
    # recursively (not a functional or Sequential model), in order.
    clones = []

    def clone_layer(layer):
        if isinstance(layer, SampledDistillationHead):
            clone = keras.layers.Dense(
                layer.num_classes,
                use_bias=layer.use_bias,
                name=layer.name,
                dtype=layer.dtype_policy,
                trainable=layer.trainable,
            )
        else:
            clone = layer.__class__.from_config(layer.get_config())
        clones.append((layer, clone))
        return clone

    exported = keras.models.clone_model(
        student, clone_function=clone_layer, recursive=True
    )
    left = _heads_in(exported)
    if left:
        raise ValueError(
            "`student` has a SampledDistillationHead inside a layer that "
            "cannot be cloned layer by layer (only functional and "
            "Sequential sub-models are): export or rebuild that layer "
            f"first. Received: student={student.name!r} with heads {left}"
        )
    if student.built and not exported.built:
        # A Sequential student built without an `Input`.
        exported.build(student.input_shape)
    for source, clone in clones:
        if isinstance(source, SampledDistillationHead):
            clone.set_weights(_dense_weights(source))
        else:
            clone.set_weights(source.get_weights())
    return exported
