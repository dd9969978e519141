"""The head split over 8 simulated CPU devices with `keras.distribution`.

JAX takes its device count when it starts, so the runs happen in one child
process (`python -m tests.src.test_distribution OUT.json`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`; it trains every case
once on one device and once on the mesh, and the tests read its results.
"""

import contextlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_dis.src import distribution

NUM_DEVICES = 8
MESH_SHAPE = (2, 4)  # ("batch", "model")
MODEL_SHARDS = MESH_SHAPE[1]
# Classes, features, batch, k: the head's rows per device (8192) appear in
# no other dimension of the step, so a class-sized collective is visible.
NUM_CLASSES, FEATURES_DIM, BATCH_SIZE, K = 2**15, 16, 32, 10
NUM_EXAMPLES, INPUT_DIM, TOP_R, EPOCHS = 128, 12, 40, 2
FEW_CLASSES = 128
METHODS = ("dis", "uniform", "ftis", "full")
PATHS = ("distiller", "plain")
# Every method on both paths, and the head trained by the model's optimizer
# (its dense gradient flowing through the split logits).
CASES = [(method, path) for method in METHODS for path in PATHS] + [
    ("dis", "dense_head")
]

on_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on JAX only in Keras 3.15",
)


# ----------------------------------------------------------------------------
# The child process.


def _data(num_classes=NUM_CLASSES):
    import keras_dis

    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, INPUT_DIM)).astype("float32")
    labels = rng.integers(0, num_classes, NUM_EXAMPLES)
    teacher_logits = 3 * rng.normal(size=(NUM_EXAMPLES, num_classes))
    targets = keras_dis.pack_teacher_targets(
        labels, teacher_logits.astype("float32"), top_r=TOP_R
    )
    return x, targets


def _student_model(num_classes=NUM_CLASSES, head_optimizer=None):
    """A student with a trainable body, and its head."""
    import keras_dis

    keras.utils.set_random_seed(1)
    inputs = keras.Input((INPUT_DIM,))
    features = keras.layers.Dense(FEATURES_DIM, activation="relu")(inputs)
    head = keras_dis.SampledDistillationHead(
        num_classes, seed=3, optimizer=head_optimizer
    )
    return keras.Model(inputs, head(features)), head


def _model(method, path, num_classes=NUM_CLASSES):
    """A student compiled for `path`, and its head."""
    import keras_dis

    own_optimizer = path == "plain" and method != "full"
    student, head = _student_model(
        num_classes, "adam" if own_optimizer else None
    )
    model = student if path == "plain" else keras_dis.Distiller(
        None, student, row_sparse_updates=path != "dense_head"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras_dis.DISLoss(k=K, proposal=method, temperature=2.0),
    )
    return model, head


def _student(model):
    return model.student if hasattr(model, "student") else model


def _shardings(head):
    """Per head weight: its partition spec and the rows on one device."""
    shardings = {}
    for weight in head.weights:
        value = weight.value
        spec = getattr(value.sharding, "spec", None)
        shard = value.addressable_shards[0].data
        shardings[weight.path.split("/")[-1]] = {
            "spec": None if spec is None else [str(axis) for axis in spec],
            "shape": list(weight.shape),
            "shard_shape": list(shard.shape),
        }
    return shardings


def _train(method, path, x, targets, num_classes=NUM_CLASSES):
    model, head = _model(method, path, num_classes)
    history = model.fit(
        x, targets, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
        verbose=0,
    )
    return model, head, history.history["loss"]


def _evaluate(model, x, targets):
    """The exact full-softmax loss of `evaluate`, and the top-1 classes of
    `predict` (full logits)."""
    loss = model.evaluate(x, targets, batch_size=BATCH_SIZE, verbose=0)
    loss = loss[0] if isinstance(loss, list) else loss
    logits = _student(model).predict(x, batch_size=BATCH_SIZE, verbose=0)
    return {
        "loss": float(loss),
        "top1": np.argmax(logits, axis=-1).tolist(),
        "logits_shape": list(logits.shape),
    }


def _weights(model):
    return [np.asarray(w) for w in _student(model).get_weights()]


def _max_difference(weights, other):
    return float(max(np.max(np.abs(a - b)) for a, b in zip(weights, other)))


def _model_parallel():
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "model"))
    return keras.distribution.ModelParallel(
        layout_map=distribution.head_layout_map(mesh), batch_dim_name="batch"
    )


