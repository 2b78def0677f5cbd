"""Mistral, written by hand in plain PyTorch, loading and saving Hugging Face checkpoints.

Architecture (Jiang et al. 2023, "Mistral 7B"): token embedding -> N x [RMSNorm -> grouped-query
attention with rotary embeddings and a sliding window -> residual -> RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> LM head. Llama is the same network; Qwen2/Qwen2.5 add a bias to the q, k, v
projections (ModelConfig.attention_bias) and Qwen3 an RMSNorm over each head of q and k before
the rotation (ModelConfig.qk_norm). Module attribute names equal the Hugging Face keys
(`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load strictly with no rename table.
Reading and writing the files is checkpoint.py's; the kernels are kernels/'s, chosen by
SPIN_KERNELS (kernels/__init__.py).

The model is stateless: a KVCache object is passed into forward, never stored on the module.
Batches are left-padded (see DESIGN.md): `attention_mask` is zeros then ones per row.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import DTYPES, load_hf_state, resolve_dtype, save_hf
from errors import InputError, MissingInput
from kernels.attention import attention, attention_torch
from kernels.cpu_linear import Linear
from kernels.logprob import linear_logprobs


# ----------------------------------------------------------------------------------------------
# Config

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
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (rope_frequencies)
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # query i sees keys i-W < j <= i; None = full causal
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # the dtype the checkpoint is stored in
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "mistral"  # or "llama", "qwen2", "qwen3": kept for exports
    attention_bias: bool = False  # bias on q, k, v (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)

    @classmethod
    def from_hf(cls, path):
        """Read a Hugging Face `config.json` (a file, or the folder holding it)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise MissingInput(f"{file}: no config.json (expected a Hugging Face model folder)")
        try:
            with open(file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=file)

    @classmethod
    def from_dict(cls, raw, source="config"):
        def need(key):
            if key not in raw or raw[key] is None:
                raise InputError(f"{source}: missing required field '{key}'")
            return raw[key]

        def refuse(field, value, supported):
            raise InputError(f"{source}: field '{field}' is {value!r}, which this model does not implement "
                             f"({supported}); use a checkpoint without it")

        model_type = raw.get("model_type", "mistral")
        if model_type not in ("mistral", "llama", "qwen2", "qwen3"):
            refuse("model_type", model_type, "mistral, llama, qwen2 or qwen3")
        if raw.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", raw["hidden_act"], "silu")
        # Llama and Qwen3 configs may ask for biases (Qwen3 on o_proj too); Qwen2's q/k/v always have one.
        for field in ("attention_bias", "mlp_bias") if model_type != "qwen2" else ("mlp_bias",):
            if raw.get(field):
                refuse(field, raw[field], "projections without bias")
        window = raw.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            # transformers' Qwen2Config/Qwen3Config: the window applies only with use_sliding_window,
            # and then only to layers >= max_window_layers (or where layer_types says so).
            layers = need("num_hidden_layers")
            kinds = raw.get("layer_types") or ["sliding_attention" if raw.get("use_sliding_window") and window
                                               and i >= raw.get("max_window_layers", 28) else "full_attention"
                                               for i in range(layers)]
            if "sliding_attention" in kinds:
                refuse("use_sliding_window", True, "Qwen models with full attention in every layer")
            window = None
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", raw["partial_rotary_factor"], "rotary on the whole head, 1.0")
        # Two spellings in the wild: Mistral-7B / Zephyr / Llama 3 files have top-level rope_theta,
        # rope_scaling and torch_dtype; transformers 5 writes rope_parameters {rope_theta, rope_type,
        # ...} and dtype.
        rope = dict(raw.get("rope_scaling") or {}, **(raw.get("rope_parameters") or {}))
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise InputError(f"{source}: dtype '{dtype}' is not supported ({', '.join(DTYPES)})")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        hidden = need("hidden_size")
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise InputError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        eos = raw.get("eos_token_id", 2)
        return cls(
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling(rope, source),
            sliding_window=window,
            tie_word_embeddings=raw.get("tie_word_embeddings", False), dtype=dtype,
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, model_type=model_type,
            attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        )

    def to_hf(self):
        """The config.json that transformers reads back as a MistralForCausalLM (or Llama)."""
        d = asdict(self)
        # Both spellings: transformers 5 reads rope_parameters/dtype, 4.x (what the official
        # SPIN stack pins) reads rope_theta/rope_scaling/torch_dtype and would silently default.
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d.update(architectures=[arch.get(self.model_type, "MistralForCausalLM")], hidden_act="silu",
                 rope_parameters=rope, torch_dtype=self.dtype)
        del d["qk_norm"], d["attention_bias"]  # implied by the model type
        if self.model_type in ("llama", "qwen3"):
            d.update(attention_bias=False, mlp_bias=False)
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, max_window_layers=self.num_hidden_layers)
        return d


