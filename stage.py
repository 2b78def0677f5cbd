"""One training stage under FSDP2, from a Hugging Face folder to a Hugging Face folder: SPIN on
(real, generated) pairs against stored opponent log-probs, or SFT (cross-entropy on the ground
truth). train.py describes each stage with a `Stage` (its data, steps, learning rate and the
run's settings.TrainSettings) and calls `run_stage` with the run's `StageEnv` (below): where a
stage computes and where its results go, nothing else of the run.

Model set-up follows a fixed order (as torchtitan): build on meta -> activation checkpointing ->
fully_shard each block -> fully_shard the root -> allocate the shards -> load the weights.
Parameters stay fp32 (the optimiser's master copy); on GPUs compute runs in bf16 and gradients
are reduced in fp32. The global batch at step s is a fixed function of (seed, s), so 1 and N
processes see the same data and give the same losses.
"""
import math
import os
import resource
import shutil
import time
import zlib
from dataclasses import dataclass

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import lora
import parallel
import run_folder
import spin_kernels
from checkpoint import check_finite, last_checkpoint, load_ckpt, resume_hint, save_ckpt
from settings import TrainSettings
from data import pairs
from errors import Diverged, InputError
from lora import LoraSettings
from hf_folder import export, load_model, read_config
from model import Mistral
from parallel import log
from spin_loss import mixture_reference, sequence_logps, spin_loss


@dataclass(frozen=True)
class StageEnv:
    """What every stage of a run shares, beyond its own Stage: where it computes and where its
    results go (train.Run.env builds it once)."""
    device: torch.device
    compute: torch.dtype  # the run's compute dtype (train.compute_dtype)
    kernels: str  # what spin_kernels.install puts into every model (--kernels)
    pad_id: int  # the tokenizer's EOS, which pads batches (never attended, never scored)
    out: str  # the run folder: metrics.jsonl
    tok_files: dict  # {name in an export: source path}: the tokenizer files and chat template
    export_dtype: torch.dtype  # exports are written in the starting checkpoint's dtype


def build_model(folder, settings, compute, device, impl, lora_settings=None):
    """A sharded, trainable copy of the HF folder; compute: the run's compute dtype (train.compute_dtype);
    impl: the kernels (spin_kernels.install)."""
    config = read_config(folder)
    with torch.device("meta"):
        model = Mistral(config)
    fresh = {}
    if lora_settings is not None:
        # LoRA first: the adapters belong to the blocks that checkpointing wraps and fully_shard
        # shards, so frozen and trainable parameters share FSDP units (FSDP2 shards each parameter
        # on its own; only the trainable ones must share a dtype). The frozen base is stored in
        # the compute dtype (bf16 on GPUs: half the memory); the adapters stay fp32. Their starting
        # values are drawn in full on rank 0 and arrive with the base weights, so they do not
        # depend on the number of ranks.
        lora.add_adapters(model, lora_settings)
        lora.cast_frozen_(model, compute)
        if parallel.rank() == 0:
            fresh = lora.initial_adapters(model, torch.Generator().manual_seed(settings.seed))
    # The fast paths go in before checkpointing and fully_shard wrap the modules (FSDP keeps the
    # modules it wraps): on CPUs the chunked log-prob head, on GPUs the Triton kernels.
    spin_kernels.install(model, impl)
    if settings.activation_checkpointing:
        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(block)
    # Trained parameters stay fp32 (the optimiser's master copy); on GPUs compute runs in bf16 and
    # gradients are reduced in fp32.
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    # Only rank 0 reads the files; the shards arrive by broadcast, so no rank holds two copies.
    full = {}
    if parallel.rank() == 0:
        full = load_model(folder, dtype=torch.float32, device="cpu").state_dict() | fresh
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, config


# ----------------------------------------------------------------------------------------------
# One stage

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
    lora: LoraSettings | None = None  # train these low-rank adapters instead of every parameter
    mix_alpha: float = 0.0  # SPIN against the geometric mixture of p_t and the base (spin_loss alpha)
    stop_at: int | None = None  # stop after this many steps, checkpointed, to be continued (SFT selection)


def make_optimizer(params, name, lr, steps, warmup_ratio):
    if name == "rmsprop":  # the paper's choice; no weight decay
        opt = torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup_ratio * steps))  # linear warmup, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    return opt, sched


