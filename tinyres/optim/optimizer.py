"""The optimizer base class, as `torch.optim.Optimizer`: one group of parameters and per-parameter state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..backend import device_of, is_cupy, to_device
from ..nn.modules import zero_grads
from ..statedict import as_array, refuse_if_errors
from ..tensor import Tensor

__all__ = ["Optimizer"]


class Optimizer:
    """Base class: one group of parameters with its hyperparameters, and per-parameter state."""

    def __init__(self, params: Iterable[Tensor], defaults: dict[str, Any]):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if any(isinstance(p, dict) for p in self.params):
            raise TypeError("parameter groups (dicts) are not supported: pass one list of parameters")
        # one group, in PyTorch's layout, so that `opt.param_groups[0]["lr"] = ...` works
        self.param_groups = [{"params": self.params, **defaults}]
        self.state: dict[int, dict[str, Any]] = {}  # parameter index -> arrays such as "momentum_buffer"
        self.initial_lr: float | None = None  # set by the first lr schedule, which all later ones start from

    @property
    def lr(self) -> float:
        """The learning rate (of the one parameter group)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = float(value)  # a Python float: a NumPy float64 would upcast float32 updates

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of all parameters (`.grad` = None, PyTorch's default), or zero them in place."""
        zero_grads(self.params, set_to_none)

    def step(self) -> None:
        """Update the parameters from their gradients."""
        raise NotImplementedError

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Parameter groups are left out: one optimizer holds one group."""
        raise TypeError(f"{type(self).__name__}.add_param_group: parameter groups are left out; give all parameters "
                        "to one optimizer, or make a second optimizer for the new ones")

    def param_state(self, i: int) -> dict[str, Any]:
        """The state of parameter `i`, its arrays moved to where the parameter now is.

        `Module.to(device)` moves the parameters but cannot see the optimizer, so the state
        follows lazily, here, on the next step.
        """
        state = self.state.setdefault(i, {})
        device = device_of(self.params[i].data)
        for k, v in state.items():
            if device_of(v) != device:
                state[k] = to_device(v, device)
        return state

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {name: NumPy array}}, "param_groups": [hyperparameters, "params": indices]}."""
        state = {i: {k: (v.get() if is_cupy(v) else v.copy()) for k, v in s.items()} for i, s in self.state.items()}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def state_dict_errors(self, state_dict: dict[str, Any]) -> list[str]:
        """The reasons `load_state_dict` would refuse `state_dict` (empty when it fits)."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or "state" not in state_dict:
            return ["optimizer state must have 'state' and exactly one entry in 'param_groups'"]
        errors = []
        own_keys = set(self.param_groups[0]) - {"params"}
        if set(groups[0]) - {"params"} != own_keys:
            errors.append(f"optimizer hyperparameters {sorted(set(groups[0]) - {'params'})} "
                          f"differ from {type(self).__name__}'s {sorted(own_keys)}")
        if len(groups[0].get("params", [])) != len(self.params):
            errors.append(f"optimizer state is for {len(groups[0].get('params', []))} parameters, "
                          f"this optimizer has {len(self.params)}")
        for i, s in state_dict["state"].items():
            i = int(i)
            if not 0 <= i < len(self.params):
                errors.append(f"optimizer state for parameter {i}, which does not exist")
                continue
            for k, v in s.items():
                shape = tuple(as_array(v).shape)
                if shape != self.params[i].shape:
                    errors.append(f"optimizer state {i}/{k}: expected shape {self.params[i].shape}, got {shape}")
        return errors

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and state (e.g. momentum buffers) from `state_dict`, checked first."""
        refuse_if_errors(self, self.state_dict_errors(state_dict))
        group = self.param_groups[0]
        for k, v in state_dict["param_groups"][0].items():
            if k != "params":
                group[k] = type(group[k])(v)  # keep Python floats and bools
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[int(i)] = {k: to_device(as_array(v), device_of(p.data)).astype(p.dtype) for k, v in s.items()}
