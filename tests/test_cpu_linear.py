"""spin_kernels/cpu_linear.py: the oneDNN decode path, packed and unpacked, against F.linear."""
import os

import pytest
import torch
import torch.nn.functional as F

import spin_kernels.cpu_linear as cl
from spin_kernels.cpu_linear import cpu_decode_weights
import spin_kernels
from hf_folder import load_model

from hf_tiny import random_hf_mistral


def cpu_flags():
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_probes_find_onednn_where_the_machine_has_it():
    """The probes decide whether the decode path exists at all, and every other test here skips
    where they fail: so where the hardware and torch build certainly have oneDNN's kernels (an x86
    build with oneDNN; for bf16 a CPU with AVX512-BF16 or AMX, or one torch says oneDNN serves
    bf16 on), the probes must find them (a probe broken by a torch upgrade fails here, not skips)."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.mkldnn.is_available():
        assert torch.float32 in cl.ONEDNN
    flags = cpu_flags()
    bf16 = x86 and torch.backends.mkldnn.is_available() and (
        bool(flags & {"avx512_bf16", "amx_bf16"}) or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if bf16:
        assert torch.bfloat16 in cl.ONEDNN and torch.bfloat16 in cl.FUSED
    if not x86 and not cl.ONEDNN:
        pytest.skip(f"{platform.machine()}: oneDNN's kernels are optional here, and this build lacks them")


def make_hf(tmp_path, **kw):
    return random_hf_mistral(os.path.join(tmp_path, "ckpt"), vocab=97, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_cpu_decode_weights_packs_and_cleans_up(tmp_path, monkeypatch, tied, dtype):
    if dtype not in cl.ONEDNN:
        pytest.skip(f"this torch build or CPU has no working oneDNN {dtype} linear (spin_kernels/cpu_linear.py)")
    _, folder = make_hf(tmp_path, tie_word_embeddings=tied)
    model = spin_kernels.install(load_model(folder, dtype=dtype), "torch")  # puts cpu_linear.Linear in
    # float32: oneDNN and F.linear differ only in summation order. bfloat16: both accumulate in
    # float32 and round the output once, so they may differ by one bf16 rounding (2^-8 relative).
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    weights = {id(m.weight) for m in model.modules() if isinstance(m, cl.Linear)}
    assert len(weights) == 7 * model.config.num_hidden_layers + 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for W in (model.model.layers[0].mlp.gate_proj.weight, model.lm_head.weight):
            for rows in (1, 3, 8):  # packed for 8 rows, used with others too
                x = torch.randn(rows, 1, W.shape[1], generator=g).to(dtype)
                plain = cl.linear(x, W)
                with cpu_decode_weights(model, rows=8):
                    assert set(cl.PACKED) == weights
                    packed = cl.linear(x, W)
                assert not cl.PACKED
                ref = F.linear(x.double(), W.double())
                scale = ref.abs().max().item()
                for y in (packed, plain, F.linear(x, W)):
                    assert (y.double() - ref).abs().max().item() <= tol * scale
        with pytest.raises(KeyError):  # an error inside the block still drops the copies
            with cpu_decode_weights(model, rows=8):
                raise KeyError
        assert not cl.PACKED
        with cpu_decode_weights(model, rows=cl.DECODE_ROWS + 1):  # never takes the oneDNN path
            assert not cl.PACKED
        monkeypatch.setattr(cl, "PACK_BUDGET_BYTES", 1000)
        with cpu_decode_weights(model, rows=8):  # too big to copy
            assert not cl.PACKED
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the user switched oneDNN off
        x = torch.randn(3, 1, W.shape[1], generator=g).to(dtype)
        assert torch.equal(cl.linear(x, W), F.linear(x, W))
        monkeypatch.undo()
        monkeypatch.setattr(cl, "ONEDNN", set())  # a torch build where the probe failed
        with cpu_decode_weights(model, rows=8):
            assert not cl.PACKED
            x = torch.randn(3, 1, W.shape[1], generator=g).to(dtype)
            assert torch.equal(cl.linear(x, W), F.linear(x, W))
        assert not any(cl.PACKED)
    with cpu_decode_weights(load_model(folder), rows=8):  # a plain model has no layer to pack for
        assert not cl.PACKED


def test_fused_swiglu_matches_float64(tmp_path, monkeypatch):
    """cpu_linear.swiglu (silu and the product as oneDNN post-ops, on packed weights) against
    the float64 SwiGLU, no further from it than the plain path; and it is the path taken inside
    cpu_decode_weights only: outside it, with autograd, or on a LoRA layer the reference runs."""
    assert torch.float32 not in cl.FUSED  # float32 generation keeps torch's silu
    dtype = torch.bfloat16
    if dtype not in cl.FUSED:
        pytest.skip("this torch build or CPU has no working oneDNN bf16 post-ops (spin_kernels/cpu_linear.py)")
    import lora

    _, folder = make_hf(tmp_path)
    model = spin_kernels.install(load_model(folder, dtype=dtype), "torch")
    mlp = model.model.layers[1].mlp
    assert mlp.glu is cl.swiglu
    calls = []
    real = cl.reference_swiglu
    monkeypatch.setattr(cl, "reference_swiglu", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    for rows in (1, 5, 8):
        x = torch.randn(rows, 1, model.config.hidden_size, generator=g).to(dtype)
        w = [m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        xd = x.double()
        ref = F.linear(F.silu(F.linear(xd, w[0])) * F.linear(xd, w[1]), w[2])
        with torch.no_grad():
            plain = mlp(x)
            assert len(calls) == 1
            with cpu_decode_weights(model, rows=8):
                fused = mlp(x)
                assert len(calls) == 1  # the fused path, not the reference
                with torch.enable_grad():
                    mlp(x)
                assert len(calls) == 2
        calls.clear()
        scale = ref.abs().max().item()
        err_fused, err_plain = ((y.double() - ref).abs().max().item() / scale for y in (fused, plain))
        assert fused.dtype == dtype and fused.shape == plain.shape
        # the plain path rounds gate, up, silu and their product to bf16 before down, the fused
        # one only the product
        assert err_fused <= 2 ** -7
        assert err_fused <= err_plain * 1.5
    lora.add_adapters(model, lora.LoraSettings(2, 4.0, ("gate",)))
    with torch.no_grad(), cpu_decode_weights(model, rows=8):
        model.model.layers[1].mlp(x)
    assert calls  # a LoRA layer is not cpu_linear.Linear: the reference runs
