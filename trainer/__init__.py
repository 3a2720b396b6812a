"""Mixed-precision training with TensorFlow custom loops (Keras 2 loss scaling, explicit)."""

from trainer.actions import PeriodicAction
from trainer.app import main, run
from trainer.config import TrainConfig
from trainer.errors import ConfigError, UserError
from trainer.registry import register_model
from trainer.trainer import Trainer

__all__ = ["main", "run", "PeriodicAction", "TrainConfig", "Trainer", "register_model",
           "UserError", "ConfigError"]
