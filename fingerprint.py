"""What a run read, by content: the size and sha256 of every input file (the data, the eval and
validation data, the model folder's weights, config and tokenizer files, a chat template),
computed once at the start of a run (streaming, 1 MiB at a time) and stored in config.json.
`--resume` computes them again and refuses an input that changed, so a resumed run never
trains its later iterations on other data or another model than its first ones.

Path flags are compared by content, not as strings: `--data ./x.jsonl` and `--data x.jsonl`,
or the same file from another working directory, are one input.
"""
import glob
import hashlib
import os

# The flags that name inputs, and what a run reads from each.
INPUT_FLAGS = ("data", "eval_data", "val_data", "model", "chat_template")

# What a run reads from a model folder (anything else there, a README or a pickle copy of the
# weights, is never read, so it may change).
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_templates/*.jinja")


def file_fingerprint(path):
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _files(flag, path):
    """{name relative to path: full path} of the files a run reads behind one flag."""
    if os.path.isfile(path):
        return {"": path}
    if flag != "model" or not os.path.isdir(path):
        return {}  # not there, or a folder as data: the reader of that flag says so in its own words
    found = {f for pattern in MODEL_FILES for f in glob.glob(os.path.join(path, pattern))}
    return {os.path.relpath(f, path): f for f in sorted(found) if os.path.isfile(f)}


def fingerprints(settings):
    """{flag: {"path": real path, "files": {name: {"size", "sha256"}}}} of every input flag set."""
    out = {}
    for flag in INPUT_FLAGS:
        path = settings.get(flag)
        if path:
            out[flag] = {"path": os.path.realpath(path),
                         "files": {name: file_fingerprint(f) for name, f in _files(flag, path).items()}}
    return out


def first_change(old, new):
    """The first input that differs between two fingerprints(), in words, or None."""
    for flag in INPUT_FLAGS:
        if flag not in old and flag not in new:
            continue
        a, b = old.get(flag, {"files": {}}), new.get(flag, {"files": {}})
        where = b.get("path", a.get("path"))
        for name in sorted(set(a["files"]) | set(b["files"])):
            file = os.path.join(where, name) if name else where
            was, now = a["files"].get(name), b["files"].get(name)
            if was == now:
                continue
            if now is None:
                what = "is gone"
            elif was is None:
                what = "is new"
            elif was["size"] != now["size"]:
                what = f"changed size ({was['size']} -> {now['size']} bytes)"
            else:
                what = (f"changed content (same {now['size']} bytes, sha256 {was['sha256'][:12]}... -> "
                        f"{now['sha256'][:12]}...)")
            return f"--{flag.replace('_', '-')}: {file} {what} since this run started"
    return None
