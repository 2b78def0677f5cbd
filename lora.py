"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685)
on the model's projections, and the two ways it leaves a run: merged into an ordinary Hugging
Face folder, and as an adapter folder that PEFT loads onto the base.

    LoraSettings(rank, alpha, targets, dropout)   what --lora-* resolve to; scale = alpha / rank
    add_adapters(model, settings)     replace the target layers in place, freeze everything else
    init_adapters_(model, generator)  A ~ U(+-1/sqrt(in)), B = 0 (initial_adapters: as a state dict)
    merged_state(state, settings)     W + scale * B @ A for every adapted layer, adapters dropped
    save_adapter(state, settings, folder, base)   PEFT's adapter_config.json + adapter_model.safetensors
    export(model, config, settings, folder, ...)  a sharded LoRA model -> folder/adapter, folder/model

A layer computes  y = x W^T + scale * dropout(x) A^T B^T  with W (out, in) frozen, A (r, in) and
B (out, r) trained (paper eq. 3; scale = alpha / r, section 4.1). B starts at zero, so before the
first update the adapted model is the base model exactly (bit for bit: the adapter adds 0.0).

Names: a LoraLinear keeps the base under `weight` (so the base checkpoint still loads strictly)
and holds A and B as submodules `lora_A`, `lora_B`, so their keys are `<layer>.lora_A.weight`:
PEFT's saved names, less its `base_model.model.` prefix. Those keys are all a DCP checkpoint of
a LoRA run needs to hold besides the optimiser state (stage.py).

Why the merged folder is the opponent: generation, evaluation and lm-eval then load an ordinary
model, with one weight per layer instead of three (and spin_kernels.install's CPU decode path for
it). An unmerged LoraLinear is still correct anywhere: its base product is F.linear, what
training computes (tests/test_lora.py).
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import parallel
from checkpoint import atomic_folder
from hf_folder import config_to_hf, save_hf

# --lora-targets short names -> the model's (and PEFT's target_modules) module names.
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model as base_model.model


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    targets: tuple  # short names, keys of TARGETS
    dropout: float = 0.0

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def from_flags(cls, rank, alpha, targets, dropout):
        """--lora-rank/--lora-alpha/--lora-targets (a comma list)/--lora-dropout -> settings,
        or None when rank is 0 (full-parameter training)."""
        if not rank:
            return None
        if isinstance(targets, str):
            targets = targets.split(",")
        names = tuple(t.strip() for t in targets if t.strip())
        bad = [t for t in names if t not in TARGETS]
        if rank < 0:
            raise ValueError(f"LoRA: rank {rank} must be > 0 (0 turns LoRA off)")
        if not names or bad:
            raise ValueError(f"LoRA: targets must be a comma list of {', '.join(TARGETS)} "
                             f"(got {', '.join(bad) or 'none'})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout {dropout} must be in [0, 1)")
        return cls(rank, float(alpha), names, float(dropout))

    @classmethod
    def from_args(cls, args):
        """train.py's resolved flags -> settings, or None (no --lora-rank: full-parameter)."""
        if not getattr(args, "lora_rank", 0):
            return None
        return cls.from_flags(args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)


