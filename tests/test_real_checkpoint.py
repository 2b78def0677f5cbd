"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (Llama architecture, tied
embeddings, byte-level BPE tokenizer.json, ChatML template), built once per machine by
spin_tools/smollm2.py. transformers is the reference for answers, tokens and exports."""
import json
import os
import subprocess
import sys

import torch

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain in one sentence what a CPU does."]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("WORLD_SIZE", None)
    return e


def test_generate_cli_greedy_equals_transformers(smollm2_dir):
    """`generate.py --prompt ... --greedy` prints, conversation by conversation, exactly the answer
    of transformers' greedy generate on the same folder (its own tokenizer and template)."""
    n = 40
    p = subprocess.run([sys.executable, "generate.py", "--model", smollm2_dir, "--greedy", "--max-new-tokens", str(n),
                        "--format", "jsonl", *[a for q in QUESTIONS for a in ("--prompt", q)]],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [o["prompt"] for o in ours] == QUESTIONS
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for q, o in zip(QUESTIONS, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, do_sample=False)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert o["answer"] == want, (q, o["answer"], want)
    assert "Paris" in ours[0]["answer"]


def test_spin_iteration_on_smollm2_under_torchrun(smollm2_dir, tmp_path):
    """train.py on the real checkpoint, two processes: its tokenizer and template drive
    generation and training, and the export is a folder transformers loads whose tokenizer and
    template give the same chat ids as the source's."""
    rows = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(1, 2), (3, 4), (5, 6), (7, 8),
                                                                                 (2, 9), (4, 4), (6, 1), (9, 9)]]
    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    with open(data, "w") as f:
        for q, a in rows[:6]:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    with open(held, "w") as f:
        for q, a in rows[6:]:
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--model", smollm2_dir, "--data", str(data), "--eval-data", str(held), "--out", str(out),
                        "--iterations", "1", "--batch-size", "2", "--micro-batch-size", "1", "--epochs", "1",
                        "--max-new-tokens", "16", "--max-length", "96", "--max-prompt-length", "64",
                        "--gen-batch-size", "8", "--lr", "1e-6"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "chat_template.jinja" in p.stdout  # the run says which template it uses
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"step"' in line]
    assert steps and abs(steps[0]["loss"] - 0.6931) < 1e-3  # theta = theta_t at the first step: log 2
    export = out / "iter0" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (export / name).exists(), name
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    ids = [transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, add_generation_prompt=True)
           for d in (smollm2_dir, str(export))]
    assert ids[0] == ids[1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