def _plain_keras_model_parallel():
    """The issue's code: the layout map written by hand."""
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "model"))
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*sampled_distillation_head.*kernel"] = ("model", None)
    layout_map[".*sampled_distillation_head.*bias"] = ("model",)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def _class_sized(collectives):
    """The collectives with a dimension of a head shard or more rows."""
    return [
        [op, [list(s) for s in shapes], size]
        for op, shapes, size in collectives
        if any(dim >= NUM_CLASSES // MODEL_SHARDS for s in shapes for dim in s)
    ]


def _run_cases(work_dir):
    x, targets = _data()
    results = {"devices": len(keras.distribution.list_devices())}
    single = {}
    for method, path in CASES:
        model, _, losses = _train(method, path, x, targets)
        single[method, path] = (
            losses, _weights(model), _evaluate(model, x, targets)
        )
    for method, path in CASES:
        with _model_parallel().scope():
            model, head, losses = _train(method, path, x, targets)
            step = distribution.compiled_train_step(
                model, x[:BATCH_SIZE], targets[:BATCH_SIZE]
            )
            collectives = distribution.step_collectives(step)
            evaluation = _evaluate(model, x, targets)
        single_losses, single_weights, single_evaluation = single[method, path]
        results[f"{method}/{path}"] = {
            "losses": losses,
            "single_losses": single_losses,
            "evaluation": evaluation,
            "single_evaluation": single_evaluation,
            "weight_difference": _max_difference(
                _weights(model), single_weights
            ),
            "shardings": _shardings(head),
            "collective_bytes": sum(size for _, _, size in collectives),
            "class_sized_collectives": _class_sized(collectives),
        }
    for name, make in (
        ("plain_keras", _plain_keras_model_parallel),
        (
            "data_parallel",
            lambda: keras.distribution.DataParallel(
                devices=keras.distribution.list_devices()
            ),
        ),
    ):
        with make().scope():
            model, head, losses = _train("dis", "distiller", x, targets)
        results[name] = {
            "losses": losses,
            "weight_difference": _max_difference(
                _weights(model), single["dis", "distiller"][1]
            ),
            "shardings": _shardings(head),
        }
    results["few_classes"] = _few_classes()
    results["online_teacher"] = _online_teacher(x)
    results["saving"] = _save_and_load(work_dir, x, targets)
    results["indivisible_error"] = _indivisible_error()
    return results


def _single_and_sharded(train):
    """`train()` (returning `(losses, model, head)`) on one device, then
    under `_model_parallel()`: the sharded run against the single one."""
    runs = []
    for make in (None, _model_parallel):
        with make().scope() if make else contextlib.nullcontext():
            losses, model, head = train()
        runs.append((losses, _weights(model), _shardings(head)))
    return {
        "single_losses": runs[0][0],
        "losses": runs[1][0],
        "weight_difference": _max_difference(runs[0][1], runs[1][1]),
        "shardings": runs[1][2],
    }


def _few_classes():
    """With 128 classes the step computes every logit by one matmul (see
    `sampled_softmax.computes_every_class`): sharded, it trains the same."""
    x, targets = _data(FEW_CLASSES)

    def train():
        model, head, losses = _train("dis", "distiller", x, targets, FEW_CLASSES)
        return losses, model, head

    return _single_and_sharded(train)


def _online_teacher(x):
    """A `Distiller` whose teacher ranks the classes in the step (labels as
    `y`): the teacher stays whole on every device, the head is split."""
    import keras_dis

    labels = np.random.default_rng(1).integers(0, NUM_CLASSES, NUM_EXAMPLES)

    def train():
        keras.utils.set_random_seed(2)
        teacher = keras.Sequential(
            [keras.Input((INPUT_DIM,)), keras.layers.Dense(NUM_CLASSES)]
        )
        student, head = _student_model()
        model = keras_dis.Distiller(teacher, student, top_r=TOP_R)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), loss=keras_dis.DISLoss(k=K)
        )
        history = model.fit(
            x, labels, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
            verbose=0,
        )
        return history.history["loss"], model, head

    return _single_and_sharded(train)


def _indivisible_error():
    import keras_dis

    with _model_parallel().scope():
        try:
            keras_dis.SampledDistillationHead(NUM_CLASSES + 2).build(
                (None, FEATURES_DIM)
            )
        except ValueError as error:
            return str(error)
    return None


