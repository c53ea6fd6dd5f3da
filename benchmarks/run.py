"""Benchmark entry point (placeholder until the benchmark lands)."""

import sys

if __name__ == "__main__":
    print("benchmark: not yet", sys.argv[1:])
