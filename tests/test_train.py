"""End-to-end tests of train.py on a shortened embedded demo: the pipeline's invariants, not a
lucky accuracy number. Each run is a real subprocess (python or torchrun), as users launch it."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-prompts", "96", "--eval-prompts", "16", "--sft-steps", "6", "--sft-lr", "3e-3",
        "--iterations", "2", "--batch-size", "16", "--micro-batch-size", "8", "--demo-dim", "32",
        "--demo-layers", "1", "--max-new-tokens", "28", "--ckpt-every", "3", "--lr", "1e-4",
        "--beta", "0.5", "--gen-batch-size", "64"]


def run(out, *extra, procs=1, faults=(), check=True):
    """train.py, or with faults (e.g. ["--kill-at", "spin1:5"]) train.py's main under tests/faults.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    script = ["-m", "tests.faults", *faults, "--"] if faults else ["train.py"]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *script]
    p = subprocess.run(cmd + ["--out", str(out), *TINY, *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def step_losses(out):
    """{(stage, step): loss}, keeping the last record of a step (a resumed run repeats some)."""
    return {(r["stage"], r["step"]): r["loss"] for r in records(out) if r["type"] == "step"}


def evals(out):
    """The eval records (the README table's rows), keyed by (arm, iteration)."""
    return {(r["arm"], r["iteration"]): r for r in records(out) if r["type"] == "eval"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    p = run(out, "--baseline", "1")
    return out, p


def test_pipeline_writes_every_output(single):
    out, p = single
    for rel in ["config.json", "metrics.jsonl", "report.png", "data/train.jsonl", "data/heldout.jsonl",
                "tokenizer/tokenizer.model", "sft/model/config.json", "iter0/synthetic.parquet",
                "iter0/eval_synthetic.parquet", "iter0/model/model.safetensors", "iter0/model/tokenizer.model",
                "iter1/model/config.json", "baseline/iter1/model/config.json"]:
        assert os.path.exists(os.path.join(out, rel)), rel
    assert "exact match" in p.stdout and "continued SFT" in p.stdout and "wall time" in p.stdout
    for stage in ("sft", "iter0", "iter1", "baseline/iter0"):  # checkpoints go once exported
        assert not os.path.exists(os.path.join(out, stage, "ckpt")), stage
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["iterations"] == 2 and cfg["world_size"] == 1


def test_metrics_present_and_finite(single):
    out, _ = single
    recs = records(out)
    steps = [r for r in recs if r["type"] == "step"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert {r["stage"] for r in steps} == {"sft", "spin0", "spin1", "sft0", "sft1"}
    for r in steps:
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
            assert math.isfinite(r[k]), (k, r)
    for r in steps:
        if r["stage"].startswith("spin"):
            for k in ("rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
                      "logps/real", "logps/generated"):
                assert math.isfinite(r[k])
    assert [(r["arm"], r["iteration"]) for r in evals] == [("start", 0), ("spin", 1), ("spin", 2), ("sft", 1), ("sft", 2)]
    for r in evals:
        assert 0 <= r["exact_match"] <= 1 and math.isfinite(r["gt_logp_per_token"])


def test_first_spin_step_is_log2(single):
    """At theta = theta_t every pair's loss is log 2 (spin_loss's closed form), so the first
    logged step, computed before any update, checks model, data and stored log-probs agree."""
    out, _ = single
    first = [r for r in records(out) if r["type"] == "step" and r["stage"] in ("spin0", "spin1") and r["step"] == 1]
    assert len(first) == 2
    for r in first:
        assert abs(r["loss"] - math.log(2)) < 1e-4, r
        assert abs(r["rewards/margins"]) < 1e-4


def test_exports_load_in_transformers(single):
    import transformers
    out, _ = single
    from hf_folder import load_model
    folder = os.path.join(out, "iter1", "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = load_model(folder)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4


def test_opponent_logprobs_equal_fresh_forward(single):
    out, _ = single
    from data import pairs, readers
    from data.template import ChatFormat
    from data.tokenizer import Tokenizer
    import generate
    import spin_kernels
    from hf_folder import load_model
    tok = ChatFormat(Tokenizer(os.path.join(out, "sft", "model")))
    examples, _ = readers.read_examples(os.path.join(out, "iter1", "synthetic.parquet"))
    items, _ = pairs.tokenize_examples(tok, examples[:24], max_length=128, max_prompt_length=64)
    # p_1 made iteration 1's data, with the kernels the run installs
    opponent = spin_kernels.install(load_model(os.path.join(out, "iter0", "model")))
    real = generate.score(opponent, [i.prompt_ids for i in items], [i.real_ids for i in items])
    gen = generate.score(opponent, [i.prompt_ids for i in items], [i.generated_ids for i in items])
    for it, a, b in zip(items, real, gen):
        assert abs(float(a) - it.ref_real_logps) < 1e-3
        assert abs(float(b) - it.ref_generated_logps) < 1e-3


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    out = tmp_path_factory.mktemp("double") / "run"
    run(out, "--baseline", "1", procs=2)
    return out


def test_two_processes_match_one(single, double):
    out1, _ = single
    a, b = step_losses(out1), step_losses(double)
    assert a.keys() == b.keys()
    # One process runs the two micro-batches of 8 that the two ranks run, the gradient norm is
    # world-size independent (parallel.clip_grad_norm) and the generation and rescoring batches are
    # fixed parts: the runs are the same computation, so the losses agree to float rounding
    # (bitwise on the machine this was written on).
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a[k], b[k])
    # Every evaluation figure too (the README table): float64 sums of fixed parts, reduced in a
    # fixed order, so the same numbers whatever the world size.
    assert evals(out1) == evals(double)
    assert json.load(open(double / "config.json"))["world_size"] == 2


@pytest.mark.parametrize("procs, resume_procs", [(1, 1), (2, 2), (2, 1)])
def test_kill_and_resume_gives_the_same_losses(single, double, tmp_path, procs, resume_procs):
    """Killed mid-stage and resumed, with the same world size or (2, 1) a torchrun run resumed by
    one process: the sharded checkpoint is read back through checkpoint.load_ckpt's safe reader."""
    uninterrupted = single[0] if resume_procs == 1 else double
    out = tmp_path / "killed"
    p = run(out, "--baseline", "1", procs=procs, faults=["--kill-at", "spin1:5"], check=False)
    assert p.returncode != 0  # SIGKILLed in the middle of iteration 1's training
    assert os.path.isdir(out / "iter1" / "ckpt" / "step-3") and not os.path.exists(out / "iter1" / "model")
    run(out, "--baseline", "1", "--resume", procs=resume_procs)
    # The same losses and evaluation figures, bit for bit: the weights, optimiser state, learning
    # rate and random state come back exactly (test_train_lora.py and test_train_arms.py hold
    # their resumes to the same).
    assert step_losses(out) == step_losses(uninterrupted)
    assert evals(out) == evals(uninterrupted)


def test_live_reference_agrees_with_stored_logprobs(tmp_path):
    """A resident opponent model recomputes what generation stored: for iteration 0's fresh
    samples and for iteration 0's data mixed into iteration 1 (rescored by p_1). Activation
    checkpointing is on, so that path runs too."""
    out = tmp_path / "live"
    run(out, "--baseline", "0", "--live-reference", "--mix-previous", "1", "--activation-checkpointing")
    assert os.path.exists(out / "iter1" / "previous_rescored.parquet")
    for stage in ("spin0", "spin1"):
        spin = [r for r in records(out) if r["type"] == "step" and r["stage"] == stage]
        assert spin and all(r["live_reference_max_abs_diff"] < 1e-3 for r in spin)
        assert abs(spin[0]["loss"] - math.log(2)) < 1e-4


def test_existing_run_needs_resume(single):
    out, _ = single
    p = run(out, check=False)
    assert p.returncode != 0 and "--resume" in (p.stderr + p.stdout)


def test_nan_loss_stops_with_clear_message(tmp_path):
    """lr 1e30 blows the weights up in the first update; the next loss is NaN. The checkpoint of
    that update is due then, and is never written: a checkpoint is saved only once its weights
    have given a finite loss (tests/test_resume_safety.py continues a diverged run)."""
    out = tmp_path / "nan"
    p = run(out, "--baseline", "0", "--iterations", "1", "--sft-lr", "1e30", "--ckpt-every", "1", check=False)
    assert p.returncode == 1
    assert re.search(r"sft step 2: loss \S+, grad norm (nan|inf): stopped before this update", p.stderr), p.stderr
    assert "has no checkpoint yet: --resume restarts this stage" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(out / "sft" / "ckpt") or not os.listdir(out / "sft" / "ckpt")


@pytest.mark.parametrize("flags, message", [
    (["--data", "x.jsonl"], "--data needs --model"),
    (["--model", "m"], "--model needs --data"),
    (["--sft", "--model", "m", "--data", "x.jsonl"], "--sft needs --sft-steps and --sft-lr"),
    (["--resume"], "--resume needs --out"),
])
def test_contradictory_flags_are_refused(flags, message):
    p = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr


def test_resume_of_a_missing_run_is_refused(tmp_path):
    p = run(tmp_path / "nothing", "--resume", check=False)
    assert p.returncode != 0 and "no run to continue" in p.stderr


@pytest.mark.parametrize("tied", [False, True])
def test_recipe_path_on_a_hugging_face_folder(tmp_path, tied):
    """The user path with --model: a HF folder (made by transformers, with the real Mistral
    tokenizer), official SPIN-layout Parquet data, the recipe's defaults (beta schedule,
    mixing in iteration t-1's data rescored by p_t), two iterations, no task metric; with
    untied and tied embeddings (FSDP and the exports must keep one shared tensor)."""
    import mistral_common
    import transformers
    from hf_tiny import random_hf_mistral
    from data.readers import Example, write_examples
    model = tmp_path / "model"
    random_hf_mistral(str(model), vocab=32000, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, sliding_window=48,
                      tie_word_embeddings=tied)
    import shutil
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                model / "tokenizer.model")
    rows = [Example([{"role": "user", "content": f"Question {i}: what is {i} squared?"}], f"It is {i * i}.",
                    generated="stale, regenerated by p_t") for i in range(24)]
    write_examples(tmp_path / "train_prefs.parquet", rows, "spin")
    write_examples(tmp_path / "test_prefs.parquet", rows[:6], "spin")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "train.py", "--model", str(model), "--data", str(tmp_path / "train_prefs.parquet"),
                        "--eval-data", str(tmp_path / "test_prefs.parquet"), "--out", str(out), "--iterations", "2",
                        "--batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "12", "--max-length", "128",
                        "--max-prompt-length", "64", "--gen-batch-size", "8", "--lr", "1e-4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    cfg = json.load(open(out / "config.json"))
    assert cfg["beta"] == [0.1, 0.1, 0.1, 5.0] and cfg["mix_previous"] is True and cfg["optimizer"] == "rmsprop"
    assert "[spin1] beta 0.1, lr " in p.stdout  # each iteration says what it uses
    assert os.path.exists(out / "iter1" / "previous_rescored.parquet")
    steps = [r for r in records(out) if r["type"] == "step"]
    assert {r["stage"] for r in steps} == {"spin0", "spin1"}
    for stage, n_pairs in (("spin0", 24), ("spin1", 48)):  # iteration 1 trains on both iterations' data
        first = [r for r in steps if r["stage"] == stage and r["step"] == 1][0]
        assert abs(first["loss"] - math.log(2)) < 1e-4 and first["steps"] == int(2 * (n_pairs // 8))
    evals = [r for r in records(out) if r["type"] == "eval"]
    assert len(evals) == 3 and all("exact_match" not in r for r in evals)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "iter1" / "model")
    assert hf.config.tie_word_embeddings == tied
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_grad_norm_matches_torch(scale):
    """parallel.clip_grad_norm (float64 sum, the same for any sharding) against torch's clip:
    the same norm and gradients when clipping, untouched gradients when not."""
    sys.path.insert(0, ROOT)
    from parallel import clip_grad_norm
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3,), (11, 2, 4)]
    ours = [torch.zeros(s, requires_grad=True) for s in shapes]
    ref = [torch.zeros(s, requires_grad=True) for s in shapes]
    for a, b, s in zip(ours, ref, shapes):
        a.grad = torch.randn(s, generator=gen) * scale
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    n_ours = clip_grad_norm(ours, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert abs(n_ours.item() - n_ref.item()) <= 1e-6 * n_ref.item()
    for a, b, g in zip(ours, ref, before):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        if n_ref.item() < 1.0:
            assert torch.equal(a.grad, g)  # below the limit the gradients are not touched
        else:
            assert not torch.equal(a.grad, g)


def test_resume_may_change_kernels_but_not_settings(tmp_path):
    from errors import InputError, UserError
    from run_folder import open_run
    from train import folder_settings, parse_args

    out = str(tmp_path / "run")
    open_run(folder_settings(parse_args(["--out", out])), world=1).close()
    open_run(folder_settings(parse_args(["--out", out, "--resume", "--kernels", "torch"])), world=1).close()
    with pytest.raises(InputError, match="seed 0 -> 1"):
        open_run(folder_settings(parse_args(["--out", out, "--resume", "--seed", "1"])), world=1)
    with pytest.raises(UserError, match="already holds a run"):  # the resume above recorded itself
        open_run(folder_settings(parse_args(["--out", out, "--seed", "2"])), world=1)
