"""Stand-ins for `triton` and `triton.language` where Triton cannot be installed (its wheels are
for Linux only: a macOS or Windows laptop running the CPU demo). The kernel modules still
import and define their kernels, their torch paths run, and launching a kernel says why it
cannot. spin_kernels.common.resolve_impl never picks "triton" for "auto" without the real package."""


class _Anything:
    """tl.constexpr, tl.float32, ...: any attribute, usable as an annotation or a dict value."""

    def __getattr__(self, name):
        return self


def _missing(*args, **kwargs):
    raise RuntimeError("Triton is not installed (it ships for Linux only): use the torch paths "
                       "(impl='torch', or SPIN_KERNELS=torch)")


class _Kernel:
    """What @triton.jit returns here: kernel[grid](...) raises the error above."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return _missing


class _Triton(_Anything):
    jit = staticmethod(_Kernel)

    def __getattr__(self, name):  # triton.cdiv, triton.next_power_of_2, ...
        return _missing


triton = _Triton()
tl = _Anything()
