"""linear_logprobs against a float64 reference: values, both gradients, ignored positions,
poisoned strided inputs, argument checks, and a structural check that the fused paths
never allocate an (N, V) tensor.

On a CPU-only machine the Triton path runs through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which proves the index arithmetic and masking on these shapes but not
bf16 dot numerics, race freedom or speed; the same tests run natively when CUDA is present.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spin_kernels.logprob as lp
from spin_kernels.logprob import linear_logprobs, linear_logprobs_naive

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["torch", "triton"]
# Output is computed in fp32 from upcast inputs, so it is tight for every input dtype;
# gradients are returned in the input dtype (and, on a GPU, the 16-bit Triton path rounds
# dlogits to the input dtype before its gradient dots), so their tolerance follows it.
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_inputs(N, C, V, dtype, device, seed=0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=gen)
    weight = torch.randn(V, C, generator=gen) * (2.0 / math.sqrt(C))  # logits of std ~2
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = ignore_index  # prompt / padding positions, including the first
    targets[N - 1] = V - 1  # the last vocab column, the one a tail mask could drop
    grad = torch.randn(N, generator=gen, dtype=torch.float64)
    return (hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype),
            targets.to(device), grad.to(device))


def reference(hidden, weight, targets, grad, ignore_index=-100):
    """float64 values and gradients of the same (already rounded) inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    out = linear_logprobs_naive(h, w, targets, ignore_index=ignore_index)
    (out * grad).sum().backward()
    return out.detach(), h.grad, w.grad


def run(hidden, weight, targets, grad, impl, ignore_index=-100):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = linear_logprobs(h, w, targets, ignore_index=ignore_index, impl=impl)
    (out * grad.float()).sum().backward()
    return out, h.grad, w.grad


def assert_close_scaled(got, want, rtol, what):
    # Error measured against the tensor's scale: gradient entries near zero are as
    # uncertain in absolute terms as the large ones.
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 32003])
def test_matches_float64_reference(device, impl, dtype, V):
    N, C = 37, 48
    hidden, weight, targets, grad = make_inputs(N, C, V, dtype, device)
    out, dh, dw = run(hidden, weight, targets, grad, impl)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, grad)

    assert out.dtype == torch.float32 and out.shape == (N,)
    assert dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)
    assert_close_scaled(dh, ref_dh, GRAD_RTOL[dtype], "d hidden")
    assert_close_scaled(dw, ref_dw, GRAD_RTOL[dtype], "d weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_positions_give_zero_and_no_gradient(device, impl):
    N, C, V = 37, 48, 1000
    hidden, weight, targets, grad = make_inputs(N, C, V, torch.float32, device)
    targets = torch.where(targets == -100, -1, targets)  # a non-default ignore_index
    ignored = targets == -1
    out, dh, dw = run(hidden, weight, targets, grad, impl, ignore_index=-1)
    assert (out[ignored] == 0).all()
    assert (dh[ignored] == 0).all()
    assert (out[~ignored] < 0).all()

    # Every position ignored: zeros everywhere, gradients included.
    all_ignored = torch.full_like(targets, -1)
    out, dh, dw = run(hidden, weight, all_ignored, grad, impl, ignore_index=-1)
    assert (out == 0).all() and (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_into_nan_buffers(device, impl, dtype):
    """Inputs are views (with gaps and a column stride of 2) into NaN-filled buffers: an
    unmasked or mis-strided read turns an output or gradient NaN. The buffers are canaries
    too: neither pass may write into its inputs."""
    N, C, V = 37, 48, 1000
    hidden, weight, targets, grad = make_inputs(N, C, V, dtype, device, seed=1)
    hbuf = torch.full((N + 9, 2 * C + 5), float("nan"), dtype=dtype, device=device)
    hbuf[4:4 + N, 3:3 + 2 * C:2] = hidden
    wbuf = torch.full((V + 7, C + 11), float("nan"), dtype=dtype, device=device)
    wbuf[5:5 + V, 6:6 + C] = weight
    tbuf = torch.full((3 * N + 4,), 10**9, dtype=torch.int64, device=device)  # out of range
    tbuf[2:2 + 3 * N:3] = targets
    hview = hbuf[4:4 + N, 3:3 + 2 * C:2]
    wview = wbuf[5:5 + V, 6:6 + C]
    tview = tbuf[2:2 + 3 * N:3]
    assert hview.stride() == (2 * C + 5, 2) and tview.stride() == (3,)
    hbuf_before, wbuf_before, tbuf_before = hbuf.clone(), wbuf.clone(), tbuf.clone()

    out, dh, dw = run(hview, wview, tview, grad, impl)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, grad)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)
    assert_close_scaled(dh, ref_dh, GRAD_RTOL[dtype], "d hidden")
    assert_close_scaled(dw, ref_dw, GRAD_RTOL[dtype], "d weight")
    assert torch.equal(hbuf.isnan(), hbuf_before.isnan())
    assert torch.equal(hbuf.nan_to_num(), hbuf_before.nan_to_num())
    assert torch.equal(wbuf.nan_to_num(), wbuf_before.nan_to_num())
    assert torch.equal(wbuf.isnan(), wbuf_before.isnan())
    assert torch.equal(tbuf, tbuf_before)


class LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of every tensor any aten op returns (bytes, because
    Triton's interpreter views whole storages as uint8 tensors)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), func
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS + ["naive"])
def test_never_allocates_n_by_v(device, impl, monkeypatch):
    # Tile budget: the torch path may hold one fp32 chunk of rows * V elements with
    # rows = TORCH_TILE_ELEMENTS // V (here 4096 // 1000 = 4 rows, 4000 elements); besides
    # that only (N, C), (V, C) and (N,) tensors. The Triton path holds no logits in torch
    # tensors at all. N * V = 256000 is 64x the tile, and V * C, N * C are far below it.
    N, C, V = 256, 16, 1000
    monkeypatch.setattr(lp, "TORCH_TILE_ELEMENTS", 4096)
    hidden, weight, targets, grad = make_inputs(N, C, V, torch.float32, device)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    with LargestAllocation() as mode:
        if impl == "naive":
            out = linear_logprobs_naive(h, w, targets)
        else:
            out = linear_logprobs(h, w, targets, impl=impl)
        (out * grad.float()).sum().backward()
    fp32 = 4  # bytes; every tensor here is fp32 (or int64 of length N)
    budget = {"torch": max(4 * V, V * C, N * C) * fp32, "triton": max(V * C, N * C) * fp32}
    if impl == "naive":  # the check itself must be able to fail
        assert mode.largest >= N * V * fp32
    else:
        assert mode.largest <= budget[impl], f"{mode.op} allocated {mode.largest} bytes"


@pytest.mark.parametrize("impl", IMPLS)
def test_argument_errors(impl):
    N, C, V = 8, 16, 50
    hidden, weight, targets, _ = make_inputs(N, C, V, torch.float32, "cpu")
    bad = targets.clone()
    bad[6] = V
    with pytest.raises(ValueError, match=r"targets\[6\] = 50"):
        linear_logprobs(hidden, weight, bad, impl=impl)
    bad[6] = -3
    with pytest.raises(ValueError, match=r"targets\[6\] = -3"):
        linear_logprobs(hidden, weight, bad, impl=impl)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_logprobs(hidden, weight[:, :-1], targets, impl=impl)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_logprobs(hidden, weight, targets[:-1], impl=impl)
    with pytest.raises(ValueError, match=r"hidden \(N, C\)"):
        linear_logprobs(hidden[None], weight, targets, impl=impl)
    with pytest.raises(TypeError, match="share one of"):
        linear_logprobs(hidden, weight.half(), targets, impl=impl)
    with pytest.raises(TypeError, match="int64"):
        linear_logprobs(hidden, weight, targets.float(), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(hidden, weight, targets, impl="cuda")


def test_auto_matches_torch_on_cpu():
    hidden, weight, targets, _ = make_inputs(37, 48, 1000, torch.float32, "cpu")
    assert torch.equal(linear_logprobs(hidden, weight, targets),
                       linear_logprobs(hidden, weight, targets, impl="torch"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_for_one_input_only(device, impl):
    # The backward skips the unneeded gradient; the one it computes must not change.
    hidden, weight, targets, grad = make_inputs(37, 48, 1000, torch.float32, device)
    _, ref_dh, ref_dw = reference(hidden, weight, targets, grad)
    h = hidden.clone().requires_grad_()
    (linear_logprobs(h, weight, targets, impl=impl) * grad.float()).sum().backward()
    assert_close_scaled(h.grad, ref_dh, 1e-4, "d hidden alone")
    w = weight.clone().requires_grad_()
    (linear_logprobs(hidden, w, targets, impl=impl) * grad.float()).sum().backward()
    assert_close_scaled(w.grad, ref_dw, 1e-4, "d weight alone")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens(device, impl):
    """A micro-batch can have no scored token (N = 0): empty output, zero weight gradient."""
    hidden, weight, targets, grad = make_inputs(5, 48, 1000, torch.float32, device)
    out, dh, dw = run(hidden[:0], weight, targets[:0], grad[:0], impl)
    assert out.shape == (0,) and dh.shape == (0, 48)
    assert dw.shape == weight.shape and not dw.any()
