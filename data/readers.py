"""Files in, validated examples out: Parquet and JSON Lines in three layouts.

Layouts (detected from the columns, or named with `layout=`):
- "spin":     `real` and `generated`, each a list of {role, content}: the prompt turns,
              then one assistant turn (the official `UCLA-AGI/SPIN_iter*` files, and what
              our generate.py writes, plus columns such as `ref_real_logps`).
- "messages": `messages`, a list of {role, content} (UltraChat-200k / alignment-handbook);
              an optional `prompt` column is kept in `extras`.
- "prompt_response": string columns `prompt` and `response` (optionally `generated`).

Multi-turn conversations: every turn before the LAST assistant message is the prompt, and
that message is the response. The official SPIN code keeps only the first user turn and
its answer; we keep the whole context because a later answer read without the turns it
replies to is a different (often meaningless) target, and the template renders any number
of turns. Single-turn data gives the same pairs either way.

Errors name the file, the row and the field. Rows are numbered from 1: in JSON Lines the
row number is the line number; in Parquet it is the row's position in the table.
`on_error="skip"` drops bad rows instead of raising; the returned ReadReport always holds
the count and the first reasons, for callers to print.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from checkpoint import atomic_file
from data.template import TemplateError, validate_messages
from errors import InputError

LAYOUTS = ("spin", "messages", "prompt_response")
_MAX_REASONS = 5


class DataError(InputError):
    pass


@dataclass
class Example:
    prompt: list  # [{"role", "content"}], ends with a user turn
    response: str  # the ground-truth assistant answer
    generated: str | None = None  # the model's answer to the same prompt (SPIN layout)
    extras: dict = field(default_factory=dict)  # every other column, untouched


@dataclass
class ReadReport:
    path: str
    layout: str
    rows: int = 0
    skipped: int = 0
    reasons: list = field(default_factory=list)

    @property
    def kept(self):
        return self.rows - self.skipped

    def summary(self):
        s = f"{self.path}: layout {self.layout}, {self.rows} rows, {self.kept} kept, {self.skipped} skipped"
        return s + "".join(f"\n  {r}" for r in self.reasons)


# -- reading ---------------------------------------------------------------------------


def _file_format(path):
    p = str(path).lower()
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise DataError(f"{path}: unknown file type (expected .parquet or .jsonl)")


REQUIRED = {"spin": ("real", "generated"), "messages": ("messages",), "prompt_response": ("prompt", "response")}


def _parquet_columns_check(path, layout):
    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise DataError(f"{path}: corrupt or unreadable Parquet file ({e})") from None
    if layout == "auto":
        layout = detect_layout(names)
        if layout is None:
            raise DataError(
                f"{path}: no known layout in columns {sorted(names)} "
                "(need 'real'+'generated', 'messages', or 'prompt'+'response')"
            )
    missing = [c for c in REQUIRED[layout] if c not in names]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} for layout {layout!r} (columns: {sorted(names)})")
    return layout


def _raw_rows(path):
    """Yield (row number from 1, dict or an error string) for every row of the file."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".parquet", ".jsonl", ".json", ".ndjson")))
        raise DataError(f"{path}: is a folder, not a data file; pass one .parquet or .jsonl file"
                        + (f" (it holds {', '.join(files[:5])}{' ...' if len(files) > 5 else ''})" if files else ""))
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file")
    if _file_format(path) == "parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on corrupt files
            raise DataError(f"{path}: corrupt or unreadable Parquet file ({e})") from None
        yield from enumerate(rows, start=1)
        return
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that row's error, not a crash
        data = f.read()
    # A UTF-8 byte order mark, which Windows editors write at the start of a file: not part of row 1.
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()  # \n, \r\n or \r, as universal newlines
    for line_no, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "Invalid control character at"
            yield line_no, f"invalid JSON ({msg} at column {e.colno})"
            continue
        yield line_no, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"


def detect_layout(columns):
    cols = set(columns)
    if {"real", "generated"} <= cols:
        return "spin"
    if "messages" in cols:
        return "messages"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    return None


