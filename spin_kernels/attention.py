"""Causal attention for Mistral: grouped-query heads, sliding window, left-padded rows.

    attention(q, k, v, *, starts=None, window=None, q_offset=0, impl="auto") -> o

q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tk == q_offset + Tq; scale 1/sqrt(D).
(A one-query step may pass more slots, the ones past the query hidden, and float32 keys and values
under bf16/fp16 queries: a slots.WholeKVCache; the torch path reads it.)
Query i sits at absolute key index qi = q_offset + i (the KV-cache length before this call)
and sees key j iff  starts[b] <= j <= qi  and, with a window W,  qi - W < j  (W keys, itself
included: Mistral's and transformers' rule). A query with no visible key (a padding query,
qi < starts[b]) outputs exactly 0 and passes no gradient. See DESIGN.md "Attention semantics".

impl: "torch" (the reference plus a one-query fast path, any device), "triton" (CUDA, or the
interpreter on CPU), "auto" (triton when q is on CUDA, else torch). A q_offset given as a 0-dim
tensor (the static cache of spin_kernels/cuda_graph.py) always takes the torch path: the Triton
kernels take the offset as a launch argument.

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

import torch
import torch.nn.functional as F

from spin_kernels.common import (INTERPRET, LOG2E, TL_DTYPES, dot_dtype, dot_precision, resolve_impl, strides, tl, triton,
                     visible)
from spin_kernels.attention_decode import decode_attention
from spin_kernels.cpu_linear import DECODE_ROWS
from model import attention as reference_attention

# --------------------------------------------------------------------------------------
# The reference is the model's: SDPA with an explicit boolean mask (model.attention). On CPU
# a decode step takes the written-out product below instead.
# --------------------------------------------------------------------------------------


def attention_torch(q, k, v, starts=None, window=None, q_offset=0):
    """model.attention, except a one-query step without autograd (a decode step): written out
    in fp32 (with fp32 keys and values: a bf16/fp16 model's queries too, on slots.WholeKVCache),
    grouped SDPA in bf16/fp16."""
    if q.shape[2] == 1 and not torch.is_grad_enabled():
        bias, empty = _decode_mask(q.shape[0], k.shape[2], starts, window, q_offset, k.dtype, q.device)
        if k.dtype == torch.float32:  # .float() and .to() are no-ops on fp32 queries
            o = _decode_torch(q.float(), k, v, bias).to(q.dtype)
        else:
            o = _decode_sdpa(q, k, v, bias)
        if empty is not None:  # padding queries output 0
            o = torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)
        return o
    return reference_attention(q, k, v, starts, window, q_offset)


def whole_cache(model, rows):
    """Whether generate.sample's refilled rows decode on a slots.WholeKVCache (whole float32
    buffers): on CPU, for a model whose attention spin_kernels.install put in (the torch path reads
    that cache; model.attention, the reference, takes one dtype), at decode sizes (at most
    DECODE_ROWS rows, where cpu_linear packs the weights too). Larger batches, the demo's among them,
    keep the sliced cache in the model's dtype and their rounding."""
    return model.kernels != "reference" and model.lm_head.weight.device.type == "cpu" and rows <= DECODE_ROWS


_STEP_MASK = {}  # the last CPU decode step's mask: every layer of a step asks for the same one


def _decode_mask(B, Tk, starts, window, q_offset, dtype, device):
    """The visibility rule for one query per row at key index qi = q_offset (model.visibility):
    row b sees keys lo[b] <= j <= qi, lo = starts (raised by a window). Returns an additive
    (B, 1, 1, Tk) mask in `dtype` (0 where visible, -inf elsewhere), and (B, 1, 1, 1) True for
    rows whose query sees no key (qi < starts[b], a padding query), or None when it is known on
    the host that there are none. A padding row is given its own key so its softmax stays finite;
    the caller zeroes its output.
    On CPU the mask is built once per step and kept for the other layers (about 10 small ops a
    layer otherwise, ~5% of a bf16 step of SmolLM2-135M at 64 rows); the key holds the starts'
    values, which slots.py changes between steps. Not on CUDA, where reading them would sync."""
    key = None
    if device.type == "cpu" and isinstance(q_offset, int):
        key = (B, Tk, window, q_offset, dtype, None if starts is None else tuple(starts.tolist()))
        if key in _STEP_MASK:
            return _STEP_MASK[key]
    lo = torch.zeros(B, dtype=torch.long, device=device) if starts is None else starts.to(device, torch.long)
    empty = (lo > q_offset).view(B, 1, 1, 1)
    if window is not None:
        lo = lo.clamp(min=q_offset - window + 1)
    j = torch.arange(Tk, device=device)
    # j <= qi: a static cache (spin_kernels/cuda_graph.py) passes every slot, filled or not
    seen = (j >= lo.clamp(max=q_offset)[:, None]) & (j <= q_offset)  # (B, Tk)
    bias = torch.full((B, Tk), float("-inf"), dtype=dtype, device=device).masked_fill_(seen, 0).view(B, 1, 1, Tk)
    if key is None:
        return bias, empty
    _STEP_MASK.clear()
    _STEP_MASK[key] = bias, (empty if empty.any() else None)
    return _STEP_MASK[key]


