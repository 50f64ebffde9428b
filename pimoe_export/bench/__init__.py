"""Benchmark helpers (the benchmark scripts live in scripts/)."""
