"""The confirmation's analysis (issue 37), as experiments/CONFIRMATION.md fixed it before the run:
models chosen per seed on validation prompts, the two primary endpoints with a paired t test, an
exact sign-flip test and an equivalence test (TOST, 2 points), Holm across each family, and every
interval named by what it resamples. Pure functions of the outcome matrices, so the committed
outcomes file recomputes every figure (`python -m experiments.compare factor5-1k-confirm --recompute`).

    held (dict): {(arm, iteration): (S, P) held-out 0/1 outcomes}
    val  (dict): {(arm, iteration): (S, P') validation 0/1 outcomes}, the same keys
"""
import numpy as np

from experiments import stats

SPIN = ("spin_b5_lr1e-05", "spin_b10_lr1e-05")  # candidates of the validation-selected SPIN, tie order
SFT = ("sft_lr1e-05", "sft_lr3e-05")  # of the validation-selected continued SFT
EQDROP = "spin_eqdrop_b5_lr1e-05"
ITERATIONS = (1, 2, 3, 4)
MARGIN = 0.02  # the equivalence margin: 2 points of exact match
LEVEL = 0.95
N_BOOT = 10000


def candidates():
    """Every (arm, iteration) the endpoints need, on validation and held-out prompts."""
    return [(a, t) for t in ITERATIONS for a in (*SPIN, *SFT)]


def choose(val, arms, iterations=ITERATIONS):
    """Per seed, the (arm, iteration) of `arms` x `iterations` with the highest validation exact
    match; ties go to the earlier iteration, then to the arm listed first."""
    candidates = [(a, t) for t in iterations for a in arms]  # the tie order
    scores = np.stack([val[k].mean(1) for k in candidates])  # (candidates, S)
    return [candidates[i] for i in np.argmax(scores, axis=0)]  # argmax: the first of equal maxima


def selected(held, chosen):
    """(S, P) held-out outcomes, each seed's row from the model chosen for it."""
    return np.stack([held[k][s] for s, k in enumerate(chosen)])


def compare(a, b, name, n_boot=N_BOOT):
    """a - b on the same seeds and prompts (S, P each): the per-seed differences, the three tests and
    the three intervals, in fractions (tables print points)."""
    diff = a.astype(np.float64) - b  # (S, P) in {-1, 0, 1}
    per_seed = diff.mean(1)
    t, p_t = stats.paired_t_test(per_seed)
    lower, upper, p_tost = stats.tost(per_seed, MARGIN)
    t95, t90 = stats.seed_t_interval(per_seed, level=LEVEL), stats.seed_t_interval(per_seed, level=0.90)
    within = stats.prompt_bootstrap(diff, n_boot=n_boot, level=LEVEL, seed=0)
    nested = stats.paired_difference(a, b, n_boot=n_boot, level=LEVEL, seed=0)
    return {"name": name, "mean": float(per_seed.mean()), "per_seed": per_seed.tolist(),
            "t": t, "p_t": p_t, "p_sign_flip": stats.sign_flip_test(per_seed),
            "p_tost_lower": lower, "p_tost_upper": upper, "p_tost": p_tost,
            "seed_t": [t95.lo, t95.hi], "seed_t90": [t90.lo, t90.hi],
            "prompts_within_seeds": [within.lo, within.hi], "seeds_then_prompts": [nested.lo, nested.hi],
            "mde80": stats.minimum_detectable_effect(float(per_seed.std(ddof=1)), per_seed.size)}


def with_holm(rows, keys=("p_t", "p_sign_flip", "p_tost")):
    """Each row gets <key>_holm: Holm's adjustment of key over the rows (the family)."""
    for key in keys:
        for row, adj in zip(rows, stats.holm([r[key] for r in rows])):
            row[key + "_holm"] = adj
    return rows


def verdict(row, alpha=0.05):
    """The protocol's decision rule, in words, at Holm-adjusted p."""
    said = []
    if row["p_t_holm"] < alpha:
        said.append("above" if row["mean"] > 0 else "below")
    if row["p_tost_holm"] < alpha:
        said.append(f"within {100 * MARGIN:g} points")
    if not said:
        return f"not resolved (80% power only for |effect| >= {100 * row['mde80']:.1f} points)"
    return " and ".join(said)


