"""data/readers.py, data/pairs.py, data/task.py: round trips, bad input, pair boundaries
against the official collator's rule (with transformers' tokenizer), collate properties."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.pairs import (
    Pair,
    TruncationError,
    collate_pairs,
    collate_prompts,
    collate_sft,
    tokenize_example,
    tokenize_examples,
    truncate,
)
from data.readers import (
    DataError,
    Example,
    read_examples,
    sample_examples,
    split_heldout,
    write_examples,
)
from data.task import answer_correct, make_task, parse_answer, score, solution, write_task
from data.template import ChatFormat, render_prompt
from data.tokenizer import Tokenizer

U = "naïve 日本語 😀 Ελληνικά"


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


def system(c):
    return {"role": "system", "content": c}


# -- round trips ------------------------------------------------------------------------

SPIN_EXAMPLES = [
    Example([user("Hi " + U)], "Hello " + U, "Hey", {"ref_real_logps": -1.5, "ref_generated_logps": -2.25}),
    Example([system(""), user("q\nwith lines")], "", "  spaced  ", {"ref_real_logps": -3.0, "ref_generated_logps": 0.0}),
    Example(
        [system("be brief"), user("a"), asst("b"), user("c")], "d </s> e", "f", {"ref_real_logps": -1.0, "ref_generated_logps": -4.0}
    ),
]
MESSAGES_EXAMPLES = [
    Example([user(U)], "answer " + U, None, {"prompt": U, "prompt_id": "x1"}),
    Example([system(""), user("q"), asst("r"), user("s")], "t", None, {"prompt": "q", "prompt_id": "x2"}),
]
PR_EXAMPLES = [Example([user(U)], "r " + U, None, {"id": 1}), Example([user("")], "", None, {"id": 2})]
PR_GEN_EXAMPLES = [Example([user("p")], "r", "g", {})]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    "layout, examples",
    [
        ("spin", SPIN_EXAMPLES),
        ("messages", MESSAGES_EXAMPLES),
        ("prompt_response", PR_EXAMPLES),
        ("prompt_response", PR_GEN_EXAMPLES),
    ],
)
def test_round_trip(tmp_path, ext, layout, examples):
    path = tmp_path / f"data.{ext}"
    write_examples(path, examples, layout)
    assert sorted(os.listdir(tmp_path)) == [f"data.{ext}"]  # atomic: no temp file left
    for lay in ("auto", layout):
        got, report = read_examples(path, layout=lay)
        assert report.layout == layout and report.rows == len(examples) and report.skipped == 0
        assert got == examples


def test_official_spin_file_layout(tmp_path):
    # The hub files: parquet, exactly two list<struct<content, role>> columns.
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    table = pa.table(
        {"real": [[{"content": "p", "role": "user"}, {"content": "r", "role": "assistant"}]],
         "generated": [[{"content": "p", "role": "user"}, {"content": "g", "role": "assistant"}]]},
        schema=pa.schema([("real", pa.list_(msg)), ("generated", pa.list_(msg))]),
    )
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(table, path)
    (ex,), report = read_examples(path)
    assert report.layout == "spin"
    assert ex == Example([user("p")], "r", "g", {})


def test_multi_turn_keeps_every_turn_before_last_assistant(tmp_path):
    path = tmp_path / "m.jsonl"
    conv = [system("s"), user("u1"), asst("a1"), user("u2"), asst("a2"), user("unanswered")]
    path.write_text(json.dumps({"messages": conv}) + "\n")
    (ex,), _ = read_examples(path)
    assert ex.prompt == conv[:4] and ex.response == "a2"


# -- bad input --------------------------------------------------------------------------


def _jsonl(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [user("q"), asst("a")]}


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"messages": [asst("a"), user("q")]}, "role"),
        ({"messages": [user("q"), user("q2"), asst("a")]}, "role"),
        ({"messages": [user(3), asst("a")]}, "content"),
        ({"messages": [user("q")]}, "no assistant turn"),
        ({"other": 1}, "missing"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_row_names_file_row_field(tmp_path, bad_row, field):
    path = _jsonl(tmp_path, [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and field in msg
    examples, report = read_examples(path, on_error="skip")
    assert len(examples) == 3 and report.skipped == 1 and report.rows == 4
    assert "row 3" in report.reasons[0] and "skipped" in report.summary()


def test_non_utf8_and_control_characters_name_the_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good + good + '{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1") + good
                     + b'{"prompt": "a\x01", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: row 3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_examples(path)
    examples, report = read_examples(path, on_error="skip")
    assert len(examples) == 3 and report.skipped == 2
    assert "row 5: invalid JSON (Invalid control character at column" in report.reasons[1]
    old_mac = tmp_path / "cr.jsonl"  # bare \r line ends split rows too, as text mode does
    old_mac.write_bytes(good.replace(b"\n", b"\r") * 2)
    assert len(read_examples(old_mac)[0]) == 2


def test_spin_prompt_mismatch_and_field_names(tmp_path):
    row = {"real": [user("p"), asst("r")], "generated": [user("OTHER"), asst("g")]}
    with pytest.raises(DataError, match=r"row 1: field 'generated'"):
        read_examples(_jsonl(tmp_path, [row]))
    row = {"real": [user("p"), asst(None)], "generated": [user("p"), asst("g")]}
    with pytest.raises(DataError, match=r"row 1: field 'real': message 1: field 'content'"):
        read_examples(_jsonl(tmp_path, [row]))


def test_skip_counts_many(tmp_path):
    rows = [GOOD if i % 3 else {"messages": [asst("x")]} for i in range(30)]
    examples, report = read_examples(_jsonl(tmp_path, rows), on_error="skip")
    assert report.skipped == 10 and len(examples) == 20 and len(report.reasons) == 5


def test_empty_files(tmp_path):
    for name in ("e.jsonl", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=rf"{name}: empty file"):
            read_examples(tmp_path / name)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: empty file"):
        read_examples(tmp_path / "blank.jsonl")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    write_examples(path, PR_EXAMPLES, "prompt_response")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="c.parquet: corrupt"):
        read_examples(path)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "p.parquet"
    write_examples(path, PR_EXAMPLES, "prompt_response")
    with pytest.raises(DataError, match=r"p.parquet: missing column 'messages'"):
        read_examples(path, layout="messages")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r"q.parquet: no known layout.*question"):
        read_examples(tmp_path / "q.parquet")


def test_parquet_bad_row(tmp_path):
    path = tmp_path / "r.parquet"
    write_examples(path, MESSAGES_EXAMPLES + [Example([user("q")], "a")], "messages")
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    rows[1]["messages"] = [asst("wrong order"), user("q")]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"r.parquet: row 2: field 'messages': message 0: field 'role'"):
        read_examples(path)
    _, report = read_examples(path, on_error="skip")
    assert report.skipped == 1 and report.kept == 2


# -- sampling, split, mixing --------------------------------------------------------------


def test_sample_and_split_seeded_disjoint():
    examples = [Example([user(str(i))], str(i)) for i in range(100)]
    assert sample_examples(examples, 10, 1) == sample_examples(examples, 10, 1)
    assert sample_examples(examples, 10, 1) != sample_examples(examples, 10, 2)
    train, held = split_heldout(examples, 20, seed=3)
    assert len(train) == 80 and len(held) == 20
    assert {e.response for e in train}.isdisjoint({e.response for e in held})
    assert (train, held) == split_heldout(examples, 20, seed=3)


# -- tokenisation against the official collator (transformers tokenizer) -----------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common not installed")
    d = tmp_path_factory.mktemp("mistral_tok")
    shutil.copy(os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1"), d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer(folder)


@pytest.fixture(scope="module")
def ref(folder):
    import transformers
    return transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=True)


BOUNDARY_CASES = [
    ([user("372+485:")], "2+5=7;7+8=15;3+4+1=8;857", "2+5=7;7+8=15;3+4=7;757"),
    ([user("Tell me about  " + U)], " Leading space answer.\nSecond line", "Short"),
    ([system("sys"), user("a"), asst("b"), user("c")], "final", "other"),
]


@pytest.mark.parametrize("prompt, real, generated", BOUNDARY_CASES)
def test_pair_boundaries_vs_official_collator(tok, ref, prompt, real, generated):
    enc = lambda s: ref.encode(s, add_special_tokens=False)  # noqa: E731
    # The official code's strings, written out here rather than through data/template.py.
    turns = ([] if prompt[0]["role"] == "system" else ["<|system|>\n</s>\n"]) + [
        f"<|{m['role']}|>\n{m['content']}</s>\n" for m in prompt
    ]
    prompt_text = "".join(turns) + "<|assistant|>\n"
    ex = Example(prompt, real, generated, {"ref_real_logps": -1.0, "ref_generated_logps": -2.0})
    # Official: prompt and response tokenised separately; response text "{answer}</s>\n";
    # one EOS appended.
    official = tokenize_example(ChatFormat(tok, official_suffix=True), ex)
    assert official.prompt_ids == enc(prompt_text)
    assert official.real_ids == enc(real + "</s>\n") + [2]
    assert official.generated_ids == enc(generated + "</s>\n") + [2]
    assert official.real_ids[-4:] == [2, 28705, 13, 2]  # the legacy '▁' after the inner </s>
    # Ours (DESIGN.md): the answer tokenised on its own, then one EOS: the official ids
    # with the 3-token `</s> ▁ \n` tail removed.
    ours = tokenize_example(ChatFormat(tok), ex)
    assert ours.prompt_ids == official.prompt_ids
    assert ours.real_ids == enc(real) + [2] == official.real_ids[:-4] + [2]
    assert ours.generated_ids == enc(generated) + [2]


def test_truncation_defaults_left_prompt(tok):
    long_prompt = [user("word " * 700)]
    ex = Example(long_prompt, "answer " * 600, "short")
    p = tokenize_example(ChatFormat(tok), ex)
    full_prompt = tok.encode(render_prompt(long_prompt))
    assert p.truncated and len(p.prompt_ids) == 512 and p.prompt_ids == full_prompt[-512:]
    assert len(p.prompt_ids) + len(p.real_ids) == 1024 and p.real_ids[-1] != tok.eos_id
    assert p.generated_ids == tok.encode("short") + [tok.eos_id]


def test_truncation_to_nothing_is_reported(tok):
    ex = Example([user("word " * 50)], "a")
    with pytest.raises(TruncationError, match="no room"):
        tokenize_example(ChatFormat(tok), ex, max_length=40, max_prompt_length=40)
    pairs, report = tokenize_examples(ChatFormat(tok), [ex, Example([user("hi")], "a")], max_length=40, max_prompt_length=40, on_empty="skip")
    assert len(pairs) == 1 and report.skipped_empty == 1 and "skipped" in report.summary()


@given(
    st.integers(1, 60), st.lists(st.integers(1, 60), min_size=1, max_size=2),
    st.integers(1, 80), st.integers(1, 80),
)
def test_truncation_property(n_prompt, n_resps, max_length, max_prompt_length):
    """The rule, written out: a pair that fits is left alone; one that does not loses the prompt's
    oldest tokens beyond max_prompt_length, then the responses' tails beyond what is left; an
    error exactly when nothing would be left for a response."""
    prompt = list(range(n_prompt))
    resps = [list(range(100, 100 + n)) for n in n_resps]
    fits = n_prompt + max(n_resps) <= max_length
    kept_prompt = n_prompt if fits else min(n_prompt, max_prompt_length)
    try:
        p, rs, cut = truncate(prompt, resps, max_length, max_prompt_length)
    except TruncationError:
        assert not fits and kept_prompt >= max_length
        return
    assert kept_prompt < max_length or fits  # an error where one was due
    assert cut == (not fits)
    assert p == prompt[n_prompt - kept_prompt:]  # prompt cut from the left, only as far as the rule says
    assert rs == [full[: max_length - kept_prompt] for full in resps]  # responses cut from the right
    assert len(rs) == len(resps) and all(len(r) >= 1 for r in rs)  # never an empty response
    assert len(p) + max(len(r) for r in rs) <= max_length


# -- collate -----------------------------------------------------------------------------

_ids = st.lists(st.integers(3, 999), min_size=1, max_size=12)
_pair = st.builds(
    Pair, prompt_ids=_ids, real_ids=_ids, generated_ids=_ids,
    ref_real_logps=st.floats(-50, 0), ref_generated_logps=st.floats(-50, 0),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pair, min_size=1, max_size=5))
def test_collate_pairs_layout(items):
    B, pad = len(items), 2
    batch = collate_pairs(items, pad)
    ids, mask, tgt = batch["input_ids"], batch["attention_mask"], batch["targets"]
    assert ids.shape[0] == 2 * B and ids.shape == mask.shape == tgt.shape
    T = ids.shape[1]
    rows = [(it.prompt_ids, it.real_ids) for it in items] + [(it.prompt_ids, it.generated_ids) for it in items]
    for b, (prompt, resp) in enumerate(rows):
        seq = prompt + resp
        start = T - len(seq)
        # left padding: zeros then ones, pad id on padding, this row's own tokens (no mixing)
        assert mask[b].tolist() == [0] * start + [1] * len(seq)
        assert ids[b, :start].tolist() == [pad] * start and ids[b, start:].tolist() == seq
        # targets score exactly the response tokens, each at the position before it
        expected = [-100] * T
        for k in range(len(resp)):
            expected[start + len(prompt) + k - 1] = resp[k]
        assert tgt[b].tolist() == expected
        scored = tgt[b] != -100
        assert int(scored.sum()) == len(resp) and bool((mask[b][scored] == 1).all())
    assert batch["ref_real_logps"].dtype == torch.float32
    assert batch["ref_real_logps"].tolist() == pytest.approx([it.ref_real_logps for it in items])
    assert batch["ref_generated_logps"].tolist() == pytest.approx([it.ref_generated_logps for it in items])


def test_collate_sft_and_prompts():
    items = [Pair([5, 6, 7], [8, 2]), Pair([5], [9, 10, 2])]
    b = collate_sft(items, 2)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 2], [2, 5, 9, 10, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b["targets"].tolist() == [[-100, -100, 8, 2, -100], [-100, 9, 10, 2, -100]]
    assert "ref_real_logps" not in b
    p = collate_prompts([[5, 6, 7], [9]], 2)
    assert p["input_ids"].tolist() == [[5, 6, 7], [2, 2, 9]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="some items only"):
        collate_pairs([Pair([1], [2], [3], -1.0, -1.0), Pair([1], [2], [3])], 2)


# -- the embedded task -------------------------------------------------------------------


def test_task_solution_and_score():
    assert solution(372, 485) == "2+5=7;7+8=15;3+4+1=8;857"
    assert solution(972, 485) == "2+5=7;7+8=15;9+4+1=14;1457"
    assert solution(100, 100) == "0+0=0;0+0=0;1+1=2;200"
    assert score("372+485:", "2+5=7;7+8=15;3+4+1=8;857")
    assert score([user("372+485:")], "2+5=7;7+8=15;3+4+1=8;857 ")
    assert not score("372+485:", "2+5=7;7+8=15;3+4=7;857")
    assert answer_correct("372+485:", "junk;857") and not answer_correct("372+485:", "857x")
    assert parse_answer("a;1457") == 1457 and parse_answer("no number") is None


@given(st.integers(100, 999), st.integers(100, 999))
def test_task_solution_property(a, b):
    s = solution(a, b)
    assert parse_answer(s) == a + b and len(s.split(";")) == 4


def test_task_files_seeded_disjoint(tmp_path):
    train, held = make_task(seed=0, n_train=3000, n_heldout=500)
    assert (train, held) == make_task(seed=0, n_train=3000, n_heldout=500)
    assert make_task(seed=1, n_train=10, n_heldout=0)[0] != train[:10]
    prompts = [e.prompt[0]["content"] for e in train]
    assert len(set(prompts)) == 3000 and set(prompts).isdisjoint(e.prompt[0]["content"] for e in held)
    assert all(score(e.prompt, e.response) for e in train + held)
    tr_path, he_path = write_task(tmp_path, seed=0, n_train=50, n_heldout=10)
    got, report = read_examples(tr_path)  # the ordinary ingestion path
    assert report.layout == "messages" and got == make_task(0, 50, 10)[0]
