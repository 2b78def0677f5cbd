"""data/template.py's ChatTemplate / load_chat_template / ChatFormat against transformers'
apply_chat_template: SmolLM2's ChatML template, a Llama-3-style folder, and Mistral's
tokenizer.model with the Zephyr template written as Jinja; the prompt/response split; errors."""

import pytest

from chat_folders import LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE, llama3_folder, write_json, zephyr_folder
from data.template import ChatFormat, ChatTemplate, PrefixError, TemplateError, load_chat_template, render_prompt
from data.tokenizer import load_tokenizer

import transformers

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "372+485:"}],
    [
        {"role": "system", "content": "You are terse. Answer in one line."},
        {"role": "user", "content": "  leading spaces\nand lines  "},
        {"role": "assistant", "content": "Sure, <|im_end|> </s> <|eot_id|> thing."},
        {"role": "user", "content": "日本語で？ 😀\tand code: `x = {'a': 1}`"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    ],
]
ANSWERS = ["Paris.", "2+5=7;7+8=15;3+4+1=8;857", " spaced answer  \n", "A <|im_start|> literal, and 日本."]


def _reference(ref, messages, **kw):
    return ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    return ChatFormat(tok, load_chat_template(smollm2_dir, tok)), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    folder = llama3_folder(str(tmp_path_factory.mktemp("llama3")))
    tok = load_tokenizer(folder)
    return ChatFormat(tok, load_chat_template(folder, tok)), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def zephyr(tmp_path_factory):
    import google.protobuf  # noqa: F401 (transformers reads tokenizer.model through it)
    folder = zephyr_folder(str(tmp_path_factory.mktemp("zephyr")))
    tok = load_tokenizer(folder)
    return ChatFormat(tok, load_chat_template(folder, tok)), transformers.LlamaTokenizer.from_pretrained(folder, legacy=True)


@pytest.mark.parametrize("which", ["smol", "llama3", "zephyr"])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_prompt_and_response_ids_match_transformers(request, which, i):
    fmt, ref = request.getfixturevalue(which)
    messages, answer = CONVERSATIONS[i], ANSWERS[i]
    assert fmt.prompt_text(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = fmt.prompt_ids(messages)
    assert prompt == _reference(ref, messages, add_generation_prompt=True)
    full = _reference(ref, messages + [{"role": "assistant", "content": answer}])
    assert prompt + fmt.response_ids(messages, answer) == full


def test_what_is_scored(smol, llama3, zephyr):
    msgs = CONVERSATIONS[0]
    fmt, _ = smol  # ChatML: the answer, <|im_end|> (EOS) and the newline the template writes after it
    r = fmt.response_ids(msgs, "Paris.")
    assert r[-2:] == [fmt.tok.eos_id, fmt.tok.encode("\n")[0]] and fmt.tok.decode(r) == "Paris.<|im_end|>\n"
    fmt, _ = llama3  # Llama 3: trimmed answer, then <|eot_id|>, nothing after
    r = fmt.response_ids(msgs, " Paris. ")
    assert r[-1] == fmt.tok.eos_id and fmt.tok.decode(r) == "Paris.<|eot_id|>"
    fmt, _ = zephyr  # Zephyr as Jinja on SentencePiece: </s>, then legacy's bare '▁' and the newline
    assert fmt.response_ids(msgs, "Paris.")[-3:] == [2, 28705, 13]


def test_smollm2_default_system_turn_and_bos_once(smol, llama3):
    fmt, _ = smol
    assert fmt.prompt_text(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    fmt, _ = llama3
    ids = fmt.prompt_ids(CONVERSATIONS[2])
    assert ids[0] == fmt.tok.bos_id and ids.count(fmt.tok.bos_id) == 1  # from the template; nobody adds another


def test_zephyr_jinja_equals_builtin_zephyr_prompt(zephyr):
    # With an explicit empty system turn, alignment-handbook's Jinja template and data/template.py's
    # render_prompt (which adds that turn itself) give the same text.
    fmt, _ = zephyr
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "372+485:"}]
    assert fmt.prompt_text(msgs) == render_prompt(msgs) == render_prompt(msgs[1:])


