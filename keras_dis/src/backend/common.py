"""Host-side pieces shared by the backend modules."""

from keras import ops

from keras_dis.src import input_checks


def raise_if_error(error_code, error_value, num_classes):
    """Raises the `ValueError` of an input error code; nothing if `OK`."""
    error_code = int(ops.convert_to_numpy(error_code))
    if error_code != input_checks.OK:
        raise ValueError(
            input_checks.error_message(
                error_code, ops.convert_to_numpy(error_value), num_classes
            )
        )
