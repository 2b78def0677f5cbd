"""Held-out evaluation after each SPIN iteration, and rescoring of older synthetic data.

Both run on a plain (unsharded) copy of an exported Hugging Face folder; each rank takes a
shard of the examples and the sums are reduced, so every rank returns the same numbers.

Metrics of a model p_theta against its opponent p_t, on held-out prompts x with ground truth y
and the opponent's sample y' (stored, with log p_t of both, by generate.py):
    gt_logp_per_token    sum log p_theta(y|x) / number of tokens of y
    reward_accuracy      fraction with beta*log(p_theta/p_t)(y|x) > beta*log(p_theta/p_t)(y'|x)
    reward_margin        mean of the difference of those two rewards
    opponent_equals_gt   fraction of pairs where y' == y (SPIN has no signal on those)
    exact_match          greedy decoding of p_theta scored by the task, where the data has one
"""
import os

import torch
import torch.distributed as dist

import generate
from data import pairs, readers, task
from model import Mistral


def _tokenized(tok, examples, args):
    """[(example, Pair)] for the examples whose tokenisation leaves a response (the same rule
    as training, which skips and counts the rest), so examples and pairs stay aligned."""
    out = []
    for ex in examples:
        try:
            out.append((ex, pairs.tokenize_example(tok, ex, max_length=args.max_length,
                                                   max_prompt_length=args.max_prompt_length)))
        except pairs.TruncationError:
            pass
    return out


def parts_of(n, rank, world, size=256):
    """The index ranges this rank takes: part p is [p*size, (p+1)*size), done by rank p % world.
    Each part goes through score/sample in one call whatever the world size, so its batches,
    and therefore its float rounding, are the same with 1 or N ranks."""
    return [range(p, min(n, p + size)) for p in range(rank * size, n, world * size)]


def evaluate(model_dir, eval_synth, tok, args, device, dtype, beta, has_task):
    """Held-out metrics of the model in model_dir against the opponent whose samples and
    log-probs are stored in eval_synth. Each rank scores its shard; the sums are reduced."""
    rank, world = dist.get_rank(), dist.get_world_size()
    examples, _ = readers.read_examples(eval_synth, layout="spin")
    model = Mistral.from_pretrained(model_dir, device=device, dtype=dtype)
    stats = torch.zeros(7, dtype=torch.float64)
    for part in parts_of(len(examples), rank, world):
        mine = _tokenized(tok, [examples[i] for i in part], args)
        items = [it for _, it in mine]
        prompts = [it.prompt_ids for it in items]
        lp_real = generate.score(model, prompts, [it.real_ids for it in items], batch_size=args.gen_batch_size)
        lp_gen = generate.score(model, prompts, [it.generated_ids for it in items], batch_size=args.gen_batch_size)
        for it, a, b in zip(items, lp_real, lp_gen):
            r_real = beta * (float(a) - it.ref_real_logp)
            r_gen = beta * (float(b) - it.ref_generated_logp)
            stats[:6] += torch.tensor([float(a), len(it.real_ids), r_real > r_gen, r_real - r_gen,
                                       it.real_ids == it.generated_ids, 1.0], dtype=torch.float64)
        if has_task:  # greedy decoding of the new model, scored by the task's exact match
            outs = generate.sample(model, prompts, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                                   greedy=True, batch_size=args.gen_batch_size, vocab_limit=tok.vocab_size)
            for (ex, _), o in zip(mine, outs):
                stats[6] += task.score(ex.prompt, tok.decode([x for x in o.tokens if x != tok.eos_id]))
    del model
    dist.all_reduce(stats)
    n = max(stats[5].item(), 1.0)
    out = {"gt_logp_per_token": stats[0].item() / max(stats[1].item(), 1.0),
           "reward_accuracy": stats[2].item() / n, "reward_margin": stats[3].item() / n,
           "opponent_equals_gt": stats[4].item() / n, "eval_examples": int(n)}
    if has_task:
        out["exact_match"] = stats[6].item() / n
    return out


def rescore(model_dir, in_path, out_path, tok, args, device, dtype, prefix):
    """Write in_path's rows again with `{prefix}real_logps` / `{prefix}generated_logps` computed
    by the model in model_dir: iteration t-1's data mixed into iteration t needs log-probs under
    p_t. Rows whose tokenisation leaves no response are dropped, as training would skip them."""
    if os.path.exists(out_path):
        return
    examples, _ = readers.read_examples(in_path, layout="spin")
    kept = _tokenized(tok, examples, args)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Mistral.from_pretrained(model_dir, device=device, dtype=dtype)
    got = []
    for part in parts_of(len(kept), rank, world):
        prompts = [kept[i][1].prompt_ids for i in part]
        lr_ = generate.score(model, prompts, [kept[i][1].real_ids for i in part], batch_size=args.gen_batch_size)
        lg_ = generate.score(model, prompts, [kept[i][1].generated_ids for i in part], batch_size=args.gen_batch_size)
        got += [(i, float(a), float(b)) for i, a, b in zip(part, lr_, lg_)]
    gathered = [None] * world
    dist.all_gather_object(gathered, got)
    if rank == 0:
        for part in gathered:
            for i, a, b in part:
                kept[i][0].extras[prefix + "real_logps"] = a
                kept[i][0].extras[prefix + "generated_logps"] = b
        readers.write_examples(out_path, [ex for ex, _ in kept], "spin")
    dist.barrier()
