"""The embedded tasks: small generated problems with a verifier, written as chat SFT files.

Three kinds, chosen with `kind=`; `digits` sets the size of the numbers:

    addition            user: 372+485:             assistant: 2+5=7;7+8=15;3+4+1=8;857
        The CPU demo (digits=3). One step per digit, least significant first: `x+y=s`, or
        `x+y+1=s` when a carry comes in; then the sum. One correct response: exact match.
    addition_anyorder   user: 372+485 any order:   assistant: 5+2=7;7+8=15;4+3+1=8;857
        The same problems, but each step may write its two digits in either order, so a
        problem of d digits has up to 2^d correct responses (fewer where a step adds two equal
        digits); the training answer is one of them, drawn at random. A verifier checks
        every step. Same algorithm as `addition`, only the targets are stochastic: the pair
        isolates what stochastic targets do to SPIN.
    factor              user: factor 1692:         assistant: 6*282
        N has `digits` digits and a one-digit divisor (2..9); any `a*b` with a, b > 1 and
        a*b = N is right (1692: 2*846, 846*2, 3*564, 4*423, 36*47, ...: 16 forms). The
        training answer is a*(N/a) for a one-digit divisor a of N drawn at random. No worked
        steps: the model must learn divisibility rules and long division by a digit in its
        head, which a tiny model does only in part. (With a divisor drawn from all of N's
        divisors the targets need N's full factorisation, which a tiny model can only
        memorise: 3.2% held-out at 89% train with 3 digits, experiments/EXPLORATION.md.)

Prompts name their kind, so `score(prompt, response)` needs nothing else and a data file is
checkable on its own. Problems are distinct, so held-out prompts never occur in training.
Files go through the same writers users' data goes through (messages layout, JSON Lines),
so the demo exercises the real ingestion path.
"""

import os
import re

import numpy as np

from data.readers import Example, write_examples

KINDS = ("addition", "addition_anyorder", "factor")

_PROMPT_RE = re.compile(r"^\s*(\d+)\+(\d+):\s*$")
_ANYORDER_RE = re.compile(r"^\s*(\d+)\+(\d+) any order:\s*$")
_FACTOR_RE = re.compile(r"^\s*factor (\d+):\s*$")
_STEP_RE = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")
_FACTORS_RE = re.compile(r"^([1-9]\d*)\*([1-9]\d*)$")  # no leading zeros: "07*143" is not a form


# -- addition ------------------------------------------------------------------------------


def prompt_text(a, b):
    return f"{a}+{b}:"


def _digit_steps(a, b):
    # [(x, y, carry_in, s)] per digit, least significant first.
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append((x, y, carry, s))
        carry = s // 10
    return steps


def solution(a, b):
    """The full response: carry steps, then the sum."""
    steps = [f"{x}+{y}+1={s}" if c else f"{x}+{y}={s}" for x, y, c, s in _digit_steps(a, b)]
    return ";".join(steps + [str(a + b)])


def anyorder_solution(a, b, flips):
    """A response of `addition_anyorder`: step i writes its digits swapped where flips[i]."""
    steps = []
    for (x, y, c, s), f in zip(_digit_steps(a, b), flips):
        x, y = (y, x) if f else (x, y)
        steps.append(f"{x}+{y}+1={s}" if c else f"{x}+{y}={s}")
    return ";".join(steps + [str(a + b)])


