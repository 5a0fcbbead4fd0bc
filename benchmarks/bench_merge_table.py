"""Time and peak memory of the merge-table step (spoco_vol.stitching.merge_table) as the
number of fragments grows: blocks of 8 x 512 x 512 with 50 fragments each, and one merge
edge per fragment between face-adjacent blocks (an upper bound for mitochondria).

    python benchmarks/bench_merge_table.py [--fragments 1e6 1e7 2.4e7]
"""
import argparse
import resource
import subprocess
import sys
import time

import numpy as np

from spoco_vol.stitching import merge_table

BLOCK = (8, 512, 512)
PER_BLOCK = 50


def run_one(n_fragments: int):
    blocks = max(2, n_fragments // PER_BLOCK)
    rng = np.random.default_rng(0)
    size = np.uint64(np.prod(BLOCK))
    lower = rng.integers(0, blocks - 1, n_fragments).astype(np.uint64)
    edges = np.stack([lower * size + rng.integers(1, PER_BLOCK + 1, n_fragments).astype(np.uint64),
                      (lower + 1) * size + rng.integers(1, PER_BLOCK + 1, n_fragments).astype(np.uint64)], 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    tables = merge_table([PER_BLOCK] * blocks, BLOCK, edges)
    sec = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    objects = int(max(int(x.max()) for x in tables if len(x)))
    print(f"{blocks * PER_BLOCK:>12,}{blocks:>10,}{len(edges):>12,}{objects:>12,}{sec:>8.1f}{peak - before:>16.0f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fragments", type=float, nargs="+", default=[1e6, 1e7, 2.4e7])
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return run_one(int(a.one))
    print(f"{'fragments':>12}{'blocks':>10}{'edges':>12}{'objects':>12}{'sec':>8}{'peak growth MiB':>16}")
    for n in a.fragments:  # each size in a fresh process: a clean peak
        subprocess.run([sys.executable, __file__, "--one", str(n)], check=True)


if __name__ == "__main__":
    main()
