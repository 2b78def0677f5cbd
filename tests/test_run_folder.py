"""One writer per run folder (run_folder.lock_folder): two runs started on one folder at the same
instant, a --resume while a run is alive, and what a resume may change and records."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from errors import InputError, UserError
from run_folder import LOCK, open_run
from train import folder_settings, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _contender(out, argv, start, release, results):
    """A process that opens the run folder as train.py's rank 0 does, and holds it until told."""
    try:
        start.wait()
        lock = open_run(folder_settings(parse_args(["--out", out, *argv])), world=1)
    except UserError as e:
        results.put((os.getpid(), "refused", str(e)))
        return
    results.put((os.getpid(), "runs", ""))
    release.wait(60)
    lock.close()


def test_two_runs_started_together_one_runs_20_times(tmp_path):
    ctx = mp.get_context("fork")  # the test process has everything imported: the start is instant
    for i in range(20):
        out = str(tmp_path / f"run{i}")
        start, release, results = ctx.Barrier(2), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(out, [], start, release, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = sorted([results.get(timeout=60) for _ in procs], key=lambda r: r[1])
        assert [r[1] for r in got] == ["refused", "runs"], got
        winner = got[1][0]
        assert f"in use by a live run (pid {winner} " in got[0][2], got
        # A --resume while the first run is alive is refused too, naming it.
        late = ctx.Process(target=_contender, args=(out, ["--resume"], ctx.Barrier(1), release, results))
        late.start()
        pid, verdict, msg = results.get(timeout=60)
        assert verdict == "refused" and f"pid {winner} " in msg, msg
        release.set()
        for p in procs + [late]:
            p.join(30)
            assert p.exitcode == 0
        assert json.load(open(os.path.join(out, "config.json")))["out"] == out


def test_lock_is_released_when_the_holder_dies(tmp_path):
    out = str(tmp_path / "run")
    ctx = mp.get_context("fork")
    start, release, results = ctx.Barrier(1), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_contender, args=(out, [], start, release, results))
    holder.start()
    assert results.get(timeout=60)[1] == "runs"
    with pytest.raises(UserError, match=f"pid {holder.pid} "):
        open_run(folder_settings(parse_args(["--out", out, "--resume"])), world=1)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
    holder.join()
    open_run(folder_settings(parse_args(["--out", out, "--resume"])), world=1).close()


def test_cli_second_writer_is_refused_while_the_first_lives(tmp_path):
    """Real train.py processes: two started together on one folder, exactly one runs; a --resume
    while it is alive is refused with its pid; SIGTERM stops it for good (the lock is free)."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    flags = ["--out", str(out), "--num-prompts", "96", "--eval-prompts", "16", "--sft-steps", "100000",
             "--demo-dim", "32", "--demo-layers", "1", "--batch-size", "16", "--micro-batch-size", "8"]
    cmd = [sys.executable, "train.py", *flags]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 1 and f"in use by a live run (pid {winner.pid} " in err, err
        p = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and f"in use by a live run (pid {winner.pid} " in p.stderr, p.stderr
        assert winner.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.wait(60)
    assert json.load(open(out / LOCK))["pid"] == winner.pid
    open_run(folder_settings(parse_args(flags + ["--resume"])), world=1).close()  # the lock went with the process


def test_resume_may_change_lr_beta_clip_and_records_it(tmp_path):
    out = str(tmp_path / "run")
    open_run(folder_settings(parse_args(["--out", out, "--lr", "1e-4", "--beta", "0.5"])), world=1).close()
    open_run(folder_settings(parse_args(["--out", out, "--resume", "--lr", "1e-5", "--beta", "0.5", "--clip", "0.5",
                         "--sft-lr", "1e-3"])), world=1).close()
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["lr"] == [1e-5] and cfg["clip"] == 0.5
    assert cfg["resumes"][-1]["changed"] == {"lr": [[1e-4], [1e-5]], "sft_lr": [3e-3, 1e-3], "clip": [1.0, 0.5]}
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert recs == [{"type": "resume", "world_size": 1, "changed": cfg["resumes"][-1]["changed"]}]
    with pytest.raises(InputError, match=r"optimizer 'rmsprop' -> 'adamw'.*only kernels, lr, sft_lr, beta, clip"):
        open_run(folder_settings(parse_args(["--out", out, "--resume", "--lr", "1e-5", "--optimizer", "adamw"])), world=1)


def test_a_run_that_produced_nothing_is_replaced(tmp_path):
    """A run that failed in its set-up (a bad --data, say) wrote only config.json: the corrected
    command is not told to --resume a run that does not exist. Anything else is kept."""
    out = str(tmp_path / "run")
    open_run(folder_settings(parse_args(["--out", out, "--seed", "1"])), world=1).close()
    open_run(folder_settings(parse_args(["--out", out, "--seed", "2"])), world=1).close()
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 2
    os.mkdir(os.path.join(out, "data"))
    with pytest.raises(UserError, match="already holds a run"):
        open_run(folder_settings(parse_args(["--out", out, "--seed", "3"])), world=1)


def test_resume_takes_the_folder_however_it_is_named(tmp_path, monkeypatch):
    """--out is the folder opened, not a string: a trailing slash, ./, another working directory
    or a moved run folder all resume."""
    out = tmp_path / "runs" / "x"
    open_run(folder_settings(parse_args(["--out", str(out)])), world=1).close()
    monkeypatch.chdir(tmp_path)
    for name in ("runs/x/", "./runs/x", str(out)):
        open_run(folder_settings(parse_args(["--out", name, "--resume"])), world=1).close()
    os.rename(tmp_path / "runs", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    open_run(folder_settings(parse_args(["--out", "x", "--resume"])), world=1).close()


def test_resume_drops_a_torn_metrics_line_once(tmp_path, capsys):
    out = tmp_path / "run"
    open_run(folder_settings(parse_args(["--out", str(out)])), world=1).close()
    with open(out / "metrics.jsonl", "w") as f:
        f.write('{"type": "step", "step": 1}\n{"type": "step", "st')
    open_run(folder_settings(parse_args(["--out", str(out), "--resume"])), world=1).close()
    assert capsys.readouterr().out.count("dropped a torn last line (20 bytes)") == 1
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["type"] for r in recs] == ["step", "resume"]
