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
from keras_dis.src import sampled_softmax

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


DISTILLER_REMEDY = (
    "Pass `row_sparse_updates=False` to the Distiller to train the head "
    "densely."
)


def check_optimizer(optimizer, remedy=DISTILLER_REMEDY):
    """Raises a `ValueError` if `optimizer` has no row-sparse twin.

    Args:
        optimizer: a Keras optimizer.
        remedy: the sentence that ends the error message: how to train the
            head densely instead.
    """
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise ValueError(
            "Row-sparse head updates support keras.optimizers.SGD, Adam and "
            f"RMSprop. Received: optimizer={optimizer!r}. {remedy}"
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
                f"Received: {name}={value!r}. {remedy}"
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


def group_leaders(indices, scratch):
    """For each entry, the position of one entry with the same index.

    Writes each entry's position at its index in `scratch` (when an index
    repeats, one of the writes wins) and reads them back: all entries of an
    index then name the same entry, their group's leader. Costs `O(n)`, with
    no sort and no `(C, ...)` temporary.

    Args:
        indices: int tensor `(n,)` of values in `[0, C)`.
        scratch: int32 `keras.Variable` of shape `(C,)`; its old content is
            irrelevant.

    Returns:
        int32 tensor `(n,)`.
    """
    positions = ops.arange(ops.shape(indices)[0], dtype="int32")
    backend.scatter_rows(scratch, indices, positions)
    return backend.take_rows(scratch.value, indices)


def sum_groups(values, leaders):
    """For each entry, the sum of the values of its group, `(n, ...)`.

    Summing per group (not `(C, ...)`) keeps the cost at `O(n)`; every entry
    of a group gets the same sum, so the rows written for repeats agree.
    """
    sums = backend.segment_sum(values, leaders, ops.shape(values)[0])
    return backend.take_rows(sums, leaders)


def updates_every_row(classes_shape, num_classes):
    """Whether a step whose subset has shape `classes_shape` `(batch, n)`
    updates all `num_classes` rows at once (masked to the touched ones).

    With at least as many entries as classes (few classes: `C = 1000` with
    `B * (k + 1) = 2816` entries), one pass over the `C` rows costs less
    than a pass per entry.
    """
    batch_size, subset_size = classes_shape
    if batch_size is None or subset_size is None:
        return False
    return num_classes <= batch_size * subset_size


def _where_rows(row_mask, new_values, values):
    """`new_values` in the rows where `row_mask` `(C,)` holds, else `values`."""
    mask = ops.reshape(row_mask, (-1,) + (1,) * (len(values.shape) - 1))
    return ops.where(mask, new_values, values)


def add_slot(layer, name, shape, dtype="float32", rows_like=None):
    """A zero-initialised, non-trainable variable of `layer` for optimizer
    state (never autocast: the state stays float32 under mixed precision).

    Args:
        layer: the layer that owns the variable; the caller tracks it (as
            an attribute of `layer`, or in one of its dicts).
        name: the variable's name, under `layer`'s name scope.
        shape: its shape.
        dtype: its dtype.
        rows_like: optional `(C, ...)` variable whose rows the new `(C,
            ...)` variable's rows follow: when `rows_like` is sharded over
            classes (`keras.distribution.ModelParallel`), each device holds
            the state of its own rows (`backend.rows_layout`).
    """
    layout = None if rows_like is None else backend.rows_layout(rows_like, shape)
    with keras.name_scope(layer.name, caller=layer):
        return keras.Variable(
            initializer="zeros",
            shape=shape,
            dtype=dtype,
            trainable=False,
            autocast=False,
            name=name,
            layout=layout,
        )


class RowSparseOptimizer:
    """Applies a Keras optimizer's update to the touched rows of a head.

    Holds no variables itself: the head owns all of its row-sparse state
    (the optimizer slots stacked per parameter, `(C, num_slots, d)` and
    `(C, num_slots)`, a step counter, a learning-rate mirror and a `(C,)`
    scratch of group leaders), created by `head.row_sparse_slot` (the
    `(C, ...)` ones split over devices like the kernel), so it is
    saved, restored and, on JAX, threaded through the compiled step with
    the head's other non-trainable weights, the way `BatchNormalization`
    keeps its statistics. Only those variables and the head's kernel and
    bias are written.

    The learning rate is the optimizer's at every step: a schedule is
    evaluated at the head's step counter; a float learning rate is read
    from the optimizer's variable in the step on TensorFlow and PyTorch,
    and from the head's mirror on JAX (whose compiled step sees only model
    state), which `keras_dis.Distiller.fit` refreshes before every batch.

    Args:
        optimizer: a `keras.optimizers.SGD`, `Adam` or `RMSprop` (or a
            `LossScaleOptimizer` around one); its hyperparameters and
            learning rate (or schedule) are used.
        head: the `SampledDistillationHead` whose kernel and bias to update.
        remedy: passed to `check_optimizer`.
    """

    def __init__(self, optimizer, head, remedy=DISTILLER_REMEDY):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # The head's update uses the unscaled, closed-form gradient.
            optimizer = optimizer.inner_optimizer
        check_optimizer(optimizer, remedy)
        self.optimizer = optimizer
        self.head = head
        self.parameters = [head.kernel] + ([head.bias] if head.use_bias else [])
        self.slot_names = _slot_names(optimizer)
        # The slots of a parameter are stacked, `(C, num_slots, ...)`, so a
        # step reads and writes all of a row's state at once.
        self.slots = [
            head.row_sparse_slot(
                f"{parameter.name}_{'_'.join(self.slot_names)}",
                (parameter.shape[0], len(self.slot_names))
                + tuple(parameter.shape[1:]),
                rows_like=parameter,
            )
            if self.slot_names
            else None
            for parameter in self.parameters
        ]
        self.step = head.row_sparse_slot("row_sparse_step", ())
        self.group_leaders = head.row_sparse_slot(
            "row_sparse_group_leaders",
            (head.num_classes,),
            dtype="int32",
            rows_like=head.kernel,
        )
        self.learning_rate_value = head.row_sparse_slot(
            "row_sparse_learning_rate", ()
        )
        self.sync_learning_rate()

    def sync_learning_rate(self):
        """Copies a float learning rate of the optimizer into the mirror
        that the JAX step reads."""
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
        for slots in self.slots:
            if slots is not None:
                slots.assign(ops.zeros(slots.shape))

    def learning_rate(self, step):
        if self._has_schedule():
            return ops.cast(self.optimizer._learning_rate(step - 1), "float32")
        if backend.READS_OPTIMIZER_VARIABLES_IN_STEP:
            return ops.cast(self.optimizer.learning_rate, "float32")
        return self.learning_rate_value.value

    def apply(self, classes, logit_gradients, features, rows, valid=True):
        """Updates the rows of `classes` given the loss's logit gradients.

        Args:
            classes: int tensor `(batch, n)`, the classes whose logits the
                loss used.
            logit_gradients: float tensor `(batch, n)`, the derivative of
                the (reduced) loss with respect to each of those logits.
            features: float tensor `(batch, d)`, the head's input.
            rows: the `(kernel_rows, bias_rows)` the logits were computed
                from (`head.gather_rows(classes)`), reused here, or None
                when they came from all logits (`head.subset_logits`: then
                every row is updated at once and no rows are needed).
            valid: bool scalar tensor, whether the step may update at all
                (its inputs passed their checks). The update is also
                skipped when the features or gradients are not finite (an
                overflow under mixed precision, which makes the
                `LossScaleOptimizer` skip the step too): the rows, their
                state and the step counter are then left as they were.

        Does nothing while the head is frozen (`head.trainable = False`;
        as for any Keras layer, recompile the train function after changing
        it).
        """
        if not self.head.trainable:
            return
        features = ops.cast(ops.stop_gradient(features), "float32")
        logit_gradients = ops.stop_gradient(logit_gradients)
        valid = ops.logical_and(
            ops.logical_and(valid, ops.all(ops.isfinite(features))),
            ops.all(ops.isfinite(logit_gradients)),
        )
        step = self.step.value + ops.cast(valid, "float32")
        self.step.assign(step)
        learning_rate = self.learning_rate(ops.maximum(step, 1.0))
        if updates_every_row(classes.shape, self.head.num_classes):
            self._update_every_row(
                classes, logit_gradients, features, valid, step, learning_rate
            )
            return
        shards = backend.row_shards(self.head.kernel)
        if shards is not None:
            self._update_row_shards(
                shards, classes, logit_gradients, features, valid, step,
                learning_rate,
            )
            return
        classes = ops.reshape(ops.cast(classes, "int32"), (-1,))
        entry_gradients = self._entry_gradients(logit_gradients, features)
        leaders = group_leaders(classes, self.group_leaders)
        gradients = [sum_groups(g, leaders) for g in entry_gradients]
        for parameter, slots, gradient, parameter_rows in zip(
            self.parameters, self.slots, gradients, rows
        ):
            parameter_rows = ops.reshape(
                ops.stop_gradient(parameter_rows),
                (-1,) + tuple(parameter.shape[1:]),
            )
            slot_rows = (
                backend.take_rows(slots.value, classes)
                if slots is not None
                else None
            )
            new_rows, new_slot_rows = self._gated_update(
                parameter_rows, slot_rows, gradient, valid, step, learning_rate
            )
            backend.scatter_rows(parameter, classes, new_rows)
            if slots is not None:
                backend.scatter_rows(slots, classes, new_slot_rows)

    def _gated_update(
        self, rows, slot_rows, gradient, valid, step, learning_rate
    ):
        """The optimizer's update of some rows and their stacked slot rows
        (None without slots), or the rows unchanged when not `valid`."""
        new_rows, new_slots = update_rows(
            self.optimizer,
            rows,
            gradient,
            self._split_slots(slot_rows),
            step,
            learning_rate,
        )
        new_rows = backend.select(valid, new_rows, rows)
        if slot_rows is None:
            return new_rows, None
        return new_rows, backend.select(
            valid, self._stack_slots(new_slots), slot_rows
        )

    def _update_every_row(
        self, classes, logit_gradients, features, valid, step, learning_rate
    ):
        """The same lazy update, computed for all `C` rows at once; rows no
        entry touched keep their values and state."""
        num_classes = self.head.num_classes
        batch_size = ops.shape(classes)[0]
        classes = ops.cast(classes, "int32")
        flat_classes = ops.reshape(classes, (-1,))
        touched = backend.segment_sum(
            ops.ones_like(flat_classes, "float32"), flat_classes, num_classes
        )
        touched = ops.logical_and(touched > 0, valid)
        if sampled_softmax.computes_every_class(num_classes, classes.shape):
            # The logit gradients summed per sample and class, `(batch, C)`,
            # times the features: one small matmul.
            class_gradients = sampled_softmax.sum_per_sample_and_class(
                logit_gradients,
                sampled_softmax.sample_class_indices(
                    classes, num_classes, batch_size
                ),
                num_classes,
                batch_size,
            )
            gradients = [ops.matmul(ops.transpose(class_gradients), features)]
            if self.head.use_bias:
                gradients.append(ops.sum(class_gradients, axis=0))
        else:
            gradients = [
                backend.segment_sum(g, flat_classes, num_classes)
                for g in self._entry_gradients(logit_gradients, features)
            ]
        for parameter, slots, gradient in zip(
            self.parameters, self.slots, gradients
        ):
            values = ops.stop_gradient(parameter.value)
            slot_values = None if slots is None else slots.value
            new_values, new_slots = update_rows(
                self.optimizer,
                values,
                gradient,
                self._split_slots(slot_values),
                step,
                learning_rate,
            )
            parameter.assign(_where_rows(touched, new_values, values))
            if slots is not None:
                slots.assign(
                    _where_rows(
                        touched, self._stack_slots(new_slots), slot_values
                    )
                )

    def _update_row_shards(
        self, shards, classes, logit_gradients, features, valid, step,
        learning_rate,
    ):
        """The same lazy update when the head's rows are split over devices
        (`keras.distribution`): every device gets the batch's entries
        (class ids, logit gradients, features: `O(batch * (n + d))` bytes)
        and updates the rows it holds, in place; no row, state or gradient
        of another device's classes crosses devices."""

        def update_local_rows(offset, local_rows, entries):
            parameters, slots, scratch = local_rows
            classes, logit_gradients, features, valid, step, learning_rate = (
                entries
            )
            num_rows = scratch.shape[0]
            index = classes - offset
            mine = ops.logical_and(index >= 0, index < num_rows)
            # Entries of other devices' classes are read at row 0 (and
            # masked) and written nowhere (out of range: dropped); each is
            # its own group.
            read_index = ops.where(mine, index, 0)
            write_index = ops.where(mine, index, num_rows)
            positions = ops.arange(ops.shape(classes)[0], dtype="int32")
            scratch = backend.write_rows(scratch, write_index, positions)
            leaders = ops.where(
                mine, backend.take_rows(scratch, read_index), positions
            )
            gradients = [
                sum_groups(g, leaders)
                for g in self._entry_gradients(logit_gradients, features)
            ]
            new_parameters, new_slots = [], []
            for parameter, parameter_slots, gradient in zip(
                parameters, slots, gradients
            ):
                slot_rows = (
                    None
                    if parameter_slots is None
                    else backend.take_rows(parameter_slots, read_index)
                )
                new_rows, new_slot_rows = self._gated_update(
                    backend.take_rows(parameter, read_index),
                    slot_rows, gradient, valid, step, learning_rate,
                )
                new_parameters.append(
                    backend.write_rows(parameter, write_index, new_rows)
                )
                new_slots.append(
                    None
                    if parameter_slots is None
                    else backend.write_rows(
                        parameter_slots, write_index, new_slot_rows
                    )
                )
            return new_parameters, new_slots, scratch

        # (parameters, their stacked slots or None, the group scratch).
        variables = [self.parameters, self.slots, self.group_leaders]
        new_values = backend.map_row_shards(
            update_local_rows,
            shards,
            keras.tree.map_structure(
                lambda variable: None if variable is None else variable.value,
                variables,
            ),
            [
                ops.reshape(ops.cast(classes, "int32"), (-1,)),
                logit_gradients, features, valid, step, learning_rate,
            ],
        )
        for variable, value in zip(
            keras.tree.flatten(variables), keras.tree.flatten(new_values)
        ):
            if variable is not None:
                variable.assign(value)

    def _entry_gradients(self, logit_gradients, features):
        """Each entry's gradients of the kernel (and bias) rows, flat:
        d loss / d kernel[c] is the sum over the entries of class c of
        `g * features`."""
        gradients = [
            ops.reshape(
                logit_gradients[:, :, None] * features[:, None, :],
                (-1, features.shape[-1]),
            )
        ]
        if self.head.use_bias:
            gradients.append(ops.reshape(logit_gradients, (-1,)))
        return gradients

    def _split_slots(self, slot_rows):
        """`{slot name: rows}` from the stacked `(n, num_slots, ...)` rows."""
        return {name: slot_rows[:, i] for i, name in enumerate(self.slot_names)}

    def _stack_slots(self, slots):
        """The stacked `(n, num_slots, ...)` rows of `{slot name: rows}`."""
        return ops.stack([slots[name] for name in self.slot_names], axis=1)
