"""Hugging Face model folders: config.json <-> ModelConfig, safetensors <-> the model's weights.

    read_config(path) -> ModelConfig           config.json, checked (what the model cannot do is refused)
    config_to_hf(cfg) -> dict                  the config.json transformers reads back
    load_model(path, dtype, device) -> Mistral built on the meta device, loaded strictly
    save_model(model, path, ...)               config.json + (sharded) safetensors, atomically
    export(model, config, folder, ...)         gather a sharded model on rank 0 and save it

Nothing here is a pickle: weights are read and written as safetensors only.
"""
import json
import os
import shutil
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import parallel
from checkpoint import _umask, atomic_folder
from errors import InputError, MissingInput, UserError
from model import Mistral, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, source="dtype"):
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"{source}: dtype {dtype} is not supported ({', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"{source}: dtype '{dtype}' is not supported ({', '.join(DTYPES)})")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# config.json

def read_config(path) -> ModelConfig:
    """Read a Hugging Face `config.json` (a file, or the folder holding it)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise MissingInput(f"{file}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    return config_from_dict(raw, source=file)


def config_from_dict(raw, source="config") -> ModelConfig:
    """A config.json's dict -> ModelConfig, refusing what this model does not implement."""
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
    return ModelConfig(
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


def config_to_hf(cfg: ModelConfig):
    """The config.json that transformers reads back as a MistralForCausalLM (or Llama, Qwen2, Qwen3)."""
    d = asdict(cfg)
    # Both spellings: transformers 5 reads rope_parameters/dtype, 4.x (what the official
    # SPIN stack pins) reads rope_theta/rope_scaling/torch_dtype and would silently default.
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    d.update(architectures=[arch.get(cfg.model_type, "MistralForCausalLM")], hidden_act="silu",
             rope_parameters=rope, torch_dtype=cfg.dtype)
    del d["qk_norm"], d["attention_bias"]  # implied by the model type
    if cfg.model_type in ("llama", "qwen3"):
        d.update(attention_bias=False, mlp_bias=False)
    if cfg.model_type in ("qwen2", "qwen3"):
        d.update(use_sliding_window=False, max_window_layers=cfg.num_hidden_layers)
    return d


# ----------------------------------------------------------------------------------------------
# Hugging Face safetensors folders

def checkpoint_files(path):
    """The safetensors files of a folder, and a map tensor name -> file."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise TypeError(f"it holds a JSON {type(doc).__name__}, not an object")
            weight_map = doc["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("'weight_map' is not a map of tensor names to file names")
        except UnicodeDecodeError as e:
            raise InputError(f"{index}: not UTF-8 text (byte {e.start}), so not a safetensors index") from None
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError; a list has no ["weight_map"]
            raise InputError(f"{index}: not a valid safetensors index ({e if isinstance(e, TypeError) else repr(e)}): "
                             "expected a JSON object with a 'weight_map' of tensor names to shard files") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise MissingInput(f"{index} names shard '{name}', which does not exist in {path}")
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))) if os.path.isdir(path) else []
        hint = (f" (found {', '.join(pickles)}: pickle checkpoints are never loaded, since unpickling runs code; "
                "convert the folder once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(DIR))") if pickles else ""
        gguf = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
        if gguf:  # quantized llama.cpp weights: transformers dequantizes them (spin_tools/smollm2.py does)
            hint = (f" (found {', '.join(gguf)}: GGUF files are not read; convert them once with transformers "
                    "as spin_tools/smollm2.py does: from_pretrained(DIR, gguf_file=NAME), its state dict into a fresh "
                    "model of the same config, save_pretrained)")
        raise MissingInput(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    names = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    names[key] = file
        except Exception as e:  # safetensors raises its own error type for truncated headers
            raise InputError(f"{file}: cannot read safetensors file ({e})") from None
    return names


def check_model_folder(path, flag="--model"):
    """Say what is wrong with a model folder before anything is read from it: not there, a file,
    no config.json, no safetensors weights (a folder of pickles). Its tokenizer is checked by the
    tokenizer's reader."""
    what = "a Hugging Face model folder (config.json, *.safetensors and the tokenizer files)"
    if not os.path.exists(path):
        raise MissingInput(f"{flag} {path}: no such folder; expected {what}")
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a file; expected {what}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        found = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
        raise MissingInput(f"{flag} {path}: no config.json (found {found}); expected {what}")
    try:
        checkpoint_files(path)
    except UserError as e:
        raise type(e)(f"{flag} {e}") from None


def load_hf_state(path, expected, dtype, device=None, tied=False):
    """Read every tensor of a HF folder into `dtype` on `device`, after checking that the names
    and shapes are exactly `expected` ({name: shape}). With tied embeddings the file holds no
    lm_head.weight; it comes back as the embedding. Returns a state dict."""
    expected = dict(expected)
    if tied:
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
    if missing or unexpected or misshaped:  # how many, and the first three of each: one readable line
        parts = [f"{label} ({len(v)}): {', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if v]
        raise InputError(f"{path}: checkpoint does not match the config; " + "; ".join(parts))
    state = {}
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if not t.is_floating_point():
                        raise InputError(f"{file}: tensor '{key}' has unsupported dtype {t.dtype}")
                    state[key] = t.to(device=device, dtype=dtype)
        except ValueError:
            raise
        except Exception as e:
            raise InputError(f"{file}: cannot read tensors ({e})") from None
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def save_hf(state_dict, config, path, max_shard_bytes=2 * 1024**3, extra_files=None, tied=False):
    """Write a HF folder: config.json (the dict `config`) + safetensors, sharded with an index
    above max_shard_bytes, plus extra_files {name: source path}, e.g. the tokenizer."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if tied:
        tensors.pop("lm_head.weight", None)  # stored once, as transformers does
    dtypes = {t.dtype for t in tensors.values()}
    dtype_name = next((n for n, d in DTYPES.items() if d in dtypes), config.get("dtype", "float32"))
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    with atomic_folder(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(config, dtype=dtype_name, torch_dtype=dtype_name), f, indent=2)
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


def export(model, config, folder, extra_files, dtype):
    """Gather a (sharded) model's full weights on rank 0 and write a HF folder (plus the
    tokenizer files) atomically. Every rank must call it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    parallel.on_rank0(lambda: save_hf(
        {k.replace("._checkpoint_wrapped_module", ""): v.to(dtype) for k, v in state.items()},
        config_to_hf(config), folder, extra_files=extra_files, tied=config.tie_word_embeddings))


# ----------------------------------------------------------------------------------------------
# Models

def load_model(path, dtype=None, device=None) -> Mistral:
    """Load a Hugging Face folder (single safetensors file or sharded with an index).
    The model is built on the meta device and each tensor is read, cast and moved on its
    own, so host memory never holds a second full copy of the weights."""
    config = read_config(path)
    dtype = resolve_dtype(dtype or config.dtype, source=f"{path}/config.json")
    with torch.device("meta"):
        model = Mistral(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_hf_state(path, expected, dtype, device, tied=config.tie_word_embeddings)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save_model(model, path, max_shard_bytes=2 * 1024**3, extra_files=None):
    save_hf(model.state_dict(), config_to_hf(model.config), path, max_shard_bytes, extra_files,
            tied=model.config.tie_word_embeddings)
