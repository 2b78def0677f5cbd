"""Causal attention for Mistral: grouped-query heads, sliding window, left-padded rows.

    attention(q, k, v, *, starts=None, window=None, q_offset=0, impl="auto") -> o

q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tk == q_offset + Tq; scale 1/sqrt(D).
Query i sits at absolute key index qi = q_offset + i (the KV-cache length before this call)
and sees key j iff  starts[b] <= j <= qi  and, with a window W,  qi - W < j  (W keys, itself
included: Mistral's and transformers' rule). A query with no visible key (a padding query,
qi < starts[b]) outputs exactly 0 and passes no gradient. See DESIGN.md "Attention semantics".

impl: "torch" (the reference, any device), "triton" (CUDA, or the interpreter on CPU),
"auto" (triton when q is on CUDA, else torch).

## Motivation

The naive version materialises the (B, H, Tq, Tk) score matrix:

    s = q @ k.T * scale                      # writes B*H*Tq*Tk fp32, reads it back
    s = s.masked_fill(~visible, -inf)        # another read + write of B*H*Tq*Tk
    p = softmax(s)                           # read + write
    o = p @ v                                # read B*H*Tq*Tk again

At T = 8k, H = 32 that is 2 GiB of fp32 traffic per sequence per layer, and the backward
keeps p alive. Flash attention (Dao 2022; FlashAttention-2, Dao 2023) never writes s or p:
each program keeps a block of queries in registers, streams key/value blocks past it with
an online softmax (running max m, running sum l), and stores only o and the log-sum-exp
lse = m + log l (B*H*Tq floats). The backward recomputes p = exp(s - lse) block by block.
With a causal mask and a window W only O(T*W) score blocks are visible, and the loops
below visit only those, so time falls with the window.
"""
import math
import os

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# The reference: SDPA with an explicit boolean mask (the CPU path and the test oracle's twin)
# --------------------------------------------------------------------------------------


def visibility(Tq, Tk, starts, window, q_offset, device):
    """Boolean (B or 1, 1, Tq, Tk) mask of the rule in the module docstring."""
    qi = torch.arange(Tq, device=device)[:, None] + q_offset  # (Tq, 1) absolute query index
    j = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    mask = j <= qi  # (Tq, Tk) causal
    if window is not None:
        mask = mask & (j > qi - window)
    mask = mask[None, None]  # (1, 1, Tq, Tk)
    if starts is not None:
        mask = mask & (j >= starts.to(device).view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    return mask


def attention_torch(q, k, v, starts=None, window=None, q_offset=0):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    mask = visibility(Tq, Tk, starts, window, q_offset, q.device)  # (B|1, 1, Tq, Tk)
    # A padding query (qi < starts[b]) sees no key. SDPA's handling of an all-False row
    # differs between backends (NaN or 0, and NaN gradients), so let such rows see every
    # key, then zero their output with where(): the where also blocks their gradient.
    empty = ~mask.any(-1, keepdim=True)  # (B|1, 1, Tq, 1)
    mask = mask | empty
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != k.shape[1])
    return torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _check(q, k, v, starts, window, q_offset):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, T, D)"
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert Bk == B and Dk == D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D"
    assert H % Hkv == 0, f"H={H} is not a multiple of Hkv={Hkv}"
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: {q.dtype} {k.dtype} {v.dtype}"
    assert q_offset >= 0, f"q_offset={q_offset} < 0"
    assert Tk == q_offset + Tq, (
        f"k/v have Tk={Tk} keys but q_offset + Tq = {q_offset} + {Tq}: pass the cache "
        f"sliced to exactly the keys up to the last query"
    )
    assert window is None or window >= 1, f"window={window} must be >= 1 or None"
    if starts is not None:
        assert starts.shape == (B,), f"starts must be (B,), got {tuple(starts.shape)}"
        assert not starts.is_floating_point(), "starts must be an integer tensor"


def attention(q, k, v, *, starts=None, window=None, q_offset=0, impl="auto"):
    _check(q, k, v, starts, window, q_offset)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return attention_torch(q, k, v, starts, window, q_offset)
    if impl == "triton":
        return attention_triton(q, k, v, starts, window, q_offset)
    raise ValueError(f"impl must be 'torch', 'triton' or 'auto', got {impl!r}")


def attention_triton(q, k, v, starts=None, window=None, q_offset=0):
    raise NotImplementedError("Triton path: in progress (issue 7)")
