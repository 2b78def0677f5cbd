"""The run folder of train.py: config.json (the resolved settings, checked on --resume) and
metrics.jsonl (one line per optimiser step and per evaluation, appended by rank 0)."""
import json
import os

import parallel
from checkpoint import write_json

# Settings that --resume may change: the world size and the data order do not depend on them.
# The kernels: a run whose Triton kernel fails on some GPU continues with --kernels torch.
RESUMABLE_CHANGES = ("kernels",)


def open_run(args, world):
    """Write config.json (the resolved settings) into the run folder; returns an error message
    when the folder holds another run, or when --resume would change its settings."""
    out = args.out
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "kill_at")}
    saved = os.path.join(out, "config.json")
    if args.resume and not os.path.exists(saved):
        return f"--resume: {saved} does not exist, so there is no run to continue"
    if os.path.exists(saved):
        if not args.resume:
            return f"{out} already holds a run; pass --resume to continue it, or another --out"
        with open(saved) as f:
            old = json.load(f)
        diff = sorted(k for k in settings if old.get(k) != settings[k] and k not in RESUMABLE_CHANGES)
        if diff:
            return f"{saved}: --resume with different settings: " + ", ".join(
                f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in diff)
    os.makedirs(out, exist_ok=True)
    print(json.dumps({**settings, "world_size": world}), flush=True)
    write_json(saved, {**settings, "world_size": world}, indent=2)
    return None


def record(out, rec):
    """Append one record to metrics.jsonl (rank 0), and print a line for every 10th step."""
    if parallel.rank() != 0:
        return
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if rec["type"] == "step" and (rec["step"] % 10 == 0 or rec["step"] == rec["steps"]):
        extra = f" acc {rec['rewards/accuracies']:.2f} margin {rec['rewards/margins']:.3f}" if "rewards/margins" in rec else ""
        parallel.log(f"  {rec['stage']} step {rec['step']}/{rec['steps']} loss {rec['loss']:.4f}{extra} "
                     f"lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")
