"""Benchmarks (``make bench``): what the feature-map cache buys, measured side by side in one run."""

from fmtransfer.bench.run import bench_table, run_bench

__all__ = ["bench_table", "run_bench"]