def _save_and_load(work_dir, x, targets):
    """A sharded distiller saved and loaded, then trained on: the same
    shardings, weights and next losses as the one never saved."""
    with _model_parallel().scope():
        model, _, _ = _train("dis", "distiller", x, targets)
        path = os.path.join(work_dir, "sharded.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        weights_path = os.path.join(work_dir, "sharded.weights.h5")
        model.save_weights(weights_path)
        rebuilt, _ = _model("dis", "distiller")
        rebuilt.load_weights(weights_path)
        loaded_head = loaded.student.layers[-1]
        saved_difference = _max_difference(_weights(model), _weights(loaded))
        state_difference = _max_difference(
            [np.asarray(w) for w in model.student.layers[-1].weights],
            [np.asarray(w) for w in loaded_head.weights],
        )
        next_losses = {
            name: m.fit(
                x, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False,
                verbose=0,
            ).history["loss"]
            for name, m in (
                ("original", model), ("loaded", loaded), ("rebuilt", rebuilt)
            )
        }
        return {
            "shardings": _shardings(loaded_head),
            "rebuilt_shardings": _shardings(rebuilt.student.layers[-1]),
            "weight_difference": saved_difference,
            "head_state_difference": state_difference,
            "next_losses": next_losses,
        }


# ----------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("distribution")
    out = work_dir / "results.json"
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    subprocess.run(
        [sys.executable, "-m", "tests.src.test_distribution", str(out)],
        check=True, cwd=root, env=env,
    )
    return json.loads(out.read_text())


@on_jax
def test_the_child_has_eight_devices(runs):
    assert runs["devices"] == NUM_DEVICES


@on_jax
@pytest.mark.parametrize("method, path", CASES)
def test_sharded_training_matches_one_device(runs, method, path):
    run = runs[f"{method}/{path}"]
    np.testing.assert_allclose(run["losses"], run["single_losses"], rtol=1e-5)
    assert run["weight_difference"] < 1e-5


@on_jax
@pytest.mark.parametrize("method, path", CASES)
def test_sharded_evaluate_and_predict_match_one_device(runs, method, path):
    run = runs[f"{method}/{path}"]
    evaluation, single = run["evaluation"], run["single_evaluation"]
    assert evaluation["logits_shape"] == [NUM_EXAMPLES, NUM_CLASSES]
    np.testing.assert_allclose(evaluation["loss"], single["loss"], rtol=1e-5)
    assert evaluation["top1"] == single["top1"]


@on_jax
@pytest.mark.parametrize("method, path", CASES)
def test_each_device_holds_its_share_of_the_head(runs, method, path):
    shardings = runs[f"{method}/{path}"]["shardings"]
    rows = NUM_CLASSES // MODEL_SHARDS
    assert shardings["kernel"]["spec"][0] == "model"
    assert shardings["kernel"]["shard_shape"] == [rows, FEATURES_DIM]
    assert shardings["bias"]["shard_shape"] == [rows]
    row_state = [
        name for name, sharding in shardings.items()
        if sharding["shape"][:1] == [NUM_CLASSES]
        and name not in ("kernel", "bias", "rank_proposal")
    ]
    if method == "full" or path == "dense_head":
        assert row_state == []  # the model's optimizer trains it densely
        return
    # Adam's moments of the kernel and the bias, and the group scratch.
    assert sorted(row_state) == [
        "bias_momentum_velocity",
        "kernel_momentum_velocity",
        "row_sparse_group_leaders",
    ]
    for name in row_state:
        assert shardings[name]["spec"][0] == "model", name
        assert shardings[name]["shard_shape"][0] == rows, name
    assert shardings["kernel_momentum_velocity"]["shard_shape"] == [
        rows, 2, FEATURES_DIM,
    ]


@on_jax
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ("dis", "uniform", "ftis"))
def test_sampled_step_communicates_no_class_sized_array(runs, method, path):
    run = runs[f"{method}/{path}"]
    assert run["class_sized_collectives"] == []
    # Partial logits and feature gradients, the entries' ids, logit
    # gradients and features, the body's gradients: O(B * (k + d)) bytes,
    # less than the B * (k + 1) gathered rows of d floats would take.
    body_bytes = (INPUT_DIM + 1) * FEATURES_DIM * 4
    bound = 4 * BATCH_SIZE * (K + 1 + FEATURES_DIM) * 4 + body_bytes
    assert bound < BATCH_SIZE * (K + 1) * FEATURES_DIM * 4
    assert 0 < run["collective_bytes"] < bound


@on_jax
@pytest.mark.parametrize("path", PATHS)
def test_full_kd_step_communicates_class_sized_gradients(runs, path):
    """The contrast: full KD sums the dense kernel gradient over the batch
    axis, a collective of a shard's `(C / 4, d)` rows."""
    assert runs[f"full/{path}"]["class_sized_collectives"] != []


