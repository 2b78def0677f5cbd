"""The Mistral tokenizer, encoding exactly as transformers' `LlamaTokenizer(legacy=True)`.

Mistral-7B v0.1 and the models SPIN starts from (zephyr-7b-sft-full) declare
`"legacy": true`, and every published SPIN number was computed on token ids produced by
transformers' tokenizer, not by SentencePiece's own encoder. The two differ, so this file
reproduces the transformers pipeline on top of the SentencePiece model's vocabulary:

1. Split the text on special tokens (`<unk>`, `<s>`, `</s>` and any other control piece),
   leftmost-longest match. Written in the text, they become their ids.
2. Each remaining segment: spaces become '▁', and a '▁' is prepended unless the segment
   already starts with one (Metaspace, prepend_scheme="always"). Because this happens per
   segment, `</s>\\n` encodes as `</s> ▁ \\n` (2, 28705, 13): the legacy quirk.
3. The segment is NOT split on whitespace (unlike SentencePiece's own encoder), and is
   merged by BPE with transformers' merge ranks: pair (l, r) has rank (id(l + r), len(l)),
   lowest rank first, leftmost on ties. So "hello  world" is `▁hell o ▁▁ world` here but
   `▁hell o ▁ ▁world` in SentencePiece.
4. Characters not in the vocabulary fall back to their UTF-8 bytes (`<0xNN>` pieces).

Only BPE models are supported (Mistral's is BPE; transformers treats unigram models with a
different algorithm). No BOS is added: callers add `bos_id` where they want it.
"""

import heapq
import os
import re

import sentencepiece as spm

from checkpoint import atomic_file
from data.tokenizer_files import NAMED_TOKENS, generation_ids, read_json, token_text, tokenizer_files
from errors import InputError, MissingInput

_SPACE = "\u2581"  # '▁', SentencePiece's visible space


