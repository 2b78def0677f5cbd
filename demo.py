"""The embedded demo that `train.py` runs without --model: a task generated at start-up
(data/task.py), a byte-fallback BPE tokenizer trained on it, and a randomly initialised tiny
Mistral, written as an ordinary Hugging Face folder so that everything after this point takes
the same path as a user's checkpoint.

DEFAULTS are the flags the demo runs with unless given; the sweep that chose them is in
EXPERIMENTS.md.
"""
import math
import os

import torch

import parallel
from settings import Preset
from data import readers, task
from data.template import render_prompt
from data.tokenizer import Tokenizer, train_tokenizer
from hf_folder import save_model
from model import Mistral, ModelConfig

# ckpt_every 100: a checkpoint costs about as much as a few steps of this tiny model, and a killed
# demo loses at most ~10 s; checkpoints never change the losses (measured: 20 and 100 bitwise equal,
# 5m11s and 4m48s under torchrun on the Intel box).
DEFAULTS = Preset(iterations=3, beta=[2.0], lr=[3e-5], epochs=3.0, batch_size=64, micro_batch_size=32,
                  optimizer="rmsprop", max_new_tokens=32, temperature=1.0, max_length=128,
                  max_prompt_length=64, mix_previous=True, eval_prompts=500, baseline=True,
                  ckpt_every=100, gen_batch_size=256, num_prompts=2000, sft_steps=400, sft_lr=3e-3,
                  demo_dim=96, demo_layers=3, vocab=384, task="addition", task_digits=3, val_prompts=0)


def tiny_config(vocab_size, dim, layers, max_length, bos_id, eos_id):
    """hidden `dim`, SwiGLU width 8/3 of it, heads of 32 dims, one kv head per two query heads."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=int(8 * dim / 3) // 8 * 8,
                       num_hidden_layers=layers, num_attention_heads=max(1, dim // 32),
                       num_key_value_heads=max(1, dim // 64), head_dim=32, max_position_embeddings=max_length,
                       bos_token_id=bos_id, eos_token_id=eos_id)


def prepare(cfg):
    """Task files, tokenizer and initial model in the run folder (rank 0 writes them; a previous
    attempt's finished folder is reused). cfg: a settings.Config. Returns (train file, held-out file,
    init folder); with val_prompts the data folder also holds val.jsonl."""
    out, d, data = cfg.run.out, cfg.demo, cfg.data
    data_dir, tok_dir, init_dir = (os.path.join(out, d) for d in ("data", "tokenizer", "init"))

    def build():
        if os.path.exists(init_dir):
            return
        train_path, _ = task.write_task(data_dir, seed=cfg.run.seed, n_train=data.num_prompts,
                                        n_heldout=data.eval_prompts, digits=d.task_digits, kind=d.task,
                                        n_val=d.val_prompts)
        examples, _ = readers.read_examples(train_path)
        tok_path = train_tokenizer([render_prompt(ex.prompt) + ex.response for ex in examples], tok_dir,
                                   vocab_size=d.vocab)
        tok = Tokenizer(tok_path)
        L = d.demo_layers
        config = tiny_config(tok.vocab_size, d.demo_dim, L, data.max_length, tok.bos_id, tok.eos_id)
        torch.manual_seed(cfg.run.seed)
        model = Mistral(config)
        with torch.no_grad():  # GPT-2 style init; residual projections scaled by depth
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                    p.normal_(0.0, std)
        save_model(model, init_dir, extra_files={"tokenizer.model": tok_path})

    parallel.on_rank0(build)
    return os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl"), init_dir
