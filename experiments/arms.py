"""The study's entry point: train.py's run with SFT chosen on validation prompts, then several
arms from that same start (experiments/compare.py launches it, one run per seed).

    python -m experiments.arms [train.py's flags] --arms spin,sft,spin_mix,spin_drop \
        --val-prompts 500 --sft-eval-every 100 [--sft-patience 5] [--sft-select exact_match]
    torchrun --nproc_per_node=2 -m experiments.arms ...

Every arm runs --iterations iterations from the SFT start, on the same training prompts and with
the same number of optimiser steps per iteration (the paper's SPIN's), through train.py's own
functions; the run folder and metrics.jsonl are train.py's, with one eval row per arm and
iteration, and each arm's per-prompt outcomes in eval/<arm>-<iteration>.jsonl.
    spin        the paper's SPIN: iter{t}/
    sft         continued SFT on the ground truth, the paper's baseline: baseline/iter{t}/
    spin_mix    SPIN against p_start^alpha * p_t^(1-alpha) (Alami et al. 2024; spin_loss alpha)
    spin_drop   SPIN without the pairs whose sample the task's verifier accepts: tests whether SPIN
                loses by pushing down correct answers
    random_drop spin_drop's control: as many pairs dropped as spin_drop would drop, chosen at random
                (no verifier), with the same repetition to fill a batch
    spin_b<beta>_lr<lr>   the paper's SPIN with its own beta and lr (the sweep; e.g. spin_b0.5_lr1e-05)
    sft_lr<lr>            continued SFT at its own lr: sft_lr<lr>/iter{t}/ (the confirmation, issue 37)
    spin_eqdrop_b<beta>_lr<lr>  SPIN at (beta, lr) without the pairs whose sample equals the ground truth
                (string equality, no verifier): those pairs give SPIN's loss no gradient, so this arm
                spends every step on the pairs that carry one (spin_drop also needs a verifier)
With --score-val every model (the start and each arm's every iteration) is also scored on the
validation prompts (eval/val-<arm>-<iteration>.jsonl, "val_eval" records), so an arm's iteration,
or an arm, can be chosen on validation prompts and compared on held-out ones.
"""
import argparse
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, replace
from typing import Callable

import torch

import parallel
import train
from checkpoint import write_json
from hf_folder import export, resolve_dtype
from data import pairs, readers, task
from errors import non_negative_int, positive_int, probability, run_command
from parallel import log
from report import SWEPT  # spin_b<beta>_lr<lr>: the sweep's arm names, labelled by report.py
from run_folder import record
from spin_loss import beta_for_iteration, mixture_reference
from stage import Stage, run_stage, train_stage
from train_args import parser as train_parser, resolve

ARMS = ("spin", "sft", "spin_mix", "spin_drop", "random_drop")


def swept_name(beta, lr):
    """The arm name of SPIN at (beta, lr): spin_b0.5_lr1e-05; parsed back by SWEPT."""
    return f"spin_b{beta:g}_lr{lr:g}"


def swept_setting(name):
    """(beta, lr) of a spin_b<beta>_lr<lr> arm, or None for any other name."""
    m = SWEPT.fullmatch(name)
    if not m:
        return None
    try:
        beta, lr = float(m.group(1)), float(m.group(2))
    except ValueError:
        return None
    return (beta, lr) if beta > 0 and lr > 0 else None


# The confirmation's arms (issue 37), parsed like the sweep's: continued SFT at its own lr, and SPIN
# at its own (beta, lr) without the pairs whose sample equals the ground truth.
SFT_LR = re.compile(r"sft_lr([0-9.e+-]+)")
EQDROP = re.compile(r"spin_eqdrop_b([0-9.e+-]+)_lr([0-9.e+-]+)")


def _positive(*texts):
    try:
        values = [float(t) for t in texts]
    except ValueError:
        return None
    return values if all(v > 0 for v in values) else None


def sft_lr_setting(name):
    """lr of a sft_lr<lr> arm, or None for any other name."""
    m = SFT_LR.fullmatch(name)
    v = m and _positive(m.group(1))
    return v[0] if v else None


def eqdrop_setting(name):
    """(beta, lr) of a spin_eqdrop_b<beta>_lr<lr> arm, or None for any other name."""
    m = EQDROP.fullmatch(name)
    v = m and _positive(m.group(1), m.group(2))
    return tuple(v) if v else None


