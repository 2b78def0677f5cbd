"""What a Hugging Face model folder says about its tokenizer, besides the vocabulary itself.

Shared by both tokenizers (data/tokenizer.py for `tokenizer.model`, data/hf_tokenizer.py for
`tokenizer.json`): the JSON side files, the special-token spellings, the ids generation stops
at, and the list of files an export must copy so that transformers reads the same tokenizer
and chat template from it.
"""

import json
import os

from errors import InputError

# The named special tokens transformers keeps on every tokenizer (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Besides the vocabulary file: what transformers reads when it loads a tokenizer and its chat
# template, plus generation_config.json for the stop ids. Order is the order they are listed.
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
TEMPLATE_DIR = "chat_templates"  # extra named templates, one `NAME.jinja` each


def read_json(path):
    """The parsed file, or {} when it does not exist. A file that is not a JSON object is an
    error naming it: guessing defaults past a broken config would tokenise silently wrong."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e}); restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def token_text(value, where):
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict
    (`{"__type": "AddedToken", "content": ...}`). Returns the string, or None when unset."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise InputError(f"{where}: expected a token string or an AddedToken object, got {value!r}")


def tokenizer_files(folder, vocab_file):
    """Names (relative to `folder`) of the files an export must copy to carry this tokenizer
    and its chat template: the vocabulary file, then whichever side files exist."""
    names = [vocab_file] + [f for f in SIDE_FILES if os.path.isfile(os.path.join(folder, f))]
    tdir = os.path.join(folder, TEMPLATE_DIR)
    if os.path.isdir(tdir):
        names += [f"{TEMPLATE_DIR}/{f}" for f in sorted(os.listdir(tdir)) if f.endswith(".jinja")]
    return names


def _ids(value, where):
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"{where}: expected an id or a list of ids, got {value!r}")
    return values


def generation_ids(folder, name):
    """`name` (eos_token_id, bos_token_id, pad_token_id) as transformers' generate() sees it:
    from generation_config.json, else from settings.json (transformers builds the generation
    config from the model config when the folder has none). A list for eos (Llama 3 stops at
    <|eot_id|> and <|end_of_text|>); [] when unset."""
    for f in ("generation_config.json", "config.json"):
        path = os.path.join(folder, f)
        value = read_json(path).get(name)
        if value is not None:
            return _ids(value, f"{path}: field {name!r}")
    return []
