"""Benchmarks (not tests), run from the repository root: `python -m bench [SECTION ...]` (bench/__main__.py)."""