class Tokenizer:
    def __init__(self, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise MissingInput(f"tokenizer file not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                sp.LoadFromSerializedProto(f.read())
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise InputError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.path = path
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.unk_id()
        self.pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.piece_to_id = {p: i for i, p in enumerate(self.pieces)}
        self.special_ids = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self._byte_ids = {}
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                self._byte_ids[int(self.pieces[i][3:5], 16)] = i
        if len(self._byte_ids) < 256 and len(self.pieces) > 0:
            # transformers' BPE also maps unknown characters to bytes; without all 256 byte
            # pieces some text would need <unk>, whose handling we do not reproduce.
            raise InputError(f"{path}: the model has no byte fallback (need all 256 <0xNN> pieces)")
        self._folder_settings(os.path.dirname(path))
        specials = sorted((self.pieces[i] for i in self.special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in specials))
        self._cache = {}

    def _folder_settings(self, folder):
        # What the files beside the model add (the same attributes HFTokenizer has): the token
        # spellings chat templates receive, the ids generation stops at, pad, and what an export
        # copies. The ids themselves stay the model's own.
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(cfg_path)
        own = (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id))
        self.template_tokens = {k: self.pieces[i] for k, i in own if 0 <= i < self.vocab_size}
        for key in NAMED_TOKENS:
            text = token_text(cfg.get(key), f"{cfg_path}: field {key!r}")
            if text is not None:
                self.template_tokens[key] = text
        # transformers would also match tokens the folder adds on top of the SentencePiece model
        # (ChatML's <|im_start|> on a Mistral base, say); this reader encodes the model alone.
        foreign = [t for t in self.template_tokens.values() if t not in self.piece_to_id]
        for i, t in (cfg.get("added_tokens_decoder") or {}).items():
            text = token_text(t, f"{cfg_path}: added_tokens_decoder[{i}]")
            if not (str(i).isdigit() and int(i) < self.vocab_size and self.pieces[int(i)] == text):
                foreign.append(text)
        foreign += list(read_json(os.path.join(folder, "added_tokens.json")))
        if foreign:
            raise InputError(
                f"{folder}: tokenizer_config.json / added_tokens.json add tokens that {os.path.basename(self.path)} lacks "
                f"({', '.join(map(repr, sorted(set(foreign))[:5]))}); give the folder a tokenizer.json, e.g. "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) with transformers"
            )
        self.bos_token = self.template_tokens.get("bos_token")
        self.eos_token = self.template_tokens.get("eos_token")
        self.eos_ids = tuple(dict.fromkeys([*generation_ids(folder, "eos_token_id"), self.eos_id]))
        pad = self.template_tokens.get("pad_token")
        self.pad_id = self.piece_to_id.get(pad) if pad is not None else None
        if self.pad_id is None:
            self.pad_id = next(iter(generation_ids(folder, "pad_token_id")), None)
        self.files = tokenizer_files(folder, os.path.basename(self.path))

    # -- encoding ---------------------------------------------------------------------
    def encode(self, text):
        ids = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids.extend(self._encode_segment(text[pos : m.start()]))
            ids.append(self.piece_to_id[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_segment(text[pos:]))
        return ids

    def _encode_segment(self, segment):
        s = segment.replace(" ", _SPACE)
        if not s.startswith(_SPACE):
            s = _SPACE + s
        cached = self._cache.get(s)
        if cached is None:
            cached = self._bpe(s)
            if len(self._cache) < 100_000:
                self._cache[s] = cached
        return list(cached)

    def _bpe(self, s):
        # Symbols are strings of the vocabulary, or None for a byte-fallback character
        # (bytes never merge: no piece in the vocabulary starts with "<0x" plus more text).
        sym = [c if c in self.piece_to_id else None for c in s]
        n = len(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < n and sym[i] is not None and sym[j] is not None:
                merged = self.piece_to_id.get(sym[i] + sym[j])
                if merged is not None:
                    heapq.heappush(heap, (merged, len(sym[i]), i, sym[i], sym[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or sym[i] != left or sym[j] != right:
                continue  # stale entry: one side has merged since it was pushed
            sym[i] = left + right
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)

        ids = []
        i = 0
        while i < n:
            if sym[i] is None:
                ids.extend(self._byte_ids[b] for b in s[i].encode("utf-8"))
            else:
                ids.append(self.piece_to_id[sym[i]])
            i = nxt[i]
        return ids

    # -- decoding ---------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """transformers' decoder: '▁' -> ' ', byte pieces -> UTF-8, drop one leading space."""
        out, pending = [], bytearray()

        def flush():
            if pending:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending.clear()

        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            piece = self.pieces[i]
            if self.sp.is_byte(i):
                pending.append(int(piece[3:5], 16))
                continue
            flush()
            out.append(piece.replace(_SPACE, " "))
        flush()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def train_tokenizer(texts, out_dir, vocab_size=512):
    """Train a small byte-fallback BPE SentencePiece model laid out like Mistral's
    (<unk>=0, <s>=1, </s>=2, no pad) and write `out_dir/tokenizer.model` atomically.

    Normalisation is off and the dummy prefix on, matching how transformers reads the
    model. BPE training uses no randomness (all sentences, no shuffling, one thread), so the
    file is a function of `texts` and `vocab_size` alone.
    """
    os.makedirs(out_dir, exist_ok=True)
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts")
    path = os.path.join(out_dir, "tokenizer.model")
    with atomic_file(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=f,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    return path


class TokenizerNotFound(InputError):
    pass


def load_tokenizer(folder_or_file):
    """A model folder's tokenizer: `tokenizer.json` -> HFTokenizer (what transformers'
    AutoTokenizer prefers too), else `tokenizer.model` -> the SentencePiece Tokenizer above.
    The path of either file is accepted as well. Anything else is a TokenizerNotFound naming
    the path, what was expected and what is there."""
    from data.hf_tokenizer import HFTokenizer  # here: data.hf_tokenizer needs the tokenizers package

    path = os.fspath(folder_or_file)
    expected = "a model folder with tokenizer.json (Hugging Face tokenizers) or tokenizer.model (SentencePiece)"
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name == "tokenizer.json":
            return HFTokenizer(os.path.dirname(path) or ".")
        if name.endswith(".model"):
            return Tokenizer(path)
        raise TokenizerNotFound(f"{path}: is a file, not {expected}")
    if not os.path.isdir(path):
        raise TokenizerNotFound(f"{path}: no such folder; expected {expected}")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return Tokenizer(os.path.join(path, "tokenizer.model"))
    found = sorted(os.listdir(path))
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") if found else "nothing (empty folder)"
    raise TokenizerNotFound(f"{path}: no tokenizer.json or tokenizer.model; expected {expected}, found {shown}")
