"""Run under torchrun by tests/test_errors.py: rank 0 fails alone while rank 1 waits at a
collective, whose connection then closes. Rank 0 says why; rank 1 must stop without a word."""
import torch.distributed as dist

import errors
import parallel


def main():
    parallel.setup()
    if parallel.rank() == 0:
        raise errors.InputError("peer_failure.py: rank 0 alone saw this")
    dist.barrier()


if __name__ == "__main__":
    errors.run_command(main)