def spin_micro_batch(model, micro, env, stage, live, n_local):
    """Forward and backward of one SPIN micro-batch; returns its metric sums (weighted by pairs)."""
    b = pairs.collate_pairs(micro, pad_id=env.pad_id)
    ids, mask, tgt = (b[k].to(env.device) for k in ("input_ids", "attention_mask", "targets"))
    seq = sequence_logps(model(ids, attention_mask=mask, targets=tgt), tgt != -100)  # (2B,)
    n = len(micro)
    ref_real, ref_gen = (b[k].to(env.device) for k in pairs.OPPONENT_COLUMNS)
    sums = {}
    if live is not None:  # the opponent recomputed by a resident copy: a check of the stored values
        with torch.no_grad():
            ref = sequence_logps(live(ids, attention_mask=mask, targets=tgt), tgt != -100)
        sums["live_diff"] = torch.cat([ref[:n] - ref_real, ref[n:] - ref_gen]).abs().max().item()
        ref_real, ref_gen = ref[:n], ref[n:]
    if stage.mix_alpha > 0:  # the base (SFT start) model's log-probs, stored by generate.rescore
        base_real, base_gen = (b[k].to(env.device) for k in pairs.BASE_COLUMNS)
        ref_real, ref_gen = mixture_reference(ref_real, ref_gen, base_real, base_gen, stage.mix_alpha)
    loss, met = spin_loss(seq[:n], seq[n:], ref_real, ref_gen, beta=stage.beta, loss_type=stage.settings.loss_type)
    # spin_loss averages over this micro-batch's n pairs; weighting by n / n_local makes the sum over
    # micro-batches the mean over this rank's pairs, and FSDP2's gradient reduce-scatter averages
    # over ranks: the gradient of the mean loss over the global batch, however it is split.
    (loss * n / n_local).backward()
    sums["loss"] = loss.item() * n
    for k in ("rewards/real", "rewards/generated", "rewards/accuracies", "logps/real", "logps/generated"):
        sums[k] = float(met[k] * n)
    sums["n"] = n
    return sums, int(mask.sum())


def sft_micro_batch(model, micro, env, gt_tokens):
    """Cross-entropy on the ground-truth responses, normalised by the response tokens of the
    whole global batch (known to every rank), so the gradient does not depend on sharding."""
    b = pairs.collate_sft(micro, pad_id=env.pad_id)
    ids, mask, tgt = (b[k].to(env.device) for k in ("input_ids", "attention_mask", "targets"))
    nll = -model(ids, attention_mask=mask, targets=tgt).sum()
    (nll * parallel.world() / gt_tokens).backward()
    return {"loss": nll.item(), "n": (tgt != -100).sum().item()}, int(mask.sum())


