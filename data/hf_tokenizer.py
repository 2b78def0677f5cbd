"""Tokenizers shipped as `tokenizer.json` (Llama 3, SmolLM2, Mistral v0.3+, Qwen-style vocabularies),
read with Hugging Face's `tokenizers` library and set up the way transformers' AutoTokenizer sets
them up, so that ids and text equal `AutoTokenizer.from_pretrained(folder)`'s
`encode(text, add_special_tokens=False)` and `decode(ids)`.

What transformers adds on top of the bare `tokenizer.json` (transformers 5, TokenizersBackend),
and this class repeats:
- tokenizer_config.json names the special tokens (`bos_token`, `eos_token`, `unk_token`,
  `pad_token`, ..., any other `*_token`, `extra_special_tokens` / `additional_special_tokens`),
  as strings or AddedToken objects. Its `added_tokens_decoder` and every named token missing
  from the file's added tokens are added to the vocabulary, named ones as special tokens. A named
  token that was not in the vocabulary at all gets a new id, which `vocab_size` counts.
  Configs without `added_tokens_decoder` (older ones) take the names from
  special_tokens_map.json, which then overrides tokenizer_config.json.
- `split_special_tokens` (default false) and `clean_up_tokenization_spaces` (applied only when
  the model is not BPE: transformers skips it for BPE, where it would corrupt text).
- Truncation and padding stored in tokenizer.json are ignored: encode() never truncates or pads.
- No BOS or EOS is added by encode(); the chat template writes them as text.

Literal special-token text in content, e.g. a user who types "<|im_end|>", becomes the special
token (id 2 in SmolLM2), exactly as in transformers: its `encode` and its
`apply_chat_template` (unless called with `sanitize_control_tokens=True`, off by default)
tokenise the rendered text as a whole, matching added tokens wherever they occur. So the ids
equal what the checkpoint's own tooling produces, including that a prompt can forge a turn
boundary.

Where this can differ from AutoTokenizer: for a folder whose `tokenizer_class` is a model-specific
class that rebuilds the pipeline from the vocabulary (for example `GPT2Tokenizer` or a Metaspace
`LlamaTokenizer`), transformers uses that class's normalizer and pre-tokenizer, not the file's.
This class always follows tokenizer.json, which is what the `tokenizers` library, TGI and vLLM
read. (For byte-level files declared as `LlamaTokenizer`, as Llama 3 does, transformers itself
switches to the file's pipeline.) transformers' opt-in `fix_mistral_regex` patch is not applied.
"""

import os

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from data.tokenizer_files import NAMED_TOKENS, generation_ids, read_json, tokenizer_files
from errors import InputError


def _added_token(value, where):
    # tokenizer_config.json spells AddedTokens as dicts with a "__type" marker; special_tokens_map.json without.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
        return AddedToken(value["content"], **fields)
    raise InputError(f"{where}: expected a token string or an AddedToken object, got {value!r}")


def _text(token):
    return token if isinstance(token, str) else token.content


