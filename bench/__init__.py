"""Benchmarks: ``python -m bench`` (see the README, "Performance")."""
