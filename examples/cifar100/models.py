"""The CIFAR-100 teacher (ResNet32) and students (shallow CNN, LeNet).

Every model takes raw pixel values `(batch, 32, 32, 3)` and standardises
them itself with a `keras.layers.Normalization` holding the training set's
per-channel mean and variance, so a saved teacher needs no preprocessing.
The teacher returns logits; the students end in a
`keras_dis.SampledDistillationHead` (full logits at inference).
"""

import keras
from keras import layers

import keras_dis

INPUT_SHAPE = (32, 32, 3)


def _normalized_inputs(mean, variance):
    inputs = keras.Input(INPUT_SHAPE, name="images")
    return inputs, layers.Normalization(axis=-1, mean=mean, variance=variance)(
        inputs
    )


def _basic_block(x, filters, strides, name):
    """Two 3x3 convolutions and a shortcut, as in He et al. (2016)."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        # A 1x1 projection where the shape changes (the paper's "option B").
        shortcut = layers.Conv2D(
            filters, 1, strides=strides, use_bias=False, name=f"{name}_proj"
        )(x)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    x = layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv1",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = layers.ReLU(name=f"{name}_relu1")(x)
    x = layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv2",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


def resnet32(
    num_classes, mean, variance, filters=(16, 32, 64), blocks_per_stage=5
):
    """The CIFAR ResNet of He et al. (2016): `6n + 2` layers, here `n = 5`.

    A 3x3 convolution with 16 filters, then three stages of
    `blocks_per_stage` basic blocks with 16, 32 and 64 filters (the second
    and third stages start with stride 2), global average pooling and a
    dense layer of logits. Shortcuts that change shape are 1x1
    convolutions.

    Args:
        num_classes: int, 100 for CIFAR-100.
        mean: per-channel mean of the training pixels (3 floats).
        variance: per-channel variance of the training pixels.
        filters: filters of the three stages.
        blocks_per_stage: basic blocks per stage (5 for ResNet32).

    Returns:
        A `keras.Model` returning logits `(batch, num_classes)`.
    """
    inputs, x = _normalized_inputs(mean, variance)
    x = layers.Conv2D(
        filters[0],
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name="stem_conv",
    )(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, stage_filters in enumerate(filters):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(
                x,
                stage_filters,
                strides,
                name=f"stage{stage + 1}_block{block + 1}",
            )
    x = layers.GlobalAveragePooling2D(name="pooled_features")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    depth = 6 * blocks_per_stage + 2
    return keras.Model(inputs, outputs, name=f"ResNet{depth}")


def shallow_cnn(
    num_classes,
    mean,
    variance,
    conv_filters=32,
    bottleneck_units=1200,
    hidden_units=2048,
    seed=None,
):
    """The paper's shallow student (Sec. 4.3).

    One 5x5 convolution with 32 filters and stride 2 (ReLU), 2x2 max
    pooling, a 1200-d linear bottleneck, a 2048-d dense layer with ReLU,
    then the `keras_dis.SampledDistillationHead`.

    Args:
        num_classes: int.
        mean: per-channel mean of the training pixels.
        variance: per-channel variance of the training pixels.
        conv_filters: filters of the convolution.
        bottleneck_units: width of the linear bottleneck.
        hidden_units: width of the ReLU layer before the head.
        seed: seed of the head's class sampler.

    Returns:
        A `keras.Model`.
    """
    inputs, x = _normalized_inputs(mean, variance)
    x = layers.Conv2D(
        conv_filters,
        5,
        strides=2,
        padding="same",
        activation="relu",
        name="conv",
    )(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(bottleneck_units, name="bottleneck")(x)
    x = layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    outputs = keras_dis.SampledDistillationHead(
        num_classes, seed=seed, name="head"
    )(x)
    return keras.Model(inputs, outputs, name="shallow_cnn")


def lenet(num_classes, mean, variance, seed=None):
    """LeNet-5 (LeCun et al., 1998) on colour images, ReLU activations.

    Two 5x5 convolutions (6 and 16 filters, valid padding), each followed
    by 2x2 max pooling, dense layers of 120 and 84 units, then the
    `keras_dis.SampledDistillationHead`.

    Args:
        num_classes: int.
        mean: per-channel mean of the training pixels.
        variance: per-channel variance of the training pixels.
        seed: seed of the head's class sampler.

    Returns:
        A `keras.Model`.
    """
    inputs, x = _normalized_inputs(mean, variance)
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = keras_dis.SampledDistillationHead(
        num_classes, seed=seed, name="head"
    )(x)
    return keras.Model(inputs, outputs, name="lenet")
