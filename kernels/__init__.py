"""Triton kernels, each with a plain PyTorch path beside it (attention.py, attention_decode.py,
logprob.py), the CPU decode path for linear layers (cpu_linear.py), and what they share.

impl="auto" takes the Triton kernel for CUDA tensors and the torch path otherwise. The
environment variable SPIN_KERNELS (auto, torch or triton) is the one channel that chooses
otherwise: every process torchrun starts inherits it, train.py and generate.py set it from
--kernels, and tests set it with monkeypatch. SPIN_KERNELS=torch is the way out if a kernel
does not compile or misbehaves on some GPU. SPIN_KERNELS=triton applies to CUDA tensors, and
to CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, how the tests run kernels).
"""
import os

import torch

# The kernel modules take `triton` and `tl` from here: the real package, or (it ships for Linux
# only) stand-ins under which the kernels still import and the torch paths run.
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    from kernels.no_triton import tl, triton  # noqa: F401
    HAS_TRITON = False

IMPLS = ("auto", "torch", "triton")
# Triton's interpreter runs kernels on CPU tensors (shared/TRITON_ON_CPU.md): slow, and its
# bf16 arithmetic is wrong, so kernels compute in fp32 there and use bigger blocks.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # scores are kept in base 2 so that exp2 replaces exp
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def resolve_impl(impl, on_cuda):
    """impl as asked ("auto", "torch", "triton") -> "torch" or "triton"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("SPIN_KERNELS", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"environment variable SPIN_KERNELS must be auto, torch or triton, got {impl!r}")
        if impl == "triton" and not (on_cuda or INTERPRET):
            impl = "torch"
    if impl == "auto":
        impl = "triton" if on_cuda and HAS_TRITON else "torch"
    return impl


def use_kernels(flag):
    """train.py's and generate.py's --kernels: the flag, else what the environment already says,
    is what runs (SPIN_KERNELS, read by resolve_impl in this and every child process) and what
    the run records."""
    choice = flag or os.environ.get("SPIN_KERNELS") or "auto"
    os.environ["SPIN_KERNELS"] = choice
    return choice


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
    """The attention rule of kernels/attention.py for a tile: query rows offs_m (call-relative)
    against key columns offs_n (absolute), left padding `start`, optional window."""
    qi = q_offset + offs_m  # absolute index of each query on the key axis
    vis = (offs_n[None, :] <= qi[:, None]) & (offs_n[None, :] >= start)
    if HAS_WINDOW:
        vis = vis & (offs_n[None, :] > qi[:, None] - window)
    return vis  # (BLOCK_M, BLOCK_N)
