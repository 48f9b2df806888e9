"""What every `load_state_dict` shares: the arrays inside a state dict's values, and the rule
that a state dict is checked in full before anything is changed."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import is_cupy
from .tensor import Tensor


def as_array(value: Any):
    """The array inside `value` (a Tensor, NumPy or CuPy array, or array-like)."""
    if isinstance(value, Tensor):
        return value.data
    return value if isinstance(value, np.ndarray) or is_cupy(value) else np.asarray(value)


def refuse_if_errors(owner: object, errors: list[str], error: type[Exception] = ValueError) -> None:
    """Raise `error` listing every problem `state_dict_errors` found, before `owner` is changed."""
    if errors:
        raise error(f"Error(s) in loading state_dict for {type(owner).__name__}:\n  " + "\n  ".join(errors))
