"""Decode steps replayed from a CUDA graph (generate.sample(cuda_graph=True)).

An eager decode step of a 32-layer model launches ~1000 kernels from Python, which at batch 1
can take longer than the GPU needs to read the weights; a graph replay is one launch. A graph
replays fixed kernel arguments, so no shape and no argument may depend on the cache length:
StaticKVCache keeps the length in a device tensor that each step advances in place, and every
step attends over all slots, the unfilled ones hidden by the causal rule (slots past the query
are invisible). Attention with a tensor offset takes the torch path (spin_kernels/attention.py): the
Triton decode kernel takes the length as a launch argument.
"""
import contextlib

import torch

from model import KVCache


class StaticKVCache(KVCache):
    """A filled KVCache (after the prefill) switched to static shapes, on the same buffers (and
    the same starts tensor). `pos`, a 0-dim device tensor, is the filled length the graph reads;
    nothing checks it against the capacity on the device, so the host keeps `length` equal to it
    (graphed_step advances both; slots.py moves both) and checks there."""

    def __init__(self, cache: KVCache):
        super().__init__(cache.k, cache.v, cache.starts)
        self.length = cache.length
        self.pos = torch.tensor(cache.length, device=cache.k[0].device)

    @property
    def offset(self):
        return self.pos

    def begin(self, T, starts, B, device):
        # Made after the prefill. The capacity is checked by the caller: a check here would be a
        # host sync inside the graph.
        if starts is not None:
            raise ValueError("attention_mask is only accepted on the first (prefill) call with a cache")
        return self.starts, self.pos

    def update(self, layer, k, v):
        idx = self.pos + torch.arange(k.shape[2], device=k.device)  # (T,)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        return self.k[layer], self.v[layer]  # every slot, (B, Hkv, capacity, D)

    def advance(self, T):
        self.pos.add_(T)


def graphed_step(model, cache, B, graphed=True):
    """One decode step captured in a CUDA graph: nxt (B,) -> logits (B, V) float32, replayed
    from static buffers, on a StaticKVCache made from `cache` (which must not be used after; the
    step's `.cache` is the static one). The returned logits buffer is overwritten by the next call.
    graphed=False runs the same static-cache steps eagerly, warm-up included (tests, any device)."""
    device = cache.k[0].device
    cache = StaticKVCache(cache)
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # the static input
    side = torch.cuda.Stream(device) if graphed else None
    if graphed:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if graphed else contextlib.nullcontext():
        for _ in range(2):  # warm-up outside the graph (cuBLAS handles, allocator)
            model(tok, cache=cache)
            cache.pos.sub_(1)  # undo the advance; the slot it wrote is rewritten by the real step
    if graphed:
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step, cache writes and pos advance included
            out = model(tok, cache=cache)[:, -1].float()

    def step(nxt):
        if cache.length + 1 > cache.capacity:  # checked on the host: on the device an overrun is fatal
            raise ValueError(f"static KV cache of {cache.capacity} slots is full")
        cache.length += 1
        tok.copy_(nxt[:, None])
        if not graphed:
            return model(tok, cache=cache)[:, -1].float()
        graph.replay()
        return out

    step.cache = cache
    return step
