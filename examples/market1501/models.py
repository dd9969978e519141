"""The Market-1501 teacher (ResNet152) and student (ResNet18).

Both are a `keras_cv.models.ResNetBackbone` (v1) built from its constructor
(keras-cv ships no ImageNet weights for these two depths; pass backbone
weights saved with `backbone.save_weights(...)` instead), global average
pooling, then a classifier over the training identities: a dense layer of
logits for the teacher, a `keras_dis.SampledDistillationHead` for the
student. The pooled features are what re-identification compares.

The models take raw pixel values and standardise them with a
`keras.layers.Normalization` holding the training set's per-channel mean and
variance, so a saved teacher needs no preprocessing.
"""

import keras
import keras_cv
from keras import layers

import keras_dis

# `keras_cv.models.ResNetBackbone` arguments of the two networks.
RESNET18 = {
    "stackwise_filters": [64, 128, 256, 512],
    "stackwise_blocks": [2, 2, 2, 2],
    "stackwise_strides": [1, 2, 2, 2],
    "block_type": "basic_block",
}
RESNET152 = {
    "stackwise_filters": [64, 128, 256, 512],
    "stackwise_blocks": [3, 8, 36, 3],
    "stackwise_strides": [1, 2, 2, 2],
    "block_type": "block",
}
# One stage of one block each, for `--smoke`. The stem of a ResNetBackbone
# always has 64 filters, and a first stage of basic blocks must match it.
SMOKE_RESNET18 = {
    "stackwise_filters": [64],
    "stackwise_blocks": [1],
    "stackwise_strides": [1],
    "block_type": "basic_block",
}
SMOKE_RESNET152 = {
    "stackwise_filters": [8],
    "stackwise_blocks": [1],
    "stackwise_strides": [1],
    "block_type": "block",
}


def resnet_classifier(
    backbone_config,
    classifier,
    image_size,
    mean,
    variance,
    backbone_weights=None,
    dropout_rate=0.0,
    name=None,
):
    """A ResNet backbone, global average pooling and a classifier.

    Args:
        backbone_config: dict of `keras_cv.models.ResNetBackbone`
            arguments, e.g. `RESNET18`.
        classifier: the last layer, called on the pooled features: a
            `keras.layers.Dense` (teacher) or a
            `keras_dis.SampledDistillationHead` (student).
        image_size: `(height, width)` of the input images.
        mean: per-channel mean of the training pixels (3 floats).
        variance: per-channel variance of the training pixels.
        backbone_weights: optional path of a `.weights.h5` file saved from
            a `ResNetBackbone` with the same configuration.
        dropout_rate: float, dropout on the pooled features in training.
        name: name of the model.

    Returns:
        A `keras.Model` from raw pixels `(batch, height, width, 3)` to the
        classifier's output.
    """
    inputs = keras.Input((*image_size, 3), name="images")
    x = layers.Normalization(axis=-1, mean=mean, variance=variance)(inputs)
    backbone = keras_cv.models.ResNetBackbone(
        **backbone_config, include_rescaling=False, input_shape=(*image_size, 3)
    )
    if backbone_weights:
        backbone.load_weights(backbone_weights)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pooled_features")(x)
    if dropout_rate:
        x = layers.Dropout(dropout_rate, name="dropout")(x)
    return keras.Model(inputs, classifier(x), name=name)


def teacher(config, num_ids, image_size, mean, variance, backbone_weights=None):
    """The teacher: a ResNet (ResNet152 by default) with a dense classifier."""
    return resnet_classifier(
        config,
        layers.Dense(num_ids, name="logits"),
        image_size,
        mean,
        variance,
        backbone_weights=backbone_weights,
        name="ResNet152" if config == RESNET152 else "ResNet_smoke_teacher",
    )


def student(
    config,
    num_ids,
    image_size,
    mean,
    variance,
    backbone_weights=None,
    dropout_rate=0.0,
    seed=None,
):
    """The student: a ResNet (ResNet18 by default) with the sampled head."""
    return resnet_classifier(
        config,
        keras_dis.SampledDistillationHead(num_ids, seed=seed, name="head"),
        image_size,
        mean,
        variance,
        backbone_weights=backbone_weights,
        dropout_rate=dropout_rate,
        name="ResNet18" if config == RESNET18 else "ResNet_smoke_student",
    )
