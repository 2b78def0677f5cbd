"""The run folder of train.py: config.json (the resolved settings and the fingerprints of the
inputs, both checked on --resume), metrics.jsonl (one line per optimiser step and per
evaluation, appended by rank 0, each line in one write) and run.lock (held by the live run, so
that no second process writes the same folder). stop_on_sigterm: how a run stopped by SIGTERM
says where it stopped."""
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import time

import fingerprint
import live_curves
import parallel
from checkpoint import write_json
from errors import InputError, UserError, writing

LOCK = "run.lock"
_HELD = []  # the locks of the run folders this process has opened: held until it ends

# Settings that --resume may change: the world size and the data order do not depend on them.
# The kernels: a run whose Triton kernel fails on some GPU continues with --kernels torch.
# The learning rates, beta and the gradient clip: a stage that diverged continues from its last
# good checkpoint with gentler settings (stage.py's guard says which checkpoint). Where the curves
# go (--report-to) changes nothing in the run. A change is
# recorded in config.json ("resumes") and as a "resume" record in metrics.jsonl.
RESUMABLE_CHANGES = ("kernels", "lr", "sft_lr", "beta", "clip", "report_to")


def lock_folder(out):
    """Take the run folder's lock (flock on run.lock) for as long as the returned file stays open;
    the kernel releases it when the process ends, however it ends. Refuses a folder whose lock
    a live process holds, naming that process."""
    path = os.path.join(out, LOCK)
    with writing(out):  # a read-only parent, a full disk: one line naming the folder
        os.makedirs(out, exist_ok=True)
        f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{out} is in use by a live run ({_holder(path)}); wait for it to end, or stop it "
                        "(docs/RUNS.md: stopping a run), then pass --resume to continue it") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: its parent is torchrun
        holder["torchrun_pid"] = os.getppid()
    try:
        with writing(path):
            f.truncate(0)
            f.write(json.dumps(holder) + "\n")
            f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _holder(path):
    """Who holds the lock, from what it wrote into run.lock (which it may be about to write)."""
    for _ in range(20):
        try:
            with open(path) as f:
                h = json.loads(f.read())
            return f"pid {h['pid']} on {h['host']}" + (
                f", started by torchrun pid {h['torchrun_pid']}" if "torchrun_pid" in h else "")
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    return f"a process that has not yet written its pid to {path}"


def open_run(args, world):
    """Lock the run folder (lock_folder) and write config.json (the resolved settings); refuses
    (UserError) a folder that another live process holds, a folder that holds a run without
    --resume, a --resume of nothing, and a --resume with other settings than RESUMABLE_CHANGES.
    The folder is this process's until it ends (or the returned lock is closed)."""
    out = args.out
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    saved = os.path.join(out, "config.json")
    if args.resume and not os.path.exists(saved):
        raise UserError(f"--resume: {saved} does not exist, so there is no run to continue")
    lock = lock_folder(out)  # before looking at config.json: two runs started together see one another
    try:
        resumes = []
        warn_same_data(settings)
        inputs = fingerprint.fingerprints(settings)  # read once; a resume reads them again to compare
        # A run that stopped before writing anything but its settings (a bad --data, say) left
        # nothing to continue: its folder is reused, so the corrected command just works. The
        # lock tells it from a live run that has not written anything yet.
        if os.path.exists(saved) and not args.resume and set(os.listdir(out)) <= {"config.json", LOCK}:
            print(f"{out}: replacing the settings of a run that stopped before producing anything", flush=True)
        elif os.path.exists(saved):
            if not args.resume:
                raise UserError(f"{out} already holds a run; pass --resume to continue it, or another --out")
            with open(saved) as f:
                old = json.load(f)
            # The folder is the one opened, whatever the string (runs/x/, ./runs/x, a moved
            # folder, another working directory); input paths are compared by content, below.
            by_content = {"out"} | ({k for k in fingerprint.INPUT_FLAGS if old.get(k) and settings.get(k)}
                                    if "inputs" in old else set())
            diff = sorted(k for k in settings if old.get(k) != settings[k]
                          and k not in RESUMABLE_CHANGES and k not in by_content)
            if diff:
                raise InputError(f"{saved}: --resume with different settings: " + ", ".join(
                    f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in diff) + " (only "
                    f"{', '.join(RESUMABLE_CHANGES)} may change; start another --out for the others)")
            changed_input = fingerprint.first_change(old.get("inputs", inputs), inputs)
            if changed_input:
                raise InputError(f"--resume: {changed_input}; resuming would train the later stages on "
                                 "other inputs than the earlier ones. Put the original back to resume, or "
                                 "start a new run on it: the same command with another --out, without --resume")
            drop_torn_tail(os.path.join(out, "metrics.jsonl"))
            changed = {k: [old.get(k), settings[k]] for k in RESUMABLE_CHANGES
                       if k in settings and old.get(k) != settings[k]}
            resumes = old.get("resumes", []) + [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": world,
                                                 "changed": changed}]
            record(out, {"type": "resume", "world_size": world, "changed": changed})
            if changed:
                print("--resume changes " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                      flush=True)
        print(json.dumps({**settings, "world_size": world}), flush=True)
        write_json(saved, {**settings, "world_size": world, "inputs": inputs,
                           **({"resumes": resumes} if resumes else {})}, indent=2)
    except BaseException:
        lock.close()
        raise
    _HELD.append(lock)
    return lock


