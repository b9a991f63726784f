"""Benchmarks anyone can run: each prints a table and writes JSON (``nearstep bench <name>``)."""

__all__: list[str] = []
