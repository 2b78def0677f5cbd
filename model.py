"""Mistral, written by hand in plain PyTorch: the architecture alone.

Architecture (Jiang et al. 2023, "Mistral 7B"): token embedding -> N x [RMSNorm -> grouped-query
attention with rotary embeddings and a sliding window -> residual -> RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> LM head. Llama is the same network; Qwen2/Qwen2.5 add a bias to the q, k, v
projections (ModelConfig.attention_bias) and Qwen3 an RMSNorm over each head of q and k before
the rotation (ModelConfig.qk_norm). Module attribute names equal the Hugging Face keys
(`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load strictly with no rename table.
Reading and writing Hugging Face folders is hf_folder.py's. Everything here is the plain reference;
faster kernels replace parts of a built model in one call, spin_kernels.install(model, impl).

The model is stateless: a KVCache object (after the architecture, below) is passed into forward,
never stored on the module.
Batches are left-padded (see DESIGN.md): `attention_mask` is zeros then ones per row.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config (read from a checkpoint's config.json by hf_folder.read_config)

@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (scaled_frequencies, at the end)
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # query i sees keys i-W < j <= i; None = full causal
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # the dtype the checkpoint is stored in
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "mistral"  # or "llama", "qwen2", "qwen3": kept for exports
    attention_bias: bool = False  # bias on q, k, v (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)


# ----------------------------------------------------------------------------------------------
# Normalisation

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 (F.rms_norm: x * rsqrt(mean(x^2) + eps), one fused op), cast back
        # before the weight: the order transformers uses, which matters for bf16 parity.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings (Su et al. 2021, "RoFormer")

def rope_frequencies(cfg, device=None):
    """(D/2,) inverse frequencies theta^(-2i/D): dimension pair i turns by position * theta^(-2i/D).
    Llama checkpoints may rescale them (cfg.rope_scaling, scaled_frequencies at the end)."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)
    return inv_freq if cfg.rope_scaling is None else scaled_frequencies(inv_freq, cfg.rope_scaling)


