"""The project's import names never shadow a package installed beside it.

The project is a flat folder of modules run from its root (`torchrun train.py`, `python -m
pytest`), so the root comes first on sys.path and any top-level name of ours hides an installed
package of the same name. That broke the suite once: transformers 5.25 started importing Hugging
Face's `kernels` package, and our kernels folder (now spin_kernels/) answered instead. Two checks:
no top-level name of ours is provided by an installed distribution, and transformers, imported
after every module of ours in one process started from the root, still builds and generates."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_names():
    """Every name `import X` can reach in this repository: top-level modules, folders holding
    Python files (packages and namespace packages), and the helper modules of tests/, which
    pytest puts on sys.path too."""
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    for d in os.listdir(ROOT):
        path = os.path.join(ROOT, d)
        if os.path.isdir(path) and not d.startswith(".") and d != "tests" \
                and any(f.endswith(".py") for f in os.listdir(path)):
            names.add(d)
    names |= {f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py") and f != "conftest.py"}
    return names


def test_no_top_level_name_is_provided_by_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level module -> [distribution]
    assert "torch" in installed and "transformers" in installed  # the lookup sees this environment
    mine = project_names()
    assert {"model", "train", "spin_kernels", "data", "hf_tiny"} <= mine  # and the walk sees ours
    clashes = {n: installed[n] for n in sorted(mine) if n in installed}
    assert not clashes, f"top-level names of this repository that installed distributions also provide: {clashes}"


# Run from the repository root, as a user's script or `python -c` would be. transformers builds
# three tiny families and generates twice: first before any module of ours is imported (nothing it
# loads may come from this folder: that would be a shadowed dependency), then after every module
# of ours is imported (what train.py's process and the tests look like).
SCRIPT = textwrap.dedent("""
    import importlib, os, sys
    root = os.getcwd()
    assert sys.path[0] in ("", root), sys.path[0]
    import torch, transformers

    def generate_all(when):
        torch.manual_seed(0)
        shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        for family in ("Mistral", "Llama", "Qwen2"):
            config = getattr(transformers, family + "Config")(**shape)
            model = getattr(transformers, family + "ForCausalLM")(config).eval()
            out = model.generate(torch.tensor([[1, 5, 9, 3]]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            assert out.shape == (1, 8), (family, out.shape)
            print(family, "generated", when)

    generate_all("before")
    files = {n: getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items())}
    # (a virtual environment made inside the checkout keeps its packages under root too)
    strays = sorted(n for n, f in files.items() if os.path.isabs(f) and f.startswith(root + os.sep)
                    and os.sep + "site-packages" + os.sep not in f)
    assert not strays, f"transformers loaded these from the repository, not site-packages: {strays}"
    ours = sorted(f[:-3] for f in os.listdir(".") if f.endswith(".py"))
    ours += ["data", "spin_kernels", "spin_tools", "experiments"]
    for name in ours:
        importlib.import_module(name)
    generate_all("after")
""")


def test_transformers_generates_beside_every_module_of_ours_from_the_root():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    for when in ("before", "after"):
        for family in ("Mistral", "Llama", "Qwen2"):
            assert f"{family} generated {when}" in r.stdout
