"""JAX: row updates as `.at[].set`, in place once XLA aliases the donated
training state (Keras's JAX trainer donates it), and row gathers without
out-of-range filling."""

import jax
import jax.numpy as jnp
import keras

# Keras's JAX trainer passes the optimizer's variables to the optimizer
# only; inside the loss their values are frozen at trace time.
READS_OPTIMIZER_VARIABLES_IN_STEP = False


def after_step_loss():
    """Keras's JAX trainer collects metrics before the loss (outside any
    stateless scope) and after it, in `compute_metrics`, inside one."""
    return keras.src.backend.in_stateless_scope()


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


def is_tracing():
    """Whether the code runs inside a traced JAX function (e.g. the jitted
    initialiser with which Keras creates a large sharded variable)."""
    from keras.src.utils import jax_utils

    return jax_utils.is_in_jax_tracing_scope()


def _mesh_sharding(variable):
    """The `NamedSharding` of `variable`'s `keras.distribution` layout, or
    None (a variable created outside any distribution)."""
    layout = getattr(variable, "_layout", None)
    if isinstance(layout, keras.distribution.TensorLayout):
        layout = layout.backend_layout
    return layout if isinstance(layout, jax.sharding.NamedSharding) else None


def row_shards(variable):
    """`(mesh, row_axis)` when `variable`'s rows are split over the mesh
    axis `row_axis` (a `keras.distribution` layout) and its other axes are
    whole; else None."""
    layout = _mesh_sharding(variable)
    if layout is None:
        return None
    spec = tuple(layout.spec)
    if not spec or spec[0] is None or any(axis is not None for axis in spec[1:]):
        return None
    return layout.mesh, spec[0]


def _batch_spec(mesh, row_axis):
    """The partition of a batch: over the distribution's batch axis."""
    distribution = keras.distribution.distribution()
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if batch_axis in mesh.axis_names and batch_axis != row_axis:
        return jax.sharding.PartitionSpec(batch_axis)
    return jax.sharding.PartitionSpec()


def _row_offset(row_axis, num_rows):
    """The first class of this device's rows."""
    return jax.lax.axis_index(row_axis) * num_rows


def sharded_subset_logits(shards, kernel, bias, features, classes):
    """Logits `(batch, n)` of `classes` when the kernel's rows are split
    over devices: each device computes the logits of the classes it holds
    from its own rows (zero for the others) and the partial logits are
    summed, `O(batch * n)` bytes; the gradient of `features` is likewise
    summed, `O(batch * d)`. Nothing of size `C` leaves a device.

    Args:
        shards: `(mesh, row_axis)` of `row_shards(kernel)`.
        kernel: `(C, d)` array, rows split over `row_axis`.
        bias: `(C,)` array split alike, or None.
        features: `(batch, d)` array.
        classes: int `(batch, n)` array.
    """
    mesh, row_axis = shards
    rows_spec = jax.sharding.PartitionSpec(row_axis)
    batch_spec = _batch_spec(mesh, row_axis)

    def local_logits(kernel, features, classes, *bias):
        num_rows = kernel.shape[0]
        index = classes - _row_offset(row_axis, num_rows)
        mine = (index >= 0) & (index < num_rows)
        rows = jnp.take(kernel, index, axis=0, mode="clip")
        logits = jnp.einsum("bd,bnd->bn", features, rows.astype(features.dtype))
        if bias:
            logits = logits + jnp.take(bias[0], index, mode="clip").astype(
                logits.dtype
            )
        return jax.lax.psum(jnp.where(mine, logits, 0), row_axis)

    extra = () if bias is None else (bias,)
    return jax.shard_map(
        local_logits,
        mesh=mesh,
        in_specs=(rows_spec, batch_spec, batch_spec) + (rows_spec,) * len(extra),
        out_specs=batch_spec,
    )(kernel, features, classes.astype("int32"), *extra)


