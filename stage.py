"""One training stage at scale, from a Hugging Face folder to a Hugging Face folder: train_loop.py's
stage (SPIN on (real, generated) pairs against stored opponent log-probs, or SFT on the ground
truth) on a sharded model, with checkpoints, resume, divergence checks, the step records and the
export. train.py describes each stage with a `Stage` (train_loop.py) and calls `run_stage` with the
run's `StageEnv` (below).

Model set-up follows a fixed order (as torchtitan): build on meta -> activation checkpointing ->
fully_shard each block -> fully_shard the root -> allocate the shards -> load the weights.
Parameters stay fp32 (the optimiser's master copy); on GPUs compute runs in bf16 and gradients
are reduced in fp32.
"""
import dataclasses
import math
import os
import shutil

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import lora
import parallel
import run_folder
import spin_kernels
from checkpoint import check_finite, last_checkpoint, load_ckpt, resume_hint, save_ckpt
from errors import Diverged, InputError
from hf_folder import export, load_model, read_config
from model import Mistral
from parallel import log
# The stage itself, read on SPIN's path (train_loop.py); what this file adds runs it at scale.
from sampler import score
from train_loop import (Stage, make_optimizer, peak_memory_mb, sft_micro_batch,  # noqa: F401
                        spin_metrics, spin_micro_batch, split_batch, train_steps)


@dataclasses.dataclass(frozen=True)
class StageEnv:
    """What every stage of a run shares, beyond its own Stage: where it computes and where its
    results go (train.Run.env builds it once; train_loop reads device and pad_id)."""
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


def train_stage(env, stage, stop_at=None):
    """train_loop.train_steps on a sharded copy of stage.init_dir, resumed from the stage's last
    checkpoint, with the run's checks: a diverged step stops the run, checkpoints are written
    once the next step vouches for them, every step goes to metrics.jsonl. stop_at: stop after
    this many steps, checkpointed, to be continued (experiments/arms.py's SFT selection).
    Returns the trained (sharded) model and its config."""
    s = stage.settings
    G = s.batch_size
    split_batch(G, s.micro_batch_size, parallel.world())
    if len(stage.items) // G == 0:
        raise InputError(f"{stage.tag}: {len(stage.items)} examples is fewer than one global batch of {G}: "
                         "pass a smaller --batch-size or more data")
    model, config = build_model(stage.init_dir, s, env.compute, env.device, env.kernels, stage.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, stage.optimizer, stage.lr, stage.steps, s.warmup_ratio)
    start = load_ckpt(stage.folder, model, opt, sched)
    record = lambda rec: run_folder.record(env.out, rec)  # noqa: E731
    if s.live_reference and stage.kind == "spin":
        stage, diff = live_reference(env, stage)
        record = lambda rec: run_folder.record(env.out, rec | {"live_reference_max_abs_diff": diff})  # noqa: E731
    end = stage.steps if stop_at is None else min(stop_at, stage.steps)

    def check(step, loss, grad_norm):
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise Diverged(f"{stage.tag} step {step + 1}: loss {loss}, grad norm {grad_norm}: stopped before "
                           "this update. " + resume_hint(stage.folder, last_checkpoint(stage.folder)))
        if step > start and step % s.ckpt_every == 0:
            # The checkpoint of `step` updates is written only now that those weights have given a
            # finite loss and gradient on the next batch (save_ckpt also checks every value), so
            # a checkpoint on disk is one a resume can continue from.
            save_ckpt(stage.folder, step, model, opt, sched)

    train_steps(model, params, opt, sched, env, stage, start, end, check, record)
    # The last updates have no next loss to vouch for them (a NaN in an embedding row no batch
    # uses shows in no loss): the weights are checked before they become the next opponent.
    check_finite(dict(model.named_parameters()), stage.folder, f"{stage.tag} step {end}",
                 "its model was not exported")
    if end < stage.steps and end > start:  # a pause (stop_at): the next call continues from here
        save_ckpt(stage.folder, end, model, opt, sched)
    return model, config


def live_reference(env, stage):
    """--live-reference: the opponent p_t, loaded from stage.init_dir as the official code keeps
    its reference model, scores every pair again; the stage then trains against these log-probs,
    and each step record carries their largest gap to the stored ones (a check of generation's
    scoring). The opponent is frozen, so one pass before the steps gives what a resident copy
    would give at every step. Returns (the stage with the recomputed log-probs, the gap)."""
    opponent = spin_kernels.install(load_model(stage.init_dir, device=env.device, dtype=env.compute), env.kernels)
    items, n = stage.items, len(stage.items)
    logps = score(opponent, [it.prompt_ids for it in items] * 2,  # the real answers, then the generated ones
                  [it.real_ids for it in items] + [it.generated_ids for it in items],
                  batch_size=stage.settings.micro_batch_size)
    diff = max(abs(lp - stored) for lp, stored in zip(logps, [it.ref_real_logps for it in items]
                                                      + [it.ref_generated_logps for it in items]))
    items = [dataclasses.replace(it, ref_real_logps=logps[j], ref_generated_logps=logps[n + j])
             for j, it in enumerate(items)]
    log(f"[{stage.tag}] --live-reference: the opponent's log-probs recomputed; largest gap to the stored "
        f"ones {diff:.2e}")
    return dataclasses.replace(stage, items=items), diff


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
