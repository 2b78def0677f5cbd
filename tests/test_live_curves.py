"""--report-to tensorboard on the shortened demo (tests/test_train.py's TINY flags), killed in the
middle of iteration 1 and resumed: the event files, read back with TensorBoard's own reader, hold
every step and evaluation once, on one increasing x axis, with metrics.jsonl's values. The same
run's exports are checked against transformers (data/export_files.py): AutoTokenizer +
apply_chat_template gives our prompt ids, and transformers' greedy generate on the export
answers as our generate.py does; and, where lm-eval is installed, lm-eval-harness on the export
gives our answers."""
import json
import os

import pytest
import torch

from test_train import records, run

import tensorboard  # noqa: F401 (the event files are read back with it)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FLAGS = ["--baseline", "0", "--epochs", "1", "--report-to", "tensorboard"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves") / "run"
    p = run(out, *FLAGS, faults=["--kill-at", "spin1:5"], check=False)
    assert p.returncode != 0 and not (out / "iter1" / "model").exists()
    run(out, *FLAGS, "--resume")
    return out


def scalars(out):
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_step_once_on_one_axis(resumed):
    curves = scalars(resumed)
    for tag in ("sft/loss", "spin/loss", "spin/lr", "spin/grad_norm", "spin/tokens_per_s", "spin/rewards/accuracies",
                "spin/rewards/margins", "eval/spin/exact_match", "eval/start/gt_logp_per_token"):
        assert tag in curves, (tag, sorted(curves))
    # The last record of each step in metrics.jsonl (the resume repeats steps 4 and 5 of spin1);
    # stage s is plotted from the end of the stage before it.
    last, order = {}, []
    for r in records(resumed):
        if r["type"] == "step":
            last[(r["stage"], r["step"])] = r
            order += [r["stage"]] if r["stage"] not in order else []
    assert order == ["sft", "spin0", "spin1"]
    ends = {t: max(s for (u, s) in last if u == t) for t in order}
    offset = {"sft": 0, "spin0": ends["sft"], "spin1": ends["sft"] + ends["spin0"]}
    want = [(offset[t] + s, last[(t, s)]["loss"]) for t in ("spin0", "spin1") for s in range(1, ends[t] + 1)]
    got = curves["spin/loss"]
    assert [s for s, _ in got] == [s for s, _ in want]  # once each, increasing, spin1 after spin0
    assert all(abs(a - b) <= 1e-6 * max(1, abs(b)) for (_, a), (_, b) in zip(got, want))
    assert [s for s, _ in curves["sft/loss"]] == list(range(1, ends["sft"] + 1))
    # A resume evaluates a finished iteration again (train.spin_iteration); the curve keeps one.
    evals = list({r["iteration"]: r for r in records(resumed) if r["type"] == "eval" and r["arm"] == "spin"}.values())
    assert [v for _, v in curves["eval/spin/exact_match"]] == pytest.approx([r["exact_match"] for r in evals])
    assert [s for s, _ in curves["eval/spin/exact_match"]] == [offset["spin1"], offset["spin1"] + ends["spin1"]]
    assert [s for s, _ in curves["eval/start/exact_match"]] == [ends["sft"]]


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    import live_curves
    from errors import UserError
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match="pip install wandb"):
        live_curves.Curves(str(tmp_path), ["wandb"])


def test_exports_describe_themselves(resumed):
    """The demo's exports: AutoTokenizer + apply_chat_template = our prompt ids; transformers'
    greedy generate on the export (its generation_config, no BOS) = our greedy decode."""
    import transformers
    import google.protobuf  # noqa: F401 (transformers reads tokenizer.model through it)
    import generate
    from data import readers
    from data.template import ChatFormat, load_chat_template
    from data.tokenizer import load_tokenizer
    import spin_kernels
    from hf_folder import load_model
    for folder in ("sft/model", "iter1/model"):
        export = resumed / folder
        assert {"chat_template.jinja", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(export))
        hf_tok = transformers.AutoTokenizer.from_pretrained(export)
        tok = load_tokenizer(resumed / "tokenizer")
        fmt = ChatFormat(tok, None)  # the run's: the demo trains through the built-in Zephyr
        exs = readers.read_examples(str(resumed / "data" / "heldout.jsonl"))[0][:8]
        prompts = [hf_tok.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
                   for e in exs]
        assert prompts == [fmt.prompt_ids(e.prompt) for e in exs]
        ours = generate.sample(spin_kernels.install(load_model(str(export))), prompts, max_new_tokens=28, greedy=True,
                               eos_id=list(tok.eos_ids))
        hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        for p, o in zip(prompts, ours):
            with torch.no_grad():
                out = hf.generate(torch.tensor([p]), max_new_tokens=28, do_sample=False)
            assert out[0, len(p):].tolist() == o.tokens


def test_wandb_offline(tmp_path, monkeypatch):
    """The same records to W&B, offline, under the run folder; a second start (a resume) skips
    what metrics.jsonl already holds."""
    pytest.importorskip("wandb")
    import live_curves
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = [{"type": "step", "stage": "sft", "step": s, "steps": 3, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs[:2]))
    curves = live_curves.Curves(str(tmp_path), ["wandb"])
    logged = []
    curves.writers.append(type("Spy", (), {"log": lambda self, s, g: logged.append((g, s)), "close": lambda self: 0})())
    for r in recs:
        curves.log(r)
    curves.close()
    assert logged == [(3, {"sft/loss": pytest.approx(1 / 3), "sft/lr": 1e-3})]
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert runs and any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


def test_lm_eval_reproduces_our_greedy_exact_match(resumed, tmp_path):
    """lm-eval-harness (optional: runs where `pip install lm-eval` was done) on the run's export,
    --apply_chat_template, a local generate_until task (spin_tools/lm_eval_demo.py): the same answers as
    our greedy decode, prompt by prompt. bench/RESULTS_lm_eval.md has the full demo's figure."""
    pytest.importorskip("lm_eval")
    import glob
    import subprocess
    import sys
    from test_train import ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # A test before this one may have started a one-process group in pytest's own process
    # (parallel.setup sets RANK, WORLD_SIZE, MASTER_PORT...): lm-eval's accelerate would then try to
    # listen on that same port.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, "-m", "spin_tools.lm_eval_demo", "--run", str(resumed), "--model", "iter1/model",
                        "--out", str(tmp_path), "-n", "16"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    command = p.stdout.strip().splitlines()[-1].split()
    p = subprocess.run([sys.executable, "-m", "lm_eval", *command[1:]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = sorted((json.loads(line) for line in open(glob.glob(str(tmp_path / "results" / "*" / "samples_*.jsonl"))[0])),
                    key=lambda s: s["doc_id"])
    ours = [json.loads(line) for line in open(tmp_path / "ours.jsonl")]
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in theirs][0].startswith("<|system|>\n</s>\n<|user|>\n")
    assert [s["resps"][0][0].strip() for s in theirs] == [o["answer"].strip() for o in ours]
    assert [int(s["exact_match"]) for s in theirs] == [o["correct"] for o in ours]
