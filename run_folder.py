"""The run folder of train.py: config.json (the resolved settings and the fingerprints of the
inputs, both checked on --resume), metrics.jsonl (one line per optimiser step and per
evaluation, appended by rank 0, each line in one write) and run.lock (held by the live run, so
that no second process writes the same folder). stop_on_sigterm: how a run stopped by SIGTERM
says where it stopped."""
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import errors
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
# Of those, the ones a finished stage was trained or evaluated with: a change applies to the
# stages not yet finished, and the finished ones keep their value (kept_values), so a resume
# never re-evaluates a finished iteration at another beta or logs it at another lr.
PER_ITERATION = ("beta", "lr")

# What marks a config.json as one this file wrote: the marker, or (runs from before it) the
# settings every one of ours records. A folder whose config.json has neither is the user's.
MARK = {"written_by": "train.py"}
OUR_FIELDS = {"out", "world_size", "seed", "iterations"}
# The hidden names atomic writes go through (checkpoint._tmp_sibling, save_ckpt's .tmp-step-N):
# what a process killed mid-write leaves behind.
LEFTOVER = re.compile(r"^(\..+\.\d+-[0-9a-f]{8}\.tmp|\.tmp-step-\d+)$")


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


def check_out(out):
    """Refuse (UserError), before anything is written, an --out that is not a folder this code may
    write: a file or a path under one, a folder whose config.json is not one of ours (a model
    folder given as --out, the user's own file), a non-empty folder that holds no run."""
    path = os.path.abspath(out)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out) else f"is under {path}, which is a file"
        raise UserError(f"--out {out} {where}, not a folder: pass a new or empty folder, or a run folder")
    if path != os.path.abspath(out):
        return  # a new folder
    saved = os.path.join(out, "config.json")
    if os.path.isfile(saved):
        try:
            with open(saved, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            cfg = None
        if isinstance(cfg, dict) and "model_type" in cfg:
            raise UserError(f"--out {out} is a model folder ({saved} describes a {cfg['model_type']!r} model), "
                            "not a run folder: nothing was written to it; pass the model as --model and a new "
                            "folder as --out")
        if not (isinstance(cfg, dict) and (cfg.get("written_by") == MARK["written_by"] or OUR_FIELDS <= set(cfg))):
            raise UserError(f"--out {out}: {saved} was not written by train.py, so the folder is not a run folder; "
                            "nothing was changed: pass a new or empty folder as --out")
        return
    if _holds_files(out):
        raise UserError(f"--out {out} is not empty and holds no run (no config.json): nothing was changed; pass a "
                        "new or empty folder as --out")


def _holds_files(folder):
    """True when anything but empty folders, a run.lock and the hidden names of atomic writes lies
    under folder (a run that has just taken the lock is writing its config.json under one; a
    config.json that appeared since check_out looked is that run's, whose lock refuses us)."""
    for d, _, files in os.walk(folder):
        if any(not ((d == folder and f in (LOCK, "config.json")) or LEFTOVER.match(f)) for f in files):
            return True
    return False


def remove_leftovers(out):
    """Delete the hidden temporary files and folders of writes that a killed process left in the
    run folder (a half-written export, a checkpoint's .tmp-step-N). Called with the folder's lock
    held, so no live process of this run is writing them."""
    found = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files if LEFTOVER.match(n)]
    size = 0
    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            size += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            size += os.path.getsize(path) if not os.path.islink(path) else 0
            os.unlink(path)
    if found:
        print(f"{out}: removed what a killed run left half-written ({len(found)} hidden temporary "
              f"{'entries' if len(found) > 1 else 'entry'}, {size / 2**20:.1f} MiB): " + ", ".join(os.path.relpath(p, out) for p in found[:3])
              + (f" and {len(found) - 3} more" if len(found) > 3 else ""), flush=True)


def finished_iterations(out):
    """The iterations t with a finished stage: an export <out>/iter{t}/model, or one of the
    baseline's or a study arm's (<out>/<folder>/iter{t}/model)."""
    done = set()
    for path in glob.glob(os.path.join(glob.escape(out), "iter*", "model")) + \
            glob.glob(os.path.join(glob.escape(out), "*", "iter*", "model")):
        m = re.fullmatch(r"iter(\d+)", os.path.basename(os.path.dirname(path)))
        if m and os.path.isdir(path):
            done.add(int(m.group(1)))
    return done


def _at(values, t):
    return values[min(t, len(values) - 1)]


def kept_values(out, old, new):
    """On --resume, the values of the per-iteration settings (PER_ITERATION) the run goes on with,
    and what to say about them: a finished iteration keeps its old value, the others take the new
    one. --sft-lr likewise, once the SFT stage is finished. A value that applies to no stage is
    kept out of config.json, and said."""
    settings, said = dict(new), []
    done = finished_iterations(out)
    for k in PER_ITERATION:
        if old.get(k) is None or new.get(k) is None or old[k] == new[k]:
            continue
        n = new.get("iterations") or 1
        keep = sorted(t for t in done if t < n)
        if not keep:
            continue
        merged = [_at(old[k], t) if t in keep else _at(new[k], t) for t in range(n)]
        kept = f"finished iteration{'s' if len(keep) > 1 else ''} {_fmt(keep)} keep{'' if len(keep) > 1 else 's'} " \
               f"{k} {_fmt([_at(old[k], t) for t in keep])}"
        if merged == [_at(old[k], t) for t in range(n)]:
            settings[k] = old[k]
            said.append(f"--{k} {_fmt(new[k])} applies to no stage: {kept}")
        else:
            settings[k] = merged
            said.append(f"--{k} {_fmt(new[k])} applies from iteration {min(set(range(n)) - set(keep))} on; {kept} "
                        f"({k} per iteration now {_fmt(merged)})")
    sft_model = os.path.join(out, "sft", "model")
    if old.get("sft_lr") is not None and old.get("sft_lr") != new.get("sft_lr") and os.path.isdir(sft_model):
        settings["sft_lr"] = old["sft_lr"]
        said.append(f"--sft-lr {_fmt(new.get('sft_lr'))} applies to no stage: the SFT stage is finished ({sft_model}) "
                    f"and keeps --sft-lr {_fmt(old['sft_lr'])}")
    return settings, said


