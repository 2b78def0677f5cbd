"""generate.py: sampling against transformers' generate and against full forwards; seeded
determinism; top-k/top-p sets; scoring; the dataset writer (layout, opponent log-probs, resume,
sharding, truncation, bad input)."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spin_kernels.cuda_graph import graphed_step as _real_graphed_step
from generate import blocked_inverse_cdf, draw, filter_logits, generate_dataset, main, merge_parts, sample, score
from data.template import ChatFormat
import spin_kernels
from hf_folder import load_model

from hf_tiny import random_hf_mistral  # noqa: E402

VOCAB = 97


def make_hf(folder, vocab=VOCAB, seed=0, **kw):
    return random_hf_mistral(folder, vocab=vocab, seed=seed, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf, folder = make_hf(str(tmp_path_factory.mktemp("gen") / "ckpt"), sliding_window=6)
    return hf, spin_kernels.install(load_model(folder))  # as generate.main runs it


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def full_logprobs(model, prompt, tokens):
    """log p(tokens[t] | prompt, tokens[:t]) from one plain forward, in float64."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = model(ids).double().log_softmax(-1)[0]  # (T, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logp[pos, torch.tensor(tokens)]


# -- sampling --------------------------------------------------------------------------------

def test_greedy_equals_transformers_generate(ckpt):
    hf, model = ckpt
    prompts = prompts_of([7, 3, 1])
    free = sample(model, prompts, max_new_tokens=12, eos_id=None, greedy=True)
    eos = free[0].tokens[4]  # a token greedy emits, so at least one row stops early
    ours = sample(model, prompts, max_new_tokens=12, eos_id=eos, greedy=True)
    assert ours[0].finished and ours[0].tokens[-1] == eos and len(ours[0].tokens) <= 5
    for p, f, o in zip(prompts, free, ours):
        for eos_id, got in ((None, f), (eos, o)):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                                  eos_token_id=eos_id, pad_token_id=0)[0, len(p):].tolist()
            assert got.tokens == ref
            assert got.finished == (eos_id is not None and eos_id in ref)


def test_padded_batch_rows_equal_each_prompt_alone(ckpt):
    _, model = ckpt
    prompts = prompts_of([11, 2, 7, 5, 9])
    batch = sample(model, prompts, max_new_tokens=10, eos_id=None, greedy=True, batch_size=5, logprobs=True)
    for p, b in zip(prompts, batch):
        alone = sample(model, [p], max_new_tokens=10, eos_id=None, greedy=True, logprobs=True)[0]
        assert b.tokens == alone.tokens
        assert max(abs(x - y) for x, y in zip(b.logprobs, alone.logprobs)) <= 1e-5


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0),
                                dict(temperature=0.5, top_k=5), dict(temperature=2.0, top_p=0.8)])
def test_logprobs_are_untempered_and_equal_a_full_forward(ckpt, kw):
    _, model = ckpt
    prompts = prompts_of([6, 13, 2])
    outs = sample(model, prompts, max_new_tokens=9, eos_id=None, seed=3, logprobs=True, **kw)
    for p, s in zip(prompts, outs):
        ref = full_logprobs(model, p, s.tokens)
        assert (torch.tensor(s.logprobs, dtype=torch.float64) - ref).abs().max().item() <= 1e-4
    # only computed when asked, and the draws do not depend on it
    plain = sample(model, prompts, max_new_tokens=9, eos_id=None, seed=3, **kw)
    assert all(p.logprobs is None and p.tokens == s.tokens for p, s in zip(plain, outs))
    # and score() agrees with the per-token sum
    for v, s in zip(score(model, prompts, [s.tokens for s in outs]), outs):
        assert abs(v - sum(s.logprobs)) <= 1e-4