_ROPE_FIELDS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(rope, source):
    """The rope scaling of a config (merged rope_scaling / rope_parameters), checked: None, or a
    dict of the fields its type needs."""
    kind = rope.get("rope_type", rope.get("type", "default"))  # "type": older Llama files
    if kind == "default":
        return None
    if kind not in _ROPE_FIELDS:
        raise InputError(f"{source}: field 'rope_type' (rope scaling) is {kind!r}, which this model does not "
                         f"implement (default, linear, llama3); use a checkpoint without it")
    missing = [f for f in _ROPE_FIELDS[kind] if rope.get(f) is None]
    if missing:
        raise InputError(f"{source}: rope scaling of type {kind!r} needs the field '{missing[0]}'")
    return {"rope_type": kind, **{f: rope[f] for f in _ROPE_FIELDS[kind]}}


# ----------------------------------------------------------------------------------------------
# KV cache: plain tensors owned by the caller, never module state.

@dataclass
class KVCache:
    k: list  # per layer (B, Hkv, S, D)
    v: list
    starts: torch.Tensor  # (B,) left-padding length of each row, set by the first forward
    length: int = 0  # number of filled slots (shared by all rows: left padding keeps them aligned)
    pos: torch.Tensor | None = None  # static mode only (make_static): the filled length, 0-dim

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

    def make_static(self):
        """Switch to static shapes, for CUDA-graph replay (generate.sample(cuda_graph=True)):
        from now on the filled length lives in `pos`, a device tensor each forward advances in
        place, and every forward attends over all slots with the unfilled ones masked, so no
        shape and no kernel argument depends on the length. `length` stops counting; the
        caller keeps pos + new tokens within the capacity (nothing checks it on the device)."""
        self.pos = torch.tensor(self.length, device=self.k[0].device)


