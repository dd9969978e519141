import keras
import numpy as np
import pytest

import keras_dis

NUM_CLASSES = 20


def probe_problem(num_examples=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, 8)).astype("float32")
    teacher_logits = (3 * rng.normal(size=(num_examples, NUM_CLASSES))).astype(
        "float32"
    )
    labels = rng.integers(0, NUM_CLASSES, num_examples).astype("int32")
    return x, labels, teacher_logits


def make_student(optimizer=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras_dis.SampledDistillationHead(NUM_CLASSES, optimizer=optimizer),
        ]
    )


def numpy_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_monitor_values_match_numpy_and_reach_history():
    x, labels, teacher_logits = probe_problem()
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    distiller = keras_dis.Distiller(None, make_student())
    loss = keras_dis.DISLoss(k=5, temperature=2.0)
    distiller.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
    monitor = keras_dis.DistillationMonitor(x[:32], targets[:32], every_n_steps=2)
    history = distiller.fit(
        x, targets, epochs=2, batch_size=16, callbacks=[monitor], verbose=0
    )
    for name in keras_dis.src.monitor.MONITOR_METRICS:
        assert len(history.history[name]) == 2, name
    # 4 steps an epoch: at steps 2 and 4, and at each epoch's end.
    assert [entry["step"] for entry in monitor.history] == [2, 4, 4, 6, 8, 8]
    assert [entry["epoch"] for entry in monitor.history] == [0, 0, 0, 1, 1, 1]
    # The epoch's logs are the last measurement, which is the model now.
    measured = monitor.measure()
    for name, value in measured.items():
        assert history.history[name][-1] == pytest.approx(value, rel=1e-5, abs=1e-6)
    logits = distiller.student.predict(x[:32], verbose=0)
    teacher = teacher_logits[:32]
    expected_loss = -np.sum(
        np.exp(numpy_log_softmax(teacher / 2.0)) * numpy_log_softmax(logits / 2.0),
        axis=-1,
    ).mean()
    assert measured["full_kd_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert measured["teacher_agreement"] == pytest.approx(
        np.mean(logits.argmax(-1) == teacher.argmax(-1))
    )
    assert measured["accuracy"] == pytest.approx(
        np.mean(logits.argmax(-1) == labels[:32])
    )
    assert 0.0 < measured["gradient_cosine"] <= 1.0 + 1e-6
    assert 1.0 / 6 - 1e-6 <= measured["effective_sample_size"] <= 1.0 + 1e-6
    # The loss the step prints is the subset's, not the full loss.
    assert history.history["loss"][-1] != pytest.approx(
        history.history["full_kd_loss"][-1], rel=1e-3
    )


def test_monitor_follows_training():
    # With a learning rate the full loss on the training data falls.
    x, labels, teacher_logits = probe_problem(num_examples=128)
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer=keras.optimizers.Adam(0.05), loss=keras_dis.DISLoss(k=10))
    monitor = keras_dis.DistillationMonitor(x, targets)
    history = distiller.fit(
        x, targets, epochs=8, batch_size=32, callbacks=[monitor], verbose=0
    )
    losses = history.history["full_kd_loss"]
    assert losses[-1] < losses[0] - 0.1
    assert history.history["teacher_agreement"][-1] > history.history[
        "teacher_agreement"
    ][0]


def test_monitor_with_an_online_teacher_and_labels():
    x, labels, teacher_logits = probe_problem()
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(NUM_CLASSES)])
    distiller = keras_dis.Distiller(teacher, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    monitor = keras_dis.DistillationMonitor(x[:16], labels[:16])
    distiller.fit(x, labels, epochs=1, batch_size=16, callbacks=[monitor], verbose=0)
    teacher_top = teacher.predict(x[:16], verbose=0).argmax(-1)
    logits = distiller.student.predict(x[:16], verbose=0)
    assert monitor.history[-1]["teacher_agreement"] == pytest.approx(
        np.mean(logits.argmax(-1) == teacher_top)
    )


def test_monitor_on_the_plain_path_and_full_kd():
    x, labels, teacher_logits = probe_problem()
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    student = make_student(optimizer="adam")
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    monitor = keras_dis.DistillationMonitor(x[:16], targets[:16])
    history = student.fit(
        x, targets, epochs=1, batch_size=16, callbacks=[monitor], verbose=0
    )
    assert "gradient_cosine" in history.history
    # Full KD has no estimator to judge.
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.losses.get("full_kd"))
    monitor = keras_dis.DistillationMonitor(x[:16], targets[:16])
    history = distiller.fit(
        x, targets, epochs=1, batch_size=16, callbacks=[monitor], verbose=0
    )
    assert "full_kd_loss" in history.history
    assert "gradient_cosine" not in history.history


