"""`tinyres.cuda.is_available()`, as `torch.cuda.is_available()`: whether `.to('cuda')` can be used."""

from .backend import cuda_available

__all__ = ["is_available"]


def is_available() -> bool:
    """Whether CuPy and a GPU that runs its kernels are present (see `tinyres.backend.gpu_status` for why not)."""
    return cuda_available()
