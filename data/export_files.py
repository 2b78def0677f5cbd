"""The tokenizer side files every export carries, so that the folder describes itself to the tools
users evaluate with (transformers' AutoTokenizer and `apply_chat_template`, lm-eval's
`--apply_chat_template`, `generate`):

    chat_template.jinja      the template the run trained and sampled with: the checkpoint's own,
                             --chat-template, or the built-in Zephyr one written as Jinja
    tokenizer_config.json    the source's, plus the special tokens, `add_bos_token: false` (this
                             project never adds a BOS: data/pairs.py) and, for a SentencePiece
                             tokenizer.model, the class and `legacy: true` that make transformers
                             encode as data/tokenizer.py does
    generation_config.json   the source's, plus bos/eos/pad ids: generation stops at every id the
                             run stops at, and pads with the id the run pads with

`write(folder, fmt)` writes the three into `folder` (rank 0 does, once a run); `file_map(folder,
files)` is the export's file map ({name in an export: source path}) with them in place of the
source's copies.

What a template can and cannot say: `apply_chat_template(prompt, add_generation_prompt=True)`
gives exactly the prompt ids the run used, for every kind. With a Jinja template the response
ids are the rest of the whole conversation's rendering, so the whole conversation matches too.
The Zephyr fallback tokenises the answer on its own (`encode(answer) + [eos]`, as the official
collator does), which no rendering of one string reproduces; its prompts, which are what
generation and evaluation feed the model, still match exactly.

`add_bos_token: false` is what transformers reads for a SentencePiece tokenizer.model. For a
tokenizer.json whose post-processor adds BOS (Llama 3), transformers 5 follows the file and adds
it to plain text; such templates write BOS themselves, and lm-eval adds none to a prompt that
already starts with it, so chat prompts still match. The file is copied unchanged.
"""

import json
import os

from checkpoint import atomic_file
from data.tokenizer_files import read_json

# data/template.py's render_prompt / render_messages, as a Jinja template: an empty system turn
# when the conversation has none (SPIN's prompt always has one), `</s>` spelled out as there.
ZEPHYR_JINJA = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>\\n</s>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def template_text(fmt):
    return ZEPHYR_JINJA if fmt.template is None else fmt.template.text


def _spelling(tok, i):
    return tok.pieces[i] if hasattr(tok, "pieces") else tok.id_to_token(i)


def tokenizer_config(tok, source):
    """The source's tokenizer_config.json (a dict, {} when none) completed as described above.
    Its own `chat_template` entry is dropped: chat_template.jinja holds the one the run used."""
    cfg = {k: v for k, v in source.items() if k != "chat_template"}
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": getattr(tok, "unk_id", None)}
    for key, i in names.items():
        if key not in cfg and i is not None and 0 <= i:
            cfg[key] = tok.template_tokens.get(key) or _spelling(tok, i)
    if "pad_token" not in cfg:  # batches here are padded with EOS (data/pairs.py)
        cfg["pad_token"] = cfg["eos_token"]
    cfg.update(add_bos_token=False, add_eos_token=False)
    if os.path.basename(tok.path) == "tokenizer.model":
        # data/tokenizer.py encodes as LlamaTokenizer(legacy=True) (its docstring says why).
        cfg.setdefault("tokenizer_class", "LlamaTokenizer")
        cfg.setdefault("legacy", True)
    cfg.setdefault("model_max_length", 1 << 30)
    return cfg


def generation_config(tok, source):
    cfg = dict(source)
    eos = list(tok.eos_ids)
    cfg.update(bos_token_id=tok.bos_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
               pad_token_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    cfg.setdefault("transformers_version", "4.40.0")  # read by transformers, 4.x and 5
    return cfg


MADE = ("chat_template.jinja", "tokenizer_config.json", "generation_config.json")


def write(folder, fmt):
    """Write the side files for the tokenizer and template of `fmt` into `folder`."""
    tok = fmt.tok
    src = os.path.dirname(tok.path)
    texts = {
        "chat_template.jinja": template_text(fmt),
        "tokenizer_config.json": json.dumps(tokenizer_config(tok, read_json(os.path.join(src, "tokenizer_config.json"))),
                                            indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation_config(tok, read_json(os.path.join(src, "generation_config.json"))),
                                             indent=2) + "\n",
    }
    for name in MADE:
        with atomic_file(os.path.join(folder, name)) as f:
            f.write(texts[name])


def file_map(folder, files):
    """The export's file map `files` ({name: source path}) with the files write() made in `folder`."""
    return {**files, **{name: os.path.join(folder, name) for name in MADE}}