def _get(row, name):
    if name not in row:
        raise DataError(f"field '{name}': missing")
    return row[name]


def _messages(row, name, *, prompt):
    value = _get(row, name)
    try:
        validate_messages(value, prompt=prompt)
    except TemplateError as e:
        raise DataError(f"field '{name}': {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _string(row, name):
    value = _get(row, name)
    if not isinstance(value, str):
        raise DataError(f"field '{name}': expected a string, got {type(value).__name__}")
    return value


def _split_conversation(messages):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _convert(row, layout, need_answer):
    ex = _convert_layout(row, layout)
    if need_answer and not ex.response.strip():  # it would train as an answer of EOS alone
        field = {"spin": "real", "messages": "messages"}.get(layout, "response")
        raise DataError(f"field '{field}': the answer (the last assistant turn) is empty: nothing to learn from; "
                        "fill it in, or drop the row (--on-bad-row skip)")
    return ex


def _convert_layout(row, layout):
    if layout == "spin":
        real = _messages(row, "real", prompt=False)
        generated = _messages(row, "generated", prompt=False)
        if generated[:-1] != real[:-1]:
            raise DataError("field 'generated': its prompt turns differ from those of 'real'")
        extras = {k: v for k, v in row.items() if k not in ("real", "generated")}
        return Example(real[:-1], real[-1]["content"], generated[-1]["content"], extras)
    if layout == "messages":
        value = _get(row, "messages")
        if isinstance(value, list) and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in value):
            raise DataError("field 'messages': no assistant turn (nothing to learn from)")
        if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "user":
            value = value[:-1]  # a trailing unanswered user turn carries no target
        msgs = _messages({"messages": value}, "messages", prompt=False)
        prompt, response = _split_conversation(msgs)
        return Example(prompt, response, None, {k: v for k, v in row.items() if k != "messages"})
    prompt = [{"role": "user", "content": _string(row, "prompt")}]
    response = _string(row, "response")
    generated = _string(row, "generated") if row.get("generated") is not None else None
    extras = {k: v for k, v in row.items() if k not in ("prompt", "response", "generated")}
    return Example(prompt, response, generated, extras)


def read_examples(path, *, layout="auto", on_error="raise", need_answer=False):
    """Read a file into Examples. Returns (examples, ReadReport). need_answer: a row whose answer
    is empty is bad (training data: it would teach an answer of EOS alone)."""
    path = os.fspath(path)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if os.path.isfile(path) and os.path.getsize(path) > 0 and _file_format(path) == "parquet":
        layout = _parquet_columns_check(path, layout)
    report = ReadReport(path, layout)
    examples = []
    for row_no, row in _raw_rows(path):
        report.rows += 1
        if report.layout == "auto" and isinstance(row, dict):
            report.layout = detect_layout(row.keys())
            if report.layout is None:  # a file-level problem: never skipped
                raise DataError(
                    f"{path}: row {row_no}: no known layout in columns {sorted(row.keys())} "
                    "(need 'real'+'generated', 'messages', or 'prompt'+'response')"
                )
        try:
            if isinstance(row, str):
                raise DataError(row)
            examples.append(_convert(row, report.layout, need_answer))
        except DataError as e:
            msg = f"{path}: row {row_no}: {e}"
            if on_error == "raise":
                raise DataError(msg) from None
            report.skipped += 1
            if len(report.reasons) < _MAX_REASONS:
                report.reasons.append(msg)
    if report.rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return examples, report


# -- writing ---------------------------------------------------------------------------


def _to_row(ex, layout):
    if layout == "spin":
        if ex.generated is None:
            raise DataError("the spin layout needs a generated response for every example")
        row = {
            "real": ex.prompt + [{"role": "assistant", "content": ex.response}],
            "generated": ex.prompt + [{"role": "assistant", "content": ex.generated}],
        }
    elif layout == "messages":
        row = {"messages": ex.prompt + [{"role": "assistant", "content": ex.response}]}
    elif layout == "prompt_response":
        if len(ex.prompt) != 1 or ex.prompt[0]["role"] != "user":
            raise DataError("the prompt_response layout holds a single user turn only")
        row = {"prompt": ex.prompt[0]["content"], "response": ex.response}
        if ex.generated is not None:
            row["generated"] = ex.generated
    else:
        raise ValueError(f"unknown layout {layout!r}")
    for k, v in ex.extras.items():
        row.setdefault(k, v)
    return row


