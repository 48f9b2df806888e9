"""Array kernels beneath the ops: layouts, im2col, chunking and threads. Arrays in, arrays out.

A first reading of tinyres can skip this module: `tinyres.ops` and `tinyres.nn.functional`
say what is computed; this module says how to compute it fast on NumPy (and plainly on CuPy).

- Layout. Images are NCHW, as in PyTorch, but convolution outputs are NCHW *views* of
  channels-last (NHWC) memory, and the elementwise kernels here keep the layout of their
  input. im2col then copies runs of `kernel_width * C` contiguous floats, a GEMM writes its
  output with no transpose, and batch norm reduces a plain (N*H*W, C) matrix.
- Chunks. A convolution builds its im2col columns a few images at a time, into scratch buffers
  allocated once, and runs the chunk's GEMM while the columns are still in cache; the columns of
  the whole batch (9x the input) are never held.
- Threads. `parallel_for` splits the batch (or the rows of a matrix) into one contiguous part per
  thread. NumPy releases the GIL in copies, ufuncs and BLAS calls, so the memory-bound passes run
  on every core, not only the GEMMs; BLAS itself is held to one thread so the two don't fight.
  Each part's partial sums are combined in a fixed order, so results are bitwise identical from
  run to run for a given thread count. On CuPy every kernel is a single call on the whole batch.
"""

from .conv import ConvGeometry, col2im, conv2d_backward, conv2d_forward, im2col_chunks, output_size, windows
from .passes import (
    add,
    channel_affine,
    channel_sum,
    channel_sums,
    empty_like,
    log_softmax,
    relu,
    relu_grad,
)
from .threads import blockwise, free_scratch, get_num_threads, parallel_for, scratch, set_num_threads

__all__ = ["ConvGeometry", "add", "blockwise", "channel_affine", "channel_sum", "channel_sums",
           "col2im", "conv2d_backward", "conv2d_forward", "empty_like", "free_scratch", "get_num_threads",
           "im2col_chunks", "log_softmax", "output_size", "parallel_for", "relu", "relu_grad", "scratch", "set_num_threads",
           "windows"]
