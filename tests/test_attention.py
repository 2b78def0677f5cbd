"""spin_kernels/attention.py and spin_kernels/attention_decode.py against a float64 reference.

The reference below is written from DESIGN.md's rule (explicit mask + softmax on repeated
K/V), independently of the torch path. On CPU the Triton kernels run in the interpreter
(tests/conftest.py), so shapes are tiny and awkward: lengths 37 and 100 against blocks of
16-64, windows shorter than the sequence, GQA ratios 1/4/8, ragged left padding.
"""
import math

import pytest
import torch

from spin_kernels.attention import attention, attention_triton
from spin_kernels.attention_decode import decode_attention

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))]
SMALL = ((16, 32), (32, 16), (16, 32), 4)  # many blocks per row: exercises band edges


def reference(q, k, v, starts, window, q_offset):
    """float64 attention by the rule: query qi = q_offset + i sees key j iff
    starts[b] <= j <= qi and qi - window < j; rows that see nothing give 0."""
    q, k, v = (x.double() for x in (q, k, v))
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, H, Tk, D)
    Tk = k.shape[2]
    qi = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1) + q_offset
    j = torch.arange(Tk, device=q.device).view(1, 1, 1, Tk)
    st = torch.zeros(B, dtype=torch.long) if starts is None else starts.long()
    mask = (j <= qi) & (j >= st.to(q.device).view(B, 1, 1, 1))
    if window is not None:
        mask = mask & (j > qi - window)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    row = mask.any(-1, keepdim=True)
    s = torch.where(mask, s, -math.inf)
    s = torch.where(row, s, 0.0)  # keep softmax finite on empty rows, zeroed below
    p = torch.where(mask, torch.softmax(s, -1), 0.0)
    return p @ v


def nan_view(x, requires_grad=False):
    """x copied into the middle of a larger NaN-filled buffer: any read outside x shows."""
    B, H, T, D = x.shape
    buf = torch.full((B + 1, H + 2, T + 5, D + 16), float("nan"), dtype=x.dtype, device=x.device)
    view = buf[1:, 1 : H + 1, 3 : T + 3, 8 : D + 8]
    view.copy_(x)
    return view.requires_grad_(requires_grad)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()  # abs error below 1


def tol(dtype, device):
    if dtype == torch.float32:
        return 2e-3 if device == "cuda" else 1e-5  # tf32 dots on GPUs
    return {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


# (B, H, Hkv, Tq, D, starts, window, q_offset)
CASES = {
    "mha_37": (2, 4, 4, 37, 16, None, None, 0),
    "gqa4_onetoken_row": (2, 4, 1, 37, 32, [0, 36], None, 0),
    "gqa8_window_ragged": (2, 8, 1, 100, 16, [5, 60], 17, 0),
    "d64_window": (1, 4, 2, 100, 64, None, 30, 0),
    "chunked_prefill": (2, 4, 2, 20, 32, [0, 50], 24, 45),
    "padding_queries": (2, 4, 2, 37, 16, [10, 37], 8, 0),  # row 1 is all padding
}


def run_case(case, impl, dtype, device, blocks=None, poison=True):
    B, H, Hkv, Tq, D, starts, window, q_offset = CASES[case]
    g = torch.Generator().manual_seed(0)
    Tk = q_offset + Tq
    raw = [torch.randn(B, h, t, D, generator=g).to(device, dtype)
           for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]
    do = torch.randn(B, H, Tq, D, generator=g).to(device, dtype)
    mk = nan_view if poison else (lambda x, requires_grad: x.clone().requires_grad_(requires_grad))
    q, k, v = (mk(x, requires_grad=True) for x in raw)
    st = None if starts is None else torch.tensor(starts, device=device)
    if impl == "triton":
        o = attention_triton(q, k, v, st, window, q_offset, blocks=blocks)
    else:
        o = attention(q, k, v, starts=st, window=window, q_offset=q_offset, impl=impl)
    grads = torch.autograd.grad(o, (q, k, v), mk(do, requires_grad=False))
    ref_in = [x.double().requires_grad_() for x in raw]
    ref = reference(*ref_in, st, window, q_offset)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    return (o, *grads), (ref, *ref_grads), st, q_offset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, impl, device):
    outs, refs, _, _ = run_case(case, impl, torch.float32, device)
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs, refs):
        assert a.dtype == torch.float32
        assert not a.isnan().any(), f"{name} has NaN"
        assert rel_err(a, b) < tol(torch.float32, device), f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa8_window_ragged", "chunked_prefill"])
