"""Run under torchrun by tests/test_errors.py: every rank prints parallel.from_rank0 of a value
of its own (as train.start does with the default run folder, whose time may differ by rank)."""
import parallel


def main():
    parallel.setup()
    print(f"rank {parallel.rank()} got {parallel.from_rank0(f'runs/spin-rank{parallel.rank()}')}", flush=True)


if __name__ == "__main__":
    main()