def _decode_torch(q, k, v, bias):
    """One fp32 query per row (a decode step) written out: the (B, H, 1, Tk) scores are small,
    and on CPU two batched matmuls and a softmax cost a third of SDPA's kernel at these sizes
    (bench/RESULTS_generate_cpu.md). Grouped-query heads share K/V by a view, never a copy.
    fp32 only: in bf16/fp16 the scores would be rounded before the softmax (SDPA keeps them
    in fp32), which costs ~10x the error on peaked attention."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    s = (q.reshape(B, Hkv, G, D) * D ** -0.5) @ k.transpose(2, 3)  # (B, Hkv, G, Tk)
    p = (s + bias).softmax(-1)  # bias (B, 1, 1, Tk) broadcasts over kv heads and their G query heads
    if v.stride(2) == 1 and D > 1:  # values stored slot-minor (slots.WholeKVCache): o^T = V^T p^T reads rows of V^T
        return (v.mT @ p.mT).mT.reshape(B, H, 1, D)
    return (p @ v).reshape(B, H, 1, D)


def _decode_sdpa(q, k, v, bias):
    """One bf16/fp16 query per row: SDPA (scores kept in fp32) with the G query heads of a kv
    head as G query rows against that head's K/V, (B, Hkv, G, D), instead of enable_gqa. On
    CPU the flash kernel then reads each K/V block once for G queries, not once per query
    head: 0.55-0.7x the time of the enable_gqa call over the decode shapes of the SPIN
    benchmark (bench/RESULTS_generate_cpu.md)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    o = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=bias)
    return o.reshape(B, H, 1, D)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
# Shared conventions:
# * Scores are kept in base-2 units, s2 = (q . k) * scale * log2(e), so exp2 replaces exp;
#   LSE stores the base-2 log-sum-exp per query row, (B, H, Tq) fp32.
# * K/V are indexed by kv head hkv = h // GROUP: grouped-query attention never repeats K/V.
# * Every program derives the band of key blocks it can see from the rule
#   start <= j <= qi, qi - W < j, and loops over that band only; the boolean `vis` then
#   masks the ragged edges inside the band.
# * A row with no visible key keeps m = -inf, l = 0: exponents use m_safe (0 in that case)
#   so no inf - inf appears; its output is 0 and its LSE is stored as 0 (never used, since
#   the backward multiplies by vis).
# * DOT: operand dtype of tl.dot. The input dtype on GPUs (fp32 accumulation); fp32 for
#   bf16 under the interpreter, whose bf16 arithmetic is wrong (spin_kernels/common.py).


