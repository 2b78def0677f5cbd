"""SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji, Gu; ICML 2024; arXiv 2401.01335), end to end.

    for t in 0..K-1:
        1. generate   the frozen p_t samples y' for every training prompt x; one scoring pass
                      stores log p_t(y|x) and log p_t(y'|x) next to the samples (sampler.py)
        2. train      p_theta <- p_t, minimise the SPIN loss (spin_loss.py) against the stored
                      opponent log-probs; FSDP2, RMSprop, linear warmup/decay
        3. export     iter{t}/model, a Hugging Face folder: the next p_t
        4. evaluate   held-out ground-truth log-likelihood, reward accuracy/margin, task metric
                      (heldout.py), on the export

Launch:
    python train.py                                   # embedded demo, one process
    torchrun --nproc_per_node=2 train.py              # the same run over two processes
    torchrun --nproc_per_node=8 train.py --model zephyr-7b-sft-full --data train.parquet \
        --eval-data test.parquet                      # the paper's recipe (docs/REAL_MODELS.md)

spin_iteration is the paper's loop, its four steps numbered as above; main(), at the bottom,
calls the stages in order. The flags and their two presets (the paper's recipe, the embedded
demo) are in train_args.py; they resolve to the typed settings of settings.py. The study that
compares SPIN with variants of it from one SFT start (experiments/arms.py) runs its arms through
the step functions spin_iteration calls.

How this departs from the paper and the official code (uclaml/SPIN):
    1. The opponent's log-probs are computed once, at generation time, not by a second model
       resident during training (same numbers; --live-reference checks it).
    2. Generation prompts with the chat template training uses (the checkpoint's own, else
       Zephyr's); the official generation script prompts with "### Instruction:" while training
       on Zephyr.
    3. Multi-turn prompts keep every turn before the last assistant message (data/).
    4. One command runs every iteration; each stage is skipped when its output exists, and a
       killed stage resumes from its last checkpoint.
"""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch

import demo
import generate
import live_curves
import parallel
import report
import run_folder
from settings import Config, TrainSettings, settings
from data import export_files, pairs, readers, task
from errors import InputError, doing, run_command
from data.template import ChatFormat, load_chat_template
from data.tokenizer import load_tokenizer
from heldout import evaluate
import spin_kernels
from hf_folder import check_model_folder, load_model, read_config, resolve_dtype
from parallel import log
from run_folder import record
from spin_loss import beta_for_iteration
from stage import StageEnv, run_stage
from train_loop import Stage, split_batch
from train_args import fit_lengths, parse_args


# ----------------------------------------------------------------------------------------------
# What every stage needs, resolved once at the start of a run

@dataclass
class Run:
    cfg: Config
    device: torch.device
    compute: torch.dtype  # every model's compute dtype, trained or frozen (compute_dtype)
    fmt: ChatFormat  # the tokenizer and chat template every stage tokenises through
    tok_files: dict  # {name in an export: source path}: the tokenizer files and chat template
    dtype_name: str  # the dtype exports are written in: the starting checkpoint's
    train_ex: list
    held_ex: list
    base: str | None = None  # the SFT start every iteration 0 plays against (a HF folder)
    timings: dict = field(default_factory=dict)
    table: list = field(default_factory=list)  # eval rows, one per iteration

    @property
    def out(self):
        return self.cfg.run.out

    @property
    def tok(self):
        return self.fmt.tok

    @property
    def env(self):
        """What a training stage gets of the run (stage.StageEnv)."""
        return StageEnv(self.device, self.compute, self.cfg.run.kernels, self.tok.eos_id, self.out, self.tok_files,
                        resolve_dtype(self.dtype_name))


@contextmanager
def clock(run, name):
    """Adds the time of its block to run.timings[name] (the table's timing row), and names it as
    what the run is doing (errors.doing: what a stop, SIGTERM, memory, a rank that died, reports)."""
    doing(name)
    t0 = time.time()
    try:
        yield
    finally:
        run.timings[name] = run.timings.get(name, 0.0) + time.time() - t0


