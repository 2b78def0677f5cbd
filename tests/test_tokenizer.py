"""data/tokenizer.py and data/template.py against transformers' LlamaTokenizer(legacy=True)
on the real Mistral-7B v0.1 tokenizer.model (shipped by mistral-common)."""

import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.template import TemplateError, render_messages, render_prompt, render_response, validate_messages
from data.tokenizer import Tokenizer, train_tokenizer
from chat_folders import mistral_model_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistral_tok")
    shutil.copy(mistral_model_file(), d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer(folder / "tokenizer.model")


@pytest.fixture(scope="module")
def ref(folder):
    import transformers
    import google.protobuf  # noqa: F401 (transformers reads tokenizer.model through it)
    return transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=True)


def ref_ids(ref, text):
    return ref.encode(text, add_special_tokens=False)


CASES = [
    "",
    " ",
    "   ",
    "\n",
    "hello",
    " hello",
    "  hello",
    "   hello",
    "hello ",
    "hello  world",
    "a\n\nb",
    "\nhi",
    "tab\there\t\t",
    "12345 678 3.14159 1,000,000",
    "372+485:",
    "2+5=7;7+8=15;3+4+1=8;857",
    "héllo wörld — 日本語のテキスト 😀🎉 Ελληνικά",
    "\u00a0nbsp and\r\ncrlf",
    "</s>",
    "</s>\n",
    "a</s>b",
    "a </s> b",
    "x  </s>  y",
    "</s></s><s><unk>",
    "<s>hi",
    "</s>\tx",
    "literal <0x0A> byte piece",
    "▁already▁spaced",
    "<|system|>\n</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
]


def test_special_ids(tok):
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id) == (32000, 0, 1, 2)


@pytest.mark.parametrize("text", CASES)
def test_encode_matches_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_legacy_space_after_special(tok):
    # REFERENCES.md: legacy=True puts a bare '▁' (28705) after </s> when text continues.
    ids = tok.encode("<|system|>\n</s>\n<|user|>\n")
    i = ids.index(2)
    assert ids[i : i + 3] == [2, 28705, 13]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Write a haiku about tokenizers."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  leading spaces\nand lines  "},
        {"role": "assistant", "content": "Sure </s> thing."},
        {"role": "user", "content": "日本語で？"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_templated_conversation_matches_transformers(tok, ref, messages):
    prompt = render_prompt(messages)
    assert tok.encode(prompt) == ref_ids(ref, prompt)
    full = render_messages(messages + [{"role": "assistant", "content": "An answer."}])
    assert tok.encode(full) == ref_ids(ref, full)
    resp = render_response("An answer.")
    assert tok.encode(resp) == ref_ids(ref, resp)


_alphabet = st.sampled_from(
    list("ab xyz019\n\t.,!?'\"-_+=;:<>/|é日😀\u00a0\r▁") + ["</s>", "<s>", "<unk>", "  ", "the", "ing"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_encode_matches_transformers_hypothesis(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref_ids(ref, text)
    assert tok.decode(ids) == ref.decode(ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_encode_matches_transformers_any_unicode(tok, ref, text):
    assert tok.encode(text) == ref_ids(ref, text)


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer(bad)


def test_train_tokenizer_layout_deterministic_and_parity(tmp_path):
    texts = [f"{a}+{b}: {a + b} and some words, émigré 日本" for a in range(0, 400, 7) for b in range(3, 300, 41)]
    p1 = train_tokenizer(texts, tmp_path / "a", vocab_size=320)
    p2 = train_tokenizer(texts, tmp_path / "b", vocab_size=320)
    assert open(p1, "rb").read() == open(p2, "rb").read()
    assert sorted(os.listdir(tmp_path / "a")) == ["tokenizer.model"]  # no temp file left
    t = Tokenizer(p1)
    assert (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2)
    import transformers
    ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "a"), legacy=True)
    for s in texts[:20] + ["</s>\n<|user|>\n372+485:", "  unseen 😀 chars  "]:
        assert t.encode(s) == ref_ids(ref, s)
        assert t.decode(t.encode(s)) == ref.decode(ref_ids(ref, s))
    assert t.decode(t.encode(texts[0])) == texts[0]


# -- template --------------------------------------------------------------------------


def test_spin_prompt_text():
    msgs = [{"role": "user", "content": "372+485:"}]
    assert render_prompt(msgs) == "<|system|>\n</s>\n<|user|>\n372+485:</s>\n<|assistant|>\n"
    sys_msgs = [{"role": "system", "content": "S"}] + msgs
    assert render_prompt(sys_msgs) == "<|system|>\nS</s>\n<|user|>\n372+485:</s>\n<|assistant|>\n"
    assert render_response("857") == "857</s>\n"


@pytest.mark.parametrize(
    "messages, where",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "x"}], "message 0"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a user"),
    ],
)
def test_bad_roles(messages, where):
    with pytest.raises(TemplateError, match=where):
        render_prompt(messages)


def test_full_conversation_must_end_with_assistant():
    validate_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], prompt=False)
    with pytest.raises(TemplateError):
        validate_messages([{"role": "user", "content": "a"}], prompt=False)


def test_folder_settings_beside_the_model(folder, tmp_path):
    # The attributes HFTokenizer has too: template spellings, stop ids, pad, the files an export copies.
    t = Tokenizer(folder / "tokenizer.model")
    assert (t.template_tokens, t.eos_ids, t.pad_id) == ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, (2,), None)
    assert t.files == ["tokenizer.model"]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(folder / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text('{"pad_token": {"__type": "AddedToken", "content": "</s>"}, "eos_token": "</s>"}')
    (d / "generation_config.json").write_text('{"eos_token_id": [32000, 2], "pad_token_id": 0}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    t = Tokenizer(d / "tokenizer.model")
    assert (t.eos_id, t.eos_ids, t.pad_id, t.eos_token) == (2, (32000, 2), 2, "</s>")
    assert t.files == ["tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
    (d / "tokenizer_config.json").write_text('{"pad_token": 5}')
    with pytest.raises(ValueError, match="tokenizer_config.json: field 'pad_token'"):
        Tokenizer(d / "tokenizer.model")
    # Tokens added on top of the SentencePiece model would be matched by transformers, not here: refused.
    (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"2": {"content": "</s>"}, "32000": {"content": "<|im_start|>"}}}')
    with pytest.raises(ValueError, match=r"add tokens that tokenizer.model lacks \('<\|im_start\|>'\); give the folder a tokenizer.json"):
        Tokenizer(d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}')
    with pytest.raises(ValueError, match="'<pad>'"):
        Tokenizer(d / "tokenizer.model")