class LoraLinear(nn.Linear):
    """An nn.Linear (no bias) with a low-rank update beside its frozen weight."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        # Built on meta, so that no throwaway weight is allocated or initialised (which would
        # draw from the global RNG); the base's Parameter itself is then adopted: a loaded model
        # stays loaded, a meta model stays meta.
        with torch.device("meta"):
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
            self.lora_A = nn.Linear(base.in_features, settings.rank, bias=False)  # (r, in)
            self.lora_B = nn.Linear(settings.rank, base.out_features, bias=False)  # (out, r)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        if base.bias is not None:  # Qwen2's q/k/v: the bias stays frozen, as PEFT's bias="none"
            self.bias = base.bias
            self.bias.requires_grad_(False)
        self.lora_A.to_empty(device=base.weight.device)  # fp32, whatever the base's dtype
        self.lora_B.to_empty(device=base.weight.device)
        self.scale = settings.scale
        # Dropout on the adapter's input only, as in the paper's and PEFT's LoRA; p = 0 is no
        # module at all, so no mask is drawn and the forward is exactly base + adapter.
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    def forward(self, x):  # x (..., in) in the base weight's dtype -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        # The adapter may be fp32 beside a bf16 base (stage.py keeps the frozen base in the
        # compute dtype): A x is computed in the adapter's dtype, the update added in the base's.
        # Under FSDP's MixedPrecisionPolicy both arrive in the compute dtype: the casts are no-ops.
        a = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)) * self.scale  # (..., r)
        # y += a B^T, one GEMM accumulating in place into y (allowed: the base product saves its
        # inputs, not y). The scale sits on the narrow (..., r) side, and no (..., out) temporary is
        # made for it, for the sum or for a copy, forward or backward: with 7 adapted layers per
        # block those were most of an adapter's cost beyond its two thin GEMMs (bench/train.py).
        B = self.lora_B.weight.to(y.dtype)  # (out, r)
        y.view(-1, y.shape[-1]).addmm_(a.to(y.dtype).view(-1, a.shape[-1]), B.t())  # (N, out) += (N, r) @ (r, out)
        return y

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.out_features}, scale={self.scale:g}"


def add_adapters(model, settings: LoraSettings, generator=None):
    """Replace every target projection of `model` by a LoraLinear, in place, and freeze every
    other parameter (embeddings, norms, LM head, the bases). On a loaded model the adapters get
    their starting values (init_adapters_, from `generator`, default seed 0); on a meta-device
    model (stage.py, before fully_shard) they have none yet, and initial_adapters gives them as
    a state dict to load with the base weights. Returns the model."""
    model.requires_grad_(False)
    wanted = {TARGETS[t] for t in settings.targets}
    found = [(name, m) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in wanted and isinstance(m, nn.Linear) and not isinstance(m, LoraLinear)]
    if not found:
        raise ValueError(f"LoRA: no layer named {sorted(wanted)} in the model")
    for name, m in found:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, LoraLinear(m, settings))
    if found[0][1].weight.device.type != "meta":
        init_adapters_(model, generator or torch.Generator().manual_seed(0))
    return model


def initial_adapters(model, generator):
    """{name: tensor} starting values of every adapter, on the CPU: A ~ U(-1/sqrt(in), 1/sqrt(in))
    (nn.Linear's default, also PEFT's), B = 0. Drawn in name order from one generator, so the
    values do not depend on the device, the sharding or the number of ranks."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            name = name.replace("._checkpoint_wrapped_module", "")
            r, fan_in = m.lora_A.weight.shape
            bound = fan_in ** -0.5
            out[f"{name}.lora_A.weight"] = (torch.rand(r, fan_in, generator=generator) * 2 - 1) * bound
            out[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return out


@torch.no_grad()
def init_adapters_(model, generator):
    """Set every adapter of a (not sharded) model to initial_adapters' values, in place."""
    values = initial_adapters(model, generator)
    for name, p in model.named_parameters():
        if name in values:
            p.copy_(values[name])
    return model


def cast_frozen_(model, dtype):
    """Store every frozen parameter in `dtype`, in place (a tied embedding stays one tensor);
    the adapters keep their fp32. For the base in bf16 beside fp32 adapters: half the memory
    of the largest term of a LoRA run (bench/memory.py)."""
    for p in model.parameters():  # each Parameter once, tied ones included
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def adapter_names(model):
    return [n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


# ----------------------------------------------------------------------------------------------
# Leaving a run: merged weights, PEFT's adapter folder

def _is_adapter(key):
    return ".lora_A." in key or ".lora_B." in key


def merged_state(state, settings: LoraSettings):
    """A full state dict with adapters -> the plain model's state dict, W <- W + scale * B @ A
    for every adapted layer (computed in fp32, returned in W's dtype)."""
    out = {k: v for k, v in state.items() if not _is_adapter(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            layer = key[:-len(".lora_A.weight")]
            w, a, b = out[f"{layer}.weight"], state[key], state[f"{layer}.lora_B.weight"]
            delta = settings.scale * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
            out[f"{layer}.weight"] = (w.float() + delta).to(w.dtype)
    return out


def peft_config(settings: LoraSettings, base):
    """adapter_config.json: the fields PEFT's LoraConfig reads to rebuild the same layers
    (scale = lora_alpha / r without rsLoRA, no DoRA, no bias, every layer of those names)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(TARGETS[t] for t in settings.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(state, settings: LoraSettings, folder, base):
    """Write PEFT's adapter folder atomically: adapter_config.json and adapter_model.safetensors
    holding `base_model.model.<layer>.lora_{A,B}.weight`, fp32. `base`: the folder the adapter
    applies to (recorded as base_model_name_or_path)."""
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in state.items() if _is_adapter(k)}
    with atomic_folder(folder) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(peft_config(settings, base), f, indent=2)
        # Through open(), not safetensors' save_file (which makes an owner-only file): the file
        # gets the umask's mode, as every other output of a run.
        with open(os.path.join(tmp, "adapter_model.safetensors"), "wb") as f:
            f.write(save(tensors, metadata={"format": "pt"}))


def export(model, config, settings: LoraSettings, folder, extra_files, dtype, base):
    """Gather a (sharded) LoRA model on rank 0 and write folder/adapter (PEFT) and then
    folder/model (merged, an ordinary HF folder in `dtype`, plus extra_files). The model folder
    comes last: its existence marks the stage as finished (stage.run_stage). Every rank calls it."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in state.items()}

    def write():
        save_adapter(state, settings, os.path.join(folder, "adapter"), os.path.abspath(base))
        merged = {k: v.to(dtype) for k, v in merged_state(state, settings).items()}
        save_hf(merged, config_to_hf(config), os.path.join(folder, "model"), extra_files=extra_files,
                tied=config.tie_word_embeddings)

    parallel.on_rank0(write)
