"""Optimizers and learning-rate schedules, as `torch.optim`.

`SGD` follows PyTorch's formulation exactly. The schedules (`tinyres.optim.lr_scheduler`) are
stepped once per training iteration (not per epoch), as the paper counts: ResNet training
divides the learning rate by 10 at 32k and 48k iterations, and ResNet-110 warms up at 0.01
until the training error falls below 80%; `OneCycleLR` and `CosineAnnealingLR` give the
shorter schedules found after the paper.
"""

from . import lr_scheduler
from .lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, OneCycleLR, SequentialLR, WarmupLR
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["SGD", "CosineAnnealingLR", "LRScheduler", "LinearLR", "MultiStepLR", "OneCycleLR", "Optimizer",
           "SequentialLR", "WarmupLR", "lr_scheduler"]
