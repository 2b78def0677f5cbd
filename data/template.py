"""Chat templates: a conversation -> the text and token ids a model is trained and prompted on.

Two kinds, chosen by `load_chat_template`:

1. **Zephyr**, exactly as alignment-handbook renders it, written out in Python (the demo, and any
   checkpoint that ships no template):

    <|system|>\\n{content}</s>\\n  <|user|>\\n{content}</s>\\n  <|assistant|>\\n{content}</s>\\n

   and the generation prompt `<|assistant|>\\n`. SPIN's prompt for one user turn is
   `<|system|>\\n</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n`: an empty system turn is
   always present, so `render_prompt` prepends one when the messages have none. The `</s>` in
   the text is the EOS token (the tokenizer maps it to its id).

2. **The checkpoint's own Jinja template** (`ChatTemplate`), from `chat_template.jinja`, or
   `chat_template` in tokenizer_config.json, or a `--chat-template FILE`, rendered as
   transformers' `apply_chat_template` renders it: a sandboxed Jinja environment with
   trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`,
   `strftime_now`, a `tojson` that does not escape HTML, and the variables `messages`,
   `add_generation_prompt`, `tools`, `documents` and the tokenizer's special-token spellings
   (`bos_token`, `eos_token`, ...).

`ChatFormat` turns either into the ids SPIN needs: prompt ids, and response ids for an answer.
With a Jinja template the response is what the full conversation's rendering (messages plus the
assistant answer) adds after the prompt's rendering with the generation prompt, tokenised in
context. So what is scored follows from the template:
- ChatML (SmolLM2, Qwen): `{answer}<|im_end|>\\n`, the trailing newline included, because the
  template closes every turn with `<|im_end|>` and a newline. Generation stops at `<|im_end|>`
  (the EOS), so the newline is scored but never sampled, for real and generated answers alike.
- Llama 3: `{answer, trimmed}<|eot_id|>`.
- Zephyr written as Jinja, with the SentencePiece tokenizer: `{answer}</s> ▁ \\n`.
With the Zephyr fallback the rule stays data/pairs.py's: `encode(answer) + [eos]` (or
`encode("{answer}</s>\\n") + [eos]` with `official_suffix`), the answer tokenised on its own.
"""

import json
import os
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data.tokenizer_files import TEMPLATE_DIR, read_json
from errors import InputError

ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"
GENERATION_PROMPT = "<|assistant|>\n"


class TemplateError(InputError):
    pass


def validate_messages(messages, *, prompt=True):
    """Check the role order: an optional system turn first, then user and assistant
    alternating, starting with user. A prompt must end with a user turn; a full
    conversation (prompt=False) must end with an assistant turn. Raises TemplateError
    naming the message index (0-based) and the field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages: expected a non-empty list of {role, content}")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"message {i}: expected a dict with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TemplateError(f"message {i}: field 'role': unknown role {role!r}")
        if not isinstance(content, str):
            raise TemplateError(f"message {i}: field 'content': expected a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise TemplateError(f"message {i}: field 'role': a system turn may only come first")
            continue
        if role != expected:
            raise TemplateError(f"message {i}: field 'role': expected {expected!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"
    last = messages[-1]["role"]
    want = "user" if prompt else "assistant"
    if last != want:
        raise TemplateError(f"message {len(messages) - 1}: field 'role': must end with a {want} turn, got {last!r}")


def render_turn(role, content):
    return f"<|{role}|>\n{content}{EOS_TEXT}\n"


def render_messages(messages):
    """Render turns as they are, no system turn added, no generation prompt."""
    return "".join(render_turn(m["role"], m["content"]) for m in messages)


def render_prompt(messages):
    """Prompt messages -> the text the model continues, ending in `<|assistant|>\\n`."""
    validate_messages(messages, prompt=True)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}, *messages]
    return render_messages(messages) + GENERATION_PROMPT


def render_response(answer):
    """The official SPIN response text, `{answer}</s>\\n` (what the official collator
    tokenises). data/pairs.py tokenises the bare answer plus one EOS by default; see there."""
    return f"{answer}{EOS_TEXT}\n"


# -- a checkpoint's own Jinja template ------------------------------------------------------


class _GenerationTag(Extension):
    # Some templates wrap assistant text in `{% generation %}...{% endgeneration %}` for
    # transformers' assistant-token masks. It renders its body unchanged, in its own scope
    # (a call block), as in transformers.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    # Templates come from model repositories, i.e. untrusted code: the immutable sandbox
    # forbids underscore attributes and mutating the inputs.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _one_line(e):
    return " ".join(str(getattr(e, "message", None) or e).split())


class ChatTemplate:
    """A Jinja chat template; `source` names where it came from, for errors. `tokens` are the
    special-token spellings it sees (the tokenizer's `template_tokens`); `variables` are more
    template variables, e.g. `date_string` for Llama 3.x templates that would otherwise put
    today's date (strftime_now) in every prompt."""

    def __init__(self, text, source, tokens=None, variables=None):
        if not isinstance(text, str):
            raise TemplateError(f"{source}: a chat template must be a string, got {type(text).__name__}")
        self.text, self.source = text, source
        self.variables = {**(tokens or {}), **(variables or {})}
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{source}: line {e.lineno}: {_one_line(e)}") from None

    def render(self, messages, *, add_generation_prompt):
        # transformers drops None-valued keys first (templates test `'key' in message`).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.variables
            )
        except jinja2.TemplateError as e:  # raise_exception(...) and Jinja's own errors
            raise TemplateError(f"{self.source}: {_one_line(e)}") from None
        except Exception as e:  # the template's own expressions, e.g. str + int
            raise TemplateError(f"{self.source}: the template failed: {type(e).__name__}: {_one_line(e)}") from None


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise TemplateError(f"{path}: chat template file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: not a readable chat template ({e})") from None


