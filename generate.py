"""Self-play generation for SPIN at scale: sampler.py's sampler and scorer (the plain version, read
on SPIN's path) with the speed-ups put in, over sharded, resumable Parquet files.

    sample(model, prompts, ...)      -> [Sample(tokens, finished, logprobs)]   sampler.sample, and
                                        rows that end take the next prompts (slots.py)
    generate_dataset(model, fmt, examples, out_path, ...)   sharded, resumable, Parquet out
    rescore(model_dir, in_path, out_path, ...)   an older iteration's pairs under the current p_t

Launch (one process, or one per GPU):
    python generate.py --model DIR --data train.parquet --out iter0/synthetic.parquet
    torchrun --nproc_per_node=2 generate.py --model DIR --data train.parquet --out ...

How this departs from the official SPIN generation (uclaml/SPIN, spin/batch_decode.py):
1. Prompts use the chat template training uses (the checkpoint's own, else Zephyr's;
   data/template.py), not "### Instruction:".
2. Each prompt has its own random stream, keyed by (seed, prompt id) (sampler.py).
3. The opponent log-probs are computed here, on exactly the token ids training uses
   (data/pairs.py), and stored as columns, instead of by a second model at every training step.
4. Part files are written as the run goes; a rerun skips the parts that exist.
5. No vLLM: slots.py keeps a fixed number of rows in flight and hands a finished row's slot to the
   next prompt (continuous batching), which is what makes vLLM fast on this workload
   (bench/generate_vllm.py measures the two side by side).
"""
import contextlib
import functools
import hashlib
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import parallel
import spin_kernels
from checkpoint import atomic_file, write_json
from data.pairs import OPPONENT_COLUMNS, tokenized_pairs
from data.readers import DataError, read_examples, write_examples
from data.template import ChatFormat, load_chat_template
from data.tokenizer import load_tokenizer
from errors import (ArgumentParser, InputError, non_negative_int, positive_int, probability,
                    run_command)
from hf_folder import check_model_folder, load_model, read_config
from spin_kernels.attention import whole_cache
from spin_kernels.cpu_linear import cpu_decode_weights
import sampler
import slots
# The plain sampler and scorer, read on SPIN's path (sampler.py); generate.sample below adds the speed-ups.
from sampler import (Sample, answer_text, decode_batches, draw, filter_logits,  # noqa: F401
                     next_tokens, opponent_rows, sample_batch, score, stream_uniforms)

# ----------------------------------------------------------------------------------------------
# Sampling


def sample(model, prompts, *, batch_size=16, refill=True, cuda_graph=False, **kw):
    """sampler.sample (every other argument is its) with the speed-ups, each put in here by one
    call: refill: rows that end take the next prompts (slots.decode, continuous batching, in
    groups of batch_size / 8), on CPUs at decode sizes from whole float32 cache buffers
    (whole_cache: slots.WholeKVCache); False: sampler's static batches. On CPUs the weights are packed for
    oneDNN while decoding (cpu_decode_weights; a no-op elsewhere). cuda_graph: replay each decode
    step from a CUDA graph (in slots.decode, which calls graphed_step; CUDA only, attention on the torch path). Every draw
    finds its block of the vocabulary first (blocked_inverse_cdf). The samples are sampler.sample's
    up to float rounding (tests/test_generate.py)."""
    if cuda_graph and (model.lm_head.weight.device.type != "cuda" or not refill):
        raise ValueError("cuda_graph=True needs a model on a CUDA device, and refill=True")
    rows = min(batch_size, len(prompts))
    decode = functools.partial(slots.decode, cuda_graph=cuda_graph, whole=not cuda_graph and whole_cache(model, rows)) \
        if refill else decode_batches
    packed = cpu_decode_weights(model, rows=rows) if prompts else contextlib.nullcontext()
    with packed:
        return sampler.sample(model, prompts, batch_size=batch_size, decode=decode, inverse_cdf=blocked_inverse_cdf,
                              **kw)


