"""data/task.py: the default demo files are byte-identical to those shipped before the task
family existed; each kind's verifier accepts every correct form and rejects wrong ones."""

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.readers import read_examples
from data.task import (KINDS, answer_correct, anyorder_solution, factor_problems, make_task, score,
                       small_divisors, solution, task_kind, write_task)

# sha256 of train.jsonl and heldout.jsonl written by write_task(dir, seed=S) (and n_train=500)
# at commit 8181ac1, before the family: the demo's data, and so its runs, must not move.
BEFORE = {
    (0, 2000): ("f1346a770e16592bb2b342dd5b45847ae88b8d5a6d209831bcb7eb154c80987c",
                "012e2c9bf7491da8dd01a71f536b3b3c25f4a31033a0bd346bf49761a9ff08b4"),
    (1, 2000): ("3cc82ad3366ce5c29cdf274bd0cc1c9ac3325df24a59bfffac01e5ea1b32ea57",
                "a5272646e0988ab5e6c5117f0239731c1f5db6a977fd6c1896c757c0e5df2b50"),
    (2, 2000): ("727b36cf5622382e33e07b464cd83a5434eec69e98270dd8624a0e3fe946c2c5",
                "870665dab88761cf885e91ae21a374a3ac2981b1294bbefa01024f6a2a088a32"),
    (0, 500): ("f060d9792f15cb35947f07cb3f40ef31476a7c47cb9fec61ace7232c22dbda30",
               "ef983e48e0c45a2ac07de9069d528ff34693cbbda7b4840a814bdc31d054edd3"),
}


@pytest.mark.parametrize("seed, n_train", sorted(BEFORE))
def test_default_files_byte_identical(tmp_path, seed, n_train):
    paths = write_task(tmp_path, seed=seed) if n_train == 2000 else write_task(tmp_path, seed=seed, n_train=n_train)
    got = tuple(hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths)
    assert got == BEFORE[(seed, n_train)]


@pytest.mark.parametrize("kind, digits", [("addition", 5), ("addition_anyorder", 3), ("factor", 4)])
def test_every_kind_seeded_disjoint_and_verified(tmp_path, kind, digits):
    train, held = make_task(seed=3, n_train=300, n_heldout=100, digits=digits, kind=kind)
    assert (train, held) == make_task(seed=3, n_train=300, n_heldout=100, digits=digits, kind=kind)
    assert make_task(seed=4, n_train=300, n_heldout=100, digits=digits, kind=kind)[0] != train
    prompts = [e.prompt[0]["content"] for e in train]
    assert len(set(prompts)) == 300 and set(prompts).isdisjoint(e.prompt[0]["content"] for e in held)
    assert all(task_kind(e.prompt) == kind and score(e.prompt, e.response) == 1 for e in train + held)
    got, report = read_examples(write_task(tmp_path, 3, 300, 100, digits, kind)[0])  # the ordinary ingestion path
    assert report.layout == "messages" and got == train


def test_stochastic_kinds_draw_several_forms():
    # The same problems as the deterministic kind (the forms come from a second stream), and
    # ground truths that are not all the canonical form.
    add, _ = make_task(seed=0, n_train=200, n_heldout=0, kind="addition")
    free, _ = make_task(seed=0, n_train=200, n_heldout=0, kind="addition_anyorder")
    assert [e.prompt[0]["content"].replace(" any order", "") for e in free] == [e.prompt[0]["content"] for e in add]
    assert 150 < sum(f.response != a.response for a, f in zip(add, free)) < 200  # 1 - 1/8 expected
    fac, _ = make_task(seed=0, n_train=300, n_heldout=0, digits=4, kind="factor")
    first = [int(e.response.split("*")[0]) for e in fac]
    assert all(2 <= a <= 9 for a in first) and len(set(first)) == 8
    # 1692 = 2^2 * 3^2 * 47 has 2, 3, 4, 6 and 9 as one-digit divisors: 5 training forms.
    got = {make_task(seed=s, n_train=1, n_heldout=0, digits=4, kind="factor")[0][0].response for s in range(400)}
    assert small_divisors(1692) == [2, 3, 4, 6, 9] and len(got) > 50  # many problems, and forms vary


def test_factor_forms_are_drawn_not_fixed():
    # The same problem in many seeds' draws gets different training answers.
    answers = {}
    for s in range(60):
        for e in make_task(seed=s, n_train=300, n_heldout=0, digits=3, kind="factor")[0]:
            answers.setdefault(e.prompt[0]["content"], set()).add(e.response)
    assert answers["factor 120:"] <= {f"{a}*{120 // a}" for a in small_divisors(120)}
    assert len(answers["factor 120:"]) >= 5  # 2, 3, 4, 5, 6, 8 divide 120


def test_bad_kind_and_too_many_problems():
    with pytest.raises(ValueError, match="unknown task kind 'mul'.*addition, addition_anyorder, factor"):
        make_task(kind="mul")
    with pytest.raises(ValueError, match="only 694 3-digit numbers with a one-digit divisor"):
        make_task(n_train=2000, n_heldout=500, digits=3, kind="factor")
    with pytest.raises(ValueError, match="not a prompt of any embedded task"):
        score("12*34:", "408")


