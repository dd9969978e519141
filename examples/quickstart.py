"""Quick start: distil a 1,000-class teacher into a small student with DIS.

Runs in under a minute on a laptop CPU with any Keras backend:

    KERAS_BACKEND=jax python examples/quickstart.py

The teacher here is a fixed random linear model over synthetic inputs, so no
data set or pretrained weights are needed; the student is a small MLP whose
last layer is a `keras_dis.SampledDistillationHead`. Each training step
computes student logits for the target plus `k=10` sampled classes only.

The `loss` in the progress bar is the loss of each step's sampled subset
under the current proposal: it is not comparable across epochs (the
proposal changes every epoch) nor across methods. A
`keras_dis.DistillationMonitor` on 512 held-in-memory examples adds what is
(`full_kd_loss`, `teacher_agreement`, `accuracy`) and how good the sampled
estimator is (`gradient_cosine`, `effective_sample_size`), every 8 steps and
at each epoch's end; the curves are saved to `--plot`.
"""

import argparse

import keras
import numpy as np

import keras_dis


def make_problem(num_examples, num_classes, input_dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, input_dim)).astype("float32")
    inputs = keras.Input((input_dim,))
    teacher = keras.Model(inputs, keras.layers.Dense(num_classes)(inputs))
    teacher.layers[-1].set_weights(
        [
            (3.0 * rng.normal(size=(input_dim, num_classes))).astype("float32"),
            np.zeros(num_classes, "float32"),
        ]
    )
    labels = teacher.predict(x, verbose=0).argmax(-1)
    return x, labels, teacher


def make_student(input_dim, num_classes):
    inputs = keras.Input((input_dim,))
    features = keras.layers.Dense(128, activation="relu")(inputs)
    outputs = keras_dis.SampledDistillationHead(num_classes, seed=0)(features)
    return keras.Model(inputs, outputs, name="student")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--num-examples", type=int, default=8192)
    parser.add_argument("--k", type=int, default=10, help="sampled classes")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--plot", default="quickstart_monitor.png",
                        help="where to save the monitor's curves ('' for none)")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)

    x, labels, teacher = make_problem(args.num_examples, args.num_classes, 32, 0)
    student = make_student(32, args.num_classes)

    def agreement():
        predictions = student.predict(x, batch_size=1024, verbose=0)
        return float((predictions.argmax(-1) == labels).mean())

    before = agreement()
    distiller = keras_dis.Distiller(teacher, student)
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras_dis.DISLoss(k=args.k),
    )
    monitor = keras_dis.DistillationMonitor(x[:512], labels[:512], every_n_steps=8)
    distiller.fit(
        x,
        labels,
        batch_size=256,
        epochs=args.epochs,
        callbacks=[keras_dis.ProposalScheduler(), monitor],
    )
    after = agreement()
    print(
        f"Student top-1 agreement with the teacher over {args.num_classes} "
        f"classes: {before:.3f} before, {after:.3f} after DIS (k={args.k})."
    )
    last = monitor.history[-1]
    print(
        "On the probe set: exact full-KD loss "
        f"{monitor.history[0]['full_kd_loss']:.3f} -> {last['full_kd_loss']:.3f}, "
        f"gradient cosine of the k={args.k} estimator "
        f"{last['gradient_cosine']:.3f}, effective sample size "
        f"{last['effective_sample_size']:.2f} of its {args.k + 1} entries."
    )
    suggested, cosines = monitor.suggest_k()
    print(
        "Gradient cosine by k: "
        + ", ".join(f"k={k}: {c:.3f}" for k, c in cosines.items())
        + f"; the smallest k reaching 0.95: {suggested}."
    )
    if args.plot:
        keras_dis.plot_monitor(
            monitor, path=args.plot,
            title=f"DIS, k={args.k}, {args.num_classes} classes",
        )
        print(f"Saved the monitor's curves to {args.plot}")
    return before, after, monitor


if __name__ == "__main__":
    main()
