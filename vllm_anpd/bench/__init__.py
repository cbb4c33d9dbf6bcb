"""Benchmark-only helpers that must be importable inside vLLM's worker processes."""
