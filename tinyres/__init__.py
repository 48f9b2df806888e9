"""tinyres: a small reverse-mode autograd engine on NumPy/CuPy that trains the CIFAR-10 ResNets."""

from . import graph, models, nn, ops, optim  # ops gives Tensor its operators and methods
from .backend import cuda_available, get_array_module
from .checkpoint import load, load_checkpoint, save, save_checkpoint
from .gradcheck import gradcheck
from .kernels import get_num_threads, set_num_threads
from .ops import (
    amax,
    argmax,
    cat,
    concatenate,
    exp,
    flatten,
    log,
    matmul,
    max,
    mean,
    permute,
    relu,
    reshape,
    softmax,
    stack,
    sum,
    transpose,
)
from .tensor import (
    Tensor,
    as_tensor,
    from_numpy,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    ones_like,
    randn,
    tensor,
    zeros,
    zeros_like,
)

__version__ = "0.1.0"

__all__ = [
    "Tensor", "amax", "argmax", "as_tensor", "cat", "concatenate", "cuda_available", "exp", "flatten",
    "from_numpy", "get_array_module", "get_num_threads", "gradcheck", "graph", "is_grad_enabled", "load",
    "load_checkpoint", "log", "manual_seed", "matmul", "max", "mean", "models", "nn", "no_grad", "ones", "ones_like",
    "ops", "optim", "permute", "randn", "relu", "reshape", "save", "save_checkpoint", "set_num_threads", "softmax",
    "stack", "sum", "tensor", "transpose", "zeros", "zeros_like",
]