def _pick_default(templates, where):
    if "default" not in templates:
        raise TemplateError(
            f"{where}: several chat templates ({', '.join(sorted(templates))}) and none named 'default'; "
            "pass one with --chat-template FILE"
        )
    return templates["default"]


def load_chat_template(folder, tokenizer, override=None, variables=None):
    """The chat template a checkpoint folder asks for, or None for the Zephyr fallback.

    Looked up as transformers does: `override` (a file) first, then `chat_template.jinja`
    (with `chat_templates/*.jinja`, the one named "default"), then `chat_template` in
    tokenizer_config.json (a string, or a list of {name, template}: "default")."""
    tokens = tokenizer.template_tokens
    if override is not None:
        path = os.fspath(override)
        return ChatTemplate(_read_text(path), path, tokens, variables)
    folder = os.fspath(folder)
    main = os.path.join(folder, "chat_template.jinja")
    named = {}
    tdir = os.path.join(folder, TEMPLATE_DIR)
    if os.path.isdir(tdir):
        named = {f[: -len(".jinja")]: os.path.join(tdir, f) for f in sorted(os.listdir(tdir)) if f.endswith(".jinja")}
    if os.path.isfile(main):
        named["default"] = main
    if named:
        path = _pick_default(named, tdir)
        return ChatTemplate(_read_text(path), path, tokens, variables)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    value = read_json(cfg_path).get("chat_template")
    if value is None:
        return None
    if isinstance(value, list):
        try:
            templates = {t["name"]: t["template"] for t in value}
        except (TypeError, KeyError):
            raise TemplateError(f"{cfg_path}: field 'chat_template': expected a string or a list of {{name, template}}") from None
        return ChatTemplate(_pick_default(templates, cfg_path), f"{cfg_path} (chat_template 'default')", tokens, variables)
    return ChatTemplate(value, f"{cfg_path} (field 'chat_template')", tokens, variables)


# -- prompt and response ids: the split SPIN trains on ---------------------------------------


class PrefixError(TemplateError):
    """The prompt's rendering or tokens are not a prefix of the conversation's, so there is no
    response to cut out. A subclass, so that a pipeline may skip and count such examples."""


def _first_difference(a, b):
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class ChatFormat:
    """Prompt ids and response ids for a tokenizer and a template (None: Zephyr, the rule
    data/pairs.py has always used). See the module docstring for what a response contains."""

    def __init__(self, tokenizer, template=None, *, official_suffix=False):
        if template is not None and official_suffix:
            raise ValueError("official_suffix belongs to the Zephyr fallback; a checkpoint's own template decides the response")
        self.tok, self.template, self.official_suffix = tokenizer, template, official_suffix
        self._last_prompt = (None, None)  # (text, ids): response_ids re-tokenises the prompt it was given

    @property
    def name(self):
        return "zephyr (built in)" if self.template is None else self.template.source

    def prompt_text(self, messages):
        if self.template is None:
            return render_prompt(messages)
        validate_messages(messages, prompt=True)
        return self.template.render(messages, add_generation_prompt=True)

    def _encode_prompt(self, text):
        if self._last_prompt[0] != text:
            self._last_prompt = (text, self.tok.encode(text))
        return list(self._last_prompt[1])

    def prompt_ids(self, messages):
        return self._encode_prompt(self.prompt_text(messages))

    def response_ids(self, messages, answer):
        if self.template is None:
            return self.tok.encode(render_response(answer) if self.official_suffix else answer) + [self.tok.eos_id]
        full_messages = [*messages, {"role": "assistant", "content": answer}]
        validate_messages(full_messages, prompt=False)
        prompt = self.prompt_text(messages)
        full = self.template.render(full_messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            i = _first_difference(prompt, full)
            raise PrefixError(
                f"{self.name}: the prompt's rendering is not a prefix of the conversation's: they differ at "
                f"character {i} (prompt {prompt[i : i + 24]!r}, conversation {full[i : i + 24]!r}); SPIN needs a template "
                "whose generation prompt is the start of the assistant turn (--chat-template FILE to use another)"
            )
        p, f = self._encode_prompt(prompt), self.tok.encode(full)
        if f[: len(p)] != p:
            j = _first_difference(p, f)
            # Byte-level BPE joins the generation prompt's final newline with an answer that starts
            # with two spaces, a newline and a space, ...: the answer then has no tokens of its own.
            raise PrefixError(
                f"{self.name}: the prompt's tokens are not a prefix of the conversation's: they differ at token {j} "
                f"(prompt {p[j : j + 4]}, conversation {f[j : j + 4]}): the answer's first characters "
                f"({answer[:12]!r}) merge with the prompt's last token; strip leading whitespace from answers"
            )
        return f[len(p) :]
