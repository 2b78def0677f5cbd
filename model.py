"""Mistral, written by hand in plain PyTorch, loading and saving Hugging Face checkpoints.

Architecture (Jiang et al. 2023, "Mistral 7B"): token embedding -> N x [RMSNorm -> grouped-query
attention with rotary embeddings and a sliding window -> residual -> RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> LM head. Module attribute names equal the Hugging Face keys
(`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load strictly with no rename table.

The model is stateless: a KVCache object is passed into forward, never stored on the module.
Batches are left-padded (see DESIGN.md): `attention_mask` is zeros then ones per row.
"""
import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention, attention_torch
from kernels.logprob import linear_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    sliding_window: int | None = None  # query i sees keys i-W < j <= i; None = full causal
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # the dtype the checkpoint is stored in
    bos_token_id: int = 1
    eos_token_id: int = 2

    @classmethod
    def from_hf(cls, path):
        """Read a Hugging Face `config.json` (a file, or the folder holding it)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face model folder)")
        try:
            with open(file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=file)

    @classmethod
    def from_dict(cls, raw, source="config"):
        def need(key):
            if key not in raw or raw[key] is None:
                raise ValueError(f"{source}: missing required field '{key}'")
            return raw[key]

        if raw.get("model_type", "mistral") not in ("mistral", "llama"):
            raise ValueError(f"{source}: model_type '{raw['model_type']}' is not supported (mistral, llama)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act '{raw['hidden_act']}' is not supported (silu)")
        # Two spellings in the wild: Mistral-7B / Zephyr files have top-level rope_theta and
        # torch_dtype; transformers 5 writes rope_parameters {rope_theta, rope_type} and dtype.
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ValueError(f"{source}: rope scaling is not supported (only rope_type 'default')")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"{source}: dtype '{dtype}' is not supported ({', '.join(DTYPES)})")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        hidden = need("hidden_size")
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        eos = raw.get("eos_token_id", 2)
        return cls(
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=float(rope_theta),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False), dtype=dtype,
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def to_hf(self):
        """The config.json that transformers reads back as a MistralForCausalLM."""
        d = asdict(self)
        # Both spellings: transformers 5 reads rope_parameters/dtype, 4.x (what the official
        # SPIN stack pins) reads rope_theta/torch_dtype and would silently default the theta.
        d.update(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                 rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
                 torch_dtype=self.dtype)
        return d


# A tiny model for tests and the CPU demo: same code paths as a 7B, GQA ratio 2, a window.
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=512, sliding_window=None)


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
# Linear layers, and the CPU decode fast path

def _probe_onednn():
    """oneDNN's private ops are in every x86 build of torch; other builds (an ARM laptop) may
    lack them or refuse fp32. Try both forms once on a small product; use them only if they
    work and agree with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            w, x = torch.arange(12.0).view(3, 4) / 7, torch.ones(2, 4)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
            got = [torch.ops.mkldnn._linear_pointwise(x, v, None, "none", [], "") for v in (w, packed)]
        return all(torch.allclose(g, F.linear(x, w)) for g in got)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_ONEDNN = _probe_onednn()
_PACKED = {}  # id(weight) -> (weight, oneDNN copy), filled only inside cpu_decode_weights
PACK_BUDGET_BYTES = 1 << 30
DECODE_ROWS = 64  # up to this many rows a CPU product is a "decode step" (MKL wins above)


def linear(x, w):
    """F.linear(x, w), except for a CPU decode step (at most 64 rows, fp32, no autograd), which
    calls oneDNN's kernel directly, on the packed copy of w when cpu_decode_weights made one:
    MKL's and oneDNN's general paths reorder the weight on every call, which for a few rows
    costs more than the product itself (bench/RESULTS_generate_cpu.md). The modules call this
    with their weights, so hooks on (or replacements of) the nn.Linear modules never run."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
            and x.numel() <= DECODE_ROWS * x.shape[-1] and torch.backends.mkldnn.enabled:
        packed = _PACKED.get(id(w))
        return torch.ops.mkldnn._linear_pointwise(x, w if packed is None else packed[1], None, "none", [], "")
    return F.linear(x, w)


@contextlib.contextmanager
def cpu_decode_weights(model, rows):
    """Within the block, linear() reads oneDNN copies of the model's fp32 CPU weights, packed
    once for `rows` rows (the same products up to float32 summation order). The weights must not
    change inside the block. The copies cost the weights' memory again, so models with more than
    PACK_BUDGET_BYTES of linear weights (and GPU or half-precision models, or more than
    DECODE_ROWS rows, which never take the oneDNN path) run unpacked."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    # Plain tensors only: an FSDP-sharded weight (a DTensor) is left to F.linear.
    ok = _ONEDNN and ws and rows <= DECODE_ROWS and all(
        type(w.detach()) is torch.Tensor and w.device.type == "cpu" and w.dtype == torch.float32 for w in ws) \
        and sum(w.numel() * 4 for w in ws) <= PACK_BUDGET_BYTES
    mine = []
    try:
        if ok:
            for w in ws:
                if id(w) not in _PACKED:  # a tied or nested use keeps the outer copy
                    _PACKED[id(w)] = (w, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows))
                    mine.append(id(w))
        yield
    finally:
        for i in mine:
            _PACKED.pop(i, None)


