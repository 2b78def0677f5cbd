"""experiments/confirm.py: the confirmation's pre-registered analysis (experiments/CONFIRMATION.md),
recomputed here by plain loops from the outcome matrices and scipy."""
import numpy as np
import pytest

from experiments import confirm


def fake(S=4, P=30, seed=0):
    rng = np.random.default_rng(seed)
    keys = [("start", 0)] + [(a, t) for t in confirm.ITERATIONS for a in (*confirm.SPIN, *confirm.SFT, confirm.EQDROP)]
    held = {k: (rng.random((S, P)) < 0.6).astype(np.int8) for k in keys}
    val = {k: (rng.random((S, P)) < 0.6).astype(np.int8) for k in keys}
    return held, val


def test_choice_on_validation_and_its_ties():
    one = lambda *rows: np.array([[1] * r + [0] * (10 - r) for r in rows], dtype=np.int8)  # noqa: E731
    a, b = confirm.SPIN
    val = {(a, 1): one(3, 5), (b, 1): one(3, 6), (a, 2): one(7, 6), (b, 2): one(7, 2),
           (a, 3): one(1, 6), (b, 3): one(2, 1), (a, 4): one(7, 0), (b, 4): one(0, 0)}
    # seed 0: 7 at (a, 2), (b, 2), (a, 4): the earliest iteration, then beta 5 (a); seed 1: 6 at
    # (b, 1), (a, 2), (a, 3): iteration 1 wins.
    assert confirm.choose(val, confirm.SPIN) == [(a, 2), (b, 1)]
    held = {k: v[:, ::-1].copy() for k, v in val.items()}
    assert (confirm.selected(held, [(a, 2), (b, 1)]) == np.stack([held[(a, 2)][0], held[(b, 1)][1]])).all()


def test_endpoints_recomputed_by_hand():
    scipy_stats = pytest.importorskip("scipy.stats")
    held, val = fake()
    conf = confirm.analyse(held, val, n_boot=200)
    S = 4
    spin, sft = [], []
    for s in range(S):  # the choice, by loops
        for arms, out in ((confirm.SPIN, spin), (confirm.SFT, sft)):
            best = None
            for t in confirm.ITERATIONS:
                for arm in arms:
                    score = val[(arm, t)][s].sum()
                    if best is None or score > best[0]:
                        best = (score, arm, t)
            out.append(f"{best[1]}-{best[2]}")
    assert conf["chosen_spin"] == spin and conf["chosen_sft"] == sft
    row = lambda name, s: held[(name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1]))][s]  # noqa: E731
    e1 = [row(spin[s], s).mean() - held[("start", 0)][s].mean() for s in range(S)]
    e2 = [row(spin[s], s).mean() - row(sft[s], s).mean() for s in range(S)]
    p = []
    for got, want in zip(conf["primary"], (e1, e2)):
        assert got["per_seed"] == pytest.approx(want) and got["mean"] == pytest.approx(np.mean(want))
        assert got["p_t"] == pytest.approx(scipy_stats.ttest_1samp(want, 0).pvalue, rel=1e-7)
        assert got["p_tost"] == pytest.approx(max(scipy_stats.ttest_1samp(want, -0.02, alternative="greater").pvalue,
                                                  scipy_stats.ttest_1samp(want, 0.02, alternative="less").pvalue), rel=1e-7)
        p.append(got["p_t"])
    lo, hi = sorted(p)
    holm = {lo: min(1, 2 * lo), hi: min(1, max(2 * lo, hi))}
    assert [r["p_t_holm"] for r in conf["primary"]] == pytest.approx([holm[x] for x in p])
    # the secondary family: 20 against the start, 12 against continued SFT at lr 1e-5, 4 eqdrop - SPIN
    assert len(conf["secondary"]) == 36
    names = [r["name"] for r in conf["secondary"]]
    assert "spin_eqdrop_b5_lr1e-05-3 - spin_b5_lr1e-05-3" in names and "spin_b10_lr1e-05-4 - sft_lr1e-05-4" in names
    assert all(r["p_t_holm"] >= r["p_t"] for r in conf["secondary"])


def test_verdicts_follow_the_decision_rule():
    base = {"mean": 0.01, "p_t_holm": 0.2, "p_tost_holm": 0.01, "mde80": 0.034}
    assert confirm.verdict(base) == "within 2 points"
    assert confirm.verdict({**base, "p_t_holm": 0.01}) == "above and within 2 points"
    assert confirm.verdict({**base, "mean": -0.05, "p_t_holm": 0.001, "p_tost_holm": 0.9}) == "below"
    assert confirm.verdict({**base, "p_tost_holm": 0.3}).startswith("not resolved") and "3.4 points" in \
        confirm.verdict({**base, "p_tost_holm": 0.3})


def test_partial_results_are_marked_and_recomputed():
    from experiments.compare import summarise_matrix
    held, val = fake(S=3)
    res = summarise_matrix("factor5-1k-confirm", [5, 6, 7], held, n_boot=50, validation=val)
    assert res["partial"].startswith("3 of the 10 seeds") and len(res["confirmation"]["primary"]) == 2
    assert all(r["verdict"].startswith("none: partial") for r in res["confirmation"]["primary"])  # no conclusion
    full = summarise_matrix("factor5-1k-confirm", list(range(5, 15)), *fake(S=10)[:1], n_boot=50, validation=fake(S=10)[1])
    assert "partial" not in full
    assert "confirmation" not in summarise_matrix("factor5-1k-confirm", [5, 6, 7], held, n_boot=50)  # no validation
