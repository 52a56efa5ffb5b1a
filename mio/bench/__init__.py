"""Benchmarks: `mio bench <part>`."""
