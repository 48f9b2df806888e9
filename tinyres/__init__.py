"""tinyres: a small reverse-mode autograd engine on NumPy/CuPy that trains the CIFAR-10 ResNets."""

from . import models, nn, optim
from .autograd import gradcheck
from .backend import cuda_available, get_array_module
from .checkpoint import load_checkpoint, save_checkpoint
from .nn.init import manual_seed
from .tensor import (
    Tensor,
    amax,
    as_tensor,
    cat,
    concatenate,
    exp,
    flatten,
    is_grad_enabled,
    log,
    matmul,
    max,
    mean,
    no_grad,
    ones,
    permute,
    reshape,
    stack,
    sum,
    tensor,
    transpose,
    zeros,
)

__version__ = "0.1.0"

__all__ = [
    "Tensor", "amax", "as_tensor", "cat", "concatenate", "cuda_available", "exp", "flatten",
    "get_array_module", "gradcheck", "is_grad_enabled", "load_checkpoint", "log", "manual_seed",
    "matmul", "max", "mean", "models", "nn", "no_grad", "ones", "optim", "permute", "reshape",
    "save_checkpoint", "stack", "sum", "tensor", "transpose", "zeros",
]
