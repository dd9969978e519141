"""Test configuration: the backend comes from `KERAS_BACKEND`, as in Keras CI."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_trainable_backend: needs a backend that can train",
    )



@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same global seed: results are repeatable."""
    import keras

    keras.utils.set_random_seed(0)
