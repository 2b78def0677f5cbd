"""Per-token log-probs through the LM head without building the (N, V) logits.

SPIN scores every response token of the real and the generated answer:
    logp[n] = log_softmax(hidden[n] @ weight.T)[targets[n]]

Motivation: the naive version (`linear_logprobs_naive`) writes the full logits.
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
                TORCH_TILE_ELEMENTS; any device; the CPU path of the model.
  impl="triton" (below) never writes a logits tile to memory at all.
"""

import torch

# The torch path holds at most one fp32 logits chunk of max(TORCH_TILE_ELEMENTS, V)
# elements (rows = TORCH_TILE_ELEMENTS // V, at least one). 4M elements = 16 MB: large
# enough that each chunk GEMM runs at full speed, small next to any real N * V.
TORCH_TILE_ELEMENTS = 1 << 22

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_logprobs_naive(hidden, weight, targets, *, ignore_index=-100):
    """The reference: full fp32 logits. For readers, tests and the benchmark only."""
    logits = hidden.float() @ weight.float().T  # (N, V)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logp = logits.log_softmax(-1).gather(-1, safe[:, None])[:, 0]  # (N,)
    return torch.where(valid, logp, 0.0)


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


class _TorchLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):
        N = hidden.shape[0]
        w32 = weight.float()  # (V, C); a no-op view for fp32, one (V, C) copy otherwise
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).long()  # (N,), ignored rows point at column 0
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        tgt = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            logits = hidden[n0:n1].float() @ w32.T  # (rows, V) fp32, the only big tensor
            tgt[n0:n1] = logits.gather(1, safe[n0:n1, None])[:, 0]
            # logsumexp in place, so no second (rows, V) temporary is allocated.
            m = logits.amax(1, keepdim=True)  # (rows, 1)
            lse[n0:n1] = (m[:, 0] + logits.sub_(m).exp_().sum(1).log())
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.rows = rows
        return torch.where(valid, tgt - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        rows = ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = hidden.shape[0]
        w32 = weight.float()
        g = torch.where(valid, grad_out.float(), 0.0)  # (N,), ignored rows pass nothing back
        dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            h = hidden[n0:n1].float()  # (rows, C)
            logits = h @ w32.T  # (rows, V), recomputed rather than stored
            # dlogits = g * (onehot - softmax), built in place in the logits buffer.
            d = logits.sub_(lse[n0:n1, None]).exp_().mul_(-g[n0:n1, None])
            d.scatter_add_(1, safe[n0:n1, None], g[n0:n1, None])
            if need_h:
                torch.mm(d, w32, out=dh[n0:n1])  # (rows, C)
            if need_w:
                dw.addmm_(d.T, h)  # (V, C), fp32 accumulation across chunks
        dh = dh.to(hidden.dtype) if need_h else None
        dw = dw.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None


def _torch_rows(V):
    return max(1, TORCH_TILE_ELEMENTS // V)


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------


def linear_logprobs(hidden, weight, targets, *, ignore_index=-100, impl="auto"):
    """log_softmax(hidden @ weight.T)[n, targets[n]] in fp32, (N,); 0 where ignored.

    hidden (N, C), weight (V, C) in fp32/fp16/bf16 (same dtype), targets (N,) int64.
    Differentiable in hidden and weight; gradients come back in the input dtype.
    impl: "torch", "triton", or "auto" (triton on CUDA, torch otherwise).
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    _check_inputs(hidden, weight, targets, ignore_index)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl == "torch":
        return _TorchLinearLogprobs.apply(
            hidden, weight, targets, ignore_index, _torch_rows(weight.shape[0])
        )
    return _TritonLinearLogprobs.apply(hidden, weight, targets, ignore_index)


class _TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        raise NotImplementedError("the Triton path of linear_logprobs is not written yet")
