"""Every Triton kernel compiles for an H100 (sm_90) and fits its shared memory, checked on a
machine without a GPU: Triton's compiler and ptxas run ahead of time (spin_kernels/compile_check.py).
The CPU tests run the kernels only through the interpreter, which never compiles them."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this Triton has no NVIDIA backend")
@pytest.mark.parametrize("arch", [90])
def test_every_kernel_compiles_for_the_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    p = subprocess.run([sys.executable, "-m", "spin_kernels.compile_check", "--arch", str(arch)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert " 0 problems" in p.stdout
    for name in ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dq", "_attn_bwd_dkdv", "_decode_partial",
                 "_decode_combine", "_fwd_kernel", "_bwd_kernel"):
        assert f" {name} " in p.stdout, name  # each kernel family was reached and compiled
