"""Benchmarks of the AdaRound engine (scripts, not tests)."""
