"""TensorFlow: row updates as in-place resource scatters."""

import tensorflow as tf


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
