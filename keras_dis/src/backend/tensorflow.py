"""TensorFlow: in-place row scatters and Philox random numbers."""

import keras
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from keras_dis.src.backend.common import raise_if_error

# Ranks within a set of `R` ids, `(256, R)`, under XLA on CPU: pairwise
# comparisons 0.6 ms against 1.8 ms for a sort at `R = 100`, 2.8 against
# 4.0 ms at 200, even at 400 (JAX's sort is faster than both).
PAIRWISE_RANK_MAX_SIZE = 256
# An XLA-compiled step cannot raise: it records the error in the head.
MAY_DEFER_INPUT_ERRORS = True


def scatter_rows(variable, indices, rows):
    """Writes `rows` into `variable[indices]` in place.

    Args:
        variable: a `keras.Variable` of shape `(C, ...)`.
        indices: int tensor `(n,)`; repeated indices must carry equal rows.
        rows: tensor `(n, ...)`.
    """
    variable.value.scatter_update(
        tf.IndexedSlices(tf.cast(rows, variable.dtype), indices)
    )


def take_rows(values, indices):
    """`values[indices]` along the first axis, reading only those rows of a
    variable (a resource gather). `ops.take` reads the whole variable first,
    and a later in-place row write to it then copies the whole variable
    (copy-on-write): 0.2 s a step at `C = 10^6` without XLA."""
    if isinstance(values, keras.Variable):
        values = values.value
    return tf.gather(values, indices)


def _stateless_seed(seed_generator):
    # The stateless ops take an int32 seed; the generator's state is int64.
    return tf.cast(
        tf.math.floormod(seed_generator.next(), tf.int32.max - 1), tf.int32
    )


def uniform(shape, seed_generator):
    """Uniform float32 numbers in `[0, 1)`, like `keras.random.uniform`.

    Names the Philox algorithm: under XLA on CPU the default choice
    (`auto_select`) is about 10x slower (1.1 ms for 256 x 20 numbers).
    """
    return tf.random.stateless_uniform(
        shape, seed=_stateless_seed(seed_generator), alg="philox"
    )


def randint(shape, maxval, seed_generator):
    """Uniform int32 numbers in `[0, maxval)`, like `keras.random.randint`."""
    return tf.random.stateless_uniform(
        shape,
        seed=_stateless_seed(seed_generator),
        minval=0,
        maxval=maxval,
        dtype=tf.int32,
        alg="philox",
    )


def raise_input_error(error_code, error_value, num_classes):
    """Raises the input error of a step from inside a `tf.function`.

    A `tf.py_function` raises the `ValueError` (as TensorFlow's
    `InvalidArgumentError`, message kept). XLA compiles no Python, so in an
    XLA-compiled step nothing is raised here: the step still trains on
    nothing and records the error in the head (`input_error_code`), which
    `keras_dis.Distiller` raises after the batch.

    Returns:
        Whether the step raises the error itself (known when tracing).
    """
    graph = tf_ops.get_default_graph()
    if control_flow_util.GraphOrParentsInXlaContext(graph):
        return False
    if tf.executing_eagerly():
        raise_if_error(error_code, error_value, num_classes)
        return True
    tf.py_function(
        lambda code, value: raise_if_error(code, value, num_classes),
        [error_code, error_value],
        [],
    )
    return True


def can_read_variables(variable):
    """Whether `variable` can be read on the host now (not while tracing)."""
    del variable
    return tf.executing_eagerly()
