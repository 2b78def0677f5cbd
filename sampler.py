"""The opponent's side of SPIN: p_t answers each prompt, y' ~ p_t(.|x), with a KV cache, and
scores log p_t(y|x) and log p_t(y'|x) of both answers once, so training never holds a reference
model (paper Algorithm 1, steps 1-2 of an iteration).

    opponent_rows(model, fmt, examples, keys, ...) -> (SPIN rows: x, y, y', log p_t(y|x), log p_t(y'|x); counts)
    score(model, prompts, responses) -> [sum_t log p(response_t | prompt, response_<t)]
    sample(model, prompts, ...)      -> [Sample(tokens, finished, logprobs)]   static batches

This is the plain sampler, and the code that runs: generate.sample puts the speed-ups in, each by
one visible call, and tests/test_generate.py checks that they give these samples.

A token is drawn from softmax(logits / temperature) by inverse CDF, with each prompt's own uniforms
(next_tokens and below, after the path): a prompt's random stream is keyed by (seed, its key), so
a sample does not depend on the batch it lands in, the batch size, or the number of ranks (up to
float rounding of the logits, which can only flip a draw whose uniform falls within rounding of a
CDF boundary).
"""
import functools
import hashlib
from dataclasses import dataclass

import torch

from data.pairs import OPPONENT_COLUMNS, collate_prompts, left_pad, tokenize_example, truncate
from data.readers import Example
from data.template import PrefixError
from model import KVCache


@dataclass
class Sample:
    tokens: list  # generated ids, ending with EOS if the row stopped there
    finished: bool  # stopped at EOS (False: ran out of max_new_tokens)
    # sample(logprobs=True): log p_t of each drawn token, untempered and unfiltered; else None.
    # (SPIN scores the re-tokenised text instead, opponent_rows.)
    logprobs: list | None = None


def opponent_rows(model, fmt, examples, keys, *, iteration, seed, max_new_tokens, temperature=1.0, top_k=0,
                  top_p=1.0, greedy=False, batch_size=16, max_prompt_length=512, max_length=1024, progress=None,
                  sample_fn=None):
    """Step 1 of a SPIN iteration on a list of examples (data/readers.Example: prompt, response):
    p_t's answer y' to each prompt x, and p_t's log-probs of the ground truth y and of y', as rows
    in the SPIN layout (Example.generated, and the OPPONENT_COLUMNS among its extras). keys: each
    example's random-stream key. sample_fn: sample() below (None), or generate.sample, which puts
    the speed-ups in. Returns (rows, counts of generated tokens and truncated prompts)."""
    full = [fmt.prompt_ids(ex.prompt) for ex in examples]
    # Generation sees the prompt training would keep next to a max_new_tokens response: truncate's
    # rule applied with a stand-in response of that length.
    prompts = [truncate(ids, [[0] * max_new_tokens], max_length, max_prompt_length)[0] for ids in full]
    got = (sample_fn or sample)(model, prompts, max_new_tokens=max_new_tokens, eos_id=fmt.tok.eos_ids,
                                vocab_limit=fmt.tok.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                                greedy=greedy, seed=seed, batch_size=batch_size, progress=progress,
                                stream_keys=keys)
    # Training scores re-tokenised text (the ids data/pairs.py will build), so score those.
    tokenised = [pair_of_sample(fmt, ex, answer_text(fmt.tok, s.tokens), max_length, max_prompt_length)
                 for ex, s in zip(examples, got)]  # (Pair, the answer's text)
    # One scoring pass over both answers of every example: the real ones, then the generated ones.
    logps = score(model, [p.prompt_ids for p, _ in tokenised] * 2,
                  [p.real_ids for p, _ in tokenised] + [p.generated_ids for p, _ in tokenised], batch_size=batch_size)
    ref_real, ref_generated = logps[:len(examples)], logps[len(examples):]  # log p_t(y|x), log p_t(y'|x)
    rows, counts = [], {"generated_tokens": 0, "truncated_prompts": 0}
    for j, (ex, s, (pair, text)) in enumerate(zip(examples, got, tokenised)):
        # Was the prompt cut, for generation or for training? Never silent: counted, and stored.
        cut = min(len(prompts[j]), len(pair.prompt_ids)) < len(full[j])
        extras = dict(zip(OPPONENT_COLUMNS, (ref_real[j], ref_generated[j])), real_tokens=len(pair.real_ids),
                      generated_tokens=len(pair.generated_ids), iteration=iteration, seed=seed,
                      finished=s.finished, truncated=cut or pair.truncated)
        rows.append(Example(prompt=ex.prompt, response=ex.response, generated=text, extras=extras))
        counts["generated_tokens"] += len(s.tokens)
        counts["truncated_prompts"] += cut
    return rows, counts


def pair_of_sample(fmt, ex, text, max_length, max_prompt_length):
    """(Pair, the answer text as stored). A chat template may be unable to split a sampled answer
    that starts with whitespace from the prompt's last token (byte-level BPE merges them, see
    data/template.ChatFormat); such an answer is stored without its leading whitespace."""
    def pair(answer):
        return tokenize_example(fmt, Example(prompt=ex.prompt, response=ex.response, generated=answer),
                                max_length=max_length, max_prompt_length=max_prompt_length), answer
    try:
        return pair(text)
    except PrefixError:
        return pair(text.lstrip())