# ----------------------------------------------------------------------------------------------
# Modules

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
    """(D/2,) inverse frequencies theta^(-2i/D), and the rope scalings Llama checkpoints use:
    "linear" divides them all by `factor` (positions / factor); "llama3" (Llama 3.1/3.2) divides
    only the low frequencies, whose wavelength exceeds original_max_position_embeddings /
    low_freq_factor, keeps the high ones (wavelength below that / high_freq_factor), and blends
    linearly in between, so long contexts stretch the slow dimensions only."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    factor, lo, hi, ctx = (s[k] for k in _ROPE_FIELDS["llama3"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > ctx / lo, inv_freq / factor, inv_freq)
    smooth = (ctx / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
    return torch.where(medium, blended, scaled)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = Linear(H * D, C)
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
        if cache is not None and cache.pos is not None:
            # Static shapes (KVCache.make_static): write at the device-side position, attend over
            # every slot; slots past the queries are invisible by the causal rule. Always the
            # torch path: the Triton decode kernel takes the length as a launch argument.
            idx = cache.pos + torch.arange(T, device=x.device)  # (T,)
            cache.k[layer].index_copy_(2, idx, k)
            cache.v[layer].index_copy_(2, idx, v)
            y = attention_torch(q, cache.k[layer], cache.v[layer], starts, self.cfg.sliding_window, cache.pos)
        else:
            q_offset = 0
            if cache is not None:
                # Write this chunk after the filled slots, then attend over everything so far.
                q_offset = cache.length
                cache.k[layer][:, :, q_offset:q_offset + T] = k
                cache.v[layer][:, :, q_offset:q_offset + T] = v
                k = cache.k[layer][:, :, :q_offset + T]  # (B, Hkv, S, D)
                v = cache.v[layer][:, :, :q_offset + T]
            y = attention(q, k, v, starts=starts, window=self.cfg.sliding_window, q_offset=q_offset)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):  # SwiGLU (Shazeer 2020)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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


class Mistral(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, positions=None, cache=None, targets=None,
                logits_to_keep=None):
        """input_ids (B, T) -> logits (B, T, V); or, given targets (B, T), per-token log-probs
        (B, T) fp32 where entry t is log p(targets[:, t] | input_ids[:, :t+1]) and targets == -100
        gives 0. The log-prob path goes through the fused kernel and never builds the logits;
        it lives in forward (not a separate method) so FSDP's hooks unshard the LM head for it.

        attention_mask (B, T): left padding (zeros then ones). With a cache it may only be
        given on the first call (the prefill); later calls append real tokens to every row.
        positions (B, T): defaults to the mask-derived ones, so padding never shifts them.
        logits_to_keep=k: logits of the last k positions only (a prefill needs just the last).
        """
        B, T = input_ids.shape
        cfg = self.config
        static = cache is not None and cache.pos is not None  # no host value of the length
        q_offset = 0 if cache is None else cache.pos if static else cache.length  # int, or 0-dim tensor
        if cache is not None and not static and q_offset + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} slots; {q_offset} used + {T} new")
        if attention_mask is not None:
            if cache is not None and (static or q_offset > 0):
                raise ValueError("attention_mask is only accepted on the first (prefill) call with a cache")
            starts = left_padding(attention_mask)
        elif cache is not None:
            starts = cache.starts
        else:
            starts = None
        if cache is not None and not static and q_offset == 0:
            cache.starts = starts if starts is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
            starts = cache.starts
        if positions is None:
            positions = (q_offset + torch.arange(T, device=input_ids.device)).expand(B, T)
            if starts is not None:
                positions = (positions - starts[:, None]).clamp(min=0)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rotary(positions, rope_frequencies(cfg, input_ids.device), x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, starts, cache, i)
        if static:
            cache.pos.add_(T)
        elif cache is not None:
            cache.length += T
        if targets is None:
            if logits_to_keep is not None:
                x = x[:, -logits_to_keep:]
            h = self.model.norm(x)  # (B, k, C)
            return self.lm_head(h)
        x = self.model.norm(x)
        # Only scored positions go through the LM head: in a SPIN batch the prompt and padding
        # are a third or more of the tokens, and the head is the costliest layer of a small model.
        flat = targets.reshape(B * T)
        keep = (flat != -100).nonzero().squeeze(1)  # (N,)
        h = x.reshape(B * T, cfg.hidden_size).index_select(0, keep)  # (N, C)
        lp = linear_logprobs(h, self.lm_head.weight, flat.index_select(0, keep))
        out = torch.zeros(B, T, dtype=lp.dtype, device=lp.device)
        out.view(B * T).index_copy_(0, keep, lp)
        return out  # (B, T); a fresh tensor, not a view, as FSDP's pre-backward hook needs

    def token_logprobs(self, input_ids, targets, attention_mask=None):
        return self(input_ids, attention_mask=attention_mask, targets=targets)

    # ------------------------------------------------------------------------------------------
    # Hugging Face folders

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face folder (single safetensors file or sharded with an index).
        The model is built on the meta device and each tensor is read, cast and moved on its
        own, so host memory never holds a second full copy of the weights."""
        config = ModelConfig.from_hf(path)
        dtype = resolve_dtype(dtype or config.dtype, source=f"{path}/config.json")
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = load_hf_state(path, expected, dtype, device, tied=config.tie_word_embeddings)
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=2 * 1024**3, extra_files=None):
        save_hf(self.state_dict(), self.config.to_hf(), path, max_shard_bytes, extra_files,
                tied=self.config.tie_word_embeddings)


def left_padding(attention_mask):
    """(B, T) mask of zeros then ones -> (B,) number of leading zeros. Anything else is refused:
    right padding or holes would silently change which keys a query sees."""
    m = attention_mask.to(torch.long)
    starts = m.shape[1] - m.sum(1)
    expected = torch.arange(m.shape[1], device=m.device)[None, :] >= starts[:, None]
    if not torch.equal(m.bool(), expected):
        raise ValueError("attention_mask must be left-padded (zeros then ones in every row)")
    return starts