_DRAW_BLOCK = 512


def blocked_inverse_cdf(probs, u):
    """probs (B, V) float32 (rows sum to 1 up to rounding), u (B,) in [0, 1) -> (B,) the first
    token whose cumulative mass exceeds u * total, never a token of probability 0: sampler's
    plain_inverse_cdf, faster, and the same token up to the float32 rounding of the block sums."""
    # One float64 cumsum over the whole vocabulary would allocate and scan two fresh (B, V)
    # float64 buffers per step (~0.8 ms at 8 x 32000 on one core, as long as a decode step's
    # attention). Instead: sums of blocks of _DRAW_BLOCK tokens, find the block, then scan
    # inside it in float64. The block sums are float32 (a float64 sum would first copy probs
    # to float64, the costliest op of the draw): the same inverse CDF up to their rounding, so
    # a uniform within ~1e-6 of the total mass of a CDF boundary may pick the token beside it.
    B, V = probs.shape
    S = _DRAW_BLOCK
    full = V // S * S
    sums = [probs[:, :full].reshape(B, -1, S).sum(-1).double()] if full else []
    if full < V:
        sums.append(probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64))
    block_cdf = torch.cat(sums, 1).cumsum(-1)  # (B, NB), non-decreasing; empty blocks add exactly 0
    total = block_cdf[:, -1:]
    # x < total strictly, so a first block with cdf > x exists and holds probability > 0.
    x = torch.minimum(u[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))  # (B, 1)
    blk = torch.searchsorted(block_cdf, x, right=True)  # (B, 1)
    before = torch.where(blk > 0, block_cdf.gather(-1, (blk - 1).clamp(min=0)), 0.0)  # (B, 1) mass before it
    ar = torch.arange(S, device=probs.device)
    idx = blk * S + ar  # (B, S) token ids of the block
    inner = torch.where(idx < V, probs.gather(1, idx.clamp(max=V - 1)), 0.0).double()  # (B, S)
    cdf = before + inner.cumsum(-1)  # (B, S); a token whose cdf rises past x has probability > 0
    j = torch.searchsorted(cdf, x, right=True)[:, 0]  # (B,) in [0, S]
    # Rounding can leave the block's last cdf <= x (j == S): take its last token with probability > 0.
    last = torch.where(inner > 0, ar, -1).amax(-1)  # (B,)
    return blk[:, 0] * S + torch.where(j < S, j, last)


class Progress:
    """One line on stderr, redrawn at most twice a second: prompts done, new tokens, tokens/s."""

    def __init__(self, total, label="generate", stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.prompts = self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, prompts=0, tokens=0):
        self.prompts += prompts
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= 0.5 or self.prompts == self.total:
            self.last = now
            rate = self.tokens / max(now - self.t0, 1e-9)
            self.stream.write(f"\r{self.label}: {self.prompts}/{self.total} prompts, "
                              f"{self.tokens} tokens, {rate:.1f} tok/s ")
            self.stream.flush()

    def close(self):
        self.stream.write("\n")


# ----------------------------------------------------------------------------------------------
# Datasets: shard -> parts -> one Parquet file in the official SPIN layout
#
# Part p holds examples [p * part_size, (p + 1) * part_size) and is done by rank p % world_size.
# Parts do not depend on the world size, so a run may resume with a different number of ranks.
# `settings.json` in the parts folder records what the parts were made with; a rerun with other
# settings is refused rather than mixing samples from two configurations.


def check_vocab(tok, model_vocab, source):
    """A tokenizer with more pieces than the model has embeddings would feed it ids it cannot
    look up: refuse now, naming both. The other way round (a padded model vocabulary) is fine:
    sampling never draws the ids past the tokenizer (vocab_limit)."""
    if tok.vocab_size > model_vocab:
        raise InputError(f"{source}: the tokenizer ({tok.path}) has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {model_vocab}: ids from {model_vocab} up have no embedding (wrong tokenizer?)")


