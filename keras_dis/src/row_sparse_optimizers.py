"""Lazy, row-sparse optimizer updates of the head's kernel and bias.

A sampled step touches `B * (k + 1)` rows of the `C x d` kernel. Keras
optimizers update every row (Adam, RMSProp and momentum SGD decay the
moments of all rows and move them), which costs `O(C * d)` per step and, on
JAX and PyTorch, needs a dense `C x d` gradient first. `RowSparseOptimizer`
applies the update of a compiled Keras optimizer to the touched rows only:

- the gradient of each touched row is the sum over its occurrences in the
  batch (duplicates count), computed from the loss's closed-form logit
  gradient, so no `C x d` gradient is ever formed;
- its optimizer state (moments, velocities) lives in `C x d` slot variables
  that are read and written at the touched rows only;
- rows not touched in a step keep their weights and their state: this is
  the "lazy" semantics of TensorFlow 1's `LazyAdamOptimizer`. It differs
  from dense Adam, where an untouched row still moves by its decaying
  momentum and its moments decay; with plain SGD (no momentum) both are
  identical.

Supported: `keras.optimizers.SGD` (momentum, Nesterov), `Adam` and
`RMSprop` (momentum, centered), with a float or a schedule learning rate.
"""

import keras
from keras import ops

from keras_dis.src import backend

SUPPORTED_OPTIMIZERS = (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.RMSprop,
)


def _slot_names(optimizer):
    if isinstance(optimizer, keras.optimizers.Adam):
        return ("momentum", "velocity")
    if isinstance(optimizer, keras.optimizers.RMSprop):
        names = ("velocity",)
        if optimizer.momentum > 0:
            names += ("momentum",)
        if optimizer.centered:
            names += ("average_gradient",)
        return names
    return ("momentum",) if optimizer.momentum != 0 else ()


def check_optimizer(optimizer):
    """Raises a `ValueError` if `optimizer` has no row-sparse twin."""
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise ValueError(
            "Row-sparse head updates support keras.optimizers.SGD, Adam and "
            f"RMSprop. Received: optimizer={optimizer!r}. Pass "
            "`row_sparse_updates=False` to the Distiller to train the head "
            "densely with any optimizer."
        )
    unsupported = {
        "weight_decay": optimizer.weight_decay,
        "clipnorm": optimizer.clipnorm,
        "clipvalue": optimizer.clipvalue,
        "global_clipnorm": optimizer.global_clipnorm,
        "use_ema": optimizer.use_ema,
        "amsgrad": getattr(optimizer, "amsgrad", False),
        "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(
                f"Row-sparse head updates do not support `{name}`. "
                f"Received: {name}={value!r}. Pass `row_sparse_updates=False` "
                "to the Distiller to train the head densely."
            )


def update_rows(optimizer, rows, gradients, slots, step, learning_rate):
    """One optimizer update of some rows, the formulas of Keras's optimizers.

    Args:
        optimizer: the Keras optimizer whose hyperparameters to use.
        rows: float tensor `(n, ...)`, current values of the rows.
        gradients: float tensor like `rows`.
        slots: dict of slot name to the rows' current slot values.
        step: float scalar, the 1-based step number.
        learning_rate: float scalar.

    Returns:
        A tuple `(new_rows, new_slots)`.
    """
    if isinstance(optimizer, keras.optimizers.Adam):
        beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
        momentum = beta_1 * slots["momentum"] + (1 - beta_1) * gradients
        velocity = beta_2 * slots["velocity"] + (1 - beta_2) * ops.square(
            gradients
        )
        alpha = (
            learning_rate
            * ops.sqrt(1 - ops.power(beta_2, step))
            / (1 - ops.power(beta_1, step))
        )
        new_rows = rows - alpha * momentum / (
            ops.sqrt(velocity) + optimizer.epsilon
        )
        return new_rows, {"momentum": momentum, "velocity": velocity}
    if isinstance(optimizer, keras.optimizers.RMSprop):
        rho = optimizer.rho
        new_slots = {
            "velocity": rho * slots["velocity"]
            + (1 - rho) * ops.square(gradients)
        }
        denominator = new_slots["velocity"] + optimizer.epsilon
        if optimizer.centered:
            new_slots["average_gradient"] = (
                rho * slots["average_gradient"] + (1 - rho) * gradients
            )
            denominator = denominator - ops.square(new_slots["average_gradient"])
        increment = learning_rate * gradients / ops.sqrt(denominator)
        if optimizer.momentum > 0:
            new_slots["momentum"] = optimizer.momentum * slots["momentum"] + increment
            return rows - new_slots["momentum"], new_slots
        return rows - increment, new_slots
    if optimizer.momentum == 0:
        return rows - learning_rate * gradients, {}
    momentum = optimizer.momentum * slots["momentum"] - learning_rate * gradients
    if optimizer.nesterov:
        return rows + optimizer.momentum * momentum - learning_rate * gradients, {
            "momentum": momentum
        }
    return rows + momentum, {"momentum": momentum}