@on_jax
@pytest.mark.parametrize("name", ("plain_keras", "data_parallel"))
def test_plain_keras_distributions_train_the_head(runs, name):
    run = runs[name]
    np.testing.assert_allclose(
        run["losses"], runs["dis/distiller"]["single_losses"], rtol=1e-5
    )
    assert run["weight_difference"] < 1e-5
    kernel = run["shardings"]["kernel"]
    slots = run["shardings"]["kernel_momentum_velocity"]
    if name == "data_parallel":
        assert kernel["shard_shape"] == [NUM_CLASSES, FEATURES_DIM]
        assert slots["shard_shape"] == [NUM_CLASSES, 2, FEATURES_DIM]
    else:
        assert kernel["shard_shape"][0] == NUM_CLASSES // MODEL_SHARDS
        assert slots["shard_shape"][0] == NUM_CLASSES // MODEL_SHARDS


@on_jax
def test_few_classes_every_class_step_matches_one_device(runs):
    run = runs["few_classes"]
    np.testing.assert_allclose(run["losses"], run["single_losses"], rtol=1e-5)
    assert run["weight_difference"] < 1e-5
    assert run["shardings"]["kernel_momentum_velocity"]["shard_shape"] == [
        FEW_CLASSES // MODEL_SHARDS, 2, FEATURES_DIM,
    ]


@on_jax
def test_an_online_teacher_distils_into_a_split_head(runs):
    run = runs["online_teacher"]
    np.testing.assert_allclose(run["losses"], run["single_losses"], rtol=1e-5)
    assert run["weight_difference"] < 1e-5
    assert run["shardings"]["kernel"]["shard_shape"][0] == (
        NUM_CLASSES // MODEL_SHARDS
    )


@on_jax
def test_a_sharded_distiller_saves_and_loads(runs):
    saving = runs["saving"]
    assert saving["weight_difference"] == 0.0
    assert saving["head_state_difference"] == 0.0
    rows = NUM_CLASSES // MODEL_SHARDS
    for shardings in (saving["shardings"], saving["rebuilt_shardings"]):
        assert shardings["kernel"]["shard_shape"] == [rows, FEATURES_DIM]
        assert shardings["kernel_momentum_velocity"]["shard_shape"] == [
            rows, 2, FEATURES_DIM,
        ]
    next_losses = saving["next_losses"]
    np.testing.assert_allclose(next_losses["loaded"], next_losses["original"])
    np.testing.assert_allclose(
        next_losses["rebuilt"], next_losses["original"], rtol=1e-5
    )


@on_jax
def test_a_class_count_the_mesh_cannot_split_raises(runs):
    message = runs["indivisible_error"]
    assert f"num_classes={NUM_CLASSES + 2}" in message
    assert "multiple of that axis's size" in message


def test_head_layout_map_checks_its_arguments():
    # PyTorch has no keras.distribution: the error says so.
    match = "device_mesh" if keras.distribution is not None else "KERAS_BACKEND"
    with pytest.raises(ValueError, match=match):
        distribution.head_layout_map("mesh")


@on_jax
def test_head_layout_map_names_every_head():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = distribution.head_layout_map(mesh)
    assert layout_map["m/sampled_distillation_head/kernel"].axes == (
        "model", None,
    )
    assert layout_map["m/sampled_distillation_head_12/bias"].axes == ("model",)
    assert layout_map["m/sampled_distillation_head/kernel_momentum"] is None
    assert layout_map["m/dense/kernel"] is None
    with pytest.raises(ValueError, match="model_dim_name='classes'"):
        distribution.head_layout_map(mesh, model_dim_name="classes")


def test_step_collectives_reads_sizes_from_hlo_text():
    text = "\n".join(
        [
            "%a = f32[8,4]{1,0} parameter(0)",
            "%all-reduce.3 = (f32[16,11]{1,0}, s32[8]{0}) all-reduce(%a, %b)",
            "ROOT %ag = bf16[352,2]{1,0} all-gather(%c), dimensions={0}",
            "%done = f32[4]{0} all-gather-done(%start)",
            "%start = (f32[2]{0}, f32[4]{0}) all-gather-start(%x)",
        ]
    )
    assert distribution.step_collectives(text) == [
        ("all-reduce", ((16, 11), (8,)), 16 * 11 * 4 + 8 * 4),
        ("all-gather", ((352, 2),), 352 * 2 * 2),
        ("all-gather", ((4,),), 16),
    ]


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="JAX compiles the step"
)
def test_compiled_train_step_needs_jax():
    import keras_dis

    inputs = keras.Input((4,))
    student = keras.Model(
        inputs, keras_dis.SampledDistillationHead(10)(inputs)
    )
    student.compile(optimizer="sgd", loss=keras_dis.DISLoss(k=2))
    with pytest.raises(ValueError, match="KERAS_BACKEND"):
        distribution.compiled_train_step(
            student, np.ones((2, 4)), np.ones((2, 4))
        )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as work_dir:
        results = _run_cases(work_dir)
    with open(sys.argv[1], "w") as file:
        json.dump(results, file)
