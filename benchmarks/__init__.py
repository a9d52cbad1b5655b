"""Benchmarks reproducing the LegoNet paper's experiments with peers (not part of the legonet package)."""
