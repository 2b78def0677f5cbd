"""train.py's command line: its flags, the two presets they default to, and the checks between
flags, so a mistake is one line naming the flag (errors.ArgumentParser) before any work starts."""
import argparse
import os
import time

import demo
import live_curves
from data import task
from errors import (ArgumentParser, fraction, non_negative_int, positive_float, positive_int, positive_list,
                    probability)
from lora import LoraSettings

# Two presets. Flags left unset take the preset's value: the paper's recipe when --model is
# given, the embedded CPU demo otherwise (demo.DEFAULTS, chosen by EXPERIMENTS.md's sweep).
RECIPE = dict(iterations=4, beta="0.1,0.1,0.1,5.0", lr="5e-7,5e-7,1e-7,1e-7", epochs=2.0,
              batch_size=64, micro_batch_size=1, optimizer="rmsprop", max_new_tokens=256,
              temperature=1.0, max_length=1024, max_prompt_length=512, mix_previous=True,
              eval_prompts=500, baseline=False, ckpt_every=200, gen_batch_size=32)

# The arms of a comparison and where their iterations live. Each starts from the SFT start.
ARMS = {
    "spin": "",  # the paper's SPIN: iter{t}/
    "sft": "baseline",  # continued SFT on the ground truth, the paper's baseline
    "spin_mix": "spin_mix",  # SPIN against p_base^alpha * p_t^(1-alpha) (Alami et al. 2024; spin_loss)
    "spin_drop": "spin_drop",  # SPIN without the pairs whose sample the task's verifier accepts
}


def arm_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ARMS]
    if bad or not names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of distinct arms among {', '.join(ARMS)}")
    return names


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
                        "everywhere (sets SPIN_KERNELS; a run may be resumed with another value)")
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
    p.add_argument("--live-reference", action="store_true", help="score with a resident opponent model too, as a check")
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


def add_sft_arms_demo(p):
    # SFT: warm start of the demo, and the continued-SFT baseline
    p.add_argument("--sft", action="store_true", help="only run SFT on --data (cross-entropy on the ground truth)")
    p.add_argument("--sft-steps", type=positive_int, default=None)
    p.add_argument("--sft-lr", type=positive_float, default=None)
    p.add_argument("--sft-optimizer", default="adamw", choices=["rmsprop", "adamw"],
                   help="optimiser of the demo's warm start (--sft runs too); the baseline uses --optimizer")
    p.add_argument("--baseline", type=int, default=None, choices=[0, 1],
                   help="also run continued SFT with the same number of steps, as the baseline")
    p.add_argument("--sft-eval-every", type=non_negative_int, default=0,
                   help="SFT: score the model on the validation prompts every N steps, keep the best, stop after "
                        "--sft-patience scores without a better one (0: train --sft-steps and keep the last)")
    p.add_argument("--sft-patience", type=positive_int, default=5)
    p.add_argument("--sft-select", choices=["exact_match", "gt_logp"], default="exact_match",
                   help="what --sft-eval-every maximises: greedy exact match (needs the demo's task) or the "
                        "ground-truth log-likelihood per token")
    p.add_argument("--val-data", default=None,
                   help="validation prompts for --sft-eval-every (the demo draws --val-prompts from its task)")
    # comparisons from one start (EXPERIMENTS.md): every arm runs --iterations iterations from the SFT
    # start with the same training prompts and the same number of optimiser steps per iteration
    p.add_argument("--arms", type=arm_list, default=None,
                   help=f"comma list of {', '.join(ARMS)} (default: spin, and sft with --baseline 1)")
    p.add_argument("--mix-alpha", type=probability, default=0.5,
                   help="spin_mix: weight of the SFT start in the geometric-mixture reference (spin_loss alpha)")
    # embedded demo
    p.add_argument("--demo-dim", type=positive_int, default=None)
    p.add_argument("--demo-layers", type=positive_int, default=None)
    p.add_argument("--vocab", type=positive_int, default=None, help="demo tokenizer vocabulary size")
    p.add_argument("--task", choices=task.KINDS, default=None, help="demo task (data/task.py)")
    p.add_argument("--task-digits", type=positive_int, default=None, help="demo task: size of its numbers")
    p.add_argument("--val-prompts", type=non_negative_int, default=None,
                   help="demo: validation prompts drawn from the task, disjoint from training and held-out")
    # fault injection for the resume tests: SIGKILL this process after STAGE:STEP; a NaN in the
    # optimiser state (STAGE:STEP) or in a weight (STAGE:STEP:weights) after the update of STAGE:STEP
    p.add_argument("--kill-at", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nan-at", default=None, help=argparse.SUPPRESS)


def check(p, args):
    """Fill the preset's values in and refuse combinations of flags that cannot work."""
    args.demo = args.model is None
    if args.arms is not None and args.baseline is not None:
        p.error("--arms and --baseline both choose the arms: give one (--arms spin,sft is --baseline 1)")
    if not args.demo and (args.task or args.task_digits or args.val_prompts):
        p.error("--task, --task-digits and --val-prompts belong to the embedded demo (no --model)")
    preset = demo.DEFAULTS if args.demo else RECIPE
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("mix_previous", "baseline"):
        setattr(args, k, bool(getattr(args, k)))
    for k in ("beta", "lr"):  # one value per iteration; a shorter list repeats its last value
        if isinstance(getattr(args, k), str):  # a preset's value
            setattr(args, k, positive_list(getattr(args, k)))
    if not args.demo and not args.data:
        p.error("--model needs --data (training prompts with ground truth)")
    if args.demo and (args.data or args.eval_data):
        p.error("--data needs --model: without --model train.py runs the embedded demo")
    if args.sft and (args.sft_steps is None or args.sft_lr is None):
        p.error("--sft needs --sft-steps and --sft-lr")
    if args.resume and args.out is None:
        p.error("--resume needs --out (the run folder to continue)")
    if args.lora_rank:
        args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
        try:
            LoraSettings.from_args(args)
        except ValueError as e:
            p.error(str(e))
    if args.arms is None:
        args.arms = ["spin"] + (["sft"] if args.baseline else [])
    args.baseline = "sft" in args.arms
    if "spin_drop" in args.arms and not args.demo:
        p.error("--arms spin_drop drops the pairs whose sample a task's verifier accepts: the demo's tasks have one")
    if args.sft_eval_every and not (args.val_data or args.val_prompts):
        p.error("--sft-eval-every scores the SFT model on validation prompts: give --val-data (or --val-prompts "
                "with the demo), never the held-out prompts the arms are compared on")
    if args.sft_select == "exact_match" and args.sft_eval_every and not args.demo:
        p.error("--sft-select exact_match needs the demo's task verifier; use --sft-select gt_logp")
    if args.out is None:
        args.out = os.path.join("runs", "spin-" + time.strftime("%Y%m%d-%H%M%S"))
    return args


def parse_args(argv=None):
    p = ArgumentParser(description="SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji, Gu; ICML 2024; arXiv 2401.01335), end to end.")
    add_run_model_data(p)
    add_spin_lora_generation(p)
    add_sft_arms_demo(p)
    return check(p, p.parse_args(argv))
