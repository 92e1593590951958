"""Benchmarks and their baselines (not part of the installed package)."""
