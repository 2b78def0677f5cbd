"""The embedded task of the CPU demo: 3-digit addition with the carry steps written out.

    user: 372+485:      assistant: 2+5=7;7+8=15;3+4+1=8;857

One step per digit, least significant first: `a+b=s`, or `a+b+1=s` when a carry comes
in; then the sum. Every prompt has exactly one correct response, so `score` is exact
match. The data is written as ordinary chat SFT files (messages layout, JSON Lines) by the
same writers users' data goes through, so the demo exercises the real ingestion path.
"""

import os
import re

import numpy as np

from data.readers import Example, write_examples

_PROMPT_RE = re.compile(r"^\s*(\d+)\+(\d+):\s*$")


def prompt_text(a, b):
    return f"{a}+{b}:"


def solution(a, b):
    """The full response: carry steps, then the sum."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ";".join(steps + [str(a + b)])


def make_task(seed=0, n_train=2000, n_heldout=500, digits=3):
    """(train, heldout) lists of Examples; all (a, b) pairs distinct, so the held-out
    prompts never occur in training. Deterministic in seed."""
    lo, hi = 10 ** (digits - 1), 10**digits  # a, b in [lo, hi)
    span = hi - lo
    if n_train + n_heldout > span * span:
        raise ValueError(f"only {span * span} distinct {digits}-digit problems")
    flat = np.random.default_rng(seed).choice(span * span, size=n_train + n_heldout, replace=False)
    examples = []
    for k in flat.tolist():
        a, b = lo + k // span, lo + k % span
        examples.append(Example([{"role": "user", "content": prompt_text(a, b)}], solution(a, b)))
    return examples[:n_train], examples[n_train:]


def write_task(out_dir, seed=0, n_train=2000, n_heldout=500, digits=3):
    """Write train.jsonl and heldout.jsonl (messages layout) into out_dir; returns both paths."""
    train, heldout = make_task(seed, n_train, n_heldout, digits)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    write_examples(paths[0], train, "messages")
    write_examples(paths[1], heldout, "messages")
    return paths


def parse_prompt(prompt):
    """A prompt string, or prompt messages (the last user turn is read) -> (a, b)."""
    if isinstance(prompt, list):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def parse_answer(response):
    """The final number of a response, or None if it does not end in one."""
    m = re.search(r"(?:^|;)(\d+)\s*$", response)
    return int(m.group(1)) if m else None


def score(prompt, response):
    """Exact match of the whole response (steps and sum), surrounding whitespace ignored."""
    a, b = parse_prompt(prompt)
    return response.strip() == solution(a, b)


def answer_correct(prompt, response):
    """Looser metric: only the final sum is checked."""
    a, b = parse_prompt(prompt)
    return parse_answer(response) == a + b
