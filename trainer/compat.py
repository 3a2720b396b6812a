"""The one place that picks the Keras 2 implementation.

Loss scaling in a custom loop needs Keras 2's ``LossScaleOptimizer.get_scaled_loss`` and
``get_unscaled_gradients``; Keras 3 removed both. Keras 2 is the ``tf_keras`` package on
TensorFlow >= 2.16 and the built-in ``tf.keras`` on TensorFlow 2.15 (the version Habana's
Gaudi bridge needs). Every other module imports ``keras`` from here, never directly.
"""

import importlib.util
import os

# Must be set before TensorFlow is imported so that `tf.keras` in user code is Keras 2 too.
# Only when tf_keras is installed: TF 2.15's tf.keras *is* Keras 2, and with this variable set
# it would look for the (absent) tf_keras package and fail to import.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

TF_VERSION = tuple(int(part) for part in tf.__version__.split(".")[:2])

if TF_VERSION >= (2, 16):
    try:
        import tf_keras as keras
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            f"TensorFlow {tf.__version__} ships Keras 3, which has no get_scaled_loss; install "
            f"Keras 2 with `pip install tf_keras~={tf.__version__.rsplit('.', 1)[0]}.0` "
            "(see BUILD.md)."
        ) from error
else:
    keras = tf.keras

mixed_precision = keras.mixed_precision

__all__ = ["tf", "keras", "mixed_precision", "TF_VERSION"]
