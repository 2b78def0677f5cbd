# Checks spin_loss.py against the paper (Chen et al. 2024, arXiv 2401.01335): the loss at
# the opponent, monotonicity, stability, equality with an independently written DPO loss,
# and Theorems 5.2 and 5.4 on a tabular policy, where the population loss is exact.
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spin_loss import beta_for_iteration, mixture_reference, sequence_logps, spin_loss

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=10, deadline=None)  # each example runs an optimiser

LOSS_TYPES = ["sigmoid", "hinge"]


def logps(n, lo=-50.0, hi=0.0, width=64):
    # lo = hi = None: any finite float of that width.
    floats = st.floats(lo, hi, width=width, allow_nan=False, allow_infinity=False)
    return st.lists(floats, min_size=n, max_size=n)


@st.composite
def batch(draw, lo=-50.0, hi=0.0, width=64):
    # Four (B,) lists of sequence log-probs: policy real/generated, ref real/generated.
    B = draw(st.integers(1, 16))
    return [draw(logps(B, lo, hi, width)) for _ in range(4)]


@st.composite
def distribution(draw, K, floor=0.1):
    # A distribution over K responses whose entries are bounded away from 0, so the
    # log-ratios in the population loss stay finite.
    w = torch.tensor(draw(st.lists(st.floats(floor, 1.0), min_size=K, max_size=K)),
                     dtype=torch.float64)
    return w / w.sum()


# ---- the loss at theta = theta_t -------------------------------------------------------

@FAST
@given(st.sampled_from([torch.float32, torch.float64]),
       st.data(), st.floats(1e-3, 10.0))
def test_at_opponent_sigmoid_is_log2_and_hinge_is_1(dtype, data, beta):
    # policy == reference makes both log-ratios exactly 0, whatever the log-probs are (any
    # finite float32), so each pair's loss is l(0): log 2 for the logistic loss, 1 for hinge.
    B = data.draw(st.integers(1, 64))
    real, gen = (torch.tensor(data.draw(logps(B, None, None, 32)), dtype=dtype) for _ in range(2))
    for loss_type, expected in [("sigmoid", math.log(2)), ("hinge", 1.0)]:
        exp = torch.tensor(expected, dtype=dtype)
        per_pair, _ = spin_loss(real, gen, real.clone(), gen.clone(), beta=beta,
                                loss_type=loss_type, reduction="none")
        assert torch.equal(per_pair, exp.expand(B))
        # The batch mean of B equal floats can be off by an ulp or two (summation
        # rounding), which is float arithmetic, not the loss: allow that much.
        loss, _ = spin_loss(real, gen, real.clone(), gen.clone(), beta=beta, loss_type=loss_type)
        assert abs(loss.item() - expected) <= 4 * torch.finfo(dtype).eps * expected


# ---- monotonicity ----------------------------------------------------------------------

@FAST
@given(batch(-20.0, 0.0), st.floats(0.05, 1.0), st.floats(0.1, 5.0), st.data())
def test_monotone_in_real_and_generated_logps(b, beta, delta, data):
    # Inputs in [-20, 0] and beta <= 1 keep |beta*u| <= 40: the logistic loss is not
    # saturated there in float64, so "strictly" is a fair demand of the sigmoid loss.
    # Hinge is flat once the margin exceeds 1, so it only has to be non-strictly monotone.
    pr, pg, rr, rg = (torch.tensor(x, dtype=torch.float64) for x in b)
    i = data.draw(st.integers(0, len(pr) - 1))
    bump = torch.zeros_like(pr)
    bump[i] = delta
    for loss_type in LOSS_TYPES:
        base, _ = spin_loss(pr, pg, rr, rg, beta=beta, loss_type=loss_type)
        up_real, _ = spin_loss(pr + bump, pg, rr, rg, beta=beta, loss_type=loss_type)
        up_gen, _ = spin_loss(pr, pg + bump, rr, rg, beta=beta, loss_type=loss_type)
        if loss_type == "sigmoid":
            assert up_real < base < up_gen
        else:
            assert up_real <= base <= up_gen


# ---- identical responses ---------------------------------------------------------------

@FAST
@given(batch(), st.floats(0.01, 5.0), st.sampled_from(LOSS_TYPES), st.floats(0.0, 1.0))
def test_identical_real_and_generated_give_zero_gradient(b, beta, loss_type, alpha):
    # If y' == y the policy scores the same sequence twice, so log p_theta(y) and
    # log p_theta(y') are one function of theta and their gradients cancel exactly.
    # Here that sequence's per-token log-probs are the parameters, summed by sequence_logps.
    B = len(b[0])
    tok = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, 5, dtype=torch.bool)
    s = sequence_logps(tok, mask)
    ref = torch.tensor(b[2], dtype=torch.float64)
    base = torch.tensor(b[3], dtype=torch.float64)
    ref_real, ref_gen = mixture_reference(ref, ref, base, base, alpha)
    loss, _ = spin_loss(s, s, ref_real, ref_gen, beta=beta, loss_type=loss_type)
    loss.backward()
    assert torch.equal(tok.grad, torch.zeros_like(tok))


