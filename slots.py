"""Continuous batching for generate.sample: a fixed number of rows in flight, and rows that end
(at EOS or at their length) take the next prompts, so decode steps compute live rows only.

    decode(model, prompts, keys, order, rows, ...) -> [(tokens, finished, logprobs)]

## Motivation

A static batch decodes until its longest row ends. SPIN samples at temperature 1 and each answer
stops at its own EOS, so lengths spread from a few tokens to the limit, and most of a static
batch's late steps compute rows whose answers ended long ago (generate.sample_batch, the plain
version kept beside this one). Here finished rows are handed the next prompts, in groups: once
1/REFILL_SHARE of the rows have ended (a prefill forward costs about one decode step on CPU,
however few prompts it holds).

## How a row is replaced

The KV cache keeps one shared filled length L (model.KVCache), so a decode step stays one
(B, 1) forward. Row b's sequence occupies slots [starts[b], L): the slots left of starts[b] are
hidden from it by the rule that hides left padding (model.visibility), and its positions are
slot - starts[b], so RoPE never sees where in the cache a sequence lies. A prompt p entering row b:
    1. its first len(p) - 1 tokens are prefilled on their own, in a small cache, together with
       the other prompts entering at this step (left-padded to the longest, Pm tokens);
    2. their keys and values are copied into slots [L - Pm, L) of row b, starts[b] set to the
       first real one;
    3. its last token is fed to the next shared decode step beside every other row's last drawn
       token: that step writes slot L and gives the logits of its first new token.
So an entering prompt needs only slots that are already filled, and L grows by one per step.
Prompts enter longest first, which makes step 2 always fit: a live row spans at least its own
prompt, which is at least as long as any prompt still waiting (with no live row, L is reset).
When the cache is full, or the slots left of every live row are many, all rows shift left by the
smallest start of a live row ("compaction"); positions are relative to starts, so none changes.
Once no prompt waits, rows that end are dropped from the batch (not with a CUDA graph, whose
shapes are fixed; there they decode on, discarded).

## The CPU decode layout (whole=True)

A prefix slice of a cache buffer, (B, Hkv, :L, D), is not contiguous, and on CPU the batched
matmuls of a one-query attention read such a slice 1.5x (float32) to 3x (bf16) slower than a
whole contiguous tensor of the same slots (bench/RESULTS_generate_cpu.md). So on CPU, at decode
sizes, generate.sample asks for a WholeKVCache: its update returns every slot, the unfilled ones
past the query hidden by the causal rule (as the CUDA graph's static cache does), and decode keeps
its capacity within GROW slots of the filled length: when it fills, compaction copies the rows
into new buffers of length + GROW slots instead of shifting them in place. It holds float32
whatever the model's dtype: spin_kernels/attention.py's one-query step then computes in float32
(a bf16 model's keys and values are stored exactly), which on CPU is faster than SDPA's bf16
kernel and keeps the scores in float32 as SDPA does.

## Determinism

A prompt draws with its own uniforms (keyed by its id) indexed by its own step count, so its
sample does not depend on which slot, step or batch it lands in, nor on the batch size or rank,
up to float rounding of its logits (the prefill split in two, other batch shapes): the static
batches' guarantee, and tests/test_generate.py checks both against each other.
"""
import collections

import torch

from data.pairs import collate_prompts
from spin_kernels.cuda_graph import StaticKVCache, graphed_step
from model import KVCache

COMPACT_AT = 32  # compact once every live row leaves this many slots unused on its left
GROW = 16  # a WholeKVCache that fills is copied into buffers with this many free slots
# With whole=True, entering prompts are prefilled this many at a time, each group padded to its own
# longest: the 64 prompts of bench/generate_vllm.py's share hold 2528 tokens, 2880 padded as one
# batch, 2608 in groups of 16; on CPU the products of ~600 rows run as fast per row as of ~3000.
PREFILL_ROWS = 16


# Ended rows wait until 1/REFILL_SHARE of the rows have ended (or every waiting prompt fits)
# before prompts enter: one prefill forward reads every weight, which on CPU costs about as much
# for a single 40-token prompt as a 64-row decode step, so entering 8 prompts at once saves 7
# such passes for a few steps of rows decoding discarded tokens (bench/RESULTS_generate_cpu.md).
REFILL_SHARE = 8