def test_seeded_samples_independent_of_batching_and_sharding(ckpt):
    _, model = ckpt
    prompts = prompts_of([4, 9, 6, 2, 8, 3])
    kw = dict(max_new_tokens=8, eos_id=5, temperature=1.0, seed=7)
    ref = sample(model, prompts, batch_size=16, **kw)
    assert sample(model, prompts, batch_size=16, **kw) == ref
    for bs in (1, 4):
        got = sample(model, prompts, batch_size=bs, **kw)
        assert [g.tokens for g in got] == [r.tokens for r in ref]
    # a shard of the prompts, keyed by their global index, gets the same samples
    shard = sample(model, prompts[3:], stream_keys=[3, 4, 5], **kw)
    assert [s.tokens for s in shard] == [r.tokens for r in ref[3:]]
    other = sample(model, prompts, batch_size=16, **dict(kw, seed=8))
    assert [s.tokens for s in other] != [r.tokens for r in ref]


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=9), rows=st.integers(1, 4),
       max_new=st.integers(1, 30), eos=st.integers(3, VOCAB - 1), mode=st.sampled_from(["greedy", "t1", "topk"]),
       compact_at=st.sampled_from([1, 4, 32]), grow=st.sampled_from([1, 3, 16]), prefill_rows=st.sampled_from([1, 2, 16]))
def test_refilled_rows_equal_static_batches(ckpt, lengths, rows, max_new, eos, mode, compact_at, grow, prefill_rows):
    """slots.decode (rows replaced as they end, the cache compacted, rows dropped at the tail; on
    this CPU a WholeKVCache that grows GROW slots at a time, prompts prefilled PREFILL_ROWS at a
    time) against the static batches of sample_batch: the same tokens, ends and log-probs,
    whatever the prompt lengths (1-token prompts included), row count and thresholds."""
    import slots

    _, model = ckpt
    prompts = prompts_of(lengths, seed=len(lengths) * 31 + max_new)
    kw = dict(greedy=True) if mode == "greedy" else dict(temperature=1.0) if mode == "t1" \
        else dict(temperature=0.7, top_k=9)
    kw.update(max_new_tokens=max_new, eos_id=eos, seed=11, batch_size=rows, logprobs=True)
    ref = sample(model, prompts, refill=False, **kw)
    old = slots.COMPACT_AT, slots.GROW, slots.PREFILL_ROWS
    slots.COMPACT_AT, slots.GROW, slots.PREFILL_ROWS = compact_at, grow, prefill_rows
    try:
        got = sample(model, prompts, **kw)
    finally:
        slots.COMPACT_AT, slots.GROW, slots.PREFILL_ROWS = old
    assert len(got) == len(ref) == len(prompts)
    for r, g in zip(ref, got):
        assert (g.tokens, g.finished) == (r.tokens, r.finished)
        assert max((abs(x - y) for x, y in zip(g.logprobs, r.logprobs)), default=0) <= 1e-5


