"""Qwen2/Qwen2.5 (bias on q, k, v) and Qwen3 (RMSNorm on each head of q and k, explicit head_dim)
checkpoints: tiny random folders made with transformers, with SmolLM2's real tokenizer.json and
ChatML template beside them. Logits against transformers (unpadded and left-padded), greedy
answers through generate.py, exports transformers loads back as Qwen, PEFT adapters on a Qwen
base, and a short SPIN iteration under torchrun whose adapter PEFT loads on the Qwen base."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from errors import InputError
from hf_folder import config_from_dict, load_model, read_config, save_model
from model import Mistral

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "List three prime numbers.", "Say hi."]


def hf_config(kind, vocab, **over):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
                  bos_token_id=1, eos_token_id=2,
                  # A window is set but not used (use_sliding_window false): transformers ignores it.
                  sliding_window=8, max_window_layers=1, use_sliding_window=False)
    if kind == "qwen2":
        return transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **over})
    return transformers.Qwen3Config(**{**common, "head_dim": 24, "tie_word_embeddings": False, **over})


def make_folder(kind, folder, tokenizer_dir=None, vocab=None):
    """A random Qwen checkpoint whose norms and biases are random too (ones and zeros would hide bugs)."""
    if tokenizer_dir:
        vocab = json.load(open(os.path.join(tokenizer_dir, "config.json")))["vocab_size"]
    torch.manual_seed(0 if kind == "qwen2" else 1)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(kind, vocab), dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    hf.save_pretrained(folder)
    if tokenizer_dir:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(folder, f))
    return folder


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen(request, smollm2_dir, tmp_path_factory):
    return request.param, make_folder(request.param, str(tmp_path_factory.mktemp(request.param)), smollm2_dir)


def logits_both(folder, ids, mask=None):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        if mask is None:
            return ours(ids), hf(ids).logits
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # what generate() gives a left-padded row
        return ours(ids, attention_mask=mask), hf(ids, attention_mask=mask, position_ids=pos).logits


def test_config_and_keys(qwen):
    kind, folder = qwen
    cfg = read_config(folder)
    assert (cfg.model_type, cfg.attention_bias, cfg.qk_norm, cfg.sliding_window) == (
        kind, kind == "qwen2", kind == "qwen3", None)
    if kind == "qwen3":
        assert cfg.head_dim == 24 != cfg.hidden_size // cfg.num_attention_heads
    keys = Mistral(cfg).state_dict().keys()
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == (kind == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in keys) == (kind == "qwen3")


def test_logits_match_transformers(qwen):
    _, folder = qwen
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40000, (3, 17), generator=g)
    ours, ref = logits_both(folder, ids)
    assert (ours - ref).abs().max().item() < 1e-4
    mask = torch.ones_like(ids)
    mask[0, :5], mask[2, :11] = 0, 0  # left padding
    ours, ref = logits_both(folder, ids, mask)
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max().item() < 1e-4


def test_export_is_a_qwen_folder_again(qwen, tmp_path):
    kind, folder = qwen
    save_model(load_model(folder), str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["model_type"] == kind and cfg["use_sliding_window"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(1))
    ours, _ = logits_both(folder, ids)
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max().item() < 1e-4


def test_greedy_answers_equal_transformers(qwen):
    """generate.py --greedy (its tokenizer.json reader, the folder's ChatML template, KV cache,
    batched left-padded decode) answers exactly as transformers' greedy generate."""
    _, folder = qwen
    n = 12
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "generate.py", "--model", folder, "--greedy", "--max-new-tokens", str(n),
                        "--format", "jsonl", *[a for q in QUESTIONS for a in ("--prompt", q)]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [o["prompt"] for o in ours] == QUESTIONS  # one answer per prompt, in order
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for q, o in zip(QUESTIONS, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, do_sample=False)
        assert o["answer"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), q
    assert sum(len(o["answer"]) for o in ours) > 10


def test_lora_adapter_loads_in_peft(qwen, tmp_path):
    """LoRA on every projection of a Qwen base (Qwen2's biased q/k/v included): PEFT puts the
    saved adapter on transformers' model and computes our adapted logits; the merged state is
    the same model."""
    import peft
    import lora
    _, folder = qwen
    settings = lora.LoraSettings.from_flags(4, 8.0, "q,k,v,o,gate,up,down", 0.0)
    model = lora.add_adapters(load_model(folder), settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    lora.save_adapter(model.state_dict(), settings, str(tmp_path / "adapter"), folder)
    ids = torch.randint(3, 40000, (2, 11), generator=torch.Generator().manual_seed(2))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    merged = Mistral(model.config)
    merged.load_state_dict(lora.merged_state(model.state_dict(), settings))
    with torch.no_grad():
        ours = model.eval()(ids)
        assert (with_adapter(ids).logits - ours).abs().max().item() < 1e-4
        assert (merged.eval()(ids) - ours).abs().max().item() < 1e-4


def test_refused_by_name(tmp_path):
    cases = [("qwen2", dict(use_sliding_window=True, max_window_layers=0), "use_sliding_window"),
             ("qwen3", dict(attention_bias=True), "attention_bias")]
    for i, (kind, over, field) in enumerate(cases):
        d = hf_config(kind, 100, **over).to_dict()
        with pytest.raises(InputError, match=f"field '{field}'"):
            config_from_dict(d)
    # A window that no layer uses (max_window_layers >= layers) is full attention.
    assert config_from_dict(hf_config("qwen2", 100, use_sliding_window=True, max_window_layers=2).to_dict()
                                 ).sliding_window is None
    d = hf_config("qwen2", 100).to_dict()
    d["model_type"] = "qwen2_moe"
    with pytest.raises(InputError, match="field 'model_type' is 'qwen2_moe'"):
        config_from_dict(d)


def test_spin_iteration_under_torchrun(qwen, tmp_path):
    """train.py on the Qwen folder, two processes: Qwen2 with LoRA on every projection (a frozen
    biased base under FSDP), Qwen3 in full (its q/k norms trained and sharded). First loss log 2;
    the export loads in transformers as the same Qwen class and carries the ChatML template; the
    LoRA run's PEFT adapter on the base computes its merged export."""
    kind, folder = qwen
    rows = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(1, 2), (3, 4), (5, 6), (7, 8),
                                                                                 (2, 9), (4, 4)]]
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    with open(data, "w") as f:
        for q, a in rows[:4]:
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    with open(held, "w") as f:
        for q, a in rows[4:]:
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--model", folder, "--data", str(data), "--eval-data", str(held), "--out", str(out),
                        "--iterations", "1", "--batch-size", "2", "--micro-batch-size", "1", "--epochs", "1",
                        "--max-new-tokens", "8", "--max-length", "96", "--max-prompt-length", "64",
                        "--gen-batch-size", "8", "--lr", "1e-3", *(["--lora-rank", "2"] if kind == "qwen2" else [])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"step"' in line]
    assert steps and abs(steps[0]["loss"] - 0.6931) < 1e-3
    export = out / "iter0" / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert type(hf).__name__.lower().startswith(kind)
    if kind == "qwen3":  # trained in full: the norms moved
        before = load_model(folder).state_dict()
        after = load_model(str(export)).state_dict()
        assert not torch.equal(before["model.layers.0.self_attn.q_norm.weight"],
                               after["model.layers.0.self_attn.q_norm.weight"])
        return
    import peft
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "iter0" / "adapter")).eval()
    ids = torch.randint(3, 40000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (with_adapter(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    assert (export / "chat_template.jinja").read_text() == open(os.path.join(folder, "chat_template.jinja")).read()
