"""What a user can do to a run, tried through the CLIs: point --out at something that is not a
run folder, change settings on --resume, kill an export, lose a rank, run out of memory, give
odd files. Each case is one line naming the file, flag or cause, no traceback through this
project's files, and nothing of the user's changed."""
import json
import os
import subprocess
import sys

import pytest

from test_errors import ROOT, assert_user_error, cli, model_dir, qa, write_jsonl  # noqa: F401 (a fixture)
from test_faults_os import SFT, env, leftovers

# The shortest demo run with two SPIN iterations (about 40 s on one core).
SPIN = ["--num-prompts", "48", "--eval-prompts", "8", "--sft-steps", "6", "--sft-lr", "3e-3", "--iterations", "2",
        "--batch-size", "16", "--micro-batch-size", "16", "--demo-dim", "32", "--demo-layers", "1",
        "--max-new-tokens", "28", "--ckpt-every", "100", "--lr", "1e-4", "--beta", "0.5", "--gen-batch-size", "64",
        "--baseline", "0", "--epochs", "1", "--mix-previous", "0"]


def faults(out, flags, *fault, procs=1, extra=()):
    """train.py's main under tests/faults.py with the faults `fault`, alone or under torchrun."""
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={procs}", *extra]
    return subprocess.run([*launch, "-m", "tests.faults", *fault, "--", "--out", str(out), *flags], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)


