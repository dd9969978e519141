"""PyTorch: row updates with an in-place `index_copy_`."""

import torch

from keras_dis.src.backend.common import raise_if_error


def scatter_rows(variable, indices, rows):
    """Writes `rows` into `variable[indices]` in place, outside autograd.

    Args:
        variable: a `keras.Variable` of shape `(C, ...)`.
        indices: int tensor `(n,)`; repeated indices must carry equal rows.
        rows: tensor `(n, ...)`.
    """
    with torch.no_grad():
        value = variable.value
        value.index_copy_(0, indices.long(), rows.to(value.dtype))


def raise_input_error(error_code, error_value, num_classes):
    """Raises the input error of a step (PyTorch runs eagerly).

    Returns:
        True: the step raises the error itself.
    """
    raise_if_error(error_code, error_value, num_classes)
    return True


def segment_sum(data, segment_ids, num_segments):
    """Sums of the rows of `data` per segment id by one `index_add`: Keras's
    PyTorch `segment_sum` sorts and pads the segments (12 of the 35 ms of a
    row-sparse step at `C = 1000`)."""
    data = torch.as_tensor(data)
    zeros = torch.zeros(
        (int(num_segments),) + tuple(data.shape[1:]),
        dtype=data.dtype,
        device=data.device,
    )
    return zeros.index_add(0, torch.as_tensor(segment_ids).long(), data)


def select(condition, values, other):
    """`values` if the scalar `condition` holds, else `other`: eagerly, a
    branch instead of an element-wise select over every row (a pass over
    the gathered rows and their optimizer state, ~10% of the step)."""
    return values if bool(condition) else other


def stable_value(variable):
    """A copy of `variable`'s value: autograd saves the tensors a product
    needs for its backward pass, and the in-place row update of the same
    step (`scatter_rows`, `Variable.assign`) would change them first."""
    return variable.value.clone()
