"""Examples -> token ids -> left-padded batches (the DESIGN.md contract).

Token layout of one sequence: prompt ids, then response ids, both given by a ChatFormat
(data/template.py), the one object every stage tokenises through:
- a checkpoint's own chat template: prompt ids = the rendering of the prompt turns with the
  generation prompt; response ids = what the rendering of the whole conversation adds after
  them (ChatML: `{answer}<|im_end|>\\n`; Llama 3: `{answer}<|eot_id|>`). An answer whose
  tokens cannot be split from the prompt's raises PrefixError (skipped and counted here, like
  a response truncated to nothing).
- the Zephyr fallback (the demo, template-less checkpoints, the paper's setting):
  prompt ids = encode(render_prompt(prompt messages)): `<|system|>\\n</s>\\n<|user|>\\n...<|assistant|>\\n`;
  response ids = encode(answer) + [eos], the answer tokenised on its own as the official
  collator does (so it starts with the '▁' the tokenizer prepends to every segment).
The rest of this docstring is about the Zephyr fallback.

How this differs from the official collator (uclaml/SPIN, after TRL's DPO collator):
it tokenises the response text `{answer}</s>\\n`, i.e. encode(answer) + [</s>, ▁, \\n],
then appends one more EOS; it gives attention mask 0 to every EOS inside the text (the two
in the prompt and the first in the response) and still scores them. So its response is
3 tokens longer than ours, and its sequence log-prob also contains
log p(</s>) + log p(▁ | </s>) + log p(\\n) + log p(</s> | \\n) where ours has log p(</s>).
We stop at the first EOS because sampling stops there, so a real and a generated response
are scored over the same kind of span, and because masks here are "zeros then ones" (left
padding only), which cannot express holes at inner EOS tokens.

Both ways share one quirk of tokenising the answer on its own: the tokenizer prepends '▁',
so "Hello" becomes `▁Hello` (22557) and "857" becomes `▁ 8 5 7`, whereas the same answer
inside the full conversation text (how Zephyr's SFT saw it) is `Hello` (16230) / `8 5 7`.
Generated ids re-encoded from text therefore differ from the ids the model sampled.
`ChatFormat(tok, official_suffix=True)` reproduces the official token ids (encode(`{answer}</s>\\n`) + [eos]),
with every token attended.

Truncation (official defaults max_length=1024, max_prompt_length=512, as in TRL's DPO
collator): only when prompt + the longer response exceed max_length, the prompt keeps its
last max_prompt_length tokens; if still too long, both responses keep their first
max_length - len(prompt) tokens (a cut response loses its EOS). A response cut to nothing
raises TruncationError, or is skipped and counted with on_empty="skip".
"""

from dataclasses import dataclass, field

import torch

from data.template import PrefixError


class TruncationError(ValueError):
    pass


# The opponent log-prob contract, one set of names end to end: generation (generate.py) stores
# log p_t(y|x) and log p_t(y'|x), summed over exactly the response ids below, as columns of
# these names; Pair carries them under the same names; collate_pairs emits them as batch keys;
# spin_loss takes them as arguments of the same names.
OPPONENT_COLUMNS = ("ref_real_logps", "ref_generated_logps")


@dataclass
class Pair:
    prompt_ids: list
    real_ids: list
    generated_ids: list | None = None
    ref_real_logps: float | None = None  # log p_t(real response | prompt), a sum over real_ids
    ref_generated_logps: float | None = None  # the same for generated_ids
    truncated: bool = False