def test_refill_replaces_rows_and_compacts(ckpt, monkeypatch):
    """The refill path is the one taken: with more prompts than rows, rows are entered more than
    once, the cache is compacted and the tail's rows dropped; a row never decodes a finished
    prompt's steps (decode steps = what the longest-lived slot needs, not batches x longest)."""
    import slots

    _, model = ckpt
    prompts = prompts_of([12, 3, 9, 1, 7, 11, 2, 5, 8, 4])
    calls = {"compact": 0, "drop_rows": 0, "tokens": 0}

    def counted(name):
        real = getattr(slots, name)
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or real(*a)

    for name in ("compact", "drop_rows"):
        monkeypatch.setattr(slots, name, counted(name))
    monkeypatch.setattr(slots, "COMPACT_AT", 4)
    free = sample(model, prompts, max_new_tokens=40, eos_id=None, greedy=True)
    eos = free[0].tokens[3]
    got = sample(model, prompts, max_new_tokens=40, eos_id=eos, greedy=True, batch_size=3,
                 progress=lambda prompts=0, tokens=0: calls.__setitem__("tokens", calls["tokens"] + tokens))
    assert len({len(g.tokens) for g in got}) > 2  # rows end at different steps
    assert calls["compact"] > 0 and calls["drop_rows"] > 0
    # progress counts each kept token once
    assert calls["tokens"] == sum(len(g.tokens) for g in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_reads_whole_float32_buffers(tmp_path, dtype, monkeypatch):
    """On CPU, for an installed model at decode sizes, the refilled rows decode on a
    slots.WholeKVCache: float32 whatever the model's dtype, every decode step's attention given
    the whole contiguous buffers (values slot-minor), the capacity kept within GROW slots of the length by
    reallocating as it fills. A reference model, or more than DECODE_ROWS rows, keeps the sliced
    cache in the model's dtype (the demo's batches: their rounding is unchanged)."""
    import slots
    from spin_kernels.attention import whole_cache
    from spin_kernels.cpu_linear import DECODE_ROWS

    _, folder = make_hf(str(tmp_path / "ckpt"))
    model = spin_kernels.install(load_model(folder, dtype=dtype))
    assert whole_cache(model, DECODE_ROWS) and not whole_cache(model, DECODE_ROWS + 1)
    assert not whole_cache(load_model(folder, dtype=dtype), 4)
    seen = []
    real = slots.WholeKVCache.update

    def update(cache, layer, k, v):
        out = real(cache, layer, k, v)
        seen.append((cache.capacity - cache.length, out[0] is cache.k[layer] and out[1] is cache.v[layer],
                     out[0].dtype, out[0].is_contiguous() and out[1].mT.is_contiguous(), k.shape[2]))
        return out

    monkeypatch.setattr(slots.WholeKVCache, "update", update)
    monkeypatch.setattr(slots, "GROW", 3)
    prompts = prompts_of([7, 3, 9, 1, 5, 8])
    kw = dict(max_new_tokens=12, eos_id=None, seed=2, batch_size=4, logprobs=True)
    got = sample(model, prompts, **kw)
    steps = [s for s in seen if s[4] == 1]
    assert steps and all(whole and dt == torch.float32 and contiguous for _, whole, dt, contiguous, _ in steps)
    slack = [s[0] for s in steps]
    assert min(slack) >= 1 and max(slack) <= 3 and len(set(slack)) == 3  # it filled and grew, again and again
    ref = sample(model, prompts, refill=False, **kw)
    assert [g.tokens for g in got] == [r.tokens for r in ref]


def test_ended_rows_are_refilled_in_groups(ckpt, monkeypatch):
    """Rows that end wait until 1/REFILL_SHARE of the rows have (here 2 of 8) before prompts
    enter, together in one prefill, unless fewer prompts wait; the samples stay the static
    batches'. Rows end one at a time here, so entering at once would show groups of 1."""
    import slots

    _, model = ckpt
    prompts = prompts_of([12, 3, 9, 6, 7, 11, 2, 5, 8, 4, 6, 10, 3, 9, 5, 7, 2, 8, 11, 4], seed=5)
    free = sample(model, prompts, max_new_tokens=30, eos_id=None, greedy=True)
    eos = free[0].tokens[3]
    kw = dict(max_new_tokens=30, eos_id=eos, greedy=True, batch_size=8)
    ref = sample(model, prompts, refill=False, **kw)
    groups = []
    real = slots.collate_prompts
    monkeypatch.setattr(slots, "collate_prompts", lambda heads, **k: groups.append(len(heads)) or real(heads, **k))
    for share, least in ((4, 2), (8, 1)):
        groups.clear()
        monkeypatch.setattr(slots, "REFILL_SHARE", share)
        got = sample(model, prompts, **kw)
        assert [(g.tokens, g.finished) for g in got] == [(r.tokens, r.finished) for r in ref]
        assert groups[0] == 8 and sum(groups) == len(prompts)
        assert min(groups[1:-1]) >= least and groups[-1] >= 1
    assert min(groups[1:-1]) == 1  # share 8: every row that ends is refilled at once (1 of 8)


def allowed_sets(logits, top_k, top_p, slack):
    """Reference sets computed from the definitions: (surely allowed, possibly allowed).
    A token may be kept iff fewer than k tokens have a larger logit and the probability mass
    of more probable tokens (after top-k) is below top_p. Ties may be ordered either way, so
    "surely" counts tied tokens as more probable and "possibly" does not; `slack` absorbs rounding."""
    V = logits.shape[0]
    higher = (logits[None, :] > logits[:, None]).sum(1)  # tokens with a larger logit
    in_k = higher < top_k if top_k else torch.ones(V, dtype=torch.bool)
    p = torch.where(in_k, logits.double(), float("-inf")).softmax(-1)
    above = (p[None, :] * (p[None, :] > p[:, None])).sum(1)  # (V,) mass of more probable tokens
    above_or_tied = (p[None, :] * (p[None, :] >= p[:, None])).sum(1) - p
    sure = in_k & (above_or_tied < top_p - slack)
    maybe = in_k & ((above < top_p + slack) | (higher == 0))
    return sure, maybe


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=40),
       top_k=st.integers(0, 45), top_p=st.floats(0.01, 1.0), u=st.floats(0, 1, exclude_max=True))
