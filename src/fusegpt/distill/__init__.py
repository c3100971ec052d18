"""Group-level distillation: windows, losses, schedule, trainer."""

from .losses import LOSSES, LossHead, build_loss, get_loss, register_loss
from .schedule import cosine_factor, lr_factor
from .trainer import ParamGroup, TrainResult, TrainSettings, group_loss, train_group
from .window import group_window

__all__ = [
    "LOSSES", "LossHead", "ParamGroup", "TrainResult", "TrainSettings", "build_loss", "cosine_factor", "get_loss",
    "group_loss", "group_window", "lr_factor", "register_loss", "train_group",
]
