"""The model zoo: importing this package registers every model by name."""

from models import mlp  # noqa: F401
from models import cnn, resnet, transformer  # noqa: F401
