"""Backend-specific pieces, one module per backend with the same interface.

Keras gives no portable in-place row update of a variable: `ops.scatter_update`
returns a new tensor, which on TensorFlow copies the whole `C x d` kernel.
Each backend module implements `scatter_rows(variable, indices, rows)` and
`raise_input_error(error_code, error_value, num_classes)` (raise the
`ValueError` of a failed input check from inside a compiled step).
A backend module may also implement `take_rows(values, indices)`,
`segment_sum(data, segment_ids, num_segments)`,
`uniform(shape, seed_generator)`, `randint(shape, maxval, seed_generator)`
and `stable_value(variable)` where Keras's own op is slow or unsafe on it;
otherwise those are Keras's. The JAX module also implements the head
split over devices by `keras.distribution` (the only backend where Keras
3.15 runs it): `row_shards`, `rows_layout`, `sharded_subset_logits`,
`map_row_shards`, `write_rows` and `compiled_train_step`; elsewhere a head
is never split. A backend module may set `PAIRWISE_RANK_MAX_SIZE`, the
largest set whose ranks are cheaper from pairwise comparisons than from a
sort (0: always sort), `READS_OPTIMIZER_VARIABLES_IN_STEP` and
`MAY_DEFER_INPUT_ERRORS`.
"""

import contextlib
import sys

import keras
from keras import ops


PAIRWISE_RANK_MAX_SIZE = 0
# Whether a compiled training step reads the optimizer's variables (its
# learning rate) live. JAX's compiled step sees only the state passed in.
READS_OPTIMIZER_VARIABLES_IN_STEP = True
# Whether a step may record an input error that it did not raise (an
# XLA-compiled TensorFlow step, any JAX step), for the host to raise.
MAY_DEFER_INPUT_ERRORS = False


def take_rows(values, indices):
    """`values[indices]` along the first axis; indices must be in range."""
    return ops.take(values, indices, axis=0)

_BACKEND = keras.backend.backend()


def stable_value(variable):
    """`variable`'s value now, safe to differentiate through when the step
    later writes the variable in place (a row update)."""
    return variable.value


def rows_layout(parameter, shape):
    """The layout of a `(C, ...)` array of `shape` that keeps its rows on
    the devices that hold `parameter`'s rows; None: the default layout.

    Only JAX runs `keras.distribution` in Keras 3.15: elsewhere a variable
    is never split, so this is None.
    """
    del parameter, shape
    return None


def compiled_train_step(model, x, y):
    """The XLA-compiled training step of `model` (JAX only)."""
    del model, x, y
    raise ValueError(
        "Compiling the training step for inspection needs the JAX backend: "
        "in Keras 3.15 keras.distribution runs on JAX only. "
        f"Received: KERAS_BACKEND={_BACKEND!r}"
    )


def row_shards(variable):
    """`(mesh, row_axis)` when `variable`'s rows are split over devices;
    None on one device (and on backends without `keras.distribution`)."""
    del variable
    return None


def is_tracing():
    """Whether the code runs inside a traced (compiled) function."""
    return False


def can_read_variables(variable):
    """Whether the host can read `variable`'s value now."""
    del variable
    return True


def sync_training_state(model):
    """Makes the model's variables hold the latest training state."""
    del model


def select(condition, values, other):
    """`values` where the scalar `condition` holds, else `other`."""
    return ops.where(condition, values, other)


def training_value(model, variable):
    """The value of `variable` in `model`'s training state."""
    del model
    return variable.value


@contextlib.contextmanager
def tensorflow_probability_numpy():
    """Yields tensorflow-probability's NumPy substrate, without TensorFlow.

    The substrate needs only NumPy, but its modules (loaded lazily, on first
    use) try to import TensorFlow to copy its docstrings, and go on without
    it when that fails: 5 s of start-up on JAX and PyTorch for nothing.
    While TensorFlow is not imported and Keras runs on another backend,
    imports of `tensorflow` inside this block fail, so use the distributions
    inside it (their modules load then). TensorFlow imports normally after.
    """
    block = _BACKEND != "tensorflow" and "tensorflow" not in sys.modules
    if block:
        sys.modules["tensorflow"] = None
    try:
        from tensorflow_probability.substrates import numpy as tfp

        yield tfp
    finally:
        if block and sys.modules.get("tensorflow", False) is None:
            del sys.modules["tensorflow"]


