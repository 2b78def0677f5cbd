"""Compile every Triton kernel for an NVIDIA GPU on a machine that has none.

    python -m spin_kernels.compile_check              # sm_90 (H100, H200)
    python -m spin_kernels.compile_check --arch 80    # sm_80 (A100)

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) never runs Triton's compiler, so
a kernel can pass every CPU test and still fail to compile, or need more shared memory than
the card has. Triton compiles ahead of time for any target with the ptxas it ships, so here
the project's own launch wrappers run on CPU tensors with the CUDA choices (block sizes,
dot dtypes, stages) while a stand-in driver reports the target, and every launch is turned
into a compile: Triton IR -> PTX -> cubin. Each kernel's shared memory is checked against the
card's per-block limit; registers and spills come from `ptxas -v` on the same PTX.

What it cannot check: numerics, races and speed (tests/ on a CUDA machine, bench/). Triton
then compiles again on the GPU, possibly with another Triton version (this check uses the
installed one).
"""
import argparse
import os
import re
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":  # must be decided before triton is imported
    sys.exit("spin_kernels.compile_check: unset TRITON_INTERPRET (it compiles for a GPU, not the interpreter)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _TargetOnly:
    """The part of Triton's driver that compiling needs: a device, a stream, a target."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _cases():
    """(label, thunk) pairs; each thunk drives the real wrappers, so the block sizes and
    constexprs are the ones a GPU run uses. Shapes are small: only their strides' alignment
    and the constexprs matter to the compiler."""
    from spin_kernels.attention import flash_attention_bwd, flash_attention_fwd
    from spin_kernels.attention_decode import decode_attention
    from spin_kernels.logprob import triton_blocks, TritonLinearLogprobs

    def attn(B, H, Hkv, T, D, dtype, window):
        def run():
            q = torch.randn(B, H, T, D).to(dtype)
            k, v = (torch.randn(B, Hkv, T, D).to(dtype) for _ in range(2))
            starts = torch.zeros(B, dtype=torch.int32)
            o, lse = flash_attention_fwd(q, k, v, starts, window, 0)
            flash_attention_bwd(torch.randn_like(o), q, k, v, o, lse, starts, window, 0)
        return run

    def decode(B, H, Hkv, Tq, D, dtype, window):
        def run():
            q = torch.randn(B, H, Tq, D).to(dtype)
            k, v = (torch.randn(B, Hkv, 300, D).to(dtype) for _ in range(2))
            decode_attention(q, k, v, torch.zeros(B, dtype=torch.int32), window, 300 - Tq, num_splits=4)
        return run

    def logprob(dtype):
        def run():
            h = torch.randn(70, 256).to(dtype).requires_grad_()
            w = torch.randn(1000, 256).to(dtype).requires_grad_()
            t = torch.randint(0, 1000, (70,))
            TritonLinearLogprobs.apply(h, w, t, -100, triton_blocks()).sum().backward()
        return run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        ("attention D=128 bf16 GQA 4 (Mistral)", attn(1, 8, 2, 256, 128, bf16, None)),
        ("attention D=128 bf16 GQA 4 window", attn(1, 8, 2, 256, 128, bf16, 100)),
        ("attention D=64 fp16 MHA", attn(1, 4, 4, 256, 64, fp16, None)),
        ("attention D=128 fp32 GQA 8 window", attn(1, 8, 1, 256, 128, fp32, 100)),
        ("attention D=64 fp32 GQA 2", attn(1, 4, 2, 256, 64, fp32, None)),
        ("decode D=128 bf16 GQA 4, 1 query", decode(2, 32, 8, 1, 128, bf16, None)),
        ("decode D=128 bf16 GQA 4, 1 query, window", decode(2, 32, 8, 1, 128, bf16, 64)),
        ("decode D=64 fp32 MHA, 3 queries", decode(2, 4, 4, 3, 64, fp32, None)),
        ("log-probs bf16", logprob(bf16)),
        ("log-probs fp16", logprob(fp16)),
        ("log-probs fp32", logprob(fp32)),
    ]


def _ptxas_usage(ptx, arch):
    """(registers, spill bytes) per thread from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"compile_check_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        p = subprocess.run([ptxas, f"-arch={sm}", "-v", "-o", os.devnull, path], capture_output=True, text=True)
    finally:
        os.remove(path)
    regs = re.search(r"Used (\d+) registers", p.stderr)
    spill = re.search(r"(\d+) bytes spill stores", p.stderr)
    return (int(regs.group(1)) if regs else -1), (int(spill.group(1)) if spill else 0)


def check(arch=90, verbose=True):
    """Compile every case; returns a list of rows (case, kernel, warps, stages, smem, regs,
    spills, problem). problem is '' when the kernel compiled and fits."""
    limit = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    compiled = []
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):  # every launch becomes a compile
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    rows = []
    previous = driver._active  # reset_active() would look for a GPU driver, and there is none
    driver.set_active(_TargetOnly(arch))
    JITFunction.run = compile_only
    try:
        for label, thunk in _cases():
            compiled.clear()
            try:
                thunk()
            except Exception as e:  # a compile error: report it and go on to the next case
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                where, why = (lines[0], lines[-1]) if lines else ("", "")
                rows.append((label, "-", 0, 0, 0, 0, 0, f"{type(e).__name__} {where} {why}"[:300]))
                continue
            seen = set()
            for name, k in compiled:
                if name in seen:
                    continue
                seen.add(name)
                md = k.metadata
                regs, spills = _ptxas_usage(k.asm["ptx"], arch)
                problem = f"shared memory {md.shared} B > {limit} B" if md.shared > limit else ""
                rows.append((label, name, md.num_warps, md.num_stages, md.shared, regs, spills, problem))
    finally:
        JITFunction.run = real_run
        driver._active = previous
    if verbose:
        print(f"Triton {triton.__version__}, target sm_{arch}, shared memory limit {limit} B per block")
        print(f"{'case':42s} {'kernel':18s} {'warps':>5s} {'stages':>6s} {'smem B':>7s} {'regs':>5s} {'spill B':>7s}  problem")
        for r in rows:
            print(f"{r[0]:42s} {r[1]:18s} {r[2]:5d} {r[3]:6d} {r[4]:7d} {r[5]:5d} {r[6]:7d}  {r[7]}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    args = ap.parse_args()
    rows = check(args.arch)
    bad = [r for r in rows if r[7]]
    print(f"{len(rows) - len(bad)} kernels compiled and fit, {len(bad)} problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