def _parts_dir(out_path):
    return os.fspath(out_path) + ".parts"


def _part_path(out_path, p, n_parts):
    return os.path.join(_parts_dir(out_path), f"part-{p:05d}-of-{n_parts:05d}.parquet")


def merge_parts(out_path, n_parts, settings):
    """Concatenate the parts in example order into out_path (atomic), settings in its metadata."""
    table = pa.concat_tables([pq.read_table(_part_path(out_path, p, n_parts)) for p in range(n_parts)])
    if table.num_rows != settings["examples"]:
        raise RuntimeError(f"{_parts_dir(out_path)}: parts hold {table.num_rows} rows, expected {settings['examples']}")
    table = table.replace_schema_metadata({"spin_generate": json.dumps(settings, sort_keys=True)})
    with atomic_file(out_path, "wb") as f:
        pq.write_table(table, f)


def claim_parts(out_path, settings):
    """Make out_path's parts folder this run's: the settings guard the parts
    made with them; a run that made none (it failed first) is replaced by this one, so a
    corrected rerun is not refused."""
    parts = _parts_dir(out_path)
    os.makedirs(parts, exist_ok=True)
    settings_file = os.path.join(parts, "settings.json")
    old = None
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            old = json.load(f)
    made = [f for f in os.listdir(parts) if f.startswith("part-")]
    if old is not None and old != settings and made:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise InputError(f"{parts} holds {len(made)} parts made with other settings ({', '.join(diff)}): "
                         f"delete it or choose another --out")
    if old != settings:
        write_json(settings_file, settings, indent=2, sort_keys=True)  # every rank writes the same bytes