def _cleanup_spaces(text):
    # transformers' clean_up_tokenization: WordPiece-era rules that glue punctuation back on.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _add_config_tokens(backend, cfg, where):
    """Add to `backend` what tokenizer_config.json adds in transformers: its added_tokens_decoder,
    then every named or extra special token not yet an added token (named ones as special).
    Returns the named tokens, {attribute: str or AddedToken}."""
    added = []  # the config's added tokens, in id order (transformers ignores their ids: the vocabulary decides)
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise InputError(f"{where}: field 'added_tokens_decoder': expected an object of id -> token")
    for idx in sorted(decoder, key=int):
        added.append(_added_token(decoder[idx], f"{where}: added_tokens_decoder[{idx}]"))

    # Named: the standard seven, and any other `*_token` string (model-specific, e.g. image_token).
    named = {}
    for key, value in cfg.items():
        token_like = isinstance(value, str) or (isinstance(value, dict) and "content" in value)
        if value is not None and (key in NAMED_TOKENS or (key.endswith("_token") and token_like)):
            named[key] = _added_token(value, f"{where}: field {key!r}")
    extras = cfg.get("extra_special_tokens", cfg.get("additional_special_tokens")) or []
    if isinstance(extras, dict):  # the dict form names them: model-specific tokens
        named.update({k: _added_token(v, f"{where}: extra_special_tokens[{k!r}]") for k, v in extras.items()})
        extras = []
    extras = [_added_token(v, f"{where}: extra_special_tokens") for v in extras]

    known = {t.content for t in backend.get_added_tokens_decoder().values()} | {_text(t) for t in added}
    to_add = list(added)
    for token in list(named.values()) + extras:
        if _text(token) not in known and token not in to_add:
            to_add.append(token)
    named_texts = {_text(t) for t in named.values()}
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True, normalized=False)
        elif not token.special and token.content in named_texts:
            token = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized, special=True)
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)
    return named


class HFTokenizer:
    def __init__(self, folder):
        folder = os.fspath(folder)
        self.path = os.path.join(folder, "tokenizer.json")
        self.folder = folder
        try:
            backend = _Backend.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{self.path}: not a readable tokenizers file ({first})") from None
        backend.no_truncation()
        backend.no_padding()
        config_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(config_path)
        # Older configs: the named tokens live in special_tokens_map.json (which then wins) and
        # the added tokens only in tokenizer.json, which the backend has already loaded.
        where = config_path
        if "added_tokens_decoder" not in cfg:
            smap_path = os.path.join(folder, "special_tokens_map.json")
            smap = read_json(smap_path)
            if smap:
                cfg, where = {**cfg, **smap}, f"{config_path} / {smap_path}"
        named = _add_config_tokens(backend, cfg, where)

        split = cfg.get("split_special_tokens", False)
        backend.encode_special_tokens = bool(split)
        self._cleanup = bool(cfg.get("clean_up_tokenization_spaces", False)) and type(backend.model).__name__ != "BPE"
        self._backend = backend

        # The spellings chat templates receive as variables (transformers' special_tokens_map).
        self.template_tokens = {k: _text(v) for k, v in named.items()}
        self.bos_token = self.template_tokens.get("bos_token")
        self.eos_token = self.template_tokens.get("eos_token")
        self.unk_token = self.template_tokens.get("unk_token")
        self.pad_token = self.template_tokens.get("pad_token")

        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.unk_id = self._id(self.unk_token)
        # The tokenizer's own token first, then what generate() would read (generation_config.json, config.json).
        self.bos_id = self._id(self.bos_token)
        if self.bos_id is None:
            self.bos_id = next(iter(generation_ids(folder, "bos_token_id")), None)
        gen_eos = generation_ids(folder, "eos_token_id")
        self.eos_id = self._id(self.eos_token)
        if self.eos_id is None:
            if not gen_eos:
                raise InputError(
                    f"{folder}: no EOS token: set eos_token in tokenizer_config.json or eos_token_id in generation_config.json"
                )
            self.eos_id = gen_eos[0]
        # Generation stops at any of these: Llama 3 lists <|eot_id|> and <|end_of_text|>.
        self.eos_ids = tuple(dict.fromkeys([*gen_eos, self.eos_id]))
        self.pad_id = self._id(self.pad_token)
        if self.pad_id is None:
            self.pad_id = next(iter(generation_ids(folder, "pad_token_id")), None)
        bad = [i for i in (self.bos_id, self.pad_id, *self.eos_ids) if i is not None and not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"{folder}: special token id(s) {bad} outside the vocabulary (size {self.vocab_size})")
        self.files = tokenizer_files(folder, "tokenizer.json")

    def _id(self, token):
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text):
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _cleanup_spaces(text) if self._cleanup else text

    def id_to_token(self, i):
        return self._backend.id_to_token(int(i))