def unequal_to_truth(examples):
    """The examples whose sample differs from the ground truth as a string: no verifier. A pair whose
    sample equals the ground truth has the same log-ratio on both sides, so SPIN's loss has no gradient
    through it; dropping those pairs changes only how the steps are spent."""
    return [ex for ex in examples if ex.generated != ex.response]


def judged_wrong(examples):
    """The examples whose generated answer the task's verifier rejects (data/task.score)."""
    return [ex for ex in examples if not task.score(ex.prompt, ex.generated)]


def fill_one_batch(items, batch_size):
    """spin_drop may keep fewer pairs than one global batch (the verifier accepts nearly every
    sample): repeated, they fill every batch, so the arm still takes its steps."""
    return items * -(-batch_size // len(items)) if 0 < len(items) < batch_size else items


def random_drop(seed):
    """keep() of the random_drop control: as many pairs as judged_wrong keeps, chosen uniformly at
    random (same count, no verifier), so spin_drop - random_drop isolates which pairs are dropped
    from how many (fewer pairs at the same steps means each is seen more often)."""
    def keep(examples):
        n = len(judged_wrong(examples))
        chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
        return [examples[i] for i in chosen]
    return keep


@dataclass(frozen=True)
class Arm:
    """What a study arm changes in train.spin_iteration's steps: what it trains on and against."""
    name: str  # its rows in the eval table; iteration t's stage is f"{name}{t}"
    folder: str  # its iterations live in <out>/<folder>/iter{t}
    base_alpha: float = 0.0  # reference p_start^a * p_t^(1-a) (spin_loss.mixture_reference), scored by rescoring
    keep: Callable | None = None  # (examples) -> the pairs to train on; None: every pair
    refill: Callable | None = None  # (kept tokenised pairs, global batch) -> what the stage trains on
    beta: float | None = None  # this arm's beta and lr (the sweep); None: the run's --beta, --lr
    lr: float | None = None


def spin_arm(name, mix_alpha, seed):
    """The Arm of a SPIN variant; its iterations live in <out>/<name>/iter{t}. None for "spin"
    itself: train.spin_iteration."""
    if name == "spin":
        return None
    if name == "spin_mix":
        return Arm(name=name, folder=name, base_alpha=mix_alpha)
    if name == "spin_drop":
        return Arm(name=name, folder=name, keep=judged_wrong, refill=fill_one_batch)
    if name == "random_drop":
        return Arm(name=name, folder=name, keep=random_drop(seed), refill=fill_one_batch)
    if eqdrop_setting(name) is not None:
        beta, lr = eqdrop_setting(name)
        return Arm(name=name, folder=name, keep=unequal_to_truth, refill=fill_one_batch, beta=beta, lr=lr)
    beta, lr = swept_setting(name)
    return Arm(name=name, folder=name, beta=beta, lr=lr)


# The SFT start's log-probs of both answers, for the mixture reference: columns written beside the
# opponent's (OPPONENT_COLUMNS) by generate.rescore(columns=BASE_COLUMNS) when that arm runs.
BASE_COLUMNS = ("base_real_logps", "base_generated_logps")


def mixed_reference(examples, alpha):
    """spin_mix: each example's reference log-probs (its OPPONENT_COLUMNS) become those of the
    geometric mixture of the base and p_t (spin_loss.mixture_reference), computed in float32 as a
    training batch holds them; the pairs tokenised from them carry the mixture."""
    f32 = lambda name: torch.tensor([float(ex.extras[name]) for ex in examples], dtype=torch.float32)  # noqa: E731
    real, gen = mixture_reference(f32("ref_real_logps"), f32("ref_generated_logps"), f32("base_real_logps"),
                                  f32("base_generated_logps"), alpha)
    return [replace(ex, extras=dict(ex.extras, ref_real_logps=r, ref_generated_logps=g))
            for ex, r, g in zip(examples, real.tolist(), gen.tolist())]


def arm_iteration(run, t, opponent, arm):
    """One iteration of a SPIN variant against p_t: train.spin_iteration's four steps, with the
    arm's changes to what it trains on and against; returns p_{t+1}'s folder."""
    if arm is None:
        return train.spin_iteration(run, t, opponent)
    c = run.cfg
    folder, tag = train.iter_folder(run, arm.folder, t), f"{arm.name}{t}"
    beta, lr = train.iteration_settings(run, t, tag, arm.beta, arm.lr)
    # 1. generate: every arm plays the SFT start at iteration 0 with the same seeds, so they share its samples
    synth, eval_synth = train.opponent_samples(run, opponent, train.iter_folder(run, arm.folder if t else "", t), t)
    if arm.base_alpha > 0:  # the start's log-probs of both answers, for the mixture reference
        synth = train.rescored(run, run.base, synth, os.path.join(folder, "synthetic_base.parquet"), BASE_COLUMNS)
    files = [synth]
    if c.data.mix_previous and t > 0:  # the official recipe: iteration t-1's data, rescored by p_t
        prev = os.path.join(train.iter_folder(run, arm.folder, t - 1), "synthetic_base.parquet") \
            if arm.base_alpha else os.path.join(train.iter_folder(run, arm.folder if t > 1 else "", t - 1),
                                                "synthetic.parquet")
        files.append(train.rescored(run, opponent, prev, os.path.join(folder, "previous_rescored.parquet"),
                                    pairs.OPPONENT_COLUMNS))
    examples = train.read_pairs(files)
    if arm.base_alpha > 0:
        examples = mixed_reference(examples, arm.base_alpha)
    correct, n_all = train.task_correct(run, examples), len(train.tokenize(run, examples)[0])
    items, facts = train.training_pairs(run, tag, arm.keep(examples) if arm.keep else examples, correct)
    # The steps the paper's SPIN takes on all its pairs, whatever the arm keeps: arms differ only in
    # what they train on, not in how long.
    steps, n_pairs = train.spin_steps(run, n_all), len(items)
    if arm.refill is not None:
        items = arm.refill(items, c.train.batch_size)
    # 2. train p_{t+1} from p_t on the pairs, 3. export it
    if n_pairs or arm.keep is None:
        with train.clock(run, "train"):
            model_dir = run_stage(run.env, train.spin_stage(run, tag, opponent, items, steps, beta, lr, folder))
    else:  # the arm kept no pair: nothing to push down, p_t is kept
        log(f"[{tag}] no pair left to train on: the next model is the opponent itself")
        model_dir = opponent
    # 4. evaluate p_{t+1} on the held-out prompts, against p_t's answers to them
    return train.evaluate_iteration(run, arm.name, t, model_dir, eval_synth, beta,
                                    dict(facts, train_pairs=n_pairs, steps=steps if model_dir != opponent else 0))


def sft_lr_iteration(run, t, prev, name):
    """Continued SFT at the lr its name carries (sft_lr<lr>), otherwise train.sft_iteration: the same
    steps as the paper's SPIN at iteration t, the ground truth of the same training prompts, evaluated
    against prev's answers to the held-out prompts. Its iterations live in <out>/<name>/iter{t}."""
    c = run.cfg
    folder = train.iter_folder(run, name, t)
    items, _ = train.tokenize(run, run.train_ex)
    pairs_t = len(items) * (2 if c.data.mix_previous and t > 0 else 1)  # SPIN's pairs at t (spin_iteration)
    steps = max(1, int(c.spin.epochs * (pairs_t // c.train.batch_size)))
    stage = Stage(kind="sft", init_dir=prev, items=items, steps=steps, lr=sft_lr_setting(name), beta=None,
                  folder=folder, tag=f"{name}{t}", optimizer=c.spin.optimizer, settings=c.train, lora=c.lora)
    with train.clock(run, "baseline"):
        model_dir = run_stage(run.env, stage)
    eval_synth = os.path.join(folder, "eval_synthetic.parquet")
    with train.clock(run, "generate"):
        train.run_generation(run, prev, run.held_ex, eval_synth, t, train.heldout_seed(run, t))
    with train.clock(run, "evaluate"):
        row = train.run_evaluation(run, model_dir, eval_synth, beta_for_iteration(c.spin.beta, t), f"{name}-{t + 1}")
    row.update(arm=name, iteration=t + 1, steps=steps)
    run.table.append(row)
    record(run.out, {"type": "eval", **row})
    return model_dir


def score_on_validation(run, model_dir, val_ex, arm, t):
    """--score-val: the model's exact match and likelihood on the validation prompts (never the
    held-out ones), per prompt in eval/val-<arm>-<t>.jsonl, so a choice made on them is paired."""
    with train.clock(run, "evaluate"):
        row = train.run_evaluation(run, model_dir, val_ex, None, f"val-{arm}-{t}")
    record(run.out, {"type": "val_eval", "arm": arm, "iteration": t, **row})


# ----------------------------------------------------------------------------------------------
# SFT to its optimum on validation prompts

@dataclass(frozen=True)
class StudyConfig:
    arms: list
    mix_alpha: float
    sft_eval_every: int  # 0: train --sft-steps and keep the last
    sft_patience: int
    sft_select: str  # "exact_match" or "gt_logp"
    val_data: str | None
    score_val: bool = False  # every model also scored on the validation prompts


def best_candidate(history, key):
    """The best score in key; exact-match ties (common: it moves in steps of 1/n) go to the
    higher likelihood, then to the earlier step."""
    return max(history, key=lambda h: (h[key], h["gt_logp_per_token"], -h["step"]))


def patience_out(history, key, patience):
    """True once the last `patience` scores have all come after the best one."""
    return len(history) > patience and best_candidate(history, key)["step"] < history[-patience]["step"]


def sft_to_optimum(run, stage, study, val_ex):
    """Early stopping: every --sft-eval-every steps the model is exported and scored on the
    validation prompts (never the held-out ones the arms are compared on); the best export is
    kept; training stops after --sft-patience scores without a better one, or at --sft-steps.
    Scores are recorded (metrics.jsonl, selection.json), so a resumed run skips what it did."""
    final, every = os.path.join(stage.folder, "model"), study.sft_eval_every
    if os.path.exists(final):
        return final
    key = "exact_match" if study.sft_select == "exact_match" else "gt_logp_per_token"
    path = os.path.join(stage.folder, "selection.json")
    history = []  # [{"step", and the scores}] of every candidate so far
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    for stop in range(every, stage.steps + every, every):
        stop = min(stop, stage.steps)
        if patience_out(history, key, study.sft_patience):
            break
        if any(h["step"] == stop for h in history):
            continue
        candidate = os.path.join(stage.folder, f"candidate-{stop}")
        if not os.path.exists(candidate):
            model, config = train_stage(run.env, stage, stop_at=stop)
            export(model, config, candidate, run.tok_files, resolve_dtype(run.dtype_name))
            del model
        score = train.run_evaluation(run, candidate, val_ex, None)
        history.append({"step": stop, **score})
        record(run.out, {"type": "sft_select", "stage": stage.tag, "step": stop, **score})
        log(f"  [sft] step {stop}: validation {key} {score[key]:.4f}")
        keep = f"candidate-{best_candidate(history, key)['step']}"

        def save_history():  # and drop the candidates that are no longer the best
            write_json(path, history, indent=1)
            for d in os.listdir(stage.folder):
                if d.startswith("candidate-") and d != keep:
                    shutil.rmtree(os.path.join(stage.folder, d))
        parallel.on_rank0(save_history)
    best = best_candidate(history, key)
    log(f"[sft] chose step {best['step']} of {history[-1]['step']} (validation {key} {best[key]:.4f})")
    record(run.out, {"type": "sft_chosen", "stage": stage.tag, "step": best["step"], key: best[key]})

    def publish():
        os.rename(os.path.join(stage.folder, f"candidate-{best['step']}"), final)
        shutil.rmtree(os.path.join(stage.folder, "ckpt"), ignore_errors=True)
    parallel.on_rank0(publish)
    return final


# ----------------------------------------------------------------------------------------------
# The command line: train.py's flags and the study's

def arm_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ARMS and swept_setting(x) is None and sft_lr_setting(x) is None
           and eqdrop_setting(x) is None]
    if bad or not names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of distinct arms among {', '.join(ARMS)} "
                                         "or spin_b<beta>_lr<lr> (e.g. spin_b0.5_lr1e-05), sft_lr<lr>, "
                                         "spin_eqdrop_b<beta>_lr<lr>")
    return names


def parse_args(argv=None):
    p = train_parser()
    p.description = "SPIN against continued SFT and variants of SPIN, from one SFT start chosen on validation prompts."
    # comparisons from one start (EXPERIMENTS.md): every arm runs --iterations iterations from the SFT
    # start with the same training prompts and the same number of optimiser steps per iteration
    p.add_argument("--arms", type=arm_list, default=None,
                   help=f"comma list of {', '.join(ARMS)} (default: spin, and sft with --baseline 1)")
    p.add_argument("--mix-alpha", type=probability, default=0.5,
                   help="spin_mix: weight of the SFT start in the geometric-mixture reference (spin_loss alpha)")
    p.add_argument("--sft-eval-every", type=non_negative_int, default=0,
                   help="SFT: score the model on the validation prompts every N steps, keep the best, stop after "
                        "--sft-patience scores without a better one (0: train --sft-steps and keep the last)")
    p.add_argument("--sft-patience", type=positive_int, default=5)
    p.add_argument("--sft-select", choices=["exact_match", "gt_logp"], default="exact_match",
                   help="what --sft-eval-every maximises: greedy exact match (needs the demo's task) or the "
                        "ground-truth log-likelihood per token")
    p.add_argument("--val-data", default=None,
                   help="validation prompts for --sft-eval-every (the demo draws --val-prompts from its task)")
    p.add_argument("--val-prompts", type=non_negative_int, default=None,
                   help="demo: validation prompts drawn from the task, disjoint from training and held-out")
    p.add_argument("--score-val", action="store_true",
                   help="also score the start and every arm's every iteration on the validation prompts "
                        "(eval/val-<arm>-<iteration>.jsonl), so iterations can be chosen on them")
    args = p.parse_args(argv)
    if args.arms is not None and args.baseline is not None:
        p.error("--arms and --baseline both choose the arms: give one (--arms spin,sft is --baseline 1)")
    cfg = resolve(p, args)
    arms = args.arms or ["spin"] + (["sft"] if cfg.spin.baseline else [])
    cfg = replace(cfg, spin=replace(cfg.spin, baseline="sft" in arms))
    demo = cfg.run.demo
    if {"spin_drop", "random_drop"} & set(arms) and not demo:
        p.error("--arms spin_drop/random_drop drop (as many as) the pairs whose sample a task's verifier accepts: "
                "the demo's tasks have one")
    if args.sft_eval_every and not (args.val_data or (demo and cfg.demo.val_prompts)):
        p.error("--sft-eval-every scores the SFT model on validation prompts: give --val-data (or --val-prompts "
                "with the demo), never the held-out prompts the arms are compared on")
    if args.score_val and not (args.val_data or (demo and cfg.demo.val_prompts)):
        p.error("--score-val scores every model on validation prompts: give --val-data (or --val-prompts with the demo)")
    if args.sft_select == "exact_match" and args.sft_eval_every and not demo:
        p.error("--sft-select exact_match needs the demo's task verifier; use --sft-select gt_logp")
    return cfg, StudyConfig(arms=arms, mix_alpha=args.mix_alpha, sft_eval_every=args.sft_eval_every,
                            sft_patience=args.sft_patience, sft_select=args.sft_select, val_data=args.val_data,
                            score_val=args.score_val)


def main(argv=None):
    cfg, study = parse_args(argv)
    run, base = train.start(cfg, vars(study))
    val_path = study.val_data
    if cfg.run.demo and cfg.demo.val_prompts:
        val_path = os.path.join(run.out, "data", "val.jsonl")
    val_ex = None
    if val_path:
        val_ex, rep = readers.read_examples(val_path, on_error=cfg.data.on_bad_row)
        val_ex = pairs.splittable(run.fmt, [readers.Example(e.prompt, e.response) for e in val_ex])[0]
        log(f"validation data (chooses the SFT checkpoint): {rep.summary()}")
    if cfg.run.demo or cfg.sft.sft:
        stage = train.sft_stage(run, base)
        with train.clock(run, "sft"):
            base = sft_to_optimum(run, stage, study, val_ex) if study.sft_eval_every else run_stage(run.env, stage)
        if cfg.sft.sft:
            log(f"SFT model: {base}")
            torch.distributed.destroy_process_group()
            return
    run.base = base
    train.evaluate_start(run, base)
    if study.score_val:
        score_on_validation(run, base, val_ex, "start", 0)
    for arm in study.arms:  # each arm's iterations, from the same start
        model = base
        for t in range(cfg.spin.iterations):
            if arm == "sft":
                model = train.sft_iteration(run, t, model)
            elif sft_lr_setting(arm) is not None:
                model = sft_lr_iteration(run, t, model, arm)
            else:
                model = arm_iteration(run, t, model, spin_arm(arm, study.mix_alpha, cfg.run.seed + t))
            if study.score_val:
                score_on_validation(run, model, val_ex, arm, t + 1)
    train.finish(run)


if __name__ == "__main__":
    run_command(main)