@triton.jit
def _key_band(m_lo, m_hi, q_offset, start, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks [lo, hi) that queries m_lo..m_hi-1 (call-relative) can see."""
    lo = start
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_offset + m_lo - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N  # align, so blocks line up with the dK/dV kernel's
    hi = q_offset + m_hi  # exclusive: the last query sees up to itself
    return lo, hi


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, STARTS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, Tq, q_offset, window, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D >= 16)  # tl.dot minimum
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hkv = (h // GROUP).to(tl.int64)
    start = tl.load(STARTS + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT)  # (BLOCK_M, D)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, D], tl.float32)  # running sum of p @ v
    lo, hi = _key_band(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq),
                       q_offset, start, window, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi  # hi <= Tk, so no read past the keys
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base 2
        s = tl.where(visible(offs_m, offs_n, q_offset, start, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, Tq,
                    D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax backward's row term.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, STARTS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt,
    H, Tq, q_offset, window, qk_scale, sm_scale,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_M query rows of one head and walks the same key band as the
    # forward: dQ = scale * sum_j dS_ij k_j, dS = P * (dP - delta), dP = dO V^T.
    # It is the only writer of its dQ rows, so no atomics.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hkv = (h // GROUP).to(tl.int64)
    start = tl.load(STARTS + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(DOT)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    lo, hi = _key_band(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq),
                       q_offset, start, window, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = visible(offs_m, offs_n, q_offset, start, window, HAS_WINDOW)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)  # recomputed probabilities
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PREC)
    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, STARTS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    sgb, sgh, sgt,  # dK and dV share one layout (allocated together by the wrapper)
    H, Tq, q_offset, window, qk_scale, sm_scale,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_N keys of one kv head and sums, in registers, the
    # contributions of all GROUP query heads that share it: dK and dV of a kv head have a
    # single writer, so grouped-query attention needs neither atomics nor repeated K/V.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)  # over B * Hkv
    Hkv = H // GROUP
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)
    Tk = q_offset + Tq
    start = tl.load(STARTS + b)
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < Tk
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # Query rows that can see a key of this block: qi >= max(n_lo, start) and, with a
    # window, qi <= n_hi - 1 + W - 1. Blocks wholly inside the padding see none.
    n_hi = tl.minimum(n_lo + BLOCK_N, Tk)
    m_lo = tl.maximum(tl.maximum(n_lo, start) - q_offset, 0)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = Tq
    if HAS_WINDOW:
        m_hi = tl.minimum(m_hi, n_hi - 1 + window - q_offset)
    m_hi = tl.where(n_hi <= start, m_lo, m_hi)
    for g in range(GROUP):
        h = hkv * GROUP + g
        row = (b * H + h) * Tq  # offset of this head's LSE / delta rows
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Tq
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0).to(DOT)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0).to(DOT)
            lse = tl.load(LSE + row + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row + offs_m, mask=row_ok, other=0.0)
            # Transposed tiles (BLOCK_N, BLOCK_M). Rows past Tq are causally "visible" (their
            # qi >= Tk); their dO loads as 0 so they add nothing, but row_ok says so outright.
            vis = tl.trans(visible(offs_m, offs_n, q_offset, start, window, HAS_WINDOW) & row_ok[:, None])
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            pT = tl.where(vis, tl.exp2(sT - lse[None, :]), 0.0)
            dv += tl.dot(pT.to(DOT), do, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(DOT), q, input_precision=PREC)
    out = b * sgb + hkv * sgh + offs_n[:, None] * sgt + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# --------------------------------------------------------------------------------------
# Wrappers and the autograd Function
# --------------------------------------------------------------------------------------

def _blocks(D, Tq, dtype):
    """(fwd BLOCK_M, BLOCK_N), (dq BLOCK_M, BLOCK_N), (dkdv BLOCK_M, BLOCK_N), num_warps.

    16-bit inputs: hand-picked for an H100 (not tuned there yet, see
    bench/RESULTS_attention_cpu.md). fp32 inputs take "ieee" dots (no tensor cores), whose
    register demand made the 16-bit blocks spill 3-28 KB per thread on sm_90; these smaller
    ones compile without spills (python -m spin_kernels.compile_check). Under the interpreter,
    fewer and bigger blocks are faster (cost ~ programs x steps).
    """
    if INTERPRET:
        return (64, 64), (64, 64), (64, 64), 4
    if dtype == torch.float32:
        return (32, 64), (64, 16), (16, 64), 8
    if D <= 64:
        return (128, 64), (128, 32), (32, 128), 4
    return (128, 64), (64, 64), (64, 64), 8


def _starts_tensor(starts, B, device):
    if starts is None:
        return torch.zeros(B, dtype=torch.int32, device=device)
    return starts.to(device=device, dtype=torch.int32).contiguous()


def _check_triton(q):
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"Triton attention needs a power-of-two head dim >= 16, got {D} (use impl='torch')")
    if q.dtype not in TL_DTYPES:
        raise ValueError(f"Triton attention: unsupported dtype {q.dtype}")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("Triton attention needs CUDA tensors or TRITON_INTERPRET=1")


def flash_attention_fwd(q, k, v, starts, window, q_offset, blocks=None):
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    (BM, BN), _, _, warps = blocks or _blocks(D, Tq, q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Tq, BM), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse, starts, *strides(q), *strides(k), *strides(v), *strides(o),
        H, Tq, q_offset, window or 0, LOG2E / math.sqrt(D),
        GROUP=H // Hkv, D=D, HAS_WINDOW=window is not None, DOT=dot_dtype(q.dtype),
        PREC=dot_precision(q.dtype), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=3,
    )
    return o, lse


def flash_attention_bwd(do, q, k, v, o, lse, starts, window, q_offset, blocks=None):
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    (fm, _), (qm, qn), (km, kn), warps = blocks or _blocks(D, Tq, q.dtype)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(Tq, fm), B * H)](
        o, do, delta, *strides(o), *strides(do), H, Tq, D=D, BLOCK_M=fm)
    dq = torch.empty_like(q)
    dk = torch.empty(B, Hkv, k.shape[2], D, dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    common = dict(GROUP=H // Hkv, D=D, HAS_WINDOW=window is not None, DOT=dot_dtype(q.dtype),
                  PREC=dot_precision(q.dtype), num_warps=warps, num_stages=2)
    scalars = (H, Tq, q_offset, window or 0, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    ins = (*strides(q), *strides(k), *strides(v), *strides(do))
    _attn_bwd_dq[(triton.cdiv(Tq, qm), B * H)](
        q, k, v, do, dq, lse, delta, starts, *ins, *strides(dq), *scalars,
        BLOCK_M=qm, BLOCK_N=qn, **common)
    _attn_bwd_dkdv[(triton.cdiv(k.shape[2], kn), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, starts, *ins, *strides(dk), *scalars,
        BLOCK_M=km, BLOCK_N=kn, **common)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts, window, q_offset, blocks):
        o, lse = flash_attention_fwd(q, k, v, starts, window, q_offset, blocks)
        ctx.save_for_backward(q, k, v, o, lse, starts)
        ctx.window, ctx.q_offset, ctx.blocks = window, q_offset, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, starts = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, starts, ctx.window, ctx.q_offset, ctx.blocks)
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, starts=None, window=None, q_offset=0, blocks=None, decode_splits=None):
    """The Triton path. blocks / decode_splits override the block sizes and the decode
    split count (tests use them to force many blocks and many splits on tiny shapes)."""
    _check_triton(q)
    starts_t = _starts_tensor(starts, q.shape[0], q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[2] <= DECODE_MAX_TQ and not needs_grad:
        # Generation: a few new queries against a long cache, split across programs.
        return decode_attention(q, k, v, starts_t, window, q_offset, num_splits=decode_splits)
    return FlashAttention.apply(q, k, v, starts_t, window, q_offset, blocks)


DECODE_MAX_TQ = 16


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _check(q, k, v, starts, window, q_offset):
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ValueError("attention: q, k, v must be (B, H, T, D)")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    problems = [
        (v.shape != k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"),
        (Bk != B or Dk != D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D"),
        (H % Hkv != 0, f"H={H} is not a multiple of Hkv={Hkv}"),
        (k.dtype != v.dtype or q.dtype != k.dtype and not (Tq == 1 and k.dtype == torch.float32),
         f"dtypes differ: {q.dtype} {k.dtype} {v.dtype} (only a one-query step may read fp32 keys and values)"),
        (q_offset < 0, f"q_offset={q_offset} < 0"),
        (Tk < q_offset + Tq, f"k/v have Tk={Tk} keys but q_offset + Tq = {q_offset} + {Tq}: the keys up to "
                             "the last query are missing"),
        (Tk > q_offset + Tq and Tq != 1, f"k/v have Tk={Tk} keys but q_offset + Tq = {q_offset} + {Tq}: only "
                                         "a one-query step may pass slots past its query"),
        (window is not None and window < 1, f"window={window} must be >= 1 or None"),
        (starts is not None and tuple(starts.shape) != (B,), f"starts must be (B,), got "
                                                             f"{None if starts is None else tuple(starts.shape)}"),
        (starts is not None and starts.is_floating_point(), "starts must be an integer tensor"),
    ]
    for bad, msg in problems:
        if bad:
            raise ValueError(f"attention: {msg}")


def attention(q, k, v, *, starts=None, window=None, q_offset=0, impl="auto"):
    if isinstance(q_offset, torch.Tensor):  # a static cache: no host value of the offset to check
        return attention_torch(q, k, v, starts, window, q_offset)
    _check(q, k, v, starts, window, q_offset)
    # The Triton kernels take exactly the keys up to the last query, in the queries' dtype; a
    # slots.WholeKVCache passes more, in fp32, and is read by the torch path.
    if resolve_impl(impl, q.is_cuda) == "torch" or k.shape[2] != q_offset + q.shape[2] or k.dtype != q.dtype:
        return attention_torch(q, k, v, starts, window, q_offset)
    return attention_triton(q, k, v, starts, window, q_offset)


