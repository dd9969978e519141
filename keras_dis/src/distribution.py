"""The head split over classes, with `keras.distribution` (JAX).

A head over `C` classes trained with Adam holds `12 * C * d` bytes (the
kernel and its two row-sparse moments): 6.1 GB at `C = 10^6`, `d = 512`.
Keras's distribution API splits it over devices with the usual code, a
`keras.distribution.ModelParallel` whose `LayoutMap` splits the head's
kernel over classes (`head_layout_map` builds that map):

- the head's row-sparse optimizer state (`(C, ...)` arrays) follows the
  kernel's split by itself, with no entry in the layout map;
- in the compiled step every device draws the same classes; each computes
  the logits of the classes it holds from its own rows (zero for the
  others) and the partial logits are summed across devices; the gradient
  of the features is summed alike; every device then receives the batch's
  class ids, logit gradients and features and updates the rows it holds,
  with their optimizer state, in place. The collectives are `O(B * (k +
  d))` bytes, never `O(C)` (`step_collectives` lists them);
- the estimator is the one of a single device, so the losses and weights
  match a one-device run to float tolerance.

`keras.distribution.DataParallel` (every device holds the whole head) works
too. In Keras 3.15 the distribution API runs on JAX only.
"""

import math
import re

import keras

from keras_dis.src import backend

# XLA's collective operations (and the end of their asynchronous forms,
# whose result is the collective's).
COLLECTIVE_OPS = (
    "all-gather",
    "all-reduce",
    "all-to-all",
    "collective-broadcast",
    "collective-permute",
    "reduce-scatter",
)
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(.*?)\s+("
    + "|".join(COLLECTIVE_OPS)
    + r")(?:-done)?\("
)
_ARRAY_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def head_layout_map(
    device_mesh, model_dim_name="model", head_name="sampled_distillation_head"
):
    """A `LayoutMap` that splits every head's kernel and bias over classes.

    The same entries a user would write by hand: the `(C, d)` kernel of
    every `SampledDistillationHead` (layers named `head_name`, `head_name_1`,
    ...) split over `model_dim_name` by rows, its `(C,)` bias likewise. Add
    entries for other layers to the returned map as usual.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_dim_name: the mesh axis to split the classes over.
        head_name: the name (or name prefix) of the heads to split.

    Returns:
        A `keras.distribution.LayoutMap` for
        `keras.distribution.ModelParallel(layout_map=...)`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
    layout_map = keras_dis.distribution.head_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    # Build, compile and fit the student or Distiller as on one device.
    ```
    """
    if keras.distribution is None:
        raise ValueError(
            "keras.distribution is not available on this backend (in Keras "
            "3.15 it runs on JAX). Received: "
            f"KERAS_BACKEND={keras.backend.backend()!r}"
        )
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a keras.distribution.DeviceMesh. "
            f"Received: device_mesh={device_mesh!r}"
        )
    if model_dim_name not in device_mesh.axis_names:
        raise ValueError(
            f"`model_dim_name` must be an axis of the device mesh, one of "
            f"{list(device_mesh.axis_names)}. "
            f"Received: model_dim_name={model_dim_name!r}"
        )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    head_path = f".*{re.escape(head_name)}(_\\d+)?/"
    layout_map[head_path + "kernel"] = (model_dim_name, None)
    layout_map[head_path + "bias"] = (model_dim_name,)
    return layout_map


def compiled_train_step(model, x, y=None):
    """The XLA-compiled training step of a compiled `model` for one batch.

    The program `fit` runs on `(x, y)` under the current distribution, with
    the model's state laid out as it is now (the step is compiled, not
    run: no weight changes). Read its collectives with `step_collectives`,
    its memory per device with `.memory_analysis()`, its text with
    `.as_text()`.

    Args:
        model: a compiled `keras.Model` (a `keras_dis.Distiller` or a
            student compiled with a `keras_dis.DISLoss`).
        x: one batch of inputs.
        y: its targets.

    Returns:
        A `jax.stages.Compiled`.
    """
    if not model.compiled:
        raise ValueError(
            "`model` must be compiled before its training step can be. "
            f"Received: model={model.name!r}, not compiled"
        )
    return backend.compiled_train_step(model, x, y)


def step_collectives(compiled_step):
    """The collective operations of a compiled step, with their sizes.

    Args:
        compiled_step: a `jax.stages.Compiled` (`compiled_train_step`), or
            the text of an HLO module.

    Returns:
        A list of `(op, shapes, num_bytes)`: the XLA collective (e.g.
        `"all-reduce"`), the shapes of its result (a tuple of tuples, one
        per array it combines) and the bytes of that result on one device.

    Example:

    >>> step_collectives(
    ...     "%all-reduce.1 = (f32[16,11]{1,0}, s32[8]{0}) all-reduce(%a, %b)"
    ... )
    [('all-reduce', ((16, 11), (8,)), 736)]
    """
    text = compiled_step if isinstance(compiled_step, str) else (
        compiled_step.as_text()
    )
    collectives = []
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        result_type, op = match.groups()
        shapes, num_bytes = [], 0
        for dtype, dims in _ARRAY_SHAPE.findall(result_type):
            shape = tuple(int(size) for size in dims.split(",") if size)
            shapes.append(shape)
            num_bytes += math.prod(shape) * _DTYPE_BYTES[dtype]
        collectives.append((op, tuple(shapes), num_bytes))
    return collectives
