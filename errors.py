"""What a user sees when something they gave is wrong: one line naming the file, row, field or
flag and what to do, never a traceback. What a developer sees when the code is wrong: the
traceback, as always.

    UserError        a mistake the user can fix (bad data, flag, model folder, checkpoint, a
                     run folder another run holds, a run that diverged). Modules raise one of
    InputError       ... bad content (a ValueError, so older `except ValueError` still works)
    MissingInput     ... a file or folder that is not there (a FileNotFoundError)
    Diverged         ... a training stage that went NaN/inf (the message names the checkpoint to resume from)
    DiskError        ... a write the system refused (disk full, permission, read-only): `writing(path)`
    ArgumentParser   argparse, except that under torchrun only rank 0 prints a flag error
    positive_int ... argparse `type=` checks that name the flag (argparse adds "argument --x:")
    run_command      the boundary every entry point (train.py, generate.py, report.py) runs in

Under torchrun every rank runs the same code, so most mistakes are seen by every rank at once:
the message is printed by the first rank to report it (parallel.first_report), the others stay
quiet, and a rank whose collective breaks because a peer has already failed and said why exits
quietly too (parallel.peer_failed) instead of printing "Connection closed by peer".
"""
import argparse
import contextlib
import errno
import math
import os
import shutil
import sys

import parallel


class UserError(Exception):
    """A mistake the user can fix. The message names the file, row, field or flag and what to do;
    run_command prints it alone."""


class InputError(UserError, ValueError):
    pass


class MissingInput(UserError, FileNotFoundError):
    pass


class Diverged(UserError, FloatingPointError):
    """A loss, gradient, weight or optimiser state went NaN or inf: the settings, not the code,
    are at fault; the message names the checkpoint to resume from."""


class DiskError(UserError, OSError):
    """The system refused a write: the message names the path and the cause in plain words."""


# ----------------------------------------------------------------------------------------------
# Writes the system refuses: one line naming the path and the cause, never a traceback

_WRITE_CAUSES = {
    errno.ENOSPC: "no space left on device: {path}",
    errno.EDQUOT: "disk quota exceeded: {path}",
    errno.EACCES: "cannot write {path}: permission denied",
    errno.EPERM: "cannot write {path}: permission denied",
    errno.EROFS: "cannot write {path}: read-only file system",
    errno.EIO: "cannot write {path}: input/output error (a failing disk or a lost network mount)",
}
_HINT = {errno.ENOSPC: "; free some space, then run the same command with --resume (a run) or again",
         errno.EDQUOT: "; free some space, then run the same command with --resume (a run) or again"}


