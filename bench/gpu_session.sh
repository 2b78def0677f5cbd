#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (about 15 minutes of device time):
# CUDA tests first (the interpreter cannot catch compile failures, races or bf16 numerics),
# then every benchmark against its baseline. Run from the repository root:
#     OUT=/tmp/gpu bash bench/gpu_session.sh        (on the device tool: OUT=$OUT)
# Everything lands in $OUT; copy the figures, with the card's name, into bench/RESULTS.md.
set -u
out=${OUT:-bench/gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
step() { echo "== $*" | tee -a "$out/log.txt"; timeout 240 "$@" 2>&1 | tail -40 | tee -a "$out/log.txt"; }
step python -m pytest -q -x -k cuda tests/test_logprob.py tests/test_attention.py tests/test_model.py
step python bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 8192
step python bench/logprob.py --device cuda --dtype bf16 --C 4096 --V 32000 --N 32768
step python bench/attention.py --impl triton --out "$out/attention.json"
step python bench/generate.py --device cuda --dtype bfloat16 --shape 7b --batch 1 --prompt-len 128 --new-tokens 256 --repeats 3 --no-hf
step python bench/train.py --device cuda --dtype bf16 --batch 8 --steps 20
# train.py's GPU path (cpu:gloo,cuda:nccl, bf16 compute, Triton kernels) has never run: a short demo.
step python train.py --out "$out/demo" --num-prompts 256 --eval-prompts 64 --sft-steps 60 --iterations 1 --batch-size 32
