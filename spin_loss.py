"""
The SPIN objective (Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models", ICML 2024, arXiv 2401.01335), as pure functions of
per-sequence log-probs. Nothing here knows about models, tokenizers or devices.

SPIN is a two-player game played once per iteration t. The opponent is the frozen
previous model p_t = p_{theta_t}; it answers each prompt x with y' ~ p_t(.|x). The main
player p_theta learns to tell the ground-truth answer y ~ p_data(.|x) from y', with the
log-ratio to the opponent as its score (paper Section 4, Algorithm 1):

    L_SPIN(theta, theta_t) = E_{x, y ~ p_data(.|x), y' ~ p_t(.|x)} [
        l( lambda * log p_theta(y|x)  / p_t(y|x)
         - lambda * log p_theta(y'|x) / p_t(y'|x) ) ]

    l(u) = log(1 + exp(-u))    the logistic loss, the paper's choice (= -logsigmoid(u))
    lambda > 0                 the temperature; we call it beta, as DPO does

The minimiser becomes the next opponent, p_{t+1} = p_theta, and the game repeats.
This is exactly the DPO loss (Rafailov et al. 2023) with beta = lambda, chosen = the
real (ground-truth) answer, rejected = the generated answer, and the reference model =
the previous iteration's model. Only the data and the reference change each iteration.
What the paper proves about it (checked numerically in tests/test_spin_loss.py):
  Thm 5.2: if p_t = p_data, theta_t is a global minimiser (the game has stopped);
           if not, theta_t is not a minimiser for a suitable lambda.
  Thm 5.4: with the logistic loss and a rich enough model class, the minimiser is
           p_{t+1}(y|x) ∝ p_t(y|x) * (p_data(y|x) / p_t(y|x))^(1/lambda),
           so lambda = 1 jumps straight to p_data and a larger lambda moves less.
"""

import torch
import torch.nn.functional as F


def sequence_logps(token_logps, mask):
    # Sum of per-token log-probs over the response tokens only: (B, T) -> (B,). Prompt
    # and padding positions must contribute exactly 0 even if they hold -inf or NaN,
    # so select with where(); mask * logp would give 0 * -inf = NaN, in the forward
    # pass and in the gradient.
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask "
                         f"{tuple(mask.shape)} must both be (B, T)")
    return torch.where(mask.bool(), token_logps, 0.0).sum(-1)  # (B,)


def spin_loss(policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps,
              beta=0.1, loss_type="sigmoid", reduction="mean"):
    # Every input is a (B,) tensor of sequence log-probs log p(y|x): "policy" is p_theta
    # (with gradient), "ref" the opponent p_t (precomputed, no gradient needed), "real" the
    # ground-truth answer y, "generated" the opponent's own answer y'.
    # Returns (loss, metrics): loss is the mean over the batch (reduction="none" gives the
    # (B,) per-pair losses and per-pair metrics); metrics are detached float tensors, not
    # python floats, so callers can reduce them across ranks before logging.
    named = {"policy_real_logps": policy_real_logps, "policy_generated_logps": policy_generated_logps,
             "ref_real_logps": ref_real_logps, "ref_generated_logps": ref_generated_logps}
    for name, x in named.items():
        if x.dim() != 1 or x.shape != policy_real_logps.shape:
            raise ValueError(f"all log-prob inputs must share one 1-D shape (B,); "
                             f"{name} is {tuple(x.shape)}, policy_real_logps is "
                             f"{tuple(policy_real_logps.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")

    # Each answer's log-ratio log p_theta / p_t (times beta: its implicit reward), and u, the
    # scaled difference the loss l(u) reads.
    real_logratios = policy_real_logps - ref_real_logps                  # (B,)
    generated_logratios = policy_generated_logps - ref_generated_logps   # (B,)
    u = beta * (real_logratios - generated_logratios)                    # (B,)

    # l(u) = log(1 + exp(-u)) = -logsigmoid(u): logsigmoid stays finite for |u| of 1e4, where
    # log(sigmoid(u)) underflows to log(0) = -inf in float32 below about u = -88. The official
    # code's other choice of l (--loss-type hinge) is below the path, in other_loss.
    losses = -F.logsigmoid(u) if loss_type == "sigmoid" else other_loss(u, loss_type)

    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")
    # reduction="none": the (B,) per-pair losses and per-pair metrics (evaluation sums them in
    # its own order); "mean": their batch means.
    reduce = (lambda x: x.mean()) if reduction == "mean" else (lambda x: x)

    # The names the official SPIN/DPO trainers log, so their curves compare directly.
    # Computed in at least float32 (bf16 means are coarse), never below the input dtype.
    det = lambda x: x.detach().to(torch.promote_types(x.dtype, torch.float32))
    real_rewards = beta * det(real_logratios)
    generated_rewards = beta * det(generated_logratios)
    metrics = {
        "rewards/real": reduce(real_rewards),
        "rewards/generated": reduce(generated_rewards),
        "rewards/margins": reduce(real_rewards - generated_rewards),
        "rewards/accuracies": reduce((real_rewards > generated_rewards).float()),
        "logps/real": reduce(det(policy_real_logps)),
        "logps/generated": reduce(det(policy_generated_logps)),
    }
    return reduce(losses), metrics


def other_loss(u, loss_type):
    # l(u) = max(0, 1 - u), the official code's other option (SLiC-style): it stops pushing
    # once the real answer leads by a margin of 1. A new l is one more branch here.
    if loss_type == "hinge":
        return torch.relu(1 - u)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'hinge'")


def mixture_reference(ref_real_logps, ref_generated_logps, base_real_logps, base_generated_logps, alpha):
    # Opponent regularisation (Alami et al. 2024, arXiv 2404.04291), one of the study's arms
    # (experiments/): play against the geometric mixture p_ref ∝ p_base^alpha * p_t^(1-alpha)
    # of the base (SFT) model and the previous iteration, which keeps later iterations closer
    # to the base model. In log space the mixture is a weighted sum (its normaliser is the same
    # for y and y' and cancels in spin_loss's difference). alpha = 0 is plain SPIN, alpha = 1
    # the base. Returns the (real, generated) reference log-probs to pass to spin_loss.
    for name, x in (("base_real_logps", base_real_logps), ("base_generated_logps", base_generated_logps)):
        if x is None:
            raise ValueError("the mixture reference needs both base_real_logps and base_generated_logps "
                             f"(the base model's log-probs); {name} is missing")
        if x.dim() != 1 or x.shape != ref_real_logps.shape:
            raise ValueError(f"all log-prob inputs must share one 1-D shape (B,); "
                             f"{name} is {tuple(x.shape)}, ref_real_logps is {tuple(ref_real_logps.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0:
        return ref_real_logps, ref_generated_logps
    return (alpha * base_real_logps + (1 - alpha) * ref_real_logps,
            alpha * base_generated_logps + (1 - alpha) * ref_generated_logps)


def beta_for_iteration(schedule, t):
    # The official recipe changes beta between iterations (0.1 for t = 0, 1, 2, then 5.0
    # for t = 3), so a schedule is a float (constant) or a list indexed by iteration. A
    # list shorter than t + 1 repeats its last value, so [0.1, 0.1, 0.1, 5.0] also covers
    # any later iterations with 5.0.
    if t < 0:
        raise ValueError(f"iteration t must be >= 0, got {t}")
    betas = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
    if not betas:
        raise ValueError("beta schedule is empty")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise ValueError(f"every beta must be a positive number, got {b!r} in {schedule!r}")
    return float(betas[min(t, len(betas) - 1)])
