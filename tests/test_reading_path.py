"""The reader's path stays short and true: README.md quotes spin_tools/reading_path.py's table, the
path reads without the production rooms, and the house has no import circles."""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quotes_the_reading_path_and_it_stays_short():
    from spin_tools.reading_path import table
    text, total = table()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert text in readme, "README.md's 'Read the code' table is stale: paste `python -m spin_tools.reading_path`"
    assert f"{total:,} lines" in readme
    assert total <= 1100, f"the reading path grew to {total} lines"
    heading = next(i for i, line in enumerate(readme.splitlines(), 1) if line.startswith("## Read the code"))
    assert heading <= 80


def test_the_path_imports_nothing_of_the_production_machinery():
    """The path's files are what runs; production wraps them or puts its speed-ups in by one
    visible call, so no file on the path imports a production module (directly: the path reads
    without them)."""
    from spin_tools.reading_path import ENTRY, PATH, PRODUCTION
    graph = _project_imports()
    for path, _, _ in PATH:
        if path == ENTRY:  # the program: its loop section calls the path through production's wrappers
            continue
        mod = path[:-3].replace("/", ".")
        bad = sorted(d for d in graph[mod] if d.split(".")[0] in PRODUCTION)
        assert not bad, f"{path} is on the reader's path but imports {bad}"
    assert "stage" in graph["train"] and "slots" in graph["generate"]  # the check sees production imports


def test_the_path_carries_no_study_hook():
    """The study's arms (experiments/arms.py) vary the steps of train.spin_iteration from outside:
    the loss, the training stage and the sampler take none of their hooks."""
    for name in ("spin_loss.py", "train_loop.py", "sampler.py", "train.py"):
        src = _source(name)
        for word in (r"mix_alpha", r"base_alpha", r"\.keep\b", r"\brefill\b", r"\bvariant\.", r"stop_at", r"\bArm\b"):
            assert not re.search(word, src), f"{name} carries the study's {word}"


def _source(name):
    return open(os.path.join(ROOT, name)).read()


def test_the_path_carries_no_study_arm_and_no_test_hook():
    train = _source("train.py")
    for word in ("spin_mix", "spin_drop", "verifier", "sft_to_optimum", "fill_one_batch", "--arms"):
        assert word not in train, word
    for name in ("model.py", "train.py", "stage.py", "generate.py", "train_args.py"):
        src = _source(name)
        for hook in ("nan_at", "kill_at", "nan-at", "kill-at", "os.kill"):
            assert hook not in src, f"{name} carries the test hook {hook}"


OUTSIDE = "shar" + "ed/"  # the sibling folder of notes the project was built beside, spelled so this file does not match


def test_nothing_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): nothing to check against
        return
    bad = [f for f in files if f.endswith((".py", ".md", ".sh", ".txt", ".ini", ".toml"))
           and os.path.isfile(os.path.join(ROOT, f)) and OUTSIDE in open(os.path.join(ROOT, f)).read()]
    assert not bad, f"these files point at a folder outside the repository that users do not have: {bad}"


def _project_imports():
    """{module: set of project modules it imports at top level or inside functions}."""
    mods = {}
    for dirpath, _, names in os.walk(ROOT):
        parts = os.path.relpath(dirpath, ROOT).split(os.sep)
        if any(part.startswith(".") and part != "." or part in ("runs", "__pycache__") for part in parts):
            continue
        for n in names:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, n), ROOT)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, n)
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    deps.add(name)
        graph[mod] = deps
    return graph


def test_no_import_circles_among_the_project_modules():
    graph = _project_imports()
    assert "stage" in graph["train"] and "model" in graph["hf_folder"]  # the walk found the modules
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, "import circles: " + "; ".join(" -> ".join(c) for c in cycle[:3])


def test_only_the_study_imports_the_study():
    """experiments/ sits on top of the house: it imports train.py, report.py and the rest, and
    nothing outside it (tests aside) imports it back."""
    graph = _project_imports()
    back = sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith(("experiments", "tests"))
                  for d in deps if d.startswith("experiments"))
    assert not back, back
    assert any(d.startswith("experiments") for d in graph["experiments.compare"])  # the walk sees these imports


def test_model_py_is_the_architecture_alone():
    src = _source("model.py")
    tree = ast.parse(src)
    top = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
           for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])}
    assert top <= {"torch", "math", "dataclasses", "os", "json", "typing", "functools"}, top
    assert not re.search(r"mkldnn|onednn|triton|cuda_graph|cpu_linear|CUDAGraph", src, re.I)


# Each departure from the path's plain code, and the one call that puts it in (README "Read the code").
SPEED_UPS = {
    "slots.decode": "generate.sample",  # rows that end take the next prompts
    "cpu_decode_weights": "generate.sample",  # oneDNN-packed weights while decoding
    "cuda_graph": "generate.sample",  # decode steps replayed from CUDA graphs (slots.decode's graphed_step)
    "blocked_inverse_cdf": "generate.sample",  # the blocked draw
    "whole_cache": "generate.sample",  # CPU decode from whole float32 cache buffers (slots.WholeKVCache)
}


def _function_source(module_file, name):
    src = _source(module_file)
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(src, node)


def _code_names(src):
    """The identifiers a source uses as code (comments and strings, docstrings included, dropped)."""
    import io
    import tokenize
    return {t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.NAME}


def test_each_speed_up_is_put_in_by_one_visible_call():
    """README's promise: what you read is what runs, and each speed-up enters through one call in
    production code. Every speed-up is named in the function that puts it in, and in the code of no
    file on the path (their docstrings may point at it); the model's kernels enter through
    spin_kernels.install, which no path file calls."""
    from spin_tools.reading_path import ENTRY, PATH
    path_names = {p: _code_names(_source(p)) for p, _, _ in PATH if p != ENTRY}
    for speed_up, where in SPEED_UPS.items():
        module, func = where.split(".")
        first = speed_up.split(".")[0]  # slots.decode: the module's name
        assert first in _code_names(_function_source(module + ".py", func)), (speed_up, where)
        for p, names in path_names.items():
            assert first not in names, f"{p}, on the path, uses the speed-up {speed_up}"
    for p, names in path_names.items():
        assert "spin_kernels" not in names and "install" not in names, p
    # The model's kernel slots hold the plain functions until install swaps them.
    import model
    assert model.Attention.attend is model.attention and model.MLP.glu is model.swiglu
    assert model.Mistral.head_logprobs is model.linear_logprobs and model.Mistral.kernels == "reference"
