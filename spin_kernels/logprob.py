"""Per-token log-probs through the LM head without building the (N, V) logits.

SPIN scores every response token of the real and the generated answer:
    logp[n] = log_softmax(hidden[n] @ weight.T)[targets[n]]

Motivation: the usual naive version (bf16 GEMM, then upcast; `linear_logprobs_naive`, the
model's own `model.linear_logprobs`, upcasts first, for an exact reference) writes the full logits.
    logits = hidden @ weight.T          # (N, V)   write N*V*2 B (bf16)
    logits = logits.float()             # (N, V)   read N*V*2, write N*V*4
    logp = logits.log_softmax(-1)       # (N, V)   read 2x N*V*4, write N*V*4 (kept for backward)
    out = logp.gather(-1, targets)      # (N,)
  backward: a zero (N, V) fp32 grad with one entry per row, the log_softmax backward
  (read 2x, write 1x N*V*4) and a bf16 cast, then two GEMMs.
For Mistral (V = 32000) and N = 32768 tokens that is ~4.2 GB per fp32 (N, V) tensor and
several of them alive at once. Every one of those bytes is avoidable: the output needs
only lse[n] = logsumexp_v logits[n, v] and the target logit, and the backward needs
dlogits = g * (onehot - softmax), which is cheap to recompute tile by tile from lse.

Two fused paths with the same semantics:
  impl="torch"  chunks tokens so that one fp32 chunk of logits stays below
                TORCH_TILE_ELEMENTS; any device; the CPU path of an installed model.
  impl="triton" (below) never writes a logits tile to memory at all.
"""


import torch

from spin_kernels.common import INTERPRET, resolve_impl, tl, triton
# The reference is the model's own head: full fp32 logits, log_softmax, gather.
from model import linear_logprobs as linear_logprobs_naive  # noqa: F401

# The torch path holds one fp32 (rows, V) logits chunk, rows = TORCH_TILE_ELEMENTS // V
# (at least one), and on CPU takes its (log-)softmax in place (two chunks elsewhere).
# 8M elements = 32 MB: big chunks keep the GEMMs efficient and the op count low (on a
# shared CPU each op pays a thread-pool wake-up), yet 1/16 of N * V at N = 4096, V = 32000.
TORCH_TILE_ELEMENTS = 1 << 23

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(hidden, weight, targets, ignore_index):
    if hidden.ndim != 2 or weight.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            f"expected hidden (N, C), weight (V, C), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    N, C = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != C or targets.shape[0] != N:
        raise ValueError(
            f"shape mismatch: hidden (N, C) = {tuple(hidden.shape)}, weight (V, C) = "
            f"{tuple(weight.shape)}, targets (N,) = {tuple(targets.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and weight must share one of fp32/fp16/bf16; got {hidden.dtype}, {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )
    # A wrong target index would otherwise read past the vocabulary (silently in a kernel).
    # This costs one reduction and a host sync; a clear error is worth it in a reference.
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, V={V}) and is not "
            f"ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------
# torch path: chunk over tokens, full vocabulary per chunk
# ----------------------------------------------------------------------------------------


def _softmax(x, log):
    # On CPU in place: ATen's CPU (log_)softmax reads each element before writing that same
    # index, so out=x is exact (the float64 tests check it) and saves a (rows, V) chunk.
    if x.device.type == "cpu":
        op = torch.ops.aten._log_softmax.out if log else torch.ops.aten._softmax.out
        return op(x, 1, False, out=x)
    return x.log_softmax(1) if log else x.softmax(1)


