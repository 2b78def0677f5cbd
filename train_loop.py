"""One training stage of SPIN, read top to bottom: its record (Stage), the optimiser, one SPIN step
on a micro-batch of (real, generated) pairs against the stored opponent log-probs, and the loop
over steps (the SFT baseline's cross-entropy step and the step record below it). stage.py runs it at scale:
the sharded model (FSDP2, LoRA adapters, kernels), checkpoints, resume and the records, put in
through the loop's two callbacks.

The global batch at step s is a fixed function of (seed, s), so 1 and N processes see the same
data and give the same losses.
"""
import resource
import time
import zlib
from dataclasses import dataclass

import torch

import parallel
from data import pairs
from errors import InputError
from settings import TrainSettings
from spin_loss import sequence_logps, spin_loss


@dataclass(kw_only=True)
class Stage:
    kind: str  # "spin" or "sft"
    init_dir: str  # the HF folder it starts from (for SPIN: the opponent p_t)
    items: list  # tokenised pairs (SPIN) or sequences (SFT)
    steps: int
    lr: float
    beta: float | None
    folder: str  # checkpoints go to folder/ckpt, the export to folder/model
    tag: str  # its name in metrics.jsonl
    optimizer: str
    settings: TrainSettings  # batch, micro-batch, clip, warmup, checkpoints, seed, loss type
    lora: object = None  # lora.LoraSettings: train these low-rank adapters instead of every parameter (stage.py)


def make_optimizer(params, name, lr, steps, warmup_ratio):
    if name == "rmsprop":  # the paper's choice; no weight decay
        opt = torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    else:  # "adamw", --optimizer's other choice
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup_ratio * steps))  # linear warmup, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    return opt, sched


def spin_micro_batch(model, micro, env, stage, per_rank):
    """Forward and backward of one SPIN micro-batch; returns its metric sums (weighted by pairs)
    and its tokens. The opponent's log-probs are the stored ones (generation scored them)."""
    b = pairs.collate_pairs(micro, pad_id=env.pad_id)
    ids, mask, tgt = (b[k].to(env.device) for k in ("input_ids", "attention_mask", "targets"))
    seq = sequence_logps(model(ids, attention_mask=mask, targets=tgt), tgt != -100)  # (2B,)
    n = len(micro)
    ref_real, ref_gen = (b[k].to(env.device) for k in pairs.OPPONENT_COLUMNS)
    loss, met = spin_loss(seq[:n], seq[n:], ref_real, ref_gen, beta=stage.beta, loss_type=stage.settings.loss_type)
    # spin_loss averages over this micro-batch's n pairs; weighting by n / per_rank makes the sum
    # over micro-batches the mean over this rank's pairs, and FSDP2's gradient reduce-scatter
    # averages over ranks: the gradient of the mean loss over the global batch, however it is split.
    (loss * n / per_rank).backward()
    sums = {"loss": loss.item() * n}
    for k in ("rewards/real", "rewards/generated", "rewards/accuracies", "logps/real", "logps/generated"):
        sums[k] = float(met[k] * n)
    sums["n"] = n
    return sums, int(mask.sum())


def split_batch(G, mb, world):
    """A global batch of G pairs as (pairs per rank, micro-batch), or the error naming the flags."""
    if G % world or (G // world) % min(mb, G // world):
        raise InputError(f"--batch-size {G} must split evenly over {world} ranks x micro-batches of "
                         f"--micro-batch-size {mb}")
    return G // world, min(mb, G // world)


def global_batch(items, G, seed, step):
    """The G items of step `step`: one permutation of the items per epoch, seeded by (seed, epoch)
    (1000003, a prime larger than any epoch count, keeps two seeds' epochs apart), cut in batches."""
    epoch, pos = divmod(step, len(items) // G)
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return [items[i] for i in torch.randperm(len(items), generator=g)[pos * G:(pos + 1) * G].tolist()]


def train_steps(model, params, opt, sched, env, stage, start, end, check, record):
    """Steps start..end-1 of the stage: each takes its global batch, splits it over the ranks and
    into micro-batches, accumulates their gradients, clips, and updates. env: the run's device
    (env.device) and pad id (env.pad_id), in a stage.StageEnv. check(step, loss,
    grad_norm) runs between the gradients and the update (stage.py: a diverged step stops there,
    and checkpoints are written only once the next step's loss vouches for them); record(rec)
    gets each step's record after the update."""
    s, rank, world = stage.settings, parallel.rank(), parallel.world()
    G = s.batch_size
    per_rank, mb = split_batch(G, s.micro_batch_size, world)
    for step in range(start, end):
        t0 = time.time()
        batch = global_batch(stage.items, G, s.seed, step)
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        # Every random draw of the step (LoRA's dropout masks) is a function of (seed, stage, step,
        # rank), so a resumed run draws what the uninterrupted one did on every rank.
        torch.manual_seed(zlib.crc32(f"{s.seed}/{stage.tag}/{step}/{rank}".encode()))
        sums, ntok = {}, 0
        for m0 in range(0, per_rank, mb):
            # FSDP2's switch (stage.py shards every trained model): reduce gradients once, at the last
            model.set_requires_gradient_sync(m0 + mb >= per_rank)
            if stage.kind == "spin":
                got, tokens = spin_micro_batch(model, mine[m0:m0 + mb], env, stage, per_rank)
            else:  # the continued-SFT baseline (below), normalised by the global batch's response tokens
                got, tokens = sft_micro_batch(model, mine[m0:m0 + mb], env, sum(len(it.real_ids) for it in batch))
            sums = {k: sums.get(k, 0.0) + v for k, v in got.items()}
            ntok += tokens
        gnorm = parallel.clip_grad_norm(params, s.clip)
        tot = parallel.reduce_sums(sums)
        loss = tot["loss"] / tot["n"]
        seconds = time.time() - t0  # the step's compute: check() may write a checkpoint
        check(step, loss, gnorm.item())
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record(step_record(stage, step, loss, lr_used, gnorm.item(), tot, ntok * world / seconds, env.device))


# ----------------------------------------------------------------------------------------------
# A step's record, the continued-SFT baseline's step, and the memory a step record reports

def step_record(stage, step, loss, lr, grad_norm, tot, tokens_per_s, device):
    rec = {"type": "step", "stage": stage.tag, "step": step + 1, "steps": stage.steps, "loss": loss,
           "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "peak_mem_mb": peak_memory_mb(device)}
    if stage.kind == "spin":
        rec.update(spin_metrics(tot, stage.beta))
    return rec


def spin_metrics(tot, beta):
    """A SPIN step's metrics from the summed pair metrics: means over the step's pairs."""
    rec = {k: tot[k] / tot["n"] for k in ("rewards/real", "rewards/generated")}
    rec["rewards/margins"] = (tot["rewards/real"] - tot["rewards/generated"]) / tot["n"]
    rec.update({k: tot[k] / tot["n"] for k in ("rewards/accuracies", "logps/real", "logps/generated")})
    rec["beta"] = beta
    return rec


def sft_micro_batch(model, micro, env, gt_tokens):
    """Cross-entropy on the ground-truth responses, normalised by the response tokens of the
    whole global batch (known to every rank), so the gradient does not depend on sharding."""
    b = pairs.collate_sft(micro, pad_id=env.pad_id)
    ids, mask, tgt = (b[k].to(env.device) for k in ("input_ids", "attention_mask", "targets"))
    nll = -model(ids, attention_mask=mask, targets=tgt).sum()
    (nll * parallel.world() / gt_tokens).backward()
    return {"loss": nll.item(), "n": (tgt != -100).sum().item()}, int(mask.sum())


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