def _fmt(v):
    return ", ".join(_fmt(x) for x in v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def open_run(args, world):
    """Lock the run folder (lock_folder) and write config.json (the resolved settings); refuses
    (UserError) an --out that is not a run folder of ours (check_out), a folder that another live
    process holds, a folder that holds a run without --resume, a --resume of nothing, and a
    --resume with other settings than RESUMABLE_CHANGES. On --resume a changed --beta or --lr
    applies to the iterations not yet finished (kept_values): `args` is updated with the values
    the run goes on with. The folder is this process's until it ends (or the returned lock is
    closed)."""
    out = args.out
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    saved = os.path.join(out, "config.json")
    check_out(out)  # nothing of the user's is touched: not even a run.lock is written first
    if args.resume and not os.path.exists(saved):
        raise UserError(f"--resume: {saved} does not exist, so there is no run to continue")
    lock = lock_folder(out)  # before looking at config.json: two runs started together see one another
    try:
        resumes = []
        remove_leftovers(out)  # a killed run's half-written files: the lock says no live run writes them
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
                          and k not in RESUMABLE_CHANGES and k not in by_content and not _was_fitted(k, old, settings))
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
            settings, kept = kept_values(out, old, settings)
            for k in PER_ITERATION:
                if k in settings:
                    setattr(args, k, settings[k])
            changed = {k: [old.get(k), settings[k]] for k in RESUMABLE_CHANGES
                       if k in settings and old.get(k) != settings[k]}
            resumes = old.get("resumes", []) + [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": world,
                                                 "changed": changed}]
            record(out, {"type": "resume", "world_size": world, "changed": changed})
            if changed:
                print("--resume changes " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                      flush=True)
            for line in kept:
                print(f"--resume: {line}", flush=True)
        print(json.dumps({**settings, "world_size": world}), flush=True)
        write_json(saved, {**MARK, **settings, "world_size": world, "inputs": inputs,
                           **({"resumes": resumes} if resumes else {})}, indent=2)
    except BaseException:
        lock.close()
        raise
    _HELD.append(lock)
    return lock


def _was_fitted(k, old, new):
    """A length left unset, which train_args.fit_lengths now fits to the model, against a run
    started before that, which recorded the recipe's value: the same run (the model, unchanged, had
    room for the recipe's lengths, or that run would have been refused)."""
    from train_args import FITTED, RECIPE
    return k in FITTED and new[k] is None and not new.get("demo") and old.get(k) == getattr(RECIPE, k)


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


def record(out, rec):
    """Append one record to metrics.jsonl (rank 0), and print a line for every 10th step. The
    line goes out in one write of an O_APPEND file, so a kill leaves it whole or torn at the
    end (drop_torn_tail), never interleaved."""
    if rec["type"] == "step":  # where a stopped run stopped (errors.where), on every rank
        errors.WHERE.update(step=f"{rec['stage']} step {rec['step']}", phase="training")
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
    live_curves.log(out, rec)  # --report-to: TensorBoard / W&B, after the file, never ahead of it
    if rec["type"] == "step" and (rec["step"] % 10 == 0 or rec["step"] == rec["steps"]):
        extra = f" acc {rec['rewards/accuracies']:.2f} margin {rec['rewards/margins']:.3f}" if "rewards/margins" in rec else ""
        parallel.log(f"  {rec['stage']} step {rec['step']}/{rec['steps']} loss {rec['loss']:.4f}{extra} "
                     f"lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")


def stop_on_sigterm(argv=None):
    """SIGTERM (a scheduler's stop, `kill`, torchrun passing it on) ends the run as Ctrl-C does:
    the exception unwinds, so a checkpoint or export being written is deleted, not left half
    done, and rank 0 says where the run stopped and how to continue it. torchrun also sends it
    to the ranks left when one rank died: then every surviving rank says which rank died."""
    argv = list(sys.argv if argv is None else argv)
    resume = argv + ([] if "--resume" in argv else ["--resume"])
    launcher = (f"torchrun --nproc_per_node={parallel.world()} " if "TORCHELASTIC_RUN_ID" in os.environ
                else "python ")
    errors.WHERE["resume"] = f"{launcher}{shlex.join(resume)}"
    prog = os.path.basename(argv[0])

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        parallel.mark_exit()  # before a peer that got the same SIGTERM looks for ranks that died
        dead = parallel.dead_peers()
        if dead:
            print(f"{prog}: error: {errors.peer_died(dead)}", file=sys.stderr, flush=True)
            sys.exit(1)
        if parallel.rank() == 0:
            print(f"{prog}: stopped by SIGTERM {errors.where() or 'before its first training step'}; "
                  f"{errors.resume_hint()}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