def test_filter_keeps_exactly_the_allowed_set(logits, top_k, top_p, u):
    x = torch.tensor([logits])
    kept = torch.isfinite(filter_logits(x, top_k, top_p))[0]
    sure, maybe = allowed_sets(x[0], top_k, top_p, slack=1e-5)
    assert kept[x[0] == x[0].max()].any()  # a most probable token always survives
    assert not (kept & ~maybe).any() and not (sure & ~kept).any()
    tok = draw(x, torch.tensor([u], dtype=torch.float64), 1.0, top_k, top_p)
    assert kept[tok.item()]


def reference_draw(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """The inverse CDF with one float64 scan over the whole vocabulary (draw's old form)."""
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0], x, cdf


@settings(max_examples=100, deadline=None)
@given(V=st.integers(1, 2000), seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, 50),
       top_p=st.floats(0.05, 1.0), scale=st.floats(0.1, 30.0), zero_block=st.booleans())
def test_blocked_draw_equals_one_scan(V, seed, top_k, top_p, scale, zero_block):
    """The sampler's plain draw is one float64 scan (reference_draw, exactly). generate.sample's
    blocked_inverse_cdf scans a block of 512 tokens after locating it; it must pick what the scan
    picks (up to a uniform within 1e-6 of a CDF boundary), never a token of probability 0,
    across block edges, with empty blocks (all -inf) and with a vocabulary not a multiple of 512."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * scale
    if zero_block and V > 600:
        logits[:, 100:600] = float("-inf")
    u = torch.rand(6, generator=g, dtype=torch.float64)
    u[0] = 0.0
    u[1] = 1.0 - 2**-53  # the largest uniform
    got = draw(logits, u, 1.0, top_k, top_p, blocked_inverse_cdf)
    assert torch.equal(draw(logits.T.contiguous().T, u, 1.0, top_k, top_p, blocked_inverse_cdf), got)  # strided
    want, x, cdf = reference_draw(logits, u, 1.0, top_k, top_p)
    assert torch.equal(draw(logits, u, 1.0, top_k, top_p), want)  # the plain draw is the one scan
    probs = filter_logits(logits, top_k, top_p).softmax(-1)
    for b in range(6):
        assert probs[b, got[b]] > 0, (b, got[b].item())
        near = (cdf[b] - x[b]).abs().min() <= 1e-6 * cdf[b, -1]  # float32 block sums (see draw)
        assert got[b] == want[b] or near, (b, got[b].item(), want[b].item())


@pytest.mark.parametrize("kw", [dict(top_k=3, temperature=1.5), dict(top_p=0.5, temperature=1.3)])
def test_sampling_end_to_end_stays_in_allowed_set(ckpt, kw):
    _, model = ckpt
    prompts = prompts_of([5, 8, 3, 10])
    for p, s in zip(prompts, sample(model, prompts, max_new_tokens=16, eos_id=None, seed=1, **kw)):
        with torch.no_grad():
            logits = model(torch.tensor([p + s.tokens])).float()[0] / kw["temperature"]
        for t, tok in enumerate(s.tokens):
            _, maybe = allowed_sets(logits[len(p) - 1 + t], kw.get("top_k", 0), kw.get("top_p", 1.0), 1e-5)
            assert maybe[tok]


def _static_vs_eager(model, kw, graphed, monkeypatch):
    """Decode steps from graphed_step (graphed or its eager twin) against plain eager decode:
    tokens and log-probs through slots.decode (3 rows, refilled; its static cache compacts in
    place), window 6 < lengths. Called below sample(), which refuses cuda_graph off CUDA."""
    import functools

    import generate
    import slots

    prompts = prompts_of([6, 13, 2, 9])
    eager = sample(model, prompts, max_new_tokens=12, eos_id=None, seed=5, batch_size=3, logprobs=True, **kw)
    greedy = kw.get("greedy", False)
    pick = functools.partial(generate.next_tokens, temperature=kw.get("temperature", 1.0), top_k=0, top_p=1.0,
                             greedy=greedy, vocab_limit=None, logprobs=True)
    uniforms = None if greedy else functools.partial(generate.stream_uniforms, 5, n=12)
    calls = []
    real = functools.partial(_real_graphed_step, graphed=graphed)
    monkeypatch.setattr(slots, "graphed_step", lambda *a: calls.append(1) or real(*a))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    refilled = slots.decode(model, prompts, list(range(len(prompts))), order, 3, 12, None, pick, uniforms,
                            cuda_graph=True, logprobs=True)
    assert calls  # the refilled rows decoded through graphed_step
    for a, (tokens, _, logprobs) in zip(eager, refilled):
        assert a.tokens == tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, logprobs)) <= 1e-4


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0)])
def test_static_cache_decode_equals_eager(ckpt, kw, monkeypatch):
    """The CUDA-graph path's steps without the graph (StaticKVCache, warm-up and its undo, steps
    at a device-side position) on CPU."""
    _static_vs_eager(ckpt[1], kw, False, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0)])
def test_cuda_graph_decode_equals_eager(ckpt, kw, dtype, monkeypatch):
    """Replayed from a CUDA graph (static cache, torch attention: SDPA in bf16) against the same
    steps run eagerly, then against plain eager decode (Triton decode kernel) in fp32."""
    import copy
    import functools

    import slots

    model = copy.deepcopy(ckpt[1]).to("cuda", dtype)
    prompts = prompts_of([6, 13, 2, 9])
    runs = {}
    for graphed in (False, True):
        monkeypatch.setattr(slots, "graphed_step", functools.partial(_real_graphed_step, graphed=graphed))
        runs[graphed] = sample(model, prompts, max_new_tokens=12, eos_id=None, seed=5, batch_size=3,
                               cuda_graph=True, logprobs=True, **kw)
    for a, b in zip(runs[False], runs[True]):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-3
    if dtype == torch.float32:
        monkeypatch.undo()
        _static_vs_eager(model, kw, True, monkeypatch)


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0), dict(temperature=0.7, top_k=30)])
def test_vocab_limit_never_draws_past_the_tokenizer(ckpt, kw):
    """A model vocabulary padded past its tokenizer's: ids >= vocab_limit are never drawn (the
    tokenizer could not decode them), and the stored log-probs are still the full model's."""
    _, model = ckpt
    prompts = prompts_of([6, 13, 2])
    outs = sample(model, prompts, max_new_tokens=20, eos_id=None, seed=2, vocab_limit=40, logprobs=True, **kw)
    assert all(max(o.tokens) < 40 for o in outs)
    free = sample(model, prompts, max_new_tokens=20, eos_id=None, seed=2, **kw)
    assert any(max(o.tokens) >= 40 for o in free)  # the limit did something
    for p, o in zip(prompts, outs):
        ref = full_logprobs(model, p, o.tokens)
        assert (torch.tensor(o.logprobs, dtype=torch.float64) - ref).abs().max().item() <= 1e-4


