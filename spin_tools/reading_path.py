"""The reader's path through SPIN: which code to read, in which order, and how long it is.

    python -m spin_tools.reading_path            # the table README.md's "Read the code" quotes
    python -m spin_tools.reading_path --check    # exit 1 if README.md's table is not this one

Each stop is a whole file (None) or one contiguous section of it, from the first named top-level
definition to the last ("__doc__": the module docstring), read top to bottom; the comment lines
just above a section belong to it. Lines are counted from the source, so the figures follow the
code as it changes. The path's files import nothing of the production machinery (PRODUCTION),
train.py (ENTRY) aside: production wraps the path, or puts its speed-ups in by one visible call.
tests/test_reading_path.py keeps README.md in step, the total short and the path's imports clean.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, section: None = the whole file, or (first, last) top-level names, what to look at)
PATH = [
    ("spin_loss.py", ("__doc__", "spin_loss"),
     "the loss: the paper's equation and theorems, then the code"),
    ("data/pairs.py", ("OPPONENT_COLUMNS", "collate_prompts"),
     "how a (prompt, real, generated) triple becomes token ids, masks and targets"),
    ("model.py", ("__doc__", "left_padding"),
     "the architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU, per-token log-probs"),
    ("sampler.py", ("__doc__", "sample_batch"),
     "the opponent: KV-cached sampling, and its log-probs of both answers, stored once"),
    ("train_loop.py", ("__doc__", "train_steps"),
     "one training stage: its record, the optimiser, one SPIN step, the step loop"),
    ("train.py", ("__doc__", "__doc__"),
     "the algorithm, and how this code departs from the paper's"),
    ("train.py", ("iteration_settings", "spin_iteration"),
     "one SPIN iteration: generate, train, export, evaluate"),
]

# The program itself: train.py's loop section reads the paper's four steps, each a call into the
# path through production's wrapper of it (run_generation, run_stage, run_evaluation), so it alone
# imports production.
ENTRY = "train.py"
# What the path's other files may not import: the machinery that runs the path at scale or studies it.
PRODUCTION = ("checkpoint", "experiments", "fingerprint", "generate", "heldout", "hf_folder", "live_curves",
              "lora", "report", "run_folder", "slots", "spin_kernels", "stage", "train_args")


def top_level(path):
    """{name: (first, last)} 1-based line ranges of a file's top-level definitions and
    assignments (decorators and the comment lines just above included), and "__doc__"."""
    src = open(os.path.join(ROOT, path)).read()
    lines, tree, found = src.splitlines(), ast.parse(src), {}
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        found["__doc__"] = (doc.lineno, doc.end_lineno)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while first > 1 and lines[first - 2].startswith("#") and not lines[first - 2].startswith("# ---"):
            first -= 1
        for name in names:
            found[name] = (first, node.end_lineno)
    return found, len(lines)


def span(path, section):
    """(first, last) 1-based lines of a stop."""
    found, n = top_level(path)
    if section is None:
        return 1, n
    missing = [name for name in section if name not in found]
    if missing:
        raise SystemExit(f"spin_tools/reading_path.py: {path} has no top-level {', '.join(missing)}; update PATH")
    first, last = found[section[0]][0], found[section[1]][1]
    if last < first:
        raise SystemExit(f"spin_tools/reading_path.py: {path}: {section[1]} comes before {section[0]}")
    return first, last


def table():
    """The markdown table of the path and its total line count."""
    rows, total = ["| # | file | read | lines | what to look at |", "|---|---|---|---|---|"], 0
    for i, (path, section, why) in enumerate(PATH, 1):
        a, b = span(path, section)
        total += b - a + 1
        name = lambda n: "docstring" if n == "__doc__" else f"`{n}`"  # noqa: E731
        what = "all" if section is None else name(section[0]) if section[0] == section[1] else \
            f"{name(section[0])} to {name(section[1])}"
        rows.append(f"| {i} | `{path}` | {what} ({a}-{b}) | {b - a + 1} | {why} |")
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
