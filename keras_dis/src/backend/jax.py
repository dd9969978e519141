"""JAX: row updates as `.at[].set`, in place once XLA aliases the donated
training state (Keras's JAX trainer donates it)."""


def scatter_rows(variable, indices, rows):
    """Writes `rows` into `variable[indices]`.

    Args:
        variable: a `keras.Variable` of shape `(C, ...)`.
        indices: int array `(n,)`; repeated indices must carry equal rows.
        rows: array `(n, ...)`.
    """
    value = variable.value
    variable.assign(value.at[indices].set(rows.astype(value.dtype)))
