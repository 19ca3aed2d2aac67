"""Prefect tasks of the AdaRound pipeline, and the plain functions they call."""
