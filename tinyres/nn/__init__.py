"""Neural-network building blocks, as `torch.nn`."""

from ..leftout import module_getattr
from . import functional, init, parallel
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
)
from .modules import Identity, Module, ModuleDict, ModuleList, Parameter, RemovableHandle, Sequential
from .parallel import SyncBatchNorm

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Flatten",
    "Identity",
    "Linear",
    "MaxPool2d",
    "Module",
    "ModuleDict",
    "ModuleList",
    "Parameter",
    "ReLU",
    "RemovableHandle",
    "Sequential",
    "SyncBatchNorm",
    "functional",
    "init",
    "parallel",
]

_PAPER = "the networks of He et al. (2015) do not use it, and tinyres has the layers they need"
# layers a PyTorch script may name that tinyres leaves out, and what to use instead
LEFT_OUT_LAYERS = {
    **dict.fromkeys(("Dropout", "Dropout2d", "Conv1d", "Conv3d", "ConvTranspose2d", "LSTM", "GRU", "RNN",
                     "Embedding", "LayerNorm", "GroupNorm", "InstanceNorm2d", "Upsample", "Sigmoid", "Tanh",
                     "LeakyReLU", "GELU", "SiLU", "ELU"), _PAPER),
    "Softmax": "models output logits: use nn.functional.softmax(logits, dim=1) where probabilities are needed",
    "LogSoftmax": "models output logits: use nn.functional.log_softmax, or nn.CrossEntropyLoss on the logits",
    "NLLLoss": "use nn.CrossEntropyLoss (or nn.functional.cross_entropy) on the logits",
    "MSELoss": "write ((output - target) ** 2).mean()",
    "DataParallel": "one process driving several devices is left out: run one process per device with mpiexec "
                    "and nn.parallel.DistributedDataParallel",
    "DistributedDataParallel": "as in PyTorch, it is nn.parallel.DistributedDataParallel (processes joined by MPI)",
}


__getattr__ = module_getattr("tinyres.nn", LEFT_OUT_LAYERS)