def rotary(positions, head_dim, theta, dtype):
    """cos, sin (B, 1, T, D) for the rotate-half layout (first half / second half of D pair up).
    sin comes back with its first half negated, for apply_rotary."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[:, :, None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    sin = emb.sin()
    sin[..., :head_dim // 2].neg_()
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
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, Hkv * D, bias=False)
        self.v_proj = nn.Linear(C, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, starts, cache, layer, attn_impl):
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = linear(x, self.q_proj.weight).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = linear(x, self.k_proj.weight).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = linear(x, self.v_proj.weight).view(B, T, Hkv, D).transpose(1, 2)
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
            y = attention(q, k, v, starts=starts, window=self.cfg.sliding_window, q_offset=q_offset,
                          impl=attn_impl)  # (B, H, T, D)
        return linear(y.transpose(1, 2).reshape(B, T, H * D), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU (Shazeer 2020)
        return linear(F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight), self.down_proj.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, starts, cache, layer, attn_impl):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, starts, cache, layer, attn_impl)
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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, positions=None, cache=None, targets=None,
                attn_impl="auto", logprob_impl="auto", logits_to_keep=None):
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
        cos, sin = rotary(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, starts, cache, i, attn_impl)
        if static:
            cache.pos.add_(T)
        elif cache is not None:
            cache.length += T
        if targets is None:
            if logits_to_keep is not None:
                x = x[:, -logits_to_keep:]
            h = self.model.norm(x)  # (B, k, C)
            return linear(h, self.lm_head.weight)
        x = self.model.norm(x)
        # Only scored positions go through the LM head: in a SPIN batch the prompt and padding
        # are a third or more of the tokens, and the head is the costliest layer of a small model.
        flat = targets.reshape(B * T)
        keep = (flat != -100).nonzero().squeeze(1)  # (N,)
        h = x.reshape(B * T, cfg.hidden_size).index_select(0, keep)  # (N, C)
        lp = linear_logprobs(h, self.lm_head.weight, flat.index_select(0, keep), impl=logprob_impl)
        out = torch.zeros(B, T, dtype=lp.dtype, device=lp.device)
        out.view(B * T).index_copy_(0, keep, lp)
        return out  # (B, T); a fresh tensor, not a view, as FSDP's pre-backward hook needs

    def token_logprobs(self, input_ids, targets, attention_mask=None, **kw):
        return self(input_ids, attention_mask=attention_mask, targets=targets, **kw)

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
        state = load_checkpoint(path, model, dtype=dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=2 * 1024**3, extra_files=None):
        save_checkpoint(self.state_dict(), self.config, path, max_shard_bytes, extra_files)


def left_padding(attention_mask):
    """(B, T) mask of zeros then ones -> (B,) number of leading zeros. Anything else is refused:
    right padding or holes would silently change which keys a query sees."""
    m = attention_mask.to(torch.long)
    starts = m.shape[1] - m.sum(1)
    expected = torch.arange(m.shape[1], device=m.device)[None, :] >= starts[:, None]
    if not torch.equal(m.bool(), expected):
        raise ValueError("attention_mask must be left-padded (zeros then ones in every row)")
    return starts


def resolve_dtype(dtype, source="dtype"):
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"{source}: dtype {dtype} is not supported ({', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{source}: dtype '{dtype}' is not supported ({', '.join(DTYPES)})")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Safetensors I/O (never pickle)

def checkpoint_files(path):
    """The safetensors files of a folder, and a map tensor name -> file."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{index} names shard '{name}', which does not exist in {path}")
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(path) else []
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    names = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    names[key] = file
        except Exception as e:  # safetensors raises its own error type for truncated headers
            raise ValueError(f"{file}: cannot read safetensors file ({e})") from None
    return names


def load_checkpoint(path, model, dtype, device=None):
    """Read every tensor of a HF folder into `dtype` on `device`, after checking that the names
    and shapes are exactly the model's. Returns a state dict for load_state_dict(assign=True)."""
    from safetensors import safe_open
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    names = checkpoint_files(path)
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    misshaped = []
    by_file = {}
    for key, file in names.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                if key in expected:
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        misshaped.append(f"{key}: file {shape}, model {expected[key]}")
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(v)}): {', '.join(v[:20])}{' ...' if len(v) > 20 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if v]
        raise ValueError(f"{path}: checkpoint does not match the config; " + "; ".join(parts))
    state = {}
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if not t.is_floating_point():
                        raise ValueError(f"{file}: tensor '{key}' has unsupported dtype {t.dtype}")
                    state[key] = t.to(device=device, dtype=dtype)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensors ({e})") from None
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _umask():
    """The process umask. Linux shows it in /proc; elsewhere set-and-restore, which for an
    instant applies 022 to files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(state_dict, config, path, max_shard_bytes=2 * 1024**3, extra_files=None):
    """Write a HF folder (config.json + safetensors, sharded with an index above max_shard_bytes,
    plus extra_files {name: source path}, e.g. the tokenizer). Written into a temporary folder
    that is renamed into place, so a crash never leaves a folder that looks complete but is not."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # stored once, as transformers does
    dtypes = {t.dtype for t in tensors.values()}
    dtype_name = next((n for n, d in DTYPES.items() if d in dtypes), config.dtype)
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Unique hidden siblings made by mkdir, so they get the umask's mode (mkdtemp's are owner-only).
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp)
    try:
        cfg = config.to_hf()
        cfg["dtype"] = cfg["torch_dtype"] = dtype_name
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for name, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, name))
        mask = _umask()  # safetensors writes owner-only files: give them the usual mode
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        if os.path.exists(path):
            old = os.path.join(parent, f".old-{os.getpid()}-{os.urandom(4).hex()}")
            os.mkdir(old)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