def _addition_problems(seed, n, digits):
    # The demo's draw, unchanged: the default files must stay byte-identical.
    lo, hi = 10 ** (digits - 1), 10**digits  # a, b in [lo, hi)
    span = hi - lo
    if n > span * span:
        raise ValueError(f"only {span * span} distinct {digits}-digit problems")
    flat = np.random.default_rng(seed).choice(span * span, size=n, replace=False)
    return [(lo + k // span, lo + k % span) for k in flat.tolist()]


def _anyorder_correct(a, b, response):
    parts = response.split(";")
    steps = _digit_steps(a, b)
    if len(parts) != len(steps) + 1 or parts[-1] != str(a + b):
        return False
    for part, (x, y, c, s) in zip(parts, steps):
        m = _STEP_RE.match(part)
        if m is None or sorted((int(m.group(1)), int(m.group(2)))) != sorted((x, y)):
            return False
        if bool(m.group(3)) != bool(c) or m.group(4) != str(s):
            return False
    return True


# -- factor --------------------------------------------------------------------------------


def factor_problems(digits):
    """The numbers with `digits` digits that have a divisor in 2..9 (other than themselves),
    ascending: the problems of `factor`."""
    return [n for n in range(max(10 ** (digits - 1), 4), 10**digits) if small_divisors(n)]


def small_divisors(n):
    """The divisors a of n with 2 <= a <= 9 and a < n, ascending."""
    return [a for a in range(2, min(10, n)) if n % a == 0]


def _factor_correct(n, response):
    m = _FACTORS_RE.match(response)
    if m is None:
        return False
    a, b = int(m.group(1)), int(m.group(2))
    return a > 1 and b > 1 and a * b == n


# -- the family ----------------------------------------------------------------------------


def make_task(seed=0, n_train=2000, n_heldout=500, digits=3, kind="addition"):
    """(train, heldout) lists of Examples, all problems distinct. Deterministic in seed.
    For the kinds with several correct responses, the ground truth of each example is one
    of them drawn from a second stream, so the problems of a seed do not depend on it."""
    n = n_train + n_heldout
    forms = np.random.default_rng([seed, 1])  # answer forms; the problem draw uses `seed`
    if kind == "addition":
        examples = [_example(prompt_text(a, b), solution(a, b)) for a, b in _addition_problems(seed, n, digits)]
    elif kind == "addition_anyorder":
        examples = [_example(f"{a}+{b} any order:", anyorder_solution(a, b, forms.integers(0, 2, size=digits)))
                    for a, b in _addition_problems(seed, n, digits)]
    elif kind == "factor":
        pool = factor_problems(digits)
        if n > len(pool):
            raise ValueError(f"only {len(pool)} {digits}-digit numbers with a one-digit divisor; asked for {n}")
        examples = []
        for i in np.random.default_rng(seed).choice(len(pool), size=n, replace=False).tolist():
            num = pool[i]
            divs = small_divisors(num)
            a = divs[forms.integers(len(divs))]
            examples.append(_example(f"factor {num}:", f"{a}*{num // a}"))
    else:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    return examples[:n_train], examples[n_train:]


def _example(prompt, answer):
    return Example([{"role": "user", "content": prompt}], answer)


def write_task(out_dir, seed=0, n_train=2000, n_heldout=500, digits=3, kind="addition", n_val=0):
    """Write train.jsonl and heldout.jsonl (messages layout) into out_dir; returns both paths.
    n_val > 0 also writes val.jsonl: that many more problems, disjoint from both, for choosing
    an SFT checkpoint without looking at the held-out prompts the comparison is made on."""
    train, heldout = make_task(seed, n_train, n_heldout + n_val, digits, kind)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    write_examples(paths[0], train, "messages")
    write_examples(paths[1], heldout[:n_heldout], "messages")
    if n_val:
        write_examples(os.path.join(out_dir, "val.jsonl"), heldout[n_heldout:], "messages")
    return paths


def _user_text(prompt):
    # A prompt string, or prompt messages (the last user turn is read).
    if isinstance(prompt, list):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    return prompt


def parse_prompt(prompt):
    """An addition prompt (either addition kind) -> (a, b)."""
    text = _user_text(prompt)
    m = _PROMPT_RE.match(text) or _ANYORDER_RE.match(text)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def task_kind(prompt):
    """Which kind of task a prompt belongs to."""
    text = _user_text(prompt)
    for kind, regex in zip(KINDS, (_PROMPT_RE, _ANYORDER_RE, _FACTOR_RE)):
        if regex.match(text):
            return kind
    raise ValueError(f"not a prompt of any embedded task ({', '.join(KINDS)}): {prompt!r}")


def parse_answer(response):
    """The final number of a response, or None if it does not end in one."""
    m = re.search(r"(?:^|;)(\d+)\s*$", response)
    return int(m.group(1)) if m else None


def score(prompt, response):
    """1 if the response is correct for the prompt, else 0; surrounding whitespace ignored.
    addition: exact match of steps and sum; addition_anyorder and factor: the verifier."""
    kind, text, response = task_kind(prompt), _user_text(prompt), response.strip()
    if kind == "factor":
        return int(_factor_correct(int(_FACTOR_RE.match(text).group(1)), response))
    a, b = parse_prompt(text)
    if kind == "addition":
        return int(response == solution(a, b))
    return int(_anyorder_correct(a, b, response))


def answer_correct(prompt, response):
    """Looser metric: only the final result is checked (the sum; for factor, the same as score)."""
    if task_kind(prompt) == "factor":
        return score(prompt, response)
    a, b = parse_prompt(prompt)
    return int(parse_answer(response) == a + b)
