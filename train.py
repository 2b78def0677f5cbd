"""SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji, Gu; ICML 2024; arXiv 2401.01335), end to end.

    for t in 0..K-1:
        1. generate   the frozen p_t samples y' for every training prompt x; one scoring pass
                      stores log p_t(y|x) and log p_t(y'|x) next to the samples (generate.py)
        2. train      p_theta <- p_t, minimise the SPIN loss (spin_loss.py) against the stored
                      opponent log-probs; FSDP2, RMSprop, linear warmup/decay
        3. export     iter{t}/model, a Hugging Face folder: the next p_t
        4. evaluate   held-out ground-truth log-likelihood, reward accuracy/margin, task metric
                      (evaluate.py), on the export

Launch:
    python train.py                                   # embedded demo, one process
    torchrun --nproc_per_node=2 train.py              # the same run over two processes
    torchrun --nproc_per_node=8 train.py --model zephyr-7b-sft-full --data train.parquet \
        --eval-data test.parquet                      # the paper's recipe (see README)

Read main() from the bottom of this file: it calls the stages below in order. The flags and
their two presets (the paper's recipe, the embedded demo) are in train_args.py.

How this departs from the paper and the official code (uclaml/SPIN):
    1. The opponent's log-probs are computed once, at generation time, not by a second model
       resident during training (same numbers; --live-reference checks it).
    2. Generation prompts with the same Zephyr template training uses (the official generation
       script prompts with "### Instruction:" while training on Zephyr).
    3. Multi-turn prompts keep every turn before the last assistant message (data/).
    4. One command runs every iteration; each stage is skipped when its output exists, and a
       killed stage resumes from its last checkpoint.
"""
import argparse
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

import demo
import generate
import live_curves
import parallel
import report
import run_folder
from checkpoint import check_model_folder, export, resolve_dtype, write_json
from data import export_files, pairs, readers, task
from errors import InputError, run_command
from data.template import ChatFormat, load_chat_template
from data.tokenizer import load_tokenizer
from evaluate import evaluate
from kernels import use_kernels
from model import Mistral, ModelConfig
from parallel import log
from run_folder import record
from spin_loss import beta_for_iteration
from stage import Stage, run_stage, split_batch, train_stage
from train_args import ARMS, parse_args


# ----------------------------------------------------------------------------------------------
# What every stage needs, resolved once at the start of a run

@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    infer: torch.dtype  # every frozen copy (generation, scoring, evaluation, live reference)
    fmt: ChatFormat  # the tokenizer and chat template every stage tokenises through
    tok_files: dict  # {name in an export: source path}: the tokenizer files and chat template
    dtype_name: str  # the dtype exports are written in: the starting checkpoint's
    train_ex: list
    held_ex: list
    val_ex: list | None = None  # prompts that choose the SFT checkpoint (--sft-eval-every)
    base: str | None = None  # the SFT start every arm begins from (a HF folder)
    timings: dict = field(default_factory=dict)
    table: list = field(default_factory=list)  # eval rows, one per iteration and arm

    @property
    def out(self):
        return self.args.out

    @property
    def tok(self):
        return self.fmt.tok


def timed(run, name, fn):
    t0 = time.time()
    result = fn()
    run.timings[name] = run.timings.get(name, 0.0) + time.time() - t0
    return result


