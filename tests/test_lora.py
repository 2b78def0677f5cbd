"""lora.py: step 0 is the base model, merged == unmerged after training, gradients reach only the
adapters, the decode fast path still agrees, and PEFT (the reference) loads our adapter folder
onto the base checkpoint and computes the same logits."""
import json
import os

import pytest
import torch

import generate
import spin_kernels
import lora
from hf_folder import load_model
from spin_kernels.cpu_linear import cpu_decode_weights
from model import Mistral

import transformers
from hf_tiny import random_hf_mistral  # noqa: E402

ALL = "q,k,v,o,gate,up,down"


def random_hf_llama(folder, seed=0):
    """A tiny LlamaForCausalLM with tied embeddings: the layout of SmolLM2 (the real model)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "embed" in n:
                p.normal_(0, 1.0)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(params=["mistral", "llama"])
def base_dir(request, tmp_path):
    folder = str(tmp_path / request.param)
    if request.param == "mistral":
        random_hf_mistral(folder)
    else:
        random_hf_llama(folder)
    return folder


def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)  # ours derives these; transformers needs them given


def batch(vocab, B=3, T=14, seed=1):
    """Left-padded ids, mask and SPIN-style targets (the inputs shifted left, -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, :2 * b + 1] = 0
    tgt = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1).masked_fill(mask == 0, -100)
    return ids, mask, tgt