def test_monitor_errors():
    x, labels, teacher_logits = probe_problem()
    with pytest.raises(ValueError, match="every_n_steps"):
        keras_dis.DistillationMonitor(x, labels, every_n_steps=0)
    with pytest.raises(ValueError, match="same number"):
        keras_dis.DistillationMonitor(x, labels[:10])
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    monitor = keras_dis.DistillationMonitor(x[:16], labels[:16])
    with pytest.raises(ValueError, match="no teacher"):
        distiller.fit(x, targets, epochs=1, batch_size=16, callbacks=[monitor], verbose=0)
    student = make_student()
    student.compile(optimizer="adam", loss="mse")
    monitor = keras_dis.DistillationMonitor(x[:16], labels[:16])
    monitor.set_model(student)
    with pytest.raises(ValueError, match="keras_dis.DISLoss"):
        monitor.on_train_begin()


def test_suggest_k_grows_the_cosine_with_k():
    x, labels, teacher_logits = probe_problem()
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5, proposal="uniform"))
    monitor = keras_dis.DistillationMonitor(x[:32], targets[:32], num_subsets=32)
    distiller.fit(x, targets, epochs=1, batch_size=16, callbacks=[monitor], verbose=0)
    k, cosines = monitor.suggest_k(ks=(2, 5, 19, 40), target_cosine=0.9)
    assert sorted(cosines) == [2, 5, 19]  # k = 40 >= C is skipped
    assert cosines[19] > cosines[2]
    assert cosines[k] >= 0.9 and all(cosines[j] < 0.9 for j in cosines if j < k)
    # The compiled k's cosine is the one the monitor logs.
    assert cosines[5] == pytest.approx(monitor.history[-1]["gradient_cosine"], rel=1e-5)
    with pytest.raises(ValueError, match="target_cosine"):
        monitor.suggest_k(target_cosine=0)
    assert monitor.suggest_k(ks=(2,), target_cosine=1.0)[0] is None


def test_plot_monitor_draws_each_quantity(tmp_path):
    x, labels, teacher_logits = probe_problem()
    targets = np.asarray(keras_dis.pack_teacher_targets(labels, teacher_logits))
    distiller = keras_dis.Distiller(None, make_student())
    distiller.compile(optimizer="adam", loss=keras_dis.DISLoss(k=5))
    monitor = keras_dis.DistillationMonitor(x[:16], targets[:16], every_n_steps=1)
    distiller.fit(
        x, targets, epochs=2, batch_size=16, verbose=0,
        callbacks=[keras_dis.ProposalScheduler(), monitor],
    )
    path = tmp_path / "monitor.png"
    figure = keras_dis.plot_monitor(monitor, path=str(path))
    assert path.stat().st_size > 1000
    loss_axes, fraction_axes = figure.axes[0], figure.axes[1]
    assert [line.get_label() for line in fraction_axes.get_lines()] == [
        "teacher_agreement", "accuracy", "gradient_cosine", "effective_sample_size"
    ]
    drawn = loss_axes.get_lines()[0].get_ydata()
    np.testing.assert_allclose(drawn, [e["full_kd_loss"] for e in monitor.history])
    # b2 on a second axis: 5 in the first epoch, annealed in the second.
    scale = figure.axes[2].get_lines()[0].get_ydata()
    assert scale[0] == 5.0 and scale[-1] > 5.0
    with pytest.raises(ValueError, match="no measurements"):
        keras_dis.plot_monitor([])