def inference_dtype(args, device):
    """The dtype of every frozen copy, so stored and recomputed log-probs always come from the
    same precision."""
    if args.dtype:
        return resolve_dtype(args.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------
# Generation, evaluation and rescoring, each on a plain (unsharded) copy of a HF folder

def run_generation(run, model_dir, examples, out_path, iteration, seed):
    if os.path.exists(out_path):
        return
    a = run.args
    model = Mistral.from_pretrained(model_dir, device=run.device, dtype=run.infer)
    generate.generate_dataset(model, run.fmt, examples, out_path, iteration=iteration, seed=seed,
                              rank=parallel.rank(), world_size=parallel.world(),
                              max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              top_p=a.top_p, top_k=a.top_k, batch_size=a.gen_batch_size,
                              max_prompt_length=a.max_prompt_length, max_length=a.max_length,
                              model_id=model_dir)
    del model
    parallel.barrier()


def run_evaluation(run, model_dir, examples, beta, details=None):
    """evaluate.py on a HF folder; details: a row name, whose per-example outcomes go to
    eval/<name>.jsonl (what paired statistics between arms need)."""
    a = run.args
    path = None if details is None else os.path.join(run.out, "eval", f"{details}.jsonl")
    return evaluate(model_dir, examples, run.fmt, beta=beta, device=run.device, dtype=run.infer,
                    max_length=a.max_length, max_prompt_length=a.max_prompt_length,
                    batch_size=a.gen_batch_size, max_new_tokens=a.max_new_tokens, has_task=a.demo, details=path)


def tokenize(run, examples):
    return pairs.tokenize_examples(run.fmt, examples, max_length=run.args.max_length,
                                   max_prompt_length=run.args.max_prompt_length, on_empty="skip")


# ----------------------------------------------------------------------------------------------
# Setting up a run: the demo's task and model (or the user's), the data

def check_batches(args, n_train, train_path):
    """The batch flags against the world size and the data, before any stage starts (stage.py
    would only find out at its first step)."""
    G = args.batch_size
    split_batch(G, args.micro_batch_size, parallel.world())
    if n_train < G:
        raise InputError(f"{train_path}: {n_train} training prompts is fewer than one global batch "
                         f"(--batch-size {G}): pass a smaller --batch-size or more data")


def prepare(args, device):
    """The run's starting folder, tokenizer and data, checked before any long stage starts."""
    if args.demo:
        run_t0 = time.time()
        train_path, eval_path, init_dir = demo.prepare(args.out, args)
        if args.val_prompts:
            args.val_data = os.path.join(os.path.dirname(train_path), "val.jsonl")
        prepare_s = time.time() - run_t0
    else:
        train_path, eval_path, init_dir = args.data, args.eval_data, args.model
        check_model_folder(init_dir)  # a missing folder or one of pickles, named before its tokenizer
    tok = load_tokenizer(init_dir)
    fmt = ChatFormat(tok, load_chat_template(init_dir, tok, args.chat_template))
    log(f"tokenizer {tok.path} ({tok.vocab_size} tokens, generation stops at {list(tok.eos_ids)}); "
        f"chat template: {fmt.name}")
    train_ex, held_ex = readers.load_splits(train_path, eval_path, num_prompts=args.num_prompts,
                                            eval_prompts=args.eval_prompts, seed=args.seed,
                                            on_error=args.on_bad_row, log=log)
    for name, exs in (("training", train_ex), ("held-out", held_ex)):
        kept, reasons = pairs.splittable(fmt, exs)
        if len(kept) < len(exs):
            log(f"skipping {len(exs) - len(kept)} {name} examples whose answer {fmt.name} cannot split from "
                "the prompt:" + "".join(f"\n  {r}" for r in reasons))
        exs[:] = kept
        if not exs:
            raise InputError(f"{eval_path if name == 'held-out' and eval_path else train_path}: no {name} example "
                             f"is left whose answer {fmt.name} can split from the prompt (see the examples "
                             "above); pass --chat-template FILE with a template that can")
    check_batches(args, len(train_ex), train_path)  # fail now, not after generating for an hour
    config = ModelConfig.from_hf(init_dir)
    generate.check_vocab(tok, config.vocab_size, init_dir)  # fail now, not mid-SFT
    need = max(args.max_length, args.max_prompt_length + args.max_new_tokens)
    if need > config.max_position_embeddings:  # fail now, not after an hour of SFT
        raise InputError(f"{init_dir}: the model has {config.max_position_embeddings} positions, but "
                         f"--max-length {args.max_length} / --max-prompt-length {args.max_prompt_length} + "
                         f"--max-new-tokens {args.max_new_tokens} need {need}")
    folder = os.path.dirname(tok.path)
    tok_files = {name: os.path.join(folder, name) for name in tok.files}
    # Exports carry the template and special-token settings the run used (data/export_files.py).
    parallel.on_rank0(lambda: export_files.write(os.path.join(args.out, "export_tokenizer"), fmt))
    tok_files = export_files.file_map(os.path.join(args.out, "export_tokenizer"), tok_files)
    run = Run(args, device, inference_dtype(args, device), fmt, tok_files, config.dtype, train_ex, held_ex)
    if args.val_data:
        run.val_ex, rep = readers.read_examples(args.val_data, on_error=args.on_bad_row)
        run.val_ex = pairs.splittable(fmt, [readers.Example(e.prompt, e.response) for e in run.val_ex])[0]
        log(f"validation data (chooses the SFT checkpoint): {rep.summary()}")
    if args.demo:
        run.timings["prepare"] = prepare_s
    return run, init_dir


# ----------------------------------------------------------------------------------------------
# The stages, in the order main() runs them

def sft_warm_start(run, init_dir):
    """The demo's warm start (or the whole job with --sft): SFT on the training data, for
    --sft-steps, or to its validation optimum with --sft-eval-every."""
    a = run.args
    items, rep = tokenize(run, run.train_ex)
    log(f"sft data: {rep.summary()}")
    stage = Stage("sft", init_dir, items, a.sft_steps, a.sft_lr, None, os.path.join(a.out, "sft"), "sft",
                  a.sft_optimizer, lora=not a.demo)  # the demo's random init trains in full
    if a.sft_eval_every:
        return timed(run, "sft", lambda: sft_to_optimum(run, stage))
    return timed(run, "sft", lambda: run_stage(run, stage))


def best_candidate(history, key):
    """The best score in key; exact-match ties (common: it moves in steps of 1/n) go to the
    higher likelihood, then to the earlier step."""
    return max(history, key=lambda h: (h[key], h["gt_logp_per_token"], -h["step"]))


def patience_out(history, key, patience):
    """True once the last `patience` scores have all come after the best one."""
    return len(history) > patience and best_candidate(history, key)["step"] < history[-patience]["step"]


def sft_to_optimum(run, stage):
    """Early stopping: every --sft-eval-every steps the model is exported and scored on the
    validation prompts (never the held-out ones the arms are compared on); the best export is
    kept; training stops after --sft-patience scores without a better one, or at --sft-steps.
    Scores are recorded (metrics.jsonl, selection.json), so a resumed run skips what it did."""
    a, final = run.args, os.path.join(stage.folder, "model")
    if os.path.exists(final):
        return final
    key = "exact_match" if a.sft_select == "exact_match" else "gt_logp_per_token"
    path = os.path.join(stage.folder, "selection.json")
    history = []  # [{"step", and the scores}] of every candidate so far
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    best_of = lambda hs: best_candidate(hs, key)  # noqa: E731
    for stop in range(a.sft_eval_every, stage.steps + a.sft_eval_every, a.sft_eval_every):
        stop = min(stop, stage.steps)
        if patience_out(history, key, a.sft_patience):
            break
        if any(h["step"] == stop for h in history):
            continue
        candidate = os.path.join(stage.folder, f"candidate-{stop}")
        if not os.path.exists(candidate):
            model, config = train_stage(run, dataclasses.replace(stage, stop_at=stop))
            export(model, config, candidate, run.tok_files, resolve_dtype(run.dtype_name))
            del model
        score = run_evaluation(run, candidate, run.val_ex, None)
        history.append({"step": stop, **score})
        record(run.out, {"type": "sft_select", "stage": stage.tag, "step": stop, **score})
        log(f"  [sft] step {stop}: validation {key} {score[key]:.4f}")
        keep = f"candidate-{best_of(history)['step']}"

        def save_history():  # and drop the candidates that are no longer the best
            write_json(path, history, indent=1)
            for d in os.listdir(stage.folder):
                if d.startswith("candidate-") and d != keep:
                    shutil.rmtree(os.path.join(stage.folder, d))
        parallel.on_rank0(save_history)
    best = best_of(history)
    log(f"[sft] chose step {best['step']} of {history[-1]['step']} (validation {key} {best[key]:.4f})")
    record(run.out, {"type": "sft_chosen", "stage": stage.tag, "step": best["step"], key: best[key]})

    def publish():
        os.rename(os.path.join(stage.folder, f"candidate-{best['step']}"), final)
        shutil.rmtree(os.path.join(stage.folder, "ckpt"), ignore_errors=True)
    parallel.on_rank0(publish)
    return final


def evaluate_start(run, base):
    """The SFT starting point, evaluated against its own samples (rewards are 0 by definition)."""
    synth0 = os.path.join(run.out, "iter0", "eval_synthetic.parquet")
    timed(run, "generate", lambda: run_generation(run, base, run.held_ex, synth0, 0, run.args.seed + 7))
    row = timed(run, "evaluate", lambda: run_evaluation(run, base, synth0, 1.0, "start-0"))
    row.update(arm="start", iteration=0, reward_accuracy=None, reward_margin=None)
    run.table.append(row)
    record(run.out, {"type": "eval", **row})


def arm_folder(run, arm, t):
    return os.path.join(run.out, ARMS[arm], f"iter{t}")


def samples_folder(run, arm, t):
    """Where arm's iteration-t samples live. Every SPIN arm plays the SFT start at iteration 0,
    with the same seeds, so they share the spin arm's samples there."""
    return arm_folder(run, "spin" if t == 0 else arm, t)


def judged_wrong(examples):
    """The examples whose generated answer the task's verifier rejects (data/task.score)."""
    return [ex for ex in examples if not task.score(ex.prompt, ex.generated)]


def fill_one_batch(items, batch_size):
    """spin_drop may keep fewer pairs than one global batch (the verifier accepts nearly every
    sample): repeated, they fill every batch, so the arm still takes its steps."""
    return items * -(-batch_size // len(items)) if 0 < len(items) < batch_size else items


def spin_iteration(run, t, opponent, arm="spin"):
    """One iteration of a SPIN arm against the opponent p_t (a HF folder); returns p_{t+1}'s folder."""
    a = run.args
    folder, samples = arm_folder(run, arm, t), samples_folder(run, arm, t)
    tag = f"{arm}{t}"
    beta, lr = beta_for_iteration(a.beta, t), a.lr[min(t, len(a.lr) - 1)]
    repeat = any(1 < len(v) <= t for v in (a.beta, a.lr))  # a list shorter than --iterations
    log(f"[{tag}] beta {beta:g}, lr {lr:g}" + (" (the last value of a shorter --beta/--lr list)" if repeat else ""))
    synth = os.path.join(samples, "synthetic.parquet")
    eval_synth = os.path.join(samples, "eval_synthetic.parquet")
    timed(run, "generate", lambda: run_generation(run, opponent, run.train_ex, synth, t, a.seed + t))
    timed(run, "generate", lambda: run_generation(run, opponent, run.held_ex, eval_synth, t, a.seed + 7 + t))
    rescore = lambda model, src, dst, columns: timed(run, "generate", lambda: generate.rescore(  # noqa: E731
        model, src, dst, run.fmt, device=run.device, dtype=run.infer, max_length=a.max_length,
        max_prompt_length=a.max_prompt_length, batch_size=a.gen_batch_size, columns=columns))
    if arm == "spin_mix":  # the base (SFT start) model's log-probs of both answers, for the mixture
        scored = os.path.join(folder, "synthetic_base.parquet")
        rescore(run.base, synth, scored, pairs.BASE_COLUMNS)
        synth = scored
    files = [synth]
    if a.mix_previous and t > 0:  # the official recipe: iteration t-1's data, rescored by p_t
        prev = os.path.join(arm_folder(run, arm, t - 1), "synthetic_base.parquet") if arm == "spin_mix" \
            else os.path.join(samples_folder(run, arm, t - 1), "synthetic.parquet")
        files.append(os.path.join(folder, "previous_rescored.parquet"))
        rescore(opponent, prev, files[-1], pairs.OPPONENT_COLUMNS)
    examples = [ex for f in files for ex in readers.read_examples(f, layout="spin")[0]]
    n_all = len(tokenize(run, examples)[0])
    correct = None
    if a.demo:  # the task's verifier on the opponent's training samples
        wrong = judged_wrong(examples)
        correct = 1 - len(wrong) / max(len(examples), 1)
        if arm == "spin_drop":  # the hypothesis: SPIN loses by pushing down correct answers
            examples = wrong
    items, rep = tokenize(run, examples)
    same = sum(it.real_ids == it.generated_ids for it in items) / max(len(items), 1)
    log(f"[{tag}] {rep.summary()}; samples equal to the ground truth: {same:.1%}"
        + ("" if correct is None else f"; judged correct by the task: {correct:.1%}"))
    # Every arm takes the steps the paper's SPIN takes on all its pairs, so arms differ only in
    # what they train on, not in how long (spin_drop goes over its fewer pairs more often).
    steps = max(1, int(a.epochs * (n_all // a.batch_size)))
    n_pairs = len(items)
    if arm == "spin_drop":
        items = fill_one_batch(items, a.batch_size)
    if n_pairs or arm != "spin_drop":
        stage = Stage("spin", opponent, items, steps, lr, beta, folder, tag, a.optimizer, lora=True,
                      mix_alpha=a.mix_alpha if arm == "spin_mix" else 0.0)
        model_dir = timed(run, "train", lambda: run_stage(run, stage))
    else:  # spin_drop when the verifier accepts every sample: nothing to push down, p_t is kept
        log(f"[{tag}] no pair left to train on: the next model is the opponent itself")
        model_dir = opponent
    row = timed(run, "evaluate", lambda: run_evaluation(run, model_dir, eval_synth, beta, f"{arm}-{t + 1}"))
    row.update(arm=arm, iteration=t + 1, train_samples_equal_gt=same, train_samples_correct=correct,
               train_pairs=n_pairs, steps=steps if model_dir != opponent else 0)
    before = next(r for r in reversed(run.table) if r["arm"] in (arm, "start"))
    if row["gt_logp_per_token"] < before["gt_logp_per_token"] - 1e-3:
        log(f"WARNING: held-out ground-truth log-likelihood fell during {arm} iteration {t} "
            f"({row['gt_logp_per_token']:.4f} nats/token). Reward accuracy can rise while the model "
            "gets worse (shared/SPIN_AT_SMALL_SCALE.md): consider a larger beta or a smaller lr.")
        row["gt_logp_fell"] = True
    run.table.append(row)
    record(run.out, {"type": "eval", **row})
    return model_dir


def sft_iteration(run, t, prev, arm="sft"):
    """The baseline the paper compares against: continued SFT from the same start, with the
    same number of steps and the same learning rate as SPIN iteration t."""
    a = run.args
    folder = arm_folder(run, arm, t)
    spin = [r for r in run.table if r["arm"] == "spin" and r["iteration"] == t + 1]
    items, _ = tokenize(run, run.train_ex)
    # The paper's SPIN's steps at t: its pairs (twice as many from t = 1 with --mix-previous).
    pairs_t = len(items) * (2 if a.mix_previous and t > 0 else 1)
    steps = spin[-1]["steps"] if spin else max(1, int(a.epochs * (pairs_t // a.batch_size)))
    stage = Stage("sft", prev, items, steps, a.lr[min(t, len(a.lr) - 1)], None, folder, f"sft{t}", a.optimizer,
                  lora=True)
    model_dir = timed(run, "baseline", lambda: run_stage(run, stage))
    eval_synth = os.path.join(folder, "eval_synthetic.parquet")
    timed(run, "generate", lambda: run_generation(run, prev, run.held_ex, eval_synth, t, a.seed + 7 + t))
    row = timed(run, "evaluate", lambda: run_evaluation(run, model_dir, eval_synth, beta_for_iteration(a.beta, t),
                                                        f"{arm}-{t + 1}"))
    row.update(arm=arm, iteration=t + 1, steps=steps)
    run.table.append(row)
    record(run.out, {"type": "eval", **row})
    return model_dir


def finish(run):
    if parallel.rank() == 0:
        record(run.out, {"type": "timing", **run.timings})
        print(report.table(run.table, run.timings))
        name = os.path.basename(os.path.normpath(run.out))
        png = report.plot(run.table, os.path.join(run.out, "report.png"), name)
        curves = report.plot_training(report.read_metrics(os.path.join(run.out, "metrics.jsonl")),
                                      os.path.join(run.out, "report_training.png"), name)
        print(f"outputs in {run.out}" + "".join(f"; plot {p}" for p in (png, curves) if p))


def main(argv=None):
    args = parse_args(argv)
    args.kernels = use_kernels(args.kernels)
    rank, world, device = parallel.setup()
    # Rank 0 locks the run folder for as long as it lives, so a second run on it is refused, and
    # checks it; every rank learns the verdict, so none waits forever.
    parallel.on_rank0(lambda: run_folder.open_run(args, world))
    parallel.on_rank0(lambda: live_curves.start(args.out, args.report_to))  # --report-to
    run, base = prepare(args, device)
    if args.demo or args.sft:
        base = sft_warm_start(run, base)
        if args.sft:
            log(f"SFT model: {base}")
            torch.distributed.destroy_process_group()
            return
    run.base = base
    evaluate_start(run, base)
    for arm in args.arms:  # each arm's iterations, from the same start
        model = base
        for t in range(args.iterations):
            model = (sft_iteration if arm == "sft" else spin_iteration)(run, t, model, arm)
    finish(run)
    parallel.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_command(main)