def sum_duplicate_rows(indices, values):
    """Sums the values of equal indices, without a `(C, ...)` buffer.

    Args:
        indices: int tensor `(n,)`.
        values: float tensor `(n, ...)`.

    Returns:
        A tuple `(sorted_indices, summed)`: the indices in ascending order
        and, for each, the sum of the values of all entries with that index
        (repeated for every repeat, so each row gets the same update).
    """
    num_entries = indices.shape[0]
    order = ops.argsort(indices)
    sorted_indices = ops.take(indices, order)
    starts = ops.concatenate(
        [
            ops.ones((1,), "int32"),
            ops.cast(sorted_indices[1:] != sorted_indices[:-1], "int32"),
        ]
    )
    segment_ids = ops.cumsum(starts) - 1
    segment_sums = ops.segment_sum(
        ops.take(values, order, axis=0),
        segment_ids,
        num_segments=num_entries,
    )
    return sorted_indices, ops.take(segment_sums, segment_ids, axis=0)


class RowSparseOptimizer:
    """Applies a Keras optimizer's update to the touched rows of a head.

    Owns no Keras state itself: its slot variables (one `C x d` and one
    `(C,)` per optimizer slot, plus a step counter) are weights of `owner`
    (the `Distiller`), so they are saved, restored and, on JAX, threaded
    through the compiled step with the rest of the model's state.

    Args:
        optimizer: a compiled `keras.optimizers.SGD`, `Adam` or `RMSprop`;
            its hyperparameters and learning rate (or schedule) are used.
        head: the `SampledDistillationHead` whose kernel and bias to update.
        owner: the layer that owns the slot variables.
    """

    def __init__(self, optimizer, head, owner):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # The head's update uses the unscaled, closed-form gradient.
            optimizer = optimizer.inner_optimizer
        check_optimizer(optimizer)
        self.optimizer = optimizer
        self.head = head
        self.parameters = [head.kernel] + ([head.bias] if head.use_bias else [])
        self.slots = [
            {
                name: owner.row_sparse_slot(f"{parameter.name}_{name}", parameter.shape)
                for name in _slot_names(optimizer)
            }
            for parameter in self.parameters
        ]
        self.step = owner.row_sparse_slot("row_sparse_step", ())
        # A mirror of a float learning rate: on JAX the optimizer's own
        # variables are not part of the state the loss can read.
        self.learning_rate_value = owner.row_sparse_slot(
            "row_sparse_learning_rate", ()
        )
        self.sync_learning_rate()

    def sync_learning_rate(self):
        """Copies a float learning rate of the optimizer into the mirror
        (`Distiller.fit` does it at each epoch, after callbacks such as
        `ReduceLROnPlateau` may have changed it)."""
        if not self._has_schedule():
            self.learning_rate_value.assign(float(self.optimizer.learning_rate))

    def _has_schedule(self):
        return isinstance(
            self.optimizer._learning_rate,
            keras.optimizers.schedules.LearningRateSchedule,
        )

    def reset(self):
        """Zeros the optimizer state (a new compile starts afresh)."""
        self.step.assign(ops.zeros(()))
        self.sync_learning_rate()
        for slots in self.slots:
            for variable in slots.values():
                variable.assign(ops.zeros(variable.shape))

    def learning_rate(self, step):
        if self._has_schedule():
            return ops.cast(self.optimizer._learning_rate(step - 1), "float32")
        return self.learning_rate_value.value

    def apply(self, classes, logit_gradients, features):
        """Updates the rows of `classes` given the loss's logit gradients.

        Args:
            classes: int tensor `(batch, n)`, the classes whose logits the
                loss used.
            logit_gradients: float tensor `(batch, n)`, the derivative of
                the (reduced) loss with respect to each of those logits.
            features: float tensor `(batch, d)`, the head's input.
        """
        classes = ops.reshape(ops.cast(classes, "int32"), (-1,))
        logit_gradients = ops.stop_gradient(ops.cast(logit_gradients, "float32"))
        features = ops.stop_gradient(ops.cast(features, "float32"))
        kernel_gradients = logit_gradients[:, :, None] * features[:, None, :]
        gradients = [ops.reshape(kernel_gradients, (-1, features.shape[-1]))]
        if self.head.use_bias:
            gradients.append(ops.reshape(logit_gradients, (-1,)))
        step = self.step.value + 1.0
        self.step.assign(step)
        learning_rate = self.learning_rate(step)
        for parameter, slots, gradient in zip(self.parameters, self.slots, gradients):
            rows_index, row_gradients = sum_duplicate_rows(classes, gradient)
            new_rows, new_slots = update_rows(
                self.optimizer,
                ops.take(parameter.value, rows_index, axis=0),
                row_gradients,
                {
                    name: ops.take(variable.value, rows_index, axis=0)
                    for name, variable in slots.items()
                },
                step,
                learning_rate,
            )
            backend.scatter_rows(parameter, rows_index, new_rows)
            for name, variable in slots.items():
                backend.scatter_rows(variable, rows_index, new_slots[name])
