"""heldout.evaluate, the README table's columns (exact match, GT logp/tok, samples=GT, reward acc,
margin), against an independent computation: transformers' forward pass for the log-probs,
transformers' greedy generate() for the decodes, and the rewards written out from their definition
beta * log(p_theta / p_t). The held-out set is built so that no column is at a trivial value
(0 or 1): some opponent samples equal the ground truth, the stored opponent log-probs put the ground
truth first on some pairs only, and the scorer accepts the greedy answer of some prompts only."""
import json

import torch

import heldout
from data import task
from data.readers import Example
from data.template import ChatFormat, render_prompt
from data.tokenizer import load_tokenizer, train_tokenizer
from hf_tiny import random_hf_mistral

BETA = 0.7
MAX_NEW = 12


def transformers_logp(hf, prompt, response):
    """sum log p(response | prompt) by transformers' own forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = hf(ids).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))


def test_evaluate_matches_an_independent_computation(tmp_path, monkeypatch):
    train, held = task.make_task(seed=0, n_train=200, n_heldout=12)
    folder = str(tmp_path / "model")
    train_tokenizer([render_prompt(e.prompt) + e.response for e in train], folder, vocab_size=300)
    tok = load_tokenizer(folder)
    fmt = ChatFormat(tok)
    hf, _ = random_hf_mistral(folder, vocab=tok.vocab_size, seed=3)
    gen = torch.Generator().manual_seed(0)

    examples, expected = [], []
    for i, e in enumerate(held):
        prompt = fmt.prompt_ids(e.prompt)
        same = i % 3 == 0  # the opponent answered the ground truth itself
        generated = e.response if same else held[(i + 1) % len(held)].response
        real_ids, gen_ids = fmt.response_ids(e.prompt, e.response), fmt.response_ids(e.prompt, generated)
        lp_real, lp_gen = transformers_logp(hf, prompt, real_ids), transformers_logp(hf, prompt, gen_ids)
        # stored log p_t: near p_theta's, so that the rewards rank either answer first
        ref_real = lp_real + float(torch.randn((), generator=gen)) * 5
        ref_gen = ref_real if same else lp_gen + float(torch.randn((), generator=gen)) * 5
        examples.append(Example(e.prompt, e.response, generated,
                                extras=dict(ref_real_logps=ref_real, ref_generated_logps=ref_gen)))
        r_real, r_gen = BETA * (lp_real - ref_real), BETA * (lp_gen - ref_gen)
        # greedy decoding by transformers, eos dropped as heldout.py drops it
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=list(tok.eos_ids), pad_token_id=tok.eos_ids[0])[0, len(prompt):].tolist()
        text = tok.decode([t for t in out if t not in tok.eos_ids])
        expected.append(dict(index=i, lp_real=lp_real, tokens=len(real_ids), first=r_real > r_gen,
                             margin=r_real - r_gen, same=same, text=text, right=i % 2 == 0))

    # The scorer: right on even prompts when handed transformers' greedy answer, wrong otherwise.
    answers = {json.dumps(ex.prompt): x for ex, x in zip(examples, expected)}
    monkeypatch.setattr(task, "score", lambda p, r: int(answers[json.dumps(p)]["right"] and r == answers[json.dumps(p)]["text"]))

    details = tmp_path / "details.jsonl"
    got = heldout.evaluate(folder, examples, fmt, beta=BETA, device="cpu", dtype=torch.float32,
                           max_length=256, max_prompt_length=128, batch_size=5, max_new_tokens=MAX_NEW,
                           has_task=True, details=str(details), impl="torch")

    n = len(expected)
    accuracy = sum(x["first"] for x in expected) / n
    assert 0 < accuracy < 1 and 0 < sum(x["same"] for x in expected) < n  # no column is trivial
    assert got["eval_examples"] == n
    assert got["reward_accuracy"] == accuracy
    assert abs(got["reward_margin"] - sum(x["margin"] for x in expected) / n) < 1e-4
    assert got["opponent_equals_gt"] == sum(x["same"] for x in expected) / n
    assert got["exact_match"] == sum(x["right"] for x in expected) / n
    gt = sum(x["lp_real"] for x in expected) / sum(x["tokens"] for x in expected)
    assert abs(got["gt_logp_per_token"] - gt) < 1e-5 * abs(gt)
    # the per-example outcomes the paired statistics read, in example order
    rows = [json.loads(l) for l in open(details)]
    assert [r["index"] for r in rows] == list(range(n))
    for r, x in zip(rows, expected):
        assert r["gt_tokens"] == x["tokens"] and abs(r["gt_logp"] - x["lp_real"]) < 1e-4 * abs(x["lp_real"])
        assert r["reward_real_first"] == x["first"] and r["exact"] == int(x["right"])


def test_without_opponent_samples_only_the_likelihood_and_task(tmp_path, monkeypatch):
    """Examples without the opponent's samples (how the SFT start is chosen): no reward columns."""
    train, held = task.make_task(seed=1, n_train=100, n_heldout=4)
    folder = str(tmp_path / "model")
    train_tokenizer([render_prompt(e.prompt) + e.response for e in train], folder, vocab_size=300)
    fmt = ChatFormat(load_tokenizer(folder))
    hf, _ = random_hf_mistral(folder, vocab=fmt.tok.vocab_size, seed=4)
    monkeypatch.setattr(task, "score", lambda p, r: 1)
    got = heldout.evaluate(folder, held, fmt, beta=BETA, device="cpu", dtype=torch.float32, max_length=256,
                           max_prompt_length=128, batch_size=3, max_new_tokens=4, has_task=True, impl="torch")
    assert set(got) == {"gt_logp_per_token", "eval_examples", "exact_match"} and got["exact_match"] == 1.0
    lps = [(transformers_logp(hf, fmt.prompt_ids(e.prompt), r), len(r))
           for e in held for r in [fmt.response_ids(e.prompt, e.response)]]
    gt = sum(a for a, _ in lps) / sum(b for _, b in lps)
    assert abs(got["gt_logp_per_token"] - gt) < 1e-5 * abs(gt)
