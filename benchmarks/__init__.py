"""Benchmarks: `python -m benchmarks.serving` (HTTP, many users at once) and `python -m benchmarks.gpu`."""