# ---- numerical stability ---------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_1e4_gives_finite_loss_and_gradients(loss_type, dtype):
    # Every sign pattern of +-1e4 over the four inputs, with the official recipe's
    # largest beta (5.0), so beta*u reaches +-2e5, far past where log(sigmoid) is -inf.
    signs = torch.tensor([[(k >> j) & 1 for j in range(4)] for k in range(16)]) * 2 - 1
    x = (1e4 * signs.T.to(dtype)).clone().requires_grad_()  # (4, 16)
    loss, metrics = spin_loss(*x, beta=5.0, loss_type=loss_type, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # Far in the tail l(u) ~ -u: the worst pair's loss is 5 * 4e4 = 2e5 (not inf).
    assert loss.max().item() == pytest.approx(2e5, rel=1e-2)


# ---- equality with DPO, written independently -------------------------------------------

@FAST
@given(batch(-30.0, 0.0), st.floats(0.01, 2.0))
def test_equals_dpo_bradley_terry_loss(b, beta):
    # DPO with chosen = real, rejected = generated, reference = opponent: the negative log
    # Bradley-Terry probability that the chosen answer wins, with implicit rewards
    # r = beta * log(pi / ref). Computed by hand in float64 at moderate inputs.
    pr, pg, rr, rg = (torch.tensor(x, dtype=torch.float64) for x in b)
    pr.requires_grad_(), pg.requires_grad_()  # so the metrics must be detached explicitly
    r_chosen, r_rejected = beta * (pr - rr), beta * (pg - rg)
    p_win = torch.exp(r_chosen) / (torch.exp(r_chosen) + torch.exp(r_rejected))
    loss, m = spin_loss(pr, pg, rr, rg, beta=beta)
    assert loss.item() == pytest.approx((-torch.log(p_win)).mean().item(), rel=1e-9, abs=1e-12)
    hinge, _ = spin_loss(pr, pg, rr, rg, beta=beta, loss_type="hinge")
    expected_hinge = sum(max(0.0, 1.0 - (c - r)) for c, r in zip(r_chosen.tolist(), r_rejected.tolist()))
    assert hinge.item() == pytest.approx(expected_hinge / len(pr), rel=1e-9, abs=1e-12)
    # Metrics: means over the batch, detached 0-d float tensors (all-reducible).
    expected = {
        "rewards/real": r_chosen.mean(), "rewards/generated": r_rejected.mean(),
        "rewards/margins": (r_chosen - r_rejected).mean(),
        "rewards/accuracies": sum(float(c > r) for c, r in zip(r_chosen, r_rejected)) / len(pr),
        "logps/real": pr.mean(), "logps/generated": pg.mean(),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].dim() == 0 and not m[k].requires_grad and m[k].is_floating_point()
        assert m[k].item() == pytest.approx(float(torch.as_tensor(v).detach()), rel=1e-5, abs=1e-5)


# ---- the theorems on a tabular policy ---------------------------------------------------
# P prompts (uniform), K responses each. The policy is a free softmax over logits z (P, K),
# so any distribution with full support is reachable: the "general function class" the
# theorems assume. The expectation over y ~ p_data, y' ~ p_t is a finite sum, so the
# population loss below is exact, and it is computed by spin_loss itself over all K*K pairs.

def population_loss(z, p_data, p_t, lam, loss_type="sigmoid"):
    P, K = p_t.shape
    logp, logpt = torch.log_softmax(z, -1), p_t.log()
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")  # y = i, y' = j
    i, j = i.flatten(), j.flatten()                                          # (K*K,)
    per_pair, _ = spin_loss(logp[:, i].flatten(), logp[:, j].flatten(),
                            logpt[:, i].flatten(), logpt[:, j].flatten(),
                            beta=lam, loss_type=loss_type, reduction="none")
    weight = (p_data[:, i] * p_t[:, j]).flatten()   # P(y = i) * P(y' = j), per prompt
    return (weight * per_pair).sum() / P


@SLOW
@given(st.integers(4, 8), st.integers(1, 3), st.floats(0.5, 4.0), st.data())
def test_theorem_5_4_minimiser_is_tilted_opponent(K, P, lam, data):
    # Thm 5.4 (logistic loss): the global minimiser is p_t * (p_data / p_t)^(1/lambda),
    # normalised. Finding: this closed form holds exactly for the logistic loss itself;
    # no linear loss or constrained problem is needed. Why: the population loss sums
    # l(f(y) - f(y')) over ordered pairs, weighted p_data(y) p_t(y'); for each unordered
    # pair {a, b} only w_ab l(g) + w_ba l(-g) involves g = f(a) - f(b), minimised at
    # g = log(w_ab / w_ba) = log[p_data(a) p_t(b) / (p_t(a) p_data(b))], and f = log(p_data
    # / p_t) attains all of these at once. With f = lambda * log(p_theta / p_t) that is the
    # closed form. In the logits the loss is convex (l convex, f(y) - f(y') linear in z), so
    # LBFGS from theta_t (as SPIN starts) finds the global minimum. The logistic loss is
    # needed: with hinge, Adam by hand found a lower population loss than the closed form's.
    p_data = torch.stack([data.draw(distribution(K)) for _ in range(P)])  # (P, K)
    p_t = torch.stack([data.draw(distribution(K)) for _ in range(P)])     # (P, K)
    closed = p_t * (p_data / p_t) ** (1 / lam)
    closed = closed / closed.sum(-1, keepdim=True)

    z = p_t.log().clone().requires_grad_()
    opt = torch.optim.LBFGS([z], lr=1, max_iter=300, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_loss(z, p_data, p_t, lam)
        loss.backward()
        return loss

    opt.step(closure)
    found = torch.softmax(z.detach(), -1)
    torch.testing.assert_close(found, closed, rtol=0, atol=1e-6)
    # The closed form is a stationary point, independently of how well LBFGS converged.
    zc = closed.log().requires_grad_()
    population_loss(zc, p_data, p_t, lam).backward()
    assert zc.grad.abs().max().item() < 1e-10


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(1, 3), st.floats(0.01, 10.0),
       st.sampled_from(LOSS_TYPES), st.data())
def test_theorem_5_2_opponent_is_optimal_iff_it_matches_data(K, P, lam, loss_type, data):
    # At z = log p_t every pair has u = 0, so d/dz of l(u) is l'(0) * lambda * (e_y - e_y')
    # (the log-softmax normaliser cancels in the difference), and the full gradient is
    # l'(0) * lambda * (p_data - p_t) / P per prompt: zero iff p_t = p_data. l'(0) is -1/2
    # for the logistic loss and -1 for hinge (differentiable at 0, where 1 - u > 0).
    p_data = torch.stack([data.draw(distribution(K)) for _ in range(P)])
    for p_t in (p_data.clone(), torch.stack([data.draw(distribution(K)) for _ in range(P)])):
        z = p_t.log().clone().requires_grad_()
        loss = population_loss(z, p_data, p_t, lam, loss_type)
        loss.backward()
        slope = 0.5 if loss_type == "sigmoid" else 1.0
        torch.testing.assert_close(z.grad, -slope * lam * (p_data - p_t) / P,
                                   rtol=1e-9, atol=1e-12)
        if torch.equal(p_t, p_data):
            assert z.grad.abs().max().item() < 1e-12
        elif (p_data - p_t).abs().max() > 1e-3:
            # p_t != p_data: a small step downhill lowers the loss, so theta_t is not a
            # minimiser (here for every lambda > 0, the theorem only claims some lambda).
            step = z.detach() - 1e-3 * z.grad / z.grad.norm()
            assert population_loss(step, p_data, p_t, lam, loss_type) < loss.detach()


# ---- masking ---------------------------------------------------------------------------

@FAST
@given(st.integers(1, 6), st.integers(2, 12), st.sampled_from(["bool", "int", "float"]),
       st.data())
def test_sequence_logps_ignores_prompt_and_padding(B, T, mask_dtype, data):
    # Left-padded rows: `pad` padding slots, then `prompt` prompt tokens, then the response.
    # Everything outside the response is filled with garbage, including NaN and +-inf.
    tok = torch.empty(B, T, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    expected = []
    for b in range(B):
        pad = data.draw(st.integers(0, T - 1))
        prompt = data.draw(st.integers(0, T - 1 - pad))
        resp = data.draw(logps(T - pad - prompt, -20.0, 0.0))
        garbage = data.draw(st.lists(st.sampled_from([math.nan, -math.inf, math.inf, 1e30, -7.0]),
                                     min_size=pad + prompt, max_size=pad + prompt))
        tok[b] = torch.tensor(garbage + resp, dtype=torch.float64)
        mask[b, pad + prompt:] = True
        expected.append(math.fsum(resp))
    tok.requires_grad_()
    m = {"bool": mask, "int": mask.long(), "float": mask.double()}[mask_dtype]
    out = sequence_logps(tok, m)
    assert out.shape == (B,)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    # Masked-out positions get exactly zero gradient (not NaN), response positions one.
    assert torch.equal(tok.grad, mask.double())


def test_sequence_logps_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        sequence_logps(torch.zeros(6), torch.ones(6, dtype=torch.bool))


# ---- beta schedule ---------------------------------------------------------------------

def test_beta_schedule():
    official = [0.1, 0.1, 0.1, 5.0]
    assert [beta_for_iteration(official, t) for t in range(6)] == [0.1, 0.1, 0.1, 5.0, 5.0, 5.0]
    assert beta_for_iteration(0.1, 7) == 0.1
    assert beta_for_iteration((0.2, 0.3), 0) == 0.2
    assert beta_for_iteration([2], 3) == 2.0 and isinstance(beta_for_iteration([2], 3), float)
    with pytest.raises(ValueError, match="empty"):
        beta_for_iteration([], 0)
    for bad in (0.0, -0.1, [0.1, 0.0], [0.1, -5.0], [math.nan], True, "0.1"):
        with pytest.raises(ValueError, match="positive"):
            beta_for_iteration(bad, 0)
    with pytest.raises(ValueError, match=">= 0"):
        beta_for_iteration([0.1], -1)


# ---- geometric-mixture opponent (Alami et al. 2024) -------------------------------------

@FAST
@given(batch(), st.lists(st.floats(-50.0, 0.0), min_size=32, max_size=32),
       st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.sampled_from(LOSS_TYPES))
def test_alpha_mixture(b, extra, beta, alpha, loss_type):
    pr, pg, rr, rg = (torch.tensor(x, dtype=torch.float64) for x in b)
    B = len(pr)
    br, bg = torch.tensor(extra[:B], dtype=torch.float64), torch.tensor(extra[16:16 + B], dtype=torch.float64)
    kw = dict(beta=beta, loss_type=loss_type, reduction="none")
    plain, m_plain = spin_loss(pr, pg, rr, rg, **kw)
    # alpha = 0 is plain SPIN, whether or not base log-probs are passed.
    zero, m_zero = spin_loss(pr, pg, *mixture_reference(rr, rg, br, bg, 0.0), **kw)
    assert torch.equal(zero, plain) and all(torch.equal(m_zero[k], m_plain[k]) for k in m_plain)
    # alpha = 1 plays against the base model alone.
    one, _ = spin_loss(pr, pg, *mixture_reference(rr, rg, br, bg, 1.0), **kw)
    against_base, _ = spin_loss(pr, pg, br, bg, **kw)
    torch.testing.assert_close(one, against_base, rtol=0, atol=0)
    # In between, the reference log-prob is the weighted sum of the two.
    mixed, m = spin_loss(pr, pg, *mixture_reference(rr, rg, br, bg, alpha), **kw)
    by_hand, m_hand = spin_loss(pr, pg, alpha * br + (1 - alpha) * rr, alpha * bg + (1 - alpha) * rg, **kw)
    torch.testing.assert_close(mixed, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m["rewards/margins"], m_hand["rewards/margins"])


# ---- bad inputs ------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="ref_generated_logps is \\(3,\\)"):
        spin_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        spin_loss(x[None], x[None], x[None], x[None])
    with pytest.raises(ValueError, match="base_generated_logps is missing"):
        mixture_reference(x, x, x, None, 0.5)
    with pytest.raises(ValueError, match="base_real_logps"):
        mixture_reference(x, x, None, None, 0.5)
    with pytest.raises(ValueError, match="base_real_logps is \\(5,\\)"):
        mixture_reference(x, x, torch.zeros(5), x, 0.5)
    for alpha in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            mixture_reference(x, x, x, x, alpha)
    for beta in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="beta"):
            spin_loss(x, x, x, x, beta=beta)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="reduction"):
        spin_loss(x, x, x, x, reduction="sum")


def test_reduction_none_gives_per_pair_metrics():
    """heldout.py sums per-pair rewards from spin_loss itself: with reduction="none" every
    metric is (B,), and its mean is the reduction="mean" metric."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(7, generator=g) * 3 for _ in range(4)]
    per, met_none = spin_loss(*x, beta=0.7, reduction="none")
    mean, met_mean = spin_loss(*x, beta=0.7)
    assert per.shape == (7,) and torch.allclose(per.mean(), mean)
    real = 0.7 * (x[0] - x[2])
    gen = 0.7 * (x[1] - x[3])
    assert torch.equal(met_none["rewards/margins"], real - gen)
    assert torch.equal(met_none["rewards/accuracies"], (real > gen).float())
    for k, v in met_none.items():
        assert v.shape == (7,) and torch.allclose(v.mean(), met_mean[k]), k