def _free_bytes(path):
    """Free space for an unprivileged writer on the filesystem holding path (or its nearest
    existing parent), or None."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_cause(exc, path):
    """The errno behind a failed write of `path`, or None when it is not the system's refusal.
    Writers in C++ or Rust (torch's checkpoint writer, safetensors) lose the errno: torch reports
    a full disk as `[enforce fail at inline_container.cc] unexpected pos`, safetensors as
    `No space left on device (os error 28)`; then the text, and the free space, tell."""
    if isinstance(exc, DiskError):
        return None
    if isinstance(exc, OSError) and exc.errno in _WRITE_CAUSES:
        return exc.errno
    for inner, _ in getattr(exc, "failures", {}).values():  # dcp's CheckpointException: every rank's
        if (code := write_cause(inner, path)) is not None:
            return code
    text = str(exc)
    for code in _WRITE_CAUSES:
        if f"os error {code})" in text or os.strerror(code) in text:
            return code
    if isinstance(exc, (RuntimeError, OSError)):  # errno lost on the way: a full disk is the usual cause
        free = _free_bytes(path)
        if free is not None and free < 1 << 20:
            return errno.ENOSPC
    return None


def write_error(code, path):
    e = DiskError(_WRITE_CAUSES[code].format(path=path) + _HINT.get(code, ""))
    e.errno = code
    return e


@contextlib.contextmanager
def writing(path):
    """Around a write of `path`: a write the system refuses becomes one DiskError naming `path`
    (not the hidden temporary name the write went to). Cleaning up is the caller's."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        code = write_cause(e, path)
        if code is None:
            raise
        raise write_error(code, path) from None


# ----------------------------------------------------------------------------------------------
# Flags: checked when parsed, so a 0 never reaches a range() or a division an hour into a run

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        if os.environ.get("RANK", "0") != "0":  # every rank parses the same flags: rank 0 says it once
            sys.exit(2)
        super().error(message)


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text):
    v = _number(int, text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: need an integer >= 1")
    return v


def non_negative_int(text):
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: need an integer >= 0")
    return v


def positive_float(text):
    v = _number(float, text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: need a finite number > 0")
    return v


def probability(text):
    """(0, 1]: top-p."""
    v = _number(float, text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: need a number in (0, 1]")
    return v


def fraction(text):
    """[0, 1): the warmup share of a schedule."""
    v = _number(float, text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: need a number in [0, 1)")
    return v


def positive_list(text):
    """One positive number, or a comma-separated list of them (one per iteration)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or a comma-separated list of numbers") from None
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]:g} is not allowed: every value must be a finite number > 0")
    return values


# ----------------------------------------------------------------------------------------------
# Where the process is: for the messages of a stop it did not choose (memory ran out, a peer
# died, SIGTERM). train.py says what it is doing (doing), run_folder.record which step it logged.

WHERE = {"phase": None, "step": None, "resume": None}
_PHASES = {"sft": "training", "train": "training", "baseline": "training", "generate": "generating",
           "evaluate": "evaluating"}


def doing(phase):
    WHERE["phase"] = _PHASES.get(phase, phase)


def where():
    """'at spin1 step 10', 'while generating (after spin0 step 8)', or '' when nothing is known."""
    phase, step = WHERE["phase"], WHERE["step"]
    if phase == "training" and step:
        return f"at {step}"
    if phase:
        return f"while {phase}" + (f" (after {step})" if step else "")
    return f"after {step}" if step else ""


def resume_hint():
    """How to continue: the resume command run_folder.stop_on_sigterm recorded, else the same
    command again (generate.py keeps its finished parts)."""
    cmd = WHERE["resume"]
    return f"resume with: {cmd}" if cmd else "run the same command again to continue (finished parts are kept)"


# What lowers the memory of each phase.
_MEMORY_FLAGS = {"generating": "--gen-batch-size (prompts sampled at once)",
                 "evaluating": "--gen-batch-size (prompts scored at once)",
                 "training": "--micro-batch-size (pairs per forward), --activation-checkpointing or --max-length"}


def out_of_memory(e):
    """The one line for an allocation that failed, or None when `e` is no such failure."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()):
        return None
    prog = os.path.basename(sys.argv[0])
    phase = WHERE["phase"]
    if prog == "generate.py":
        flags = "--batch-size, --max-new-tokens or --max-length"
    else:
        flags = _MEMORY_FLAGS.get(phase, "--gen-batch-size (generation, evaluation) or --micro-batch-size, "
                                         "--activation-checkpointing (training)")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = first[first.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in first else first
    first = first.split(" bytes.")[0] + " bytes" if "tried to allocate" in first and " bytes." in first else first
    first = first if len(first) <= 160 else first[:160].rsplit(" ", 1)[0] + " ..."
    return (f"out of memory {where() or 'in this process'} ({first}): lower {flags}, or free memory; "
            f"{resume_hint()}")


def peer_died(dead):
    """The line every surviving rank prints when another rank died without a word."""
    return (f"{' and '.join(dead)} died without a word (killed, e.g. by the out-of-memory killer or a kill -9, or "
            f"crashed in native code; torchrun's summary names its exit), so rank {parallel.rank()} stopped"
            f"{' ' + where() if where() else ''}; {resume_hint()}")


# ----------------------------------------------------------------------------------------------
# The boundary

class Stopped(UserError):
    """Stopped by something outside this code: memory ran out, or another rank died."""


def _stops_named(main):
    """main(), with the failures that are no bug of this code named in one line (Stopped): a
    collective broken because a peer rank died without a word, an allocation refused."""
    try:
        main()
    except (KeyboardInterrupt, SystemExit, UserError, parallel.PeerFailed):
        raise
    except BaseException as e:
        if parallel.peer_failed():  # a peer failed and said why: this is its consequence (run_command)
            raise
        line = peer_died(dead) if (dead := parallel.dead_peers(wait=3.0)) else out_of_memory(e)
        if line is None:
            raise
        raise Stopped(line) from None


def run_command(main):
    """Run an entry point's main(). A UserError prints one line (once over all ranks) and exits 1,
    and so does a write the system refused (disk full, permission denied, read-only: an OSError
    naming its path), memory that ran out and a peer rank that died (Stopped); a rank that fails
    because another rank failed first exits 1 without a word; anything else is a bug in this code
    and keeps its traceback."""
    prog = os.path.basename(sys.argv[0])
    try:
        _stops_named(main)
    except UserError as e:
        if parallel.first_report(str(e)):
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except parallel.PeerFailed:
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C (torchrun passes it on to every worker)
        if parallel.first_report("interrupted"):
            print(f"{prog}: interrupted; --resume continues from the last checkpoint", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if e.errno in _WRITE_CAUSES and e.filename:  # refused by the system, outside a `writing` block
            # A permission error may come from a read: a file that exists and cannot be read says which.
            denied = e.errno in (errno.EACCES, errno.EPERM)
            unreadable = denied and os.path.exists(e.filename) and not os.access(e.filename, os.R_OK)
            line = f"cannot read {e.filename}: permission denied" if unreadable else str(write_error(e.errno, e.filename))
            if parallel.first_report(line):
                print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
            sys.exit(1)
        if parallel.peer_failed():
            sys.exit(1)
        parallel.first_report(None)
        raise
    except Exception:
        if parallel.peer_failed():  # e.g. a collective broken by a rank that failed and said why
            sys.exit(1)
        parallel.first_report(None)  # mark this rank's failure for the others, then the traceback
        raise
