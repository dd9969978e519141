"""JAX: row updates as `.at[].set`, in place once XLA aliases the donated
training state (Keras's JAX trainer donates it), and row gathers without
out-of-range filling."""

import jax.numpy as jnp
import keras


def scatter_rows(variable, indices, rows):
    """Writes `rows` into `variable[indices]`.

    Args:
        variable: a `keras.Variable` of shape `(C, ...)`.
        indices: int array `(n,)`; repeated indices must carry equal rows.
        rows: array `(n, ...)`.
    """
    value = variable.value
    variable.assign(value.at[indices].set(rows.astype(value.dtype)))


def take_rows(values, indices):
    """`values[indices]` along the first axis; indices must be in range.

    `jnp.take`'s default mode fills out-of-range rows with NaN, a select
    over every gathered element: 2 ms a step for 5376 rows of 512 on CPU.
    """
    values = keras.ops.convert_to_tensor(values)  # a keras.Variable's value
    return jnp.take(values, indices, axis=0, mode="clip")