def warn_same_data(settings):
    if settings.get("data") and settings.get("eval_data") and \
            os.path.realpath(settings["data"]) == os.path.realpath(settings["eval_data"]):
        print(f"WARNING: --data and --eval-data are the same file ({settings['data']}): the held-out metrics "
              "will be measured on training prompts", file=sys.stderr, flush=True)


def drop_torn_tail(path):
    """A run killed while appending a record leaves a last line without its newline: cut it, so
    the next record starts a line of its own, and say so once."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"{path}: dropped a torn last line ({len(data) - keep} bytes) left by a run stopped while writing it",
          flush=True)


_LAST_STEP = {}  # the last step record written: where a stopped run stopped


def record(out, rec):
    """Append one record to metrics.jsonl (rank 0), and print a line for every 10th step. The
    line goes out in one write of an O_APPEND file, so a kill leaves it whole or torn at the
    end (drop_torn_tail), never interleaved."""
    if parallel.rank() != 0:
        return
    path = os.path.join(out, "metrics.jsonl")
    line = (json.dumps(rec) + "\n").encode()
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, line)
            if written < len(line):  # a full disk mid-line: cut the part, so the file stays whole lines
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(28, os.strerror(28), path)
        finally:
            os.close(fd)
    if rec["type"] == "step":
        _LAST_STEP.update(stage=rec["stage"], step=rec["step"])
    live_curves.log(out, rec)  # --report-to: TensorBoard / W&B, after the file, never ahead of it
    if rec["type"] == "step" and (rec["step"] % 10 == 0 or rec["step"] == rec["steps"]):
        extra = f" acc {rec['rewards/accuracies']:.2f} margin {rec['rewards/margins']:.3f}" if "rewards/margins" in rec else ""
        parallel.log(f"  {rec['stage']} step {rec['step']}/{rec['steps']} loss {rec['loss']:.4f}{extra} "
                     f"lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")


def stop_on_sigterm(argv=None):
    """SIGTERM (a scheduler's stop, `kill`, torchrun passing it on) ends the run as Ctrl-C does:
    the exception unwinds, so a checkpoint or export being written is deleted, not left half
    done, and rank 0 says where the run stopped and how to continue it."""
    argv = list(sys.argv if argv is None else argv)
    resume = argv + ([] if "--resume" in argv else ["--resume"])
    launcher = (f"torchrun --nproc_per_node={parallel.world()} " if "TORCHELASTIC_RUN_ID" in os.environ
                else "python ")

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        if parallel.rank() == 0:
            where = (f"at {_LAST_STEP['stage']} step {_LAST_STEP['step']}" if _LAST_STEP
                     else "before its first training step")
            print(f"{os.path.basename(argv[0])}: stopped by SIGTERM {where}; resume with: "
                  f"{launcher}{shlex.join(resume)}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
