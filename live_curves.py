"""Live training curves: `--report-to tensorboard` (and/or `wandb`, offline) sends every record
run_folder.record appends to metrics.jsonl, as it is written, from rank 0:

    step records     <kind>/loss, lr, grad_norm, tokens_per_s, rewards/accuracies, rewards/margins, ...
                     where kind is the stage tag without its iteration (sft, spin, spin_mix, ...)
    eval records     eval/<arm>/<metric> (exact match, ground-truth log-likelihood, rewards, ...)
    sft_select       sft_select/<metric>

TensorBoard's files go to <run>/tb/, W&B's offline run to <run>/wandb/ (`wandb sync` uploads it).
Both are optional dependencies: asking for one that is not installed is a one-line error at start.

One x axis for the whole run: a step of stage s is plotted at offset(s) + step, where offset(s) is
the last global step logged before s began. The offsets are a function of metrics.jsonl's order,
so a resumed run rebuilds them by replaying the file (start), and it skips every record the file
already holds (a resume repeats the steps after the last checkpoint): the curves continue
without duplicates. Each record reaches the curves after metrics.jsonl, flushed at once, so a
kill leaves the curves at most one record behind the file, never ahead of it.
"""
import atexit
import hashlib
import json
import os

from errors import UserError

BACKENDS = ("tensorboard", "wandb")


class Curves:
    def __init__(self, out, backends):
        self.out, self.writers = out, []
        self.offsets = {}  # stage tag -> global step before its first step
        self.last = 0  # the largest global step so far
        self.seen = set()  # keys of the records already logged (replayed from metrics.jsonl)
        path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    self.seen.add(self._place(rec)[0])
        for name in backends:
            self.writers.append(_OPEN[name](out))

    def _place(self, rec):
        """(key identifying the record, global step) for a record; advances the offsets."""
        if rec.get("type") in ("step", "sft_select"):
            tag = rec["stage"]
            if tag not in self.offsets:
                self.offsets[tag] = self.last
            g = self.offsets[tag] + rec["step"]
            self.last = max(self.last, g)
            return (rec["type"], tag, rec["step"]), g
        if rec.get("type") == "eval":
            return ("eval", rec.get("arm"), rec.get("iteration")), self.last
        return None, self.last

    def log(self, rec):
        key, g = self._place(rec)
        if key is None or key in self.seen:
            return
        self.seen.add(key)
        if rec["type"] == "step":
            prefix = rec["stage"].rstrip("0123456789")
        elif rec["type"] == "eval":
            prefix = f"eval/{rec['arm']}"
        else:
            prefix = rec["type"]
        skip = ("step", "steps", "iteration")
        scalars = {f"{prefix}/{k}": float(v) for k, v in rec.items()
                   if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for w in self.writers:
            w.log(scalars, g)

    def close(self):
        for w in self.writers:
            w.close()


class _TensorBoard:
    def __init__(self, out):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.w = SummaryWriter(os.path.join(out, "tb"))

    def log(self, scalars, step):
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self):
        self.w.close()


class _WandB:
    def __init__(self, out):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
        # Offline: nothing leaves the machine; `wandb sync <run>/wandb/offline-run-*` uploads it.
        # The id is the run folder's, so a resumed run continues the same W&B run.
        name = os.path.basename(os.path.normpath(out))
        run_id = hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:12]
        self.run = wandb.init(project="spin", name=name, id=run_id, resume="allow", dir=out, mode="offline")

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB}
_ACTIVE = {}  # run folder -> Curves, on rank 0 of a run started with --report-to


def start(out, backends):
    """Open the curves of the run folder `out` (rank 0, once the folder is locked). Every record
    is flushed as it is logged; closing at exit only ends the W&B run cleanly."""
    if backends:
        curves = _ACTIVE[os.path.abspath(out)] = Curves(out, backends)
        atexit.register(curves.close)


def log(out, rec):
    """run_folder.record's hook: send `rec` to the run's curves, if it has any."""
    curves = _ACTIVE.get(os.path.abspath(out))
    if curves is not None:
        curves.log(rec)
