"""`Module` and `Parameter`, as `torch.nn`, with the containers `Sequential` and `Identity`.

A `Module` registers what is assigned to its attributes: a `Parameter` becomes one of its
parameters, a `Module` one of its children, and `register_buffer` adds state that is saved
but not trained (batch-norm running statistics, kept as plain NumPy or CuPy arrays). The
layers (`tinyres.nn.layers`) only hold parameters; the arithmetic is in `tinyres.nn.functional`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from ..backend import device_of, is_cupy, normalize_device, to_device
from ..statedict import as_array, refuse_if_errors
from ..tensor import Tensor

__all__ = ["Identity", "IncompatibleKeys", "Module", "ModuleDict", "ModuleList", "Parameter", "RemovableHandle",
           "Sequential", "zero_grads"]


class Parameter(Tensor):
    """A tensor that a `Module` trains: assigning one to a module attribute registers it."""

    def __init__(self, data: Any, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


def zero_grads(params: Iterable[Tensor], set_to_none: bool = True) -> None:
    """`.grad` = None for each of `params` (PyTorch's default), or its gradient zeroed in place."""
    for p in params:
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad.data[...] = 0


class IncompatibleKeys(NamedTuple):
    """What `load_state_dict(strict=False)` skipped, as PyTorch returns it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class RemovableHandle:
    """What `register_forward_hook` returns: `handle.remove()` takes the hook off again."""

    _next_id = 0

    def __init__(self, hooks: OrderedDict[int, Callable]):
        self.hooks = hooks
        self.id = RemovableHandle._next_id
        RemovableHandle._next_id += 1

    def remove(self) -> None:
        """Take the hook off its module (again is harmless)."""
        self.hooks.pop(self.id, None)


class Module:
    """Base class of layers and networks, as `torch.nn.Module`."""

    training: bool

    def __init__(self) -> None:
        # object.__setattr__: our own __setattr__ needs these dicts to exist already
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())
        object.__setattr__(self, "_forward_hooks", OrderedDict())

    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *inputs: Any) -> Any:
        for hook in list(self._forward_pre_hooks.values()):
            changed = hook(self, inputs)
            if changed is not None:
                inputs = changed if isinstance(changed, tuple) else (changed,)
        output = self.forward(*inputs)
        for hook in list(self._forward_hooks.values()):
            changed = hook(self, inputs, output)
            if changed is not None:
                output = changed
        return output

    def register_forward_pre_hook(self, hook: Callable[[Module, tuple], Any]) -> RemovableHandle:
        """Call `hook(module, inputs)` before each forward; a value it returns replaces the inputs."""
        handle = RemovableHandle(self._forward_pre_hooks)
        self._forward_pre_hooks[handle.id] = hook
        return handle

    def register_forward_hook(self, hook: Callable[[Module, tuple, Any], Any]) -> RemovableHandle:
        """Call `hook(module, inputs, output)` after each forward; a value it returns replaces the output."""
        handle = RemovableHandle(self._forward_hooks)
        self._forward_hooks[handle.id] = hook
        return handle

    # ---- registration ----------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() is called "
                                 f"(call super().__init__() first in {type(self).__name__}.__init__)")
        target = self._store_for(name, value)
        for store in (self.__dict__, self._parameters, self._buffers, self._modules):
            if store is not target:  # a name lives in one place; assigning again keeps its position
                store.pop(name, None)
        if target is self.__dict__:
            object.__setattr__(self, name, value)  # the usual way, so properties keep working
        else:
            target[name] = as_array(value) if target is self._buffers and value is not None else value

    def _store_for(self, name: str, value: Any) -> dict:
        if isinstance(value, Parameter):
            return self._parameters
        if isinstance(value, Module):
            return self._modules
        if name in self._buffers:
            return self._buffers
        return self.__dict__

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails, that is for registered names
        for store in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(store)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register `module` as the submodule `name` (as assigning it to the attribute does)."""
        setattr(self, name, module)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` as the parameter `name` (as assigning it to the attribute does)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be a Parameter, got {type(param).__name__}")
        setattr(self, name, param)

    def register_buffer(self, name: str, value: Any) -> None:
        """Add state that `state_dict` saves and `to` moves but that is not trained (an array)."""
        if name in self._parameters or name in self._modules:
            raise KeyError(f"register_buffer: {name!r} is already a parameter or submodule")
        self.__dict__.pop(name, None)
        self._buffers[name] = None if value is None else as_array(value)

    # ---- traversal ---------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted name, module) for this module and all below it, parents before children."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            children = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items()]
            stack.extend(reversed(children))  # so the first child comes out first

    def modules(self) -> Iterator[Module]:
        """This module and all below it."""
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """(name, module) for the direct submodules."""
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        """The direct submodules."""
        for _, m in self.named_children():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter), e.g. ('layer1.0.conv1.weight', ...); each parameter once."""
        seen: set[int] = set()
        for mod_name, m in self.named_modules(prefix) if recurse else [(prefix, self)]:
            for k, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{k}" if mod_name else k), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """All parameters, in the order of `named_parameters`."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Any]]:
        """(dotted name, array) for every buffer, e.g. ('bn1.running_mean', ...)."""
        for mod_name, m in self.named_modules(prefix) if recurse else [(prefix, self)]:
            for k, b in m._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{k}" if mod_name else k), b

    def buffers(self, recurse: bool = True) -> Iterator[Any]:
        """All buffers (arrays)."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call fn(m) on every submodule (children first) and on self; returns self."""
        for m in reversed(list(self.modules())):
            fn(m)
        return self

    # ---- mode, gradients, device -------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set training mode (batch norm uses batch statistics) here and below; returns self."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self) -> Module:
        """Set evaluation mode (batch norm uses running statistics); returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of all parameters (`.grad` = None, PyTorch's default), or zero them in place."""
        zero_grads(self.parameters(), set_to_none)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Set `requires_grad` of every parameter (False freezes them); returns self."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def to(self, device: Any = None, dtype: Any = None) -> Module:
        """Move all parameters and buffers to `device` ('cpu' or 'cuda') and/or convert their floats to `dtype`,
        in place; returns self. `model.to(tinyres.float64)` converts, as in PyTorch."""
        if isinstance(device, (type, np.dtype)):
            device, dtype = None, device
        if dtype is not None:
            self._cast(np.dtype(dtype))
        if device is None:
            return self
        device = normalize_device(device)
        for m in self.modules():
            for p in m._parameters.values():
                # the Parameter objects stay the same, so an optimizer holding them keeps working
                p.data = to_device(p.data, device)
                if p.grad is not None:
                    p.grad.data = to_device(p.grad.data, device)
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = to_device(b, device)
        return self

    def _cast(self, dtype: np.dtype) -> None:
        if dtype.kind != "f":
            raise TypeError(f"{type(self).__name__}.to: parameters must stay floating point, got {dtype}")
        for m in self.modules():
            for p in m._parameters.values():
                if p.dtype != dtype:  # the same Parameter objects: an optimizer keeps them
                    p.data, p.grad = p.data.astype(dtype), None
            for k, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[k] = b.astype(dtype)

    def float(self) -> Module:
        """Parameters and buffers in float32 (the training dtype), in place; returns self."""
        return self.to(dtype=np.float32)

    def double(self) -> Module:
        """Parameters and buffers in float64 (for gradient checks), in place; returns self."""
        return self.to(dtype=np.float64)

    def cpu(self) -> Module:
        """Move to the CPU in place; returns self."""
        return self.to("cpu")

    def cuda(self) -> Module:
        """Move to the GPU in place; returns self."""
        return self.to("cuda")

    # ---- state dict --------------------------------------------------------------------------
    def _state_items(self) -> Iterator[tuple[str, Any]]:
        """(dotted name, array) for every parameter and buffer, in PyTorch's order."""
        for mod_name, m in self.named_modules():
            dot = f"{mod_name}." if mod_name else ""
            for k, p in m._parameters.items():
                yield dot + k, p.data
            for k, b in m._buffers.items():
                if b is not None:
                    yield dot + k, b

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Name -> NumPy copy of every parameter and buffer (each module's parameters, then its buffers)."""
        return OrderedDict((name, a.get() if is_cupy(a) else a.copy()) for name, a in self._state_items())

    def state_dict_errors(self, state: dict[str, Any], strict: bool = True) -> list[str]:
        """The reasons `load_state_dict(state, strict)` would refuse `state` (empty when it fits)."""
        own = {name: tuple(a.shape) for name, a in self._state_items()}
        given = {name: tuple(as_array(v).shape) for name, v in state.items()}
        errors = []
        missing = [n for n in own if n not in given]
        unexpected = [n for n in given if n not in own]
        if strict and missing:
            errors.append("missing: " + ", ".join(f"{n} {own[n]}" for n in missing))
        if strict and unexpected:
            errors.append("unexpected: " + ", ".join(f"{n} {given[n]}" for n in unexpected))
        misshaped = [n for n in own if n in given and given[n] != own[n]]
        if misshaped:  # never allowed, strict or not: the copy could not be made
            errors.append("wrong shape: " + ", ".join(f"{n} expected {own[n]}, got {given[n]}" for n in misshaped))
        not_numbers = [n for n in own if n in state and as_array(state[n]).dtype.kind not in "biuf"]
        if not_numbers:
            errors.append("not numbers: " + ", ".join(f"{n} ({as_array(state[n]).dtype})" for n in not_numbers))
        return errors

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy arrays or Tensors from `state` into the parameters and buffers, in place.

        Every name and shape is checked before anything is copied, so a mismatch raises one
        error listing all problems and leaves the module untouched. Each value is converted
        to its parameter's dtype and device.
        """
        refuse_if_errors(self, self.state_dict_errors(state, strict), RuntimeError)
        own = dict(self._state_items())
        for name, a in own.items():
            if name in state:
                a[...] = to_device(as_array(state[name]), device_of(a))  # the assignment casts the dtype
        return IncompatibleKeys([n for n in own if n not in state], [n for n in state if n not in own])

    # ---- printing ----------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The layer's settings, shown inside the parentheses of its repr."""
        return ""

    def __repr__(self) -> str:
        lines = []
        for name, m in self.named_children():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        if not lines:
            return f"{type(self).__name__}({self.extra_repr()})"
        head = f"{type(self).__name__}({self.extra_repr()}" if self.extra_repr() else f"{type(self).__name__}("
        return head + "\n" + "\n".join(lines) + "\n)"


# ---- containers --------------------------------------------------------------------------

class Sequential(Module):
    """Modules applied one after another; indexable, iterable, with a length."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x

    def __getitem__(self, index: int | slice) -> Module:
        layers = list(self._modules.values())
        return Sequential(*layers[index]) if isinstance(index, slice) else layers[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, layer: Module) -> Sequential:
        """Add `layer` at the end; returns self."""
        setattr(self, str(len(self)), layer)
        return self


class ModuleList(Module):
    """A list of modules, registered so that `parameters()`, `state_dict()` and `to()` see them, as `nn.ModuleList`."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        self.extend(modules)

    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError("ModuleList has no forward(): call its modules in your own forward()")

    def _index(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ModuleList index {index} out of range for {len(self)} modules")
        return str(index % len(self))

    def __getitem__(self, index: int | slice) -> Module | ModuleList:
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index])
        return self._modules[self._index(index)]

    def __setitem__(self, index: int, module: Module) -> None:
        setattr(self, self._index(index), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> ModuleList:
        """Add `module` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, not {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        """Add each of `modules` at the end; returns self."""
        for m in modules:
            self.append(m)
        return self


class ModuleDict(Module):
    """Modules by name, registered as submodules, as `nn.ModuleDict`."""

    def __init__(self, modules: dict[str, Module] | None = None):
        super().__init__()
        for name, m in (modules or {}).items():
            self[name] = m

    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError("ModuleDict has no forward(): call its modules in your own forward()")

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict holds Modules, not {type(module).__name__} (key {name!r})")
        setattr(self, name, module)

    def __delitem__(self, name: str) -> None:
        del self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()


class Identity(Module):
    """Returns its input."""

    def forward(self, x):
        return x
