"""Runs a benchmark script at toy sizes on the current backend."""

import csv
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_benchmark(script, *arguments):
    """Runs `benchmarks/<script>` with `arguments` (which include
    `--output PATH`) on this backend.

    Returns:
        The CSV rows it wrote (a list of dicts) and its stdout.
    """
    output = arguments[arguments.index("--output") + 1]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as file:
        return list(csv.DictReader(file)), result.stdout
