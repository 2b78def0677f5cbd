"""How far does plain SFT get on an embedded task, and where is its held-out optimum?

Issue 15 compares SPIN with the best SFT can do, so it needs regimes where SFT, trained to
its held-out optimum, stays below perfect with train accuracy well above held-out (a real
generalisation gap). This script finds them: one process, AdamW, and every --eval-every
steps the held-out greedy exact match (the task's verifier), the held-out ground-truth
log-likelihood per token, the same exact match on training prompts, and what one
temperature-1 sample per training prompt looks like (equal to the ground truth: SPIN has no
signal there; accepted by the verifier: SPIN would push a correct answer down). It stops after
--patience evaluations without a new held-out best in either metric. The model, tokenizer, template and
collate are the project's own (model.Mistral, data/); the loop is deliberately plain, so it
does not depend on train.py's distributed machinery.

    python -m experiments.explore_sft --kind addition --digits 5 --n-train 300 \
        --out experiments/runs/add5-300.jsonl

Writes one JSON line per evaluation after a first line holding the resolved settings, and a
last line with the summary; prints the curve as it goes.
"""

import argparse
import json
import math
import os
import tempfile
import time

import torch

import spin_kernels
from data import task
from data.pairs import collate_sft, tokenize_examples
from data.template import ChatFormat, render_prompt
from data.tokenizer import Tokenizer, train_tokenizer
from generate import sample
from model import Mistral, ModelConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # task
    p.add_argument("--kind", default="addition", choices=task.KINDS)
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="task draw, initialisation and data order")
    # model (the same shape rule as train.py's demo: --dim, --layers as --demo-dim, --demo-layers)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=384)
    # optimisation
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4000, help="at most this many optimiser steps")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                   help="after warmup: a constant lr, or train.py's linear decay to 0 at --steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    # evaluation
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-train", type=int, default=500, help="training prompts scored for train accuracy")
    p.add_argument("--patience", type=int, default=8, help="stop after this many evaluations without a new "
                   "held-out best, in exact match or in log-likelihood (0: run all --steps)")
    p.add_argument("--gen-batch-size", type=int, default=64)
    # run
    p.add_argument("--threads", type=int, default=1, help="torch threads (leave the other core to others)")
    p.add_argument("--out", default=None, help="JSONL of the curve (default: print only)")
    return p.parse_args(argv)


def build(args, tok_dir):
    train, held = task.make_task(args.seed, args.n_train, args.n_heldout, args.digits, args.kind)
    tok = Tokenizer(train_tokenizer([render_prompt(e.prompt) + e.response for e in train], tok_dir, args.vocab))
    d, L = args.dim, args.layers
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=d, intermediate_size=int(8 * d / 3) // 8 * 8,
                         num_hidden_layers=L, num_attention_heads=max(1, d // 32),
                         num_key_value_heads=max(1, d // 64), head_dim=32, max_position_embeddings=256,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(args.seed)
    model = spin_kernels.install(Mistral(config))  # the paths train.py's stages run
    with torch.no_grad():  # demo.py's init: GPT-2 style, residual projections scaled by depth
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std)
    return train, held, tok, model


@torch.no_grad()
def decode_all(model, tok, items, max_new_tokens, batch_size, greedy):
    model.eval()
    outs = sample(model, [it.prompt_ids for it in items], max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                  greedy=greedy, batch_size=batch_size)
    model.train()
    return [tok.decode([t for t in o.tokens if t != tok.eos_id]) for o in outs]


def exact_match(model, tok, examples, items, max_new_tokens, batch_size):
    # Greedy decoding scored by the task's verifier (fraction correct).
    texts = decode_all(model, tok, items, max_new_tokens, batch_size, greedy=True)
    return sum(task.score(ex.prompt, t) for ex, t in zip(examples, texts)) / len(texts)


def sample_stats(model, tok, examples, items, max_new_tokens, batch_size):
    # What SPIN would see on these prompts: one temperature-1 sample each. (fraction equal to
    # the ground truth: SPIN's gradient vanishes on those; fraction the verifier accepts).
    texts = decode_all(model, tok, items, max_new_tokens, batch_size, greedy=False)
    same = sum(t.strip() == ex.response for ex, t in zip(examples, texts)) / len(texts)
    return same, sum(task.score(ex.prompt, t) for ex, t in zip(examples, texts)) / len(texts)


@torch.no_grad()
def gt_logp_per_token(model, items, pad_id, batch_size=128):
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(items), batch_size):
        b = collate_sft(items[i:i + batch_size], pad_id)
        lp = model(b["input_ids"], attention_mask=b["attention_mask"], targets=b["targets"])  # (B, T)
        total += lp.sum().item()
        n += int((b["targets"] != -100).sum())
    model.train()
    return total / n