def answer_text(tok, tokens):
    """The text of a sampled answer: its tokens before the first stop id, decoded without special
    tokens (as the official SPIN generation decodes)."""
    stop = next((i for i, t in enumerate(tokens) if t in tok.eos_ids), len(tokens))
    return tok.decode(tokens[:stop], skip_special_tokens=True)


@torch.inference_mode()
def score(model, prompts, responses, *, batch_size=16):
    """sum_t log p(response_t | prompt, response_<t) per pair, float32, from one prefill-style
    forward over prompt + response per batch (model.token_logprobs, DESIGN.md convention)."""
    if len(prompts) != len(responses) or any(len(p) == 0 for p in prompts):
        raise ValueError("score: need as many responses as prompts, and non-empty prompts")
    device = model.lm_head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(responses[i])))
    out = [0.0] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        # The training collate's layout: targets are the response tokens, -100 elsewhere.
        ids, mask, targets = (x.to(device) for x in left_pad(
            [prompts[i] + responses[i] for i in idx], [len(prompts[i]) for i in idx], pad_id=0))
        lp = model.token_logprobs(ids, targets, attention_mask=mask)  # (B, T) fp32
        for i, v in zip(idx, lp.sum(1).tolist()):
            out[i] = v
    return out


def sample(model, prompts, *, max_new_tokens, eos_id, temperature=1.0, top_k=0, top_p=1.0,
           greedy=False, seed=0, batch_size=16, progress=None, stream_keys=None, vocab_limit=None,
           logprobs=False, decode=None, inverse_cdf=None):
    """Sample one continuation per prompt (token id lists, any lengths). Returns a Sample per
    prompt, in input order. eos_id: the id, or a list of ids, that ends a row (Llama 3 has two);
    None never stops early. stream_keys: the key of each prompt's random stream (default: its
    index); global ids when sharding, so a prompt's sample does not depend on its rank or batch.
    vocab_limit: never draw ids >= this (a model vocabulary padded past its tokenizer's).
    decode (None: decode_batches, static batches of batch_size rows through sample_batch) and
    inverse_cdf (None: plain_inverse_cdf): how the prompts are decoded and a token drawn;
    generate.sample passes the faster ones."""
    check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, greedy)
    if not prompts:
        return []
    device = model.lm_head.weight.device
    keys = list(range(len(prompts))) if stream_keys is None else list(stream_keys)
    stops = None if eos_id is None else torch.tensor(eos_id, device=device).reshape(-1)  # any one ends a row
    if vocab_limit is not None and vocab_limit >= model.config.vocab_size:
        vocab_limit = None
    pick = functools.partial(next_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                             vocab_limit=vocab_limit, logprobs=logprobs, inverse_cdf=inverse_cdf)
    uniforms = None if greedy else functools.partial(stream_uniforms, seed, n=max_new_tokens)
    # Longest first, so each batch holds similar lengths (little padding) and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = min(batch_size, len(prompts))
    # decode gives (tokens, finished, logprobs) per prompt, in input order
    return [Sample(*r) for r in (decode or decode_batches)(model, prompts, keys, order, rows, max_new_tokens,
                                                           stops, pick, uniforms, progress, logprobs=logprobs)]


@torch.inference_mode()
def sample_batch(model, prompts, keys, max_new_tokens, stops, pick, uniforms, logprobs=False):
    """One left-padded batch of sample(), every row decoded until the last one ends: prefill,
    then one decode step per new token. keys[b]: row b's random-stream key; stops: (S,) ids that
    end a row, or None; pick(logits (B, V), u (B,) or None) -> (ids (B,), log-probs (B,) or None):
    next_tokens; uniforms(key) -> (max_new_tokens,) float64, or None when greedy."""
    device = model.lm_head.weight.device
    B = len(prompts)
    b = collate_prompts(prompts, pad_id=0)  # the pad id is never attended nor scored
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    cache = KVCache.allocate(model.config, B, ids.shape[1] + max_new_tokens, device=device,
                             dtype=model.lm_head.weight.dtype)
    u = None if uniforms is None else torch.stack([uniforms(k) for k in keys]).to(device)  # (B, max_new)
    tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1].float()  # prefill: (B, V)
    for t in range(max_new_tokens):
        nxt, lp = pick(logits, None if u is None else u[:, t])  # (B,), (B,) or None
        tokens[:, t] = nxt
        if lp is not None:
            logps[:, t] = lp
        if stops is not None:
            stop = torch.isin(nxt, stops) & ~finished
            lengths = torch.where(stop, t + 1, lengths)
            finished |= stop
            if bool(finished.all()):  # one host sync per step; the decode step dwarfs it
                break
        if t + 1 < max_new_tokens:
            # Finished rows keep decoding in lock step (their tokens are discarded): left padding
            # keeps one shared cache length, so no row is removed mid-batch.
            logits = model(nxt[:, None], cache=cache)[:, -1].float()  # (B, V)
    steps = t + 1  # the loop stops early once every row has ended
    tokens, lengths, logps = tokens[:, :steps].tolist(), lengths.tolist(), logps[:, :steps].tolist()
    return [Sample(tokens[b][:lengths[b]], bool(finished[b]), logps[b][:lengths[b]] if logprobs else None)
            for b in range(B)]


