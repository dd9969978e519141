"""PyTorch: row updates with an in-place `index_copy_`."""

import torch


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