def generate_dataset(model, fmt, examples, out_path, *, iteration=0, seed=0, rank=0, world_size=1,
                     part_size=256, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                     greedy=False, batch_size=16, max_prompt_length=512, max_length=1024,
                     model_id="", skipped_rows=0, progress=True):
    """Sample y' for every example, score prompt+y and prompt+y', write the SPIN layout.
    `real` and `generated` carry every prompt turn as given (system turn included when the data
    has one) followed by one assistant turn: data/readers.py reads all turns before the last
    assistant one back as the prompt. Returns a summary dict; rank 0 merges once all parts exist."""
    if not examples:
        raise DataError(f"{out_path}: no examples to generate from")
    limit = model.config.max_position_embeddings
    if max(max_length, max_prompt_length + max_new_tokens) > limit:
        raise InputError(f"--max-length {max_length} or --max-prompt-length {max_prompt_length} + --max-new-tokens "
                         f"{max_new_tokens} exceeds the model's {limit} positions (max_position_embeddings)")
    data_sha = hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()
    settings = dict(examples=len(examples), data_sha256=data_sha, model=model_id, iteration=iteration,
                    seed=seed, part_size=part_size, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, greedy=greedy, max_prompt_length=max_prompt_length,
                    max_length=max_length, chat_format=fmt.name)
    summary = dict(prompts=0, generated_tokens=0, wall_s=0.0, tokens_per_s=0.0, truncated_prompts=0,
                   skipped_rows=skipped_rows, parts_written=0, parts_skipped=0, merged=False, out=str(out_path))
    if os.path.exists(out_path):  # a finished stage is detected and skipped
        done = (pq.read_schema(out_path).metadata or {}).get(b"spin_generate")
        if done is None or json.loads(done) != settings:
            raise InputError(f"{out_path} exists and was not made with these settings: delete it to regenerate")
        print(f"generate: {out_path} is complete, nothing to do")
        return dict(summary, merged=True)
    n_parts = (len(examples) + part_size - 1) // part_size
    claim_parts(out_path, settings)
    t0 = time.perf_counter()
    mine = [p for p in range(n_parts) if p % world_size == rank]
    todo = [p for p in mine if not os.path.exists(_part_path(out_path, p, n_parts))]
    summary["parts_skipped"] = len(mine) - len(todo)
    total = sum(min(part_size, len(examples) - p * part_size) for p in todo)
    bar = Progress(total, label=f"generate rank {rank}") if progress and total else None
    for p in todo:
        idx = list(range(p * part_size, min(len(examples), (p + 1) * part_size)))
        rows, counts = opponent_rows(model, fmt, [examples[i] for i in idx], [(iteration, i) for i in idx],
                                     iteration=iteration, seed=seed, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                     batch_size=batch_size, max_prompt_length=max_prompt_length,
                                     max_length=max_length, progress=bar, sample_fn=sample)
        for k, v in counts.items():
            summary[k] += v
        summary["prompts"] += len(idx)
        write_examples(_part_path(out_path, p, n_parts), rows, "spin")  # atomic
        summary["parts_written"] += 1
    if bar is not None:
        bar.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0 and all(os.path.exists(_part_path(out_path, p, n_parts)) for p in range(n_parts)):
        merge_parts(out_path, n_parts, settings)
        summary["merged"] = True
    summary["wall_s"] = time.perf_counter() - t0
    summary["tokens_per_s"] = summary["generated_tokens"] / max(summary["wall_s"], 1e-9)
    print(f"generate rank {rank}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in summary.items()))
    return summary


def rescore(model_dir, in_path, out_path, fmt, *, device, dtype, max_length, max_prompt_length, batch_size,
            columns=OPPONENT_COLUMNS, impl="auto"):
    """Write in_path's rows again with the log-prob columns `columns` (real, generated) computed
    by the model in model_dir: iteration t-1's pairs mixed into iteration t (the official recipe)
    need log-probs under p_t (OPPONENT_COLUMNS); the geometric-mixture arm needs them under the
    base model too (experiments/arms.BASE_COLUMNS). Other columns are kept. Rows whose tokenisation
    leaves no response are dropped, as training would skip them. Work is split in fixed parts
    (parallel.parts_of); every rank must call it. impl: the kernels (spin_kernels.install)."""
    if os.path.exists(out_path):
        return
    examples, _ = read_examples(in_path, layout="spin")
    kept = tokenized_pairs(fmt, examples, max_length=max_length, max_prompt_length=max_prompt_length)
    rank, world = parallel.rank(), parallel.world()
    model = spin_kernels.install(load_model(model_dir, device=device, dtype=dtype), impl)
    got = []
    for part in parallel.parts_of(len(kept), rank, world):
        prompts = [kept[i][1].prompt_ids for i in part]
        real = score(model, prompts, [kept[i][1].real_ids for i in part], batch_size=batch_size)
        gen = score(model, prompts, [kept[i][1].generated_ids for i in part], batch_size=batch_size)
        got += [(i, float(a), float(b)) for i, a, b in zip(part, real, gen)]
    gathered = [got]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, got)
    if rank == 0:
        for part in gathered:
            for i, a, b in part:
                kept[i][0].extras.update(zip(columns, (a, b)))
        write_examples(out_path, [ex for ex, _ in kept], "spin")
    parallel.barrier()


# ----------------------------------------------------------------------------------------------
# CLI (one process, or torchrun: each rank its parts, a barrier, rank 0 merges)

