"""Decode throughput: our `generate.sample` against transformers' `generate`, same weights.

Claim (issue 5): >= 3x transformers' tokens/s on CPU at batch 8, 32-token prompts, 64 new
tokens, a 4-layer 256-wide Mistral with vocab 32000, plain sampling (temperature 1, top_k 0,
top_p 1), EOS ignored so both produce exactly 64 tokens per row. Medians over repeats, in one run.

    python bench/generate.py                 # CPU figures -> bench/RESULTS_generate_cpu.md
    python bench/generate.py --repeats 7 --threads 2

The real-model shape (issue 14): a pretrained chat checkpoint from its folder, 8 chat prompts of
different lengths rendered by its own template (left-padded for both sides), 64 new tokens at
temperature 1, float32, 2 threads; goal >= 3x transformers. The run also measures the machine's
read bandwidth (a float32 sum over a buffer far larger than the caches) and prints the fraction
of the memory-bandwidth roofline each side reaches: weight bytes read per decode step (every
parameter once; the tied embedding once) / bandwidth, against the measured time per new token
(prefill included, so the fraction is a lower bound):

    python -m spin_tools.smollm2                  # builds SmolLM2-135M-Instruct once, prints its folder
    python bench/generate.py --model ~/.cache/spin/smollm2-135m-instruct --threads 2

GPU goal (not run here; no figures are claimed): batch-1 bf16 decode of a Mistral-7B-shaped model
at >= 70% of the HBM roofline, i.e. tokens/s >= 0.7 * bandwidth / weight bytes
(7.24e9 params * 2 B = 14.5 GB; H100 SXM 3.35 TB/s -> roofline ~231 tok/s, goal ~162 tok/s):

    python bench/generate.py --device cuda --dtype bfloat16 --shape 7b --batch 1 \
        --prompt-len 128 --new-tokens 256 --repeats 3 --no-hf --cuda-graph both

(--shape 7b builds the model with random weights on the device; --no-hf skips the baseline;
--cuda-graph both times the eager decode and the CUDA-graph replay of generate.graphed_step,
which has never run on a GPU, in the same run. The two differ in attention too: eager decode
uses the Triton decode kernel, the graph the torch path over every cache slot (for bf16 with
GQA most likely SDPA's math backend: K/V repeated per head, 2 x 32 x 384 slots per token, small
next to the 14.5 GB of weights). A graph run's time includes its capture: two eager warm-up
steps and the recording, about 1% of 256 tokens.)
Record the card, command and figures in bench/RESULTS.md.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import load_format, sample  # noqa: E402
import spin_kernels  # noqa: E402
from hf_folder import load_model  # noqa: E402
from model import Mistral, ModelConfig  # noqa: E402

CHAT = ["Hi!", "What is the capital of France?", "Write a haiku about the sea and the wind at night.",
        "Explain in two sentences why the sky is blue, for a ten-year-old who likes physics.",
        "List three prime numbers.", "Translate 'good morning, how are you today?' into Spanish and French.",
        "Give me a short recipe for pancakes with the ingredients and the steps, in a numbered list please.",
        "What is 17 times 23?"]

SHAPES = {
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device, dtype):
    """Our model and transformers' (None with --no-hf) on the same weights, and the prompts:
    real chat prompts of different lengths (left-padded for transformers) with --model, else random ids."""
    torch.manual_seed(0)
    hf = None
    if args.model:
        import transformers
        fmt = load_format(args.model)
        prompts = [fmt.prompt_ids([{"role": "user", "content": c}]) for c in (CHAT * args.batch)[:args.batch]]
        ours = load_model(args.model, dtype=dtype, device=device)
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        T = max(map(len, prompts))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        print(f"{args.model}: prompts of {sorted(map(len, prompts))} tokens")
    elif args.no_hf:  # random weights straight on the device (a 7B does not fit a temp folder quickly)
        cfg = ModelConfig(**SHAPES[args.shape], max_position_embeddings=4096, dtype=args.dtype)
        with torch.device(device):
            ours = Mistral(cfg).to(dtype).eval()
    else:
        import transformers
        hf_cfg = transformers.MistralConfig(**SHAPES[args.shape], max_position_embeddings=4096,
                                            tie_word_embeddings=False)
        hf = transformers.MistralForCausalLM(hf_cfg).eval()
        folder = tempfile.mkdtemp(prefix="bench-generate-")
        hf.save_pretrained(folder)
        hf = hf.to(device=device, dtype=dtype)
        ours = load_model(folder, dtype=dtype, device=device)
    spin_kernels.install(ours)  # what generate.py runs: auto (SPIN_KERNELS, else by device)
    if not args.model:
        ids = torch.randint(3, 32000, (args.batch, args.prompt_len))
        prompts, mask = ids.tolist(), torch.ones_like(ids)
    return ours, hf, prompts, ids, mask


def print_roofline(args, ours, runs, med, n_tokens, device):
    """The fraction of the memory-bandwidth roofline each side reaches: a decode step reads every weight once."""
    if device.type == "cpu":
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied: counted once
        bw = read_bandwidth()
        roof_s = weight_bytes / bw  # one decode step cannot take less than reading every weight once
        print(f"read bandwidth {bw / 1e9:.1f} GB/s (float32 sum of a 2 GB buffer, best of 5); weights "
              f"{weight_bytes / 1e6:.0f} MB -> at least {roof_s * 1e3:.1f} ms per decode step")
        for k in runs:
            per_token = med[k] / args.new_tokens
            print(f"  {k}: {per_token * 1e3:.1f} ms per new token (prefill included): "
                  f"{roof_s / per_token:.0%} of the roofline")
    if device.type == "cuda":
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        bw = float(os.environ.get("HBM_BYTES_PER_S", 3.35e12))  # H100 SXM; set for other cards
        roof = bw / weight_bytes * args.batch
        print(f"roofline (weights {weight_bytes / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s): {roof:.1f} tok/s")
        for k in runs:
            if k != "transformers":
                print(f"  {k} at {n_tokens / med[k] / roof:.0%} of it (the prefill included)")


def main():
    ap = argparse.ArgumentParser()
    # -- workload
    ap.add_argument("--shape", default="small", choices=SHAPES)
    ap.add_argument("--model", default=None, help="a Hugging Face folder (real weights, its chat template)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    # -- hardware
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--cuda-graph", default="off", choices=["off", "on", "both"],
                    help="replay decode steps from a CUDA graph (generate.graphed_step); both: time each")
    # -- slot refill on random weights (issue 24): rows that end early, more prompts than rows
    ap.add_argument("--num-prompts", type=int, default=None, help="prompts to sample (default: --batch)")
    ap.add_argument("--stop-ids", type=int, default=0,
                    help="ids 3..3+N end a row (a stand-in for EOS with random weights: N=400 of 32000 "
                         "ends a row after ~80 tokens on average); times slot refill against static batches")
    args = ap.parse_args()
    if (args.num_prompts or args.stop_ids) and not args.no_hf:
        ap.error("--num-prompts / --stop-ids time ours only: add --no-hf")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print("settings:", vars(args), f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    ours, hf, prompts, ids, mask = build(args, device, dtype)
    if args.num_prompts:
        prompts = torch.randint(3, 32000, (args.num_prompts, args.prompt_len),
                                generator=torch.Generator().manual_seed(1)).tolist()
    stops = list(range(3, 3 + args.stop_ids)) or None
    n_tokens = len(prompts) * args.new_tokens
    made = {}  # tokens each run produced: fewer than n_tokens when rows stop

    def ours_with(cuda_graph, refill=True):
        def run(seed):
            out = sample(ours, prompts, max_new_tokens=args.new_tokens, eos_id=stops, temperature=1.0,
                         seed=seed, batch_size=args.batch, cuda_graph=cuda_graph, refill=refill)
            assert stops or all(len(o.tokens) == args.new_tokens for o in out)
            made[seed] = sum(len(o.tokens) for o in out)
        return run

    def run_hf(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + args.new_tokens

    names = {"off": ["ours"], "on": ["ours+graph"], "both": ["ours", "ours+graph"]}[args.cuda_graph]
    runs = {k: ours_with(k == "ours+graph") for k in names}
    if stops:  # the same samples through static batches (refill=False)
        runs.update({k + " static": ours_with(k == "ours+graph", refill=False) for k in names})
    if hf is not None:
        runs["transformers"] = run_hf
    times = {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up
        fn(0)
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn(r + 1)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name} repeat {r + 1}: {times[name][-1] * 1e3:.1f} ms", flush=True)  # kept if killed
    med = {k: statistics.median(v) for k, v in times.items()}
    if stops:  # every run of a repeat drew the same samples (same seed); tokens per repeat differ
        n_tokens = statistics.median(made[r + 1] for r in range(args.repeats))
        print(f"rows stop at ids 3..{2 + args.stop_ids}: median {n_tokens} tokens per run of {len(prompts)} prompts")
        for k in names:
            print(f"ratio {k} (slot refill) / {k} static: {med[k + ' static'] / med[k]:.2f}x")
    for k in runs:
        print(f"{k:>12}: median {med[k] * 1e3:8.1f} ms  {n_tokens / med[k]:9.1f} tok/s  "
              f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in times[k])} ms)")
    if hf is not None:
        for k in runs:
            if k != "transformers":
                print(f"ratio {k} / transformers: {med['transformers'] / med[k]:.2f}x (target >= 3x on CPU)")
    print_roofline(args, ours, runs, med, n_tokens, device)


def read_bandwidth(nbytes=2 << 30):
    """Bytes per second a float32 sum reads from a buffer far larger than the caches, best of 5."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


if __name__ == "__main__":
    main()
