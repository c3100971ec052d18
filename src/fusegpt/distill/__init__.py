"""Group-level distillation: windows, losses, schedule, trainer."""

from .losses import LOSSES, get_loss, register_loss
from .schedule import cosine_factor
from .trainer import ParamGroup, TrainResult, TrainSettings, group_loss, train_group
from .window import group_window

__all__ = [
    "LOSSES", "ParamGroup", "TrainResult", "TrainSettings", "cosine_factor", "get_loss", "group_loss",
    "group_window", "register_loss", "train_group",
]
