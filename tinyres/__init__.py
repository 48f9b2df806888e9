"""tinyres: a small reverse-mode autograd engine on NumPy/CuPy that trains the CIFAR-10 ResNets."""

import numpy as np

from . import cuda, graph, models, nn, ops, optim  # ops gives Tensor its operators and methods
from .backend import cuda_available, get_array_module, normalize_device
from .checkpoint import load, load_checkpoint, save, save_checkpoint
from .gradcheck import gradcheck
from .kernels import get_num_threads, set_num_threads
from .ops import (
    amax,
    amin,
    argmax,
    argmin,
    cat,
    clone,
    concatenate,
    exp,
    flatten,
    log,
    matmul,
    max,
    mean,
    min,
    permute,
    relu,
    reshape,
    softmax,
    squeeze,
    stack,
    sum,
    transpose,
    unsqueeze,
)
from .tensor import (
    Tensor,
    arange,
    as_tensor,
    enable_grad,
    float32,
    float64,
    from_numpy,
    inference_mode,
    int32,
    int64,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    ones_like,
    randn,
    set_grad_enabled,
    tensor,
    uint8,
    zeros,
    zeros_like,
)

float, double, long, bool = float32, float64, int64, np.dtype("bool")  # PyTorch's other names for them


def device(name: str) -> str:
    """'cpu' or 'cuda' from 'cpu', 'cuda', 'cuda:0': a device is named by a string, as `torch.device(name)`."""
    return normalize_device(name)


__version__ = "0.1.0"

__all__ = [
    "Tensor", "amax", "amin", "arange", "argmax", "argmin", "as_tensor", "bool", "cat", "clone", "concatenate", "cuda",
    "cuda_available", "device", "double", "enable_grad", "exp", "flatten", "float", "float32", "float64",
    "from_numpy", "get_array_module", "get_num_threads", "gradcheck", "graph", "inference_mode", "int32", "int64",
    "is_grad_enabled", "load", "load_checkpoint", "log", "long", "manual_seed", "matmul", "max", "mean", "min",
    "models", "nn", "no_grad", "ones", "ones_like", "ops", "optim", "permute", "randn", "relu", "reshape", "save",
    "save_checkpoint", "set_grad_enabled", "set_num_threads", "softmax", "squeeze", "stack", "sum", "tensor",
    "transpose", "uint8", "unsqueeze", "zeros", "zeros_like",
]
