import os
import sys

# Triton kernels are tested through Triton's interpreter when no GPU is present. The
# variable must be set before triton is first imported, so it is set here, at collection.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A kernel override left in the shell (kernels/__init__.py) would change what the tests run.
os.environ.pop("SPIN_KERNELS", None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
