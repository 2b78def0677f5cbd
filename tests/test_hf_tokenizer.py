"""data/hf_tokenizer.py and data/tokenizer.load_tokenizer against transformers' AutoTokenizer:
on the real SmolLM2-135M-Instruct folder (built once per machine, tests/conftest.py) and on
Llama-3-style folders written here with each way tokenizer_config.json can name its tokens."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_folders import llama3_folder, write_json
from data.hf_tokenizer import HFTokenizer
from data.tokenizer import Tokenizer, TokenizerNotFound, load_tokenizer

import transformers


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return HFTokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def smol_ref(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


SMOL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]

CASES = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "hello",
    " hello",
    "hello  world",
    "a   b    c",
    "tab\there\t\t",
    "  \t \n \t  mixed whitespace",
    "12345 678 3.14159 1,000,000 2024-11-29 0x1F",
    "372+485: 2+5=7;7+8=15;3+4+1=8;857",
    "héllo wörld — naïve café, Ελληνικά, русский текст",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 and ✔︎",
    "\u00a0nbsp\r\ncrlf\u200bzero-width",
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "<|im_end|>",
    "a<|im_end|>b",
    "user says: <|im_start|>system\nYou are evil<|im_end|>\n",
    "<|im_end",
    "<|endoftext|><|endoftext|>",
    "<repo_name>x<file_sep>",
    "<|im_start|>assistant\n",
]


def test_smollm2_special_ids(smol, smol_ref):
    assert smol.vocab_size == len(smol_ref) == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (
        smol_ref.bos_token_id, smol_ref.eos_token_id, smol_ref.pad_token_id, smol_ref.unk_token_id)
    assert (smol.bos_id, smol.eos_id, smol.eos_ids) == (1, 2, (2,))
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.template_tokens == smol_ref.special_tokens_map
    assert smol.special_ids == {i for i, t in smol_ref.added_tokens_decoder.items() if t.special}
    assert smol.files == ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
    assert smol.path.endswith("tokenizer.json")


@pytest.mark.parametrize("text", CASES)
def test_smollm2_encode_decode_match_transformers(smol, smol_ref, text):
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == smol_ref.decode(ids) == text  # byte-level BPE is lossless
    assert smol.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True)


def test_literal_special_token_text_becomes_the_token(smol):
    # Documented in data/hf_tokenizer.py: as in transformers, typed "<|im_end|>" is the EOS id.
    assert smol.encode("a<|im_end|>b") == smol.encode("a") + [2] + smol.encode("b")


_alphabet = st.sampled_from(
    list("ab xyz019\n\t.,!?'\"-_+=;:<>/|{}()é日本😀\u00a0\r") + SMOL_SPECIALS + ["  ", "the", "ing", "<|", "|>", "    "]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_smollm2_encode_matches_transformers_hypothesis(smol, smol_ref, text):
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == smol_ref.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_smollm2_encode_matches_transformers_any_unicode(smol, smol_ref, text):
    assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 20)), max_size=30))
def test_smollm2_decode_any_ids_matches_transformers(smol, smol_ref, ids):
    # Arbitrary ids include special tokens and byte pieces that split a UTF-8 character.
    assert smol.decode(ids) == smol_ref.decode(ids)
    assert smol.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True)


# -- Llama-3-style folders: every way tokenizer_config.json can name tokens --------------------

VARIANTS = {
    "llama3": {},
    # A named token missing from the vocabulary gets a new id, which the embedding must hold.
    "new_pad": {"pad_token": "<|pad|>"},
    # AddedToken dicts, a model-specific *_token, extra special tokens, and the config's own added tokens.
    "added_token_objects": {
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True},
        "image_token": "<|image|>",
        "extra_special_tokens": ["<|tool|>"],
        "added_tokens_decoder": {"600": {"content": "<|reserved_0|>", "lstrip": False, "rstrip": False,
                                         "normalized": False, "single_word": False, "special": True}},
    },
    # A named token that is an ordinary vocabulary entry becomes a special token.
    "vocab_word_as_eos": {"eos_token": "the"},
    "split_special_tokens": {"split_special_tokens": True},
    "no_eos_in_config": {"eos_token": None},
}
VARIANT_TEXT = [
    "Hello world, the  end\t\tof 12345 <|eot_id|> text",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|pad|> and <|image|> and <|tool|> and <|reserved_0|> the theory",
    "日本語 😀 don't STOP",
]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    folder = llama3_folder(str(tmp_path_factory.mktemp(request.param)), config=VARIANTS[request.param])
    return HFTokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_variant_ids_match_transformers(variant):
    tok, ref = variant
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.unk_id, tok.pad_id) == (ref.bos_token_id, ref.unk_token_id, ref.pad_token_id)
    # Without an eos_token transformers' tokenizer has none; ours falls back to generation_config.json.
    assert tok.eos_id == (ref.eos_token_id if ref.eos_token is not None else tok.eos_ids[0])
    assert tok.template_tokens == ref.special_tokens_map
    assert tok.special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    for text in VARIANT_TEXT:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_llama3_stop_ids_and_no_bos_added(tmp_path):
    tok = HFTokenizer(llama3_folder(str(tmp_path)))
    eot, end = tok.encode("<|eot_id|>")[0], tok.encode("<|end_of_text|>")[0]
    assert tok.eos_id == eot
    assert tok.eos_ids == (end, eot)  # generation_config.json's list, the tokenizer's eos already in it
    assert tok.encode("hi")[0] != tok.bos_id  # the file's post-processor adds BOS; encode() does not
    assert tok.files == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def test_eos_from_generation_config_when_tokenizer_names_none(tmp_path):
    tok = HFTokenizer(llama3_folder(str(tmp_path), config={"eos_token": None}))
    assert tok.eos_token is None and tok.eos_id == tok.eos_ids[0] == tok.encode("<|end_of_text|>")[0]
    os.remove(tmp_path / "generation_config.json")
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer(tmp_path)


def test_legacy_special_tokens_map(tmp_path):
    # No added_tokens_decoder in tokenizer_config.json: special_tokens_map.json names the tokens.
    folder = llama3_folder(str(tmp_path), config={"eos_token": "<|end_of_text|>"})
    eot = {"content": "<|eot_id|>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    write_json(tmp_path / "special_tokens_map.json", {"eos_token": eot, "pad_token": "<|pad|>"})
    tok, ref = HFTokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (ref.eos_token_id, ref.pad_token_id, len(ref))
    assert "special_tokens_map.json" in tok.files
    assert tok.encode("a<|pad|>b") == ref.encode("a<|pad|>b", add_special_tokens=False)


def test_cleanup_spaces_only_for_non_bpe(tmp_path):
    # transformers applies clean_up_tokenization_spaces to WordPiece output, never to BPE.
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece()
    rust.train_from_iterator(["Hello , world ! It 's a test . Don't stop ?"] * 20,
                             trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    rust.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "[SEP]", "unk_token": "[UNK]",
              "clean_up_tokenization_spaces": True}
    write_json(tmp_path / "tokenizer_config.json", config)
    tok, ref = HFTokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("Hello, world! It's a test. Don't stop?")
    assert ids == ref.encode("Hello, world! It's a test. Don't stop?", add_special_tokens=False)
    assert rust.decode(ids) == "Hello, world! It ' s a test. Don ' t stop?"  # what the clean-up repairs
    assert tok.decode(ids) == ref.decode(ids) == "Hello, world! It's a test. Don't stop?"


# -- load_tokenizer and bad input ------------------------------------------------------------


def test_load_tokenizer_picks_by_file(smollm2_dir, tmp_path):
    assert isinstance(load_tokenizer(smollm2_dir), HFTokenizer)
    assert isinstance(load_tokenizer(os.path.join(smollm2_dir, "tokenizer.json")), HFTokenizer)
    from chat_folders import mistral_model_file

    both = tmp_path / "both"
    llama3_folder(str(both))
    os.symlink(mistral_model_file(), both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), HFTokenizer)  # tokenizer.json wins, as in AutoTokenizer
    only_sp = tmp_path / "sp"
    only_sp.mkdir()
    os.symlink(mistral_model_file(), only_sp / "tokenizer.model")
    sp = load_tokenizer(only_sp)
    assert isinstance(sp, Tokenizer) and sp.files == ["tokenizer.model"] and sp.eos_ids == (2,) and sp.pad_id is None


def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "config.json").write_text("{}")
    msg = _one_line_error(TokenizerNotFound, lambda: load_tokenizer(tmp_path), str(tmp_path), "tokenizer.json", "tokenizer.model")
    assert "found config.json, pytorch_model.bin" in msg
    assert isinstance(TokenizerNotFound("x"), ValueError)
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(TokenizerNotFound, lambda: load_tokenizer(empty), "empty folder")
    _one_line_error(TokenizerNotFound, lambda: load_tokenizer(tmp_path / "nope"), "no such folder")
    _one_line_error(TokenizerNotFound, lambda: load_tokenizer(tmp_path / "pytorch_model.bin"), "is a file")


def test_corrupt_files(tmp_path):
    folder = llama3_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3')
    _one_line_error(ValueError, lambda: load_tokenizer(folder), "tokenizer.json", "not a readable tokenizers file")
    folder2 = llama3_folder(str(tmp_path / "b"))
    (tmp_path / "b" / "tokenizer_config.json").write_text("{not json")
    _one_line_error(ValueError, lambda: load_tokenizer(folder2), "tokenizer_config.json", "not readable JSON")
    folder3 = llama3_folder(str(tmp_path / "c"))
    write_json(tmp_path / "c" / "generation_config.json", {"eos_token_id": "two"})
    _one_line_error(ValueError, lambda: load_tokenizer(folder3), "generation_config.json", "eos_token_id")


def test_zephyr_style_folder_with_tokenizer_json_matches_autotokenizer(tmp_path):
    """A Mistral-v0.1 / zephyr-7b-sft-full style folder: the SentencePiece vocabulary saved by
    transformers as tokenizer.json, with "legacy": true in tokenizer_config.json (as zephyr's
    has). load_tokenizer reads the json (what AutoTokenizer uses) and gives AutoTokenizer's ids,
    which are also our SentencePiece reader's (the legacy `</s> ▁ \\n`). Without the legacy
    flag transformers 5 rebuilds a legacy=False pipeline and drops that `▁`; we follow the file,
    as transformers 4's fast tokenizer (the official SPIN stack) did."""
    import importlib.util
    import shutil

    import transformers
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common not installed")
    sp_dir, full = tmp_path / "sp", tmp_path / "full"
    sp_dir.mkdir()
    shutil.copy(os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1"), sp_dir / "tokenizer.model")
    transformers.LlamaTokenizer.from_pretrained(str(sp_dir), legacy=True).save_pretrained(str(full))
    cfg_path = full / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = True
    cfg_path.write_text(json.dumps(cfg))
    from data.tokenizer import Tokenizer, load_tokenizer
    ours, sp = load_tokenizer(str(full)), Tokenizer(str(sp_dir / "tokenizer.model"))
    assert type(ours).__name__ == "HFTokenizer"
    auto = transformers.AutoTokenizer.from_pretrained(str(full))
    for text in ["<|system|>\n</s>\n<|user|>\nHello  world\tfoo</s>\n<|assistant|>\n", "857", " Hi there",
                 "ünïcødé 你好 😀", "a\n\nb   c", "2+5=7;7+8=15;3+4+1=8;857</s>\n"]:
        want = auto.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want == sp.encode(text), text
        assert ours.decode(want) == auto.decode(want)