def after_step_loss():
    """Whether Keras asks for the model's metrics after the loss of the
    step being traced (JAX also asks before it, outside a stateless scope).
    """
    return True


def uniform(shape, seed_generator):
    """Uniform float32 numbers in `[0, 1)`."""
    return keras.random.uniform(shape, seed=seed_generator)


def segment_sum(data, segment_ids, num_segments):
    """Sums of the rows of `data` per segment id, `(num_segments, ...)`."""
    return ops.segment_sum(data, segment_ids, num_segments=num_segments)


def randint(shape, maxval, seed_generator):
    """Uniform int32 numbers in `[0, maxval)`."""
    return keras.random.randint(
        shape, 0, maxval, seed=seed_generator, dtype="int32"
    )


if _BACKEND == "tensorflow":
    from keras_dis.src.backend.tensorflow import (  # noqa: F811
        PAIRWISE_RANK_MAX_SIZE,
    )
    from keras_dis.src.backend.tensorflow import (  # noqa: F811
        MAY_DEFER_INPUT_ERRORS,
    )
    from keras_dis.src.backend.tensorflow import can_read_variables  # noqa: F811
    from keras_dis.src.backend.tensorflow import raise_input_error
    from keras_dis.src.backend.tensorflow import randint  # noqa: F811
    from keras_dis.src.backend.tensorflow import scatter_rows
    from keras_dis.src.backend.tensorflow import take_rows  # noqa: F811
    from keras_dis.src.backend.tensorflow import uniform  # noqa: F811
elif _BACKEND == "jax":
    from keras_dis.src.backend.jax import (  # noqa: F811
        READS_OPTIMIZER_VARIABLES_IN_STEP,
    )
    from keras_dis.src.backend.jax import (  # noqa: F811
        MAY_DEFER_INPUT_ERRORS,
    )
    from keras_dis.src.backend.jax import after_step_loss  # noqa: F811
    from keras_dis.src.backend.jax import can_read_variables  # noqa: F811
    from keras_dis.src.backend.jax import compiled_train_step  # noqa: F811
    from keras_dis.src.backend.jax import is_tracing  # noqa: F811
    from keras_dis.src.backend.jax import map_row_shards
    from keras_dis.src.backend.jax import row_shards  # noqa: F811
    from keras_dis.src.backend.jax import sharded_subset_logits
    from keras_dis.src.backend.jax import write_rows
    from keras_dis.src.backend.jax import sync_training_state  # noqa: F811
    from keras_dis.src.backend.jax import training_value  # noqa: F811
    from keras_dis.src.backend.jax import raise_input_error
    from keras_dis.src.backend.jax import rows_layout  # noqa: F811
    from keras_dis.src.backend.jax import scatter_rows
    from keras_dis.src.backend.jax import take_rows  # noqa: F811
elif _BACKEND == "torch":
    from keras_dis.src.backend.torch import raise_input_error
    from keras_dis.src.backend.torch import select  # noqa: F811
    from keras_dis.src.backend.torch import scatter_rows
    from keras_dis.src.backend.torch import segment_sum  # noqa: F811
    from keras_dis.src.backend.torch import stable_value  # noqa: F811
else:
    raise ValueError(
        f"keras_dis supports the tensorflow, jax and torch backends. "
        f"Received: KERAS_BACKEND={_BACKEND!r}"
    )

__all__ = [
    "after_step_loss",
    "can_read_variables",
    "compiled_train_step",
    "is_tracing",
    "sync_training_state",
    "training_value",
    "MAY_DEFER_INPUT_ERRORS",
    "PAIRWISE_RANK_MAX_SIZE",
    "READS_OPTIMIZER_VARIABLES_IN_STEP",
    "raise_input_error",
    "randint",
    "rows_layout",
    "row_shards",
    "scatter_rows",
    "select",
    "stable_value",
    "take_rows",
    "uniform",
]