class _TorchLinearLogprobs(torch.autograd.Function):
    # Per chunk of rows tokens: forward = one GEMM + one fused log_softmax; backward = one
    # GEMM + one fused softmax + two GEMMs. torch's fused (log_)softmax is one vectorised
    # pass; an online log-sum-exp in separate torch ops would be four passes, as slow as a
    # GEMM on a CPU. No lse is saved: softmax recomputes it from the chunk exactly. Work on
    # (rows, C) or (N, C) tensors stays outside the loop: on a busy CPU every small op costs
    # a thread-pool round trip, so the loop body is kept to the big ops.
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):
        N = hidden.shape[0]
        w32 = weight.float()  # (V, C); a no-op view for fp32, one (V, C) copy otherwise
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).long()[:, None]  # (N, 1), ignored rows -> column 0
        out = torch.empty(N, 1, dtype=torch.float32, device=hidden.device)
        buf = hidden.new_empty(min(rows, N), weight.shape[0], dtype=torch.float32)  # one chunk
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            logits = torch.mm(hidden[n0:n1].float(), w32.T, out=buf[: n1 - n0])  # (rows, V)
            torch.gather(_softmax(logits, log=True), 1, safe[n0:n1], out=out[n0:n1])
        ctx.save_for_backward(hidden, weight, safe, valid)
        ctx.rows = rows
        return torch.where(valid, out[:, 0], 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe, valid = ctx.saved_tensors
        rows = ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        w32 = weight.float()
        g = torch.where(valid, grad_out.float(), 0.0)[:, None]  # (N, 1); ignored rows pass nothing
        # dlogits = g * (onehot - p) is never formed: g moves onto the (N, C) side of each
        # GEMM and the onehot term becomes a row gather (dh) or scatter (dw) after the loop.
        pw = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        gh = hidden.float() * g if need_w else None  # (N, C)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = hidden.new_empty(min(rows, N), weight.shape[0], dtype=torch.float32)  # one chunk
        logits = p = None
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            logits = torch.mm(hidden[n0:n1].float(), w32.T, out=buf[: n1 - n0])
            p = _softmax(logits, log=False)  # (rows, V), recomputed rather than stored
            if need_h:
                torch.mm(p, w32, out=pw[n0:n1])  # (rows, C): p @ W
            if need_w:
                dw.addmm_(p.T, gh[n0:n1], alpha=-1.0)  # -p^T (g h), fp32 accumulation
        del buf, logits, p  # free the chunk before the (N, C) epilogue allocates
        dh = dw_out = None
        if need_h:
            dh = ((w32[safe[:, 0]] - pw) * g).to(hidden.dtype)  # g * (W[t] - p @ W)
        if need_w:
            dw_out = dw.index_add_(0, safe[:, 0], gh).to(weight.dtype)  # + onehot^T (g h)
        return dh, dw_out, None, None, None


def _torch_rows(V):
    return max(1, TORCH_TILE_ELEMENTS // V)


# ----------------------------------------------------------------------------------------
# Triton path: no logits tile ever leaves the chip
# ----------------------------------------------------------------------------------------
#
# forward   grid (N / BLOCK_N,). A program owns BLOCK_N tokens and walks the vocabulary in
#           BLOCK_V tiles, each tile a C-loop of dots, keeping an online (max, sum) pair
#           (Milakov & Gimelshein 2018) and picking the target logit out of the tile that
#           holds it. Writes lse[n] and out[n]: 8 bytes per token.
# backward  grid (V / BLOCK_V, N / BLOCK_N). A program recomputes its logits tile from
#           lse, forms dlogits = g * (onehot - softmax) in fp32 registers, and then, per
#           C chunk, adds dlogits @ W_tile into dhidden and dlogits.T @ h_tile into dweight
#           with fp32 atomic adds (the design of Cut Cross-Entropy, Wijmans et al. 2024).
#
# Why atomics: with C = 4096 neither a (BLOCK_N, C) dhidden nor a (BLOCK_V, C) dweight
# accumulator fits in registers or shared memory, so some partial sums must go through
# global memory whichever way the grid is cut. A race-free split into a token-owning pass
# (dhidden) and a vocab-owning pass (dweight) must recompute every logits tile twice, i.e.
# five GEMM-sized products in all instead of four, and still read-modify-writes its owned
# rows once per tile in plain loads and stores. Atomic adds do the same read-modify-write
# in L2 without a round trip through the SM, and keep one launch and four products. Their
# sums are exact fp32 additions in a nondeterministic order: results are correct but not
# bitwise reproducible from run to run (differences at fp32 rounding level).
#
# Dot precision: fp32 inputs use IEEE fp32 dots (no TF32). For bf16/fp16 inputs on a GPU
# the dots take the 16-bit operands with fp32 accumulation; the product of two 16-bit
# floats is exact in fp32, so this equals upcasting first, at tensor-core speed. dlogits
# is rounded to the input dtype for the two gradient dots (as the naive path's bf16
# backward GEMMs do); the accumulation stays fp32. In the interpreter bf16 arithmetic is
# wrong, so there everything is cast to fp32 at load (DOT_FP32).

# Tokens per backward launch: bounds the fp32 dhidden buffer to this many rows of C.
_BWD_TOKENS_PER_LAUNCH = 8192


def triton_blocks():
    # GPU values are a first guess for H100 and are untuned (no GPU was available when this
    # was written). Interpreting, cost grows with programs x loop trips, so use big tiles.
    if INTERPRET:
        return dict(BLOCK_N=64, BLOCK_V=4096, BLOCK_C=64, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_C=64, num_warps=8)


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, C, stride_hn, stride_hc,
                 stride_wv, stride_wc, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    # (BLOCK_N, BLOCK_V) fp32 logits; rows/cols outside N/V read zeros (masked, never memory).
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_c[None, :] * stride_hc,
                    mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_c[None, :] * stride_wc,
                    mask=mask_v[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_V, BLOCK_C)
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, out_ptr, N, V, C, stride_hn, stride_hc,
                stride_wv, stride_wc, stride_t, ignore_index, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_V >= 16 and BLOCK_C >= 16)  # tl.dot minimum
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * stride may pass 2^31
    mask_n = offs_n < N
    t = tl.load(t_ptr + offs_n * stride_t, mask=mask_n, other=ignore_index).to(tl.int64)
    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp(logit - m_i)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the target logit, once its tile is seen
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        acc = _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, C, stride_hn,
                           stride_hc, stride_wv, stride_wc, BLOCK_N, BLOCK_V, BLOCK_C, DOT_FP32)
        tgt += tl.sum(tl.where(offs_v[None, :] == t[:, None], acc, 0.0), axis=1)
        # Invariant: every tile has >= 1 real column (v0 < V), so m_new is finite and
        # exp(m_i - m_new) is exp(-inf) = 0 on the first tile, never NaN.
        logits = tl.where(mask_v[None, :], acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(s_i)
    out = tl.where(t != ignore_index, tgt - lse, 0.0)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(out_ptr + offs_n, out, mask=mask_n)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, N, V, C, stride_hn,
                stride_hc, stride_wv, stride_wc, stride_t, ignore_index,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
                DOT_FP32: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr):
    # dh_ptr (N, C) and dw_ptr (V, C): contiguous fp32, zeroed by the wrapper.
    tl.static_assert(BLOCK_N >= 16 and BLOCK_V >= 16 and BLOCK_C >= 16)
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    t = tl.load(t_ptr + offs_n * stride_t, mask=mask_n, other=ignore_index).to(tl.int64)
    # g = 0 on ignored and out-of-range rows, so their dlogits rows are exactly zero.
    g = tl.load(g_ptr + offs_n, mask=mask_n & (t != ignore_index), other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # A tile of only ignored tokens (prompt, padding) contributes nothing: skip its GEMMs.
    if tl.max(tl.abs(g), axis=0) > 0.0:
        acc = _logits_tile(h_ptr, w_ptr, offs_n, mask_n, offs_v, mask_v, C, stride_hn,
                           stride_hc, stride_wv, stride_wc, BLOCK_N, BLOCK_V, BLOCK_C, DOT_FP32)
        p = tl.where(mask_v[None, :], tl.exp(acc - lse[:, None]), 0.0)  # softmax tile
        onehot = tl.where(offs_v[None, :] == t[:, None], 1.0, 0.0)
        d = g[:, None] * (onehot - p)  # (BLOCK_N, BLOCK_V) fp32 dlogits
        if not DOT_FP32:
            d = d.to(h_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if NEED_DH:
                w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_c[None, :] * stride_wc,
                            mask=mask_v[:, None] & mask_c[None, :], other=0.0)
                if DOT_FP32:
                    dh = tl.dot(d, w.to(tl.float32), input_precision="ieee")
                else:
                    dh = tl.dot(d, w)  # (BLOCK_N, BLOCK_C) fp32
                # relaxed: only the sums matter, not ordering against other memory (the
                # default acq_rel adds a fence per atomic)
                tl.atomic_add(dh_ptr + offs_n[:, None] * C + offs_c[None, :], dh,
                              mask=mask_n[:, None] & mask_c[None, :], sem="relaxed")
            if NEED_DW:
                h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_c[None, :] * stride_hc,
                            mask=mask_n[:, None] & mask_c[None, :], other=0.0)
                if DOT_FP32:
                    dw = tl.dot(tl.trans(d), h.to(tl.float32), input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(d), h)  # (BLOCK_V, BLOCK_C) fp32
                tl.atomic_add(dw_ptr + offs_v[:, None] * C + offs_c[None, :], dw,
                              mask=mask_v[:, None] & mask_c[None, :], sem="relaxed")


class TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, blocks):
        N, C = hidden.shape
        V = weight.shape[0]
        dot_fp32 = INTERPRET or hidden.dtype == torch.float32
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        out = torch.empty(N, dtype=torch.float32, device=hidden.device)
        grid = (max(1, triton.cdiv(N, blocks["BLOCK_N"])),)  # N == 0 (nothing scored): one idle program
        _fwd_kernel[grid](
            hidden, weight, targets, lse, out, N, V, C, hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1), targets.stride(0), ignore_index,
            BLOCK_N=blocks["BLOCK_N"], BLOCK_V=blocks["BLOCK_V"], BLOCK_C=blocks["BLOCK_C"],
            DOT_FP32=dot_fp32, num_warps=blocks["num_warps"],
        )
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.blocks, ctx.dot_fp32 = ignore_index, blocks, dot_fp32
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        blocks = ctx.blocks
        N, C = hidden.shape
        V = weight.shape[0]
        g = grad_out.float().contiguous()  # (N,)
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        dw32 = torch.zeros(V, C, dtype=torch.float32, device=weight.device) if need_w else None
        # dhidden accumulates in an fp32 buffer of at most _BWD_TOKENS_PER_LAUNCH rows,
        # cast into the output after each launch; dweight accumulates in fp32 throughout.
        chunk = max(1, min(N, _BWD_TOKENS_PER_LAUNCH))  # N == 0: no launch, zero gradients
        dh32 = torch.empty(chunk, C, dtype=torch.float32, device=hidden.device) if need_h else None
        for n0 in range(0, N, chunk):
            n1 = min(n0 + chunk, N)
            if need_h:
                dh32.zero_()
            grid = (triton.cdiv(V, blocks["BLOCK_V"]), triton.cdiv(n1 - n0, blocks["BLOCK_N"]))
            _bwd_kernel[grid](
                hidden[n0:n1], weight, targets[n0:n1], lse[n0:n1], g[n0:n1],
                dh32 if need_h else lse, dw32 if need_w else lse,  # unused pointer when not needed
                n1 - n0, V, C, hidden.stride(0), hidden.stride(1), weight.stride(0),
                weight.stride(1), targets.stride(0), ctx.ignore_index,
                BLOCK_N=blocks["BLOCK_N"], BLOCK_V=blocks["BLOCK_V"], BLOCK_C=blocks["BLOCK_C"],
                DOT_FP32=ctx.dot_fp32, NEED_DH=need_h, NEED_DW=need_w,
                num_warps=blocks["num_warps"],
            )
            if need_h:
                dh[n0:n1] = dh32[: n1 - n0]
        dw = dw32.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None

# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------


def linear_logprobs(hidden, weight, targets, *, ignore_index=-100, impl="auto"):
    """log_softmax(hidden @ weight.T)[n, targets[n]] in fp32, (N,); 0 where ignored.

    hidden (N, C), weight (V, C) in fp32/fp16/bf16 (same dtype), targets (N,) int64.
    Differentiable in hidden and weight; gradients come back in the input dtype.
    impl: "torch", "triton", or "auto" (triton on CUDA, torch otherwise).
    """
    impl = resolve_impl(impl, hidden.is_cuda)
    _check_inputs(hidden, weight, targets, ignore_index)
    if impl == "torch":
        return _TorchLinearLogprobs.apply(
            hidden, weight, targets, ignore_index, _torch_rows(weight.shape[0])
        )
    if not hidden.is_cuda and not INTERPRET:
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    return TritonLinearLogprobs.apply(hidden, weight, targets, ignore_index, triton_blocks())
