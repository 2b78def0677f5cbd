"""Exports describe themselves (data/export_files.py): transformers' AutoTokenizer on an export, with
its chat_template.jinja / tokenizer_config.json / generation_config.json, gives exactly the ids
this project tokenises with, adds no BOS, and stops and pads where the run does. For a
SentencePiece tokenizer.model with the built-in Zephyr template (the demo, Mistral-7B) and for a
tokenizer.json with its own ChatML template (SmolLM2). The whole pipeline's exports are checked
in tests/test_live_curves.py's run."""
import json
import os
import shutil


from chat_folders import llama3_folder, mistral_model_file, write_json
from data import export_files, task
from data.template import ChatFormat, load_chat_template, render_prompt
from data.tokenizer import load_tokenizer, train_tokenizer

import transformers
import google.protobuf  # noqa: F401 (transformers reads tokenizer.model through protobuf)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 372 + 485?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "372+485:"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "  two  spaces\nand a line "},
     {"role": "assistant", "content": "Sure </s> thing."}, {"role": "user", "content": "again?"}],
]
ANSWERS = ["857", "4 + 5 is 9.", "Yes, again."]


def export_folder(src, dst, override=None):
    """What train.py gives every export: the source's tokenizer files, then write()'s three."""
    tok = load_tokenizer(src)
    fmt = ChatFormat(tok, load_chat_template(src, tok, override))
    export_files.write(os.path.join(dst, ".side"), fmt)
    files = export_files.file_map(os.path.join(dst, ".side"), {n: os.path.join(src, n) for n in tok.files})
    for name, path in files.items():
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy(path, os.path.join(dst, name))
    return fmt, transformers.AutoTokenizer.from_pretrained(dst)


def ids(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def check_prompts(fmt, hf, full_conversations, plain_text=True):
    for messages, answer in zip(CONVERSATIONS, ANSWERS):
        assert ids(hf, messages, add_generation_prompt=True) == fmt.prompt_ids(messages), messages
        if full_conversations:  # a Jinja template: the response is the rest of the conversation
            whole = ids(hf, [*messages, {"role": "assistant", "content": answer}])
            assert whole == fmt.prompt_ids(messages) + fmt.response_ids(messages, answer)
    if plain_text:  # no BOS added to plain text either
        assert hf("12 + 3 = 15", add_special_tokens=True)["input_ids"] == fmt.tok.encode("12 + 3 = 15")


def test_demo_tokenizer_with_builtin_zephyr(tmp_path):
    """A tokenizer.model trained as the demo trains it, no template (the Zephyr fallback)."""
    train, _ = task.make_task(seed=0, n_train=200, n_heldout=10)
    texts = [render_prompt(e.prompt) + e.response for e in train]
    src = tmp_path / "src"
    train_tokenizer(texts, str(src), vocab_size=300)
    fmt, hf = export_folder(str(src), str(tmp_path / "export"))
    assert fmt.template is None
    check_prompts(fmt, hf, full_conversations=False)
    for e in train[:50]:  # the demo's own prompts
        assert ids(hf, e.prompt, add_generation_prompt=True) == fmt.prompt_ids(e.prompt)
    cfg = json.load(open(tmp_path / "export" / "tokenizer_config.json"))
    assert cfg["add_bos_token"] is False and cfg["legacy"] is True and cfg["pad_token"] == "</s>"
    gen = json.load(open(tmp_path / "export" / "generation_config.json"))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    # load_chat_template on the export finds the Jinja file, which renders as the fallback does.
    tok = load_tokenizer(str(tmp_path / "export"))
    again = ChatFormat(tok, load_chat_template(str(tmp_path / "export"), tok))
    assert [again.prompt_ids(c) for c in CONVERSATIONS] == [fmt.prompt_ids(c) for c in CONVERSATIONS]


def test_mistral_tokenizer_without_config(tmp_path):
    """Mistral-7B v0.1's tokenizer.model alone (legacy=True encoding, ids up to 32000)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(mistral_model_file(), src / "tokenizer.model")
    fmt, hf = export_folder(str(src), str(tmp_path / "export"))
    check_prompts(fmt, hf, full_conversations=False)


def test_smollm2_chatml_and_override(smollm2_dir, tmp_path):
    """A tokenizer.json with its own ChatML template: prompts and whole conversations match; a
    --chat-template override replaces the checkpoint's template in the export."""
    fmt, hf = export_folder(smollm2_dir, str(tmp_path / "export"))
    check_prompts(fmt, hf, full_conversations=True)
    gen = json.load(open(tmp_path / "export" / "generation_config.json"))
    assert gen["eos_token_id"] == fmt.tok.eos_id == 2
    own = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    (tmp_path / "t.jinja").write_text(own)
    fmt, hf = export_folder(smollm2_dir, str(tmp_path / "export2"), override=str(tmp_path / "t.jinja"))
    assert (tmp_path / "export2" / "chat_template.jinja").read_text() == own
    check_prompts(fmt, hf, full_conversations=True)


def test_source_settings_kept(tmp_path):
    """The source's own tokenizer_config.json entries survive; its BOS setting does not."""
    src = tmp_path / "src"
    train_tokenizer([render_prompt(e.prompt) + e.response for e in task.make_task(n_train=100, n_heldout=1)[0]],
                    str(src), vocab_size=300)
    write_json(src / "tokenizer_config.json", {"add_bos_token": True, "model_max_length": 4096,
                                               "chat_template": "{{ 'x' }}"})
    export_folder(str(src), str(tmp_path / "export"))
    cfg = json.load(open(tmp_path / "export" / "tokenizer_config.json"))
    assert cfg["model_max_length"] == 4096 and cfg["add_bos_token"] is False and "chat_template" not in cfg
    assert (tmp_path / "export" / "chat_template.jinja").read_text() == "{{ 'x' }}"


def test_llama3_bos_written_by_the_template(tmp_path):
    """A tokenizer.json whose post-processor adds BOS (Llama 3): transformers 5 follows the file,
    not add_bos_token, for plain text; the template writes BOS itself, once, so chat ids match."""
    fmt, hf = export_folder(llama3_folder(str(tmp_path / "src")), str(tmp_path / "export"))
    check_prompts(fmt, hf, full_conversations=True, plain_text=False)
    assert fmt.prompt_ids(CONVERSATIONS[0])[0] == fmt.tok.bos_id
    gen = json.load(open(tmp_path / "export" / "generation_config.json"))
    assert gen["eos_token_id"] == list(fmt.tok.eos_ids) and len(fmt.tok.eos_ids) == 2
