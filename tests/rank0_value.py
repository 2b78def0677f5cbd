"""Run under torchrun by tests/test_errors.py: every rank prints parallel.from_rank0 of a value
of its own (as train.start does with the default run folder, whose time may differ by rank)."""
import torch.distributed as dist

import parallel


def main():
    parallel.setup()
    print(f"rank {parallel.rank()} got {parallel.from_rank0(f'runs/spin-rank{parallel.rank()}')}", flush=True)
    # Close the group as train.py does: a rank leaving with it open can abort in gloo's
    # teardown while its peer still reads (seen once in CI: SIGABRT on rank 0).
    parallel.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