def test_matches_reference_half(case, dtype, impl, device):
    outs, refs, _, _ = run_case(case, impl, dtype, device)
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs, refs):
        assert a.dtype == dtype
        assert not a.isnan().any(), f"{name} has NaN"
        assert rel_err(a, b) < tol(dtype, device), f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["gqa4_onetoken_row", "gqa8_window_ragged", "chunked_prefill"])
def test_triton_small_blocks(case, device):
    # Blocks of 16/32 on lengths 37/100: many partial blocks, band starts mid-block.
    outs, refs, _, _ = run_case(case, "triton", torch.float32, device, blocks=SMALL)
    for name, a, b in zip(("o", "dq", "dk", "dv"), outs, refs):
        assert rel_err(a, b) < tol(torch.float32, device), f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 2, 3, 14, 16, 17, 19, 30, 36, 37, 50])
def test_triton_window_sweep(window, device):
    # Band limits are off-by-one territory: sweep windows across block boundaries
    # (blocks 16/32, T = 37, q_offset 0 and 5, starts 2 and 15) for the forward and all three gradients.
    g = torch.Generator().manual_seed(window)
    for q_offset in (0, 5):
        raw = [torch.randn(2, h, t, 16, generator=g).to(device)
               for h, t in ((2, 37), (1, 37 + q_offset), (1, 37 + q_offset))]
        q, k, v = (nan_view(x, requires_grad=True) for x in raw)
        st = torch.tensor([2, 15], device=device)  # 15: a band edge one short of a block
        o = attention_triton(q, k, v, st, window, q_offset, blocks=SMALL)
        ref_in = [x.double().requires_grad_() for x in raw]
        ref = reference(*ref_in, st, window, q_offset)
        do = torch.randn(o.shape, generator=g).to(device)
        outs = (o, *torch.autograd.grad(o, (q, k, v), do))
        refs = (ref, *torch.autograd.grad(ref, ref_in, do.double()))
        for name, a, b in zip(("o", "dq", "dk", "dv"), outs, refs):
            assert rel_err(a, b) < tol(torch.float32, device), f"{name} q_offset={q_offset}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_padding_queries_are_exact_zeros(impl, device):
    (o, dq, dk, dv), _, st, q_offset = run_case("padding_queries", impl, torch.float32, device)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    for b in range(o.shape[0]):
        pad = int(st[b]) - q_offset  # queries before this index are padding
        assert (o[b, :, :pad] == 0).all() and (dq[b, :, :pad] == 0).all()
        assert (dk[b, :, : int(st[b])] == 0).all() and (dv[b, :, : int(st[b])] == 0).all()


