"""Linear layers for a CPU decode step: oneDNN directly, on weights packed once.

    linear(x, w)                 F.linear(x, w), or oneDNN for a CPU decode-sized product
    Linear                       nn.Linear whose forward is linear(): what spin_kernels.install puts in
    swiglu(x, gate, up, down)    model.swiglu, or, on packed weights, with silu and the product
                                 fused into oneDNN's gate and up products (MLP.glu)
    cpu_decode_weights(model, rows)   within the block, linear() reads packed weight copies

## Motivation

A decode step multiplies a few rows (the batch) by every weight matrix of the model. With
fp32 weights larger than the last-level cache, the step is bound by reading the weights from
DRAM, so the product should read each weight byte once at full bandwidth. MKL's general GEMM
(what F.linear calls) and oneDNN's unpacked path both reorder the weight into their blocked
layout on every call, which for 8 rows costs more than the product: the 32000 x 256 LM head
read at ~12 GB/s where a plain `sum` of the same bytes reads ~38 GB/s. oneDNN's
`_reorder_linear_weight` packs a weight once for a given row count; the packed copy is then
read at near streaming speed (bench/cpu_gemm.py: 3.4x on the LM head at 2 threads;
bench/RESULTS_generate_cpu.md). Training and large batches (more than DECODE_ROWS rows, or
autograd) keep F.linear, which wins there.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import swiglu as reference_swiglu

PACK_BUDGET_BYTES = 1 << 30  # never copy more than this much of a model's weights
DECODE_ROWS = 64  # up to this many rows a CPU product is a "decode step" (MKL wins above)


def _probe_onednn(dtype):
    """oneDNN's private ops are in every x86 build of torch; other builds (an ARM laptop) may
    lack them or refuse a dtype (bf16 needs AVX512 at least). Try both forms once on a small
    product; use them only if they work and agree with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            w, x = (torch.arange(12.0).view(3, 4) / 8).to(dtype), torch.ones(2, 4, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
            got = [torch.ops.mkldnn._linear_pointwise(x, v, None, "none", [], "") for v in (w, packed)]
        return all(torch.allclose(g.float(), F.linear(x, w).float()) for g in got)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


ONEDNN = {dtype for dtype in (torch.float32, torch.bfloat16) if _probe_onednn(dtype)}  # dtypes it serves
PACKED = {}  # id(weight) -> (weight, oneDNN copy), filled only inside cpu_decode_weights


def _decode_step(x):
    """x is a decode step's input for oneDNN: no autograd, oneDNN on, at most DECODE_ROWS rows."""
    return not torch.is_grad_enabled() and torch.backends.mkldnn.enabled and x.numel() <= DECODE_ROWS * x.shape[-1]


def linear(x, w, b=None):
    """F.linear(x, w, b), except for a CPU decode step (at most DECODE_ROWS rows, float32 or
    bfloat16, no autograd), which calls oneDNN's kernel directly, on the packed copy of w when
    cpu_decode_weights made one. Both agree to float32 summation order (bf16: to its rounding of
    the output; oneDNN accumulates in float32, as F.linear does)."""
    if x.dtype in ONEDNN and x.device.type == "cpu" and _decode_step(x) \
            and w.dtype == x.dtype and (b is None or b.dtype == x.dtype):
        packed = PACKED.get(id(w))
        return torch.ops.mkldnn._linear_pointwise(x, w if packed is None else packed[1], b, "none", [], "")
    return F.linear(x, w, b)


def _probe_fused(dtype):
    """oneDNN's post-ops swiglu() uses (silu on the gate product, a multiply by another tensor
    on the up product), tried once like _probe_onednn and kept only if they agree with torch."""
    if dtype not in ONEDNN:
        return False
    try:
        with torch.no_grad():
            w, x = (torch.arange(12.0).view(3, 4) / 8).to(dtype), torch.ones(2, 4, dtype=dtype) / 4
            g = torch.ops.mkldnn._linear_pointwise(x, w, None, "swish", [], "")
            h = torch.ops.mkldnn._linear_pointwise.binary(x, g, w, None, "mul")
        y = F.linear(x, w).float()
        return torch.allclose(g.float(), F.silu(y), rtol=2e-2) and torch.allclose(h.float(), F.silu(y) * y, rtol=2e-2)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# bf16 only: there the fusion saves two roundings as well as two passes; in float32 oneDNN's silu
# is a few ulps (~5e-7 relative) off torch's, and float32 generation stays as exact as it was.
FUSED = {dtype for dtype in ONEDNN if dtype == torch.bfloat16 and _probe_fused(dtype)}  # dtypes swiglu() fuses


def swiglu(x, gate, up, down):
    """model.swiglu, except inside cpu_decode_weights for a decode-sized product (as linear()):
    silu is oneDNN's post-op of the gate product and the multiply by it the up product's, each
    applied to the float32 accumulator before the output is rounded, so two elementwise passes
    over (rows, intermediate) go (in bf16 the result is nearer float64 than the plain path's,
    which rounds the gate and up outputs first; tests/test_cpu_linear.py). A layer that is not
    this module's Linear (a LoRA layer) or a weight that was not packed takes the reference."""
    pg, pu = (PACKED.get(id(m.weight)) if type(m) is Linear else None for m in (gate, up))
    if pg is None or pu is None or gate.bias is not None or up.bias is not None or x.dtype not in FUSED \
            or not _decode_step(x):
        return reference_swiglu(x, gate, up, down)
    g = torch.ops.mkldnn._linear_pointwise(x, pg[1], None, "swish", [], "")  # silu(x @ gate.T)
    return down(torch.ops.mkldnn._linear_pointwise.binary(x, g, pu[1], None, "mul"))  # (x @ up.T) * g


class Linear(nn.Linear):
    """nn.Linear (without bias unless asked: Qwen2's q/k/v have one) whose forward takes
    linear()'s CPU decode path. Parameter names stay `weight` / `bias`, so checkpoints load
    unchanged; a module can still be replaced (lora.py)."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def adopt(cls, layer: nn.Linear):
        """A Linear holding `layer`'s own weight (and bias) Parameters (so tied, loaded, meta or
        sharded weights stay what they are); built on meta, so nothing is allocated or drawn."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight = layer.weight
        if layer.bias is not None:
            new.bias = layer.bias
        return new

    def forward(self, x):
        return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def cpu_decode_weights(model, rows):
    """Within the block, linear() reads oneDNN copies of the model's CPU weights (float32 or
    bfloat16), packed once for `rows` rows (the same products up to summation order; in bf16
    oneDNN takes the AMX or AVX512-BF16 instructions where the CPU has them). The weights must
    not change inside the block. The copies cost the weights' memory again, so models with more
    than PACK_BUDGET_BYTES of linear weights (and GPU or float16 models, or more than
    DECODE_ROWS rows, which never take the oneDNN path) run unpacked."""
    ws = [m.weight for m in model.modules() if isinstance(m, Linear)]  # the layers spin_kernels.install put in
    # Plain tensors only: an FSDP-sharded weight (a DTensor) is left to F.linear.
    ok = ws and rows <= DECODE_ROWS and ws[0].dtype in ONEDNN and all(
        type(w.detach()) is torch.Tensor and w.device.type == "cpu" and w.dtype == ws[0].dtype for w in ws) \
        and sum(w.numel() * w.element_size() for w in ws) <= PACK_BUDGET_BYTES
    mine = []
    try:
        if ok:
            for w in ws:
                if id(w) not in PACKED:  # a tied or nested use keeps the outer copy
                    PACKED[id(w)] = (w, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows))
                    mine.append(id(w))
        yield
    finally:
        for i in mine:
            PACKED.pop(i, None)
