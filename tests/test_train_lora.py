"""train.py with --lora-rank on the shortened embedded demo (tests/test_train.py's TINY flags), under
torchrun with two processes: kill-and-resume gives bitwise the same losses, checkpoints hold only
the adapters and the optimiser state, each iteration exports the merged model and a PEFT adapter
that reproduces it on the opponent, and only the adapted layers change."""
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import read_dcp_metadata
from test_train import records, run, step_losses

# Dropout on: its masks must be drawn alike after a resume, on both ranks.
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v,o,down", "--lora-dropout", "0.1",
        "--baseline", "0", "--lr", "3e-3"]  # LoRA moves less per step than full training: a larger lr, as usual


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run(out, *LORA, procs=2)
    return out


def test_lora_settings_recorded_and_first_step_is_log2(lora_run):
    cfg = json.load(open(lora_run / "config.json"))
    assert [cfg[f"lora_{k}"] for k in ("rank", "alpha", "targets", "dropout")] == [4, 8.0, "q,v,o,down", 0.1]
    for stage in ("spin0", "spin1"):  # B = 0: the model starts as its opponent (dropout or not): log 2
        first = [r for r in records(lora_run) if r["type"] == "step" and r["stage"] == stage and r["step"] == 1]
        assert abs(first[0]["loss"] - math.log(2)) < 1e-4
    last = [r for r in records(lora_run) if r["type"] == "step" and r["stage"] == "spin0"][-1]
    assert last["loss"] < math.log(2) - 0.05  # and then it trains


def test_exports_merged_model_and_peft_adapter(lora_run):
    """iter{t}/model is the merged model (no adapter keys); only the adapted layers differ from
    the opponent; PEFT puts iter{t}/adapter on the opponent and computes iter{t}/model's logits."""
    import transformers
    import peft
    for t, opponent in ((0, lora_run / "sft" / "model"), (1, lora_run / "iter0" / "model")):
        folder = lora_run / f"iter{t}"
        assert sorted(os.listdir(folder / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
        assert not (folder / "ckpt").exists()  # removed once the export is written
        merged, before = load_file(folder / "model" / "model.safetensors"), load_file(opponent / "model.safetensors")
        assert merged.keys() == before.keys()
        changed = {k for k in merged if not torch.equal(merged[k], before[k])}
        assert changed == {k for k in merged if re.search(r"\.(q_proj|v_proj|o_proj|down_proj)\.weight$", k)}
        hf = transformers.AutoModelForCausalLM.from_pretrained(opponent).eval()
        with_adapter = peft.PeftModel.from_pretrained(hf, folder / "adapter").eval()
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder / "model").eval()
        ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            assert (with_adapter(ids).logits - reference(ids).logits).abs().max().item() < 1e-4


def test_kill_and_resume_is_bitwise_with_adapter_only_checkpoints(lora_run, tmp_path):
    out = tmp_path / "killed"
    p = run(out, *LORA, procs=2, faults=["--kill-at", "spin1:5"], check=False)
    assert p.returncode != 0  # SIGKILLed in the middle of iteration 1's training
    ckpt = out / "iter1" / "ckpt" / "step-3"
    assert ckpt.is_dir() and not (out / "iter1" / "model").exists()
    # The checkpoint holds the adapters (and their RMSprop state), not the frozen base.
    keys = read_dcp_metadata(str(ckpt)).state_dict_metadata.keys()
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(re.search(r"\.lora_[AB]\.weight$", k) for k in model_keys), sorted(model_keys)[:5]
    assert len(model_keys) == 2 * 4  # 1 layer x 4 targets x (A, B)
    assert any(k.startswith("optim.state.") for k in keys)
    run(out, *LORA, "--resume", procs=2)
    a, b = step_losses(lora_run), step_losses(out)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(a[k] == b[k] for k in a), [(k, a[k], b[k]) for k in a if a[k] != b[k]][:5]


def test_divergence_stops_a_lora_run(tmp_path):
    """The NaN guard sees the adapters' loss: an absurd lr makes step 2 non-finite."""
    p = run(tmp_path / "nan", *LORA[:-2], "--lr", "1e30", "--iterations", "1", "--ckpt-every", "1", procs=2,
            check=False)
    assert p.returncode != 0
    assert re.search(r"spin0 step \d+: loss (nan|inf)", p.stdout + p.stderr), (p.stdout + p.stderr)[-2000:]
