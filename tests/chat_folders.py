"""Tokenizer folders for the chat-template and tokenizer tests, written by the tests themselves
(no model hub here): a small Llama-3-style byte-level BPE with Llama 3's special tokens and
template, and the real Mistral-7B tokenizer.model with alignment-handbook's Zephyr template."""

import importlib.util
import json
import os
import shutil

import pytest

# Meta's Llama 3 pre-tokenizer split pattern (public, in every Llama 3 tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Llama-3-8B-Instruct's template, laid out for reading (the whitespace control keeps the output identical).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# alignment-handbook's Zephyr template (zephyr-7b-sft-full's tokenizer_config.json).
ZEPHYR_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers: 1234567 3.14159 1,000,000 and 2024-11-29.",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 中文, 😀🎉",
    "Tabs\tand  double  spaces\n\n\nnew lines   trailing   ",
    "user assistant system: You are a helpful assistant. What is the capital of France? Paris.",
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)


def llama3_folder(folder, *, config=None, generation=True):
    """A Llama-3-style tokenizer folder: byte-level BPE (vocab ~600) trained here, Llama 3's split
    pattern and special tokens, BOS post-processor, eos list in generation_config.json.
    `config` entries are merged into tokenizer_config.json (None deletes a key)."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 5, trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bot = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1", special_tokens=[("<|begin_of_text|>", bot)]
    )
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
    }
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write_json(os.path.join(folder, "tokenizer_config.json"), cfg)
    if generation:
        ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
        write_json(
            os.path.join(folder, "generation_config.json"),
            {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]},
        )
    return folder


def mistral_model_file():
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common (test-only extra) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    return path


def zephyr_folder(folder):
    """Mistral-7B v0.1's tokenizer.model with zephyr-7b-sft-full's tokenizer settings and template."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(mistral_model_file(), os.path.join(folder, "tokenizer.model"))
    write_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "</s>",
            "chat_template": ZEPHYR_TEMPLATE,
        },
    )
    return folder
