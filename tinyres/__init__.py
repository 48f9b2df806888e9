"""tinyres: a small reverse-mode autograd engine on NumPy/CuPy that trains the CIFAR-10 ResNets."""

import numpy as np

from . import cuda, distributed, graph, models, nn, ops, optim  # ops gives Tensor its operators and methods
from .backend import cuda_available, get_array_module, normalize_device
from .checkpoint import load, load_checkpoint, save, save_checkpoint
from .gradcheck import gradcheck
from .kernels import get_num_threads, set_num_threads
from .leftout import module_getattr
from .ops import (
    amax,
    amin,
    argmax,
    argmin,
    cat,
    clone,
    concatenate,
    exp,
    expand,
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
    topk,
    transpose,
    unsqueeze,
)
from .tensor import (
    Tensor,
    arange,
    as_tensor,
    empty,
    enable_grad,
    float32,
    float64,
    from_numpy,
    full,
    inference_mode,
    int32,
    int64,
    is_grad_enabled,
    manual_seed,
    no_grad,
    ones,
    ones_like,
    rand,
    randint,
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
    "Tensor", "amax", "amin", "arange", "argmax", "argmin", "as_tensor", "bool", "cat", "clone", "concatenate",
    "cuda", "cuda_available", "device", "distributed", "double", "empty", "enable_grad", "exp", "expand", "flatten",
    "float", "float32", "float64", "from_numpy", "full", "get_array_module", "get_num_threads", "gradcheck", "graph",
    "inference_mode", "int32", "int64", "is_grad_enabled", "load", "load_checkpoint", "log", "long", "manual_seed",
    "matmul", "max", "mean", "min", "models", "nn", "no_grad", "ones", "ones_like", "ops", "optim", "permute", "rand",
    "randint", "randn", "relu", "reshape", "save", "save_checkpoint", "set_grad_enabled", "set_num_threads",
    "softmax", "squeeze", "stack", "sum", "tensor", "topk", "transpose", "uint8", "unsqueeze", "zeros", "zeros_like",
]


# what a PyTorch script may reach for at the top level that tinyres leaves out, and what to use instead
LEFT_OUT = {
    "utils": "for data, tinyres.data.DataLoader(images, labels, batch_size=128, shuffle=True) gives batches of "
             "arrays; wrap them with tinyres.tensor",
    "backends": "there is no cuDNN to configure: drop the line (torch.backends.cudnn.benchmark = ...)",
    "float16": "float16 is left out: train in float32", "half": "float16 is left out: train in float32",
    "bfloat16": "bfloat16 is left out: train in float32",
    "autograd": "autograd.grad and higher-order gradients are left out: call .backward() and read .grad",
    "compile": "there is no compiler: call the model directly", "jit": "there is no JIT: call the model directly",
    "amp": "mixed precision is left out: train in float32",
}


__getattr__ = module_getattr("tinyres", LEFT_OUT)