def analyse(held, val, n_boot=N_BOOT):
    spin, sft = choose(val, SPIN), choose(val, SFT)
    start = held[("start", 0)]
    best_spin, best_sft = selected(held, spin), selected(held, sft)
    primary = with_holm([compare(best_spin, start, "E1: validation-selected SPIN - start", n_boot),
                         compare(best_spin, best_sft, "E2: validation-selected SPIN - validation-selected "
                                                      "continued SFT", n_boot)])
    for row in primary:
        row["verdict"] = verdict(row)
    secondary = [compare(held[(a, t)], start, f"{a}-{t} - start", n_boot)
                 for t in ITERATIONS for a in (*SFT, *SPIN, EQDROP) if (a, t) in held]
    secondary += [compare(held[(a, t)], held[(SFT[0], t)], f"{a}-{t} - {SFT[0]}-{t}", n_boot)
                  for t in ITERATIONS for a in (*SPIN, EQDROP) if (a, t) in held and (SFT[0], t) in held]
    secondary += [compare(held[(EQDROP, t)], held[(SPIN[0], t)], f"{EQDROP}-{t} - {SPIN[0]}-{t}", n_boot)
                  for t in ITERATIONS if (EQDROP, t) in held and (SPIN[0], t) in held]
    return {"margin": MARGIN, "level": LEVEL, "n_boot": n_boot,
            "chosen_spin": [f"{a}-{t}" for a, t in spin], "chosen_sft": [f"{a}-{t}" for a, t in sft],
            "primary": primary, "secondary": with_holm(secondary, keys=("p_t",))}


def _pts(lo_hi):
    return f"{100 * lo_hi[0]:+.1f}, {100 * lo_hi[1]:+.1f}"


def _p(p):
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def table(conf, seeds):
    """Markdown: the choices, the primary endpoints with every test and interval, the secondary family."""
    S = len(seeds)
    out = ["", f"### The pre-registered endpoints (experiments/CONFIRMATION.md), {S} seed(s)", "",
           "Chosen on validation prompts, per seed (" + ", ".join(str(s) for s in seeds) + "): SPIN "
           + ", ".join(conf["chosen_spin"]) + "; continued SFT " + ", ".join(conf["chosen_sft"]) + ".", "",
           "Points of held-out exact match. Intervals (95%), by what they resample: {seed-level t} over the per-seed "
           "differences; [prompts within seeds] (the seeds fixed, their prompts resampled: prompt noise for these "
           "seeds only); <seeds then prompts> (the two-level bootstrap). p: raw / Holm over the family's 2 endpoints. "
           f"TOST: equivalence within +-{100 * conf['margin']:g} points (90% seed-level t interval inside the margin). "
           "MDE: the true difference the paired t test would detect with 80% power at this seed sd.", "",
           "| endpoint | mean | {seed-level t} | [prompts within seeds] | <seeds then prompts> | paired t p | "
           "sign-flip p | TOST p | MDE | per seed | reading |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in conf["primary"]:
        out.append(f"| {r['name']} | {100 * r['mean']:+.1f} | {{{_pts(r['seed_t'])}}} | [{_pts(r['prompts_within_seeds'])}] "
                   f"| <{_pts(r['seeds_then_prompts'])}> | {_p(r['p_t'])} / {_p(r['p_t_holm'])} | "
                   f"{_p(r['p_sign_flip'])} / {_p(r['p_sign_flip_holm'])} | {_p(r['p_tost'])} / {_p(r['p_tost_holm'])} "
                   f"| {100 * r['mde80']:.1f} | " + ", ".join(f"{100 * v:+.1f}" for v in r["per_seed"])
                   + f" | {r['verdict']} |")
    out += ["", f"Secondary comparisons (no decision attached): paired t p raw / Holm over these "
            f"{len(conf['secondary'])}; intervals as above.", "",
            "| comparison | mean | {seed-level t} | [prompts within seeds] | <seeds then prompts> | paired t p | "
            "sign-flip p | MDE |", "|---|---|---|---|---|---|---|---|"]
    for r in conf["secondary"]:
        out.append(f"| {r['name']} | {100 * r['mean']:+.1f} | {{{_pts(r['seed_t'])}}} | [{_pts(r['prompts_within_seeds'])}] "
                   f"| <{_pts(r['seeds_then_prompts'])}> | {_p(r['p_t'])} / {_p(r['p_t_holm'])} | "
                   f"{_p(r['p_sign_flip'])} | {100 * r['mde80']:.1f} |")
    return "\n".join(out)
