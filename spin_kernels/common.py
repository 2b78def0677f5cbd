"""What the kernel files share: `triton` and `tl` (or stand-ins), the interpreter flag, dot
precision, strides, the attention visibility rule for a tile, and which path an impl takes."""
import os

import torch

# The kernel modules take `triton` and `tl` from here: the real package, or (it ships for Linux
# only) stand-ins under which the kernels still import and the torch paths run.
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    from spin_kernels.no_triton import tl, triton  # noqa: F401
    HAS_TRITON = False

IMPLS = ("auto", "torch", "triton")
# Triton's interpreter runs kernels on CPU tensors: slow, and its
# bf16 arithmetic is wrong, so kernels compute in fp32 there and use bigger blocks.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # scores are kept in base 2 so that exp2 replaces exp
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def resolve_impl(impl, on_cuda):
    """impl as passed to a kernel entry point ("auto", "torch", "triton") -> "torch" or "triton".
    "auto" is Triton for CUDA tensors (when Triton is installed), torch otherwise. Which impl a
    model's layers pass is fixed once, by spin_kernels.install."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        impl = "triton" if on_cuda and HAS_TRITON else "torch"
    return impl


def dot_dtype(dtype):
    """Operand dtype of tl.dot: the input dtype on GPUs (fp32 accumulation); fp32 for bf16
    under the interpreter, whose bf16 arithmetic is wrong."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[dtype]


def dot_precision(dtype):
    """input_precision of every tl.dot: "ieee" for fp32 operands, because Triton's default on
    NVIDIA GPUs is tf32 (10-bit mantissa), which puts fp32 results ~5e-4 away from the torch
    paths; None (the default) for bf16/fp16 operands, where it does not apply."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else None


def strides(x):
    """(batch, head, time) strides of a (B, H, T, D) tensor whose head dim is contiguous."""
    if x.stride(-1) != 1:
        raise ValueError(f"the last (head) dim must be contiguous, got strides {x.stride()}")
    return x.stride(0), x.stride(1), x.stride(2)


@triton.jit
def visible(offs_m, offs_n, q_offset, start, window, HAS_WINDOW: tl.constexpr):
    """The attention rule of spin_kernels/attention.py for a tile: query rows offs_m (call-relative)
    against key columns offs_n (absolute), left padding `start`, optional window."""
    qi = q_offset + offs_m  # absolute index of each query on the key axis
    vis = (offs_n[None, :] <= qi[:, None]) & (offs_n[None, :] >= start)
    if HAS_WINDOW:
        vis = vis & (offs_n[None, :] > qi[:, None] - window)
    return vis  # (BLOCK_M, BLOCK_N)