def rotary(positions, inv_freq, dtype):
    """cos, sin (B, 1, T, D) for the rotate-half layout (first half / second half of D pair up).
    sin comes back with its first half negated, for apply_rotary."""
    freqs = positions.float()[:, :, None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    sin = emb.sin()
    sin[..., :emb.shape[-1] // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rotary(x, cos, sin):
    # x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1): the sign lives in sin
    # (negated once per forward, exact in IEEE), so per layer a roll replaces chunk, neg and cat.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ----------------------------------------------------------------------------------------------
# Attention

def visibility(Tq, Tk, starts, window, q_offset, device):
    """Boolean (B or 1, 1, Tq, Tk) mask: query i sits at key index qi = q_offset + i and sees
    key j iff starts[b] <= j <= qi and, with a window W, qi - W < j (W keys, itself included:
    Mistral's and transformers' rule). See DESIGN.md "Attention semantics"."""
    qi = torch.arange(Tq, device=device)[:, None] + q_offset  # (Tq, 1) absolute query index
    j = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    mask = j <= qi  # (Tq, Tk) causal
    if window is not None:  # Mistral's 4096 exceeds every sequence of SPIN's recipe: a no-op there
        mask = mask & (j > qi - window)
    mask = mask[None, None]  # (1, 1, Tq, Tk)
    if starts is not None:
        mask = mask & (j >= starts.to(device).view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    return mask


def attention(q, k, v, starts=None, window=None, q_offset=0):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D): grouped-query attention with
    scale 1/sqrt(D) under the visibility rule; a query with no visible key (a padding query)
    outputs exactly 0 and passes no gradient. q_offset: an int, or a 0-dim tensor."""
    H = q.shape[1]
    mask = visibility(q.shape[2], k.shape[2], starts, window, q_offset, q.device)  # (B|1, 1, Tq, Tk)
    # SDPA's handling of an all-False row differs between backends (NaN or 0, and NaN
    # gradients), so let such rows see every key, then zero their output with where(): the
    # where also blocks their gradient.
    empty = ~mask.any(-1, keepdim=True)  # (B|1, 1, Tq, 1)
    mask = mask | empty
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != k.shape[1])
    return torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)


class Attention(nn.Module):
    attend = staticmethod(attention)  # spin_kernels.install puts a flash/decode kernel here

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, starts, cache, layer):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        if self.cfg.qk_norm:  # Qwen3: each head's q and k normalised over D, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q_offset = 0
        if cache is not None:  # attend over every key so far, this chunk's included
            q_offset = cache.offset
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D)
        y = self.attend(q, k, v, starts, self.cfg.sliding_window, q_offset)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


# ----------------------------------------------------------------------------------------------
# MLP, block, model

def swiglu(x, gate, up, down):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)); gate, up, down are the layers."""
    return down(F.silu(gate(x)) * up(x))


class MLP(nn.Module):
    glu = staticmethod(swiglu)  # spin_kernels.install puts a CPU decode step with fused products here

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.glu(x, self.gate_proj, self.up_proj, self.down_proj)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, starts, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, starts, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):  # the `model.` prefix of the checkpoint keys
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def linear_logprobs(hidden, weight, targets, *, ignore_index=-100):
    """log_softmax(hidden @ weight.T)[n, targets[n]] in fp32 (fp64 for fp64 inputs), (N,);
    0 where targets == ignore_index. hidden (N, C), weight (V, C), targets (N,).
    Written plainly: the full (N, V) logits are built (spin_kernels/logprob.py computes the same
    without keeping them)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T  # (N, V)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logp = logits.log_softmax(-1).gather(-1, safe[:, None])[:, 0]  # (N,)
    return torch.where(valid, logp, 0.0)


class Mistral(nn.Module):
    head_logprobs = staticmethod(linear_logprobs)  # spin_kernels.install puts a fused kernel here
    kernels = "reference"  # what spin_kernels.install put in, for a reader (and a run's record)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache=None, targets=None, logits_to_keep=None):
        """input_ids (B, T) -> logits (B, T, V); or, given targets (B, T), per-token log-probs
        (B, T) fp32 (fp64 for fp64 weights) where entry t is log p(targets[:, t] | input_ids[:, :t+1])
        and targets == -100 gives 0. The log-prob route lives in forward, not in a method of its own, because FSDP2's
        hooks unshard the root module's parameters (the LM head) only around forward.

        attention_mask (B, T): left padding (zeros then ones). With a cache it may only be
        given on the first call (the prefill); later calls append real tokens to every row.
        logits_to_keep=k: logits of the last k positions only (a prefill needs just the last).
        """
        B, T = input_ids.shape
        cfg = self.config
        starts = None if attention_mask is None else left_padding(attention_mask)  # (B,) padding of each row
        q_offset = 0  # key index of the first query
        if cache is not None:  # the prefill stores each row's padding; later calls append to every row
            starts, q_offset = cache.begin(T, starts, B, input_ids.device)
        # Positions count from each row's first real token, so padding never shifts them: a row
        # of 2 padding slots and 3 tokens gets 0 0 | 0 1 2, and its next token (key index 5) gets 3.
        positions = (q_offset + torch.arange(T, device=input_ids.device)).expand(B, T)  # (B, T)
        if starts is not None:
            positions = (positions - starts[:, None]).clamp(min=0)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rotary(positions, rope_frequencies(cfg, input_ids.device), x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, starts, cache, i)
        if cache is not None:
            cache.advance(T)
        if targets is None:
            if logits_to_keep is not None:
                x = x[:, -logits_to_keep:]
            h = self.model.norm(x)  # (B, T or k, C)
            return self.lm_head(h)
        x = self.model.norm(x)
        # Only scored positions go through the LM head: in a SPIN batch the prompt and padding
        # are a third or more of the tokens, and the head is the costliest layer of a small model.
        flat = targets.reshape(B * T)
        keep = (flat != -100).nonzero().squeeze(1)  # (N,)
        h = x.reshape(B * T, cfg.hidden_size).index_select(0, keep)  # (N, C)
        lp = self.head_logprobs(h, self.lm_head.weight, flat.index_select(0, keep))  # (N,)
        out = torch.zeros(B, T, dtype=lp.dtype, device=lp.device)
        out.view(B * T).index_copy_(0, keep, lp)
        return out  # (B, T); a fresh tensor, not a view, as FSDP's pre-backward hook needs

    def token_logprobs(self, input_ids, targets, attention_mask=None):
        return self(input_ids, attention_mask=attention_mask, targets=targets)


def left_padding(attention_mask):
    """(B, T) mask of zeros then ones -> (B,) number of leading zeros. Anything else is refused:
    right padding or holes would silently change which keys a query sees."""
    m = attention_mask.to(torch.long)
    starts = m.shape[1] - m.sum(1)
    expected = torch.arange(m.shape[1], device=m.device)[None, :] >= starts[:, None]
    if not torch.equal(m.bool(), expected):
        raise ValueError("attention_mask must be left-padded (zeros then ones in every row)")
    return starts


# ----------------------------------------------------------------------------------------------
# KV cache: plain tensors owned by the caller (the sampler), never module state; forward reads it
# through begin (each row's padding, the first query's key index), update and advance.

class KVCache:
    """Per layer (B, Hkv, S, D) keys and values. Every row holds the same number of filled
    slots (left padding keeps them aligned), so one length serves the batch. The model calls
    `begin`, `offset`, `update` and `advance`: all that a cache with another layout (a subclass) gives."""

    def __init__(self, k, v, starts):
        self.k, self.v = k, v  # lists over layers of (B, Hkv, S, D)
        self.starts = starts  # (B,) left-padding length of each row, set by the first forward
        self.length = 0  # filled slots

    @classmethod
    def allocate(cls, config, batch, max_len, device=None, dtype=torch.float32):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        # The cache holds max_len slots even with a sliding window: simpler than a ring buffer,
        # and SPIN's sequences (prompt + new tokens, <= 1024 in the recipe) are shorter than
        # Mistral's 4096 window, so a ring buffer would save nothing there.
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        return cls(k, v, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self):
        return self.k[0].shape[2]

    @property
    def offset(self):
        """Slots filled before this forward: the key index of its first query."""
        return self.length

    def begin(self, T, starts, B, device):
        """Before a forward of T tokens: (each row's left padding (B,), the key index of the first
        query). The first call (the prefill) stores the padding (starts, or none); later calls
        append T tokens to every row and reuse it."""
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} slots; {self.length} used + {T} new")
        if self.length == 0:
            self.starts = starts if starts is not None else torch.zeros(B, dtype=torch.long, device=device)
        elif starts is not None:
            raise ValueError("attention_mask is only accepted on the first (prefill) call with a cache")
        return self.starts, self.offset

    def update(self, layer, k, v):
        """Write this chunk's (B, Hkv, T, D) keys and values after the filled slots; return
        every key and value so far, (B, Hkv, offset + T, D)."""
        n = self.length + k.shape[2]
        self.k[layer][:, :, self.length:n] = k
        self.v[layer][:, :, self.length:n] = v
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def advance(self, T):  # after the last layer
        self.length += T


# ----------------------------------------------------------------------------------------------
# Other families: the rope scalings of Llama checkpoints (Mistral and Qwen use none)

def scaled_frequencies(inv_freq, s):
    """"linear" divides every frequency by `factor` (positions / factor); "llama3" (Llama 3.1/3.2)
    divides only the low frequencies, whose wavelength exceeds original_max_position_embeddings /
    low_freq_factor, keeps the high ones (wavelength below that / high_freq_factor), and blends
    linearly in between, so long contexts stretch the slow dimensions only."""
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    factor, lo, hi, ctx = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > ctx / lo, inv_freq / factor, inv_freq)
    smooth = (ctx / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
    return torch.where(medium, blended, scaled)