def write_examples(path, examples, layout):
    """Write Examples in a layout; .parquet or .jsonl by extension; atomic (temp + rename)."""
    path = os.fspath(path)
    fmt = _file_format(path)
    rows = [_to_row(ex, layout) for ex in examples]
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    rows = [{k: r.get(k) for k in keys} for r in rows]
    with atomic_file(path, "wb") as f:
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), f)
        else:
            for r in rows:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


# -- sampling and the held-out split ----------------------------------------------------


def sample_examples(examples, n, seed):
    """n examples drawn without replacement, in file order; all of them if n >= len."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in idx]


def split_heldout(examples, n_heldout, seed):
    """(train, heldout): disjoint by row, seeded. Rows with identical prompts are not
    merged: deduplicate first if the file repeats prompts."""
    if not 0 <= n_heldout <= len(examples):
        raise ValueError(f"n_heldout={n_heldout} but only {len(examples)} examples")
    perm = np.random.default_rng(seed).permutation(len(examples))
    held = set(perm[:n_heldout].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held]
    heldout = [ex for i, ex in enumerate(examples) if i in held]
    return train, heldout


def load_splits(train_path, eval_path=None, *, num_prompts=None, eval_prompts=500, seed=0, on_error="raise",
                log=print):
    """(train examples, held-out examples) for a run: read and validated, sampled by seed, and the
    held-out prompts either from eval_path or split from the training sample (at most a tenth).
    SPIN-layout files carry an old `generated` answer: it is dropped, p_t answers anew."""
    train, rep = read_examples(train_path, on_error=on_error, need_answer=True)
    log(f"data: {rep.summary()}")
    if not train:
        raise DataError(f"{train_path}: no usable rows (all {rep.rows} skipped; see the reasons above)")
    train = sample_examples(train, num_prompts, seed)
    if eval_path:
        held, rep = read_examples(eval_path, on_error=on_error, need_answer=True)
        log(f"eval data: {rep.summary()}")
        if not held:
            raise DataError(f"{eval_path}: no usable rows (all {rep.rows} skipped; see the reasons above)")
        held = sample_examples(held, eval_prompts, seed + 1)
        log(f"using {len(train)} training prompts (--num-prompts {num_prompts}) and {len(held)} held-out "
            f"prompts from {eval_path} (--eval-prompts {eval_prompts})")
    else:
        n_held = min(eval_prompts, len(train) // 10)
        if n_held == 0:  # an empty held-out set would fail only after the first training stage
            raise DataError(f"{train_path}: {len(train)} prompts leave none for the held-out split (a tenth of "
                            "them, so at least 10 are needed): pass --eval-data FILE with held-out prompts")
        train, held = split_heldout(train, n_held, seed + 1)
        log(f"using {len(train)} training prompts and {len(held)} held-out prompts split from them "
            f"(--eval-prompts {eval_prompts}, capped at a tenth of the {len(train) + len(held)} prompts "
            f"sampled; pass --eval-data for a separate held-out file)")
    warn_repeated_prompts(train, held, eval_path or train_path, log)
    strip = lambda exs: [Example(e.prompt, e.response) for e in exs]  # noqa: E731
    return strip(train), strip(held)


def warn_repeated_prompts(train, held, held_path, log):
    """A held-out prompt that is also a training prompt (a file that repeats prompts, split by
    row) measures memory, not generalisation: say how many there are."""
    seen = {json.dumps(ex.prompt, sort_keys=True) for ex in train}
    n = sum(json.dumps(ex.prompt, sort_keys=True) in seen for ex in held)
    if n:
        log(f"WARNING: {held_path}: {n} of the {len(held)} held-out prompts are also training prompts (the data "
            "repeats prompts), so the held-out metrics are partly measured on training prompts; deduplicate the "
            "file, or pass --eval-data FILE with other prompts")
