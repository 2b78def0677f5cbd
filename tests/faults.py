"""Fault injection for the resume and divergence tests; test-only, never part of a real run.

    python -m tests.faults [--kill-at STAGE:STEP] [--nan-at STAGE:STEP[:weights]] [--kill-in-export NAME]
                           [--oom-at STAGE:STEP] [--rank R] [--entry MODULE] -- FLAGS
    python -m torch.distributed.run --nproc_per_node=2 -m tests.faults --kill-at spin1:5 -- FLAGS

runs MODULE's main (train, or experiments.arms) with FLAGS, and after the step record of
STAGE:STEP (written after that step's optimiser update):
    --kill-at   SIGKILLs this process, as an OOM killer or a lost machine would;
    --nan-at    leaves a NaN in the optimiser state, or with :weights in the first trained weight
                (row 0 of the embedding: <unk>, which no batch uses), as a bad update would;
    --oom-at    asks torch for more memory than any machine has, so the allocator's own
                "can't allocate memory" error is raised there, as on a machine that ran out.
--rank R puts the faults in rank R alone (default: every rank).
--kill-in-export NAME SIGKILLs the process halfway through writing the weights of the first export
named NAME (model: a stage's export; init: the demo's start; the file is cut to half its size),
as a kill during the export of a large model would.
The step loop knows nothing of this: torch's global optimizer-step hook remembers the optimiser
that stepped last, and run_folder.record is wrapped to watch the step records go by.
"""
import argparse
import importlib
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inject_nan(opt, weights):
    if weights:  # the first trained weight: the embedding
        t = opt.param_groups[0]["params"][0]
    else:  # the first tensor of the optimiser state
        t = next(v for v in next(iter(opt.state.values())).values()
                 if torch.is_tensor(v) and v.is_floating_point() and v.dim())
    with torch.no_grad():
        (t.to_local() if hasattr(t, "to_local") else t).view(-1)[:1].fill_(float("nan"))


def kill_in_export(name):
    import hf_folder

    save_file = hf_folder.save_file

    def half_then_kill(tensors, path, **kw):
        save_file(tensors, path, **kw)
        if not os.path.basename(os.path.dirname(path)).startswith(f".{name}."):  # the hidden folder of the export
            return
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), 9)

    hf_folder.save_file = half_then_kill


def install(kill_at=None, nan_at=None, oom_at=None):
    last = {}
    register_optimizer_step_post_hook(lambda opt, args, kwargs: last.update(opt=opt))
    record = run_folder.record

    def watching(out, rec):
        record(out, rec)
        if rec["type"] != "step":
            return
        at = f"{rec['stage']}:{rec['step']}"
        if nan_at and ":".join(nan_at.split(":")[:2]) == at:
            inject_nan(last["opt"], nan_at.split(":")[2:] == ["weights"])
        if kill_at == at:
            os.kill(os.getpid(), 9)
        if oom_at == at:
            torch.empty(1 << 60, dtype=torch.uint8)  # 1 EiB: the allocator refuses it

    run_folder.record = watching


def main():
    p = argparse.ArgumentParser(prog="tests.faults")
    p.add_argument("--kill-at", default=None)
    p.add_argument("--nan-at", default=None)
    p.add_argument("--oom-at", default=None)
    p.add_argument("--rank", default=None, help="only this rank gets the faults")
    p.add_argument("--kill-in-export", default=None, metavar="NAME")
    p.add_argument("--entry", default="train", help="the module whose main() runs: train or experiments.arms")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    a = p.parse_args()
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    if a.rank is None or a.rank == os.environ.get("RANK", "0"):
        install(a.kill_at, a.nan_at, a.oom_at)
    if a.kill_in_export and (a.rank is None or a.rank == os.environ.get("RANK", "0")):
        kill_in_export(a.kill_in_export)
    entry = importlib.import_module(a.entry)
    # The entry's error messages name it, as when it is launched directly.
    sys.argv = [os.path.join(ROOT, *a.entry.split(".")) + ".py", *flags]
    from errors import run_command
    run_command(lambda: entry.main(flags))


if __name__ == "__main__":
    main()
