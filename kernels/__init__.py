"""Triton kernels, each with a plain PyTorch path beside it (attention.py, attention_decode.py,
logprob.py).

impl="auto" takes the Triton kernel for CUDA tensors and the torch path otherwise. The
environment variable SPIN_KERNELS (auto, torch or triton), which every process torchrun starts
inherits, overrides "auto": SPIN_KERNELS=torch is the way out if a kernel does not compile or
misbehaves on some GPU (train.py and generate.py set it from --kernels). SPIN_KERNELS=triton
applies to CUDA tensors only: on CPU, Triton runs only in its interpreter (tests ask for it
with impl="triton").
"""
import os

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


def resolve_impl(impl, on_cuda):
    """impl as asked ("auto", "torch", "triton") -> "torch" or "triton"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("SPIN_KERNELS", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"environment variable SPIN_KERNELS must be auto, torch or triton, got {impl!r}")
        if impl == "triton" and not on_cuda:
            impl = "torch"
    if impl == "auto":
        impl = "triton" if on_cuda and HAS_TRITON else "torch"
    return impl
