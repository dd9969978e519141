"""`SampledDistillationHead`: the student's last layer, sampled in training."""

import keras
import numpy as np
from keras import ops

from keras_dis.src import backend
from keras_dis.src import input_checks
from keras_dis.src import proposals as proposals_module
from keras_dis.src import row_sparse_optimizers
from keras_dis.src import sampled_softmax
from keras_dis.src import sampled_step

_SEED_STATE_KEY = "seed_generator_state"
# Above this many kernel entries, fan-scaled initial values are generated
# in row blocks on the host, so initialisation needs no temporaries of the
# kernel's size (at C = 10^6, d = 512 that is 2 GB each).
_BLOCKWISE_INIT_MIN_SIZE = 2**24
_BLOCK_ROWS = 2**15
_OWN_OPTIMIZER_REMEDY = (
    "Leave `optimizer=None` to train the head with the model's optimizer."
)


def class_major_initial_kernel(initializer, shape, dtype):
    """Initial `(C, d)` kernel with the statistics a `Dense` kernel gets.

    A `Dense(C)` kernel has shape `(d, C)`: fan-in `d`, fan-out `C`. The
    head stores the transpose, so initialisers see the `Dense` shape and
    fan-based ones (Glorot, He, LeCun) keep their meaning.

    Args:
        initializer: a Keras initializer.
        shape: `(num_classes, features_dim)`.
        dtype: the variable's dtype.

    Returns:
        A tensor (or NumPy array, for large fan-scaled kernels) of `shape`.
    """
    num_classes, features_dim = shape
    if (
        num_classes * features_dim < _BLOCKWISE_INIT_MIN_SIZE
        or not isinstance(initializer, keras.initializers.VarianceScaling)
        # Keras creates a large variable split over devices by a compiled
        # initialiser, whose shards XLA generates on their devices.
        or backend.is_tracing()
    ):
        return ops.transpose(initializer((features_dim, num_classes), dtype))
    fan = {
        "fan_in": features_dim,
        "fan_out": num_classes,
        "fan_avg": (features_dim + num_classes) / 2,
    }[initializer.mode]
    stddev = np.sqrt(initializer.scale / fan)
    seed = initializer.seed if isinstance(initializer.seed, int) else None
    generator = np.random.default_rng(
        seed if seed is not None else np.random.randint(2**31)
    )
    kernel = np.empty(shape, dtype="float32")
    for start in range(0, num_classes, _BLOCK_ROWS):
        block_shape = (min(_BLOCK_ROWS, num_classes - start), features_dim)
        if initializer.distribution == "uniform":
            limit = np.sqrt(3.0) * stddev
            block = generator.uniform(-limit, limit, block_shape)
        else:
            block = generator.standard_normal(block_shape)
            if initializer.distribution == "truncated_normal":
                # Keras: normal truncated at 2 standard deviations, rescaled.
                outside = np.abs(block) > 2
                while outside.any():
                    block[outside] = generator.standard_normal(outside.sum())
                    outside = np.abs(block) > 2
                block = block * (stddev / 0.87962566103423978)
            else:
                block = block * stddev
        kernel[start : start + len(block)] = block
    return kernel


class ClassMajorKernelInitializer:
    """Initialises a head's kernel: `class_major_initial_kernel` for a
    Keras initializer (an object, not a closure: Keras compiles the
    `__call__` of the initialiser of a large variable split over devices).
    """

    def __init__(self, initializer):
        self.initializer = initializer

    def __call__(self, shape, dtype=None):
        return class_major_initial_kernel(self.initializer, shape, dtype)