# ----------------------------------------------------------------------------------------------
# sample()'s default decoding: static batches, each through sample_batch

def decode_batches(model, prompts, keys, order, rows, max_new_tokens, stops, pick, uniforms, progress=None,
                   logprobs=False):
    """Every prompt, in static batches of `rows` taken in `order` (sample_batch). Returns
    (tokens, finished, logprobs or None) per prompt, in input order (as slots.decode does)."""
    out = [None] * len(prompts)
    for s in range(0, len(order), rows):
        idx = order[s:s + rows]
        got = sample_batch(model, [prompts[i] for i in idx], [keys[i] for i in idx], max_new_tokens, stops, pick,
                           uniforms, logprobs)
        for i, g in zip(idx, got):
            out[i] = (g.tokens, g.finished, g.logprobs)
        if progress is not None:
            progress(prompts=len(idx), tokens=sum(len(g.tokens) for g in got))
    return out


# ----------------------------------------------------------------------------------------------
# How a token is drawn: each prompt's own uniforms, and the inverse CDF of p_t's distribution

def next_tokens(logits, u, temperature, top_k, top_p, greedy, vocab_limit, logprobs, inverse_cdf=None):
    """Each row's next token from its logits (B, V) float32 and its uniform u (B,) (None when
    greedy) -> (ids (B,), their log p_t (B,) or None). The log-prob is log p_t, untempered and
    unfiltered (SPIN itself stores the rescored sum, opponent_rows). Ids at or past vocab_limit (a
    model vocabulary padded beyond its tokenizer's) are never drawn; the log-probs stay those of
    the full distribution."""
    allowed = logits  # the logits the token is drawn from: none past vocab_limit
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        allowed = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_limit,
                                     float("-inf"))
    nxt = allowed.argmax(-1) if greedy else draw(allowed, u, temperature, top_k, top_p, inverse_cdf)  # (B,)
    if not logprobs:
        return nxt, None
    return nxt, logits.gather(-1, nxt[:, None])[:, 0] - logits.logsumexp(-1)  # p may underflow fp32


def draw(logits, u, temperature=1.0, top_k=0, top_p=1.0, inverse_cdf=None):
    """One token per row by inverse CDF: logits (B, V), u (B,) uniforms in [0, 1) -> (B,).
    The uniforms come from each prompt's own generator (drawn up front, see stream_uniforms), so the
    hot path is batched with no per-row Python loop. inverse_cdf: the plain one below, or a faster
    one with the same rule (generate.sample puts in blocked_inverse_cdf)."""
    logits = logits.float()  # no copy when already float32
    if temperature != 1.0:
        logits = logits / temperature
    if top_k or top_p < 1.0:  # the command line's options (at the end of the file); SPIN's recipe uses neither
        logits = filter_logits(logits, top_k, top_p)
    return (inverse_cdf or plain_inverse_cdf)(logits.softmax(-1), u)


def plain_inverse_cdf(probs, u):
    """probs (B, V) float32 (rows sum to 1 up to rounding), u (B,) in [0, 1) -> (B,) the first
    token whose cumulative mass exceeds u * total: never a token of probability 0."""
    cdf = probs.double().cumsum(-1)  # (B, V); float64, so a small probability still moves it
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))  # x < total
    return torch.searchsorted(cdf, x, right=True)[:, 0]


def _seed_of(seed, key):
    digest = hashlib.sha256(f"spin-generate/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stream_uniforms(seed, key, n):
    """(n,) float64 uniforms for the prompt keyed `key`, from a CPU generator seeded by (seed,
    key): the same numbers on any device, in any batch or slot."""
    return torch.rand(n, generator=torch.Generator().manual_seed(_seed_of(seed, key)), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# What sample() refuses, and top-k and top-p, for the command line (SPIN's recipe samples p_t itself)

def check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, greedy):
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if max_new_tokens < 1 or any(len(p) == 0 for p in prompts):
        raise ValueError("need max_new_tokens >= 1 and non-empty prompts")
    limit = model.config.max_position_embeddings
    if prompts and max(map(len, prompts)) + max_new_tokens > limit:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens + {max_new_tokens} new tokens "
                         f"exceeds the model's {limit} positions: truncate prompts first")


def filter_logits(logits, top_k=0, top_p=1.0):
    """(B, V) -> (B, V) with -inf on removed tokens; transformers' order and rules: top-k keeps
    every token not below the k-th largest logit (ties kept), then top-p (Holtzman et al. 2020)
    keeps the most probable tokens until their mass reaches top_p, always at least one."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)  # (B, V)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # mass strictly before this token already >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return logits