def make_optimizer(model, args):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warm = max(1, args.warmup)
    if args.schedule == "constant":  # the curve shows where SFT itself stops, not where a schedule ends
        factor = lambda s: min(1.0, (s + 1) / warm)  # noqa: E731
    else:  # stage.py's rule (make_optimizer)
        factor = lambda s: (s + 1) / warm if s < warm else max(0.0, (args.steps - s) / max(1, args.steps - warm))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def summarise(curve, best, wall_s, t_train):
    """The run's summary: its best held-out exact match, its best log-likelihood, its end."""
    best_lp = max(curve, key=lambda r: r["heldout_logp_tok"])
    return {"type": "summary", "best_step": best["step"], "best_heldout_em": best["heldout_em"],
            "train_em_at_best": best["train_em"], "heldout_logp_tok_at_best": best["heldout_logp_tok"],
            "train_sample_eq_gt_at_best": best["train_sample_eq_gt"],
            "train_sample_correct_at_best": best["train_sample_correct"],
            "best_logp_step": best_lp["step"], "best_heldout_logp_tok": best_lp["heldout_logp_tok"],
            "heldout_em_at_best_logp": best_lp["heldout_em"], "last_step": curve[-1]["step"],
            "last_heldout_em": curve[-1]["heldout_em"], "last_train_em": curve[-1]["train_em"],
            "wall_s": wall_s, "wall_to_best_s": best["wall_s"],
            "train_s_per_step": round(t_train / curve[-1]["step"], 4)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("settings:", json.dumps(vars(args)))
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tok_dir:
        train, held, tok, model = build(args, tok_dir)
    fmt = ChatFormat(tok)  # the Zephyr template, as the demo uses
    train_items, _ = tokenize_examples(fmt, train, max_length=256, max_prompt_length=128)
    held_items, _ = tokenize_examples(fmt, held, max_length=256, max_prompt_length=128)
    probe = list(range(min(args.eval_train, len(train))))  # a fixed subset for train accuracy
    probe_ex, probe_items = [train[i] for i in probe], [train_items[i] for i in probe]
    # Room for the longest ground truth and a few more tokens: a longer greedy answer is wrong anyway.
    max_new = max(len(it.real_ids) for it in train_items + held_items) + 4
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train)} train / {len(held)} held-out; {n_params} parameters; vocab {tok.vocab_size}; "
          f"max_new_tokens {max_new}")

    opt, sched = make_optimizer(model, args)
    out = None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out = open(args.out, "w")
        out.write(json.dumps({"type": "settings", **vars(args), "n_params": n_params}) + "\n")
    G = min(args.batch_size, len(train_items))
    per_epoch = len(train_items) // G
    best, best_logp, since_best, losses, curve = None, -math.inf, 0, [], []
    t_train = 0.0
    model.train()
    for step in range(args.steps):
        t0 = time.time()
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(args.seed * 1000003 + epoch)  # stage.py's data order
        batch = [train_items[i] for i in torch.randperm(len(train_items), generator=g)[pos * G:(pos + 1) * G]]
        b = collate_sft(batch, tok.eos_id)
        lp = model(b["input_ids"], attention_mask=b["attention_mask"], targets=b["targets"])  # (B, T)
        loss = -lp.sum() / (b["targets"] != -100).sum()  # mean NLL per response token
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        t_train += time.time() - t0
        if (step + 1) % args.eval_every and step + 1 != args.steps:
            continue
        t0 = time.time()
        held_em = exact_match(model, tok, held, held_items, max_new, args.gen_batch_size)
        train_em = exact_match(model, tok, probe_ex, probe_items, max_new, args.gen_batch_size)
        same, ok = sample_stats(model, tok, probe_ex, probe_items, max_new, args.gen_batch_size)
        rec = {"type": "eval", "step": step + 1, "epoch": round((step + 1) / per_epoch, 2),
               "train_loss": sum(losses) / len(losses), "heldout_em": held_em, "train_em": train_em,
               "heldout_logp_tok": gt_logp_per_token(model, held_items, tok.eos_id),
               "train_sample_eq_gt": same, "train_sample_correct": ok,
               "train_s": round(t_train, 1), "eval_s": round(time.time() - t0, 1),
               "wall_s": round(time.time() - t_start, 1)}
        losses = []
        curve.append(rec)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        print(f"step {rec['step']:5d} ep {rec['epoch']:6.1f} loss {rec['train_loss']:.4f} held-out em "
              f"{held_em:6.1%} logp/tok {rec['heldout_logp_tok']:+.4f} train em {train_em:6.1%} "
              f"train samples =GT {same:6.1%} correct {ok:6.1%} wall {rec['wall_s']:.0f}s", flush=True)
        # Patience runs out only when neither held-out metric improves: before the first
        # correct answer, exact match is flat at 0 while the log-likelihood still climbs.
        improved = best is None or held_em > best["heldout_em"]
        if improved:
            best = rec
        if improved or rec["heldout_logp_tok"] > best_logp:
            since_best = 0
        else:
            since_best += 1
            if args.patience and since_best >= args.patience:
                break
        best_logp = max(best_logp, rec["heldout_logp_tok"])
    summary = summarise(curve, best, round(time.time() - t_start, 1), t_train)
    print("summary:", json.dumps(summary))
    if out:
        out.write(json.dumps(summary) + "\n")
        out.close()
    return summary


if __name__ == "__main__":
    main()