def test_tokenizer_larger_than_the_model_is_refused():
    from types import SimpleNamespace

    from generate import check_vocab
    tok = SimpleNamespace(vocab_size=32000, path="m/tokenizer.model")
    check_vocab(tok, 32768, "m")  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match="32000 tokens but the model's vocab_size is 1000"):
        check_vocab(tok, 1000, "m")


def test_cuda_graph_needs_cuda_and_refill(ckpt):
    with pytest.raises(ValueError, match="CUDA"):
        sample(ckpt[1], prompts_of([3]), max_new_tokens=2, eos_id=None, cuda_graph=True)
    with pytest.raises(ValueError, match="refill=True"):  # the static batches decode eagerly only
        sample(ckpt[1], prompts_of([3]), max_new_tokens=2, eos_id=None, cuda_graph=True, refill=False)


def test_score_equals_token_logprob_sums(ckpt):
    _, model = ckpt
    prompts, responses = prompts_of([4, 9, 1], seed=2), prompts_of([6, 1, 0], seed=3)
    got = score(model, prompts, responses, batch_size=2)
    for p, r, v in zip(prompts, responses, got):
        ids = torch.tensor([p + r])
        targets = torch.full_like(ids, -100)
        targets[0, len(p) - 1:-1] = ids[0, len(p):]
        with torch.no_grad():
            ref = model.token_logprobs(ids, targets).sum().item()
        assert abs(v - ref) <= 1e-4 and (r or v == 0.0)