def test_zephyr_fallback_is_the_old_rule(tmp_path):
    # A folder without a template: ChatFormat keeps data/pairs.py's ids bit for bit.
    folder = zephyr_folder(str(tmp_path))
    cfg = tmp_path / "tokenizer_config.json"
    write_json(cfg, {"legacy": True})
    tok = load_tokenizer(folder)
    assert load_chat_template(folder, tok) is None
    msgs = [{"role": "user", "content": "372+485:"}]
    fmt = ChatFormat(tok)
    assert fmt.prompt_ids(msgs) == tok.encode(render_prompt(msgs))
    assert fmt.response_ids(msgs, "857") == tok.encode("857") + [tok.eos_id]
    official = ChatFormat(tok, official_suffix=True)
    assert official.response_ids(msgs, "857") == tok.encode("857</s>\n") + [tok.eos_id]
    with pytest.raises(ValueError, match="official_suffix"):
        ChatFormat(tok, ChatTemplate(ZEPHYR_TEMPLATE, "x"), official_suffix=True)


# -- rendering like transformers: the environment's features ----------------------------------

FEATURES = """{%- set ns = namespace(users=0) -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif -%}
{%- if m['role'] == 'system' %}{% continue %}{% endif -%}
[{{ loop.index }}/{{ ns.users }}] {{ m | tojson }} {{ {'html': '<b>&</b>', 'k': [1, 2.5, none, true]} | tojson(indent=1) }}
{%- if loop.index > 4 %}{% break %}{% endif %}
  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | upper }}{% endgeneration %}{% endif %}
{% endfor %}
{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ tools }}|{{ documents }}|{{ undefined_var }}|{{ strftime_now('%Y') }}
{%- if add_generation_prompt %}GEN{% endif %}
"""


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_features_render_like_transformers(smol, add_generation_prompt):
    fmt, ref = smol
    tpl = ChatTemplate(FEATURES, "features.jinja", fmt.tok.template_tokens)
    for msgs in CONVERSATIONS:
        want = ref.apply_chat_template(msgs, chat_template=FEATURES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tpl.render(msgs, add_generation_prompt=add_generation_prompt) == want


def test_sources_and_precedence(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    d = tmp_path / "m"
    llama3_folder(str(d))
    t = load_chat_template(d, tok)
    assert t.text == LLAMA3_TEMPLATE and "tokenizer_config.json" in t.source
    (d / "chat_template.jinja").write_text("JINJA FILE")  # the file wins over the config, as in transformers
    assert load_chat_template(d, tok).render([], add_generation_prompt=False) == "JINJA FILE"
    override = tmp_path / "mine.jinja"
    override.write_text("{{ messages[0]['content'] }}!")
    t = load_chat_template(d, tok, override=override)
    assert t.source == str(override) and t.render(CONVERSATIONS[0], add_generation_prompt=True) == "What is the capital of France?!"
    # A list of named templates: "default" is used; without one, an error lists the names.
    e = tmp_path / "named"
    llama3_folder(str(e), config={"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    assert load_chat_template(e, tok).render([], add_generation_prompt=False) == "D"
    write_json(e / "tokenizer_config.json", {"eos_token": "<|eot_id|>", "chat_template": [{"name": "tool_use", "template": "T"}]})
    with pytest.raises(TemplateError, match="tool_use.*--chat-template"):
        load_chat_template(e, tok)
    # Variables pin what a template would otherwise take from the clock.
    t = ChatTemplate("{{ date_string | default(strftime_now('%d %b %Y')) }}", "x", variables={"date_string": "26 Jul 2024"})
    assert t.render([], add_generation_prompt=True) == "26 Jul 2024"


# -- the prompt/response split must be prefix-consistent -------------------------------------


def test_template_whose_prompt_is_not_a_prefix(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    # The generation prompt says "ASSISTANT:", the rendered assistant turn "assistant:".
    text = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    path = tmp_path / "bad.jinja"
    path.write_text(text)
    fmt = ChatFormat(tok, load_chat_template(tmp_path, tok, override=path))
    with pytest.raises(PrefixError) as e:
        fmt.response_ids([{"role": "user", "content": "hi"}], "yo")
    msg = str(e.value)
    assert str(path) in msg and "character 9" in msg and "\n" not in msg


def test_prompt_tokens_not_a_prefix(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    msgs = [{"role": "user", "content": "hi"}]
    # A real case: SmolLM2's prompt ends in "assistant\n"; an answer starting with two spaces makes
    # the GPT-2 pre-tokenizer cut "\n " instead of "\n", so the prompt's last token changes.
    fmt = ChatFormat(tok, load_chat_template(smollm2_dir, tok))
    n = len(fmt.prompt_ids(msgs))
    assert fmt.response_ids(msgs, " one space") and fmt.response_ids(msgs, "\nnewline")
    with pytest.raises(PrefixError, match=rf"chat_template.jinja: .*tokens are not a prefix.* at token {n - 1} .*strip leading whitespace"):
        fmt.response_ids(msgs, "  two spaces")
    # A template whose text is prefix-consistent but whose generation prompt ends inside a word.
    path = tmp_path / "merge.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% else %}Th{{ m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Th{% endif %}"
    )
    fmt = ChatFormat(tok, load_chat_template(tmp_path, tok, override=path))
    assert fmt.response_ids(msgs, ": fine")
    with pytest.raises(PrefixError, match=r"merge.jinja: the prompt's tokens are not a prefix .* token 4 \(prompt \[1082\]"):
        fmt.response_ids(msgs, "e answer")


# -- errors -----------------------------------------------------------------------------------


def test_template_that_raises(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    path = tmp_path / "strict.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    fmt = ChatFormat(tok, load_chat_template(tmp_path, tok, override=path))
    assert fmt.prompt_text(CONVERSATIONS[0]) == "What is the capital of France?"
    with pytest.raises(TemplateError, match=f"^{path}: System role not supported$"):
        fmt.prompt_ids(CONVERSATIONS[1])
    # transformers raises too, on the same input.
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(Exception, match="System role not supported"):
        ref.apply_chat_template(CONVERSATIONS[1], chat_template=path.read_text(), tokenize=False)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{% for m in messages %}{{ m['content'] }", "line 1"),  # syntax error
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),  # the template's own expression fails
        ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", "unsafe"),  # the sandbox
        ("{% set x = messages.append(1) %}", "unsafe"),  # immutable inputs
    ],
)
def test_broken_templates_are_one_line_errors(tmp_path, smollm2_dir, text, needle):
    tok = load_tokenizer(smollm2_dir)
    path = tmp_path / "broken.jinja"
    path.write_text(text)
    with pytest.raises(TemplateError) as e:
        ChatFormat(tok, load_chat_template(tmp_path, tok, override=path)).prompt_text(CONVERSATIONS[0])
    msg = str(e.value)
    assert msg.startswith(str(path)) and needle in msg and "\n" not in msg, msg


def test_missing_override_and_bad_config(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    with pytest.raises(TemplateError, match="nope.jinja: chat template file not found"):
        load_chat_template(smollm2_dir, tok, override=tmp_path / "nope.jinja")
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": 3})
    with pytest.raises(TemplateError, match="tokenizer_config.json.*must be a string"):
        load_chat_template(tmp_path, tok)
    with pytest.raises(TemplateError, match="message 1"):
        ChatFormat(tok, load_chat_template(smollm2_dir, tok)).prompt_ids([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