def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    # -- inputs and outputs
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--tokenizer", default=None,
                    help="folder (or file) with tokenizer.json or tokenizer.model (default: the model folder)")
    ap.add_argument("--chat-template", default=None,
                    help="Jinja chat template file (default: the model's own, else Zephyr's)")
    ap.add_argument("--data", default=None, help=".parquet or .jsonl (spin, messages or prompt/response layout)")
    ap.add_argument("--out", default=None, help="output .parquet; parts go to OUT.parts/")
    ap.add_argument("--num-prompts", type=positive_int, default=None, help="use the first N examples")
    ap.add_argument("--on-bad-row", choices=["raise", "skip"], default="raise",
                    help="a malformed row stops the run (raise, as train.py) or is skipped and counted")
    ap.add_argument("--part-size", type=positive_int, default=256)
    # -- a quick look at a model instead of a dataset
    ap.add_argument("--prompt", action="append", default=None,
                    help="print the model's answer to this user message (repeatable)")
    ap.add_argument("--system", default=None, help="with --prompt/--interactive: a system message")
    ap.add_argument("--interactive", action="store_true", help="chat with the model on the terminal")
    ap.add_argument("--format", choices=["text", "jsonl"], default="text", help="how --prompt answers are printed")
    # -- sampling
    ap.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="default 256, or what the model's positions leave (fit_lengths)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=probability, default=1.0)
    ap.add_argument("--top-k", type=non_negative_int, default=0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--iteration", type=non_negative_int, default=0)
    # -- lengths (the training truncation rule, data/pairs.py)
    ap.add_argument("--max-prompt-length", type=positive_int, default=None,
                    help="default 512, or half of --max-length or of the model's positions when shorter")
    ap.add_argument("--max-length", type=positive_int, default=None,
                    help="default 1024, or the model's positions when fewer")
    # -- hardware
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    ap.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                    help="auto: Triton kernels on GPUs, torch paths on CPUs (default: SPIN_KERNELS, else auto)")
    args = ap.parse_args(argv)
    args.chat = bool(args.prompt or args.interactive)
    if args.chat and (args.data or args.out):
        ap.error("--prompt/--interactive print answers; --data/--out write a dataset: use one or the other")
    if not args.chat and not (args.data and args.out):
        ap.error("give --data and --out (a dataset), or --prompt/--interactive (a quick look at the model)")
    if not args.greedy and not args.temperature > 0:
        ap.error(f"argument --temperature: {args.temperature:g} is not allowed: sampling needs a temperature > 0 "
                 "(for greedy decoding pass --greedy)")
    if args.out and not args.out.lower().endswith(".parquet"):
        ap.error(f"--out {args.out}: the output is Parquet, so its name must end in .parquet")
    return args


DEFAULT_LENGTHS = {"max_new_tokens": 256, "max_prompt_length": 512, "max_length": 1024}


def fit_lengths(args, limit):
    """The length flags left unset take their defaults cut to the model's `limit` positions (a
    demo export has 128), so the defaults always fit; flags given are kept, and checked later
    against the model (chat, generate_dataset). Returns a note naming what was cut, or None."""
    given = {k for k in DEFAULT_LENGTHS if getattr(args, k) is not None}
    if args.max_length is None:
        args.max_length = min(DEFAULT_LENGTHS["max_length"], limit)
    if args.max_prompt_length is None:
        args.max_prompt_length = min(DEFAULT_LENGTHS["max_prompt_length"], args.max_length // 2, limit // 2)
    if args.max_new_tokens is None:
        room = limit // 2 if args.chat else limit - args.max_prompt_length  # a chat's prompt: up to half
        args.max_new_tokens = max(1, min(DEFAULT_LENGTHS["max_new_tokens"], room))
    cut = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in DEFAULT_LENGTHS
           if k not in given and getattr(args, k) != DEFAULT_LENGTHS[k] and (not args.chat or k == "max_new_tokens")]
    return f"the model has {limit} positions: defaults fitted to them: {', '.join(cut)}" if cut else None


def load_format(model_dir, tokenizer=None, chat_template=None):
    """The ChatFormat of a model folder: its tokenizer (tokenizer.json or tokenizer.model) and its
    chat template (--chat-template, else the folder's own, else Zephyr)."""
    tok = load_tokenizer(tokenizer or model_dir)
    return ChatFormat(tok, load_chat_template(model_dir, tok, chat_template))


