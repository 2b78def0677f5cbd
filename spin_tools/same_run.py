"""Are two runs of train.py the same run? Compares two run folders bitwise, as the refactors'
checks do (EXPERIMENTS.md): every record of metrics.jsonl field by field except what the clock and
the allocator decide (tokens_per_s, peak_mem_mb, the timing record), and every Parquet file the
runs wrote (samples, their log-probs) as Arrow tables.

    python -m spin_tools.same_run RUN_A RUN_B      # exit 0 when the same, 1 with the first differences
"""
import json
import os
import sys

import pyarrow.parquet as pq

CLOCK = {"tokens_per_s", "peak_mem_mb"}


def records(run):
    path, rows = os.path.join(run, "metrics.jsonl"), []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}, line {i}: not a JSON record ({e.msg})")
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in rows if r.get("type") != "timing"]


def parquet_files(run):
    return sorted(os.path.relpath(os.path.join(d, n), run) for d, _, names in os.walk(run)
                  for n in names if n.endswith(".parquet"))


def compare(a, b):
    """A list of differences (empty: the same run)."""
    out = []
    ra, rb = records(a), records(b)
    if len(ra) != len(rb):
        out.append(f"metrics.jsonl: {len(ra)} records against {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            out.append(f"metrics.jsonl record {i}: " + ", ".join(
                f"{k}: {x.get(k)!r} != {y.get(k)!r}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)))
    fa, fb = parquet_files(a), parquet_files(b)
    if fa != fb:
        out.append(f"Parquet files differ: only in {a}: {sorted(set(fa) - set(fb))}, only in {b}: {sorted(set(fb) - set(fa))}")
    for name in sorted(set(fa) & set(fb)):
        if not pq.read_table(os.path.join(a, name)).equals(pq.read_table(os.path.join(b, name))):
            out.append(f"{name}: tables differ")
    return out, len(ra), len(set(fa) & set(fb))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python -m spin_tools.same_run RUN_A RUN_B")
    for run in argv:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            sys.exit(f"{run}: no metrics.jsonl (not a train.py run folder)")
    diffs, n_records, n_files = compare(*argv)
    if diffs:
        print("\n".join(diffs[:10]) + (f"\n... {len(diffs) - 10} more" if len(diffs) > 10 else ""))
        sys.exit(1)
    print(f"the same run: {n_records} records (timings and memory aside) and {n_files} Parquet files equal")


if __name__ == "__main__":
    main()
