"""Test configuration: the backend comes from `KERAS_BACKEND`, as in Keras CI."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_trainable_backend: needs a backend that can train",
    )