# -- datasets --------------------------------------------------------------------------------

TEXTS = ["the cat sat on the mat", "what is two plus two", "four, of course", "tell me a story",
         "once upon a time there was a tiny model", "<|system|>\n", "<|user|>\n", "<|assistant|>\n"] * 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.readers import Example
    from data.tokenizer import Tokenizer, train_tokenizer
    root = tmp_path_factory.mktemp("ds")
    tok = Tokenizer(train_tokenizer(TEXTS, str(root / "ckpt"), vocab_size=300))
    _, folder = make_hf(str(root / "ckpt"), vocab=tok.vocab_size, max_position_embeddings=1100)
    examples = [Example([{"role": "user", "content": f"question {i}: what is {i} plus {i}?"}], f"it is {2 * i}")
                for i in range(9)]
    examples[4] = Example([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "story?"}],
                          "once upon a time")
    return tok, spin_kernels.install(load_model(folder)), folder, examples


KW = dict(max_new_tokens=6, temperature=1.0, seed=3, part_size=4, batch_size=3, progress=False)


def test_dataset_layout_and_opponent_logprobs(world, tmp_path):
    from data.pairs import collate_pairs, tokenize_examples
    from data.readers import read_examples
    tok, model, _, examples = world
    out = str(tmp_path / "synthetic.parquet")
    summary = generate_dataset(model, ChatFormat(tok), examples, out, iteration=2, **KW)
    assert summary["merged"] and summary["prompts"] == 9 and summary["parts_written"] == 3
    import pyarrow.parquet as pq
    table = pq.read_table(out)
    assert {"real", "generated", "ref_real_logps", "ref_generated_logps", "real_tokens", "generated_tokens",
            "iteration", "seed", "finished"} <= set(table.column_names)
    assert set(table.column("iteration").to_pylist()) == {2}
    back, report = read_examples(out)
    assert [b.prompt for b in back] == [e.prompt for e in examples]  # whole prompt, in input order
    assert [b.response for b in back] == [e.response for e in examples]
    # A fresh forward on the stored texts, re-tokenised as training will, gives the stored values.
    pairs, _ = tokenize_examples(ChatFormat(tok), back, max_length=1024, max_prompt_length=512)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        sums = model.token_logprobs(batch["input_ids"], batch["targets"], batch["attention_mask"]).sum(1)
    stored = torch.tensor([p.ref_real_logps for p in pairs] + [p.ref_generated_logps for p in pairs])
    assert (sums - stored).abs().max().item() <= 1e-4
    assert [len(p.generated_ids) for p in pairs] == table.column("generated_tokens").to_pylist()


def test_resume_after_kill_between_parts(world, tmp_path):
    tok, model, _, examples = world
    out = str(tmp_path / "synthetic.parquet")
    generate_dataset(model, ChatFormat(tok), examples, out, **KW)
    first = open(out, "rb").read()
    parts = sorted(f for f in os.listdir(out + ".parts") if f.endswith(".parquet"))
    mtimes = {f: os.stat(os.path.join(out + ".parts", f)).st_mtime_ns for f in parts}
    os.remove(out)
    os.remove(os.path.join(out + ".parts", parts[1]))  # killed while writing part 1
    summary = generate_dataset(model, ChatFormat(tok), examples, out, **KW)
    assert summary["parts_written"] == 1 and summary["parts_skipped"] == 2
    assert open(out, "rb").read() == first
    for f in (parts[0], parts[2]):  # untouched
        assert os.stat(os.path.join(out + ".parts", f)).st_mtime_ns == mtimes[f]
    assert generate_dataset(model, ChatFormat(tok), examples, out, **KW)["parts_written"] == 0  # complete: skipped
    with pytest.raises(ValueError, match="settings"):
        generate_dataset(model, ChatFormat(tok), examples, out, **dict(KW, seed=4))


