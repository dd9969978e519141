"""Backend-specific pieces, one module per backend with the same interface.

Keras gives no portable in-place row update of a variable: `ops.scatter_update`
returns a new tensor, which on TensorFlow copies the whole `C x d` kernel.
Each backend module implements `scatter_rows(variable, indices, rows)`.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_dis.src.backend.tensorflow import scatter_rows
elif _BACKEND == "jax":
    from keras_dis.src.backend.jax import scatter_rows
elif _BACKEND == "torch":
    from keras_dis.src.backend.torch import scatter_rows
else:
    raise ValueError(
        f"keras_dis supports the tensorflow, jax and torch backends. "
        f"Received: KERAS_BACKEND={_BACKEND!r}"
    )

__all__ = ["scatter_rows"]
