"""A user's mistake is one line naming the file, row, field or flag and what to do, never a
traceback; under torchrun it is said once and the other ranks stop quietly (errors.py). Each bad
input runs the real CLI in a subprocess; every numeric flag is also checked at parse level."""
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import errors
import generate
import parallel
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A frame of this project's code in a traceback; torchrun's own failure summary has frames too,
# but in torch's files (site-packages, which a virtual environment made inside the checkout puts
# under ROOT too).
PROJECT_FRAME = re.compile(r'File "' + re.escape(ROOT) + r'/(?![^"]*/site-packages/)')


def cli(script, *args, procs=1, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={procs}"]
    return subprocess.run([*launch, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(p, *named, rc=1):
    """Non-zero exit, every `named` string in the one error line, the line said once, and no
    frame of this project's code anywhere in the output."""
    out = p.stdout + p.stderr
    assert p.returncode == rc, out[-3000:]
    lines = [l for l in p.stderr.splitlines() if re.match(r"(train|generate|report|peer_failure)\.py: error: ", l)]
    assert len(lines) == 1, out[-3000:]
    for name in named:
        assert name in lines[0], (name, lines[0])
    assert not PROJECT_FRAME.search(out), out[-3000:]
    assert "Connection closed" not in out and "[rank1]" not in out, out[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Hugging Face folder (config.json, model.safetensors, tokenizer.model)."""
    from data.tokenizer import Tokenizer, train_tokenizer
    from demo import tiny_config
    from hf_folder import save_model
    from model import Mistral

    root = tmp_path_factory.mktemp("model")
    tok_path = train_tokenizer([f"what is {i} plus {i}? it is {2 * i}." for i in range(300)], root / "tok",
                               vocab_size=300)
    tok = Tokenizer(tok_path)
    save_model(Mistral(tiny_config(tok.vocab_size, 32, 1, 256, tok.bos_id, tok.eos_id)),
               root / "model", extra_files={"tokenizer.model": tok_path})
    return root / "model"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(i):
    return {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                         {"role": "assistant", "content": f"it is {2 * i}."}]}


# ----------------------------------------------------------------------------------------------
# Bad data, bad folders: train.py in a subprocess

def bad_data(kind, tmp_path):
    """(the file, what the message must name)."""
    if kind == "missing column":
        path = tmp_path / "qa.parquet"
        pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["c", "d"]}), path)
        return path, ["qa.parquet", "'prompt'+'response'"]
    if kind == "wrong role order":
        rows = [qa(1), {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                                     {"role": "assistant", "content": "y"}]}]
        return write_jsonl(tmp_path / "order.jsonl", rows), ["order.jsonl: row 2", "field 'role'", "expected 'user'"]
    if kind == "non-string content":
        rows = [qa(1), qa(2), {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}]
        return write_jsonl(tmp_path / "content.jsonl", rows), ["content.jsonl: row 3", "field 'content'", "string"]
    if kind == "truncated parquet":
        path = tmp_path / "cut.parquet"
        pq.write_table(pa.Table.from_pylist([qa(i) for i in range(50)]), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        return path, ["cut.parquet", "corrupt or unreadable Parquet"]
    if kind == "empty file":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
        return path, ["empty.jsonl", "empty file"]
    if kind == "directory":
        folder = tmp_path / "spin_iter0"
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist([qa(1)]), folder / "train_prefs.parquet")
        return folder, ["spin_iter0: is a folder", "train_prefs.parquet"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing column", "wrong role order", "non-string content", "truncated parquet",
                                  "empty file", "directory"])
def test_bad_data_file_is_one_line(model_dir, tmp_path, kind):
    data, named = bad_data(kind, tmp_path)
    p = cli("train.py", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    assert_user_error(p, *named)


def test_bad_data_under_torchrun_is_said_once(model_dir, tmp_path):
    data, named = bad_data("wrong role order", tmp_path)
    p = cli("train.py", "--model", model_dir, "--data", data, "--out", tmp_path / "run", procs=2)
    assert_user_error(p, *named)


def test_rank0_only_refusal_under_torchrun_is_said_once(tmp_path):
    """The run folder check runs on rank 0 alone (parallel.on_rank0): rank 1 learns that it
    failed and stops without a word (before: 'Connection closed by peer' from rank 1)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"written_by": "train.py"}')  # a run of ours (run_folder.MARK)
    (out / "metrics.jsonl").write_text('{"type": "step"}\n')
    p = cli("train.py", "--out", out, procs=2)
    assert_user_error(p, str(out), "already holds a run", "--resume")


def test_peer_of_a_failed_rank_stops_quietly():
    """Rank 0 fails alone while rank 1 waits at a collective: rank 1's broken connection is a
    consequence, so it exits without a traceback (parallel.peer_failed)."""
    p = cli("tests/peer_failure.py", procs=2)
    assert_user_error(p, "peer_failure.py: rank 0 alone saw this")


def test_missing_model_folder(tmp_path):
    p = cli("train.py", "--model", tmp_path / "nope", "--data", tmp_path / "x.jsonl", "--out", tmp_path / "run")
    line = assert_user_error(p, "--model", "nope: no such folder")
    assert "tokenizer" not in line.split("expected")[0]  # not reported as a missing tokenizer.model


def test_pickle_only_model_folder(model_dir, tmp_path):
    folder = tmp_path / "pickles"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    (folder / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    data = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(20)])
    p = cli("train.py", "--model", folder, "--data", data, "--out", tmp_path / "run")
    assert_user_error(p, "--model", "pytorch_model.bin", "pickle", "safetensors")


def test_generate_cli_bad_data_and_missing_model(model_dir, tmp_path):
    data, named = bad_data("non-string content", tmp_path)
    p = cli("generate.py", "--model", model_dir, "--data", data, "--out", tmp_path / "o.parquet")
    assert_user_error(p, *named)
    assert not os.path.exists(tmp_path / "o.parquet.parts")  # nothing left to block the corrected rerun
    with pytest.raises(errors.MissingInput, match="--model .*nope: no such folder"):
        generate.main(["--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o.parquet")])


def test_small_data_without_eval_data_says_so_at_start(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "few.jsonl", [qa(i) for i in range(9)])
    p = cli("train.py", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    assert_user_error(p, "few.jsonl", "9 prompts", "--eval-data")


def test_report_cli(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("not json\n[1]\n")
    p = cli("report.py", metrics)
    assert_user_error(p, "metrics.jsonl: line 1", "not a JSON record")
    import report
    with pytest.raises(errors.MissingInput, match="none.jsonl: no such file"):
        report.main([str(tmp_path / "none.jsonl")])


# ----------------------------------------------------------------------------------------------
# Numeric flags: each zero or negative value of the issue through the CLI, every flag at parse level

@pytest.mark.parametrize("script, flag, value", [
    ("train.py", "--batch-size", "0"),
    ("train.py", "--micro-batch-size", "0"),
    ("train.py", "--gen-batch-size", "0"),
    ("train.py", "--max-new-tokens", "0"),
    ("train.py", "--num-prompts", "0"),
    ("train.py", "--num-prompts", "-5"),
    ("train.py", "--epochs", "0"),
    ("generate.py", "--part-size", "0"),
    ("generate.py", "--temperature", "0"),
])
def test_bad_flag_through_the_cli(tmp_path, script, flag, value):
    rest = ["--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o.parquet"] \
        if script == "generate.py" else ["--out", tmp_path / "run"]
    p = cli(script, flag, value, *rest)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and f"argument {flag}: {value}" in p.stderr, out
    assert not PROJECT_FRAME.search(out)
    # nothing written: the run folder, or generate.py's output and its parts folder
    written = ["run"] if script == "train.py" else ["o.parquet", "o.parquet.parts"]
    assert not any(os.path.exists(tmp_path / name) for name in written), os.listdir(tmp_path)
    if flag == "--temperature":
        assert "--greedy" in p.stderr


TRAIN_BAD = {
    "--seed": ["-1"], "--num-prompts": ["0", "-3"], "--eval-prompts": ["0"], "--max-length": ["0"],
    "--max-prompt-length": ["0"], "--iterations": ["0", "-1"], "--beta": ["0", "0.1,-1", "x"],
    "--lr": ["0", "1e-5,0", "nan"], "--epochs": ["0", "-1", "inf"], "--batch-size": ["0", "-64"],
    "--micro-batch-size": ["0"], "--warmup-ratio": ["-0.1", "1"], "--clip": ["0", "-1"],
    "--max-new-tokens": ["0"], "--temperature": ["0", "-1"], "--top-p": ["0", "1.5"], "--top-k": ["-1"],
    "--gen-batch-size": ["0"], "--sft-steps": ["0"], "--sft-lr": ["0"], "--ckpt-every": ["0"],
    "--demo-dim": ["0"], "--demo-layers": ["0"], "--vocab": ["0"],
}
GENERATE_BAD = {
    "--num-prompts": ["0", "-1"], "--part-size": ["0"], "--max-new-tokens": ["0", "-4"], "--top-p": ["0", "2"],
    "--top-k": ["-1"], "--seed": ["-1"], "--iteration": ["-1"], "--max-prompt-length": ["0"],
    "--max-length": ["0"], "--batch-size": ["0"], "--temperature": ["0", "-0.5"],
}


@pytest.mark.parametrize("flag, value", [(f, v) for f, vs in TRAIN_BAD.items() for v in vs])
def test_train_flag_checked_at_parse(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [(f, v) for f, vs in GENERATE_BAD.items() for v in vs])
def test_generate_flag_checked_at_parse(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o.parquet", flag, value])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_valid_flags_still_parse():
    a = train.parse_args(["--epochs", "0.5", "--top-p", "1", "--top-k", "0", "--warmup-ratio", "0", "--seed", "0",
                          "--beta", "0.1,5", "--lr", "1e-7"])
    assert (a.spin.epochs, a.gen.top_p, a.spin.beta, a.spin.lr) == (0.5, 1.0, [0.1, 5.0], [1e-7])
    g = generate.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o.parquet", "--greedy",
                             "--temperature", "0"])
    assert g.greedy and g.temperature == 0


def test_batch_flags_checked_against_the_data_at_start():
    settings = train.parse_args(["--batch-size", "16", "--micro-batch-size", "5"]).train
    with pytest.raises(errors.InputError, match="--batch-size 16 must split evenly .* --micro-batch-size 5"):
        train.check_batches(settings, 100, "d.jsonl")
    settings = train.parse_args(["--batch-size", "16", "--micro-batch-size", "8"]).train
    with pytest.raises(errors.InputError, match=r"d.jsonl: 10 training prompts is fewer than one global batch "
                                                r"\(--batch-size 16\)"):
        train.check_batches(settings, 10, "d.jsonl")
    train.check_batches(settings, 16, "d.jsonl")


def test_only_rank0_prints_a_flag_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--batch-size", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# The boundary itself

def test_run_command_user_error_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])

    def main():
        raise errors.InputError("d.jsonl: row 3: field 'content': expected a string, got int")

    with pytest.raises(SystemExit) as e:
        errors.run_command(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "train.py: error: d.jsonl: row 3: field 'content': expected a string, got int\n"


def test_run_command_keeps_the_traceback_of_a_bug(capsys):
    def main():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        errors.run_command(main)


def test_run_command_peer_failure_is_quiet(capsys):
    def main():
        raise parallel.PeerFailed("rank 0 failed: ...")

    with pytest.raises(SystemExit) as e:
        errors.run_command(main)
    assert e.value.code == 1 and capsys.readouterr().err == ""


def test_rank0_failure_is_peer_failed_on_the_other_ranks(monkeypatch):
    """What the other ranks see when rank 0's own work failed: a quiet PeerFailed (run_command
    exits 1 without a word), not an error of their own."""
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    monkeypatch.setattr(parallel, "world", lambda: 2)
    monkeypatch.setattr(parallel.dist, "broadcast_object_list", lambda err, src: err.__setitem__(0, "UserError: x"))
    with pytest.raises(parallel.PeerFailed, match="rank 0 failed: UserError: x"):
        parallel.on_rank0(lambda: None)
    monkeypatch.setattr(parallel.dist, "broadcast_object_list", lambda err, src: None)
    assert parallel.on_rank0(lambda: 5) is None  # fn runs on rank 0 only


def test_user_errors_keep_their_old_types():
    from data.readers import DataError
    from data.template import TemplateError
    from data.tokenizer import TokenizerNotFound

    for cls in (DataError, TemplateError, TokenizerNotFound):
        assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
    assert issubclass(errors.MissingInput, FileNotFoundError) and issubclass(errors.Diverged, FloatingPointError)


def test_every_rank_takes_rank0s_value():
    """train.start gives every rank rank 0's run folder: the default name carries the time of day
    each rank read while parsing its flags, and two ranks once named two folders a second apart."""
    p = cli("tests/rank0_value.py", procs=2)
    assert p.returncode == 0, p.stderr[-2000:]
    # The two ranks share one pipe, so their lines can interleave: match, do not split lines.
    got = sorted(re.findall(r"rank (\d) got (runs/spin-rank\d)", p.stdout))
    assert got == [("0", "runs/spin-rank0"), ("1", "runs/spin-rank0")], p.stdout