# -- the verifiers ---------------------------------------------------------------------------


def test_addition_is_exact_match():
    assert solution(372, 485) == "2+5=7;7+8=15;3+4+1=8;857"
    assert score("372+485:", "2+5=7;7+8=15;3+4+1=8;857") == 1
    assert score([{"role": "user", "content": "372+485:"}], " 2+5=7;7+8=15;3+4+1=8;857\n") == 1
    assert score("372+485:", "5+2=7;7+8=15;3+4+1=8;857") == 0  # a correct any-order form is not this task's
    assert score("372+485:", "2+5=7;7+8=15;3+4=7;857") == 0
    assert answer_correct("372+485:", "junk;857") == 1 and answer_correct("372+485:", "857x") == 0


def test_anyorder_accepts_all_forms():
    p = "372+485 any order:"
    forms = {anyorder_solution(372, 485, flips) for flips in itertools.product([0, 1], repeat=3)}
    assert len(forms) == 8 and solution(372, 485) in forms
    assert "5+2=7;8+7=15;4+3+1=8;857" in forms
    assert all(score(p, f) == 1 for f in forms)
    # A step whose digits are equal has one form only: 2^(distinct steps) forms in all.
    assert len({anyorder_solution(303, 505, f) for f in itertools.product([0, 1], repeat=3)}) == 4


@pytest.mark.parametrize("wrong", [
    "2+5=7;7+8=15;3+4+1=8;858",      # wrong sum
    "2+5=7;7+8=15;3+4=8;857",        # carry dropped
    "2+5+1=8;7+8=15;3+4+1=8;857",    # carry where none comes in
    "2+5=7;7+8=15;3+4+1=9;857",      # wrong step result
    "2+6=8;7+8=15;3+4+1=8;857",      # wrong digit
    "2+5=7;8+7=15;857",              # a step missing
    "2+5=7;7+8=15;3+4+1=8;0+0=0;857",  # a step too many
    "2+5=7;7+8=15;1+3+4=8;857",      # carry not last
    "2+5=07;7+8=15;3+4+1=8;857",     # leading zero
    "2+5=7, 7+8=15, 3+4+1=8, 857",   # wrong separator
    "",
])
def test_anyorder_rejects(wrong):
    assert score("372+485 any order:", wrong) == 0


@given(st.integers(100, 999), st.integers(100, 999), st.lists(st.booleans(), min_size=3, max_size=3))
def test_anyorder_property(a, b, flips):
    s = anyorder_solution(a, b, flips)
    assert score(f"{a}+{b} any order:", s) == 1 and answer_correct(f"{a}+{b} any order:", s) == 1
    assert score(f"{a}+{b} any order:", s.rsplit(";", 1)[0] + f";{a + b + 1}") == 0


def all_divisors(n):
    return [a for a in range(2, n) if n % a == 0]


def test_factor_accepts_every_factorisation():
    # The verifier accepts any factorisation, not only the one-digit ones training shows.
    p = "factor 1001:"
    assert all_divisors(1001) == [7, 11, 13, 77, 91, 143] and small_divisors(1001) == [7]
    for a in all_divisors(1001):
        assert score(p, f"{a}*{1001 // a}") == 1
    assert score("factor 1024:", "32*32") == 1 and score("factor 1024:", " 2*512 ") == 1


@pytest.mark.parametrize("wrong", ["1*1001", "1001*1", "7*144", "7 * 143", "07*143", "7*143*1", "7x143",
                                   "1001", "", "-7*-143", "7*0143", "7*143;", "7*143=1001"])
def test_factor_rejects(wrong):
    assert score("factor 1001:", wrong) == 0


@settings(max_examples=50)
@given(st.integers(1000, 9999))
def test_factor_property(n):
    assert (n in factor_problems(4)) == bool(small_divisors(n))
    assert all(score(f"factor {n}:", f"{a}*{n // a}") == 1 for a in all_divisors(n))
    assert score(f"factor {n}:", f"1*{n}") == 0 and score(f"factor {n}:", f"2*{n // 2 + 1}") == 0


def test_factor_problems():
    assert factor_problems(1) == [4, 6, 8, 9]
    assert factor_problems(2)[:6] == [10, 12, 14, 15, 16, 18]
    assert 11 * 13 not in factor_problems(3) and 7 * 11 in factor_problems(2)
    # n has a divisor in 2..9 iff one of the primes 2, 3, 5, 7 divides it. Two-digit numbers by
    # inclusion-exclusion over 2, 3, 5, 7 (pairs 6, 10, 14, 15, 21, 35; triples 30, 42, 70):
    # 45 + 30 + 18 + 13 - (15 + 9 + 7 + 6 + 4 + 2) + (3 + 2 + 1) = 69.
    assert len(factor_problems(2)) == 69


def test_kinds_listed():
    assert KINDS == ("addition", "addition_anyorder", "factor")
