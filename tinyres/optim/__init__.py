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

# optimizers a PyTorch script may name that tinyres leaves out
LEFT_OUT = dict.fromkeys(("Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "LBFGS"),
                         "the paper trains with SGD with momentum, the one optimizer here: "
                         "optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)")


def __getattr__(name: str):
    if name in LEFT_OUT:
        raise AttributeError(f"tinyres.optim has no {name}: {LEFT_OUT[name]}")
    raise AttributeError(f"module 'tinyres.optim' has no attribute {name!r}")