def split_batch(G, mb, world):
    """A global batch of G pairs as (pairs per rank, micro-batch), or the error naming the flags."""
    if G % world or (G // world) % min(mb, G // world):
        raise InputError(f"--batch-size {G} must split evenly over {world} ranks x micro-batches of "
                         f"--micro-batch-size {mb}")
    return G // world, min(mb, G // world)


def train_stage(env, stage):
    """The global batch at step s is a fixed function of (seed, s), so 1 and N processes see the
    same data and give the same losses. Returns the trained (sharded) model and its config."""
    s, rank, world = stage.settings, parallel.rank(), parallel.world()
    G = s.batch_size
    local, mb = split_batch(G, s.micro_batch_size, world)
    per_epoch = len(stage.items) // G
    if per_epoch == 0:
        raise InputError(f"{stage.tag}: {len(stage.items)} examples is fewer than one global batch of {G}: "
                         "pass a smaller --batch-size or more data")
    model, config = build_model(stage.init_dir, s, env.compute, env.device, env.kernels, stage.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, stage.optimizer, stage.lr, stage.steps, s.warmup_ratio)
    start = load_ckpt(stage.folder, model, opt, sched)
    live = None
    if s.live_reference and stage.kind == "spin":
        live = spin_kernels.install(load_model(stage.init_dir, device=env.device, dtype=env.compute), env.kernels)
    end = stage.steps if stage.stop_at is None else min(stage.stop_at, stage.steps)
    for step in range(start, end):
        t0 = time.time()
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(s.seed * 1000003 + epoch)
        batch = [stage.items[i] for i in torch.randperm(len(stage.items), generator=g)[pos * G:(pos + 1) * G].tolist()]
        mine = batch[rank * local:(rank + 1) * local]
        # Every random draw of the step (LoRA's dropout masks) is a function of (seed, stage, step,
        # rank) too, so a resumed run draws what the uninterrupted one did on every rank.
        torch.manual_seed(zlib.crc32(f"{s.seed}/{stage.tag}/{step}/{rank}".encode()))
        gt_tokens = sum(len(it.real_ids) for it in batch)
        sums, live_diff, ntok = {}, 0.0, 0
        for m0 in range(0, local, mb):
            model.set_requires_gradient_sync(m0 + mb >= local)  # reduce gradients once, at the last
            if stage.kind == "spin":
                got, n = spin_micro_batch(model, mine[m0:m0 + mb], env, stage, live, local)
                live_diff = max(live_diff, got.pop("live_diff", 0.0))
            else:
                got, n = sft_micro_batch(model, mine[m0:m0 + mb], env, gt_tokens)
            sums = {k: sums.get(k, 0.0) + v for k, v in got.items()}
            ntok += n
        gnorm = parallel.clip_grad_norm(params, s.clip)
        tot = parallel.reduce_sums(sums)
        loss = tot["loss"] / tot["n"]
        if not math.isfinite(loss) or not math.isfinite(gnorm.item()):
            raise Diverged(f"{stage.tag} step {step + 1}: loss {loss}, grad norm {gnorm.item()}: stopped before "
                           "this update. " + resume_hint(stage.folder, last_checkpoint(stage.folder)))
        if step > start and step % s.ckpt_every == 0:
            # The checkpoint of `step` updates is written only now that those weights have given a
            # finite loss and gradient on the next batch (save_ckpt also checks every value), so
            # a checkpoint on disk is one a resume can continue from.
            t_save = time.time()
            save_ckpt(stage.folder, step, model, opt, sched)
            t0 += time.time() - t_save
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"type": "step", "stage": stage.tag, "step": step + 1, "steps": stage.steps, "loss": loss,
               "lr": lr_used, "grad_norm": gnorm.item(), "tokens_per_s": ntok * world / (time.time() - t0),
               "peak_mem_mb": peak_memory_mb(env.device)}
        if stage.kind == "spin":
            rec.update(spin_metrics(tot, stage.beta))
            if live is not None:
                rec["live_reference_max_abs_diff"] = parallel.reduce_sums({"d": live_diff}, op="max")["d"]
        run_folder.record(env.out, rec)
    # The last updates have no next loss to vouch for them (a NaN in an embedding row no batch
    # uses shows in no loss): the weights are checked before they become the next opponent.
    check_finite(dict(model.named_parameters()), stage.folder, f"{stage.tag} step {end}",
                 "its model was not exported")
    if end < stage.steps and end > start:  # a pause (stop_at): the next call continues from here
        save_ckpt(stage.folder, end, model, opt, sched)
    return model, config


def spin_metrics(tot, beta):
    """A step's record from the summed pair metrics: means over the step's pairs."""
    rec = {k: tot[k] / tot["n"] for k in ("rewards/real", "rewards/generated")}
    rec["rewards/margins"] = (tot["rewards/real"] - tot["rewards/generated"]) / tot["n"]
    rec.update({k: tot[k] / tot["n"] for k in ("rewards/accuracies", "logps/real", "logps/generated")})
    rec["beta"] = beta
    return rec


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_stage(env, stage):
    """Train and export a stage, unless its export exists (a finished stage is skipped)."""
    model_dir = os.path.join(stage.folder, "model")
    if not os.path.exists(model_dir):
        os.makedirs(stage.folder, exist_ok=True)
        log(f"[{stage.tag}] {stage.kind}: {stage.steps} steps from {stage.init_dir}")
        model, config = train_stage(env, stage)
        if stage.lora is None:
            export(model, config, model_dir, env.tok_files, env.export_dtype)
        else:  # folder/adapter (PEFT), then folder/model: the merged model, the next opponent
            lora.export(model, config, stage.lora, stage.folder, env.tok_files, env.export_dtype,
                        stage.init_dir)
        del model
        # The export is the stage's result; its checkpoints (weights plus optimiser state,
        # ~16 bytes a parameter) only served a resume.
        parallel.on_rank0(lambda: shutil.rmtree(os.path.join(stage.folder, "ckpt"), ignore_errors=True))
    return model_dir
