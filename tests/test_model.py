"""model.py against transformers' MistralForCausalLM on tiny random checkpoints made here."""
import contextlib
import json
import os

import pytest
import torch

import spin_kernels
from hf_folder import config_from_dict, load_model, read_config, save_model
from spin_kernels.cpu_linear import cpu_decode_weights
from spin_kernels.cuda_graph import StaticKVCache
from model import KVCache, Mistral, ModelConfig

import transformers
from hf_tiny import random_hf_mistral  # noqa: E402

VOCAB = 97


def make_hf(tmp_path, name="ckpt", max_shard_size=None, seed=0, **kw):
    return random_hf_mistral(os.path.join(tmp_path, name), vocab=VOCAB, seed=seed,
                             max_shard_size=max_shard_size, **kw)


def hf_logits(hf, ids, mask=None):
    kwargs = {}
    if mask is not None:
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with torch.no_grad():
        return hf(ids, **kwargs).logits.float()


CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "window": dict(sliding_window=5),
    "head_dim": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf, folder = make_hf(tmp_path, **CASES[case])
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (2, 19))
    ours = model(ids).float()
    ref = hf_logits(hf, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    hf, folder = make_hf(tmp_path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (1, 11))
    assert (model(ids).float() - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_config_spellings(tmp_path):
    _, folder = make_hf(tmp_path, sliding_window=7, head_dim=24)
    new = read_config(folder)
    raw = json.load(open(os.path.join(folder, "config.json")))
    # The spelling of real Mistral-7B / Zephyr files.
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    raw["torch_dtype"] = "bfloat16"
    raw.pop("dtype", None)
    old = config_from_dict(raw)
    assert old.rope_theta == new.rope_theta == 10000.0
    assert old.dtype == "bfloat16"
    assert new.sliding_window == old.sliding_window == 7 and new.head_dim == 24


def test_bf16_within_bf16_tolerance(tmp_path):
    hf, folder = make_hf(tmp_path, sliding_window=6)
    hf = hf.to(torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 17))
    ours, ref = model(ids).float(), hf_logits(hf, ids)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("window", [None, 4])
def test_left_padding_matches_unpadded_and_transformers(tmp_path, window):
    hf, folder = make_hf(tmp_path, sliding_window=window)
    model = load_model(folder)
    lengths = [13, 5, 9]
    T = max(lengths)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    ours = model(ids, attention_mask=mask)
    ref = hf_logits(hf, ids, mask)
    for b, s in enumerate(seqs):
        alone = model(s[None])[0]
        real = slice(T - len(s), T)
        assert (ours[b, real] - alone).abs().max().item() <= 1e-4
        assert (ours[b, real] - ref[b, real]).abs().max().item() <= 1e-4
        assert torch.isfinite(ours[b]).all()


def test_right_padding_is_refused(tmp_path):
    _, folder = make_hf(tmp_path)
    model = load_model(folder)
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=mask)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("mode", ["autograd", "no_grad", "packed", "static", "static_autograd"])
@pytest.mark.parametrize("installed", [False, True])
def test_cached_decode_equals_full_forward(tmp_path, window, mode, installed):
    """Without autograd a CPU decode step of an installed model takes the fast paths (oneDNN
    linears, on packed weights inside cpu_decode_weights; one-query attention without SDPA); in
    a StaticKVCache the cache length lives on the device and every slot is attended (the
    CUDA-graph path). All must equal the plain full forward, which runs with autograd on
    (F.linear, SDPA)."""
    _, folder = make_hf(tmp_path, sliding_window=window)
    model = load_model(folder)
    if installed:
        spin_kernels.install(model, "torch")
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    full = model(ids, attention_mask=mask)
    cache = KVCache.allocate(model.config, batch=2, max_len=16)
    prefix = 5
    grad = torch.enable_grad() if mode.endswith("autograd") else torch.no_grad()
    packed = cpu_decode_weights(model, rows=2) if mode == "packed" else contextlib.nullcontext()
    with grad, packed:
        steps = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache)]
        if mode.startswith("static"):
            cache = StaticKVCache(cache)
        for t in range(prefix, 12):  # one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    assert (cache.pos.item() if mode.startswith("static") else cache.length) == 12
    assert (cached[0] - full[0]).abs().max().item() <= 1e-4
    assert (cached[1, 4:] - full[1, 4:]).abs().max().item() <= 1e-4
    # The cache never leaks into the model's state.
    assert not any("cache" in k for k in model.state_dict())


def test_token_logprobs_equal_log_softmax(tmp_path):
    _, folder = make_hf(tmp_path)
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (2, 9))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :3] = -100
    lp = model.token_logprobs(ids, targets)
    ref = torch.log_softmax(model(ids).double(), -1)
    ref = ref.gather(-1, targets.clamp(min=0)[..., None])[..., 0].float()
    ref[targets == -100] = 0
    assert lp.dtype == torch.float32 and lp.shape == (2, 9)
    assert (lp - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shard", [False, True])
def test_save_model_round_trip_through_transformers(tmp_path, shard):
    _, folder = make_hf(tmp_path, sliding_window=6, head_dim=24)
    model = load_model(folder)
    out = os.path.join(tmp_path, "export")
    save_model(model, out, max_shard_bytes=30_000 if shard else 2**31)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == shard
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    assert (model(ids) - hf_logits(back, ids)).abs().max().item() <= 1e-5
    again = load_model(out)
    assert torch.equal(again(ids), model(ids))


def test_save_is_atomic_replace(tmp_path):
    _, folder = make_hf(tmp_path)
    model = load_model(folder)
    out = os.path.join(tmp_path, "export")
    save_model(model, out)
    save_model(model, out)  # replacing an existing export leaves exactly one folder
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "export"]


