"""Held-out evaluation after each SPIN iteration.

Runs on a plain (unsharded) copy of an exported Hugging Face folder; each rank takes fixed
parts of the examples (parallel.parts_of) and the sums are reduced, so every rank returns the
same numbers, whatever the world size.

Metrics of a model p_theta against its opponent p_t, on held-out prompts x with ground truth y
and the opponent's sample y' (stored, with log p_t of both, by generate.py):
    gt_logp_per_token    sum log p_theta(y|x) / number of tokens of y
    reward_accuracy      fraction with beta*log(p_theta/p_t)(y|x) > beta*log(p_theta/p_t)(y'|x)
    reward_margin        mean of the difference of those two rewards
    opponent_equals_gt   fraction of pairs where y' == y (SPIN has no signal on those)
    exact_match          greedy decoding of p_theta scored by the task, where the data has one
The rewards are spin_loss's own metrics, so evaluation and training measure the same thing.
"""
import json
import os

import torch

import generate
import spin_kernels
import parallel
from checkpoint import atomic_file
from data import task
from data.pairs import tokenized_pairs
from data.readers import read_examples
from hf_folder import load_model
from spin_loss import spin_loss


def evaluate(model_dir, examples, fmt, *, beta, device, dtype, max_length, max_prompt_length,
             batch_size, max_new_tokens, has_task, details=None, impl="auto"):
    """Held-out metrics of the model in model_dir. `examples`: an eval_synthetic file (the
    opponent's samples and log-probs, read in the SPIN layout), or a list of Examples; the reward
    metrics need the opponent's samples, so examples without them give only the ground-truth
    log-likelihood and the task metric (how the SFT start is chosen). Every rank must call it.
    details: a .jsonl path where rank 0 writes one line per example (its index, exact match,
    ground-truth log-prob and tokens, whether the reward ranks the ground truth first), the
    outcomes paired comparisons between models need (experiments/stats.py). impl: the kernels
    (spin_kernels.install)."""
    if isinstance(examples, (str, os.PathLike)):
        examples, _ = read_examples(examples, layout="spin")
    rewards = all(ex.generated is not None for ex in examples)
    model = spin_kernels.install(load_model(model_dir, device=device, dtype=dtype), impl)
    sums = dict(gt_logp=0.0, gt_tokens=0.0, accuracy=0.0, margin=0.0, equal=0.0, n=0.0, exact=0.0)
    records = []
    for part in parallel.parts_of(len(examples), parallel.rank(), parallel.world()):
        mine = tokenized_pairs(fmt, [examples[i] for i in part], max_length=max_length,
                               max_prompt_length=max_prompt_length)
        index = {id(examples[i]): i for i in part}
        if not mine:
            continue
        items = [it for _, it in mine]
        prompts = [it.prompt_ids for it in items]
        lp_real = generate.score(model, prompts, [it.real_ids for it in items], batch_size=batch_size)
        if rewards:
            lp_gen = generate.score(model, prompts, [it.generated_ids for it in items], batch_size=batch_size)
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
            _, met = spin_loss(as_tensor(lp_real), as_tensor(lp_gen), as_tensor([it.ref_real_logps for it in items]),
                               as_tensor([it.ref_generated_logps for it in items]), beta=beta, reduction="none")
        # Summed pair by pair, in example order: the same float64 sums for any batching.
        for i, it in enumerate(items):
            sums["gt_logp"] += float(lp_real[i])
            sums["gt_tokens"] += len(it.real_ids)
            sums["n"] += 1
            records.append({"index": index[id(mine[i][0])], "gt_logp": float(lp_real[i]), "gt_tokens": len(it.real_ids)})
            if rewards:
                sums["accuracy"] += met["rewards/accuracies"][i].item()
                sums["margin"] += met["rewards/margins"][i].item()
                sums["equal"] += it.real_ids == it.generated_ids
                records[-1]["reward_real_first"] = bool(met["rewards/accuracies"][i].item())
        if has_task:  # greedy decoding of the new model, scored by the task's exact match
            tok = fmt.tok
            outs = generate.sample(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_ids,
                                   greedy=True, batch_size=batch_size, vocab_limit=tok.vocab_size)
            # a special token inside the answer makes it wrong
            for (ex, _), o, rec in zip(mine, outs, records[-len(mine):]):
                hit = task.score(ex.prompt, tok.decode([x for x in o.tokens if x not in tok.eos_ids]))
                sums["exact"] += hit
                rec["exact"] = int(hit)
    del model
    if details is not None:
        write_details(details, records)
    tot = parallel.reduce_sums(sums)
    n = max(tot["n"], 1.0)
    out = {"gt_logp_per_token": tot["gt_logp"] / max(tot["gt_tokens"], 1.0), "eval_examples": int(n)}
    if rewards:
        out.update(reward_accuracy=tot["accuracy"] / n, reward_margin=tot["margin"] / n,
                   opponent_equals_gt=tot["equal"] / n)
    if has_task:
        out["exact_match"] = tot["exact"] / n
    return out


def write_details(path, records):
    """Gather every rank's per-example records; rank 0 writes them in example order (atomic)."""
    gathered = [records]
    if parallel.world() > 1:
        gathered = [None] * parallel.world()
        torch.distributed.all_gather_object(gathered, records)
    if parallel.rank() == 0:
        with atomic_file(path) as f:
            for r in sorted((r for part in gathered for r in part), key=lambda r: r["index"]):
                f.write(json.dumps(r) + "\n")