@torch.inference_mode()
def decode(model, prompts, keys, order, rows, max_new_tokens, stops, pick, uniforms, progress=None,
           cuda_graph=False, logprobs=False, whole=False):
    """Sample every prompt, at most `rows` at once, entering in `order` (longest first).
    keys[i]: prompt i's random-stream key; stops: (S,) ids that end a row, or None;
    pick(logits (B, V), u (B,) or None) -> (ids (B,), log-probs (B,) or None): sampler.next_tokens;
    uniforms(key) -> (max_new_tokens,) float64, or None when greedy. whole: the CPU decode
    layout (above): a WholeKVCache, and prompts prefilled PREFILL_ROWS at a time.
    Returns (tokens, finished, logprobs or None) per prompt, in input order."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    cfg = model.config
    B = rows
    longest = len(prompts[order[0]])
    if whole:
        cache = WholeKVCache.allocate(cfg, B, longest - 1 + GROW, device=device, dtype=torch.float32)  # heads + GROW
    else:  # a live row spans at most longest - 1 + max_new_tokens slots; COMPACT_AT spare ones let
        # compaction wait until it frees that many
        cache = KVCache.allocate(cfg, B, longest + max_new_tokens + COMPACT_AT, device=device, dtype=dtype)
    who = [-1] * B  # the prompt in each slot, -1 for none
    start = [0] * B  # host copy of cache.starts, for the compaction rule
    t = torch.zeros(B, dtype=torch.long, device=device)  # tokens drawn so far, per slot
    u = torch.zeros(B, max_new_tokens, dtype=torch.float64, device=device)
    tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    feed = torch.zeros(B, dtype=torch.long, device=device)  # what each slot feeds the next step
    waiting = collections.deque(order)
    out = [None] * len(prompts)

    def enter(slots):
        """Put the next waiting prompts into `slots` (steps 1-3 of the docstring)."""
        idx = [waiting.popleft() for _ in slots]
        heads = [prompts[i][:-1] for i in idx]
        Pm = max(map(len, heads))
        if all(w < 0 for w in who):  # nothing live: the cache starts over
            if whole:  # new buffers: these prompts' heads and GROW free slots
                compact(cache, cache.length, Pm + GROW)
            set_length(cache, Pm)
        L = cache.length
        at = torch.tensor(slots, device=device)
        first = torch.full((len(slots),), L, dtype=torch.long, device=device)
        group = PREFILL_ROWS if whole else len(slots)
        for g in range(0, len(slots), group):  # consecutive prompts have similar lengths (longest first)
            part = heads[g:g + group]
            Pp = max(map(len, part))
            if not Pp:
                continue
            small = KVCache.allocate(cfg, len(part), Pp, device=device, dtype=dtype)
            b = collate_prompts([h or [0] for h in part], pad_id=0)  # a 1-token prompt has no head:
            mask = b["attention_mask"]  # prefill one masked pad for it
            mask[[j for j, h in enumerate(part) if not h]] = 0
            model(b["input_ids"].to(device), attention_mask=mask.to(device), cache=small, logits_to_keep=1)
            into = at[g:g + group]
            for big_k, big_v, k, v in zip(cache.k, cache.v, small.k, small.v):
                big_k[into, :, L - Pp:L] = k.to(big_k.dtype)
                big_v[into, :, L - Pp:L] = v.to(big_v.dtype)
            first[g:g + group] = L - Pp + small.starts
        cache.starts[at] = first
        for s, i, f in zip(slots, idx, first.tolist()):
            who[s], start[s] = i, f
        feed[at] = torch.tensor([prompts[i][-1] for i in idx], device=device)
        t[at] = 0
        if uniforms is not None:
            u[at] = torch.stack([uniforms(keys[i]) for i in idx]).to(device)

    enter(list(range(B)))
    free = []  # ended rows not yet refilled
    if cuda_graph:
        step = graphed_step(model, cache, B)
        cache = step.cache  # a StaticKVCache on the same buffers; enter and compact now use it
    else:
        step = lambda nxt: model(nxt[:, None], cache=cache)[:, -1].float()  # noqa: E731
    while True:
        live = [s for s in range(B) if who[s] >= 0]
        if not live:
            break
        low = min(start[s] for s in live)
        if cache.length + 1 > cache.capacity or low >= COMPACT_AT:
            compact(cache, low, cache.length - low + GROW if whole else None)
            start = [max(f - low, 0) for f in start]
        logits = step(feed)  # (B, V) float32
        ar = torch.arange(len(who), device=device)
        col = t.clamp(max=max_new_tokens - 1)  # a row that ended and was not dropped decodes on
        nxt, lp = pick(logits, None if uniforms is None else u[ar, col])  # (B,), (B,) or None
        tokens[ar, col] = nxt
        if lp is not None:
            logps[ar, col] = lp
        t += 1
        feed = nxt
        hit = torch.isin(nxt, stops) if stops is not None else torch.zeros_like(t, dtype=torch.bool)
        alive = torch.tensor([w >= 0 for w in who], device=device)
        ended = ((hit | (t == max_new_tokens)) & alive).nonzero()[:, 0].tolist()  # one host sync per step
        if progress is not None:
            progress(tokens=len(live))
        if ended:
            n, got, fin = t[ended].tolist(), tokens[ended].tolist(), hit[ended].tolist()
            lps = logps[ended].tolist() if logprobs else None
            for j, s in enumerate(ended):
                out[who[s]] = (got[j][:n[j]], fin[j], lps[j][:n[j]] if logprobs else None)
                who[s] = -1
            if progress is not None:
                progress(prompts=len(ended))
            free += ended
            if waiting and len(free) >= min(max(1, len(who) // REFILL_SHARE), len(waiting)):
                k = min(len(free), len(waiting))
                enter(free[:k])
                free = free[k:]
            elif not waiting and not cuda_graph and 0 < len(live) - len(ended) <= len(who) * 3 // 4:
                keep = [s for s in range(len(who)) if who[s] >= 0]
                drop_rows(cache, keep)
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                t, u, tokens, logps, feed = (x[sel] for x in (t, u, tokens, logps, feed))
                who, start = [who[s] for s in keep], [start[s] for s in keep]
                B, free = len(who), []
    return out


def set_length(cache, n):
    cache.length = n
    if isinstance(cache, StaticKVCache):  # and the device copy the graph reads
        cache.pos.fill_(n)


class WholeKVCache(KVCache):
    """A KVCache whose update returns every slot, (B, Hkv, capacity, D): whole buffers, which are
    contiguous (the docstring's last section). Slots past the query are hidden by the causal
    rule; decode keeps the capacity within GROW slots of the length. Values are stored slot-minor,
    (B, Hkv, D, capacity) buffers seen through (B, Hkv, capacity, D) views, so the attention's
    p @ V can run as V^T @ p^T over contiguous rows of slots (1.22x that attention over cache
    lengths 48-160, 64 rows, float32, on the AMD box; 1.02x at 48); every index below works on the
    views."""

    @classmethod
    def allocate(cls, config, batch, max_len, device=None, dtype=torch.float32):
        cache = super().allocate(config, batch, max_len, device=device, dtype=dtype)
        cache.v = [empty_slots(v, max_len, minor=True) for v in cache.v]
        return cache

    def update(self, layer, k, v):
        super().update(layer, k, v)
        return self.k[layer], self.v[layer]


def slot_minor(x):  # (B, Hkv, S, D) stored as (B, Hkv, D, S)
    return x.stride(2) == 1 and x.shape[3] > 1


def empty_slots(x, capacity, minor=False):
    """Zeros shaped like x (B, Hkv, S, D) with `capacity` slots, stored slot-minor if asked."""
    B, H, _, D = x.shape
    if minor:
        return x.new_zeros(B, H, D, capacity).transpose(2, 3)
    return x.new_zeros(B, H, capacity, D)


def compact(cache, m, capacity=None):
    """Shift every row's filled slots left by m (the smallest start of a live row): slots
    [m, L) move to [0, L - m), starts drop by m, and no position changes. In place (a CUDA
    graph captured on these buffers stays valid), or, given a capacity, into new buffers of
    that many slots (a WholeKVCache)."""
    L = cache.length
    if capacity is not None:
        def moved(buf):
            new = empty_slots(buf, capacity, slot_minor(buf))
            new[:, :, :L - m] = buf[:, :, m:L]
            return new
        cache.k, cache.v = [moved(b) for b in cache.k], [moved(b) for b in cache.v]
    elif m:
        for buf in cache.k + cache.v:
            buf[:, :, :L - m] = buf[:, :, m:L].clone()  # the ranges overlap
    if m:
        cache.starts.sub_(m).clamp_(min=0)  # a row that is not live may start before m
    set_length(cache, L - m)


def drop_rows(cache, keep):
    """Keep only rows `keep` of the cache (new tensors: the batch shrinks)."""
    sel = torch.tensor(keep, dtype=torch.long, device=cache.starts.device)
    def rows(x):  # in x's layout (slot-minor values stay so)
        return x.mT.index_select(0, sel).mT if slot_minor(x) else x.index_select(0, sel)
    cache.k, cache.v = [rows(x) for x in cache.k], [rows(x) for x in cache.v]
    cache.starts = cache.starts.index_select(0, sel)
