"""The Zephyr chat template, exactly as alignment-handbook renders it.

    <|system|>\\n{content}</s>\\n  <|user|>\\n{content}</s>\\n  <|assistant|>\\n{content}</s>\\n

and the generation prompt `<|assistant|>\\n`. SPIN's prompt for one user turn is
`<|system|>\\n</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n`: an empty system turn is
always present, so `render_prompt` prepends one when the messages have none.

The `</s>` in the text is the EOS token (the tokenizer maps it to its id).
"""

ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"
GENERATION_PROMPT = "<|assistant|>\n"


class TemplateError(ValueError):
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
