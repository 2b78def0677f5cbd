"""Tiny random transformers Mistral checkpoints, the reference the model and generation tests
compare against (no downloads exist on the machines this project is tested on)."""
import torch
import transformers


def random_hf_mistral(folder, *, vocab=97, seed=0, max_shard_size=None, llama=False, **overrides):
    """A random MistralForCausalLM (LlamaForCausalLM with llama=True) saved to `folder`. RMSNorm
    weights are randomised (transformers initialises them to ones, which would hide a norm bug)
    and the embeddings and head widened so that distributions are peaked, as a trained model's are."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.update({} if llama else dict(sliding_window=None))
    cfg.update(overrides)
    if llama:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "embed" in n or "lm_head" in n:
                p.normal_(0, 1.0)
    hf.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return hf, folder