def test_exports_get_the_umask_mode(tmp_path):
    """Exports and data files are written under temporary names and renamed; they must still
    get the usual modes (others on a shared cluster read them), not mkstemp's owner-only."""
    from data.readers import Example, write_examples

    _, folder = make_hf(tmp_path)
    old = os.umask(0o022)
    try:
        out = os.path.join(tmp_path, "export")
        save_model(load_model(folder), out)
        data = write_examples(os.path.join(tmp_path, "d.parquet"), [Example([{"role": "user", "content": "p"}], "r", "g")], "spin")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o644
    assert os.stat(data).st_mode & 0o777 == 0o644


def test_meta_build_has_no_stray_buffers():
    with torch.device("meta"):
        m = Mistral(ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    assert list(m.buffers()) == []


# ---- bad input: clear errors naming the file and the problem ----

def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_weights_and_pickle_refused(tmp_path):
    _, folder = make_hf(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(folder)


def rewrite(folder, fn):
    from safetensors.torch import load_file, save_file
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_unexpected_misshaped_listed(tmp_path):
    _, folder = make_hf(tmp_path)

    def damage(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.9.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.zeros(7)
    rewrite(folder, damage)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    msg = str(e.value)
    assert folder in msg
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.9.extra.weight" in msg
    assert "model.norm.weight: file (7,), model (48,)" in msg


def test_index_naming_missing_shard(tmp_path):
    _, folder = make_hf(tmp_path, max_shard_size="20KB")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, victim))
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(folder)


def test_truncated_safetensors(tmp_path):
    _, folder = make_hf(tmp_path)
    file = os.path.join(folder, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder)


def test_unsupported_dtype(tmp_path):
    _, folder = make_hf(tmp_path)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["dtype"] = "float8_e4m3fn"
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match="float8_e4m3fn.*not supported"):
        load_model(folder)
    with pytest.raises(ValueError, match="not supported"):
        load_model(folder, dtype="int8")