def compute_dtype(name, device):
    """The one compute dtype of the run: the trained copies compute in it (their fp32 parameters
    are cast by FSDP) and every frozen copy is held in it, so stored and recomputed log-probs
    always come from the same precision."""
    if name:
        return resolve_dtype(name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_frozen(run, model_dir):
    """A plain (unsharded) copy of a HF folder for generation and scoring, with the run's kernels
    (spin_kernels/__init__.py: the Triton kernels on GPUs, the fused torch paths on CPUs)."""
    return spin_kernels.install(load_model(model_dir, device=run.device, dtype=run.compute), run.cfg.run.kernels)


# ----------------------------------------------------------------------------------------------
# Generation, evaluation and rescoring, each on a plain (unsharded) copy of a HF folder

def run_generation(run, model_dir, examples, out_path, iteration, seed):
    if os.path.exists(out_path):
        return
    g, d = run.cfg.gen, run.cfg.data
    model = load_frozen(run, model_dir)
    generate.generate_dataset(model, run.fmt, examples, out_path, iteration=iteration, seed=seed,
                              rank=parallel.rank(), world_size=parallel.world(),
                              max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                              top_p=g.top_p, top_k=g.top_k, batch_size=g.gen_batch_size,
                              max_prompt_length=d.max_prompt_length, max_length=d.max_length,
                              model_id=model_dir)
    del model
    parallel.barrier()


def run_evaluation(run, model_dir, examples, beta, details=None):
    """heldout.py on a HF folder; details: a row name, whose per-example outcomes go to
    eval/<name>.jsonl (what paired statistics between runs need)."""
    g, d = run.cfg.gen, run.cfg.data
    path = None if details is None else os.path.join(run.out, "eval", f"{details}.jsonl")
    return evaluate(model_dir, examples, run.fmt, beta=beta, device=run.device, dtype=run.compute,
                    max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                    batch_size=g.gen_batch_size, max_new_tokens=g.max_new_tokens, has_task=run.cfg.run.demo,
                    details=path, impl=run.cfg.run.kernels)


def tokenize(run, examples):
    return pairs.tokenize_examples(run.fmt, examples, max_length=run.cfg.data.max_length,
                                   max_prompt_length=run.cfg.data.max_prompt_length, on_empty="skip")


# ----------------------------------------------------------------------------------------------
# Setting up a run: the demo's task and model (or the user's), the data

def check_batches(settings: TrainSettings, n_train, train_path):
    """The batch flags against the world size and the data, before any stage starts (stage.py
    would only find out at its first step)."""
    G = settings.batch_size
    split_batch(G, settings.micro_batch_size, parallel.world())
    if n_train < G:
        raise InputError(f"{train_path}: {n_train} training prompts is fewer than one global batch "
                         f"(--batch-size {G}): pass a smaller --batch-size or more data")


def prepare(cfg, device):
    """The run's starting folder, tokenizer and data, checked before any long stage starts."""
    d = cfg.data
    if cfg.run.demo:
        run_t0 = time.time()
        train_path, eval_path, init_dir = demo.prepare(cfg)
        prepare_s = time.time() - run_t0
    else:
        train_path, eval_path, init_dir = d.data, d.eval_data, cfg.run.model
        check_model_folder(init_dir)  # a missing folder or one of pickles, named before its tokenizer
    tok = load_tokenizer(init_dir)
    fmt = ChatFormat(tok, load_chat_template(init_dir, tok, cfg.run.chat_template))
    log(f"tokenizer {tok.path} ({tok.vocab_size} tokens, generation stops at {list(tok.eos_ids)}); "
        f"chat template: {fmt.name}")
    train_ex, held_ex = readers.load_splits(train_path, eval_path, num_prompts=d.num_prompts,
                                            eval_prompts=d.eval_prompts, seed=cfg.run.seed,
                                            on_error=d.on_bad_row, log=log)
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
    check_batches(cfg.train, len(train_ex), train_path)  # fail now, not after generating for an hour
    config = read_config(init_dir)
    generate.check_vocab(tok, config.vocab_size, init_dir)  # fail now, not mid-SFT
    cfg, note = fit_lengths(cfg, config.max_position_embeddings)  # the recipe's lengths left unset
    d = cfg.data
    if note:
        log(note)
    need = max(d.max_length, d.max_prompt_length + cfg.gen.max_new_tokens)
    if need > config.max_position_embeddings:  # fail now, not after an hour of SFT
        raise InputError(f"{init_dir}: the model has {config.max_position_embeddings} positions, but "
                         f"--max-length {d.max_length} / --max-prompt-length {d.max_prompt_length} + "
                         f"--max-new-tokens {cfg.gen.max_new_tokens} need {need}")
    folder = os.path.dirname(tok.path)
    tok_files = {name: os.path.join(folder, name) for name in tok.files}
    # Exports carry the template and special-token settings the run used (data/export_files.py).
    parallel.on_rank0(lambda: export_files.write(os.path.join(cfg.run.out, "export_tokenizer"), fmt))
    tok_files = export_files.file_map(os.path.join(cfg.run.out, "export_tokenizer"), tok_files)
    run = Run(cfg, device, compute_dtype(cfg.run.dtype, device), fmt, tok_files, config.dtype, train_ex, held_ex)
    if cfg.run.demo:
        run.timings["prepare"] = prepare_s
    return run, init_dir


def folder_settings(cfg, extra_settings=None):
    """What run_folder.open_run records in config.json and compares on --resume: the flat settings
    (config.settings), plus extra_settings (a study's flags), read as attributes."""
    return SimpleNamespace(**settings(cfg), **(extra_settings or {}))


def start(cfg, extra_settings=None):
    """Everything before the first stage: processes, the run folder, the data. Returns the Run and
    the starting HF folder."""
    cfg = replace(cfg, run=replace(cfg.run, kernels=spin_kernels.use_kernels(cfg.run.kernels)))
    rank, world, device = parallel.setup()
    # The default run folder carries the time of day, read by each rank as it parsed its flags:
    # ranks started across a second boundary would name two folders, so all take rank 0's.
    cfg = replace(cfg, run=replace(cfg.run, out=parallel.from_rank0(cfg.run.out)))
    run_folder.stop_on_sigterm()  # rank 0 says where the run stopped and how to resume it
    # Rank 0 locks the run folder for as long as it lives, so a second run on it is refused, and
    # checks it; every rank learns the verdict, so none waits forever.
    flat = folder_settings(cfg, extra_settings)
    parallel.on_rank0(lambda: run_folder.open_run(flat, world))
    # A --resume keeps the finished iterations' --beta and --lr (run_folder.kept_values).
    cfg = replace(cfg, spin=replace(cfg.spin, **parallel.from_rank0({k: getattr(flat, k) for k in ("beta", "lr")})))
    parallel.on_rank0(lambda: live_curves.start(cfg.run.out, cfg.run.report_to))  # --report-to, if asked
    return prepare(cfg, device)


# ----------------------------------------------------------------------------------------------
# The stages, in the order main() runs them

def sft_stage(run, init_dir):
    """The demo's warm start (or the whole job with --sft): SFT on the training data."""
    c = run.cfg
    items, rep = tokenize(run, run.train_ex)
    log(f"sft data: {rep.summary()}")
    return Stage(kind="sft", init_dir=init_dir, items=items, steps=c.sft.sft_steps, lr=c.sft.sft_lr, beta=None,
                 folder=os.path.join(run.out, "sft"), tag="sft", optimizer=c.sft.sft_optimizer, settings=c.train,
                 lora=None if c.run.demo else c.lora)  # the demo's random init trains in full


def heldout_seed(run, t):
    """The seed of p_t's answers to the held-out prompts: a stream of its own, apart from the
    training prompts' (--seed + t)."""
    return run.cfg.run.seed + 7 + t


def add_row(run, row):
    """An evaluation row: into the run's table and metrics.jsonl."""
    run.table.append(row)
    record(run.out, {"type": "eval", **row})


def evaluate_start(run, base):
    """The SFT starting point, evaluated against its own samples (rewards are 0 by definition)."""
    synth0 = os.path.join(run.out, "iter0", "eval_synthetic.parquet")
    with clock(run, "generate"):
        run_generation(run, base, run.held_ex, synth0, 0, heldout_seed(run, 0))
    with clock(run, "evaluate"):
        row = run_evaluation(run, base, synth0, 1.0, "start-0")
    row.update(arm="start", iteration=0, reward_accuracy=None, reward_margin=None)
    add_row(run, row)


def iter_folder(run, folder, t):
    return os.path.join(run.out, folder, f"iter{t}")


# ----------------------------------------------------------------------------------------------
# One SPIN iteration: the paper's Algorithm 1, step by step (experiments/arms.py varies these steps)

def iteration_settings(run, t, tag, beta=None, lr=None):
    """beta and lr of iteration t: --beta and --lr (a list shorter than --iterations repeats its
    last value), unless given."""
    c = run.cfg
    beta = beta_for_iteration(c.spin.beta, t) if beta is None else beta
    lr = c.spin.lr[min(t, len(c.spin.lr) - 1)] if lr is None else lr  # beta's rule (settings.py checks each lr)
    repeat = any(1 < len(v) <= t for v in (c.spin.beta, c.spin.lr))
    log(f"[{tag}] beta {beta:g}, lr {lr:g}" + (" (the last value of a shorter --beta/--lr list)" if repeat else ""))
    return beta, lr


def opponent_samples(run, opponent, folder, t):
    """p_t's answers to every training prompt, and to the held-out ones for evaluation, each stored
    with p_t's log-probs of both answers: folder/synthetic.parquet, folder/eval_synthetic.parquet."""
    synth, eval_synth = (os.path.join(folder, name) for name in ("synthetic.parquet", "eval_synthetic.parquet"))
    with clock(run, "generate"):
        # run_generation: a frozen copy of p_t runs sampler.opponent_rows over the prompts, through
        # generate.generate_dataset (resumable part files, sharded over the ranks)
        run_generation(run, opponent, run.train_ex, synth, t, run.cfg.run.seed + t)
        run_generation(run, opponent, run.held_ex, eval_synth, t, heldout_seed(run, t))
    return synth, eval_synth


def read_pairs(files):
    return [ex for f in files for ex in readers.read_examples(f, layout="spin")[0]]


def training_pairs(run, tag, examples, correct):
    """The tokenised pairs, and what the eval row says of them: how many samples equal the
    ground truth (a pair whose two answers are one sequence teaches nothing)."""
    items, rep = tokenize(run, examples)
    same = sum(it.real_ids == it.generated_ids for it in items) / max(len(items), 1)
    log(f"[{tag}] {rep.summary()}; samples equal to the ground truth: {same:.1%}"
        + ("" if correct is None else f"; judged correct by the task: {correct:.1%}"))
    return items, {"train_samples_equal_gt": same, "train_samples_correct": correct}


def spin_steps(run, n_pairs):
    """--epochs over n_pairs, in whole global batches, at least one step (a stage refuses fewer
    pairs than one global batch: stage.train_stage)."""
    return max(1, int(run.cfg.spin.epochs * (n_pairs // run.cfg.train.batch_size)))


def spin_stage(run, tag, opponent, items, steps, beta, lr, folder):
    """The record of iteration t's training stage (train_loop.Stage): p_t's folder to start from,
    the pairs, the steps, beta and lr; run_stage runs it."""
    c = run.cfg
    return Stage(kind="spin", init_dir=opponent, items=items, steps=steps, lr=lr, beta=beta, folder=folder,
                 tag=tag, optimizer=c.spin.optimizer, settings=c.train, lora=c.lora)


def spin_iteration(run, t, opponent):
    """One SPIN iteration against the opponent p_t (a HF folder); returns p_{t+1}'s folder."""
    folder, tag = iter_folder(run, "", t), f"spin{t}"  # <out>/iter{t}
    beta, lr = iteration_settings(run, t, tag)
    # 1. generate: p_t answers every training prompt (and the held-out ones, for evaluation)
    synth, eval_synth = opponent_samples(run, opponent, folder, t)
    files = [synth]
    if run.cfg.data.mix_previous and t > 0:  # the official recipe: iteration t-1's data too, scored by p_t
        files.append(rescored(run, opponent, os.path.join(iter_folder(run, "", t - 1), "synthetic.parquet"),
                              os.path.join(folder, "previous_rescored.parquet"), pairs.OPPONENT_COLUMNS))
    examples = read_pairs(files)
    items, facts = training_pairs(run, tag, examples, task_correct(run, examples))
    steps = spin_steps(run, len(items))
    # 2. train p_{t+1} from p_t on the pairs, 3. export it. run_stage (stage.py): p_theta starts as
    # p_t's weights (sharded with FSDP2), train_loop.train_steps runs the stage's steps (make_optimizer,
    # spin_micro_batch), and the result is exported as a Hugging Face folder, the next opponent
    with clock(run, "train"):
        model_dir = run_stage(run.env, spin_stage(run, tag, opponent, items, steps, beta, lr, folder))
    # 4. evaluate p_{t+1} on the held-out prompts, against p_t's answers to them
    evaluate_iteration(run, "spin", t, model_dir, eval_synth, beta, dict(facts, train_pairs=len(items), steps=steps))
    return model_dir


# ----------------------------------------------------------------------------------------------
# What spin_iteration calls beyond the algorithm: rescoring, the demo's task score, the eval row

def rescored(run, model_dir, src, dst, columns):
    """src's pairs written to dst with the model's log-probs of both answers in `columns`."""
    c = run.cfg
    with clock(run, "generate"):
        generate.rescore(model_dir, src, dst, run.fmt, device=run.device, dtype=run.compute,
                         max_length=c.data.max_length, max_prompt_length=c.data.max_prompt_length,
                         batch_size=c.gen.gen_batch_size, columns=columns, impl=c.run.kernels)
    return dst


def task_correct(run, examples):
    """The demo's task: the share of the opponent's answers it judges correct (None off the demo)."""
    if not run.cfg.run.demo:
        return None
    wrong = sum(not task.score(ex.prompt, ex.generated) for ex in examples)
    return 1 - wrong / max(len(examples), 1)


def evaluate_iteration(run, arm, t, model_dir, eval_synth, beta, facts):
    """p_{t+1} on the held-out prompts, against p_t's answers to them: its eval row (with facts,
    what it trained on), warned about if the ground truth's likelihood fell."""
    with clock(run, "evaluate"):
        row = run_evaluation(run, model_dir, eval_synth, beta, f"{arm}-{t + 1}")
    row.update(arm=arm, iteration=t + 1, **facts)
    before = next(r for r in reversed(run.table) if r["arm"] in (arm, "start"))
    if row["gt_logp_per_token"] < before["gt_logp_per_token"] - 1e-3:
        log(f"WARNING: held-out ground-truth log-likelihood fell during {arm} iteration {t} "
            f"({row['gt_logp_per_token']:.4f} nats/token). Reward accuracy can rise while the model gets "
            "worse (on a small model at beta 0.1, reward accuracy passed 90% while the ground truth lost "
            "5-8 nats): consider a larger beta or a smaller lr.")
        row["gt_logp_fell"] = True
    add_row(run, row)
    return model_dir


def sft_iteration(run, t, prev):
    """The baseline the paper compares against: continued SFT from the same start, with the
    same number of steps and the same learning rate as SPIN iteration t."""
    c = run.cfg
    folder = iter_folder(run, "baseline", t)
    spin = [r for r in run.table if r["arm"] == "spin" and r["iteration"] == t + 1]
    items, _ = tokenize(run, run.train_ex)
    # The paper's SPIN's steps at t: its pairs (twice as many from t = 1 with --mix-previous).
    pairs_t = len(items) * (2 if c.data.mix_previous and t > 0 else 1)
    steps = spin[-1]["steps"] if spin else spin_steps(run, pairs_t)
    stage = Stage(kind="sft", init_dir=prev, items=items, steps=steps, lr=c.spin.lr[min(t, len(c.spin.lr) - 1)],
                  beta=None, folder=folder, tag=f"sft{t}", optimizer=c.spin.optimizer, settings=c.train, lora=c.lora)
    with clock(run, "baseline"):
        model_dir = run_stage(run.env, stage)
    eval_synth = os.path.join(folder, "eval_synthetic.parquet")
    with clock(run, "generate"):
        run_generation(run, prev, run.held_ex, eval_synth, t, heldout_seed(run, t))
    with clock(run, "evaluate"):
        row = run_evaluation(run, model_dir, eval_synth, beta_for_iteration(c.spin.beta, t), f"sft-{t + 1}")
    row.update(arm="sft", iteration=t + 1, steps=steps)
    add_row(run, row)
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
    parallel.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None):
    cfg = parse_args(argv)
    run, base = start(cfg)
    if cfg.run.demo or cfg.sft.sft:  # the demo's warm start from its random init (or --sft alone)
        with clock(run, "sft"):
            base = run_stage(run.env, sft_stage(run, base))
        if cfg.sft.sft:
            log(f"SFT model: {base}")
            torch.distributed.destroy_process_group()
            return
    run.base = base
    evaluate_start(run, base)
    opponent = base  # p_0, a HF folder, as every model below
    for t in range(cfg.spin.iterations):  # SPIN: p_{t+1} learns to tell the data from p_t's answers
        opponent = spin_iteration(run, t, opponent)
    if cfg.spin.baseline:  # continued SFT from the same start, step for step
        prev = base
        for t in range(cfg.spin.iterations):
            prev = sft_iteration(run, t, prev)
    finish(run)


if __name__ == "__main__":
    run_command(main)
