"""train.py's command line: its flags, the two presets they default to, and the checks between
flags, so a mistake is one line naming the flag (errors.ArgumentParser) before any work starts.
resolve() turns the parsed flags into the typed settings of settings.py, which is all that the
code below train.main sees."""
import argparse
import os
import time
from dataclasses import replace

import demo
from settings import (Config, DataConfig, DemoConfig, GenConfig, Preset, RunConfig, SftConfig, SpinConfig,
                    TrainSettings)
import live_curves
from data import task
from errors import (ArgumentParser, fraction, non_negative_int, positive_float, positive_int, positive_list,
                    probability)
from lora import LoraSettings

# Two presets. Flags left unset take the preset's value: the paper's recipe when --model is
# given, the embedded CPU demo otherwise (demo.DEFAULTS, chosen by EXPERIMENTS.md's sweep).
RECIPE = Preset(iterations=4, beta=[0.1, 0.1, 0.1, 5.0], lr=[5e-7, 5e-7, 1e-7, 1e-7], epochs=2.0,
                batch_size=64, micro_batch_size=1, optimizer="rmsprop", max_new_tokens=256,
                temperature=1.0, max_length=1024, max_prompt_length=512, mix_previous=True,
                eval_prompts=500, baseline=False, ckpt_every=200, gen_batch_size=32)


# The recipe's lengths are the most it uses: left unset, each is cut to what the model's positions
# hold (fit_lengths), so the defaults fit any model; a length given is kept, and checked.
FITTED = ("max_length", "max_prompt_length", "max_new_tokens")


def fit_lengths(cfg, positions):
    """cfg with the lengths left unset (None, the recipe's) fitted to a model of `positions`
    positions, and a note naming those cut below the recipe's (or None)."""
    d, g = cfg.data, cfg.gen
    ml = d.max_length if d.max_length is not None else min(RECIPE.max_length, positions)
    mpl = d.max_prompt_length if d.max_prompt_length is not None else \
        min(RECIPE.max_prompt_length, ml // 2, positions // 2)
    mnt = g.max_new_tokens if g.max_new_tokens is not None else max(1, min(RECIPE.max_new_tokens, positions - mpl))
    got = {"max_length": ml, "max_prompt_length": mpl, "max_new_tokens": mnt}
    cut = [f"--{k.replace('_', '-')} {got[k]}" for k in FITTED
           if (d.max_length, d.max_prompt_length, g.max_new_tokens)[FITTED.index(k)] is None
           and got[k] != getattr(RECIPE, k)]
    cfg = replace(cfg, data=replace(d, max_length=ml, max_prompt_length=mpl), gen=replace(g, max_new_tokens=mnt))
    return cfg, (f"the model has {positions} positions: the recipe's lengths fitted to them: {', '.join(cut)}"
                 if cut else None)


def report_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in live_curves.BACKENDS]
    if bad or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(live_curves.BACKENDS)}")
    return names


def add_run_model_data(p):
    # run
    p.add_argument("--out", default=None, help="run folder (default runs/spin-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--report-to", type=report_list, default=None,
                   help="comma list of tensorboard, wandb: live curves of every step and evaluation, under --out "
                        "(tb/, wandb/; W&B offline); optional packages (live_curves.py)")
    # model
    p.add_argument("--model", default=None,
                   help="HF folder (config.json, *.safetensors, tokenizer.json or tokenizer.model); none = embedded demo")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (default: the model's own, else Zephyr's); copied into exports")
    p.add_argument("--dtype", default=None, help="parameter dtype for compute (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                   help="auto: Triton kernels on GPUs, torch paths on CPUs; torch: the torch paths "
                        "everywhere (default: SPIN_KERNELS, else auto; a run may be resumed with another value)")
    # data
    p.add_argument("--data", default=None, help="training prompts with ground truth (parquet/jsonl)")
    p.add_argument("--eval-data", default=None, help="held-out file (default: a split of --data, at most a tenth)")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="sample this many training prompts")
    p.add_argument("--eval-prompts", type=positive_int, default=None)
    p.add_argument("--max-length", type=positive_int, default=None)
    p.add_argument("--max-prompt-length", type=positive_int, default=None)
    p.add_argument("--on-bad-row", choices=["raise", "skip"], default="raise")
    p.add_argument("--mix-previous", type=int, default=None, choices=[0, 1],
                   help="iteration t also trains on iteration t-1's synthetic data (official recipe)")


