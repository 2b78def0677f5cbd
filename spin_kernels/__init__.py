"""Speed-ups for a built model, put in by one call:

    model = spin_kernels.install(hf_folder.load_model(path), impl)      # impl: "auto", "torch" or "triton"

What it swaps (model.py stays the plain reference, and is what runs without this call):
  - every nn.Linear (projections, LM head) -> cpu_linear.Linear: oneDNN for a CPU decode step
    (few rows, fp32 or bf16, no autograd), F.linear otherwise; and each MLP's SwiGLU (MLP.glu)
    -> cpu_linear.swiglu, whose decode step folds silu and the product into oneDNN's products;
  - each layer's attention (Attention.attend) -> attention.attention: the Triton flash and
    decode kernels, or the torch path (the reference, plus a written-out one-query step);
  - the log-prob head (Mistral.head_logprobs) -> logprob.linear_logprobs: the fused Triton
    kernel, or the torch path that chunks tokens so the (N, V) logits never exist at once.
The CUDA-graph decode step (cuda_graph.py) is a fourth, which generate.sample(cuda_graph=True)
puts in itself.

impl "auto": Triton for CUDA tensors, torch otherwise. "torch": the torch paths everywhere, the
way out if a kernel does not compile or misbehaves on some GPU. "triton": Triton for CUDA
tensors, and for CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, how the tests run
kernels); other CPU tensors take the torch paths. The environment variable SPIN_KERNELS is read
once, by use_kernels, when impl is "auto" (every process torchrun starts inherits it), and the
choice is kept on the model as `model.kernels`.
"""
import functools
import os

import torch.nn as nn

from spin_kernels import attention, cpu_linear, logprob
from spin_kernels.common import IMPLS, INTERPRET
from model import MLP, Attention


def use_kernels(flag=None):
    """train.py's and generate.py's --kernels: the flag, else SPIN_KERNELS, else "auto"; what
    install puts in and what a run records."""
    choice = flag or os.environ.get("SPIN_KERNELS") or "auto"
    if choice not in IMPLS:
        raise ValueError(f"kernels must be auto, torch or triton (--kernels or SPIN_KERNELS), got {choice!r}")
    return choice


def install(model, impl="auto"):
    """Swap the fast paths into `model` in place (before fully_shard: FSDP holds on to the
    modules it wraps) and return it. Parameters are kept, not copied: a tied LM head stays
    tied, and a meta-device model can still be loaded afterwards."""
    choice = use_kernels(None if impl == "auto" else impl)
    # What the kernel entry points are asked for. "triton" outside the interpreter means CUDA
    # tensors only, which is what "auto" does per call; the device is not known here (a model
    # may be built on meta and moved later).
    per_call = "triton" if choice == "triton" and INTERPRET else "torch" if choice == "torch" else "auto"
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # not a LoraLinear: lora.py's own
                setattr(parent, name, cpu_linear.Linear.adopt(child))
        if isinstance(parent, Attention):
            parent.attend = functools.partial(_attend, impl=per_call)
        if isinstance(parent, MLP):
            parent.glu = cpu_linear.swiglu
    model.head_logprobs = functools.partial(logprob.linear_logprobs, impl=per_call)
    model.kernels = choice
    return model


def _attend(q, k, v, starts, window, q_offset, impl):  # Attention.attend's positional form
    return attention.attention(q, k, v, starts=starts, window=window, q_offset=q_offset, impl=impl)
