"""Backend-specific helpers for tests: gradients of a scalar function."""

import keras
import numpy as np


def value_and_gradient(function, inputs):
    """`(function(inputs), d function / d inputs)` as NumPy, on any backend.

    Args:
        function: maps a float32 tensor to a scalar tensor.
        inputs: NumPy array.
    """
    backend = keras.backend.backend()
    inputs = np.asarray(inputs, dtype="float32")
    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            value = function(tensor)
        gradient = tape.gradient(value, tensor)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        return float(value), gradient.numpy()
    if backend == "jax":
        import jax

        value, gradient = jax.value_and_grad(function)(inputs)
        return float(value), np.asarray(gradient)
    if backend == "torch":
        import torch

        tensor = torch.tensor(inputs, requires_grad=True)
        value = function(tensor)
        value.backward()
        return float(value.detach()), tensor.grad.numpy()
    raise ValueError(f"Unsupported backend: {backend}")