def train(out, flags, *more):
    return subprocess.run([sys.executable, "train.py", "--out", str(out), *flags, *more], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def snapshot(path):
    """{relative path: bytes} of everything under path (or the file itself)."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


# ----------------------------------------------------------------------------------------------
# --out that is not a run folder: refused before anything is written (not even run.lock)

def not_a_run(kind, tmp_path, model_dir):
    """(the --out, what the one line must name)."""
    if kind == "user's config.json":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "config.json").write_text('{"my": "settings"}\n')
        return tmp_path / "mine", ["config.json was not written by train.py", "nothing was changed"]
    if kind == "model folder":
        return model_dir, ["is a model folder", "'mistral'", "--model"]
    if kind == "folder of files":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("x")
        return tmp_path / "notes", ["is not empty and holds no run"]
    if kind == "a file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f", ["is a file, not a folder"]
    if kind == "under a file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "run", [f"is under {tmp_path / 'f'}, which is a file"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["user's config.json", "model folder", "folder of files", "a file", "under a file"])
def test_out_that_is_not_a_run_folder_is_refused_untouched(tmp_path, model_dir, kind):
    out, named = not_a_run(kind, tmp_path, model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(40)])
    top = out if os.path.exists(out) else out.parent
    before = snapshot(top)
    p = cli("train.py", "--out", out, "--model", model_dir, "--data", data)
    assert_user_error(p, f"--out {out}", *named)
    assert snapshot(top) == before  # no run.lock, no config.json written over the user's


# ----------------------------------------------------------------------------------------------
# --resume with another --beta: the finished iterations keep theirs, and their figures

def test_resume_with_another_beta_keeps_the_finished_iterations(tmp_path):
    out = tmp_path / "run"
    p = faults(out, SPIN, "--kill-at", "spin1:1")
    assert p.returncode == -9, p.stderr[-3000:]
    evals = [json.loads(l) for l in open(out / "metrics.jsonl") if '"eval"' in l]
    p = train(out, SPIN, "--resume", "--beta", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("--resume: --beta 1 applies from iteration 1 on; finished iteration 0 keeps beta 0.5 "
            "(beta per iteration now 0.5, 1)") in p.stdout, p.stdout[-3000:]
    assert "[spin0] beta 0.5," in p.stdout and "[spin1] beta 1," in p.stdout, p.stdout[-3000:]
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    # The finished iteration's evaluation, measured again on resume, gives the same figures.
    spin1 = [r for r in recs if r["type"] == "eval" and r["arm"] == "spin" and r["iteration"] == 1]
    assert len(spin1) == 2 and spin1[-1] == spin1[0] == next(r for r in evals if r.get("iteration") == 1)
    assert {r["beta"] for r in recs if r["type"] == "step" and r["stage"] == "spin1"} == {0.5, 1.0}
    assert json.load(open(out / "config.json"))["beta"] == [0.5, 1.0]
    p = train(out, SPIN, "--resume", "--beta", "1")  # the same command again: nothing changes
    assert p.returncode == 0 and "--resume changes" not in p.stdout, p.stdout[-3000:]
    assert "--beta 1 applies to no stage: finished iterations 0, 1 keep beta 0.5, 1" in p.stdout, p.stdout[-3000:]
    assert json.load(open(out / "config.json"))["beta"] == [0.5, 1.0]


# ----------------------------------------------------------------------------------------------
# A kill in the middle of an export: its hidden folder goes at the next --resume

def test_killed_export_leaves_nothing_hidden_after_resume(tmp_path):
    out = tmp_path / "run"
    p = faults(out, SFT, "--kill-in-export", "model")
    assert p.returncode == -9, p.stderr[-3000:]
    left = leftovers(out)
    assert [os.path.relpath(x, out).split(".")[:2] for x in left] == [["sft/", "model"]], left
    assert os.path.getsize(os.path.join(left[0], "model.safetensors")) > 0
    p = train(out, SFT, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{out}: removed what a killed run left half-written (1 hidden temporary entry" in p.stdout, p.stdout
    assert not leftovers(out), leftovers(out)
    assert os.path.isfile(out / "sft" / "model" / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# A rank that dies: the survivor says which, never a traceback, whichever way it learns it

@pytest.mark.parametrize("monitor", ["0.1", "15"])
def test_a_dead_rank_is_named_by_the_survivor(tmp_path, monitor):
    """torchrun's agent, which looks every --monitor-interval seconds, SIGTERMs the survivor (0.1),
    or the survivor's next collective breaks first (15: the collective breaks within milliseconds of
    the kill, long before the agent's next look; torchrun itself then returns at that look, so a
    longer interval only makes the test wait)."""
    out = tmp_path / "run"
    flags = [*SFT[:SFT.index("--micro-batch-size")], "--micro-batch-size", "8", *SFT[SFT.index("--demo-dim"):]]
    p = faults(out, flags, "--rank", "1", "--kill-at", "sft:2", procs=2, extra=["--monitor-interval", monitor])
    line = assert_user_error(p, "rank 1 (pid ", "died without a word", "so rank 0 stopped at sft step",
                             "resume with: torchrun --nproc_per_node=2 ")
    assert "stopped by SIGTERM" not in p.stderr, p.stderr[-3000:]
    assert line.endswith(" --resume"), line


# ----------------------------------------------------------------------------------------------
# Memory that runs out: one line naming the phase and the flags, then --resume finishes

def test_out_of_memory_is_one_line_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    p = faults(out, SFT, "--oom-at", "sft:2")
    assert_user_error(p, "out of memory at sft step 2 (DefaultCPUAllocator: can't allocate memory",
                      "lower --micro-batch-size", "resume with: python ")
    p = train(out, SFT, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and not leftovers(out)


# ----------------------------------------------------------------------------------------------
# Odd files: a safetensors index that is a list or not UTF-8; data with a BOM, an empty answer,
# repeated prompts

@pytest.mark.parametrize("content,named", [(b"[1, 2]", "it holds a JSON list, not an object"),
                                           (b'\xff\xfe{"weight_map": {}}', "not UTF-8 text (byte 0)")])
def test_bad_safetensors_index_is_one_line(tmp_path, model_dir, content, named):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in os.listdir(model_dir):
        (folder / f).write_bytes((model_dir / f).read_bytes())
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(content)
    p = cli("generate.py", "--model", folder, "--prompt", "hi", "--max-new-tokens", "4")
    assert_user_error(p, f"{folder}/model.safetensors.index.json: ", named)


def test_data_with_a_bom_an_empty_answer_or_repeated_prompts(tmp_path, model_dir):
    """Each run stops at a cheap error after reading the data: fewer prompts than one batch."""
    rows = [qa(i) for i in range(40)]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    p = cli("train.py", "--out", tmp_path / "a", "--model", model_dir, "--data", bom, "--batch-size", "64")
    assert_user_error(p, "36 training prompts is fewer than one global batch")  # row 1 read past its BOM

    rows[3]["messages"][1]["content"] = ""
    empty = write_jsonl(tmp_path / "empty.jsonl", rows)
    p = cli("train.py", "--out", tmp_path / "b", "--model", model_dir, "--data", empty)
    assert_user_error(p, "empty.jsonl: row 4: field 'messages': the answer (the last assistant turn) is empty")

    repeated = write_jsonl(tmp_path / "rep.jsonl", [qa(i % 10) for i in range(40)])
    p = cli("train.py", "--out", tmp_path / "c", "--model", model_dir, "--data", repeated, "--batch-size", "64")
    assert "WARNING: " + str(repeated) + ": 4 of the 4 held-out prompts are also training prompts" in p.stdout, \
        p.stdout[-3000:]
    assert_user_error(p, "fewer than one global batch")


# ----------------------------------------------------------------------------------------------
# generate.py: defaults that fit the model, a closed stdin, a conversation kept

def chat(model_dir, text, *flags, stdin=None):
    return subprocess.run([sys.executable, "generate.py", "--model", str(model_dir), "--interactive", *flags],
                          input=text, stdin=stdin, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def test_generate_defaults_fit_the_model(tmp_path, model_dir):
    """The fixture's model has 256 positions: the default --max-new-tokens 256 left no room for
    a prompt, the default --max-length 1024 exceeded them. Flags given are still checked."""
    p = chat(model_dir, "what is 1 plus 1?\n")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "the model has 256 positions: defaults fitted to them: --max-new-tokens 128" in p.stderr, p.stderr
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(4)])
    p = cli("generate.py", "--model", model_dir, "--data", data, "--out", tmp_path / "o.parquet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--max-new-tokens 128, --max-prompt-length 128, --max-length 256" in p.stderr, p.stderr
    p = cli("generate.py", "--model", model_dir, "--data", data, "--out", tmp_path / "o2.parquet",
            "--max-length", "1024")
    assert_user_error(p, "--max-length 1024", "exceeds the model's 256 positions")


def test_interactive_with_stdin_closed_is_one_line(model_dir):
    p = subprocess.run(["bash", "-c", f"exec {sys.executable} generate.py --model {model_dir} --interactive <&-"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert_user_error(p, "--interactive reads the messages from stdin, which is closed")


def test_interactive_keeps_the_conversation_when_a_message_is_too_long(model_dir):
    p = chat(model_dir, "what is 1 plus 1?\n" + "what is 1 plus 1? " * 40 + "\n", "--max-new-tokens", "100")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "it exceeds the model's 256 positions: shorten it)" in p.stderr, p.stderr
    assert "starting over" not in p.stderr, p.stderr  # the first turn was not thrown away


def test_train_recipe_lengths_fit_the_model(tmp_path, model_dir):
    """The recipe's --max-length 1024 (and 512 + 256) refused every model of fewer positions when
    left unset; now fitted to the fixture's 256. A length given is still checked."""
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(20)])
    flags = ["--model", model_dir, "--data", data, "--batch-size", "8", "--micro-batch-size", "8", "--iterations", "1",
             "--eval-prompts", "2", "--gen-batch-size", "8", "--epochs", "1"]
    p = cli("train.py", "--out", tmp_path / "run", *flags)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert ("the model has 256 positions: the recipe's lengths fitted to them: --max-length 256, "
            "--max-prompt-length 128, --max-new-tokens 128") in p.stdout, p.stdout[-3000:]
    p = cli("train.py", "--out", tmp_path / "run2", *flags, "--max-length", "1024")
    assert_user_error(p, "the model has 256 positions, but --max-length 1024")