def test_settings_of_a_run_that_made_no_part_are_replaced(world, tmp_path):
    """A run that failed before its first part (a bad flag, say) leaves settings.json only: the
    corrected rerun replaces it. Once a part exists, other settings are refused."""
    tok, model, _, examples = world
    out = str(tmp_path / "synthetic.parquet")
    os.makedirs(out + ".parts")
    with open(out + ".parts/settings.json", "w") as f:
        json.dump({"examples": 9, "seed": 99}, f)
    assert generate_dataset(model, ChatFormat(tok), examples, out, **KW)["merged"]
    assert json.load(open(out + ".parts/settings.json"))["seed"] == KW["seed"]
    os.remove(out)
    with pytest.raises(ValueError, match=r"holds 3 parts made with other settings \(seed\)"):
        generate_dataset(model, ChatFormat(tok), examples, out, **dict(KW, seed=4))


def test_two_ranks_give_the_rows_of_one(world, tmp_path):
    tok, model, _, examples = world
    one, two = str(tmp_path / "one.parquet"), str(tmp_path / "two.parquet")
    generate_dataset(model, ChatFormat(tok), examples, one, **dict(KW, batch_size=9))
    r0 = generate_dataset(model, ChatFormat(tok), examples, two, rank=0, world_size=2, **KW)
    assert not r0["merged"] and not os.path.exists(two)  # rank 1's part is still missing
    r1 = generate_dataset(model, ChatFormat(tok), examples, two, rank=1, world_size=2, **KW)
    assert not r1["merged"] and r0["prompts"] + r1["prompts"] == 9
    merge_parts(two, 3, json.load(open(two + ".parts/settings.json")))
    import pyarrow.parquet as pq
    a, b = pq.read_table(one).to_pylist(), pq.read_table(two).to_pylist()
    assert [r["generated"] for r in a] == [r["generated"] for r in b]
    for x, y in zip(a, b):
        assert x["ref_generated_logps"] == pytest.approx(y["ref_generated_logps"], abs=1e-4)


def test_long_prompt_truncated_and_counted(world, tmp_path):
    from data.readers import Example
    tok, model, _, examples = world
    short = Example([{"role": "user", "content": "hi"}], "no")
    long = Example([{"role": "user", "content": "tell me a story " * 30}], "no")
    out = str(tmp_path / "t.parquet")
    summary = generate_dataset(model, ChatFormat(tok), [short, long], out,
                               **dict(KW, max_prompt_length=40, max_length=60))
    assert summary["truncated_prompts"] == 1
    import pyarrow.parquet as pq
    assert pq.read_table(out).column("truncated").to_pylist() == [False, True]