def add_spin_lora_generation(p):
    # SPIN optimisation
    p.add_argument("--iterations", type=positive_int, default=None)
    p.add_argument("--beta", type=positive_list, default=None, help="one value or a comma list per iteration")
    p.add_argument("--lr", type=positive_list, default=None, help="one value or a comma list per iteration")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "hinge"])
    p.add_argument("--epochs", type=positive_float, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch, in pairs")
    p.add_argument("--micro-batch-size", type=positive_int, default=None, help="pairs per rank per forward")
    p.add_argument("--optimizer", default=None, choices=["rmsprop", "adamw"])
    p.add_argument("--warmup-ratio", type=fraction, default=0.1)
    p.add_argument("--clip", type=positive_float, default=1.0)
    p.add_argument("--live-reference", action="store_true", help="score every pair again with the opponent before training, as a check of the stored log-probs")
    # LoRA (lora.py): SPIN iterations and the baseline train low-rank adapters on a frozen base
    p.add_argument("--lora-rank", type=non_negative_int, default=0, help="adapter rank r; 0 = train every parameter")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="updates are scaled by alpha/r (default 2r)")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="comma list of q, k, v, o, gate, up, down")
    p.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the adapters' input")
    # generation
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.add_argument("--temperature", type=positive_float, default=None)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0)
    p.add_argument("--gen-batch-size", type=positive_int, default=None)
    # checkpoints
    p.add_argument("--ckpt-every", type=positive_int, default=None, help="optimiser steps between checkpoints")


def add_sft_demo(p):
    # SFT: warm start of the demo, and the continued-SFT baseline
    p.add_argument("--sft", action="store_true", help="only run SFT on --data (cross-entropy on the ground truth)")
    p.add_argument("--sft-steps", type=positive_int, default=None)
    p.add_argument("--sft-lr", type=positive_float, default=None)
    p.add_argument("--sft-optimizer", default="adamw", choices=["rmsprop", "adamw"],
                   help="optimiser of the demo's warm start (--sft runs too); the baseline uses --optimizer")
    p.add_argument("--baseline", type=int, default=None, choices=[0, 1],
                   help="also run continued SFT with the same number of steps, as the baseline")
    # embedded demo
    p.add_argument("--demo-dim", type=positive_int, default=None)
    p.add_argument("--demo-layers", type=positive_int, default=None)
    p.add_argument("--vocab", type=positive_int, default=None, help="demo tokenizer vocabulary size")
    p.add_argument("--task", choices=task.KINDS, default=None, help="demo task (data/task.py)")
    p.add_argument("--task-digits", type=positive_int, default=None, help="demo task: size of its numbers")


def resolve(p, args):
    """Fill the preset's values in, refuse combinations of flags that cannot work, and return the
    typed settings. Study flags (experiments/arms.py adds them to the parser) may be present."""
    is_demo = args.model is None
    if not is_demo and (args.task or args.task_digits or getattr(args, "val_prompts", None)):
        p.error("--task, --task-digits and --val-prompts belong to the embedded demo (no --model)")
    preset = demo.DEFAULTS if is_demo else RECIPE
    for k, v in vars(preset).items():
        if getattr(args, k, None) is None and (is_demo or k not in FITTED):  # FITTED: fit_lengths, later
            setattr(args, k, v)
    if not is_demo and not args.data:
        p.error("--model needs --data (training prompts with ground truth)")
    if is_demo and (args.data or args.eval_data):
        p.error("--data needs --model: without --model train.py runs the embedded demo")
    if args.sft and (args.sft_steps is None or args.sft_lr is None):
        p.error("--sft needs --sft-steps and --sft-lr")
    if args.resume and args.out is None:
        p.error("--resume needs --out (the run folder to continue)")
    lora = None
    if args.lora_rank:
        try:
            lora = LoraSettings.from_flags(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank,
                                           args.lora_targets, args.lora_dropout)
        except ValueError as e:
            p.error(str(e))
    out = args.out or os.path.join("runs", "spin-" + time.strftime("%Y%m%d-%H%M%S"))
    return Config(
        run=RunConfig(out=out, resume=args.resume, seed=args.seed, kernels=args.kernels, model=args.model,
                      chat_template=args.chat_template, dtype=args.dtype, report_to=args.report_to),
        data=DataConfig(data=args.data, eval_data=args.eval_data, num_prompts=args.num_prompts,
                        eval_prompts=args.eval_prompts, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length, on_bad_row=args.on_bad_row,
                        mix_previous=bool(args.mix_previous)),
        train=TrainSettings(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                            warmup_ratio=args.warmup_ratio, clip=args.clip, ckpt_every=args.ckpt_every,
                            seed=args.seed, activation_checkpointing=args.activation_checkpointing,
                            loss_type=args.loss_type, live_reference=args.live_reference),
        spin=SpinConfig(iterations=args.iterations, beta=list(args.beta), lr=list(args.lr), epochs=args.epochs,
                        optimizer=args.optimizer, baseline=bool(args.baseline)),
        gen=GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, gen_batch_size=args.gen_batch_size),
        sft=SftConfig(sft=args.sft, sft_steps=args.sft_steps, sft_lr=args.sft_lr, sft_optimizer=args.sft_optimizer),
        demo=DemoConfig(demo_dim=args.demo_dim, demo_layers=args.demo_layers, vocab=args.vocab, task=args.task,
                        task_digits=args.task_digits, val_prompts=args.val_prompts) if is_demo else None,
        lora=lora)


def parser():
    p = ArgumentParser(description="SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji, Gu; ICML 2024; arXiv 2401.01335), end to end.")
    add_run_model_data(p)
    add_spin_lora_generation(p)
    add_sft_demo(p)
    return p


def parse_args(argv=None):
    """train.py's flags -> settings.Config."""
    p = parser()
    return resolve(p, p.parse_args(argv))