@keras.saving.register_keras_serializable(package="keras_dis")
class SampledDistillationHead(keras.layers.Layer):
    """The student's classification layer, with logits computed on demand.

    Owns a class-major kernel of shape `(num_classes, features_dim)` (a row
    per class, cheap to gather) and a bias. At inference it is an ordinary
    dense classifier: it returns the full logits `(batch, num_classes)`, so a
    trained student needs nothing special.

    In training (`training=True`, as inside `fit`) it returns its input
    features, tagged with the head; the loss that follows
    (`keras_dis.DISLoss`, or the `keras_dis.Distiller`) then computes
    logits only for the classes it samples, by gathering their rows
    (`sampled_logits(features, classes)`): `O(batch * k * d)` work instead
    of `O(batch * C * d)`; `keras_dis.src.sampled_step` is that step. The
    head must therefore be the model's output, and its training output
    must go to a `DISLoss`: a layer after the head, another loss (e.g.
    `"sparse_categorical_crossentropy"`) or code that calls the model with
    `training=True` outside `fit` raise a `ValueError` that says so.

    Row-sparse training (`optimizer=`): given an SGD, Adam or RMSprop
    optimizer, the head trains its kernel and bias itself, lazily and row
    by row for the classes a step samples, with that optimizer's
    hyperparameters (see `keras_dis.src.row_sparse_optimizers`); the model's
    own optimizer then leaves them alone. This makes
    `student.compile(loss=keras_dis.DISLoss(k=10))` an `O(B * k * d)` step
    with no `C x d` gradient or optimizer update; the optimizer state is
    kept in non-trainable weights of the head and saved with it. The loss
    must then sample (`"dis"`, `"ftis"` or `"uniform"`). This optimizer
    is the head's own: callbacks that set the model optimizer's learning
    rate (`LearningRateScheduler`) do not reach it; give it a
    `keras.optimizers.schedules.LearningRateSchedule` instead. Without
    `optimizer=`, the model's optimizer trains the whole kernel (or a
    `keras_dis.Distiller` does it row by row).

    It also keeps the state of the DIS proposal as non-trainable weights,
    so it is saved with the model: `rank_proposal`, the probability of
    each teacher rank, and `right_scale`, the current second Laplace scale
    (annealed by `keras_dis.ProposalScheduler`), plus the sampler's seed;
    and the result of the last step's input checks (`input_error_code`,
    `input_error_value`; see `keras_dis.src.input_checks`).

    Args:
        num_classes: int, the number of classes `C`.
        use_bias: bool, whether to add a bias.
        kernel_initializer: initializer of the `(C, d)` kernel.
        bias_initializer: initializer of the bias.
        rank_proposal: a `keras_dis.proposals.LaplaceMixtureProposal`, the
            shape of the DIS proposal; defaults to the paper's scales in
            ranks (3 and 5).
        seed: optional int, seed of the class sampler.
        optimizer: optional `keras.optimizers.SGD`, `Adam` or `RMSprop` (or
            its name), with which the head trains its own rows (see above).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> head = SampledDistillationHead(num_classes=10)
    >>> features = np.ones((2, 4), "float32")
    >>> tuple(head(features).shape)
    (2, 10)
    >>> tuple(head.sampled_logits(features, np.array([[3, 1], [0, 9]])).shape)
    (2, 2)

    Row-sparse training of a plain model on packed teacher targets:

    ```python
    features = keras.Input((512,))
    head = keras_dis.SampledDistillationHead(10**6, optimizer="adam")
    student = keras.Model(features, head(features))
    student.compile(optimizer="adam", loss=keras_dis.DISLoss(k=20))
    student.fit(x, targets)  # targets from keras_dis.pack_teacher_targets
    ```
    """

    def __init__(
        self,
        num_classes,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        rank_proposal=None,
        seed=None,
        optimizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "`num_classes` must be an integer >= 2. "
                f"Received: num_classes={num_classes}"
            )
        if rank_proposal is None:
            rank_proposal = proposals_module.LaplaceMixtureProposal()
        elif isinstance(rank_proposal, dict):
            rank_proposal = keras.saving.deserialize_keras_object(rank_proposal)
        if not isinstance(rank_proposal, proposals_module.LaplaceMixtureProposal):
            raise ValueError(
                "`rank_proposal` must be a "
                "keras_dis.proposals.LaplaceMixtureProposal. "
                f"Received: rank_proposal={rank_proposal!r}"
            )
        self.num_classes = num_classes
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.rank_proposal_config = rank_proposal
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        if optimizer is not None:
            optimizer = keras.optimizers.get(optimizer)
            row_sparse_optimizers.check_optimizer(optimizer, _OWN_OPTIMIZER_REMEDY)
        self.optimizer = optimizer
        # Updates the kernel rows lazily: set in `build` with `optimizer=`,
        # else by `Distiller.compile` (`enable_row_sparse_updates`).
        self.row_sparse_optimizer = None
        self._row_sparse_slots = {}
        # Whether the last training output awaits its `DISLoss`.
        self._training_output_pending = False
        self.input_spec = keras.layers.InputSpec(ndim=2)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                "`SampledDistillationHead` expects features of shape "
                f"(batch, features_dim). Received: input_shape={input_shape}"
            )
        features_dim = input_shape[-1]
        try:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(self.num_classes, features_dim),
                initializer=ClassMajorKernelInitializer(
                    self.kernel_initializer
                ),
            )
            self.bias = (
                self.add_weight(
                    name="bias",
                    shape=(self.num_classes,),
                    initializer=self.bias_initializer,
                )
                if self.use_bias
                else None
            )
        except ValueError as error:
            if (
                keras.distribution is None  # PyTorch: no distribution API
                or keras.distribution.distribution() is None
            ):
                raise
            raise ValueError(
                f"SampledDistillationHead {self.name!r} cannot lay out its "
                f"({self.num_classes}, {features_dim}) kernel and its bias "
                "as the current keras.distribution asks: when the layout "
                "map splits the classes over a mesh axis, `num_classes` "
                "must be a multiple of that axis's size (pad it with "
                "classes that never occur). Received: "
                f"num_classes={self.num_classes}. ({error})"
            ) from error
        self.right_scale = self.add_weight(
            name="right_scale",
            shape=(),
            initializer=keras.initializers.Constant(
                self.rank_proposal_config.right_scale
            ),
            trainable=False,
            autocast=False,
        )
        self.rank_proposal = self.add_weight(
            name="rank_proposal",
            shape=(self.num_classes,),
            initializer=keras.initializers.Constant(
                self.rank_proposal_config.rank_probabilities(self.num_classes)
            ),
            trainable=False,
            autocast=False,
        )
        self.input_error_code = self.add_weight(
            name="input_error_code",
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
        )
        self.input_error_value = self.add_weight(
            name="input_error_value",
            shape=(),
            initializer="zeros",
            trainable=False,
            autocast=False,
        )
        if self.optimizer is not None:
            self.enable_row_sparse_updates(self.optimizer, _OWN_OPTIMIZER_REMEDY)

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.layers.Layer.trainable.fset(self, value)
        # Rows that the head's own optimizer trains stay out of the model
        # optimizer's reach when the layer is unfrozen.
        if getattr(self, "optimizer", None) is not None and self.built:
            self.kernel.trainable = False
            if self.use_bias:
                self.bias.trainable = False

    def enable_row_sparse_updates(self, optimizer, remedy=None):
        """Trains the kernel and bias row by row with `optimizer`'s update.

        The head creates (or, after a recompile, zeros) the optimizer state
        it needs as its own non-trainable weights, and its kernel and bias
        leave the model optimizer's trainable variables. `Distiller.compile`
        calls this with the distiller's optimizer; `optimizer=` at
        construction does it in `build`.

        Args:
            optimizer: a `keras.optimizers.SGD`, `Adam` or `RMSprop`.
            remedy: the sentence ending the error for another optimizer.
        """
        kwargs = {} if remedy is None else {"remedy": remedy}
        recompiled = bool(self._row_sparse_slots)
        self._tracker.unlock()
        try:
            self.row_sparse_optimizer = row_sparse_optimizers.RowSparseOptimizer(
                optimizer, self, **kwargs
            )
        finally:
            self._tracker.lock()
        if recompiled:
            self.row_sparse_optimizer.reset()
        self.kernel.trainable = False
        if self.use_bias:
            self.bias.trainable = False

    def disable_row_sparse_updates(self):
        """The model optimizer trains the kernel and bias again (densely)."""
        if self.optimizer is not None:
            return  # the head's own optimizer keeps its rows
        self.row_sparse_optimizer = None
        self.kernel.trainable = True
        if self.use_bias:
            self.bias.trainable = True

    def row_sparse_slot(self, name, shape, dtype="float32", rows_like=None):
        """The head's weight `name` for its row-sparse optimizer state,
        created (zeros, non-trainable) the first time it is asked for; a
        `(C, ...)` one given `rows_like` (the kernel or bias) is split over
        devices as that parameter is (see `row_sparse_optimizers.add_slot`).
        """
        if name not in self._row_sparse_slots:
            self._row_sparse_slots[name] = row_sparse_optimizers.add_slot(
                self, name, shape, dtype, rows_like=rows_like
            )
        return self._row_sparse_slots[name]

    def record_input_error(self, error_code, error_value):
        """Keeps the first input error of the steps since it was last raised
        (`raise_recorded_input_error`); 0 means none."""
        recorded = self.input_error_code.value
        keep = recorded != input_checks.OK
        self.input_error_code.assign(
            ops.where(keep, recorded, ops.cast(error_code, "int32"))
        )
        self.input_error_value.assign(
            ops.where(
                keep,
                self.input_error_value.value,
                ops.cast(error_value, "float32"),
            )
        )

    def raise_recorded_input_error(self):
        """Raises the `ValueError` of a recorded input error, once.

        Steps that cannot raise (JAX, XLA-compiled TensorFlow) record the
        error; the `Distiller` calls this after every batch, and Keras's
        collection of the model's metrics at the end of an epoch calls it
        on the plain path. Does nothing while the value cannot be read.
        """
        if not self.built or not backend.can_read_variables(
            self.input_error_code
        ):
            return
        code = int(ops.convert_to_numpy(self.input_error_code))
        if code != input_checks.OK:
            value = ops.convert_to_numpy(self.input_error_value)
            self.input_error_code.assign(input_checks.OK)
            self.input_error_value.assign(0.0)
            raise ValueError(
                input_checks.error_message(code, value, self.num_classes)
            )

    def claim_training_output(self, y_pred):
        """Whether `y_pred` is this head's training output; if so, it is
        consumed (the sampled step of `y_pred` is computed by the caller)."""
        if sampled_step.training_head(y_pred) is not self:
            return False
        self._training_output_pending = False
        return True

    @property
    def metrics(self):
        # Keras collects every layer's metrics after the loss of a train or
        # test step (and before fit and evaluate): the training output of
        # the head must have reached a `DISLoss` by then.
        if backend.after_step_loss():
            self._raise_if_output_unused()
        if backend.MAY_DEFER_INPUT_ERRORS:
            self.raise_recorded_input_error()
        return super().metrics

    def _raise_if_output_unused(self):
        if self._training_output_pending:
            self._training_output_pending = False
            raise ValueError(
                f"The training output of SampledDistillationHead "
                f"{self.name!r} was not used by a keras_dis.DISLoss. In "
                "training the head returns its input features, shape "
                f"(batch, {self.kernel.shape[-1]}), not logits, so that the "
                "loss computes logits for sampled classes only; another loss "
                "(e.g. 'sparse_categorical_crossentropy') would train on "
                "features as if they were logits. Compile the model with "
                "`loss=keras_dis.DISLoss(...)` (or train it with "
                "keras_dis.Distiller), and call it with `training=False` to "
                "get logits outside `fit`."
            )

    def set_right_scale(self, right_scale):
        """Sets the second Laplace scale and recomputes `rank_proposal`.

        Runs on the host (tensorflow-probability's NumPy substrate); call it
        between steps, as `ProposalScheduler` does once per epoch.
        """
        probabilities = self.rank_proposal_config.rank_probabilities(
            self.num_classes, right_scale=right_scale
        )
        self.right_scale.assign(float(right_scale))
        self.rank_proposal.assign(probabilities)

    def full_logits(self, features, kernel=None):
        """Logits of every class, `(batch, num_classes)` (from `kernel`, the
        head's by default)."""
        kernel = ops.cast(self.kernel if kernel is None else kernel, features.dtype)
        logits = ops.matmul(features, ops.transpose(kernel))
        if self.use_bias:
            logits = logits + ops.cast(self.bias, features.dtype)
        return logits

    def gather_rows(self, classes):
        """The kernel rows and biases of `classes`.

        Args:
            classes: int tensor `(batch, n)` of class ids.

        Returns:
            A tuple `(kernel_rows, bias_rows)` of shapes `(batch, n, d)` and
            `(batch, n)` (`bias_rows` is None without a bias).
        """
        kernel_rows = backend.take_rows(self.kernel, classes)
        bias_rows = (
            backend.take_rows(self.bias, classes) if self.use_bias else None
        )
        return kernel_rows, bias_rows

    def subset_logits(self, features, classes):
        """Logits of the classes of a sampled subset, and the rows used.

        With few classes (`sampled_softmax.computes_every_class`), all
        logits come from one matmul and the subset's are picked from them,
        which is cheaper than gathering `batch * n` rows; no rows are then
        returned. Neither are they when the kernel's rows are split over
        devices (`keras.distribution`): each device computes the logits of
        its own classes and the partial logits are summed.

        Args:
            features: float tensor `(batch, d)`.
            classes: int tensor `(batch, n)` of class ids.

        Returns:
            A tuple `(logits, rows)`: the `(batch, n)` logits, and the
            result of `gather_rows(classes)` or None.
        """
        if sampled_softmax.computes_every_class(self.num_classes, classes.shape):
            logits = self.full_logits(
                features, backend.stable_value(self.kernel)
            )
            logits = ops.take_along_axis(
                logits, ops.cast(classes, "int32"), axis=-1
            )
            return logits, None
        shards = backend.row_shards(self.kernel)
        if shards is not None:
            # Rows split over devices: partial logits summed across them.
            logits = backend.sharded_subset_logits(
                shards, self.kernel.value,
                self.bias.value if self.use_bias else None,
                features, classes,
            )
            return logits, None
        rows = self.gather_rows(classes)
        return self.sampled_logits(features, classes, rows), rows

    def sampled_logits(self, features, classes, rows=None):
        """Logits of the given classes only.

        Args:
            features: float tensor `(batch, d)`.
            classes: int tensor `(batch, n)` of class ids.
            rows: optional result of `gather_rows(classes)`, to reuse.

        Returns:
            Tensor `(batch, n)`: `features[b] . kernel[classes[b, j]] +
            bias[classes[b, j]]`, computed from `batch * n` gathered rows.
        """
        kernel_rows, bias_rows = self.gather_rows(classes) if rows is None else rows
        logits = ops.einsum(
            "bd,bnd->bn", features, ops.cast(kernel_rows, features.dtype)
        )
        if self.use_bias:
            logits = logits + ops.cast(bias_rows, features.dtype)
        return logits

    def call(self, inputs, training=None):
        self._raise_if_output_unused()
        if not training:
            return sampled_step.mark_logits(self, self.full_logits(inputs))
        consumers = [node.operation.name for node in self._outbound_nodes]
        if consumers:
            raise ValueError(
                f"SampledDistillationHead {self.name!r} feeds {consumers}: in "
                "training it returns its features for keras_dis.DISLoss, not "
                "logits, so it must be the model's output. Remove the layers "
                "after it (at inference the head returns logits: apply "
                "softmax to `model.predict(x)`), or use a "
                "keras.layers.Dense head."
            )
        self._training_output_pending = True
        return sampled_step.mark_training_output(self, inputs)

    def save_own_variables(self, store):
        # The sampler's random state is saved too, so a resumed run draws
        # the classes the uninterrupted run would have drawn.
        super().save_own_variables(store)
        store[_SEED_STATE_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        if _SEED_STATE_KEY in store.keys():
            self.seed_generator.state.assign(store[_SEED_STATE_KEY])
        variables = {
            key: store[key] for key in store.keys() if key != _SEED_STATE_KEY
        }
        if len(variables) > len(self.weights) and self.row_sparse_optimizer is None:
            raise ValueError(
                f"The saved SampledDistillationHead {self.name!r} holds "
                f"{len(variables)} variables, this one {len(self.weights)}: "
                "the saved head carries the state of its row-sparse "
                "optimizer, which the head creates when it is compiled. "
                "Call `distiller.compile(optimizer=...)` with the optimizer "
                "of the saved run before `load_weights`."
            )
        super().load_own_variables(variables)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "rank_proposal": keras.saving.serialize_keras_object(
                    self.rank_proposal_config
                ),
                "seed": self.seed,
                "optimizer": (
                    None
                    if self.optimizer is None
                    else keras.optimizers.serialize(self.optimizer)
                ),
            }
        )
        return config
