"""What a PyTorch script may name that tinyres leaves out: an error that says what to use instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["module_getattr"]


def module_getattr(module: str, left_out: dict[str, str]) -> Callable[[str], Any]:
    """A module's `__getattr__`: a name in `left_out` raises AttributeError with its advice, any other the usual one."""

    def __getattr__(name: str) -> Any:
        if name in left_out:
            raise AttributeError(f"{module} has no {name}: {left_out[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
