"""The reader's path through SPIN: which code to read, in which order, and how long it is.

    python -m spin_tools.reading_path            # the table README.md's "Read the code" quotes
    python -m spin_tools.reading_path --check    # exit 1 if README.md's table is not this one

Each stop names a file and the top-level functions or classes to read there ("__doc__": the
module docstring; None: the whole file). Lines are counted from the source, so the figures follow the code as it changes;
tests/test_reading_path.py keeps README.md in step and the total near 1,000 lines.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, what to read there (None = the whole file), what to look at)
PATH = [
    ("spin_loss.py", ["sequence_logps", "spin_loss"],
     "the loss: the paper's equation next to the code, rewards and metrics"),
    ("data/pairs.py", ["tokenize_example", "left_pad", "collate_pairs"],
     "how a (prompt, real, generated) triple becomes token ids, masks and targets"),
    ("model.py", None,
     "the architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU, per-token log-probs"),
    ("generate.py", ["next_tokens", "sample_batch", "sample", "score", "generate_dataset", "_pair_of_sample"],
     "the opponent: KV-cached sampling, and its log-probs of both answers stored once"),
    ("stage.py", ["build_model", "make_optimizer", "spin_micro_batch", "train_stage", "run_stage"],
     "one training stage: FSDP2 set-up, one SPIN step, the step loop"),
    ("train.py", ["__doc__", "run_generation", "run_evaluation", "Arm", "spin_iteration", "sft_iteration", "main"],
     "the iteration loop: generate, train, export, evaluate; the continued-SFT baseline"),
]


def spans(path, names):
    """[(first, last)] 1-based line ranges of the named top-level definitions (decorators
    included), or of the whole file."""
    src = open(os.path.join(ROOT, path)).read()
    if names is None:
        return [(1, len(src.splitlines()))]
    tree = ast.parse(src)
    found = {}
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        found["__doc__"] = (doc.lineno, doc.end_lineno)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = (first, node.end_lineno)
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"spin_tools/reading_path.py: {path} has no top-level {', '.join(missing)}; update PATH")
    return [found[n] for n in names]


def table():
    """The markdown table of the path and its total line count."""
    rows, total = ["| # | file | read | lines | what to look at |", "|---|---|---|---|---|"], 0
    for i, (path, names, why) in enumerate(PATH, 1):
        sp = spans(path, names)
        n = sum(b - a + 1 for a, b in sp)
        total += n
        what = "all" if names is None else ", ".join(
            f"{'docstring' if name == '__doc__' else f'`{name}`'} ({a}-{b})" for name, (a, b) in zip(names, sp))
        rows.append(f"| {i} | `{path}` | {what} | {n} | {why} |")
    rows.append(f"| | | **total** | **{total}** | |")
    return "\n".join(rows), total


def main(argv):
    text, total = table()
    if "--check" in argv:
        readme = open(os.path.join(ROOT, "README.md")).read()
        if text not in readme:
            print("README.md's reading-order table is stale: paste `python -m spin_tools.reading_path` into it")
            return 1
        print(f"README.md's reading path is current ({total} lines)")
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