def map_row_shards(function, shards, row_arrays, entries):
    """Runs `function` on every device with the rows it holds.

    Args:
        function: `function(row_offset, local_row_arrays, entries)` returns
            the new `local_row_arrays` (the same nesting and shapes).
        shards: `(mesh, row_axis)` of `row_shards`.
        row_arrays: nested lists of `(C, ...)` arrays split by rows like the
            kernel (Nones allowed).
        entries: list of arrays every device gets whole (the batch's
            entries, gathered over the batch axis: `O(batch * (n + d))`).

    Returns:
        The new `(C, ...)` arrays, nested as `row_arrays`, split as before.
    """
    mesh, row_axis = shards
    rows_spec = jax.sharding.PartitionSpec(row_axis)

    def local(row_arrays, entries):
        num_rows = jax.tree.leaves(row_arrays)[0].shape[0]
        return function(_row_offset(row_axis, num_rows), row_arrays, entries)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows_spec, jax.sharding.PartitionSpec()),
        out_specs=rows_spec,
    )(row_arrays, entries)


def write_rows(values, indices, rows):
    """`values` with `rows` written at `indices`; out-of-range indices
    (`>= len(values)`) are dropped."""
    return values.at[indices].set(rows.astype(values.dtype), mode="drop")


def rows_layout(parameter, shape):
    """The sharding of a `(C, ...)` array of `shape` whose rows live where
    `parameter`'s rows live (its first axis split the same way), on the
    same mesh; None when `parameter` is not on a mesh.

    An array of `parameter`'s rank or more, `(C, ...) + parameter.shape[1:]`
    (optimizer slots stacked on axis 1), also splits its trailing axes like
    `parameter`; the axes in between are whole.
    """
    sharding = _mesh_sharding(parameter)
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (
        len(parameter.shape) - len(sharding.spec)
    )
    trailing = spec[1:] if len(shape) >= len(spec) else ()
    middle = (None,) * (len(shape) - 1 - len(trailing))
    return jax.sharding.NamedSharding(
        sharding.mesh,
        jax.sharding.PartitionSpec(spec[0], *middle, *trailing),
    )


def compiled_train_step(model, x, y):
    """`model`'s training step compiled for the batch `(x, y)`, as `fit`
    compiles it: the state as laid out now, the batch laid out by the
    current distribution, the state's layout kept by the step."""
    from keras.src.backend.jax import trainer as jax_trainer
    from keras.src.distribution import distribution_lib

    data = (x, y)
    model._symbolic_build(data_batch=data)
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    out_shardings = None
    if distribution_lib.distribution() is not None:
        out_shardings = (None, model._get_state_sharding_spec())
    step = jax.jit(model.train_step, donate_argnums=0, out_shardings=out_shardings)
    return step.lower(state, jax_trainer._distribute_data(data)).compile()


# A step that raised would lose the training state (Keras's JAX trainer
# donates it to the step): the step records the error in the head instead,
# and the host raises it after the batch with the state back in place.
MAY_DEFER_INPUT_ERRORS = True


def raise_input_error(error_code, error_value, num_classes):
    """Nothing: on JAX the host raises recorded errors (see above).

    Returns:
        False: the step does not raise the error itself.
    """
    del error_code, error_value, num_classes
    return False


def can_read_variables(variable):
    """Whether `variable` holds a concrete value (not purged by Keras's
    JAX trainer during an epoch, not traced)."""
    value = variable._value
    return (
        value is not None
        and not isinstance(value, jax.core.Tracer)
        and not keras.src.backend.in_stateless_scope()
    )


def sync_training_state(model):
    """Puts the JAX trainer's state of the epoch back into the variables."""
    model.jax_state_sync()


def training_value(model, variable):
    """The value of a non-trainable `variable` in the state that the JAX
    trainer carries from step to step (no copy into the variables, which
    Keras avoids during an epoch)."""
    state = getattr(model, "_jax_state", None)
    if state and not model._jax_state_synced:
        for reference, value in zip(
            model.non_trainable_variables, state["non_trainable_variables"]
        ):
            if reference is variable:
                return value
    return variable.value