# Decode: Tq new queries against a cache of 300; (B, H, Hkv, Tq, D, starts, window)
DECODE = {
    "one_token_gqa8": (2, 8, 1, 1, 32, [0, 250], None),
    "three_tokens_window": (2, 8, 2, 3, 32, [10, 302], 64),
    "sixteen_tokens_mha": (2, 4, 4, 16, 64, [0, 299], None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("case", list(DECODE))
def test_decode_matches_reference(case, splits, dtype, device):
    B, H, Hkv, Tq, D, starts, window = DECODE[case]
    q_offset = 300
    g = torch.Generator().manual_seed(1)
    raw = [torch.randn(B, h, t, D, generator=g).to(device, dtype)
           for h, t in ((H, Tq), (Hkv, q_offset + Tq), (Hkv, q_offset + Tq))]
    q, k, v = (nan_view(x) for x in raw)
    st = torch.tensor(starts, device=device, dtype=torch.int32)
    o = decode_attention(q, k, v, st, window, q_offset, num_splits=splits)
    ref = reference(*raw, st, window, q_offset)
    assert o.dtype == dtype and not o.isnan().any()
    assert rel_err(o, ref) < tol(dtype, device)
    pad = int(st.max()) - q_offset
    if pad > 0:
        assert (o[1, :, :pad] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("window", [None, 7])
def test_torch_decode_step_matches_reference(G, window, dtype):
    """The torch path's one-query branch (no autograd: generation; written-out matmuls in fp32,
    SDPA on grouped query rows in bf16) against the float64 rule: ragged rows, a row that is all
    padding (its one query precedes its start), GQA ratios."""
    B, Hkv, D, q_offset = 3, 2, 32, 40
    g = torch.Generator().manual_seed(G)
    raw = [torch.randn(B, h, t, D, generator=g).to(dtype)
           for h, t in ((Hkv * G, 1), (Hkv, q_offset + 1), (Hkv, q_offset + 1))]
    q, k, v = (nan_view(x) for x in raw)
    st = torch.tensor([0, 33, q_offset + 1])  # row 2 sees no key
    with torch.no_grad():
        o = attention(q, k, v, starts=st, window=window, q_offset=q_offset, impl="torch")
        with torch.enable_grad():  # the SDPA branch, for comparison
            o_sdpa = attention(q, k, v, starts=st, window=window, q_offset=q_offset, impl="torch")
    ref = reference(*raw, st, window, q_offset)
    assert o.dtype == dtype and not o.isnan().any()
    assert rel_err(o, ref) < tol(dtype, "cpu") and rel_err(o_sdpa, ref) < tol(dtype, "cpu")
    assert (o[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_routes_small_tq_without_grad_to_decode(device, monkeypatch):
    import spin_kernels.attention as A

    calls = []
    real = A.decode_attention
    monkeypatch.setattr(A, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 4, 2, 16, device=device)
    k = torch.randn(1, 2, 40, 16, device=device)
    with torch.no_grad():
        o = attention(q, k, k, q_offset=38, window=10, impl="triton")
    assert calls and rel_err(o, reference(q, k, k, None, 10, 38)) < tol(torch.float32, device)


def test_auto_is_torch_on_cpu_and_errors_are_clear():
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    assert torch.equal(attention(q, k, k), attention(q, k, k, impl="torch"))
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, k, q_offset=2)  # Tk must equal q_offset + Tq
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(1, 3, 5, 16), k, k)
    with pytest.raises(ValueError, match="power-of-two"):
        attention(torch.randn(1, 4, 5, 24), torch.randn(1, 2, 5, 24), torch.randn(1, 2, 5, 24), impl="triton")
    with pytest.raises(ValueError):
        attention(q, k, k, impl="cuda")


def test_install_fixes_the_impl_and_entry_points_read_no_environment(monkeypatch):
    """spin_kernels.install decides once what the model's attention and log-prob head ask for;
    the entry points' "auto" is Triton for CUDA tensors only and never reads SPIN_KERNELS.
    "triton" outside the interpreter means CUDA tensors (CPU ones take the torch path), as
    --kernels triton always did; inside it, CPU tensors run the kernels too."""
    import spin_kernels
    import spin_kernels.attention as A
    import spin_kernels.logprob as L
    from spin_kernels.common import HAS_TRITON, resolve_impl
    from model import Mistral, ModelConfig

    monkeypatch.setenv("SPIN_KERNELS", "torch")  # ignored by the entry points
    assert resolve_impl("auto", on_cuda=True) == ("triton" if HAS_TRITON else "torch")
    assert resolve_impl("auto", on_cuda=False) == "torch" and resolve_impl("triton", on_cuda=False) == "triton"
    with pytest.raises(ValueError):
        resolve_impl("fast", on_cuda=False)
    monkeypatch.delenv("SPIN_KERNELS")
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    for interpret, choice, asked in ((False, "triton", "auto"), (True, "triton", "triton"),
                                     (False, "torch", "torch"), (True, "auto", "auto")):
        monkeypatch.setattr(spin_kernels, "INTERPRET", interpret)
        m = spin_kernels.install(Mistral(cfg), choice)
        assert m.kernels == choice
        assert m.head_logprobs.keywords["impl"] == asked
        assert m.model.layers[0].self_attn.attend.keywords["impl"] == asked
    # The plumbing: both entry points route by what resolve_impl answers.
    asked, calls = [], []
    fake = lambda impl, on_cuda: asked.append(impl) or "triton"  # noqa: E731
    monkeypatch.setattr(A, "resolve_impl", fake)
    monkeypatch.setattr(L, "resolve_impl", fake)
    monkeypatch.setattr(A, "attention_triton", lambda *a: calls.append("attn") or A.attention_torch(*a))
    real = L.TritonLinearLogprobs.apply
    monkeypatch.setattr(L.TritonLinearLogprobs, "apply", lambda *a: calls.append("logprob") or real(*a))
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    attention(q, k, k)
    L.linear_logprobs(torch.randn(5, 16), torch.randn(40, 16), torch.randint(0, 40, (5,)))
    assert asked == ["auto", "auto"] and calls == ["attn", "logprob"]


@pytest.mark.parametrize("grad", [False, True])
def test_tensor_offset_takes_the_torch_path_over_every_slot(grad):
    """A static cache (spin_kernels/cuda_graph.py) passes its length as a 0-dim tensor and every
    slot as keys: the result is the one of the filled keys alone, with any impl."""
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    starts = torch.tensor([0, 3])
    with torch.set_grad_enabled(grad):
        want = attention(q, k[:, :, :7], v[:, :, :7], starts=starts, window=4, q_offset=6, impl="torch")
        got = attention(q, k, v, starts=starts, window=4, q_offset=torch.tensor(6), impl="triton")
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_query_step_over_a_whole_float32_cache(qdtype, impl):
    """slots.WholeKVCache hands a one-query step every slot of its buffers, in float32 whatever
    the queries' dtype; the slots past the query hold what earlier rows left there (finite,
    here large) and must stay hidden. The result is the float64 rule's over the filled keys, in
    the queries' dtype, with any impl (the torch path reads such a cache). Only a one-query step
    may pass more slots or other dtypes."""
    B, Hkv, G, D, q_offset, S = 3, 2, 3, 32, 20, 29
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hkv * G, 1, D, generator=g).to(qdtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g) for _ in range(2))
    k[:, :, q_offset + 1:] *= 100
    v[:, :, q_offset + 1:] *= 100
    st = torch.tensor([0, 7, q_offset + 1])  # row 2 sees no key
    with torch.no_grad():
        o = attention(q, k, v, starts=st, window=5, q_offset=q_offset, impl=impl)
    ref = reference(q, k[:, :, :q_offset + 1], v[:, :, :q_offset + 1], st, 5, q_offset)
    assert o.dtype == qdtype and o.shape == (B, Hkv * G, 1, D)
    assert rel_err(o, ref) < (1e-5 if qdtype == torch.float32 else 8e-3)  # bf16: the output's rounding
    assert (o[2] == 0).all()
    with pytest.raises(ValueError, match="one-query"):
        attention(torch.randn(B, Hkv * G, 2, D), k, v, q_offset=q_offset, impl=impl)
    if qdtype != torch.float32:
        with pytest.raises(ValueError, match="one-query"):
            attention(torch.randn(B, Hkv * G, 2, D).to(qdtype), k[:, :, :q_offset + 2], v[:, :, :q_offset + 2],
                      q_offset=q_offset, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_mask_kept_for_a_step_follows_the_starts(dtype):
    """The one-query branch keeps its CPU mask for the layers of a step; a cache whose starts
    change in place between steps (slots.py refills and compacts rows) must get a new one, even
    at the same cache length."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, t, 16, generator=g).to(dtype) for h, t in ((4, 1), (2, 9), (2, 9)))
    with torch.inference_mode():  # as in generation: inference tensors have no version counter
        starts = torch.tensor([0, 3])
        first = attention(q, k, v, starts=starts, q_offset=8, impl="torch")
        starts[1] = 6  # in place, same length
        second = attention(q, k, v, starts=starts, q_offset=8, impl="torch")
    for got, st in ((first, [0, 3]), (second, [0, 6])):
        ref = reference(q, k, v, torch.tensor(st), None, 8)
        assert rel_err(got, ref) < tol(dtype, "cpu")
    assert not torch.equal(first[1], second[1])
