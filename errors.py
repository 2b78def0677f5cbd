"""What a user sees when something they gave is wrong: one line naming the file, row, field or
flag and what to do, never a traceback. What a developer sees when the code is wrong: the
traceback, as always.

    UserError        a mistake the user can fix (bad data, flag, model folder, checkpoint, a
                     run folder another run holds, a run that diverged). Modules raise one of
    InputError       ... bad content (a ValueError, so older `except ValueError` still works)
    MissingInput     ... a file or folder that is not there (a FileNotFoundError)
    Diverged         ... a training stage that went NaN/inf (the message names the checkpoint to resume from)
    ArgumentParser   argparse, except that under torchrun only rank 0 prints a flag error
    positive_int ... argparse `type=` checks that name the flag (argparse adds "argument --x:")
    run_command      the boundary every entry point (train.py, generate.py, report.py) runs in

Under torchrun every rank runs the same code, so most mistakes are seen by every rank at once:
the message is printed by the first rank to report it (parallel.first_report), the others stay
quiet, and a rank whose collective breaks because a peer has already failed and said why exits
quietly too (parallel.peer_failed) instead of printing "Connection closed by peer".
"""
import argparse
import math
import os
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
# The boundary

def run_command(main):
    """Run an entry point's main(). A UserError prints one line (once over all ranks) and exits 1;
    a rank that fails because another rank failed first exits 1 without a word; anything else
    is a bug in this code and keeps its traceback."""
    prog = os.path.basename(sys.argv[0])
    try:
        main()
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
    except Exception:
        if parallel.peer_failed():  # e.g. a collective broken by a rank that failed and said why
            sys.exit(1)
        parallel.first_report(None)  # mark this rank's failure for the others, then the traceback
        raise
