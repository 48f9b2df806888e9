"""Data-parallel training over the ranks of `tinyres.distributed`, as `torch.nn.parallel` and `nn.SyncBatchNorm`.

Each rank runs the model on its share of every batch. `DistributedDataParallel` starts every
rank from rank 0's weights and, after the backward pass, averages the gradients over the ranks,
so that every rank takes the same step. `SyncBatchNorm` normalizes with the statistics of all
the ranks' shares together: K ranks of 128/K images then compute what one process of 128 does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import distributed as dist
from ..backend import get_array_module
from ..tensor import Tensor
from . import functional as F
from .layers import BatchNorm2d, _BatchNorm
from .modules import IncompatibleKeys, Module

__all__ = ["DistributedDataParallel", "SyncBatchNorm"]


def _all_sum(a: Any) -> Any:
    """`a` summed over the ranks: batch norm's hook for the per-channel sums (see `F.batch_norm`)."""
    return dist.all_reduce(a, dist.ReduceOp.SUM)


class SyncBatchNorm(BatchNorm2d):
    """Batch normalization whose batch statistics, and their gradients, span every rank's batch."""

    def forward(self, x):
        if x.ndim != self.ndim:
            raise ValueError(f"SyncBatchNorm: expected a 4-D input, got shape {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training,
                            momentum=self.momentum, eps=self.eps,
                            all_sum=_all_sum if self.training and dist.get_world_size() > 1 else None)

    @classmethod
    def convert_sync_batchnorm(cls, module: Module) -> Module:
        """`module` with every BatchNorm2d in it replaced by a SyncBatchNorm holding the same parameters and buffers."""
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            if module.ndim != 4:
                raise ValueError(f"convert_sync_batchnorm: only BatchNorm2d is supported, got {type(module).__name__}")
            sync = cls(module.num_features, eps=module.eps, momentum=module.momentum)
            sync.weight, sync.bias = module.weight, module.bias  # the same Parameter objects
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.training = module.training
            return sync
        for name, child in list(module.named_children()):
            setattr(module, name, cls.convert_sync_batchnorm(child))
        return module


class DistributedDataParallel(Module):
    """`module` trained on every rank's share of the batch: weights from rank 0, gradients averaged.

    tinyres has no hooks inside the backward pass, so the training step calls `reduce_gradients()`
    between `loss.backward()` and `optimizer.step()` (PyTorch's DDP does it during the backward).
    The gradients travel in buckets of about `bucket_cap_mb` megabytes: a few large messages
    cost less than one per parameter. As in PyTorch, every training forward first copies rank 0's
    buffers (batch-norm running statistics) to all ranks. `state_dict` is the module's own
    (PyTorch's has a 'module.' prefix), so a checkpoint does not depend on the number of ranks.
    """

    def __init__(self, module: Module, bucket_cap_mb: float = 25.0, broadcast_buffers: bool = True):
        super().__init__()
        self.module = module
        self.broadcast_buffers = broadcast_buffers
        self.buckets = _buckets(list(module.parameters()), int(bucket_cap_mb * 2 ** 20))
        _broadcast_together([p.data for p in module.parameters()])
        self.sync_buffers()

    def forward(self, *inputs: Any) -> Any:
        if self.training and self.broadcast_buffers:
            self.sync_buffers()
        return self.module(*inputs)

    def sync_buffers(self) -> None:
        """Copy rank 0's buffers to every rank, in one message."""
        _broadcast_together(list(self.module.buffers()))

    def reduce_gradients(self, loss: Any = None) -> Any:
        """Replace each parameter's gradient by its mean over the ranks, one all-reduce per bucket;
        return the mean of the ranks' `loss` (a 0-d array, sent with the last bucket), if given."""
        k = dist.get_world_size()
        if k == 1:
            return loss
        for i, bucket in enumerate(self.buckets):
            xp = get_array_module(bucket[0].data)
            parts = [(p.grad.data if p.grad is not None else xp.zeros_like(p.data)).reshape(-1) for p in bucket]
            if loss is not None and i == len(self.buckets) - 1:
                parts.append(xp.asarray(loss, dtype=parts[0].dtype).reshape(1))
            flat = xp.concatenate(parts)
            dist.all_reduce(flat, dist.ReduceOp.SUM)
            flat /= flat.dtype.type(k)
            for p, g in zip(bucket, _split(flat, [p.data for p in bucket])):
                if p.grad is None:
                    p.grad = Tensor(g.copy())
                else:
                    p.grad.data[...] = g  # in place: the gradient keeps its memory layout
        return None if loss is None else flat[-1]

    # the checkpoint holds the module, whatever the number of ranks
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        return self.module.state_dict()

    def state_dict_errors(self, state: dict[str, Any], strict: bool = True) -> list[str]:
        return self.module.state_dict_errors(state, strict)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        return self.module.load_state_dict(state, strict)


def _buckets(params: list[Any], cap_bytes: int) -> list[list[Any]]:
    """`params` in consecutive groups of at most `cap_bytes` (a larger parameter makes a group alone)."""
    buckets: list[list[Any]] = []
    size = cap_bytes
    for p in params:
        if size + p.data.nbytes > cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.data.nbytes
    return buckets


def _split(flat: Any, like: list[Any]) -> Iterator[Any]:
    """Views of consecutive parts of the 1-D `flat`, shaped as each of `like`."""
    offset = 0
    for a in like:
        yield flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def _broadcast_together(arrays: list[Any]) -> None:
    """Overwrite `arrays` (all of one dtype and device) with rank 0's, in one message."""
    if dist.get_world_size() == 1 or not arrays:
        return
    xp = get_array_module(arrays[0])
    flat = dist.broadcast(xp.concatenate([a.reshape(-1) for a in arrays]), src=0)
    for a, part in zip(arrays, _split(flat, arrays)):
        a[...] = part
