"""The `>>>` examples of every module under `keras_dis/` run as tests.

One test per module, on the backend of `KERAS_BACKEND`. The examples see
`np`, `keras`, `ops` and `keras_dis`, and the module's own namespace (its
names take precedence). They must print the same thing on every backend:
write tensor results backend-neutrally (`tuple(x.shape)`,
`keras.ops.convert_to_numpy(x).tolist()`), never a tensor's repr.
"""

import doctest
import importlib
import os
import pkgutil

import keras
import numpy as np
import pytest
from keras import ops

import keras_dis

# Examples found in the whole package when this test was written: 31. The
# floor keeps the test from passing vacuously (a broken discovery finds
# nothing) while leaving room to rework a few examples.
MIN_EXAMPLES = 25
OPTION_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
BACKEND_PACKAGE = "keras_dis.src.backend."
BACKENDS = ("jax", "tensorflow", "torch")


def module_names():
    """Every module of the package, sorted, `keras_dis` included."""
    names = ["keras_dis"]
    for info in pkgutil.walk_packages(keras_dis.__path__, "keras_dis."):
        names.append(info.name)
    return sorted(names)


MODULE_NAMES = module_names()


def other_backend(module_name):
    """The backend a backend-specific module is for, when not the current."""
    if not module_name.startswith(BACKEND_PACKAGE):
        return None
    backend = module_name[len(BACKEND_PACKAGE) :]
    if backend in BACKENDS and backend != keras.backend.backend():
        return backend
    return None


def find_examples(module):
    """The doctests of `module`'s own objects, with the examples' globals."""
    globs = {"np": np, "keras": keras, "ops": ops, "keras_dis": keras_dis}
    globs.update(vars(module))
    finder = doctest.DocTestFinder(exclude_empty=True)
    return finder.find(module, module.__name__, globs=globs)


def prompts_in_source(module):
    """The number of `>>>` lines in the module's file."""
    path = getattr(module, "__file__", None)
    if path is None or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as source:
        return sum(line.lstrip().startswith(">>>") for line in source)


def test_module_discovery():
    """The walk finds the modules the examples live in, and enough examples."""
    for name in (
        "keras_dis.src.callbacks",
        "keras_dis.src.export",
        "keras_dis.src.head",
        "keras_dis.src.proposals",
        "keras_dis.src.teacher_targets",
    ):
        assert name in MODULE_NAMES
    total = sum(
        len(test.examples)
        for name in MODULE_NAMES
        if other_backend(name) is None
        for test in find_examples(importlib.import_module(name))
    )
    assert total >= MIN_EXAMPLES, (
        f"Found {total} docstring examples in keras_dis, expected at least "
        f"{MIN_EXAMPLES}: the doctest discovery is broken."
    )


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_docstring_examples(module_name):
    backend = other_backend(module_name)
    if backend is not None:
        pytest.skip(f"{module_name} runs on the {backend} backend only")
    module = importlib.import_module(module_name)
    tests = find_examples(module)
    found = sum(len(test.examples) for test in tests)
    # Each `>>>` line starts an example: one that doctest does not find
    # (in a nested function, say) would silently never run.
    assert found == prompts_in_source(module), (
        f"{module_name}: doctest finds {found} examples but the file has "
        f"{prompts_in_source(module)} `>>>` lines; put every example in the "
        "docstring of a module, class, function or method."
    )
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    for test in sorted(tests, key=lambda test: test.name):
        runner.run(test, out=report.append, clear_globs=True)
    assert runner.tries == found
    if runner.failures:
        pytest.fail(
            f"{runner.failures} of {runner.tries} docstring examples of "
            f"{module_name} failed on the {keras.backend.backend()} "
            "backend:\n" + "".join(report),
            pytrace=False,
        )