def truncate(prompt, responses, max_length, max_prompt_length):
    """(prompt, [responses]) -> (prompt, [responses], truncated). Only when the prompt and the
    longest response exceed max_length: the prompt keeps its last max_prompt_length tokens, then
    every response its first max_length - len(prompt). TruncationError if that leaves none."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, responses, False
    if len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
    budget = max_length - len(prompt)
    if budget <= 0:
        raise TruncationError(
            f"prompt of {len(prompt)} tokens leaves no room for a response (max_length={max_length}, "
            f"max_prompt_length={max_prompt_length})"
        )
    return prompt, [r[:budget] for r in responses], True


def tokenize_example(fmt, ex, *, max_length=1024, max_prompt_length=512):
    """One Example -> Pair through the ChatFormat `fmt`, truncated by the rule above. prompt_ids: the
    chat template up to the assistant's turn; each response's ids: the answer's tokens and what closes
    the turn (EOS under the Zephyr fallback; a checkpoint's own template: its end-of-turn tokens), so
    log p(y|x) covers the stop too (data/template.ChatFormat.response_ids)."""
    prompt = fmt.prompt_ids(ex.prompt)
    responses = [fmt.response_ids(ex.prompt, ex.response)]
    if ex.generated is not None:
        responses.append(fmt.response_ids(ex.prompt, ex.generated))
    prompt, responses, cut = truncate(prompt, responses, max_length, max_prompt_length)

    stored = {name: None if ex.extras.get(name) is None else float(ex.extras[name])
              for name in OPPONENT_COLUMNS}
    return Pair(prompt_ids=prompt, real_ids=responses[0],
                generated_ids=responses[1] if len(responses) > 1 else None, truncated=cut, **stored)


# -- collate: left padding, targets = next token on response positions -----------------


def left_pad(seqs, n_prompt, pad_id):
    """seqs: token lists; n_prompt[b]: how many of seqs[b]'s leading tokens are prompt.
    Returns input_ids, attention_mask, targets, all (len(seqs), T) int64. A prompt p1 p2 with
    the response r1 r2, in a batch of T = 5 (targets[t] is the response token at t + 1):
        input_ids       pad   p1    p2  r1  r2
        attention_mask  0     1     1   1   1
        targets         -100  -100  r1  r2  -100
    """
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, n_prompt)):
        start = T - len(s)
        input_ids[b, start:] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, start:] = 1
        # targets[:, t] = input_ids[:, t+1] where token t+1 is a response token
        first = start + p  # absolute index of the first response token
        if first < T:
            targets[b, first - 1 : T - 1] = input_ids[b, first:T]
    return input_ids, attention_mask, targets


def collate_pairs(items, pad_id):
    """SPIN batch: rows 0..B-1 = prompt + real response, rows B..2B-1 = prompt + generated.

    Returns input_ids, attention_mask, targets (2B, T); the stored log-probs (OPPONENT_COLUMNS)
    as (B,) float32 when every item carries them."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    if any(it.generated_ids is None for it in items):
        raise ValueError("collate_pairs: every item needs generated_ids")
    if any(len(it.prompt_ids) == 0 for it in items):
        raise ValueError("collate_pairs: empty prompt (the first response token needs a token before it)")
    seqs = [it.prompt_ids + it.real_ids for it in items] + [it.prompt_ids + it.generated_ids for it in items]
    n_prompt = [len(it.prompt_ids) for it in items] * 2
    input_ids, attention_mask, targets = left_pad(seqs, n_prompt, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}
    for name in OPPONENT_COLUMNS:
        values = [getattr(it, name) for it in items]
        if all(v is not None for v in values):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        elif any(v is not None for v in values):
            raise ValueError(f"collate_pairs: {name} present on some items only")
    return batch


def collate_prompts(prompt_ids_list, pad_id):
    """Left-padded prompts for generation: input_ids, attention_mask (B, T)."""
    if not prompt_ids_list or any(len(p) == 0 for p in prompt_ids_list):
        raise ValueError("collate_prompts: empty batch or empty prompt")
    input_ids, attention_mask, _ = left_pad(list(prompt_ids_list), [len(p) for p in prompt_ids_list], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_sft(items, pad_id):
    """Single sequences (prompt + real response), same layout: (B, T) tensors."""
    if not items:
        raise ValueError("collate_sft: empty batch")
    input_ids, attention_mask, targets = left_pad(
        [it.prompt_ids + it.real_ids for it in items], [len(it.prompt_ids) for it in items], pad_id
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


# -- many examples at once: what training and rescoring tokenise, with counts of what was skipped


@dataclass
class TokenizeReport:
    examples: int = 0
    truncated: int = 0
    skipped_empty: int = 0
    skipped_unsplittable: int = 0  # the chat template could not split the answer from the prompt
    reasons: list = field(default_factory=list)

    def summary(self):
        s = f"{self.examples} examples, {self.truncated} truncated, {self.skipped_empty} skipped (response cut to nothing)"
        if self.skipped_unsplittable:
            s += f", {self.skipped_unsplittable} skipped (answer not separable from the prompt's tokens)"
        return s + "".join(f"\n  {r}" for r in self.reasons)


def tokenize_examples(fmt, examples, *, max_length=1024, max_prompt_length=512, on_empty="raise"):
    """Returns (pairs, TokenizeReport). The report's counts are for callers to print.
    on_empty="skip" skips (and counts) examples left without a response, by truncation or
    because the template cannot split the answer's tokens from the prompt's."""
    if on_empty not in ("raise", "skip"):
        raise ValueError(f"on_empty must be 'raise' or 'skip', got {on_empty!r}")
    report, pairs = TokenizeReport(), []
    for i, ex in enumerate(examples):
        report.examples += 1
        try:
            p = tokenize_example(fmt, ex, max_length=max_length, max_prompt_length=max_prompt_length)
        except (TruncationError, PrefixError) as e:
            if on_empty == "raise":
                raise type(e)(f"example {i} (0-based): {e}") from None
            if isinstance(e, PrefixError):
                report.skipped_unsplittable += 1
            else:
                report.skipped_empty += 1
            if len(report.reasons) < 5:
                report.reasons.append(f"example {i} (0-based): {e}")
            continue
        report.truncated += p.truncated
        pairs.append(p)
    return pairs, report


def tokenized_pairs(fmt, examples, *, max_length=1024, max_prompt_length=512):
    """[(example, Pair)] for the examples whose tokenisation leaves a response (the rule training
    applies with on_empty="skip"), so examples and pairs stay aligned."""
    out = []
    for ex in examples:
        try:
            out.append((ex, tokenize_example(fmt, ex, max_length=max_length, max_prompt_length=max_prompt_length)))
        except (TruncationError, PrefixError):
            pass
    return out


def splittable(fmt, examples):
    """(the examples whose ground-truth answer the chat template can split from the prompt, the
    first few reasons for those it cannot). Run once on the data, before generation: a pair
    whose real response has no tokens of its own can be neither scored nor trained on."""
    if fmt.template is None:  # the Zephyr fallback tokenises the answer on its own: always splits
        return list(examples), []
    kept, reasons = [], []
    for i, ex in enumerate(examples):
        try:
            fmt.response_ids(ex.prompt, ex.response)
            kept.append(ex)
        except PrefixError as e:
            if len(reasons) < 5:
                reasons.append(f"example {i} (0-based): {e}")
    return kept, reasons