def chat(model, fmt, args):
    """--prompt: each message answered on its own, in one batch; --interactive: a conversation."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    kw = dict(max_new_tokens=args.max_new_tokens, eos_id=fmt.tok.eos_ids, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
              batch_size=args.batch_size, vocab_limit=fmt.tok.vocab_size)
    limit = model.config.max_position_embeddings
    if args.max_new_tokens >= limit:  # as generate_dataset checks --data's lengths
        raise InputError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{limit} positions (max_position_embeddings)")
    if args.prompt:
        convs = [system + [{"role": "user", "content": p}] for p in args.prompt]
        ids = [fmt.prompt_ids(c) for c in convs]
        for i, p in enumerate(ids):
            if len(p) + args.max_new_tokens > limit:
                raise InputError(f"--prompt {i + 1}: {len(p)} tokens + --max-new-tokens {args.max_new_tokens} exceed "
                                 f"the model's {limit} positions: shorten it or pass a smaller --max-new-tokens")
        outs = sample(model, ids, **kw)
        for p, o in zip(args.prompt, outs):
            answer = answer_text(fmt.tok, o.tokens)
            print(json.dumps({"prompt": p, "answer": answer}) if args.format == "jsonl" else f">>> {p}\n{answer}\n",
                  flush=True)
        return
    if sys.stdin is None or sys.stdin.closed:  # `generate.py --interactive <&-`: input() would fail
        raise InputError("--interactive reads the messages from stdin, which is closed: run it in a terminal, or "
                         "pipe the messages in (one a line), or pass them with --prompt")
    print(f"chatting with {args.model} ({fmt.name}); an empty line starts over, Ctrl-D ends", file=sys.stderr)
    messages = list(system)
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        if not line.strip():
            messages = list(system)
            continue
        message = {"role": "user", "content": line}
        if (n := len(fmt.prompt_ids(system + [message]))) + args.max_new_tokens > limit:  # the conversation is kept
            print(f"(that message is {n} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds the model's "
                  f"{limit} positions: shorten it)", file=sys.stderr)
            continue
        messages.append(message)
        if len(fmt.prompt_ids(messages)) + args.max_new_tokens > limit:
            print(f"(the conversation has outgrown the model's {limit} positions: starting over)", file=sys.stderr)
            messages = list(system) + [message]
        out = sample(model, [fmt.prompt_ids(messages)], stream_keys=[turn], **kw)[0]
        answer = answer_text(fmt.tok, out.tokens)
        print(answer, flush=True)
        messages.append({"role": "assistant", "content": answer})
        turn += 1


def main(argv=None):
    args = parse_args(argv)
    args.kernels = spin_kernels.use_kernels(args.kernels)  # the flag, else SPIN_KERNELS, else auto
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    check_model_folder(args.model)  # a missing folder or one of pickles, named before its tokenizer
    fmt = load_format(args.model, args.tokenizer, args.chat_template)
    config = read_config(args.model)
    check_vocab(fmt.tok, config.vocab_size, f"{args.model} with {fmt.tok.path}")
    if (note := fit_lengths(args, config.max_position_embeddings)) and rank == 0:
        print(note, file=sys.stderr)
    if args.chat:
        chat(spin_kernels.install(load_model(args.model, dtype=args.dtype, device=device), args.kernels), fmt, args)
        return None
    if world_size > 1:
        parallel.init_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    settings = dict(vars(args), tokenizer=fmt.tok.path, chat_format=fmt.name, world_size=world_size,
                    device=str(device))
    if rank == 0:
        print("generate settings:", json.dumps(settings, indent=1))
    examples, report = read_examples(args.data, on_error=args.on_bad_row, need_answer=True)
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    examples = examples[:args.num_prompts] if args.num_prompts else examples
    model = spin_kernels.install(load_model(args.model, dtype=args.dtype, device=device), args.kernels)
    summary = generate_dataset(
        model, fmt, examples, args.out, iteration=args.iteration, seed=args.seed, rank=rank,
        world_size=world_size, part_size=args.part_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        batch_size=args.batch_size, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
        model_id=os.path.abspath(args.model), skipped_rows=report.skipped)
    if rank == 0 and summary["merged"]:
        write_json(os.fspath(args.out) + ".settings.json", dict(settings, summary=summary), indent=2, sort_keys=True)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_command(main)
