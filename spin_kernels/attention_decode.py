"""Decode attention: a few new queries (Tq <= 16) against a long KV cache (flash-decoding).

Same semantics as spin_kernels/attention.py (see its docstring and DESIGN.md); forward only,
for generation. spin_kernels.attention.attention_triton routes here when Tq is small and no
gradient is needed.

## Motivation

With Tq = 1 the flash-attention forward launches B * H programs of one (mostly empty)
query block each, and every program streams the whole cache: at B = 4, H = 32 that is 128
programs on a 132-SM GPU, each walking e.g. 16k keys one block at a time, while the
query heads of one kv group reload the same K/V. Decode is memory bound (each K/V byte is
used G * Tq times), so the two fixes are about bytes and parallelism:
  * one program serves all G = H / Hkv query heads of a kv head: its "query block" is the
    G * Tq rows (g, i), so each K/V tile is read once per group, not G times;
  * the visible key range of a row is split into num_splits chunks handled by separate
    programs (split-K, Dao et al. "Flash-Decoding", 2023), each leaving a partial output
    normalised by its own sum and its base-2 log-sum-exp; a combine kernel merges them
    with weights exp2(lse_s - lse), which is exact (softmax is associative this way).
"""
import functools
import math

import torch

from spin_kernels.common import INTERPRET, LOG2E, dot_dtype, dot_precision, strides, tl, triton, visible


@triton.jit
def _decode_partial(
    Q, K, V, OP, LSEP, STARTS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    Hkv, Tq, q_offset, window, qk_scale, num_splits,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D >= 16)  # tl.dot minimum
    split = tl.program_id(0)
    bh = tl.program_id(1)  # over B * Hkv
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)
    start = tl.load(STARTS + b)
    Tk = q_offset + Tq
    # Row r of the tile is query i = r % Tq of head hkv * GROUP + r // Tq.
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Tq
    i = r % Tq
    h = hkv * GROUP + r // Tq
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT)  # (BLOCK_M, D)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh

    # The band every row of the group may see (the first query has the lowest bound),
    # cut into num_splits chunks of whole blocks; this program takes chunk `split`.
    lo = start
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_offset - window + 1)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(Tk - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, Tk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < s_hi
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = visible(i, offs_n, q_offset, start, window, HAS_WINDOW) & col_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0  # this chunk holds no key of the row: weight exp2(-inf) = 0 below
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = bh.to(tl.int64) * num_splits + split  # OP is (B*Hkv, num_splits, BLOCK_M, D)
    tl.store(OP + part * BLOCK_M * D + r[:, None] * D + offs_d[None, :], acc)
    tl.store(LSEP + part * BLOCK_M + r, lse)


@triton.jit
def _decode_combine(
    OP, LSEP, O, sob, soh, sot, Hkv, Tq, num_splits,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # o = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max_s lse_s), as an online
    # max over splits. Rows whose every split is empty (padding queries) get 0.
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for split in range(num_splits):
        part = bh.to(tl.int64) * num_splits + split
        lse = tl.load(LSEP + part * BLOCK_M + r)
        o = tl.load(OP + part * BLOCK_M * D + r[:, None] * D + offs_d[None, :])
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    acc = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    row_ok = r < GROUP * Tq
    h = hkv * GROUP + r // Tq
    i = r % Tq
    tl.store(O + b * sob + h[:, None] * soh + i[:, None] * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@functools.lru_cache(maxsize=None)
def _sm_count(index):  # a device query per decode step per layer would cost a host round trip
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_splits(B, Hkv, visible, block_n, device):
    # Enough programs to fill the GPU about twice, but at least 4 key blocks per split so
    # the combine stays cheap. Under the interpreter fewer programs are simply faster.
    if INTERPRET or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(2 * sms, B * Hkv), triton.cdiv(visible, 4 * block_n)))


def decode_attention(q, k, v, starts, window, q_offset, num_splits=None, block_n=None):
    """starts: (B,) int32 on q's device (the caller normalises None to zeros)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    BM = max(16, triton.next_power_of_2(G * Tq))
    BN = block_n or (16 if INTERPRET else 64)
    visible = Tk if window is None else min(Tk, window + Tq - 1)
    S = num_splits or _default_splits(B, Hkv, visible, BN, q.device)
    o_part = torch.empty(B * Hkv, S, BM, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * Hkv, S, BM, dtype=torch.float32, device=q.device)
    common = dict(GROUP=G, D=D)
    _decode_partial[(S, B * Hkv)](
        q, k, v, o_part, lse_part, starts, *strides(q), *strides(k), *strides(v),
        Hkv, Tq, q_offset, window or 0, LOG2E / math.sqrt(D), S,
        HAS_WINDOW=window is not None, DOT=dot_dtype(q.dtype), PREC=dot_precision(q.dtype),
        BLOCK_M=BM, BLOCK_N=BN, num_warps=4, **common,
    )
    o = torch.empty_like(q)
    _decode_combine[(B * Hkv,)](o_part, lse_part, o, *strides(o), Hkv, Tq, S, BLOCK_M=BM, **common)
    return o
