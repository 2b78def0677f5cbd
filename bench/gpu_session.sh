#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (about 15 minutes of device time,
# machine start included; at most 10 minutes per command). Parts, one device call each:
#     OUT=$OUT bash bench/gpu_session.sh tests    # CUDA kernel/model/generate tests (~3-4 min cold)
#     OUT=$OUT bash bench/gpu_session.sh bench    # the issues' GPU goals (<= 480 s of caps)
#     OUT=$OUT bash bench/gpu_session.sh extra    # bench/train.py + a short train.py run, if time is left
# Tests come first: the interpreter cannot catch compile failures, races or bf16 numerics.
# Each step writes its own log into $OUT (unbuffered, so a step killed by its timeout keeps
# what it printed); the device tool returns at most 8 files from $OUT, so nothing else goes
# there (each part writes at most 5).
# Copy the figures, with the card's name, into bench/RESULTS.md.
set -u
out=${OUT:-bench/gpu_out}
part=${1:-all}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/gpu.txt"
step() {  # step NAME SECONDS CMD...: the command's output goes to $OUT/NAME.log and the console
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" | tee -a "$out/$name.log"
  timeout "$secs" "$@" 2>&1 | tee -a "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}
if [ "$part" = tests ] || [ "$part" = all ]; then
  # No -x: one failure must not hide the others.
  step tests 400 $py -m pytest -q -k cuda tests/test_logprob.py tests/test_attention.py tests/test_model.py \
      tests/test_generate.py
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  # Ordered by the issues' GPU goals: decode roofline (5), log-probs at N=32768 (6),
  # attention at T=8k and the window trend at T=16k (7). Each step prints as it goes.
  step generate 150 $py bench/generate.py --device cuda --dtype bfloat16 --shape 7b --batch 1 \
      --prompt-len 128 --new-tokens 256 --repeats 3 --no-hf --cuda-graph both
  # Slot refill (issue 24) against static batches on the GPU: 64 rows, 128 prompts, rows ending
  # at a random stand-in EOS (~128 tokens on average), eager (Triton decode) and CUDA-graph steps.
  step refill 150 $py bench/generate.py --device cuda --dtype bfloat16 --shape 7b --batch 64 \
      --num-prompts 128 --prompt-len 64 --new-tokens 256 --stop-ids 250 --repeats 2 --no-hf --cuda-graph both
  step logprob 120 $py bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 32768
  step attention 150 $py bench/attention.py --impl triton --seqlens 8192 16384 --reps 3 \
      --out "$out/attention.json"
  step logprob 60 $py bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 8192
fi
if [ "$part" = extra ] || [ "$part" = all ]; then  # only if device time is left
  step train 60 $py bench/train.py --device cuda --dtype bf16 --batch 8 --steps 20
  # train.py's GPU path (cpu:gloo,cuda:nccl, bf16 compute, Triton kernels) has never run.
  # Its run folder stays outside $OUT; only the metrics come back.
  step demo 120 $py train.py --out /tmp/spin-gpu-demo --num-prompts 256 --eval-prompts 64 \
      --sft-steps 60 --iterations 1 --batch-size 32
  cat /tmp/spin-gpu-demo/metrics.jsonl >> "$out/demo.log" 2>/dev/null
fi