def train_steps(model, steps=5, lr=3e-2):
    """A few AdamW steps on a log-likelihood objective, so that A and B move away from the start."""
    ids, mask, tgt = batch(model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        (-model(ids, attention_mask=mask, targets=tgt).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def lora_model(folder, targets=ALL, rank=4, alpha=8.0, dropout=0.0, seed=0):
    model = load_model(folder)
    settings = lora.LoraSettings.from_flags(rank, alpha, targets, dropout)
    lora.add_adapters(model, settings, torch.Generator().manual_seed(seed))
    return spin_kernels.install(model, "torch"), settings  # adapters first, as stage.build_model does


def test_step_zero_is_the_base_model_exactly(base_dir):
    base = spin_kernels.install(load_model(base_dir), "torch")
    model, _ = lora_model(base_dir, dropout=0.3)
    model.train()  # dropout active: B = 0 still makes the adapter add exactly 0
    ids, mask, tgt = batch(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), base(ids, attention_mask=mask))
    assert torch.equal(model(ids, attention_mask=mask, targets=tgt), base(ids, attention_mask=mask, targets=tgt))
    n_layers = base.config.num_hidden_layers
    assert sum(isinstance(m, lora.LoraLinear) for m in model.modules()) == 7 * n_layers
    A = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert A.abs().max() > 0 and A.abs().max() <= A.shape[1] ** -0.5  # U(+-1/sqrt(in)), not zero


def test_gradients_reach_only_the_adapters(base_dir):
    model, _ = lora_model(base_dir, targets="q,v,down")
    ids, mask, tgt = batch(model.config.vocab_size)
    model.train()
    (-model(ids, attention_mask=mask, targets=tgt).sum()).backward()
    names = set(lora.adapter_names(model))
    assert len(names) == 2 * 3 * model.config.num_hidden_layers
    for n, p in model.named_parameters():
        if n in names:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    # With B = 0 the gradient reaches B only (dL/dA = scale * B^T dL/dy x = 0).
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.lora_B.weight.grad.abs().max() > 0
    assert attn.q_proj.lora_A.weight.grad.abs().max() == 0
    assert not hasattr(attn.k_proj, "lora_A")  # not a target


def test_merged_model_equals_the_unmerged_forward(base_dir, tmp_path):
    model, settings = lora_model(base_dir)
    model = train_steps(model)
    base = load_model(base_dir)
    ids, mask, tgt = batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        moved = (want - base(ids, attention_mask=mask)).abs().max().item()
        assert moved > 1e-2  # training moved the model, so the comparison below means something
        # lora.export: the path a run takes (here one process, no sharding).
        lora.export(model, model.config, settings, str(tmp_path / "out"), {}, torch.float32, base_dir)
        merged = load_model(str(tmp_path / "out" / "model"))
        assert not any(isinstance(m, lora.LoraLinear) for m in merged.modules())
        # x (W + s B A)^T and x W^T + s (x A^T) B^T round differently: 1e-5 relative to the
        # values' scale (these peaked random models have logits and log-probs of tens).
        scale = max(1.0, want.abs().max().item())
        assert (merged(ids, attention_mask=mask) - want).abs().max().item() <= 1e-5 * scale
        got, lp = merged(ids, attention_mask=mask, targets=tgt), model(ids, attention_mask=mask, targets=tgt)
        assert (got - lp).abs().max().item() <= 1e-5 * max(1.0, lp.abs().max().item())
    # The merged folder is an ordinary HF folder: transformers reads it.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model")).eval()
    with torch.no_grad():
        got = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert (got - want)[mask.bool()].abs().max().item() <= 1e-4


def test_unmerged_adapters_on_the_cpu_decode_path(base_dir):
    """No grad, few rows, installed: a LoraLinear's base product is F.linear, its A product goes
    through cpu_linear.linear (oneDNN, packed inside cpu_decode_weights), its update through
    addmm_. Greedy decoding of the unmerged model, packed, must give the merged model's tokens,
    and its logits must agree with the plain (autograd) path."""
    model, settings = lora_model(base_dir)
    model = train_steps(model)
    merged = Mistral(model.config)
    merged.load_state_dict(lora.merged_state(model.state_dict(), settings))
    merged.eval()
    ids = batch(model.config.vocab_size, B=2, T=6)[0]
    with torch.no_grad(), cpu_decode_weights(model, rows=8):
        fast = model(ids)  # 12 rows: the oneDNN path on packed weights
    slow = model(ids).detach()  # grad enabled: F.linear
    assert (fast - slow).abs().max().item() <= 1e-5
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    kw = dict(max_new_tokens=8, eos_id=None, greedy=True)
    a = generate.sample(model, prompts, **kw)
    b = generate.sample(merged, prompts, **kw)
    assert [s.tokens for s in a] == [s.tokens for s in b]


def test_bf16_base_with_fp32_adapters(base_dir):
    model, _ = lora_model(base_dir, targets="q,up")
    lora.cast_frozen_(model, torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask, tgt = batch(model.config.vocab_size)
    base = lora.cast_frozen_(load_model(base_dir).requires_grad_(False), torch.bfloat16)
    model.train()
    lp = model(ids, attention_mask=mask, targets=tgt)
    assert torch.equal(lp, base(ids, attention_mask=mask, targets=tgt))  # B = 0: exactly the bf16 base
    (-lp.sum()).backward()
    B = model.model.layers[0].mlp.up_proj.lora_B.weight
    assert B.grad is not None and B.grad.dtype == torch.float32 and B.grad.abs().max() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad is None


def test_peft_loads_our_adapter_and_matches(base_dir, tmp_path):
    import peft
    model, settings = lora_model(base_dir, targets="q,k,v,o,gate,up,down", rank=3, alpha=6.0)
    model = train_steps(model)
    lora.save_adapter(model.state_dict(), settings, str(tmp_path / "adapter"), base_dir)
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 3, 6.0, "none")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        ids, mask, _ = batch(model.config.vocab_size, seed=7)
        plain = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    # Every adapter tensor PEFT holds is ours (no key silently skipped and left at its init).
    loaded = peft.get_peft_model_state_dict(peft_model)
    ours = {lora.PEFT_PREFIX + n: p for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.keys() == ours.keys()
    assert all(torch.equal(loaded[k], ours[k].detach()) for k in ours)
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        got = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()  # HF's padding positions are not defined the same way; compare real tokens
    assert (plain - want)[real].abs().max().item() > 1e-2  # the adapter changes the logits
    assert (got - want)[real].abs().max().item() <= 1e-4


def test_adapter_folder_is_atomic_and_complete(base_dir, tmp_path, monkeypatch):
    model, settings = lora_model(base_dir, targets="v")
    out = tmp_path / "adapter"

    def full_disk(*a, **kw):
        raise OSError("No space left on device")

    with monkeypatch.context() as m:  # a failure mid-write leaves nothing at the path
        m.setattr(lora, "save", full_disk)
        with pytest.raises(OSError):
            lora.save_adapter(model.state_dict(), settings, str(out), base_dir)
    assert not out.exists() and [p for p in os.listdir(tmp_path) if "adapter" in p] == []
    lora.save_adapter(model.state_dict(), settings, str(out), base_dir)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["target_modules"] == ["v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == base_dir


@pytest.mark.parametrize("rank, targets, dropout, message", [
    (4, "q,x", 0.0, "x"), (-1, "q", 0.0, "rank -1"), (4, "", 0.0, "none"), (4, "q", 1.0, "dropout")])
def test_bad_settings_are_refused(rank, targets, dropout, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraSettings.from_flags(rank, 8, targets, dropout)
    assert lora.LoraSettings.from_flags(0, 8, "q", 0.0) is None  # rank 0: full-parameter training