def test_integer_tensor_refused(tmp_path):
    _, folder = make_hf(tmp_path)
    rewrite(folder, lambda t: t.__setitem__("model.norm.weight", torch.zeros(48, dtype=torch.int8)))
    with pytest.raises(ValueError, match="model.norm.weight.*unsupported dtype"):
        load_model(folder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_triton_paths_match_torch_paths_in_the_model(tmp_path, device):
    """The model with the Triton kernels (interpreted on CPU) gives the torch path's logits,
    per-token log-probs and gradients, with left padding and a window shorter than the rows."""
    _, folder = make_hf(tmp_path, sliding_window=6, num_attention_heads=4, num_key_value_heads=1,
                        hidden_size=64, head_dim=16)
    ids = torch.randint(0, VOCAB, (2, 21), device=device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[1, :7] = -100
    results = []
    for impl in ("torch", "triton"):
        model = spin_kernels.install(load_model(folder, device=device), impl)
        assert model.kernels == impl
        lp = model(ids, attention_mask=mask, targets=targets)
        lp.sum().backward()
        logits = model(ids, attention_mask=mask).detach()
        results.append((lp.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, lg0, g0), (lp1, lg1, g1) = results
    assert (lp0 - lp1).abs().max().item() <= 2e-4
    real = mask.bool()
    assert (lg0[real] - lg1[real]).abs().max().item() <= 2e-4
    for n in g0:
        scale = g0[n].abs().max().item() + 1e-6
        assert (g0[n] - g1[n]).abs().max().item() <= 2e-3 * scale, n


def test_logits_to_keep(tmp_path):
    _, folder = make_hf(tmp_path)
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.allclose(model(ids, logits_to_keep=3), model(ids)[:, -3:], atol=1e-6)


def test_cpu_paths_run_without_triton():
    """Triton has no macOS or Windows wheels: with it unimportable the model still imports,
    trains and scores on the torch paths, "auto" never picks Triton, and asking for a kernel
    says why it cannot run (spin_kernels/no_triton.py)."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['triton.language'] = None\n"
        "import torch\n"
        "import spin_kernels\n"
        "from spin_kernels.attention import attention\n"
        "from spin_kernels.common import HAS_TRITON, resolve_impl\n"
        "from model import Mistral, ModelConfig\n"
        "assert not HAS_TRITON and resolve_impl('auto', on_cuda=True) == 'torch'\n"
        "m = Mistral(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                        num_attention_heads=2, num_key_value_heads=1, head_dim=16))\n"
        "spin_kernels.install(m)\n"
        "ids = torch.randint(0, 64, (2, 9))\n"
        "m(ids).float().sum().backward()\n"
        "assert torch.isfinite(m.token_logprobs(ids, ids)).all()\n"
        "q = torch.randn(1, 4, 5, 16)\n"
        "try:\n"
        "    attention(q, q[:, :2], q[:, :2], impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")  # so the CPU tensors get past the CUDA check to the launch
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


# Llama 3.2's shape in miniature: tied embeddings, a head_dim that is not hidden/heads, and
# llama3 rope scaling with an original context shorter than the test rows, so all three
# frequency bands (kept, blended, divided) are exercised.
LLAMA32 = dict(llama=True, tie_word_embeddings=True, head_dim=16, num_attention_heads=4, num_key_value_heads=1,
               hidden_size=48, rope_theta=500000.0, max_position_embeddings=256,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


@pytest.mark.parametrize("scaling", ["llama3", "linear"])
def test_llama_rope_scaling_matches_transformers(tmp_path, scaling):
    kw = dict(LLAMA32)
    if scaling == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    hf, folder = make_hf(tmp_path, **kw)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["model_type"] == "llama"
    model = load_model(folder)
    assert model.config.rope_scaling["rope_type"] == scaling and model.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 40))
    assert (model(ids).float() - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding: positions come from the mask on both sides
    ours = model(ids, attention_mask=mask).float()
    ref = hf_logits(hf, ids, mask)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-4
    assert (ours[1, 13:] - ref[1, 13:]).abs().max().item() <= 1e-4
    # and the config survives our export: transformers reads back the same scaling
    out = os.path.join(tmp_path, "export")
    save_model(model, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("field, value, message", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ("model_type", "qwen2_moe", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_config_fields_are_refused_by_name(field, value, message):
    raw = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, model_type="llama")
    raw[field] = value
    with pytest.raises(ValueError, match=message) as e:
        config_from_dict(raw, source="cfg.json")
    assert "cfg.json" in str(e.value) and "\n" not in str(e.value)


def test_model_file_is_the_architecture_alone():
    """model.py imports only torch and the standard library, and names no fast path: those are
    swapped in by spin_kernels.install."""
    import ast
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model.py")
    with open(path) as f:
        source = f.read()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch"}, roots
    for word in ("mkldnn", "onednn", "triton", "cuda_graph", "cuda graph", "cpu_linear"):
        assert word not in source.lower(), word


def test_install_keeps_the_reference_numbers(tmp_path):
    """spin_kernels.install(model, "torch") against the plain model: the same logits (decode-sized,
    so the oneDNN linears and the one-query attention run), per-token log-probs and gradients
    (the chunked log-prob head), and the same Parameter objects (tied weights stay tied)."""
    from spin_kernels.cpu_linear import Linear
    _, folder = make_hf(tmp_path, sliding_window=5, tie_word_embeddings=True)
    plain, fast = load_model(folder), spin_kernels.install(load_model(folder), "torch")
    assert plain.kernels == "reference" and fast.kernels == "torch"
    assert type(plain.lm_head) is torch.nn.Linear and type(fast.lm_head) is Linear
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fast.named_parameters()]
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[1, :3] = -100
    with torch.no_grad():
        for m in (plain, fast):
            cache = KVCache.allocate(m.config, batch=2, max_len=12)
            m.out = [m(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
            m.out += [m(ids[:, t:t + 1], cache=cache) for t in range(6, 11)]
    assert (torch.cat(plain.out, 1) - torch.cat(fast.out, 1)).abs().max().item() <= 1e-4
    grads = []
    for m in (plain, fast):
        lp = m(ids, attention_mask=mask, targets=targets)
        lp.sum().backward()
        grads.append((lp.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (lp0, g0), (lp1, g1) = grads
    assert lp0.dtype == lp1.dtype == torch.float32
    assert (lp0 - lp1).abs().max().item() <= 1e-4
    for n in g0:
        assert (g0[n] - g1[n]).abs().max().item() <= 1e-4 * (g0[n].abs().max().item() + 1), n


def test_install_reads_spin_kernels_once(tmp_path, monkeypatch):
    """impl="auto" takes SPIN_KERNELS at install (how torchrun's children obey it); an explicit
    impl wins; a bad value is a clear error; changing the variable later changes nothing."""
    _, folder = make_hf(tmp_path)
    monkeypatch.setenv("SPIN_KERNELS", "torch")
    model = spin_kernels.install(load_model(folder))
    assert model.kernels == "torch"
    assert model.model.layers[0].self_attn.attend.keywords == {"impl": "torch"}
    assert model.head_logprobs.keywords == {"impl": "torch"}
    assert spin_kernels.install(load_model(folder), "triton").kernels == "triton"
    monkeypatch.setenv("SPIN_KERNELS", "fast")
    assert model.model.layers[0].self_attn.attend.keywords == {"impl": "torch"}
    with pytest.raises(ValueError, match="SPIN_KERNELS"):
        spin_kernels.install(load_model(folder))
    monkeypatch.delenv("SPIN_KERNELS")
    assert spin_kernels.install(load_model(folder)).kernels == "auto"