def test_cli_and_bad_input(world, tmp_path):
    from data.readers import DataError
    tok, model, folder, examples = world
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt[-1]["content"], "response": e.response}) + "\n"
                            for e in examples))
    out = str(tmp_path / "cli.parquet")
    summary = main(["--model", folder, "--data", str(data), "--out", out, "--num-prompts", "3",
                    "--max-new-tokens", "4", "--part-size", "2", "--top-k", "5"])
    assert summary["prompts"] == 3 and os.path.exists(out) and os.path.exists(out + ".settings.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        main(["--model", folder, "--data", str(empty), "--out", str(tmp_path / "x.parquet")])
    with pytest.raises(DataError, match="no examples"):
        generate_dataset(model, ChatFormat(tok), [], str(tmp_path / "y.parquet"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="layout"):
        main(["--model", folder, "--data", str(bad), "--out", str(tmp_path / "z.parquet")])
    broken = tmp_path / "broken.jsonl"  # one malformed row: stops by default, skipped and counted on request
    broken.write_text(data.read_text().splitlines()[0] + "\n{not json\n" + data.read_text().splitlines()[1] + "\n")
    with pytest.raises(DataError, match="broken.jsonl: row 2: invalid JSON"):
        main(["--model", folder, "--data", str(broken), "--out", str(tmp_path / "w.parquet")])
    summary = main(["--model", folder, "--data", str(broken), "--out", str(tmp_path / "w.parquet"),
                    "--on-bad-row", "skip", "--max-new-tokens", "2"])
    assert summary["prompts"] == 2 and summary["skipped_rows"] == 1
    with pytest.raises(SystemExit):  # the output is Parquet
        main(["--model", folder, "--data", str(data), "--out", str(tmp_path / "o.jsonl")])


def test_bfloat16_samples_within_bf16_tolerance(tmp_path):
    """A bf16 model sampled through the fast CPU path (oneDNN bf16 products on packed weights,
    slot refill) against float64 forwards of the float32 model on the same tokens: the per-token
    log-probs are off by no more than the plain bf16 model's (model.py alone, F.linear) are, up to
    bf16 rounding, and both stay within bf16 tolerance."""
    _, folder = make_hf(str(tmp_path / "ckpt"), sliding_window=6)
    model = load_model(folder)  # float32, model.py alone: the reference
    prompts = prompts_of([6, 13, 2, 9, 4, 11])
    fast = spin_kernels.install(load_model(folder, dtype=torch.bfloat16), "torch")
    plain = load_model(folder, dtype=torch.bfloat16)
    outs = sample(fast, prompts, max_new_tokens=10, eos_id=None, seed=3, batch_size=4, logprobs=True)
    errs = {"fast": [], "plain": []}
    for p, s in zip(prompts, outs):
        ref = full_logprobs(model, p, s.tokens)
        errs["fast"] += (torch.tensor(s.logprobs, dtype=torch.float64) - ref).abs().tolist()
        ids = torch.tensor([p + s.tokens])
        with torch.no_grad():
            lp = plain(ids).double().log_softmax(-1)[0, len(p) - 1:-1].gather(-1, torch.tensor(s.tokens)[:, None])[:, 0]
        errs["plain"] += (lp - ref).abs().tolist()
    fast_err, plain_err = (torch.tensor(errs[k]) for k in ("fast", "plain"))
    print(f"bf16 log-prob error: fast mean {fast_err.mean():.4f} max {fast_err.max():.4f}; "
          f"plain mean {plain_err.mean():.4f} max {plain_err.max():.4f}")
    # Measured (2-core AVX512-BF16 CPU): fast mean 0.0100, max 0.066; plain mean 0.0102, max 0.066.
    # The bounds leave a margin for other CPUs' summation orders; a fast path whose products are
    # truncated to bf16 instead of rounded (mean 0.022, max 0.137: twice the error) fails both.
    assert fast_err.mean() <= 1.25 * plain_err.mean()
    assert fast_err.max() <= 0.1 and plain_err.max() <= 0.1  # bf16: ~3 significant digits per logit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refill_on_cuda_equals_static_batches(ckpt, dtype):
    """Slot refill on the GPU path (Triton decode kernel over per-row starts, rows entering a
    shared cache) against static batches there: the same tokens; log-probs within the dtype's
    rounding (bf16 may flip a draw near a CDF boundary, so only float32 compares tokens)."""
    import copy

    model = copy.deepcopy(ckpt[1]).to("cuda", dtype)
    prompts = prompts_of([12, 3, 9, 1, 7, 11, 2, 5, 8, 4])
    kw = dict(max_new_tokens=20, eos_id=7, seed=2, batch_size=3, logprobs=True, temperature=1.0)
    ref = sample(model, prompts, refill=False, **kw)
    got = sample(model, prompts, **kw)
    for r, g in zip(ref, got):
        if dtype == torch.float32:
            assert g.tokens == r.tokens
            assert max(abs(x - y) for x, y in zip(g.logprobs, r.logprobs)) <= 1e-4
        else:
            n = next((i for i, (a, b) in enumerate(zip(g.tokens, r.tokens)) if a != b), len(g.tokens))
            assert all(abs(x - y) <= 0.1 for x, y in zip(g.logprobs[:n], r.logprobs[:n]))
